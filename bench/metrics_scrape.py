"""Metrics benchmark: the time of a ``/metrics`` scrape as the stored telemetry grows.

    python bench/metrics_scrape.py [--quick] [--json PATH] [--sizes N,N,...] [--db PATH]

Writes telemetry straight into a SQLite store (the real schema, ``Store``; rows by bulk
``INSERT`` in device-major order: 10,000 devices, one variant row per batch, a switch every
tenth batch), growing it to each size in turn, and at each size times:

* ``old_s``: the scrape's store queries as they were, aggregating every stored row
  (per-variant sums over ``telemetry_variants``, switches per reason, the telemetry
  totals) and every row of the last 300 s (latency, accuracy) — the baseline;
* ``rebuild_s``: the first scrape of a new ``FleetCollector`` (a server start): it sums
  every stored row once;
* ``scrape_s``: a later scrape after 1,000 more batches were stored (what a Prometheus
  scrape costs in steady state), the median of 5; ``ratio``: ``old_s / scrape_s``.

Both scrapes also read what grows with the fleet, not with the stored batches (the 10,000
devices by state and their reported counters, the last ``window_s`` of telemetry).

``--json`` keys: ``sizes`` (a list of ``{"batches", "old_s", "rebuild_s", "scrape_s",
"ratio"}``) and ``machine``. ``--quick``: 1 M batches only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEVICES = 10_000


def fill(db: Path, have: int, want: int, t_end: float) -> None:
    """Add batches ``have`` … ``want - 1`` (batch k: device k % DEVICES, seq k // DEVICES,
    intervals of 10 s; the last batch of ``want`` ends at ``t_end``, so the metrics window,
    the last 300 s, holds 30 batches of each device, as a 10,000-device fleet sends)."""
    con = sqlite3.connect(db)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA synchronous=OFF")
    next_id = (con.execute("SELECT max(id) FROM telemetry").fetchone()[0] or 0) + 1
    u_id = (con.execute("SELECT max(id) FROM telemetry_variants").fetchone()[0] or 0) + 1
    t0 = t_end - 10.0 * ((want - 1) // DEVICES)
    step = 200_000
    for lo in range(have, want, step):
        hi = min(want, lo + step)
        rows, usage, switches = [], [], []
        for k in range(lo, hi):
            tid = next_id + k - have
            dev, seq = f"sim-{k % DEVICES:05d}", k // DEVICES
            end = t0 + 10.0 * seq
            rows.append((tid, dev, "inc", seq, end - 10, end, "small", 80.0, 0, 20.0, 50.0,
                         40.0, 1.5, 0, 0, end + 0.2))
            usage.append((u_id + k - have, tid, dev, "small", 40, 0, 20, 19, 2.0, 3.0, 4.0))
            if k % 10 == 0:
                switches.append((tid, dev, end - 1, "big", "small", "battery_low"))
        with con:
            con.executemany(
                "INSERT INTO telemetry (id, device_id, incarnation, seq, interval_start, "
                "interval_end, active_variant, battery_percent, charging, cpu_percent, "
                "mem_percent, temperature_c, energy_j, batches_dropped, switches_dropped, "
                "received_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)", rows)
            con.executemany(
                "INSERT INTO telemetry_variants (id, telemetry_id, device_id, variant, "
                "requests, errors, labeled, correct, latency_ms_p50, latency_ms_p95, "
                "latency_ms_p99) VALUES (?,?,?,?,?,?,?,?,?,?,?)", usage)
            con.executemany(
                "INSERT INTO switches (telemetry_id, device_id, ts, from_variant, to_variant, "
                "reason) VALUES (?,?,?,?,?,?)", switches)
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()


def old_scrape(store, since: float) -> None:
    """The aggregation the scrape did before the totals were kept."""
    from sqlalchemy import case, func, select

    from prunefleet.server.metrics import QUANTILES
    from prunefleet.server.store import Switch, Telemetry, VariantUsage

    with store.session() as s:
        s.execute(select(VariantUsage.variant, func.sum(VariantUsage.requests),
                         func.sum(VariantUsage.errors), func.sum(VariantUsage.labeled),
                         func.sum(VariantUsage.correct)).group_by(VariantUsage.variant)).all()
        s.execute(select(Switch.reason, func.count(Switch.id)).group_by(Switch.reason)).all()
        s.execute(select(func.sum(Telemetry.energy_j), func.sum(Telemetry.batches_dropped),
                         func.sum(Telemetry.switches_dropped), func.count(Telemetry.id))).one()
        weighted = [func.sum(col * VariantUsage.requests) for _, col in QUANTILES]
        weights = [func.sum(case((col.is_not(None), VariantUsage.requests), else_=0))
                   for _, col in QUANTILES]
        s.execute(select(VariantUsage.variant, func.sum(VariantUsage.labeled),
                         func.sum(VariantUsage.correct), *weighted, *weights)
                  .join(Telemetry, Telemetry.id == VariantUsage.telemetry_id)
                  .where(Telemetry.interval_end >= since, VariantUsage.requests > 0)
                  .group_by(VariantUsage.variant)).all()


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 M batches only")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--sizes", default="1000000,3000000,10000000")
    ap.add_argument("--db", type=Path, help="the SQLite file (default: a temporary one)")
    args = ap.parse_args()
    sizes = [1_000_000] if args.quick else [int(x) for x in args.sizes.split(",")]
    sys.path.insert(0, str(REPO))
    from prunefleet.server.fleet import IngestCounters
    from prunefleet.server.metrics import FleetCollector, make_registry, render
    from prunefleet.server.store import Device, Store, sqlite_url
    from prunefleet.shared.messages import TelemetryBatch, VariantStats

    out = []
    with tempfile.TemporaryDirectory(prefix="pf-bench-metrics-") as tmp:
        db = args.db or Path(tmp) / "fleet.db"
        url = sqlite_url(db)
        with Store(url).session() as s:  # the schema, and the fleet's devices
            s.add_all(Device(device_id=f"sim-{i:05d}", installed=[], last_seen=1.7e9)
                      for i in range(DEVICES))
        have, extra = 0, 0
        print(f"{'BATCHES':>10}  {'OLD':>9}  {'REBUILD':>9}  {'SCRAPE':>9}  {'RATIO':>7}",
              flush=True)
        for n in sizes:
            t = time.perf_counter()
            t_end = time.time() - 5  # the time the fleet stopped sending
            fill(db, have, n, t_end)
            have = n
            fill_s = time.perf_counter() - t
            store = Store(url)
            old = min(timed(lambda s=store: old_scrape(s, time.time() - 300))
                      for _ in range(2))
            registry = make_registry(FleetCollector(store, IngestCounters))
            rebuild = timed(lambda r=registry: render(r))
            scrapes = []
            for _ in range(5):
                store.add_telemetry_batches([TelemetryBatch(
                    device_id=f"sim-{i:05d}", incarnation="late", seq=extra,
                    interval_start=time.time() - 10, interval_end=time.time(),
                    variants={"small": VariantStats(requests=1)}) for i in range(1000)])
                extra += 1
                scrapes.append(timed(lambda r=registry: render(r)))
            scrape = statistics.median(scrapes)
            row = {"batches": n, "old_s": round(old, 4), "rebuild_s": round(rebuild, 4),
                   "scrape_s": round(scrape, 4), "ratio": round(old / scrape, 1),
                   "fill_s": round(fill_s, 1)}
            out.append(row)
            print(f"{n:>10,}  {old:>8.3f}s  {rebuild:>8.3f}s  {scrape:>8.4f}s  "
                  f"{row['ratio']:>6.0f}x", flush=True)
    result = {"machine": f"{platform.machine()} {os.cpu_count()} CPUs, Python "
                         f"{platform.python_version()}, SQLite {sqlite3.sqlite_version}",
              "sizes": out}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
