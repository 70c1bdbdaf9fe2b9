"""Read paths of a large fleet: the device list (search, filters, pages) and history.

    .venv/bin/python bench/history.py [--quick] [--json PATH] [--db URL] [--devices N]

Fills a fresh store (SQLite in a temporary directory, or ``--db``, which should name an
empty database or schema) with N synthetic devices (default 10,000; a quarter offline, in
four groups, each with a rollout report) and telemetry: every device one batch every two
hours for a day, and one device one batch a minute for a day. Then times, as the median of
several runs, the queries behind the API:

* ``GET /v1/devices?limit=50`` pages (first, middle, last), searches and filters: one
  statement each (``server/history.py`` ``device_page``);
* the list as it was read before (every device, then its groups, then one rollout-report
  query per device), for comparison in the same run;
* ``GET /v1/fleet/series?since=24h`` and ``GET /v1/devices/ID/telemetry?since=24h``.

Rows are inserted in bulk (not through ingest): this measures reads, not ingest.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from sqlalchemy import insert

from prunefleet.server.history import device_history, device_page, fleet_series, parse_range
from prunefleet.server.store import (
    Device,
    DeviceGroup,
    DeviceRolloutReport,
    Store,
    Telemetry,
    VariantUsage,
    sqlite_url,
)

GROUPS = ("north", "south", "east", "west")


def fill(store: Store, n: int, now: float, batches_per_device: int) -> dict[str, int]:
    devices = [f"dev-{i:05d}" for i in range(n)]
    rows_dev = [{"device_id": d, "online": i % 4 != 3, "last_seen": now - i % 600,
                 "agent_version": "0.1.0", "manifest_version": 7,
                 "active_variant": ("small", "mid", "big")[i % 3], "installed": [],
                 "counters": {}} for i, d in enumerate(devices)]
    rows_grp = [{"device_id": d, "group_name": GROUPS[i % 4]} for i, d in enumerate(devices)]
    rows_rep = [{"device_id": d, "manifest_version": 7, "phase": "active", "progress": 1.0,
                 "ts": now - 3600} for d in devices]
    tel, usage = [], []
    span = 86400 / batches_per_device
    plan = [(d, j * span, span) for d in devices for j in range(batches_per_device)]
    plan += [("dev-00000", 60.0 * j, 60.0) for j in range(1440)]  # one device, every minute
    for tid, (d, offset, length) in enumerate(plan, start=1):
        end = now - 86400 + offset + length
        tel.append({"id": tid, "device_id": d, "seq": tid, "interval_start": end - length,
                    "interval_end": end, "active_variant": "small", "battery_percent": 50.0,
                    "charging": False, "cpu_percent": 30.0, "mem_percent": 40.0,
                    "temperature_c": 45.0, "energy_j": 3.0, "batches_dropped": 0,
                    "switches_dropped": 0, "received_at": end})
        usage.append({"telemetry_id": tid, "device_id": d, "variant": "small",
                      "requests": 40, "errors": 0, "labeled": 0, "correct": 0,
                      "latency_ms_p50": 2.0, "latency_ms_p95": 4.0, "latency_ms_p99": 6.0})
    with store.engine.begin() as conn:
        for table, rows in ((Device, rows_dev), (DeviceGroup, rows_grp),
                            (DeviceRolloutReport, rows_rep), (Telemetry, tel),
                            (VariantUsage, usage)):
            for i in range(0, len(rows), 20000):
                conn.execute(insert(table), rows[i:i + 20000])
    return {"devices": n, "telemetry_batches": len(tel)}


def timed(fn, runs: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(runs):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000, out


def old_list(store: Store) -> int:
    """The device list as GET /v1/devices read it before paging (every device, N+1)."""
    groups = store.device_groups()
    out = [(d, groups.get(d.device_id, []), store.rollout_report(d.device_id))
           for d in store.devices()]
    return len(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer runs, fewer batches")
    ap.add_argument("--json", type=Path, help="write the figures here")
    ap.add_argument("--db", help="SQLAlchemy URL of an empty database (default: SQLite)")
    ap.add_argument("--devices", type=int, default=10_000)
    args = ap.parse_args(argv)
    runs = 3 if args.quick else 7
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(args.db or sqlite_url(Path(tmp) / "bench.db"))
        now = time.time()
        t = time.perf_counter()
        sizes = fill(store, args.devices, now, 4 if args.quick else 12)
        fill_s = time.perf_counter() - t
        last = (args.devices - 1) // 50 * 50
        cases = {
            "page 1 (limit 50)": lambda: device_page(store, limit=50),
            "page in the middle": lambda: device_page(store, limit=50, offset=last // 2),
            "last page": lambda: device_page(store, limit=50, offset=last),
            "search 'dev-012' (id or variant)": lambda: device_page(store, q="dev-012",
                                                                     limit=50),
            "group=west, offline": lambda: device_page(store, group="west", online=False,
                                                        limit=50),
            "search + group + online": lambda: device_page(store, q="7", group="east",
                                                           online=True, limit=50),
            "every device, one query (no limit)": lambda: device_page(store),
            "every device, before (N+1 queries)": lambda: old_list(store),
            "fleet series, 24 h (600 s buckets)": lambda: fleet_series(
                store, parse_range("24h", None, None)),
            "device telemetry, 24 h of 1-min batches": lambda: device_history(
                store, "dev-00000", parse_range("24h", None, None)),
            "device telemetry, 24 h at 5 min": lambda: device_history(
                store, "dev-00000", parse_range("24h", None, "5m")),
        }
        results = {}
        for name, fn in cases.items():
            ms, out = timed(fn, 1 if "before" in name and args.quick else runs)
            results[name] = round(ms, 2)
            size = (out[0] if isinstance(out, tuple) else
                    len(out.buckets) if hasattr(out, "buckets") else out)
            print(f"{name:42s} {ms:9.2f} ms   ({size})")
        store.close()
    doc = {"db": store.engine.dialect.name, **sizes, "fill_s": round(fill_s, 1),
           "runs": runs, "median_ms": results,
           "machine": f"{platform.machine()} {platform.python_version()}"}
    print(json.dumps(doc, indent=2))
    if args.json:
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
