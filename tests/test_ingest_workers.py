"""Ingest in worker processes (``serve --ingest-processes N``): the same checks and store
as on the ingest thread (``server/ingestwork.py``, one home for both), real mosquitto,
real agents, SQLite.

Every batch is stored once and confirmed whichever worker stores it; the counters and
/metrics add the workers up; a flooding device is limited as one device although its
messages come in groups split between workers; a worker killed mid-stream is started again
with the parts it had not finished, and nothing is lost.
"""

from __future__ import annotations

import json
import os
import signal
import time

from fleet_helpers import wait_for
from rollout_helpers import Fleet
from test_ingest import RawDevice, metrics, start_agent, stop_agent

from prunefleet.server.serve import FleetService, ServeOptions


def _server(f: Fleet, processes: int, **opts) -> FleetService:
    f.svc = FleetService(ServeOptions(
        state_dir=f.state_dir, broker_url=f.broker_url, listen="127.0.0.1:0",
        prefix=f.prefix, tick_s=0.2, ingest_processes=processes, **opts)).start()
    return f.svc


def test_workers_store_every_batch_once_and_count_as_one_server(tmp_path, mosquitto):
    f = Fleet(tmp_path, mosquitto.url)
    svc = _server(f, 2)
    agents = [start_agent(f, f"wk-{i}", telemetry_interval_s=0.1) for i in range(4)]
    try:
        wait_for(lambda: all(a.sender.acked_total >= 15 for a, _, _ in agents), 40,
                 what="every device's batches confirmed")
        for _, stop, t in agents:
            stop_agent(stop, t)
        assert svc.fleet is not None and svc.fleet.workers is not None
        issued = 0
        for a, _, _ in agents:
            assert a.tqueue.pending() == []
            assert svc.store.telemetry_seqs(a.config.device_id) == list(range(a.tqueue.issued))
            issued += a.tqueue.issued
        counters = svc.fleet.counters
        assert counters.telemetry == issued and counters.duplicates == 0
        assert sum(counters.dropped.values()) == 0
        assert counters.reported >= 4  # reported states go through the workers too
        m = metrics(svc)
        assert m[("prunefleet_telemetry_batches_ingested_total", ())] == issued
        assert m[("prunefleet_telemetry_ingest_lag_seconds_count", ())] == issued
        assert m[("prunefleet_telemetry_acks_published_total", ())] > 0
    finally:
        for _, stop, _ in agents:
            stop.set()
        f.close()


def test_a_flooding_device_is_limited_as_one_device_across_groups(tmp_path, mosquitto):
    """A device's messages always meet the same worker, so its token bucket is one."""
    f = Fleet(tmp_path, mosquitto.url)
    svc = _server(f, 2, device_rate_per_s=5.0, device_burst=10.0)
    flood = RawDevice(f.broker_url, f.prefix, "flooder")
    try:
        t0 = time.monotonic()
        infos = [flood.publish(json.dumps(flood.batch(seq))) for seq in range(1000)]
        for info in infos:
            info.wait_for_publish(30)
        assert svc.fleet is not None

        def settled() -> bool:
            return (svc.fleet.counters.dropped["rate_limited"]  # type: ignore[union-attr]
                    + svc.store.telemetry_count("flooder")) == 1000

        wait_for(settled, 20, what="every flooded message stored or dropped")
        elapsed = time.monotonic() - t0
        stored = svc.store.telemetry_count("flooder")
        # One bucket: the burst and what it refilled while the flood lasted. Split between
        # two workers' buckets it would be twice that (20 + 10 per second).
        assert 10 <= stored <= 10 + 5 * elapsed + 1, (stored, elapsed)
    finally:
        flood.close()
        f.close()


def test_a_killed_worker_is_started_again_and_nothing_is_lost(tmp_path, mosquitto):
    f = Fleet(tmp_path, mosquitto.url)
    svc = _server(f, 1)
    assert svc.fleet is not None and svc.fleet.workers is not None
    workers = svc.fleet.workers
    agents = [start_agent(f, f"kw-{i}", telemetry_interval_s=0.05,
                          telemetry_ack_timeout_s=2.0) for i in range(3)]
    try:
        wait_for(lambda: all(a.sender.acked_total >= 5 for a, _, _ in agents), 30,
                 what="telemetry flowing")
        before = svc.fleet.counters.telemetry
        pid = workers.pids()[0]
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: workers.restarts == 1 and workers.pids()[0] != pid, 30,
                 what="the worker started again")
        wait_for(lambda: svc.fleet.counters.telemetry >= before + 30, 30,  # type: ignore
                 what="storing again after the restart")
        for _, stop, t in agents:
            stop_agent(stop, t)
        for a, _, _ in agents:
            assert a.tqueue.pending() == []
            assert svc.store.telemetry_seqs(a.config.device_id) == list(range(a.tqueue.issued))
        # What the killed worker had counted is kept: the totals are the store's.
        assert svc.fleet.counters.telemetry + svc.fleet.counters.duplicates >= sum(
            a.tqueue.issued for a, _, _ in agents)
    finally:
        for _, stop, _ in agents:
            stop.set()
        f.close()
