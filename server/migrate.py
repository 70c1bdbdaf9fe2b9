"""``prunefleet store migrate``: copy a whole store to another (SQLite to PostgreSQL, or
back), so a fleet moves to a new store without losing its history or its manifest versions.

Every table is copied (devices, groups, variants, manifests with their versions, rollouts,
telemetry, events, measurements) except ``leases``, which name the replicas of the old
store. Rows go in batches, parents before children, in one transaction on the target: a
copy that fails leaves the target as it was. The counts are compared afterwards. A target
that holds anything is refused unless ``force``, which empties it first. Stop the server
first: what it writes during the copy is not carried over.

PostgreSQL stores no NUL character in a text column, and SQLite took them before ingest
refused them at the door (a device's error text, an event's detail): going to PostgreSQL,
each NUL in a text value becomes U+FFFD (the replacement character), and the values so
changed are counted per column and printed, rather than failing the whole copy.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import Integer, Table, func, select, text
from sqlalchemy.exc import SQLAlchemyError

from .errors import StoreError
from .store import Base, Store

SKIPPED = frozenset({"leases"})
BATCH_ROWS = 1000


def _tables() -> list[Table]:
    return [t for t in Base.metadata.sorted_tables if t.name not in SKIPPED]


def _counts(store: Store) -> dict[str, int]:
    with store.engine.connect() as conn:
        return {t.name: int(conn.scalar(select(func.count()).select_from(t)) or 0)
                for t in _tables()}


def migrate(src_url: str, dst_url: str, *, force: bool = False, batch_rows: int = BATCH_ROWS,
            progress: Callable[[str, int], None] | None = None,
            nul_replaced: dict[str, int] | None = None) -> dict[str, int]:
    """Copy every table of ``src_url`` to ``dst_url``; the rows copied per table.
    ``nul_replaced`` gets, per ``table.column``, the text values whose NUL characters were
    replaced for a PostgreSQL target."""
    replaced = nul_replaced if nul_replaced is not None else {}
    src, dst = Store(src_url), Store(dst_url)  # each gets the current schema
    try:
        if src.engine.url == dst.engine.url:
            raise StoreError("--from and --to name the same store")
        held = {k: n for k, n in _counts(dst).items() if n}
        if held and not force:
            some = ", ".join(f"{k} ({n})" for k, n in sorted(held.items())[:5])
            raise StoreError(f"the target store is not empty: {some}; pass --force to "
                             "empty it first")
        try:
            with dst.engine.begin() as out, src.engine.connect() as inp:
                if force:
                    for t in reversed(_tables()):
                        out.execute(t.delete())
                pg = out.dialect.name == "postgresql"
                for t in _tables():
                    n = 0
                    rows = inp.execution_options(yield_per=batch_rows).execute(
                        select(t).order_by(*t.primary_key.columns))
                    for part in rows.partitions(batch_rows):
                        batch = [dict(r._mapping) for r in part]
                        if pg:
                            _replace_nul(t.name, batch, replaced)
                        out.execute(t.insert(), batch)
                        n += len(part)
                    if progress is not None:
                        progress(t.name, n)
                if out.dialect.name == "postgresql":
                    _reset_sequences(out)
        except SQLAlchemyError as e:
            raise StoreError(f"copy failed, the target is unchanged: {e}") from e
        want, got = _counts(src), _counts(dst)
        wrong = {k: (want[k], got[k]) for k in want if want[k] != got[k]}
        if wrong:  # a server still writing to the source, most likely
            raise StoreError("counts differ after the copy (source, target): " + ", ".join(
                f"{k} {a} != {b}" for k, (a, b) in sorted(wrong.items()))
                + "; stop the server and run it again with --force")
        return got
    finally:
        src.close()
        dst.close()


def _replace_nul(table: str, rows: list[dict], replaced: dict[str, int]) -> None:
    """NUL characters in the text values of ``rows`` become U+FFFD, counted per column
    (PostgreSQL refuses them; JSON values are sent escaped, which it takes)."""
    for row in rows:
        for column, value in row.items():
            if isinstance(value, str) and "\x00" in value:
                row[column] = value.replace("\x00", "\ufffd")
                key = f"{table}.{column}"
                replaced[key] = replaced.get(key, 0) + 1


def _reset_sequences(conn) -> None:
    """Rows came with their ids: move each serial column's sequence past them."""
    for t in _tables():
        cols = list(t.primary_key.columns)
        if len(cols) != 1 or not isinstance(cols[0].type, Integer):
            continue
        c = cols[0].name
        conn.execute(text(
            f"SELECT setval(pg_get_serial_sequence(:t, :c), COALESCE(MAX({c}), 0) + 1, false) "
            f"FROM {t.name}"), {"t": t.name, "c": c})


# -- CLI ---------------------------------------------------------------------------------------
def add_commands(sub: argparse._SubParsersAction) -> None:
    st = sub.add_parser("store", help="manage the server's store")
    ss = st.add_subparsers(dest="store_command", required=True)
    m = ss.add_parser(
        "migrate", help="copy the whole store to another (SQLite to PostgreSQL or back)",
        description="Copy every table (devices, groups, variants, manifests, rollouts, "
        "telemetry, events; not the controller lease) to another store in batches and "
        "compare the counts. Stop the server first; start it on the new store with --db.")
    m.add_argument("--to", required=True, metavar="URL",
                   help="the new store: postgresql://user@host/db or sqlite:///path")
    m.add_argument("--from", dest="src", metavar="URL",
                   help="the store to copy (default: the server's, SQLite in STATE_DIR)")
    m.add_argument("--state-dir", type=Path, default=Path(".prunefleet/server"),
                   help="the server's state directory (default %(default)s)")
    m.add_argument("--force", action="store_true",
                   help="empty a target that holds anything, then copy")
    m.add_argument("--batch", type=int, default=BATCH_ROWS, metavar="ROWS",
                   help="rows per insert (default %(default)s)")
    m.set_defaults(func=_cmd_migrate)


def _cmd_migrate(args: argparse.Namespace) -> int:
    from .adminclient import UsageError
    from .serve import db_url_for

    if args.batch < 1:
        raise UsageError("--batch must be 1 or more")
    if args.src is None and not (Path(args.state_dir) / "fleet.db").exists():
        raise UsageError(f"no store at {Path(args.state_dir) / 'fleet.db'}: pass --from URL "
                         "or --state-dir")
    src = db_url_for(args.src, Path(args.state_dir))
    dst = db_url_for(args.to, Path(args.state_dir))
    replaced: dict[str, int] = {}
    counts = migrate(src, dst, force=args.force, batch_rows=args.batch,
                     progress=lambda table, n: print(f"{table}: {n} rows", flush=True),
                     nul_replaced=replaced)
    for column, n in sorted(replaced.items()):
        print(f"{column}: {n} values held NUL characters, which PostgreSQL does not store: "
              "each is now U+FFFD", flush=True)
    print(f"copied {sum(counts.values())} rows in {len(counts)} tables; counts match. "
          "Start the server with --db on the new store.")
    return 0
