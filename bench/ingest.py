"""Ingest benchmark: how fast the server stores telemetry, and that none is lost.

    python bench/ingest.py [--quick] [--json PATH] [--devices N] [--interval S]
                           [--in-flight N] [--offer-s S] [--drain-s S] [--db URL]
    python bench/ingest.py --fleet 10000 --rate 1000[,2000,...] [--seconds 60]
                           [--drain-s S] [--db URL] [--json PATH]

``--fleet N`` is a separate mode (``bench/ingest_fleet.py``): a real ``prunefleet serve``
behind N device connections from a light load generator, offering ``--rate`` batches/s;
it measures the lag target "p99 < 1 s at 1,000 batches/s from 10,000 devices". What
follows is the default mode.

Everything runs on one local mosquitto (started here with ``deploy/mosquitto/test.conf`` on
a free loopback port), in separate processes so that no two share a GIL:

1. **Baseline** (``bare_rate``): a bare paho subscriber (QoS 1, paho's automatic
   acknowledgement, nothing stored) counts telemetry-sized messages from two publisher
   processes that send as fast as their in-flight window allows. Its receive rate is what
   one MQTT connection takes from this broker on this machine. It is measured before the
   server's runs and again after them, and ``bare_rate`` is the mean of the two
   (``bare_rates``): one measurement, a burst of 1-3 s, moved by up to a third between
   runs on one machine (4,400-7,400 msg/s on the 2-core VM of docs/benchmarks.md), and
   the ratio with it.
2. **Server**: ``FleetService`` (what ``prunefleet serve`` runs: SQLite store, or the
   PostgreSQL database ``--db`` names, manual acknowledgement after commit, "stored
   through" cursors) in its own process, and
   ``--devices`` simulated devices (``prunefleet.server.simulator``, ``download=False``,
   the agent's own telemetry code: queue, in-flight window, re-sends) in another, each
   cutting a batch every ``--interval`` seconds for ``--offer-s`` seconds. The server is
   started once (keys, its persistent session), stopped, and started again ``--late-s``
   seconds after the devices: meanwhile their batches pile up (unconfirmed on the devices,
   the first ones in the server's session at the broker), so the restarted server meets
   more than it can store at once, as after an outage. Then the devices stop cutting and
   drain (up to ``--drain-s``) until the server has confirmed every batch. Each device
   keeps at most ``--in-flight`` batches (default 10, the agent's) sent and unconfirmed,
   so the fleet drains its backlog at most devices x in-flight batches per round trip
   (device -> broker -> server commit -> cursor -> device): with 150 devices that, not
   the server, can be the limit; a larger ``--in-flight`` stands for a larger fleet.
   ``--sim-processes N`` spreads the devices over N processes (one Python process tops
   out near 0.8 of a core, bound by its interpreter lock); on 2 cores it did not raise
   the figure (docs/benchmarks.md).

Figures (``--json`` keys as issue #9 names them):

* ``bare_rate``: messages/s the bare subscriber received, the mean of its two runs
  (``bare_rates``: before, after);
* ``server_rate``: batches/s the server committed in its best 5 s (the rows'
  ``received_at``) before the backlog cleared, which falls while it works through the
  backlog: its rate when it has more to store than it can. A backlog cleared in under 5 s
  gives its own span instead (a window past it would count the devices' pace);
* ``offered``: batches the devices generated (cut), ``offered_rate`` per second of offering;
* ``stored``: distinct batches in the store; ``lost``: batches generated that never
  reached the store (per device, its sequence numbers minus those stored);
  ``duplicates``: rows beyond one per (device, incarnation, seq);
* ``p99_lag_s``: 99th percentile of commit time minus the end of the batch's interval,
  over every stored batch (it includes the backlog the late start builds on purpose);
  ``p99_lag_end_s`` the same for batches cut in the last 10 s of offering, and
  ``timeline`` commits per second and median lag per 5 s;
* ``session`` (with ``--session``): the server alone, no simulated devices in the loop:
  the bare run's publishers leave a backlog of distinct batches in its persistent session
  while it is away, then it starts and stores them all; ``rate`` is batches/s from its
  first commit to its last, ``ratio`` that over ``bare_rate``;
* ``devices``; and ``resent`` (batches devices sent again, unconfirmed after their
  timeout), ``dedupe_dropped`` (copies the server recognised), CPU seconds per process.

Targets (issue #9): lost == 0 and duplicates == 0 at any offered rate; server_rate >=
0.7 x bare_rate on SQLite.

``--db postgresql://host/db``: the server stores in a fresh schema of that database
(``pf_bench_<random>``, the connection's ``search_path``), which the benchmark drops at the
end; nothing else in the database is touched.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# bench/ is the script's directory, so it is on sys.path: share distribution.py's broker.
from distribution import start_mosquitto  # isort: skip


# -- broker ---------------------------------------------------------------------------------
def _cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def _sample_payload(i: int) -> bytes:
    from prunefleet.shared.messages import SwitchEvent, TelemetryBatch, VariantStats

    now = time.time()
    return TelemetryBatch(
        device_id=f"bare-{i % 100:04d}", seq=i, incarnation="0123456789abcdef",
        unconfirmed_from=i, interval_start=now - 0.2, interval_end=now,
        variants={v: VariantStats(requests=12, labeled=12, correct=11, latency_ms_p50=1.2,
                                  latency_ms_p95=2.5, latency_ms_p99=3.1)
                  for v in ("dense", "struct50")},
        switches=[SwitchEvent(ts=now - 0.1, from_variant="dense", to_variant="struct50",
                              reason="battery_low")],
        active_variant="struct50", battery_percent=55.0, charging=False, cpu_percent=20.0,
        mem_percent=40.0, temperature_c=45.0, energy_j=0.8,
    ).encode()


# -- 1. baseline: a bare subscriber ---------------------------------------------------------
def _bare_publisher(url: str, topic_prefix: str, n: int, first: int, go: Any) -> None:
    import paho.mqtt.client as mqtt

    host, port = url.removeprefix("mqtt://").rsplit(":", 1)
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bare-pub-{first}")
    c.max_inflight_messages_set(100)
    c.connect(host, int(port))
    c.loop_start()
    payloads = [_sample_payload(first + i) for i in range(200)]
    go.wait()
    infos = [c.publish(f"{topic_prefix}/bare-{(first + i) % 100:04d}/telemetry",
                       payloads[i % 200], qos=1) for i in range(n)]
    for info in infos:
        info.wait_for_publish(120)
    c.loop_stop()
    c.disconnect()


def bare_run(url: str, per_publisher: int, publishers: int = 2) -> dict:
    import paho.mqtt.client as mqtt

    prefix = f"bench-bare-{uuid.uuid4().hex[:6]}/devices"
    host, port = url.removeprefix("mqtt://").rsplit(":", 1)
    times: list[float] = []
    subscribed = threading.Event()

    def on_message(_c, _u, _m) -> None:
        times.append(time.monotonic())

    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bare-sub-{os.getpid()}")
    sub.on_message = on_message
    sub.on_subscribe = lambda *a: subscribed.set()
    sub.connect(host, int(port))
    sub.loop_start()
    sub.subscribe(f"{prefix}/+/telemetry", qos=1)
    subscribed.wait(10)
    ctx = mp.get_context("spawn")
    go = ctx.Event()
    procs = [ctx.Process(target=_bare_publisher,
                         args=(url, prefix, per_publisher, k * per_publisher, go))
             for k in range(publishers)]
    for p in procs:
        p.start()
    time.sleep(2.0)  # publishers connected and their payloads built
    cpu0 = _cpu_s()
    go.set()
    for p in procs:
        p.join(300)
    sent = per_publisher * publishers
    deadline = time.monotonic() + 10
    while len(times) < sent and time.monotonic() < deadline:
        n = len(times)
        time.sleep(0.5)
        if len(times) == n:  # nothing more is coming: the broker dropped the rest
            break
    sub.loop_stop()
    sub.disconnect()
    got = len(times)
    rate = (got - 1) / (times[-1] - times[0]) if got > 1 else 0.0
    return {"sent": sent, "received": got, "rate": rate, "subscriber_cpu_s": _cpu_s() - cpu0}


def _bare_mean(before: dict, after: dict) -> dict:
    """The baseline measured before and after the server's runs, as one: the mean rate,
    the messages and CPU of both."""
    return {"sent": before["sent"] + after["sent"],
            "received": before["received"] + after["received"],
            "rate": (before["rate"] + after["rate"]) / 2,
            "subscriber_cpu_s": before["subscriber_cpu_s"] + after["subscriber_cpu_s"]}


# -- 2. the server and simulated devices ------------------------------------------------------
def server_main(url: str, state_dir: str, prefix: str, db_url: str | None,
                conn: Any, procs: int = 0) -> None:
    import logging

    logging.basicConfig(level=logging.ERROR)
    from prunefleet.server.serve import FleetService, ServeOptions
    from prunefleet.shared.gctune import tune_for_throughput

    tune_for_throughput()  # as `prunefleet serve` does in its process
    svc = FleetService(ServeOptions(state_dir=Path(state_dir), broker_url=url,
                                    listen="127.0.0.1:0", prefix=prefix, db_url=db_url,
                                    device_rate_per_s=0.0, ingest_processes=procs)).start()
    conn.send("ready")
    cpu0 = _cpu_s()
    conn.recv()  # "stop"
    assert svc.fleet is not None
    c = svc.fleet.counters
    counters = {"stored": c.telemetry, "duplicates_dropped": c.duplicates,
                "transactions": c.transactions, "acks_published": c.acks_published,
                "dropped": dict(c.dropped)}
    svc.stop()  # ingest worker processes, if any, end here: their CPU time is counted
    t = os.times()
    counters["cpu_s"] = t.user + t.system + t.children_user + t.children_system - cpu0
    conn.send(counters)


def sim_main(url: str, keys: str, prefix: str, devices: int, interval_s: float,
             offer_s: float, drain_s: float, in_flight: int, conn: Any,
             id_prefix: str = "bench", workers: int = 0) -> None:
    import logging

    logging.basicConfig(level=logging.ERROR)
    from prunefleet.server.simulator import SimOptions, Simulator
    from prunefleet.shared.gctune import tune_for_throughput

    tune_for_throughput()  # as `prunefleet simulate` does in its process
    sim = Simulator(SimOptions(
        broker_url=url, devices=devices, prefix=prefix, id_prefix=id_prefix, keys=Path(keys),
        telemetry_interval_s=interval_s, download=False, drain_s=drain_s,
        status_interval_s=3600, telemetry_max_in_flight=in_flight, workers=workers))
    cpu0 = _cpu_s()
    sim.start()
    t0 = time.time()
    conn.send(("offering", t0))
    time.sleep(offer_s)
    t1 = time.time()
    conn.send(("draining", t1))
    summary = sim.stop()
    conn.send(("done", {
        "t_offer": [t0, t1], "t_drained": time.time(),
        "issued": {d.id: d.agent.tqueue.issued for d in sim.devices},
        "incarnation": {d.id: d.agent.tqueue.incarnation for d in sim.devices},
        "resent": sum(d.agent.sender.resent_total for d in sim.devices),
        "still_queued": summary.batches_queued,
        "dropped_on_devices": sum(d.agent.tqueue.dropped_total for d in sim.devices),
        "cpu_s": _cpu_s() - cpu0,
    }))


def _merge_sims(parts: list[dict]) -> dict:
    """One result for the devices of every simulator process."""
    return {
        "t_offer": [min(p["t_offer"][0] for p in parts), max(p["t_offer"][1] for p in parts)],
        "t_drained": max(p["t_drained"] for p in parts),
        "issued": {k: v for p in parts for k, v in p["issued"].items()},
        "incarnation": {k: v for p in parts for k, v in p["incarnation"].items()},
        **{k: sum(p[k] for p in parts)
           for k in ("resent", "still_queued", "dropped_on_devices", "cpu_s")},
    }


def _start_server(ctx: Any, url: str, state: Path, prefix: str,
                  db_url: str | None, procs: int = 0) -> tuple[Any, Any]:
    conn, child = ctx.Pipe()
    proc = ctx.Process(target=server_main,
                       args=(url, str(state), prefix, db_url, child, procs))
    proc.start()
    if not conn.poll(60):
        raise SystemExit("the server did not start")
    conn.recv()
    return proc, conn


def stored_rows(db_url: str | None, state: Path) -> list[Any]:
    """Every stored batch's (device_id, incarnation, seq, interval_end, received_at)."""
    from prunefleet.server.serve import db_url_for
    from prunefleet.server.store import Store

    store = Store(db_url_for(db_url, state))
    try:
        with store.engine.connect() as c:
            return list(c.exec_driver_sql(
                "SELECT device_id, incarnation, seq, interval_end, received_at FROM telemetry"
            ).all())
    finally:
        store.close()


