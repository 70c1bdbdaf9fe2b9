"""Telemetry ingest end to end, on the real server and the test mosquitto: hostile values
refused and counted, per-device rate limits, acknowledgement after commit, agent
incarnations, a server restart mid-stream, and manifest versions that survive a new store.
The pure parts (token bucket, cursors) are tested at the end without a broker."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from fleet_helpers import make_server, run_agent, wait_for
from prometheus_client.parser import text_string_to_metric_families
from rollout_helpers import Fleet, pg_schema_url
from sqlalchemy import event
from test_brokers import connected, production_mosquitto  # noqa: F401 - a fixture

from prunefleet.agent.config import load_config
from prunefleet.agent.service import Agent
from prunefleet.server.errors import StoreError
from prunefleet.server.ingest import DROP_REASONS, DeviceRateLimiter, StoredCursors
from prunefleet.server.ingestwork import IngestCore
from prunefleet.server.serve import FleetService, ServeOptions
from prunefleet.server.store import Store, sqlite_url
from prunefleet.shared.messages import (
    Event,
    EventKind,
    ReportedState,
    ShadowReport,
    ShadowStats,
    SwitchEvent,
    TelemetryBatch,
    VariantStats,
)
from prunefleet.shared.topics import Topics
from prunefleet.shared.transport import (
    BrokerAddress,
    MqttTransport,
    TransportError,
    TransportOptions,
)


def refuse_writes(store: Store, error: str = "database is locked",
                  when: Callable[[str, Any], bool] = lambda statement, parameters: True
                  ) -> None:
    """From now on the store's SQLite refuses every write (any statement but a SELECT)
    for which ``when(statement, parameters)`` holds, with ``error``: a disk or a lock
    failing under a running server."""
    def refusing(conn, cursor, statement, parameters, *args):
        if not statement.lstrip().upper().startswith("SELECT") and when(statement,
                                                                        parameters):
            raise sqlite3.OperationalError(error)

    event.listen(store.engine, "before_cursor_execute", refusing)


class RawDevice:
    """A device that is only an MQTT connection: it publishes exactly the bytes given."""

    def __init__(self, broker_url: str, prefix: str, device_id: str):
        host, port = broker_url.removeprefix("mqtt://").rsplit(":", 1)
        self.device_id = device_id
        self.topic = Topics(prefix).telemetry(device_id)
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2,
                                  client_id=f"raw-{uuid.uuid4().hex[:8]}")
        self.client.max_inflight_messages_set(100)
        self.client.connect(host, int(port))
        self.client.loop_start()
        self._lock = threading.Lock()

    def publish(self, payload: bytes | str, topic: str | None = None) -> mqtt.MQTTMessageInfo:
        with self._lock:
            return self.client.publish(topic or self.topic, payload, qos=1)

    def batch(self, seq: int, **fields) -> dict:
        """A valid batch as JSON data, for the test to spoil."""
        b = TelemetryBatch(device_id=self.device_id, seq=seq, incarnation="raw",
                           interval_start=1000.0 + seq, interval_end=1001.0 + seq,
                           variants={"small": VariantStats(requests=10, labeled=4, correct=3,
                                                           latency_ms_p50=1.0)}, **fields)
        return json.loads(b.encode())

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def start_agent(fleet: Fleet, device_id: str, state: str | None = None,
                **cfg) -> tuple[Agent, threading.Event, threading.Thread]:
    config = load_config(
        None, env={}, device_id=device_id, broker_url=fleet.broker_url,
        fleet_prefix=fleet.prefix, state_dir=fleet.tmp / "agents" / (state or device_id),
        trusted_keys=[fleet.state_dir / "keys" / "public.pem"], reconnect_max_s=2.0,
        sensors={"kind": "simulated"}, **{"telemetry_interval_s": 0.2, **cfg})
    agent = Agent(config)
    stop = threading.Event()
    t = threading.Thread(target=agent.run, kwargs={"until": stop}, daemon=True,
                         name=f"agent-{device_id}")
    t.start()
    return agent, stop, t


def stop_agent(stop: threading.Event, t: threading.Thread) -> None:
    """SIGTERM's path: the last batch is cut and flushed until the server confirmed it."""
    stop.set()
    t.join(20)
    assert not t.is_alive()


