"""What a telemetry transaction costs the store, and what each index of the telemetry
tables adds to it.

    .venv/bin/python bench/telemetry_write.py [--quick] [--json PATH] [--devices N]
                                              [--group N] [--groups N] [--db URL]

In this process, no broker: ``Store.add_telemetry_batches`` (what ingest's commit thread
calls) writes ``--groups`` groups of ``--group`` batches, round-robin over ``--devices``
devices, each batch with two variants' rows and one switch (the sample batch of
``bench/ingest.py``), each dated 1 ms after the one before. The same run writes the same
batches to fresh stores of several schemas, alternated group by group so that the
machine's drift falls on all:

* ``current``: the store as this version makes it (the baseline);
* ``+variants_device``: with ``ix_telemetry_variants_device_id``, which stores before the
  sixth session of 2026-12-01 had;
* ``-switches_device``, ``-telemetry_device_end``: without that index of the current
  schema (what it would save; the reads that use it would then scan);
* ``pragma checkpoint_1000`` (SQLite): the WAL copied back every 1,000 pages, SQLite's
  default, where the store sets 10,000 (``SQLITE_WAL_CHECKPOINT_PAGES``).

Figures: milliseconds of wall time per group (the median and the mean over the last
quarter of the groups, when each device has rows on leaves of its own in every index
keyed by device; a checkpoint lands on one group in several, which the mean counts) and
per batch, and each schema's ratio of means to ``current``. SQLite in a temporary directory
(WAL, ``synchronous=FULL``, as the server runs it), or a fresh schema of the PostgreSQL
database ``--db`` names (dropped at the end).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack, closing
from pathlib import Path
from typing import Any

from ingest import _sample_payload, bench_schema  # bench/ is on sys.path (the script's)
from sqlalchemy import event

from prunefleet.server.store import Store, sqlite_url
from prunefleet.shared.messages import TelemetryBatch

T0 = time.time() - 86_400.0  # the first batch's end; each later one 1 ms later

# name: statements run once on the new store; a name starting "pragma " is instead run on
# each of its connections (SQLite only).
SCHEMAS = {
    "current": [],
    "+variants_device": ["CREATE INDEX ix_telemetry_variants_device_id"
                         " ON telemetry_variants (device_id)"],
    "-switches_device": ["DROP INDEX ix_switches_device_ts"],
    "-telemetry_device_end": ["DROP INDEX ix_telemetry_device_end"],
    "pragma checkpoint_1000": ["PRAGMA wal_autocheckpoint=1000"],
}


def _store(url: str, name: str, ddl: list[str]) -> Store:
    store = Store(url)
    if name.startswith("pragma "):
        def _on_connect(conn: Any, _record: Any) -> None:
            cur = conn.cursor()
            for statement in ddl:
                cur.execute(statement)
            cur.close()

        event.listen(store.engine, "connect", _on_connect)
        store.engine.dispose()  # connections made from here on run them
        return store
    with store.engine.begin() as conn:
        for statement in ddl:
            conn.exec_driver_sql(statement)
    return store


def _batch(sample: TelemetryBatch, seq: int, devices: int) -> TelemetryBatch:
    """The ``seq``-th batch of the run: device ``seq % devices``, dated as a fleet's are
    (later batches end later: the indexes by time grow at their end)."""
    end = T0 + seq * 0.001
    return sample.model_copy(update={
        "device_id": f"bench-{seq % devices:05d}", "seq": seq,
        "incarnation": "0123456789abcdef", "interval_start": end - 0.2, "interval_end": end,
        "switches": [sw.model_copy(update={"ts": end - 0.1}) for sw in sample.switches]})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer groups")
    ap.add_argument("--json", type=Path, metavar="PATH")
    ap.add_argument("--devices", type=int, default=150)
    ap.add_argument("--group", type=int, default=300, help="batches per transaction")
    ap.add_argument("--groups", type=int, help="transactions per schema (200; quick: 120)")
    ap.add_argument("--db", metavar="URL", help="PostgreSQL instead of SQLite")
    args = ap.parse_args()
    groups = args.groups or (120 if args.quick else 200)

    work = Path(tempfile.mkdtemp(prefix="pf-bench-write-"))
    times: dict[str, list[float]] = {}
    seq = 0
    try:
        with ExitStack() as stack:
            stores: dict[str, Store] = {}
            for name, ddl in SCHEMAS.items():
                if args.db and name.startswith("pragma "):
                    continue
                url = (stack.enter_context(bench_schema(args.db)) if args.db
                       else sqlite_url(work / f"{name.strip('+-').replace(' ', '_')}.db"))
                stores[name] = stack.enter_context(closing(_store(url, name, ddl)))
            samples = [TelemetryBatch.model_validate_json(_sample_payload(i))
                       for i in range(1000)]
            for _ in range(groups):
                group = []
                for _ in range(args.group):
                    group.append(_batch(samples[seq % len(samples)], seq, args.devices))
                    seq += 1
                for name, store in stores.items():
                    t0 = time.perf_counter()
                    store.add_telemetry_batches(group)
                    times.setdefault(name, []).append(time.perf_counter() - t0)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    tail = groups - groups // 4
    figures: dict = {"store": "postgresql" if args.db else "sqlite", "devices": args.devices,
                     "group": args.group, "groups": groups, "rows_at_end": seq,
                     "machine": f"{platform.machine()}, Python {platform.python_version()}"}
    base = statistics.mean(times["current"][tail:])
    for name, ts in times.items():
        median, mean = statistics.median(ts[tail:]) * 1e3, statistics.mean(ts[tail:]) * 1e3
        figures[name] = {"ms_per_group": round(median, 2), "ms_per_group_mean": round(mean, 2),
                         "us_per_batch": round(mean * 1e3 / args.group, 1),
                         "ms_per_group_first_quarter": round(
                             statistics.median(ts[:groups // 4]) * 1e3, 2),
                         "ratio": round(mean / (base * 1e3), 3)}
        f = figures[name]
        print(f"{name:24s} {f['ms_per_group']:6.2f} ms per group of {args.group} (mean "
              f"{f['ms_per_group_mean']:.2f}, {f['us_per_batch']:5.1f} µs a batch; first "
              f"quarter {f['ms_per_group_first_quarter']:.2f} ms)  x{f['ratio']}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