def _stop_server(proc: Any, conn: Any) -> dict:
    conn.send("stop")
    counters = conn.recv() if conn.poll(60) else {}
    proc.join(60)
    return counters


def server_run(url: str, work: Path, devices: int, interval_s: float, offer_s: float,
               late_s: float, drain_s: float, db_url: str | None = None,
               procs: int = 0, in_flight: int = 10, sim_procs: int = 1,
               sim_workers: int = 0) -> dict:

    prefix = f"bench{uuid.uuid4().hex[:6]}"
    state = work / "server"
    ctx = mp.get_context("spawn")
    # A first start makes the keys and the server's persistent session; the server then
    # stays away for late_s while devices offer, so a backlog builds (on the devices, and
    # in the session at the broker) that the restarted server drains at its own pace.
    _stop_server(*_start_server(ctx, url, state, prefix, db_url, procs))
    # The devices in ``sim_procs`` processes, each its own share of them: one Python
    # process is bound by its interpreter lock near 0.8 of a core, and past that the
    # server would wait on its load generator rather than the other way round.
    shares = [devices // sim_procs + (1 if j < devices % sim_procs else 0)
              for j in range(sim_procs)]
    sims = []
    for j, n in enumerate(s for s in shares if s):
        sim_conn, sim_child = ctx.Pipe()
        sim = ctx.Process(target=sim_main, args=(url, str(state / "keys"), prefix, n,
                                                 interval_s, offer_s, drain_s, in_flight,
                                                 sim_child, f"bench{j}", sim_workers))
        sim.start()
        sims.append((sim, sim_conn))
    for _, sim_conn in sims:
        if not sim_conn.poll(120):
            raise SystemExit("the simulator did not start")
    print(f"  devices {[c.recv()[0] for _, c in sims]}; the server starts in {late_s:g} s",
          flush=True)
    time.sleep(late_s)
    t_server = time.time()
    srv, srv_conn = _start_server(ctx, url, state, prefix, db_url, procs)
    print("  server started", flush=True)
    parts: list[dict] = []
    for sim, sim_conn in sims:
        while True:
            if not sim_conn.poll(offer_s + drain_s + 120):
                raise SystemExit("the simulator did not finish")
            what, value = sim_conn.recv()
            if what == "done":
                parts.append(value)
                break
            print(f"  devices {what}", flush=True)
        sim.join(60)
    print("  devices done", flush=True)
    result = _merge_sims(parts)
    server = _stop_server(srv, srv_conn)

    rows = stored_rows(db_url, state)
    keys = {(d, i, s) for d, i, s, _, _ in rows}
    per_device: dict[str, set[int]] = {}
    for d, inc, seq, _, _ in rows:
        if inc == result["incarnation"].get(d):
            per_device.setdefault(d, set()).add(seq)
    lost = sum(len(set(range(n)) - per_device.get(d, set()))
               for d, n in result["issued"].items())
    lags = sorted(r - e for _, _, _, e, r in rows)
    committed = sorted(r for *_, r in rows)
    t0, t1 = result["t_offer"]
    cleared = _backlog_cleared(rows, t_server)
    steady = sorted(r - e for *_, e, r in rows if t1 - 10.0 <= e <= t1)
    offered = sum(result["issued"].values())
    return {
        "server_rate": _backlog_rate(committed, t_server, cleared),
        "offered": offered,
        "offered_rate": offered / max(1e-9, t1 - t0),
        "stored": len(keys),
        "lost": lost,
        "duplicates": len(rows) - len(keys),
        "p99_lag_s": lags[min(len(lags) - 1, int(0.99 * len(lags)))] if lags else None,
        "p50_lag_s": lags[len(lags) // 2] if lags else None,
        "backlog_cleared_s": cleared,
        "p99_lag_end_s": steady[min(len(steady) - 1, int(0.99 * len(steady)))]
        if steady else None,
        "timeline": _timeline(rows, t0, t_server),
        "drain_s": result["t_drained"] - t1,
        "resent": result["resent"],
        "still_queued_on_devices": result["still_queued"],
        "dropped_on_devices": result["dropped_on_devices"],
        "dedupe_dropped": server.get("duplicates_dropped"),
        "transactions": server.get("transactions"),
        "server_dropped": server.get("dropped"),
        "server_cpu_s": server.get("cpu_s"),
        "devices_cpu_s": result["cpu_s"],
    }


# -- 3. the server alone: draining its session ---------------------------------------------
def _session_publisher(url: str, topic_prefix: str, n: int, first: int, go: Any) -> None:
    """Like ``_bare_publisher``, but every batch is a new one (its own seq): the server
    stores each, none is a duplicate."""
    import paho.mqtt.client as mqtt

    host, port = url.removeprefix("mqtt://").rsplit(":", 1)
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"session-pub-{first}")
    c.max_inflight_messages_set(100)
    c.connect(host, int(port))
    c.loop_start()
    payloads = [(f"{topic_prefix}/bare-{(first + i) % 100:04d}/telemetry",
                 _sample_payload(first + i)) for i in range(n)]
    go.wait()
    infos = [c.publish(topic, payload, qos=1) for topic, payload in payloads]
    for info in infos:
        info.wait_for_publish(120)
    c.loop_stop()
    c.disconnect()