def metrics(svc: FleetService) -> dict[tuple[str, tuple], float]:
    req = urllib.request.Request(svc.url + "/metrics",
                                 headers={"Authorization": f"Bearer {svc.token}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.status == 200
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


@pytest.fixture
def fleet(tmp_path, mosquitto):
    f = Fleet(tmp_path, mosquitto.url)
    f.start_server()
    yield f
    f.close()


# -- 1. bounds: hostile values never reach the store ------------------------------------------


def test_impossible_telemetry_is_refused_counted_and_the_read_paths_keep_working(fleet):
    dev = RawDevice(fleet.broker_url, fleet.prefix, "hostile-1")
    try:
        spoiled = []
        for seq, change in enumerate([
            {"variants": {"small": {"requests": 2**62}}},  # overflowed SQLite's sums
            {"energy_j": float("nan")},
            {"energy_j": float("inf")},
            {"variants": {"small": {"requests": 5, "labeled": 4, "correct": 5}}},
            {"variants": {"small": {"requests": 5, "latency_ms_p50": 9.0,
                                    "latency_ms_p95": 2.0}}},
            {"interval_end": 10.0},  # before its start
            {"seq": 2**40},
        ]):
            body = dev.batch(seq)
            for key, value in change.items():
                if isinstance(value, dict):
                    body[key]["small"] = value["small"]
                else:
                    body[key] = value
            spoiled.append(json.dumps(body))  # NaN and Infinity: Python writes them
        depth = 15_000  # 30 KB of nesting: RecursionError in json.loads before
        spoiled.append('{"a":' * depth + "1" + "}" * depth)
        spoiled.append(json.dumps({**dev.batch(50), "device_id": "someone-else"}))
        for payload in spoiled:
            dev.publish(payload)
        dev.publish(json.dumps(dev.batch(100))).wait_for_publish(10)

        store = fleet.svc.store
        wait_for(lambda: store.telemetry_count("hostile-1") == 1, 20, what="the valid batch")
        counters = fleet.svc.fleet.counters
        assert counters.dropped["invalid"] == len(spoiled) - 1
        assert counters.dropped["wrong_device"] == 1
        m = metrics(fleet.svc)
        assert m[("prunefleet_ingest_dropped_total", (("reason", "invalid"),))] == \
            len(spoiled) - 1
        summary = fleet.api.telemetry_summary()
        assert summary["variants"]["small"]["requests"] == 10
        assert summary["variants"]["small"]["correct"] == 3
        assert store.usage("hostile-1") == {
            "small": {"requests": 10, "labeled": 4, "correct": 3, "errors": 0}}
    finally:
        dev.close()


# -- 2. per-device rate limits -----------------------------------------------------------------


def test_a_flooding_device_is_limited_and_an_honest_one_loses_nothing(tmp_path, mosquitto):
    f = Fleet(tmp_path, mosquitto.url)
    f.svc = FleetService(ServeOptions(
        state_dir=f.state_dir, broker_url=f.broker_url, listen="127.0.0.1:0",
        prefix=f.prefix, tick_s=0.2, device_rate_per_s=5.0, device_burst=10.0,
    )).start()
    flood = RawDevice(f.broker_url, f.prefix, "flooder")
    try:
        agent, stop, t = start_agent(f, "honest-1", telemetry_interval_s=0.5,
                                     telemetry_ack_timeout_s=2.0)
        wait_for(lambda: agent.sender.acked_total >= 2, 20, what="honest telemetry confirmed")
        infos = [flood.publish(json.dumps(flood.batch(seq))) for seq in range(3000)]
        for info in infos:
            info.wait_for_publish(30)
        issued_during_flood = agent.tqueue.issued
        wait_for(lambda: agent.sender.acked_total >= issued_during_flood, 30,
                 what="the honest device's batches from the flood confirmed")
        stop_agent(stop, t)
        store = f.svc.store
        assert store.telemetry_seqs("honest-1") == list(range(agent.tqueue.issued))
        assert agent.tqueue.pending() == []
        counters = f.svc.fleet.counters
        wait_for(lambda: counters.dropped["rate_limited"]
                 + store.telemetry_count("flooder") == 3000, 20,
                 what="every flooded message stored or dropped")
        assert counters.dropped["rate_limited"] > 2000
        m = metrics(f.svc)
        assert m[("prunefleet_ingest_dropped_total", (("reason", "rate_limited"),))] \
            == counters.dropped["rate_limited"]
        assert not any("flooder" in str(labels) for _, labels in m)  # reason, not device
    finally:
        flood.close()
        f.close()


# -- 3. acknowledgement after commit, incarnations, restarts ---------------------------------


def test_batches_the_broker_could_not_deliver_are_sent_again_until_stored(tmp_path, mosquitto):
    """The broker acknowledges a batch nobody receives (here: no server subscribed); the
    agent keeps it until the server's cursor says stored, and sends it again."""
    f = Fleet(tmp_path, mosquitto.url)
    f.start_server()
    f.stop_server()  # keys exist; nobody listens now
    agent, stop, t = start_agent(f, "lonely-1", telemetry_ack_timeout_s=1.0)
    try:
        wait_for(lambda: agent.sender.sent_total >= 5, 20, what="batches published")
        assert agent.tqueue.pending()  # acknowledged by the broker, still held
        f.svc = FleetService(ServeOptions(
            state_dir=tmp_path / "other-server", key_dir=f.state_dir / "keys",
            broker_url=f.broker_url, listen="127.0.0.1:0", prefix=f.prefix)).start()
        wait_for(lambda: agent.sender.resent_total > 0 and agent.sender.acked_total >= 5, 30,
                 what="the lost batches sent again and confirmed")
        stop_agent(stop, t)
        assert f.svc.store.telemetry_seqs("lonely-1") == list(range(agent.tqueue.issued))
        m = metrics(f.svc)
        assert m[("prunefleet_telemetry_acks_published_total", ())] > 0
        assert m[("prunefleet_telemetry_ingest_lag_seconds_count", ())] \
            == agent.tqueue.issued
    finally:
        stop.set()
        f.close()


def test_a_lost_cursor_costs_a_resend_and_nothing_else(tmp_path, mosquitto):
    """Cursors go retained at QoS 0: one can be lost with a dropped connection. Here none
    is published until the agent re-sends; the batches wait on its disk, go again after
    its timeout, the server recognises the copies and the next cursor confirms them."""
    f = Fleet(tmp_path, mosquitto.url)
    svc = f.start_server()
    assert svc.fleet is not None
    server = svc.fleet
    send = server.transport.ack_and_publish
    agent: Agent | None = None
    lost: list[object] = []

    def lossy(acks, cursors):
        if cursors and (agent is None or agent.sender.resent_total == 0):
            lost.append(cursors)  # cursors that never reached the broker
            cursors = []
        return send(acks, cursors)

    server.transport.ack_and_publish = lossy
    agent, stop, t = start_agent(f, "lossy-1", telemetry_ack_timeout_s=1.0)
    try:
        wait_for(lambda: agent.sender.resent_total > 0 and agent.sender.acked_total >= 5, 30,
                 what="unconfirmed batches sent again and then confirmed")
        stop_agent(stop, t)
        assert lost
        assert agent.tqueue.pending() == []
        assert svc.store.telemetry_seqs("lossy-1") == list(range(agent.tqueue.issued))
        assert server.counters.duplicates > 0  # the re-sent copies, not stored twice
    finally:
        stop.set()
        f.close()


def test_the_brokers_acknowledgements_never_wait_on_cursors_that_cannot_be_sent(
        tmp_path, mosquitto):
    """The group's PUBACKs and cursors go as one packet. Should the transport refuse the
    cursors, the PUBACKs still go: without them the broker stops handing this server
    messages once its in-flight window (100 here) is full, and ingest stops."""
    f = Fleet(tmp_path, mosquitto.url)
    f.svc = FleetService(ServeOptions(
        state_dir=f.state_dir, broker_url=f.broker_url, listen="127.0.0.1:0",
        prefix=f.prefix, device_rate_per_s=0.0)).start()
    assert f.svc.fleet is not None
    send = f.svc.fleet.transport.ack_and_publish
    refused: list[int] = []

    def refusing(acks, cursors):
        if cursors:
            refused.append(len(cursors))
            raise TransportError("cannot publish to this topic")
        return send(acks, cursors)

    f.svc.fleet.transport.ack_and_publish = refusing
    raw = RawDevice(f.broker_url, f.prefix, "uncursored-1")
    try:
        n = 300
        for info in [raw.publish(json.dumps(raw.batch(seq)).encode()) for seq in range(n)]:
            info.wait_for_publish(30)
        wait_for(lambda: len(f.svc.store.telemetry_seqs("uncursored-1")) == n, 30,
                 what="every batch stored, past the broker's in-flight window")
        assert refused
        assert sum(f.svc.fleet.counters.dropped.values()) == 0
    finally:
        raw.close()
        f.close()


def test_a_reflashed_device_is_stored_and_true_duplicates_are_not(tmp_path, mosquitto):
    f = Fleet(tmp_path, mosquitto.url)
    f.start_server()
    try:
        first, stop, t = start_agent(f, "reflash-1", state="install-1")
        wait_for(lambda: first.sender.acked_total >= 3, 20, what="first install's telemetry")
        stop_agent(stop, t)
        second, stop, t = start_agent(f, "reflash-1", state="install-2")  # a new disk
        assert second.tqueue.incarnation != first.tqueue.incarnation
        wait_for(lambda: second.sender.acked_total >= 3, 20, what="second install's telemetry")
        stop_agent(stop, t)
        seqs = f.svc.store.telemetry_seqs("reflash-1")
        assert sorted(seqs) == sorted([*range(first.tqueue.issued),
                                       *range(second.tqueue.issued)])
        # a true duplicate (the same incarnation and seq, sent again) is dropped
        dup = second.tqueue.incarnation
        raw = RawDevice(f.broker_url, f.prefix, "reflash-1")
        try:
            body = raw.batch(0)
            raw.publish(json.dumps({**body, "incarnation": dup})).wait_for_publish(10)
            wait_for(lambda: f.svc.fleet.counters.duplicates >= 1, 20, what="the duplicate")
        finally:
            raw.close()
        assert len(f.svc.store.telemetry_seqs("reflash-1")) == len(seqs)
    finally:
        f.close()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_store_dedupes_by_device_incarnation_and_seq_in_one_transaction(tmp_path, backend):
    schema = pg_schema_url() if backend == "postgresql" else None
    store = Store(next(schema) if schema else sqlite_url(tmp_path / "s.db"))
    try:
        def b(seq: int, inc: str) -> TelemetryBatch:
            return TelemetryBatch(device_id="d1", seq=seq, incarnation=inc, interval_start=1,
                                  interval_end=2, variants={"v": VariantStats(requests=1)})
        assert store.add_telemetry_batches([b(0, "a"), b(1, "a"), b(0, "b"), b(1, "a")]) \
            == [True, True, True, False]
        assert store.add_telemetry_batches([b(1, "a"), b(2, "a")]) == [False, True]
        assert store.stored_seqs("d1", "a", 1) == [1, 2]
        # A group's new cursors are seeded in one query: the same seqs, per key.
        assert store.stored_seqs_many({("d1", "a"): 1, ("d1", "b"): 0, ("d2", "a"): 0}) == {
            ("d1", "a"): [1, 2], ("d1", "b"): [0], ("d2", "a"): []}
        # One statement whatever the number of keys: a statement of its own shape per
        # group size was compiled anew each time, 129 µs per key seeded (a first
        # contact with a fleet, or a restart in front of one, is mostly seeding).
        texts: set[str] = set()
        event.listen(store.engine, "before_cursor_execute",
                     lambda conn, cur, stmt, *a: texts.add(stmt))
        for n in (2, 17, 150):
            got = store.stored_seqs_many({(f"n{k}", "a"): 0 for k in range(n)} | {
                ("d1", "a"): 2})
            assert got[("d1", "a")] == [2] and len(got) == n + 1
        assert len(texts) == 1
        assert store.usage("d1")["v"]["requests"] == 4
    finally:
        store.close()
        if schema is not None:
            schema.close()  # drops it


def test_one_device_with_many_seqs_stored_does_not_crowd_the_others_out_of_their_seeding(
        tmp_path):
    """A group's new cursors are seeded in one query that shares its limit among the
    keys: a device with more seqs stored above its start than the whole part may read
    (a liar claiming to hold them all, or a long backlog) took the others' share, and their
    cursors started short of what was stored, so they re-sent it after their timeout.
    Each key now gets its own seqs."""
    store = Store(sqlite_url(tmp_path / "s.db"))
    try:
        batches = [TelemetryBatch(device_id="busy", seq=q, incarnation="a", interval_start=1,
                                  interval_end=2) for q in range(120)]
        batches += [TelemetryBatch(device_id="quiet", seq=q, incarnation="b",
                                   interval_start=1, interval_end=2) for q in (100, 101, 102)]
        store.add_telemetry_batches(batches)
        got = store.stored_seqs_many({("busy", "a"): 0, ("quiet", "b"): 100}, limit=50)
        assert got == {("busy", "a"): list(range(50)), ("quiet", "b"): [100, 101, 102]}
    finally:
        store.close()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_telemetry_adds_unknown_devices_and_refreshes_known_ones_without_their_state(
        tmp_path, backend):
    schema = pg_schema_url() if backend == "postgresql" else None
    store = Store(next(schema) if schema else sqlite_url(tmp_path / "s.db"))
    try:
        def b(device_id: str, seq: int) -> TelemetryBatch:
            return TelemetryBatch(device_id=device_id, seq=seq, incarnation="i",
                                  interval_start=1, interval_end=2)
        store.set_reported(ReportedState(device_id="known", online=True, agent_version="1.2",
                                         counters={"telemetry_resent": 3}))
        before = store.device("known")
        assert before is not None
        # One group: a new device, the known one, and a batch of the new one again.
        assert store.add_telemetry_batches([b("new", 0), b("known", 0), b("new", 1)]) \
            == [True, True, True]
        new, known = store.device("new"), store.device("known")
        assert new is not None and known is not None
        assert (new.online, new.installed, new.counters) == (False, [], {})
        assert new.last_seen > 0
        assert known.last_seen >= before.last_seen
        assert (known.online, known.agent_version, known.counters) == (
            True, "1.2", {"telemetry_resent": 3})
        assert {d.device_id for d in store.devices()} == {"new", "known"}
        # A group of re-sent batches only (all duplicates) still says the device was seen.
        with store.engine.begin() as c:
            c.exec_driver_sql("UPDATE devices SET last_seen = 0 WHERE device_id = 'new'")
        assert store.add_telemetry_batches([b("new", 0), b("new", 1)]) == [False, False]
        seen = store.device("new")
        assert seen is not None and seen.last_seen > 0
    finally:
        store.close()
        if schema is not None:
            schema.close()  # drops it


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_every_field_of_a_group_of_batches_is_stored_as_sent(tmp_path, backend):
    """Child rows (variants, switches, shadow figures) and empty fields of a whole group,
    read back through the store's own queries."""
    schema = pg_schema_url() if backend == "postgresql" else None
    store = Store(next(schema) if schema else sqlite_url(tmp_path / "s.db"))
    try:
        full = TelemetryBatch(
            device_id="d1", seq=0, incarnation="i", interval_start=10.0, interval_end=20.0,
            variants={"a": VariantStats(requests=7, errors=1, labeled=5, correct=4,
                                        latency_ms_p50=1.5, latency_ms_p95=2.5,
                                        latency_ms_p99=3.5),
                      "b": VariantStats(requests=2)},
            switches=[SwitchEvent(ts=15.0, from_variant=None, to_variant="a",
                                  reason="initial"),
                      SwitchEvent(ts=16.0, from_variant="a", to_variant="b",
                                  reason="battery_low")],
            active_variant="b", battery_percent=40.0, charging=True, cpu_percent=12.5,
            mem_percent=30.0, temperature_c=-5.0, energy_j=2.0, batches_dropped=3,
            switches_dropped=1,
            shadow=ShadowReport(rollout_id=4, variants={"b": ShadowStats(
                reference="a", samples=9, agreed=8, divergence_sum=0.25, errors=1,
                latency_ms_p95=4.0)}))
        bare = [TelemetryBatch(device_id=f"d{k}", seq=0, interval_start=1.0,
                               interval_end=2.0) for k in range(2, 80)]
        assert store.add_telemetry_batches([full, *bare]) == [True] * 79
        assert store.telemetry_count() == 79
        assert store.usage("d1") == {
            "a": {"requests": 7, "errors": 1, "labeled": 5, "correct": 4},
            "b": {"requests": 2, "errors": 0, "labeled": 0, "correct": 0}}
        assert [(w.ts, w.from_variant, w.to_variant, w.reason)
                for w in store.switches("d1")] == [
            (15.0, None, "a", "initial"), (16.0, "a", "b", "battery_low")]
        with store.engine.connect() as c:
            row = c.exec_driver_sql(
                "SELECT active_variant, battery_percent, charging, cpu_percent, mem_percent, "
                "temperature_c, energy_j, batches_dropped, switches_dropped, incarnation "
                "FROM telemetry WHERE device_id = 'd1'").one()
            assert tuple(row) == ("b", 40.0, True, 12.5, 30.0, -5.0, 2.0, 3, 1, "i")
            empty = c.exec_driver_sql(
                "SELECT active_variant, battery_percent, charging, temperature_c, "
                "incarnation FROM telemetry WHERE device_id = 'd2'").one()
            assert tuple(empty) == (None, None, None, None, "")
            p95 = c.exec_driver_sql(
                "SELECT latency_ms_p95 FROM telemetry_variants WHERE device_id = 'd1' "
                "AND variant = 'a'").scalar()
            assert p95 == 2.5
            shadow = c.exec_driver_sql(
                "SELECT rollout_id, variant, reference, samples, agreed, divergence_sum, "
                "errors, latency_ms_p95, profile_latency_ms, interval_end "
                "FROM telemetry_shadow").all()
            assert [tuple(r) for r in shadow] == [
                (4, "b", "a", 9, 8, 0.25, 1, 4.0, None, 20.0)]
    finally:
        store.close()
        if schema is not None:
            schema.close()  # drops it


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_full_group_from_devices_met_for_the_first_time_gets_every_cursor(
        tmp_path, backend):
    """A full group (1,000 messages) from 1,000 devices this server has not met: every
    batch stored and every device's cursor published. Their cursors are read from the
    store in a few queries; one query over all 1,000 was refused by SQLite (an expression
    tree deeper than 1,000) and the group was counted as an error."""
    schema = pg_schema_url() if backend == "postgresql" else None
    store = Store(next(schema) if schema else sqlite_url(tmp_path / "s.db"))
    try:
        topics = Topics("pf")
        core = IngestCore(store, topics, device_rate_per_s=0)
        # one device stored a batch before: its cursor comes from the store
        store.add_telemetry_batches([TelemetryBatch(
            device_id="d0007", seq=0, incarnation="i", interval_start=1, interval_end=2)])
        messages = [(topics.telemetry(f"d{k:04d}"), TelemetryBatch(
            device_id=f"d{k:04d}", seq=1 if k == 7 else 0, incarnation="i",
            unconfirmed_from=0, interval_start=1, interval_end=2).encode())
            for k in range(1000)]
        out = core.process(messages)
        assert sum(core.counters.dropped.values()) == 0
        assert core.counters.telemetry == 1000
        assert sorted(out.cursors) == sorted(
            (f"d{k:04d}", "i", 1 if k == 7 else 0) for k in range(1000))
    finally:
        store.close()
        if schema is not None:
            schema.close()  # drops it


def test_sqlite_children_join_their_own_batch_with_two_writers_and_past_the_largest_id(
        tmp_path):
    """On SQLite a group's new rows are found by id (no ``RETURNING`` per row): with two
    stores writing one file in turns (as ingest worker processes do), duplicates mixed in,
    and past SQLite's largest id (where it picks ids at random), every child row belongs
    to its own batch and each batch is stored once."""
    url = sqlite_url(tmp_path / "s.db")
    one, two = Store(url), Store(url)
    try:
        def b(device: str, seq: int) -> TelemetryBatch:
            return TelemetryBatch(
                device_id=device, seq=seq, incarnation="i", interval_start=1,
                interval_end=2, variants={"v": VariantStats(requests=seq + 1),
                                          "w": VariantStats(requests=seq + 1)},
                switches=[SwitchEvent(ts=float(seq), from_variant=None, to_variant="v",
                                      reason="initial")])

        expected = set()
        for k in range(6):
            store = (one, two)[k % 2]
            group = [b(f"d{d}", seq) for d in range(3) for seq in range(k * 5, k * 5 + 7)]
            new = store.add_telemetry_batches(group)
            # the first two seqs of each device repeat the last group's last two
            assert new == [(x.device_id, x.seq) not in expected for x in group]
            expected |= {(x.device_id, x.seq) for x in group}
        with one.engine.begin() as c:  # SQLite now picks the ids of new rows at random
            c.exec_driver_sql(
                "INSERT INTO telemetry (id, device_id, incarnation, seq, interval_start, "
                "interval_end, energy_j, batches_dropped, switches_dropped, received_at) "
                "VALUES (9223372036854775807, 'top', 'i', 0, 1, 2, 0, 0, 0, 0)")
        expected.add(("top", 0))
        group = [b("d0", seq) for seq in range(28, 40)]
        assert two.add_telemetry_batches(group) == [s >= 32 for s in range(28, 40)]
        expected |= {(x.device_id, x.seq) for x in group}
        with one.engine.connect() as c:
            rows = c.exec_driver_sql("SELECT device_id, seq FROM telemetry").all()
            assert sorted(map(tuple, rows)) == sorted(expected)
            children = c.exec_driver_sql(
                "SELECT t.device_id, t.seq, v.device_id, v.requests FROM telemetry_variants v "
                "JOIN telemetry t ON t.id = v.telemetry_id").all()
            switches = c.exec_driver_sql(
                "SELECT t.device_id, t.seq, s.device_id, s.ts FROM switches s "
                "JOIN telemetry t ON t.id = s.telemetry_id").all()
        assert len(children) == 2 * (len(expected) - 1)
        assert all(d == vd and r == seq + 1 for d, seq, vd, r in children)
        assert len(switches) == len(expected) - 1
        assert all(d == sd and ts == seq for d, seq, sd, ts in switches)
    finally:
        one.close()
        two.close()


def test_sqlite_store_has_a_commit_on_disk_before_ingest_acknowledges_it(tmp_path):
    """Ingest acknowledges a batch after its commit and the agent then deletes its copy:
    the commit must survive the machine's crash, not only the server's (WAL fsynced at
    every commit, SQLite's synchronous=FULL)."""
    store = Store(sqlite_url(tmp_path / "s.db"))
    try:
        with store.engine.connect() as c:
            assert c.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert c.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
    finally:
        store.close()


def test_a_server_restart_mid_stream_loses_and_duplicates_nothing(tmp_path, mosquitto):
    """Batches sent while the server is away wait in its persistent session (same client
    id, kept in its state directory) and arrive after the restart, not re-sent."""
    f = Fleet(tmp_path, mosquitto.url)

    def start() -> FleetService:
        return FleetService(ServeOptions(
            state_dir=f.state_dir, broker_url=f.broker_url, listen="127.0.0.1:0",
            prefix=f.prefix)).start()

    f.svc = start()
    client_id = f.svc.fleet.transport.options.client_id
    assert (f.state_dir / "client-id").read_text().strip() == client_id  # kept, not per PID
    agent, stop, t = start_agent(f, "steady-1", telemetry_ack_timeout_s=600.0)
    try:
        wait_for(lambda: agent.sender.acked_total >= 3, 20, what="telemetry confirmed")
        f.stop_server()
        away_from = agent.tqueue.issued
        wait_for(lambda: agent.tqueue.issued >= away_from + 5, 20,
                 what="batches cut while the server is away")
        f.svc = start()
        assert f.svc.fleet.transport.options.client_id == client_id
        issued = agent.tqueue.issued
        wait_for(lambda: agent.sender.acked_total >= issued, 30,
                 what="every batch confirmed after the restart")
        stop_agent(stop, t)
        assert f.svc.store.telemetry_seqs("steady-1") == list(range(agent.tqueue.issued))
        assert agent.sender.resent_total == 0  # they came from the session, not again
        assert f.svc.fleet.counters.duplicates == 0
    finally:
        stop.set()
        f.close()


def test_a_server_restarting_into_a_backlog_starts_and_stores_all_of_it(tmp_path, mosquitto):
    """After an outage the broker hands the server its session's backlog before the ingest
    probe: those messages prove the subscription delivers, so the server starts however
    long the backlog takes to store, and stores every batch once."""
    f = Fleet(tmp_path, mosquitto.url)

    def start(probe_s: float) -> FleetService:
        return FleetService(ServeOptions(
            state_dir=f.state_dir, broker_url=f.broker_url, listen="127.0.0.1:0",
            prefix=f.prefix, device_rate_per_s=0.0, probe_s=probe_s)).start()

    f.svc = start(5.0)
    f.stop_server()
    raw = RawDevice(f.broker_url, f.prefix, "backlog-1")
    try:
        n = 5000
        infos = [raw.publish(json.dumps(raw.batch(seq)).encode()) for seq in range(n)]
        for info in infos:
            info.wait_for_publish(30)
        f.svc = start(0.5)  # far less than storing 5,000 batches takes
        wait_for(lambda: len(f.svc.store.telemetry_seqs("backlog-1")) == n, 60,
                 what="the backlog stored")
        assert f.svc.store.telemetry_seqs("backlog-1") == list(range(n))
        assert f.svc.fleet.counters.duplicates == 0
        assert sum(f.svc.fleet.counters.dropped.values()) == 0
    finally:
        raw.close()
        f.close()


def test_a_server_stopped_while_its_store_refused_a_state_writes_it_after_a_restart(
        tmp_path, mosquitto):
    """``prunefleet serve`` with its store refusing writes: a device's reported state is
    acknowledged to the broker (no agent sends it again) and kept in the state directory;
    the server stops, the store comes back, the next server writes it."""
    f = Fleet(tmp_path, mosquitto.url)
    f.start_server()
    refuse_writes(f.svc.store, "disk I/O error", lambda statement, _: "devices" in statement)
    raw = RawDevice(f.broker_url, f.prefix, "kept-1")
    try:
        state = ReportedState(device_id="kept-1", online=True, agent_version="9.9",
                              manifest_version=12)
        raw.publish(state.encode(), Topics(f.prefix).reported("kept-1")).wait_for_publish(10)
        wait_for(lambda: f.svc.fleet.counters.unwritten == 1, 20, what="the state held")
        assert (f.state_dir / "ingest-held.json").exists()
        f.stop_server()
        f.start_server()
        wait_for(lambda: f.svc.store.device("kept-1") is not None, 20,
                 what="the held state written by the next server")
        d = f.svc.store.device("kept-1")
        assert (d.agent_version, d.manifest_version) == ("9.9", 12)
        wait_for(lambda: not (f.state_dir / "ingest-held.json").exists(), 10,
                 what="the held file gone once written")
    finally:
        raw.close()
        f.close()


def test_an_event_delivered_again_after_a_kill_before_the_acknowledgement_is_stored_once(
        tmp_path, mosquitto):
    """A server that committed a group and died before acknowledging it to the broker
    gets the group again from its persistent session. Events carry no sequence number:
    each delivery was a row (a device's one install counted twice). Now the second
    delivery is recognised, dropped and counted."""
    f = Fleet(tmp_path, mosquitto.url)

    def start() -> FleetService:  # its client id kept in its state directory: one session
        return FleetService(ServeOptions(
            state_dir=f.state_dir, broker_url=f.broker_url, listen="127.0.0.1:0",
            prefix=f.prefix)).start()

    f.svc = start()
    # It dies after the commit, before the PUBACKs.
    f.svc.fleet.transport.ack_and_publish = lambda acks, cursors: 0
    raw = RawDevice(f.broker_url, f.prefix, "twice-1")
    try:
        ev = Event(device_id="twice-1", ts=time.time(), kind=EventKind.INSTALLED, variant="v2")
        raw.publish(ev.encode(), Topics(f.prefix).events("twice-1")).wait_for_publish(10)
        wait_for(lambda: f.svc.fleet.counters.events == 1, 20, what="the event stored")
        f.stop_server()
        f.svc = start()
        wait_for(lambda: f.svc.fleet.counters.event_duplicates == 1, 20,
                 what="the unacknowledged event delivered again, and recognised")
        assert [(e.kind, e.variant) for e in f.svc.store.events("twice-1")] == [
            ("installed", "v2")]
        assert f.svc.fleet.counters.events == 0
    finally:
        raw.close()
        f.close()


def test_a_backlog_larger_than_the_inbound_queue_holds_the_broker_back_and_loses_nothing(
        mosquitto):
    """mosquitto hands a resumed persistent session its whole backlog at once, past the
    in-flight window. A ``manual_ack`` subscriber whose inbound queue is full stops reading
    (TCP holds the broker back) instead of dropping, and acknowledging, what the broker
    sent: every message arrives, none is dropped."""
    topic = f"flood-{uuid.uuid4().hex[:8]}/t"
    sub = MqttTransport(BrokerAddress.parse(mosquitto.url), TransportOptions(
        client_id=f"slow-{uuid.uuid4().hex[:8]}", subscriptions={topic: 1},
        inbound_queue_size=5, manual_ack=True, clean_session=False,
        max_inflight_messages=100))
    host, port = mosquitto.url.removeprefix("mqtt://").rsplit(":", 1)
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"fast-{uuid.uuid4().hex[:8]}")
    pub.max_inflight_messages_set(100)
    pub.connect(host, int(port))
    pub.loop_start()

    def messages(n: int, timeout_s: float = 10.0) -> list[bytes]:
        got: list[bytes] = []
        while len(got) < n:
            item = sub.inbound.get(timeout=timeout_s)
            if item.kind == "message":
                got.append(item.payload)
                sub.ack(item.mid, item.qos, item.connection)
        return got

    try:
        sub.start()
        assert sub.wait_connected(10)
        # The session and its subscription exist once a message comes through.
        wait_for(lambda: pub.publish(topic, b"warm", qos=1) and not sub.inbound.empty()
                 and any(i.kind == "message" for i in list(sub.inbound.queue)), 10,
                 what="the subscription")
        sub.stop()
        while not sub.inbound.empty():
            sub.inbound.get_nowait()
        n = 500
        infos = [pub.publish(topic, str(k).encode(), qos=1) for k in range(n)]
        for info in infos:
            info.wait_for_publish(30)
        sub.start()  # the broker sends the session's 500 at once, to a queue of 5
        got = [m for m in messages(n) if m != b"warm"]
        while len(got) < n:
            got += [m for m in messages(n - len(got)) if m != b"warm"]
        assert sorted(got, key=int) == [str(k).encode() for k in range(n)]
        assert sub.dropped_inbound == 0
        assert sub.inbound_waits > 0  # the queue was full: the network thread waited
    finally:
        sub.stop()
        pub.loop_stop()
        pub.disconnect()


def test_acknowledgement_after_commit_works_on_the_embedded_broker(tmp_path, embedded_broker):
    """The demo's broker (amqtt) takes the server's late acknowledgements too."""
    srv = make_server(tmp_path, embedded_broker.url)
    try:
        with run_agent(tmp_path, embedded_broker.url, device="amqtt-1",
                       telemetry_interval_s=0.2) as agent:
            wait_for(lambda: agent.sender.acked_total >= 5, 30,
                     what="telemetry confirmed through amqtt")
            assert srv.store.telemetry_seqs("amqtt-1")[:5] == [0, 1, 2, 3, 4]
    finally:
        srv.stop()


def test_production_acl_lets_a_device_read_only_its_own_cursor(
        production_mosquitto):  # noqa: F811 - the fixture imported above
    ca = production_mosquitto.workdir / "certs" / "ca.crt"
    base = "prunefleet/devices"
    with (
        connected(production_mosquitto, username="server", password="pw-server", ca_file=ca,
                  subscribe=[f"{base}/+/acked", f"{base}/+/telemetry"]) as (server, server_rx),
        connected(production_mosquitto, username="dev1", password="pw-dev1", ca_file=ca,
                  subscribe=["prunefleet/#"]) as (dev1, dev1_rx),
    ):
        for dev in ("dev2", "dev1"):  # in this order: dev2's would arrive first
            server.publish(f"{base}/{dev}/acked", f"cursor of {dev}".encode(),
                           qos=1).wait_for_publish(10)
            assert server_rx.get().topic == f"{base}/{dev}/acked"
        got = dev1_rx.get()
        assert (got.topic, got.payload) == (f"{base}/dev1/acked", b"cursor of dev1")
        # a device cannot write its cursor (it could make itself delete unsent telemetry)
        dev1.publish(f"{base}/dev1/acked", b"forged", qos=1).wait_for_publish(10)
        dev1.publish(f"{base}/dev1/telemetry", b"t", qos=1).wait_for_publish(10)
        got = server_rx.get()  # the forged cursor would have come first
        assert (got.topic, got.payload) == (f"{base}/dev1/telemetry", b"t")


# -- 4. manifest versions survive a new store --------------------------------------------------


def test_a_fresh_store_signs_above_what_the_agents_accepted(tmp_path, mosquitto):
    """A new store signs above the version the agent accepted from the one before, as
    the agent's version certificate proves it; with ``version_claims = "certified"``,
    devices with valid credentials claiming far more, more of them than honest ones, with
    no certificate or with the honest agent's (a proof of another version), move nothing
    and are counted."""
    f = Fleet(tmp_path, mosquitto.url)
    f.start_server()
    try:
        agent = f.start_agent("kept-1")
        f.wait_known(["kept-1"])
        spec = f.register_mlp("small", hidden=8)
        from prunefleet.shared.messages import VariantSpec

        variant = VariantSpec.model_validate(f.svc.store.variant(spec["sha256"]).spec)
        for _ in range(5):
            f.svc.fleet.deploy("kept-1", [variant])
        wait_for(lambda: agent.manifest is not None and agent.manifest.version == 5, 30,
                 what="version 5 accepted")
        f.stop_server()
        # A new store (a migration, a restored backup), the same keys and broker.
        f.svc = FleetService(ServeOptions(
            state_dir=tmp_path / "new-server", key_dir=f.state_dir / "keys",
            broker_url=f.broker_url, listen="127.0.0.1:0", prefix=f.prefix,
            version_claims="certified")).start()
        store = f.svc.store
        wait_for(lambda: (d := store.device("kept-1")) is not None
                 and d.manifest_version == 5, 20, what="the reported version known")
        proof = store.device("kept-1").version_proof
        assert proof, "the agent reports its version's certificate"
        topics = Topics(f.prefix)
        liars = {"liar-a": [], "liar-b": proof, "liar-c": proof}
        with connected(mosquitto) as (client, _):
            for name, p in liars.items():
                client.publish(topics.reported(name), json.dumps(
                    {"device_id": name, "online": True, "manifest_version": 3 * 10**6,
                     "version_proof": p}), qos=1, retain=True).wait_for_publish(10)
        wait_for(lambda: all((d := store.device(n)) is not None and d.manifest_version
                             for n in liars), 20, what="the liars' claims stored")
        m = f.svc.fleet.deploy("kept-1", [variant])
        assert m.version == 6
        wait_for(lambda: agent.manifest.version == 6, 30, what="the new store's manifest")
        assert agent.counters.rejected_manifests == 0
        assert metrics(f.svc)[("prunefleet_version_claims_ignored", ())] == len(liars)
    finally:
        f.close()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_lying_device_cannot_push_the_fleets_desired_states_out_of_reach(tmp_path, backend):
    """Reported versions lift the next manifest version (a new store signs above what
    agents accepted), but one device with valid credentials reporting a huge version must
    not make every later desired state one that agents refuse: past the largest version
    (it overflowed PostgreSQL's integer), or more than an agent's max_version_jump above
    its own (refused as a jump, by every agent, new ones too). Honest claims still count."""
    from prunefleet.agent.follower import Follow, ManifestFollower
    from prunefleet.shared import chunks
    from prunefleet.shared.messages import MAX_VERSION, Manifest, VariantSpec
    from prunefleet.shared.policy import PolicyConfig
    from prunefleet.shared.signing import SigningKey, TrustedKeys

    key = SigningKey.generate()
    p = chunks.plan(b"w" * 3000, 1024)
    spec = VariantSpec(name="a", sha256=p.sha256, size=p.size, chunk_bytes=1024,
                       chunk_sha256=list(p.chunk_sha256), input_shape=[1, 8], num_classes=10,
                       params=1, macs=1)

    def signed(target: str) -> object:
        v = store.next_manifest_version()
        store.save_manifest(v, target, "{}")
        now = time.time()
        return key.sign(Manifest(target=target, version=v, issued_at=now,
                                 expires_at=now + 3600, variants=[spec]))

    schema = pg_schema_url() if backend == "postgresql" else None
    store = Store(next(schema) if schema else sqlite_url(tmp_path / "s.db"))
    try:
        # A new store: three devices followed versions 5-7 from the one before it.
        for i, v in enumerate((5, 6, 7)):
            store.set_reported(ReportedState(device_id=f"honest-{i}", online=True,
                                             manifest_version=v))
        # It accepted version 7 from the earlier store.
        honest = ManifestFollower(TrustedKeys([key.public]), "honest-2", None,
                                  PolicyConfig(), floors={"device": 7})
        for claim in (MAX_VERSION, 2**30, 10**8 + 7, 3 * 10**6):
            store.set_reported(ReportedState(device_id="liar", online=True,
                                             manifest_version=claim))
            m = signed("honest-2")
            assert isinstance(honest.offer(m, "device", time.time()), Follow), claim
        fresh = ManifestFollower(TrustedKeys([key.public]), "new", None, PolicyConfig())
        assert isinstance(fresh.offer(signed("new"), "device", time.time()), Follow)
        assert store.next_manifest_version() < 20  # the liar moved nothing at all
        # A claim within the margin of the fleet's median counts (a device that got a
        # few more desired states than the others before the store was replaced).
        store.set_reported(ReportedState(device_id="liar", online=True,
                                         manifest_version=1000))
        assert store.next_manifest_version() == 1001
        store.save_manifest(MAX_VERSION, "honest-2", "{}")  # its own last: nothing above
        with pytest.raises(StoreError, match="versions are exhausted"):
            store.next_manifest_version()
    finally:
        store.close()
        if schema is not None:
            schema.close()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_certified_claim_counts_in_full_and_lying_ones_only_as_the_rule_allows(
        tmp_path, backend):
    """A claim counts in full when the server's version certificate proves it, whoever
    reports it: that version was signed. One without a valid proof (none, a certificate
    of another version, of another key, of a retired key, or forged) counts only as the
    median rule allows (agents of an earlier release send none), and not at all with
    ``unproven=False`` (``version_claims = "certified"``): there no majority of lying
    devices moves the counter. A genuine certificate of a low version, which any device
    may hold, never keeps honest unproven claims from counting."""
    from prunefleet.server.keys import KeyRing
    from prunefleet.shared.signing import SigningKey

    key, retired, stranger = (SigningKey.generate() for _ in range(3))
    ring = KeyRing(key, revoked=(retired.keyid,))
    certifies = ring.trusted().certifies
    schema = pg_schema_url() if backend == "postgresql" else None
    store = Store(next(schema) if schema else sqlite_url(tmp_path / "s.db"))

    def report(device: str, version: int, proof: list, online: bool = True) -> None:
        store.set_reported(ReportedState(device_id=device, online=online,
                                         manifest_version=version, version_proof=proof))
    try:
        # Agents of an earlier release followed version 100 from the store before (no
        # proofs); one device holds a genuine certificate of version 3.
        for i in range(20):
            report(f"old-{i}", 100, [])
        report("low", 3, [key.certify(3)])
        assert store.next_manifest_version(certifies) == 101
        assert store.next_manifest_version(certifies, unproven=False) == 4

        # Five liars against the rest, each kind of bad proof, all claiming 3·10⁶.
        claim = 3 * 10**6
        bad = {"none": [], "other-version": [key.certify(100)],
               "other-key": [stranger.certify(claim)], "retired-key": [retired.certify(claim)],
               "forged": [key.certify(claim).model_copy(update={"sig": key.certify(8).sig})]}
        for name, proof in bad.items():
            report(f"liar-{name}", claim, proof)
        assert store.next_manifest_version(certifies) == 101, "a minority moves nothing"
        for i in range(20):  # the earlier agents upgraded and followed 120, with proofs
            report(f"old-{i}", 120, [key.certify(120)])
        for i in range(30):  # now the liars are the majority
            report(f"liar-{i}", claim, [])
        assert store.next_manifest_version(certifies) == claim + 1, "the median rule"
        assert store.next_manifest_version(certifies, unproven=False) == 121
        assert store.version_claims_ignored == len(bad) + 30
        # A real certificate of a version the key signed counts, whoever reports it.
        report("liar-none", 150, [key.certify(150)])
        assert store.next_manifest_version(certifies, unproven=False) == 151
        # A Last Will names the version, with its proof, where the device went away.
        report("away", 200, [key.certify(200)], online=False)
        assert store.next_manifest_version(certifies, unproven=False) == 201
    finally:
        store.close()
        if schema is not None:
            schema.close()


def test_a_junk_proof_costs_one_check_however_many_versions_are_drawn(tmp_path):
    """Every deploy draws a version, under the controller's lock; devices reporting junk
    proofs above the store's versions must not cost a signature check each at every
    draw (a 1,000-device wave would hold the lock for minutes): each distinct proof is
    checked once per key set, and again only when the keys change."""
    from prunefleet.shared.signing import SigningKey, TrustedKeys

    key, other = SigningKey.generate(), SigningKey.generate()
    store = Store(sqlite_url(tmp_path / "s.db"))
    checks: list[int] = []

    def certifies(version, proof):
        checks.append(version)
        return TrustedKeys([key.public]).certifies(version, proof)
    try:
        for i in range(100):
            store.set_reported(ReportedState(
                device_id=f"liar-{i}", online=True, manifest_version=10**6 + i,
                version_proof=[other.certify(10**6 + i)]))
        for _ in range(5):
            v = store.next_manifest_version(certifies, unproven=False, keyset=("k1",))
            store.save_manifest(v, "d", "{}")
        assert v == 5 and len(checks) == 100
        store.next_manifest_version(certifies, unproven=False, keyset=("k2",))
        assert len(checks) == 200, "another key set asks again"
    finally:
        store.close()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_an_offline_devices_goodbye_or_will_still_lifts_the_next_version(tmp_path, backend):
    """A device away while its server moves to a restored store is known there only by
    its retained reported state: a goodbye or a Last Will (``online`` false). The version
    it names counts, or the store signs below what the device accepted and the device
    refuses everything when it comes back; an older will never lowers what is known."""
    schema = pg_schema_url() if backend == "postgresql" else None
    store = Store(next(schema) if schema else sqlite_url(tmp_path / "s.db"))
    try:
        for i in range(3):
            store.set_reported(ReportedState(device_id=f"d{i}", online=True,
                                             manifest_version=4))
        store.set_reported(ReportedState(device_id="away", online=False, manifest_version=9))
        assert store.next_manifest_version() == 10
        store.set_reported(ReportedState(device_id="away", online=False, manifest_version=7))
        d = store.device("away")
        assert d is not None and d.manifest_version == 9 and not d.online
    finally:
        store.close()
        if schema is not None:
            schema.close()


@contextmanager
def _core_counting_commits(tmp_path, backend: str) -> Iterator[tuple]:
    """(store, topics, core, commits) on a fresh store of ``backend``: ``commits`` gets
    one entry per commit. The revocations are read once here (cached), so a group's only
    commits are its writes."""
    schema = pg_schema_url() if backend == "postgresql" else None
    store = Store(next(schema) if schema else sqlite_url(tmp_path / "s.db"))
    topics = Topics("pf")
    core = IngestCore(store, topics, device_rate_per_s=0)
    core.revoked()
    commits: list[int] = []
    event.listen(store.engine, "commit", lambda conn: commits.append(1))
    try:
        yield store, topics, core, commits
    finally:
        store.close()
        if schema:
            schema.close()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_fleet_reconnecting_at_once_has_its_states_written_in_one_transaction(tmp_path,
                                                                                backend):
    """A fleet reconnecting after an outage reports hundreds of states in one group: they
    are written in one commit (one fsync on SQLite) where each took two or three, which
    held a restarted server's first groups, and with them every device's cursor, for a
    commit apiece. Each state, event and rollout report still lands as alone."""
    from prunefleet.shared.messages import Event, EventKind, RolloutPhase, RolloutReport

    with _core_counting_commits(tmp_path, backend) as (store, topics, core, commits):
        msgs = []
        for i in range(40):
            r = ReportedState(device_id=f"d{i}", online=True, agent_version=f"1.{i}",
                              manifest_version=3, group="field")
            msgs.append((topics.reported(r.device_id), r.encode()))
            ev = Event(device_id=f"d{i}", ts=5.0 + i, kind=EventKind.INSTALLED, variant="v")
            msgs.append((topics.events(ev.device_id), ev.encode()))
        # A rollout report about a manifest never offered to its device: ignored, counted.
        liar = ReportedState(device_id="d0", online=True, agent_version="1.0",
                             manifest_version=3, group="field",
                             rollout=RolloutReport(manifest_version=3,
                                                   phase=RolloutPhase.INSTALLED))
        msgs.append((topics.reported("d0"), liar.encode()))
        out = core.process(msgs)
        assert not out.store_failed
        assert len(commits) == 1
        assert [store.device(f"d{i}").agent_version for i in (0, 17, 39)] == [
            "1.0", "1.17", "1.39"]
        assert [e.ts for e in store.events("d17")] == [22.0]
        assert store.rollout_report("d0") is None
        assert store.group_requests() == {f"d{i}": "field" for i in range(40)}
        assert (core.counters.reported, core.counters.events,
                core.counters.unoffered_reports) == (41, 40, 1)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_groups_reported_states_cost_a_few_statements_whatever_their_number(tmp_path,
                                                                              backend):
    """Each state of a group read its rows one by one (its device, group request,
    membership, facts, profiles, rollout report: a query each, a row not there yet
    included) and flushed: 150 devices reconnecting to a restarted server held its commit
    thread about 0.4 s. Now a group's rows are read in a few queries, so 50 states cost
    about what 10 do; and every row comes out as writing each state alone makes it."""
    from prunefleet.shared.messages import (
        DeviceFacts,
        InstalledVariant,
        RolloutPhase,
        RolloutReport,
        VariantProfile,
    )

    sha_known, sha_other = "a" * 64, "b" * 64

    def state(i: int, v: int, **kw) -> ReportedState:
        profile = VariantProfile(sha256=sha_known, latency_ms_p50=1.0 + i, latency_ms_p95=2.0,
                                 cpu_ms=1.0, energy_mj=0.5, energy_source="rapl", runs=50,
                                 threads=1)
        other = profile.model_copy(update={"sha256": sha_other})
        return ReportedState(
            device_id=f"d{i}", online=True, agent_version=f"1.{v}", manifest_version=3,
            group="field" if i % 3 else None,
            installed=[InstalledVariant(name="small", sha256=sha_known, size=10),
                       InstalledVariant(name="odd", sha256=sha_other, size=10)],
            facts=DeviceFacts(arch="x86_64", cores=2, device_class=f"c{i % 2}"),
            profiles={"small": profile, "odd": other}, **kw)

    def fill(store: Store) -> None:
        store.add_variant("small", sha_known, "/nowhere", {}, {})
        store.save_manifest(3, "d4", "{}")  # offered to d4 alone
        for i in range(0, 60, 2):  # half the devices are known already
            store.set_reported(ReportedState(device_id=f"d{i}", online=False))
        store.set_device_groups("d5", ["field"])

    def group(ids: range) -> list[ReportedState]:
        report = RolloutReport(manifest_version=3, phase=RolloutPhase.INSTALLED)
        out = [state(i, 1, rollout=report if i in (4, 5) else None) for i in ids]
        return [*out, state(ids[0], 2)]  # one device twice: the later state wins

    urls = []
    schemas = []
    for _ in range(2):
        if backend == "postgresql":
            schemas.append(pg_schema_url())
            urls.append(next(schemas[-1]))
        else:
            urls.append(sqlite_url(tmp_path / f"s{len(urls)}.db"))
    batched, alone = Store(urls[0]), Store(urls[1])
    statements: list[str] = []
    event.listen(batched.engine, "before_cursor_execute",
                 lambda conn, cur, stmt, *a: statements.append(stmt))
    try:
        fill(batched)
        fill(alone)
        cost = []
        for ids in (range(0, 10), range(10, 60)):
            statements.clear()
            states = group(ids)
            assert batched.write_reports(states) == [s.rollout is None or s.device_id == "d4"
                                                     for s in states]
            cost.append(len(statements))
            for r in states:
                alone.set_reported(r)
                alone.set_measurements(r)
                if r.rollout is not None:
                    alone.record_rollout_report(r.device_id, r.rollout, r.ts or 1.0)
        assert cost[1] <= cost[0] + 4, cost  # not 5 or more per state

        def seen(store: Store, i: int) -> tuple:
            d = store.device(f"d{i}")
            report = store.rollout_report(f"d{i}")
            facts, profiles = store.device_measurements(f"d{i}")
            return (d.agent_version, d.online, d.installed, facts["device_class"],
                    {n: p["latency_ms_p50"] for n, p in profiles.items()},
                    None if report is None else report.phase)

        for i in range(60):
            assert seen(batched, i) == seen(alone, i), i
        assert seen(batched, 0)[0] == seen(batched, 10)[0] == "1.2"
        assert seen(batched, 4)[5] == "installed" and seen(batched, 5)[5] is None
        assert batched.group_requests() == alone.group_requests() == {
            f"d{i}": "field" for i in range(60) if i % 3 and i != 5}
    finally:
        batched.close()
        alone.close()
        for g in schemas:
            g.close()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_devices_later_state_undoing_its_earlier_one_in_a_group_costs_one_transaction(
        tmp_path, backend):
    """One device's states in one group: the first adds a profile and asks for a group,
    the second drops both. With nothing flushed between states the session refused to
    delete what the first had added, the group's transaction failed and every state was
    written again alone (204 commits for 101 states instead of one; found by a review):
    any device could do that to every group it landed in."""
    from prunefleet.shared.messages import InstalledVariant, VariantProfile

    sha = "a" * 64
    profile = VariantProfile(sha256=sha, latency_ms_p50=1.0, latency_ms_p95=2.0, cpu_ms=1.0,
                             energy_mj=0.5, energy_source="rapl", runs=50, threads=1)
    with _core_counting_commits(tmp_path, backend) as (store, topics, core, commits):
        store.add_variant("v", sha, "/nowhere", {}, {})
        commits.clear()
        first = ReportedState(device_id="d1", online=True, group="field",
                              installed=[InstalledVariant(name="v", sha256=sha, size=1)],
                              profiles={"v": profile})
        second = ReportedState(device_id="d1", online=True)
        others = [ReportedState(device_id=f"o{i}", online=True) for i in range(20)]
        out = core.process([(topics.reported(r.device_id), r.encode())
                            for r in (first, *others, second)])
        assert not out.store_failed and len(commits) == 1
        assert store.device_measurements("d1")[1] == {} and store.group_requests() == {}
        assert core.counters.reported == 22


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_nul_in_a_devices_text_is_refused_at_the_door_not_by_the_groups_write(
        tmp_path, backend):
    """PostgreSQL takes no NUL character in text. A device's event or state with one was
    refused by the store only, failing the whole group's one-transaction write, and every
    state of the group was then written again alone: any device could do that to every
    group it landed in (found by a review). Now it is dropped as invalid when it arrives;
    a backslash followed by "u0000", which is only text, is kept."""
    from prunefleet.shared.messages import Event, EventKind

    with _core_counting_commits(tmp_path, backend) as (store, topics, core, commits):
        fine = [ReportedState(device_id=f"o{i}", online=True) for i in range(20)]
        nul_state = ReportedState(device_id="liar", online=True, last_error="bad\x00byte")
        nul_event = Event(device_id="liar", ts=5.0, kind=EventKind.ERROR, detail="\x00")
        text = Event(device_id="honest", ts=6.0, kind=EventKind.ERROR,
                     detail="a backslash and u0000: \\u0000")
        msgs = [(topics.reported(r.device_id), r.encode()) for r in fine]
        msgs += [(topics.reported("liar"), nul_state.encode()),
                 (topics.events("liar"), nul_event.encode()),
                 (topics.events("honest"), text.encode())]
        out = core.process(msgs)
        assert not out.store_failed and len(commits) == 1
        assert core.counters.dropped["invalid"] == 2
        assert store.device("liar") is None and store.events("liar") == []
        assert [e.detail for e in store.events("honest")] == [text.detail]
        assert core.counters.reported == 20 and core.counters.events == 1


def test_one_state_the_store_refuses_costs_only_itself_in_a_group(tmp_path):
    """The store fails on one device's state (an error that may pass): the group's other
    states and events are written, and only that one is held to be tried again."""
    store = Store(sqlite_url(tmp_path / "s.db"))
    topics = Topics("pf")
    core = IngestCore(store, topics, device_rate_per_s=0)

    refuse_writes(store, "disk I/O error",  # on this row alone
                  lambda _, parameters: "poison" in repr(parameters))
    try:
        states = [ReportedState(device_id=d, online=True, agent_version="2.0")
                  for d in ("a", "poison", "b")]
        out = core.process([(topics.reported(r.device_id), r.encode()) for r in states])
        assert out.store_failed
        assert store.device("a").agent_version == store.device("b").agent_version == "2.0"
        assert store.device("poison") is None
        assert core.counters.unwritten == 1 and core.counters.reported == 2
    finally:
        store.close()


def test_a_reported_state_or_event_the_store_refused_is_written_once_it_takes_writes(tmp_path):
    """A reported state or an event is acknowledged to the broker with its group, and no
    agent sends it again (it reports a state when it changes): one the store refuses (a
    store briefly down) is held and written with the next group, the latest state per
    device, instead of dropped. Held ones are a gauge; only past the bound are they
    dropped, and counted."""
    from prunefleet.server.ingestwork import IngestCore
    from prunefleet.shared.messages import Event, EventKind

    store = Store(sqlite_url(tmp_path / "s.db"))
    topics = Topics("pf")
    core = IngestCore(store, topics, device_rate_per_s=0)
    down = {"on": True}

    refuse_writes(store, when=lambda *_: down["on"])
    try:
        r1 = ReportedState(device_id="d1", online=True, agent_version="1.0")
        r2 = ReportedState(device_id="d1", online=True, agent_version="1.1")
        ev = Event(device_id="d1", ts=5.0, kind=EventKind.INSTALLED, variant="small",
                   detail="ok")
        out = core.process([(topics.reported("d1"), r1.encode()),
                            (topics.events("d1"), ev.encode()),
                            (topics.reported("d1"), r2.encode())])
        assert out.store_failed and store.device("d1") is None
        assert core.counters.unwritten == 2  # the latest state, and the event
        assert core.counters.dropped["store_error"] == 0
        down["on"] = False
        core.process([])  # the next group, or the commit thread when the fleet is quiet
        d = store.device("d1")
        assert d is not None and d.agent_version == "1.1"
        assert [e.kind for e in store.events("d1")] == ["installed"]
        assert core.counters.unwritten == 0 and core.counters.reported == 1
    finally:
        store.close()


def test_states_the_store_refused_outlive_the_server_that_held_them(tmp_path):
    """The store refuses a group's reported state and event; the server acknowledges the
    group and dies before the store is back. They were held in its memory only, so they
    were lost (no agent sends them again). Now they are kept in the server's state
    directory before the acknowledgement, and the next server writes them."""
    from prunefleet.shared.messages import Event, EventKind

    held = tmp_path / "ingest-held.json"
    store = Store(sqlite_url(tmp_path / "s.db"))
    topics = Topics("pf")
    core = IngestCore(store, topics, device_rate_per_s=0, held_path=held)

    refuse_writes(store)
    r = ReportedState(device_id="d1", online=True, agent_version="3.1", manifest_version=4)
    ev = Event(device_id="d1", ts=5.0, kind=EventKind.INSTALLED, variant="small")
    out = core.process([(topics.reported("d1"), r.encode()), (topics.events("d1"), ev.encode())])
    assert out.store_failed and held.exists()
    store.close()  # the server dies here, its store still down

    store = Store(sqlite_url(tmp_path / "s.db"))  # the store is back; a new server starts
    try:
        again = IngestCore(store, topics, device_rate_per_s=0, held_path=held)
        assert again.counters.unwritten == 2
        again.process([])  # its first group (or the commit thread when the fleet is quiet)
        d = store.device("d1")
        assert d is not None and (d.agent_version, d.manifest_version) == ("3.1", 4)
        assert [e.kind for e in store.events("d1")] == ["installed"]
        assert again.counters.unwritten == 0 and not held.exists()
    finally:
        store.close()


def test_a_value_the_database_refuses_for_good_is_dropped_not_held_for_ever(tmp_path):
    """PostgreSQL takes no NUL character in text, which JSON and the message models
    allow: one device's event carrying one was held as if the store were down, tried
    again with every later group for ever (and across restarts, from the held file), and
    failed every group's one-transaction write of states with it, so every group paused
    the whole fleet's ingest. Now it is dropped and counted as invalid, and the others are
    written. (Such a message is refused on arrival now; one can still come from a held
    file an earlier version kept.)"""
    from prunefleet.shared.messages import Event, EventKind

    schema = pg_schema_url()
    store = Store(next(schema))
    topics = Topics("pf")
    evil = Event(device_id="evil", ts=5.0, kind=EventKind.INSTALLED, variant="v",
                 detail="a\u0000b")
    (tmp_path / "held.json").write_text(json.dumps([{
        "topic": topics.events("evil"), "event": True,
        "message": evil.model_dump(mode="json")}]))
    core = IngestCore(store, topics, device_rate_per_s=0, held_path=tmp_path / "held.json")
    try:
        assert core.counters.unwritten == 1
        honest = ReportedState(device_id="honest", online=True, agent_version="1.0")
        out = core.process([(topics.reported("honest"), honest.encode())])
        assert not out.store_failed
        assert store.device("honest").agent_version == "1.0"
        assert core.counters.unwritten == 0 and core.counters.dropped["invalid"] == 1
        assert not (tmp_path / "held.json").exists() and store.events("evil") == []
        later = ReportedState(device_id="honest", online=True, agent_version="1.1")
        out = core.process([(topics.reported("honest"), later.encode())])
        assert not out.store_failed and store.device("honest").agent_version == "1.1"
    finally:
        store.close()
        schema.close()


def test_held_files_of_a_run_with_other_ingest_processes_are_read_not_stranded(tmp_path):
    """A run with 4 ingest workers held states in ingest-held-0..3.json; the next run has
    1 worker or none, and read only its own file: the rest stayed unread (and a later run
    with 4 replayed them, stale). Every held file is folded into the one this run reads."""
    from prunefleet.server.ingestwork import gather_held

    store = Store(sqlite_url(tmp_path / "s.db"))
    topics = Topics("pf")
    for i in range(4):
        writer = IngestCore(store, topics, held_path=tmp_path / f"ingest-held-{i}.json")
        r = ReportedState(device_id=f"d{i}", online=True, agent_version=f"4.{i}")
        writer._hold(topics.reported(r.device_id), r, StoreError("down"))
        writer._save_held()
    try:
        gather_held(tmp_path, "ingest-held.json")
        assert [p.name for p in tmp_path.glob("ingest-held*")] == ["ingest-held.json"]
        core = IngestCore(store, topics, held_path=tmp_path / "ingest-held.json")
        core.process([])
        assert [store.device(f"d{i}").agent_version for i in range(4)] == [
            "4.0", "4.1", "4.2", "4.3"]
        assert not (tmp_path / "ingest-held.json").exists()
    finally:
        store.close()


def test_what_is_held_is_bounded_in_bytes_too(tmp_path, monkeypatch):
    """During an outage one device's events, each as large as the wire allows, filled the
    held set to its 10,000 entries: a file of 84 MB written again after every group. The
    held set is bounded in bytes as well; past it the oldest go, counted as store_error."""
    from prunefleet.server import ingestwork
    from prunefleet.shared.messages import Event, EventKind

    monkeypatch.setattr(ingestwork, "MAX_HELD_BYTES", 100_000)
    store = Store(sqlite_url(tmp_path / "s.db"))
    held = tmp_path / "ingest-held.json"
    topics = Topics("pf")
    core = IngestCore(store, topics, held_path=held, device_rate_per_s=0)

    refuse_writes(store)  # the store is down
    try:
        big = Event(device_id="evil", ts=5.0, kind=EventKind.INSTALLED,
                    detail="\U0001F600" * 2048)
        core.process([(topics.events("evil"), big.encode())] * 100)
        kept = len(json.loads(held.read_bytes()))
        assert held.stat().st_size <= 100_000 and 0 < kept < 100
        assert core.counters.unwritten == kept
        assert core.counters.dropped["store_error"] == 100 - kept
    finally:
        store.close()


def test_a_held_file_that_cannot_be_read_is_set_aside_and_stops_no_start(tmp_path):
    store = Store(sqlite_url(tmp_path / "s.db"))
    held = tmp_path / "ingest-held.json"
    held.write_text("[" * 100_000)  # deeper than the JSON reader recurses
    try:
        core = IngestCore(store, Topics("pf"), held_path=held)
        assert core.counters.unwritten == 0
        assert not held.exists() and (tmp_path / "ingest-held.json.bad").exists()
    finally:
        store.close()


def test_replicas_writing_the_same_devices_states_in_opposite_orders_do_not_deadlock():
    """Two replicas behind a shared subscription get the same devices' states in
    different orders. Written in arrival order, their transactions locked device rows in
    opposite orders and PostgreSQL broke the deadlock by failing one (after its 1 s
    deadlock_timeout), whose replica then wrote one transaction per state. Rows are now
    taken in device order."""
    schema = pg_schema_url()
    url = next(schema)
    a, b = Store(url), Store(url)
    try:
        devices = [f"d{i:03d}" for i in range(200)]
        for d in devices:
            a.set_reported(ReportedState(device_id=d, online=True))
        failures: list[str] = []
        for rnd in range(2):
            barrier = threading.Barrier(2)

            def write(store: Store, order: list[str], rnd: int = rnd,
                      barrier: threading.Barrier = barrier) -> None:
                barrier.wait()
                try:
                    store.write_reports([ReportedState(device_id=d, online=True,
                                                       agent_version=str(rnd)) for d in order])
                except StoreError as e:
                    failures.append(str(e))

            threads = [threading.Thread(target=write, args=(a, devices)),
                       threading.Thread(target=write, args=(b, devices[::-1]))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        assert failures == []
        assert {a.device(d).agent_version for d in devices} == {"1"}
    finally:
        a.close()
        b.close()
        schema.close()


def test_a_batch_no_server_takes_does_not_hold_its_devices_cursor(tmp_path):
    """One batch of an incarnation fails validation (a bound an older agent does not
    check, a damaged queue file): it is dropped and counted as invalid, and the cursor
    passes it, where it held there for as long as the agent kept the batch (hours) and
    with it the agent's whole window."""
    from prunefleet.server.ingestwork import IngestCore

    store = Store(sqlite_url(tmp_path / "s.db"))
    topics = Topics("pf")
    core = IngestCore(store, topics, device_rate_per_s=0)

    def batch(seq: int) -> bytes:
        return TelemetryBatch(device_id="d1", incarnation="inc1", seq=seq,
                              interval_start=seq, interval_end=seq + 1,
                              unconfirmed_from=0).encode()

    bad = json.loads(batch(2))
    bad["interval_end"] = 2.0**40  # past the bound
    msgs = [(topics.telemetry("d1"), batch(s)) for s in (0, 1)]
    msgs += [(topics.telemetry("d1"), json.dumps(bad).encode())]
    msgs += [(topics.telemetry("d1"), batch(s)) for s in (3, 4, 5)]
    try:
        out = core.process(msgs)
        assert out.cursors == [("d1", "inc1", 5)]
        assert core.counters.invalid == 1 and core.counters.telemetry == 5
        assert store.telemetry_seqs("d1") == [0, 1, 3, 4, 5]
        # A batch that does not even say its number cannot be passed: the cursor waits.
        core2 = IngestCore(store, topics, device_rate_per_s=0)
        garbled = [(topics.telemetry("d2"), b"{not json")]
        assert core2.process(garbled).cursors == []
    finally:
        store.close()


def test_a_store_failing_after_the_write_is_not_counted_as_lost(tmp_path):
    """The group's transaction committed, then reading its cursors failed: the batches
    are counted as stored (they are), not as dropped errors, and no cursor goes out (the
    agents send them again and the copies are recognised)."""
    from prunefleet.server.ingestwork import IngestCore

    store = Store(sqlite_url(tmp_path / "s.db"))
    topics = Topics("pf")
    core = IngestCore(store, topics, device_rate_per_s=0)

    def failing(*a, **kw):
        raise StoreError("connection lost")

    store.stored_seqs_many = failing  # type: ignore[method-assign]
    try:
        out = core.process([(topics.telemetry("d1"), TelemetryBatch(
            device_id="d1", incarnation="i", seq=s, interval_start=s,
            interval_end=s + 1).encode()) for s in range(4)])
        assert out.store_failed and out.cursors == []
        assert core.counters.telemetry == 4 and store.telemetry_seqs("d1") == [0, 1, 2, 3]
        assert sum(core.counters.dropped.values()) == 0 and core.counters.invalid == 0
    finally:
        store.close()


# -- the pure parts -----------------------------------------------------------------------------


def test_token_bucket_allows_the_burst_then_the_rate():
    lim = DeviceRateLimiter(rate_per_s=2.0, burst=3.0)
    assert [lim.allow("d", 0.0) for _ in range(4)] == [True, True, True, False]
    assert lim.allow("other", 0.0)  # each device its own bucket
    assert not lim.allow("d", 0.4) and lim.allow("d", 0.5)  # one token per 0.5 s
    assert DeviceRateLimiter(0.0, 1.0).allow("d", 0.0)  # 0: no limit
    small = DeviceRateLimiter(1.0, 1.0, max_devices=2)
    for d in ("a", "b", "c"):
        small.allow(d, 0.0)
    assert len(small) == 2  # bounded, whatever ids arrive


def test_cursor_passes_gaps_below_the_agents_floor_and_waits_on_others():
    c = StoredCursors(max_above=3)
    for seq in (0, 1, 3):
        c.note("d", "i", seq, floor=0)
    assert c.through("d", "i") == 1 and c.has_gap("d", "i")  # 2 is missing
    c.note("d", "i", 2, floor=0)
    assert c.through("d", "i") == 3
    c.note("d", "i", 7, floor=6)  # the agent gave up 4 and 5 (its queue was full)
    assert c.through("d", "i") == 5 and c.has_gap("d", "i")  # but still holds 6
    c.note("d", "i", 6, floor=6)
    assert c.through("d", "i") == 7 and not c.has_gap("d", "i")
    assert c.through("d", "other") == -1  # incarnations are apart
    for seq in range(20, 30):
        c.note("d", "i", seq, floor=8)
    assert c.through("d", "i") == 7  # 8 missing; the set past the gap stays bounded
    c.seed("d", "i", [8, 9, 20, 21, 22])
    assert c.through("d", "i") == 9


@pytest.mark.parametrize("payload", [
    '{"a":' * 15_000 + "1" + "}" * 15_000,  # 30 KB of nesting
    "[" * 20_000 + "]" * 20_000,
    '{"seq": ' + "9" * 5000 + "}",  # an integer of 5000 digits
    b"\xff\xfe\x00",
    "",
])
def test_every_decoder_refuses_hostile_documents_with_a_protocol_error(payload):
    from prunefleet.shared import messages
    from prunefleet.shared.errors import ProtocolError

    models = [m for m in vars(messages).values() if isinstance(m, type)
              and issubclass(m, messages.WireModel) and m is not messages.WireModel]
    assert messages.TelemetryBatch in models and messages.TelemetryAck in models
    for model in models:
        with pytest.raises(ProtocolError):
            messages.decode(model, payload)


def test_metrics_expose_lag_and_drops(fleet):
    agent = fleet.start_agent("metric-1")
    wait_for(lambda: agent.sender.acked_total >= 1, 20, what="telemetry confirmed")
    m = metrics(fleet.svc)
    assert m[("prunefleet_telemetry_ingest_lag_seconds_count", ())] >= 1
    reasons = {dict(labels)["reason"] for name, labels in m
               if name == "prunefleet_ingest_dropped_total"}
    assert reasons == set(DROP_REASONS) == {"invalid", "wrong_device", "rate_limited",
                                            "revoked", "store_error", "inbound_full", "error"}