def session_run(url: str, work: Path, per_publisher: int, db_url: str | None,
                publishers: int = 2, procs: int = 0) -> dict:
    """The server's own storing rate, without simulated devices in the loop: the bare
    run's publishers fill the server's persistent session while it is away (at most the
    broker's ``max_queued_messages``), then the server starts and stores it all."""
    from prunefleet.server.serve import db_url_for
    from prunefleet.server.store import Store

    prefix = f"benchs{uuid.uuid4().hex[:6]}"
    state = work / "session-server"
    ctx = mp.get_context("spawn")
    _stop_server(*_start_server(ctx, url, state, prefix, db_url, procs))  # its session
    go = ctx.Event()
    pubs = [ctx.Process(target=_session_publisher,
                        args=(url, f"{prefix}/devices", per_publisher, k * per_publisher, go))
            for k in range(publishers)]
    for p in pubs:
        p.start()
    time.sleep(2.0)
    go.set()
    for p in pubs:
        p.join(300)
    sent = per_publisher * publishers
    srv, srv_conn = _start_server(ctx, url, state, prefix, db_url, procs)
    store = Store(db_url_for(db_url, state))
    try:
        deadline = time.monotonic() + 120
        n = 0
        while time.monotonic() < deadline:
            with store.engine.connect() as c:
                n = c.exec_driver_sql("SELECT count(*) FROM telemetry").scalar() or 0
            if n >= sent:
                break
            time.sleep(0.5)
        server = _stop_server(srv, srv_conn)
        with store.engine.connect() as c:
            committed = sorted(r for (r,) in c.exec_driver_sql(
                "SELECT received_at FROM telemetry").all())
    finally:
        store.close()
    span = committed[-1] - committed[0] if len(committed) > 1 else 0.0
    return {"sent": sent, "stored": len(committed),
            "rate": (len(committed) - 1) / span if span > 0 else 0.0,
            "server_cpu_s": server.get("cpu_s"), "transactions": server.get("transactions"),
            "server_dropped": server.get("dropped")}


WINDOW_S = 5.0
SESSION_QUEUE = 50_000  # the bench broker's max_queued_messages


def _peak_rate(times: list[float], window_s: float) -> float:
    """The most commits in any ``window_s`` seconds, per second: the server's rate while
    it had a backlog (sorted ``times``)."""
    best, lo = 0, 0
    for hi, t in enumerate(times):
        while t - times[lo] > window_s:
            lo += 1
        best = max(best, hi - lo + 1)
    return best / window_s


def _backlog_rate(committed: list[float], t_server: float, cleared: float | None) -> float:
    """The server's rate while it had a backlog: its best ``WINDOW_S`` seconds before the
    backlog cleared, or, when it cleared sooner than that, its commits from the first to
    the one that caught up over that span (a window reaching past the backlog would count
    the devices' own pace as the server's)."""
    if cleared is None:
        return _peak_rate(committed, WINDOW_S)
    during = [r for r in committed if r <= t_server + cleared]
    span = during[-1] - during[0] if len(during) > 1 else 0.0
    if span >= WINDOW_S:
        return _peak_rate(during, WINDOW_S)
    return (len(during) - 1) / span if span > 0 else _peak_rate(committed, WINDOW_S)


def _timeline(rows: list, t0: float, t_server: float) -> list[dict]:
    """Per 5 s after the devices started: batches committed per second, median lag."""
    out = []
    by_window: dict[int, list[float]] = {}
    for *_, e, r in rows:
        by_window.setdefault(int((r - t0) // WINDOW_S), []).append(r - e)
    for w in sorted(by_window):
        lags = sorted(by_window[w])
        out.append({"t_s": w * WINDOW_S, "committed_per_s": round(len(lags) / WINDOW_S, 1),
                    "p50_lag_s": round(lags[len(lags) // 2], 2)})
    return out


def _backlog_cleared(rows: list, t_server: float) -> float | None:
    """Seconds after the server's start when it first committed a batch within 1 s of its
    interval's end (it had caught up with the backlog)."""
    fresh = [r for *_, e, r in rows if r >= t_server and r - e < 1.0]
    return min(fresh) - t_server if fresh else None


@contextmanager
def bench_schema(db_url: str | None) -> Iterator[str | None]:
    """``db_url`` (PostgreSQL) with a fresh schema as its search path, dropped afterwards;
    None (SQLite in the server's state directory) as it is."""
    if db_url is None:
        yield None
        return
    import psycopg

    from prunefleet.server.serve import db_url_for

    plain = db_url_for(db_url, Path(".")).replace("postgresql+psycopg://", "postgresql://")
    schema = f"pf_bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(plain, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
        try:
            sep = "&" if "?" in db_url else "?"
            yield f"{db_url}{sep}options=-csearch_path%3D{schema}"
        finally:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a reduced run, under two minutes")
    ap.add_argument("--json", type=Path, metavar="PATH", help="write the figures here")
    ap.add_argument("--devices", type=int)
    ap.add_argument("--interval", type=float, help="seconds between a device's batches")
    ap.add_argument("--in-flight", type=int, default=10, metavar="N",
                    help="each device's telemetry window, the agent's "
                         "telemetry_max_in_flight (%(default)s): the fleet has devices x N "
                         "batches in flight, which bounds how fast it drains a backlog")
    ap.add_argument("--sim-processes", type=int, default=1, metavar="N",
                    help="the simulated devices' processes, each with its share of them "
                         "(%(default)s)")
    ap.add_argument("--sim-workers", type=int, default=0, metavar="N",
                    help="worker threads stepping the devices of each simulator process "
                         "(`simulate --workers`; default 0: the simulator's own choice)")
    ap.add_argument("--offer-s", type=float, help="seconds devices offer telemetry")
    ap.add_argument("--late-s", type=float,
                    help="the server starts this long after the devices (a backlog)")
    ap.add_argument("--drain-s", type=float, default=90.0,
                    help="at most this long for the devices' backlog (%(default)s)")
    ap.add_argument("--session", action="store_true",
                    help="also measure the server alone, storing a backlog the bare run's "
                         "publishers left in its session (no simulated devices)")
    ap.add_argument("--db", metavar="URL",
                    help="store in this PostgreSQL database (a fresh schema, dropped at "
                         "the end) instead of SQLite in the server's state directory")
    ap.add_argument("--ingest-processes", type=int, default=0, metavar="N",
                    help="the server's ingest worker processes (`serve --ingest-processes`; "
                         "default 0: its ingest thread)")
    ap.add_argument("--fleet", type=int, metavar="N",
                    help="the fleet mode (bench/ingest_fleet.py): N device connections "
                         "from a light load generator against a `prunefleet serve`")
    ap.add_argument("--rate", default="1000", metavar="R[,R...]",
                    help="--fleet: batches/s the fleet offers; several: one run each "
                         "(%(default)s)")
    ap.add_argument("--seconds", type=float, default=60.0,
                    help="--fleet: seconds of offering per rate (%(default)s)")
    ap.add_argument("--warm", action="store_true",
                    help="--fleet: every device has one batch stored before the measured "
                         "offering (a server that already knows the fleet)")
    args = ap.parse_args()
    if args.fleet:
        import ingest_fleet

        return ingest_fleet.main(args.fleet, [float(r) for r in args.rate.split(",")],
                                 args.seconds, min(args.drain_s, 60.0), args.db, args.json,
                                 args.warm, args.ingest_processes)
    devices = args.devices or (150 if args.quick else 300)
    interval = args.interval or (0.1 if args.quick else 0.2)
    offer_s = args.offer_s or (45.0 if args.quick else 90.0)
    late_s = args.late_s if args.late_s is not None else (10.0 if args.quick else 20.0)
    per_pub = 5000 if args.quick else 15000

    work = Path(tempfile.mkdtemp(prefix="pf-bench-ingest-"))
    # A session backlog of up to 40,000 batches for the server alone (``--session``): the
    # test config's 10,000 would make mosquitto drop the rest. The other runs never queue
    # near either limit (the devices keep 10 batches each in flight).
    broker, url = start_mosquitto(work, max_queued_messages=SESSION_QUEUE)
    try:
        print(f"mosquitto at {url}; baseline: bare paho subscriber, 2 publishers x {per_pub}",
              flush=True)
        bare_before = bare_run(url, per_pub)
        print(f"  received {bare_before['received']} of {bare_before['sent']}: "
              f"{bare_before['rate']:.0f} msg/s", flush=True)
        print(f"server ({'PostgreSQL' if args.db else 'SQLite'}) + {devices} simulated "
              f"devices, a batch every {interval:g} s each, {args.in_flight} in flight each, "
              f"{offer_s:g} s offering (the server away for the first {late_s:g} s), up to "
              f"{args.drain_s:g} s draining",
              flush=True)
        with bench_schema(args.db) as db_url:
            run = server_run(url, work, devices, interval, offer_s, late_s, args.drain_s,
                             db_url, procs=args.ingest_processes, in_flight=args.in_flight,
                             sim_procs=args.sim_processes, sim_workers=args.sim_workers)
        session = None
        if args.session:
            per_session = 10_000 if args.quick else 20_000  # under SESSION_QUEUE
            print(f"server alone: a backlog of 2 x {per_session} batches in its session",
                  flush=True)
            with bench_schema(args.db) as db_url:
                session = session_run(url, work, per_session, db_url,
                                      procs=args.ingest_processes)
            print(f"  stored {session['stored']} of {session['sent']}: "
                  f"{session['rate']:.0f} batches/s", flush=True)
        print("baseline again: bare paho subscriber", flush=True)
        bare_after = bare_run(url, per_pub)
        print(f"  received {bare_after['received']} of {bare_after['sent']}: "
              f"{bare_after['rate']:.0f} msg/s", flush=True)
        bare = _bare_mean(bare_before, bare_after)
    finally:
        broker.terminate()
        broker.wait(10)
        shutil.rmtree(work, ignore_errors=True)

    figures = {
        "bare_rate": round(bare["rate"], 1),
        "bare_rates": [round(bare_before["rate"], 1), round(bare_after["rate"], 1)],
        "server_rate": round(run["server_rate"], 1),
        "offered": run["offered"],
        "stored": run["stored"],
        "lost": run["lost"],
        "duplicates": run["duplicates"],
        "p99_lag_s": None if run["p99_lag_s"] is None else round(run["p99_lag_s"], 3),
        "devices": devices,
        "in_flight": args.in_flight,
        "sim_workers": args.sim_workers,
        "sim_processes": args.sim_processes,
        "p50_lag_s": None if run["p50_lag_s"] is None else round(run["p50_lag_s"], 3),
        "server_late_s": late_s,
        "backlog_cleared_s": None if run["backlog_cleared_s"] is None
        else round(run["backlog_cleared_s"], 1),
        "p99_lag_end_s": None if run["p99_lag_end_s"] is None
        else round(run["p99_lag_end_s"], 3),
        "timeline": run["timeline"],
        "ratio": round(run["server_rate"] / bare["rate"], 3) if bare["rate"] else None,
        "offered_rate": round(run["offered_rate"], 1),
        "interval_s": interval,
        "offer_s": offer_s,
        "drain_s": round(run["drain_s"], 1),
        "resent": run["resent"],
        "dedupe_dropped": run["dedupe_dropped"],
        "transactions": run["transactions"],
        "still_queued_on_devices": run["still_queued_on_devices"],
        "dropped_on_devices": run["dropped_on_devices"],
        "server_dropped": run["server_dropped"],
        "bare_received": bare["received"],
        "bare_sent": bare["sent"],
        "cpu_s": {"server": run["server_cpu_s"], "devices": run["devices_cpu_s"],
                  "bare_subscriber": round(bare["subscriber_cpu_s"], 2)},
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, "
                   f"Python {platform.python_version()}",
        "quick": args.quick,
        "store": "postgresql" if args.db else "sqlite",
        "ingest_processes": args.ingest_processes,
    }
    if session is not None:
        figures["session"] = {
            "rate": round(session["rate"], 1), "sent": session["sent"],
            "stored": session["stored"],
            "ratio": round(session["rate"] / bare["rate"], 3) if bare["rate"] else None,
            "transactions": session["transactions"], "cpu_s": session["server_cpu_s"],
            "server_dropped": session["server_dropped"]}
    rows = [
        ("bare subscriber (msg/s)", f"{figures['bare_rate']:.0f} (before "
                                    f"{bare_before['rate']:.0f}, after "
                                    f"{bare_after['rate']:.0f})"),
        ("server stored (batches/s)", f"{figures['server_rate']:.0f}"),
        ("server / bare", f"{figures['ratio']}"),
        ("offered (batches, per s)", f"{run['offered']} ({figures['offered_rate']:.0f}/s)"),
        ("stored", str(run["stored"])),
        ("lost", str(run["lost"])),
        ("duplicates", str(run["duplicates"])),
        ("p99 / p50 lag (s)", f"{figures['p99_lag_s']} / {figures['p50_lag_s']}"),
        ("backlog cleared after (s)", str(figures["backlog_cleared_s"])),
        ("p99 lag, last 10 s of offering (s)", str(figures["p99_lag_end_s"])),
        ("drain (s)", str(figures["drain_s"])),
        ("re-sent by devices", str(run["resent"])),
    ]
    print(f"{'t (s)':>6} {'stored/s':>9} {'p50 lag s':>10}   (the server started at "
          f"{late_s:g} s)")
    for w in run["timeline"]:
        print(f"{w['t_s']:>6.0f} {w['committed_per_s']:>9.0f} {w['p50_lag_s']:>10.2f}")
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k.ljust(width)}  {v}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
