"""The server's store: SQLite file by default, PostgreSQL by URL (SQLAlchemy 2).

Telemetry is idempotent: ``(device_id, seq)`` is unique, a repeated batch is ignored.

SQLAlchemy's errors stop here: every one leaves this module as a :class:`StoreError`
(``from`` the original), a unique-constraint race as its :class:`StoreConflictError`.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import math
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from itertools import chain
from pathlib import Path
from typing import Any, cast

from pydantic import ValidationError
from sqlalchemy import (
    JSON,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    create_engine,
    delete,
    event,
    func,
    inspect,
    select,
    update,
)
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import ArgumentError, DataError, IntegrityError, SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from prunefleet.shared.messages import (
    MAX_VERSION,
    Event,
    ReportedState,
    RolloutReport,
    Signature,
    TelemetryBatch,
)

from .errors import LeaseLostError, StoreConflictError, StoreDataError, StoreError

log = logging.getLogger(__name__)

# What devices report they accepted lifts the next manifest version (a new or restored store
# must not sign what agents refuse as rollbacks), but a report is only its device's word.
# A claim counts only within CLAIM_MARGIN of the fleet's median claim, so one device (or
# any minority) cannot move the counter by more than that, and never past
# MAX_ADOPTED_CLAIM: an agent refuses a version more than its max_version_jump (10**8 by
# default) above the last it accepted, a brand-new one above 0 (agent/follower.py).
CLAIM_MARGIN = 10**6
MAX_ADOPTED_CLAIM = 5 * 10**7
# Checks a device's version certificates: TrustedKeys.certifies of the signer's keys.
Certifier = Callable[[int, Sequence[Signature]], bool]
PROOFS_REMEMBERED = 1 << 16  # certificate checks next_manifest_version keeps
# Retention takes a batch dated further ahead than this by when it was received.
FUTURE_SKEW_S = 86_400.0
PG_CONNECT_ARGS = {"connect_timeout": 10, "keepalives": 1, "keepalives_idle": 10,
                   "keepalives_interval": 5, "keepalives_count": 4, "tcp_user_timeout": 30_000}


def adopted_claim(claims: list[int]) -> int:
    """The highest of ``claims`` (sorted) within CLAIM_MARGIN of their lower median and at
    most MAX_ADOPTED_CLAIM; 0 when none is."""
    if not claims:
        return 0
    bound = min(claims[(len(claims) - 1) // 2] + CLAIM_MARGIN, MAX_ADOPTED_CLAIM)
    i = bisect.bisect_right(claims, bound)
    return claims[i - 1] if i else 0


class Base(DeclarativeBase):
    pass


class Device(Base):
    __tablename__ = "devices"
    device_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    online: Mapped[bool] = mapped_column(Boolean, default=False)
    last_seen: Mapped[float] = mapped_column(Float, default=0.0)
    agent_version: Mapped[str | None] = mapped_column(String(32), nullable=True)
    manifest_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # The server's certificates that it signed manifest_version (ReportedState.version_proof),
    # as the device sent them: checked only when they would lift the version counter.
    version_proof: Mapped[list | None] = mapped_column(JSON(none_as_null=True),
                                                       nullable=True)
    active_variant: Mapped[str | None] = mapped_column(String(64), nullable=True)
    installed: Mapped[list] = mapped_column(JSON, default=list)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    # What the agent dropped or refused since it started (ReportedState.counters).
    counters: Mapped[dict] = mapped_column(JSON, default=dict)


class Telemetry(Base):
    __tablename__ = "telemetry"
    __table_args__ = (
        # The dedupe key: a batch is stored once per device, agent incarnation and seq.
        # An index rather than a constraint, so a store from before incarnations gets it.
        Index("uq_telemetry_device_inc_seq", "device_id", "incarnation", "seq", unique=True),
        # history: one device over a range, and the fleet over a range (server/history.py)
        Index("ix_telemetry_device_end", "device_id", "interval_end"),
        Index("ix_telemetry_end", "interval_end"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(String(64))  # the composite indexes cover it
    incarnation: Mapped[str] = mapped_column(String(32), default="", server_default="")
    seq: Mapped[int] = mapped_column(Integer)
    interval_start: Mapped[float] = mapped_column(Float)
    interval_end: Mapped[float] = mapped_column(Float)
    active_variant: Mapped[str | None] = mapped_column(String(64), nullable=True)
    battery_percent: Mapped[float | None] = mapped_column(Float, nullable=True)
    charging: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    cpu_percent: Mapped[float | None] = mapped_column(Float, nullable=True)
    mem_percent: Mapped[float | None] = mapped_column(Float, nullable=True)
    temperature_c: Mapped[float | None] = mapped_column(Float, nullable=True)
    energy_j: Mapped[float] = mapped_column(Float, default=0.0)
    batches_dropped: Mapped[int] = mapped_column(Integer, default=0)
    switches_dropped: Mapped[int] = mapped_column(Integer, default=0)
    received_at: Mapped[float] = mapped_column(Float)


class VariantUsage(Base):
    __tablename__ = "telemetry_variants"
    __table_args__ = (Index("ix_telemetry_variants_telemetry", "telemetry_id"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    telemetry_id: Mapped[int] = mapped_column(ForeignKey("telemetry.id", ondelete="CASCADE"))
    # No index of its own: reads for one device go through its telemetry rows
    # (ix_telemetry_device_end, then ix_telemetry_variants_telemetry). One keyed by device
    # takes a write on a leaf of its own per device per transaction: a fifth of a
    # transaction's time (docs/ingest.md).
    device_id: Mapped[str] = mapped_column(String(64))
    variant: Mapped[str] = mapped_column(String(64))
    requests: Mapped[int] = mapped_column(Integer)
    errors: Mapped[int] = mapped_column(Integer, default=0)
    labeled: Mapped[int] = mapped_column(Integer, default=0)
    correct: Mapped[int] = mapped_column(Integer, default=0)
    latency_ms_p50: Mapped[float | None] = mapped_column(Float, nullable=True)
    latency_ms_p95: Mapped[float | None] = mapped_column(Float, nullable=True)
    latency_ms_p99: Mapped[float | None] = mapped_column(Float, nullable=True)


class Switch(Base):
    __tablename__ = "switches"
    __table_args__ = (Index("ix_switches_device_ts", "device_id", "ts"),
                      Index("ix_switches_ts", "ts"))
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    telemetry_id: Mapped[int] = mapped_column(ForeignKey("telemetry.id", ondelete="CASCADE"))
    device_id: Mapped[str] = mapped_column(String(64))  # ix_switches_device_ts covers it
    ts: Mapped[float] = mapped_column(Float)
    from_variant: Mapped[str | None] = mapped_column(String(64), nullable=True)
    to_variant: Mapped[str] = mapped_column(String(64))
    reason: Mapped[str] = mapped_column(String(32))


class ShadowRow(Base):
    """One variant's shadow figures in one telemetry batch (``TelemetryBatch.shadow``):
    the evidence a rollout's wave is judged on."""

    __tablename__ = "telemetry_shadow"
    __table_args__ = (Index("ix_telemetry_shadow_device_end", "device_id", "interval_end"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    telemetry_id: Mapped[int] = mapped_column(ForeignKey("telemetry.id", ondelete="CASCADE"))
    device_id: Mapped[str] = mapped_column(String(64))
    interval_end: Mapped[float] = mapped_column(Float)
    rollout_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    variant: Mapped[str] = mapped_column(String(64))
    reference: Mapped[str] = mapped_column(String(64))
    samples: Mapped[int] = mapped_column(Integer)
    agreed: Mapped[int] = mapped_column(Integer)
    divergence_sum: Mapped[float] = mapped_column(Float)
    errors: Mapped[int] = mapped_column(Integer)
    latency_ms_p95: Mapped[float | None] = mapped_column(Float, nullable=True)
    profile_latency_ms: Mapped[float | None] = mapped_column(Float, nullable=True)


class EventRow(Base):
    __tablename__ = "events"
    # One row per event whatever the number of deliveries (see ``event_key``); rows from
    # before the key have none, and a unique index takes any number of NULLs.
    __table_args__ = (Index("uq_events_dedupe_key", "dedupe_key", unique=True),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(String(64), index=True)
    ts: Mapped[float] = mapped_column(Float)
    kind: Mapped[str] = mapped_column(String(32))
    variant: Mapped[str | None] = mapped_column(String(64), nullable=True)
    detail: Mapped[str] = mapped_column(Text, default="")
    dedupe_key: Mapped[str | None] = mapped_column(String(32), nullable=True)


def event_key(e: Event) -> str:
    """An event's identity: a digest of everything it says, its date as the device sent
    it. Events carry no sequence number, and QoS 1 delivers at least once: a server
    killed after its commit and before its acknowledgement, a device re-sending after a
    reconnect and held events written again all bring the same event back, and each
    delivery would be a row of its own. Two events alike in every field, to the
    microsecond of their date, are one."""
    fields = [e.device_id, repr(float(e.ts)), e.kind.value, e.variant, e.detail]
    digest = hashlib.sha256(json.dumps(fields, ensure_ascii=False).encode("utf-8",
                                                                          "surrogatepass"))
    return digest.hexdigest()[:32]


class VariantRow(Base):
    """A prepared variant the server can distribute (the registry)."""

    __tablename__ = "variants"
    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(64), index=True)
    path: Mapped[str] = mapped_column(Text)
    spec: Mapped[dict] = mapped_column(JSON)
    report: Mapped[dict] = mapped_column(JSON, default=dict)
    created_at: Mapped[float] = mapped_column(Float)


class ManifestRow(Base):
    __tablename__ = "manifests"
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    target: Mapped[str] = mapped_column(String(64), index=True)
    signed: Mapped[str] = mapped_column(Text)
    created_at: Mapped[float] = mapped_column(Float)


class Lease(Base):
    """Who may run a singleton job (the rollout controller) across server replicas, until
    when. Taken and renewed with one conditional UPDATE, so two replicas never both hold it."""

    __tablename__ = "leases"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str] = mapped_column(String(128))
    expires_at: Mapped[float] = mapped_column(Float)


class DeviceGroup(Base):
    """A device's membership of a group (server-side labels that rollouts can target)."""

    __tablename__ = "device_groups"
    device_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    group_name: Mapped[str] = mapped_column(String(64), primary_key=True, index=True)


class GroupRequest(Base):
    """The group a device asks to join (its agent's configured group): a request the
    operator approves (``prunefleet devices approve``), never membership by itself."""

    __tablename__ = "device_group_requests"
    device_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    group_name: Mapped[str] = mapped_column(String(64))
    ts: Mapped[float] = mapped_column(Float)


class DeviceRevocation(Base):
    """A device whose broker identity was revoked (``prunefleet devices revoke``). A table of
    its own rather than a column, so a store made by an older version gains it on start."""

    __tablename__ = "device_revocations"
    device_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    ts: Mapped[float] = mapped_column(Float)


class DeviceRolloutReport(Base):
    """The last rollout report of each device (``ReportedState.rollout``)."""

    __tablename__ = "device_rollout_reports"
    device_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    manifest_version: Mapped[int] = mapped_column(Integer)
    phase: Mapped[str] = mapped_column(String(16))
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    ts: Mapped[float] = mapped_column(Float)


class RolloutRow(Base):
    """A rollout: what it offers, to whom, how it stages, and where it stands."""

    __tablename__ = "rollouts"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    target_kind: Mapped[str] = mapped_column(String(16))
    target: Mapped[dict] = mapped_column(JSON)
    variants: Mapped[list] = mapped_column(JSON)  # VariantSpec dicts, as offered
    pinned_variant: Mapped[str | None] = mapped_column(String(64), nullable=True)
    policy: Mapped[dict | None] = mapped_column(JSON, nullable=True)  # agent policy overrides
    config: Mapped[dict] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16), index=True)
    stage: Mapped[str] = mapped_column(String(16))
    stage_started_at: Mapped[float] = mapped_column(Float)
    reason: Mapped[str] = mapped_column(Text, default="")
    history: Mapped[list] = mapped_column(JSON, default=list)  # [{"ts", "note"}], oldest first
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)


class RolloutRecord(Base):
    """What a rollout decided, kept as decided: each wave's figures against its gate
    (``wave<k>``) and a finished rollout's final counts (``counts``)."""

    __tablename__ = "rollout_records"
    rollout_id: Mapped[int] = mapped_column(
        ForeignKey("rollouts.id", ondelete="CASCADE"), primary_key=True
    )
    key: Mapped[str] = mapped_column(String(32), primary_key=True)
    value: Mapped[dict] = mapped_column(JSON)
    ts: Mapped[float] = mapped_column(Float)


class RolloutDevice(Base):
    """One device of one rollout: its stage, the manifest it was offered, its report."""

    __tablename__ = "rollout_devices"
    rollout_id: Mapped[int] = mapped_column(
        ForeignKey("rollouts.id", ondelete="CASCADE"), primary_key=True
    )
    device_id: Mapped[str] = mapped_column(String(64), primary_key=True, index=True)
    stage: Mapped[str | None] = mapped_column(String(16), nullable=True)
    offered_version: Mapped[int | None] = mapped_column(Integer, nullable=True, index=True)
    offered_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    # The manifest the device was on before this rollout (what a rollback restores).
    previous_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    phase: Mapped[str | None] = mapped_column(String(16), nullable=True)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    acknowledged: Mapped[bool] = mapped_column(Boolean, default=False)
    updated_at: Mapped[float] = mapped_column(Float, default=0.0)


_TELEMETRY_COLUMNS = (
    "device_id", "incarnation", "seq", "interval_start", "interval_end", "active_variant",
    "battery_percent", "charging", "cpu_percent", "mem_percent", "temperature_c", "energy_j",
    "batches_dropped", "switches_dropped", "received_at")
_ROWS_PER_INSERT = 64  # 15 parameters each: under SQLite's oldest limit of 999
_SQLITE_MAX_ROWID = 2**63 - 1
# The oldest SQLite the store's statements run on: upserts (ON CONFLICT … DO, 3.24) and
# window functions (3.25, the device history), with its JSON functions (json_each,
# json_group_array: built in since 3.38, an option before that every distribution turns
# on). RETURNING (3.35) is needed only past the largest row id.
SQLITE_MIN_VERSION = (3, 25, 0)
# WAL pages past which a commit copies the WAL back into the database (SQLite's default:
# 1,000). Each transaction of telemetry rewrites one leaf per device of each index keyed
# by device, the same leaves transaction after transaction: checkpointed every 1,000
# pages, each was copied back after nearly every commit; every 10,000 (about 40 MB of
# WAL), once per ten or so. 0.82 of the time per group of 300 batches at 36,000-48,000
# rows (docs/ingest.md).
SQLITE_WAL_CHECKPOINT_PAGES = 10_000
SQLITE_WAL_KEEP_BYTES = 64 * 1024 * 1024
_KEYS_PER_QUERY = 200  # (device, incarnation) keys in one query of stored seqs


def _sqlite_parts(rows: list, most: int = _ROWS_PER_INSERT) -> Iterator[list]:
    """``rows`` cut for multi-row statements on SQLite: parts of ``most`` rows, the rest in
    powers of two. So a table's inserts use a handful of distinct statements, which
    SQLite's statement cache keeps prepared, whatever a group's size."""
    k, n = 0, len(rows)
    size = most
    while k < n:
        while size > n - k:
            size >>= 1
        yield rows[k:k + size]
        k += size
# PostgreSQL takes the rows as one array per column (unnest): 15 parameters whatever the
# group's size, so psycopg caches the parsed statement and the server prepares it (a
# multi-row VALUES of 960 placeholders was parsed again on every write: 40% of the time).
_TELEMETRY_PG_TYPES = (
    "varchar", "varchar", "int", "float8", "float8", "varchar", "float8", "bool", "float8",
    "float8", "float8", "float8", "int", "int", "float8")


# Indexes of earlier versions that each telemetry write paid for and no query needs (one
# another index covers, one whose reads go through the telemetry rows), so a store drops
# them at start.
_REDUNDANT_INDEXES = ("ix_telemetry_device_id", "ix_switches_device_id",
                      "ix_telemetry_variants_device_id")


# A telemetry batch's child rows: (column, its PostgreSQL type for unnest).
_VARIANT_COLUMNS = (
    ("telemetry_id", "int"), ("device_id", "varchar"), ("variant", "varchar"),
    ("requests", "int"), ("errors", "int"), ("labeled", "int"), ("correct", "int"),
    ("latency_ms_p50", "float8"), ("latency_ms_p95", "float8"), ("latency_ms_p99", "float8"))
_SWITCH_COLUMNS = (
    ("telemetry_id", "int"), ("device_id", "varchar"), ("ts", "float8"),
    ("from_variant", "varchar"), ("to_variant", "varchar"), ("reason", "varchar"))
_SHADOW_COLUMNS = (
    ("telemetry_id", "int"), ("device_id", "varchar"), ("interval_end", "float8"),
    ("rollout_id", "int"), ("variant", "varchar"), ("reference", "varchar"),
    ("samples", "int"), ("agreed", "int"), ("divergence_sum", "float8"), ("errors", "int"),
    ("latency_ms_p95", "float8"), ("profile_latency_ms", "float8"))


def _insert_rows(execute: Callable[[str, Any], Any], pg: bool, table: str,
                 columns: tuple[tuple[str, str], ...], rows: list[tuple]) -> None:
    """Insert ``rows``: on PostgreSQL as one array per column (one statement, cached and
    prepared whatever the number of rows), on SQLite in multi-row statements. ``execute``
    is a connection's ``exec_driver_sql`` or a DBAPI cursor's ``execute``."""
    if not rows:
        return
    names = ", ".join(name for name, _ in columns)
    if pg:
        execute(
            f"INSERT INTO {table} ({names}) SELECT * FROM unnest("
            + ", ".join(f"%s::{t}[]" for _, t in columns) + ")",
            tuple(list(column) for column in zip(*rows, strict=True)))
    else:
        # Multi-row statements, not executemany: Python's sqlite3 lets go of the GIL
        # around every row's step, and with ingest's other threads busy, each time it
        # takes it back can wait a switch interval (1 ms in the processes that ingest,
        # shared/gctune.py; CPython's default is 5) (docs/ingest.md).
        row = "(" + ", ".join(["?"] * len(columns)) + ")"
        for part in _sqlite_parts(rows):
            execute(f"INSERT INTO {table} ({names}) VALUES " + ", ".join([row] * len(part)),
                    tuple(chain.from_iterable(part)))


@contextmanager
def _sqlite_errors() -> Iterator[None]:
    """SQLite's own errors, from statements run on its DBAPI cursor, as the store's."""
    try:
        yield
    except sqlite3.IntegrityError as e:
        raise StoreConflictError(str(e)) from e
    except sqlite3.Error as e:
        raise StoreError(str(e)) from e


def _upgrade_telemetry(engine) -> None:
    """A store from before agent incarnations: add the column, drop the old dedupe key
    ``(device_id, seq)`` (which refuses a re-flashed device's batches); the new key is
    an index that the index pass after this creates."""
    with engine.connect() as conn:
        columns = {c["name"] for c in inspect(conn).get_columns("telemetry")}
    if "incarnation" in columns:
        return
    if engine.dialect.name != "sqlite":
        with engine.begin() as conn:
            # IF NOT EXISTS: replicas starting at once on an old store both get here.
            conn.exec_driver_sql("ALTER TABLE telemetry ADD COLUMN IF NOT EXISTS incarnation"
                                 " VARCHAR(32) NOT NULL DEFAULT ''")
            conn.exec_driver_sql(
                "ALTER TABLE telemetry DROP CONSTRAINT IF EXISTS uq_telemetry_device_seq")
        return
    # SQLite cannot drop a table constraint: copy into a new table (its documented way),
    # with foreign keys off so that dropping the old table does not cascade.
    with engine.connect() as conn:
        conn.exec_driver_sql("PRAGMA foreign_keys=OFF")
        try:
            _rebuild_sqlite_telemetry(conn, sorted(columns))
            conn.commit()
        finally:
            conn.exec_driver_sql("PRAGMA foreign_keys=ON")


# How long a replica's start waits to drop an old index on PostgreSQL before it leaves
# it for its next start.
DROP_INDEX_LOCK_TIMEOUT = "5s"


def _drop_indexes(engine, names: Sequence[str]) -> None:
    """Drop these indexes where they exist, each on its own. On PostgreSQL without
    blocking the table (``CONCURRENTLY``): a plain DROP INDEX waits for an exclusive lock
    behind any long read (a ``pg_dump``), and every replica's ingest then queues behind
    it; several in one transaction could deadlock with a reader taking the tables in the
    other order. One that cannot be dropped within ``DROP_INDEX_LOCK_TIMEOUT`` (or that
    another replica is dropping) is left, logged, for the next start: it costs writes,
    not correctness."""
    if engine.dialect.name != "postgresql":
        for name in names:
            with engine.begin() as conn:
                conn.exec_driver_sql(f"DROP INDEX IF EXISTS {name}")
        return
    for name in names:
        with engine.connect() as conn:
            exists = conn.exec_driver_sql("SELECT to_regclass(%s)", (name,)).scalar()
        if exists is None:
            continue
        try:
            with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                conn.exec_driver_sql(f"SET lock_timeout = '{DROP_INDEX_LOCK_TIMEOUT}'")
                try:
                    conn.exec_driver_sql(f"DROP INDEX CONCURRENTLY IF EXISTS {name}")
                finally:  # the pooled connection goes back as it came
                    conn.exec_driver_sql("RESET lock_timeout")
        except SQLAlchemyError as e:
            log.warning("the old index %s stays until the next start: %s", name,
                        str(e).splitlines()[0])


def _check_sqlite() -> None:
    """Refuse, saying why, an SQLite this store's statements do not run on (they would
    fail one by one, ingest's among them)."""
    have = sqlite3.sqlite_version_info
    if have < SQLITE_MIN_VERSION:
        raise StoreError(
            f"SQLite {sqlite3.sqlite_version} is too old for the store: it needs "
            f"{'.'.join(map(str, SQLITE_MIN_VERSION))} or newer (the library Python's "
            "sqlite3 module is linked with), or use PostgreSQL (--db)")
    probe = sqlite3.connect(":memory:")
    try:
        probe.execute("SELECT json_group_array(value) FROM json_each('[1]')").fetchone()
    except sqlite3.OperationalError as e:
        raise StoreError(f"SQLite {sqlite3.sqlite_version} lacks its JSON functions ({e}), "
                         "which the store needs: a build with JSON1, or PostgreSQL (--db)"
                         ) from e
    finally:
        probe.close()


def _add_column(engine, table: str, column: str, ddl_type: str) -> None:
    """A store from before ``table.column``: add it (an index on it comes with the index
    pass after this). Rows already there get NULL."""
    with engine.connect() as conn:
        columns = {c["name"] for c in inspect(conn).get_columns(table)}
    if column in columns:
        return
    try:
        with engine.begin() as conn:
            # IF NOT EXISTS (PostgreSQL): replicas starting at once on an old store both
            # get here; SQLite has no such clause, and says so instead (below).
            exists = " IF NOT EXISTS" if engine.dialect.name == "postgresql" else ""
            conn.exec_driver_sql(f"ALTER TABLE {table} ADD COLUMN{exists} {column} {ddl_type}")
    except SQLAlchemyError as e:
        if "duplicate column" not in str(e):
            raise


def _rebuild_sqlite_telemetry(conn: Connection, columns: list[str]) -> None:
    from sqlalchemy.schema import CreateTable

    ddl = str(CreateTable(Telemetry.__table__).compile(conn))  # type: ignore[arg-type]
    conn.exec_driver_sql(ddl.replace("CREATE TABLE telemetry ", "CREATE TABLE telemetry_new ",
                                     1))
    cols = ", ".join(columns)
    conn.exec_driver_sql(f"INSERT INTO telemetry_new ({cols}) SELECT {cols} FROM telemetry")
    conn.exec_driver_sql("DROP TABLE telemetry")
    conn.exec_driver_sql("ALTER TABLE telemetry_new RENAME TO telemetry")


class DeviceFactsRow(Base):
    """What a device said it is (``ReportedState.facts``), kept until it says again."""

    __tablename__ = "device_facts"
    device_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    device_class: Mapped[str] = mapped_column(String(64), index=True)
    facts: Mapped[dict] = mapped_column(JSON)
    ts: Mapped[float] = mapped_column(Float)


class DeviceProfileRow(Base):
    """One installed variant as measured on one device (``ReportedState.profiles``)."""

    __tablename__ = "device_profiles"
    device_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    variant: Mapped[str] = mapped_column(String(64))
    profile: Mapped[dict] = mapped_column(JSON)
    ts: Mapped[float] = mapped_column(Float)


_FENCE_PROVEN = "prunefleet_fence_proven"


def _forget_fence(conn: Connection) -> None:
    conn.info.pop(_FENCE_PROVEN, None)  # the next transaction proves it again


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{Path(path).resolve()}"


def _shown(url: str) -> str:
    """``url`` without its password, for messages."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):
        return "(a URL SQLAlchemy cannot parse)"


class _Rows:
    """What writing reported states reads, per device: for a group, loaded up front in a
    few queries. Read row by row, each state cost several queries of its own, a row not
    there yet included (the session remembers no absence), and a flush: 150 devices
    reconnecting to a restarted server held its commit thread about 0.4 s. Without a
    preload (one state written alone) each read is the session's own."""

    _BY_DEVICE: tuple[Any, ...] = (Device, GroupRequest, DeviceFactsRow, DeviceRolloutReport)
    _PART = 500  # keys per IN list

    def __init__(self, s: Session) -> None:
        self.s = s
        self._rows: dict[type, dict[Any, Any]] = {}  # model -> key -> row, None: absent
        self._profiles: dict[str, dict[str, DeviceProfileRow]] = {}
        self._asked: set[str] = set()  # the artifact hashes read up front
        self._variants: set[str] = set()  # those of them registered
        self._groups_of: set[str] = set()  # the devices whose memberships were read

    def preload(self, device_ids: list[str], shas: set[str]) -> None:
        s = self.s
        parts = [device_ids[k:k + self._PART] for k in range(0, len(device_ids), self._PART)]
        for model in self._BY_DEVICE:
            table: dict[Any, Any] = dict.fromkeys(device_ids)
            for part in parts:
                table.update((r.device_id, r) for r in s.scalars(
                    select(model).where(model.device_id.in_(part))))
            self._rows[model] = table
        groups: dict[Any, Any] = {}
        self._profiles = {d: {} for d in device_ids}
        for part in parts:
            groups.update(((r.device_id, r.group_name), r) for r in s.scalars(
                select(DeviceGroup).where(DeviceGroup.device_id.in_(part))))
            for p in s.scalars(select(DeviceProfileRow).where(
                    DeviceProfileRow.device_id.in_(part))):
                self._profiles[p.device_id][p.sha256] = p
        self._groups_of = set(device_ids)
        self._rows[DeviceGroup] = groups
        self._asked = set(shas)
        self._variants = set(s.scalars(select(VariantRow.sha256).where(
            VariantRow.sha256.in_(list(shas))))) if shas else set()

    def get(self, model: type, key: Any) -> Any:
        table = self._rows.get(model)
        if table is not None:
            if model is DeviceGroup:
                if key[0] in self._groups_of:
                    return table.get(key)
            elif key in table:
                return table[key]
        return self.s.get(model, key)

    def add(self, row: Any) -> None:
        self.s.add(row)
        table = self._rows.get(type(row))
        if table is not None and type(row) in self._BY_DEVICE:
            table[row.device_id] = row

    def delete(self, row: Any) -> None:
        """Delete a row; one an earlier state of this group added (never flushed: nothing
        is between states) is only taken back, as the session refuses to delete it."""
        if inspect(row).pending:
            self.s.expunge(row)
        else:
            self.s.delete(row)
        table = self._rows.get(type(row))
        if table is not None and type(row) in self._BY_DEVICE:
            table[row.device_id] = None

    def profiles(self, device_id: str) -> dict[str, DeviceProfileRow]:
        """The device's stored profiles by artifact hash (kept up to date by the caller)."""
        if device_id in self._profiles:
            return self._profiles[device_id]
        found = {row.sha256: row for row in self.s.scalars(
            select(DeviceProfileRow).where(DeviceProfileRow.device_id == device_id))}
        self._profiles[device_id] = found
        return found

    def known_variants(self, shas: list[str]) -> set[str]:
        """Those of ``shas`` that are registered variants."""
        if self._asked.issuperset(shas):
            return self._variants.intersection(shas)
        return set(self.s.scalars(select(VariantRow.sha256).where(
            VariantRow.sha256.in_(shas))))


class Store:
    def __init__(self, url: str):
        self.url = url
        # (max and count of the devices' reported versions, adopted_claim of them): judged
        # again only when those change (next_manifest_version).
        self._claims: tuple[tuple[int, int] | None, int] = (None, 0)
        # Version proofs checked by next_manifest_version: (key ids, version, proof) → held.
        self._proofs: dict[tuple[tuple[str, ...], int, str], bool] = {}
        # Devices claiming a version above the last one drawn: claims that did not count
        # (exported: devices lying, or a proof from a key since retired).
        self.version_claims_ignored = 0
        try:
            # A pooled PostgreSQL connection may have been closed by the server or the
            # network: checked on checkout. A SQLite file cannot be (and the ping would
            # be one more statement per ingest transaction).
            # On PostgreSQL a connection attempt gives up after PG_CONNECT_TIMEOUT_S, and
            # a connection whose network went silent is found dead after about 30 s
            # (keepalives when idle, tcp_user_timeout when data waits): libpq's defaults
            # wait for ever, or for TCP's retransmissions (about 15 minutes), holding the
            # thread that asked.
            self.engine = create_engine(
                url, future=True, pool_pre_ping=not url.startswith("sqlite"),
                connect_args=(PG_CONNECT_ARGS
                              if make_url(url).get_backend_name() == "postgresql" else {}))
        except (SQLAlchemyError, ImportError, ValueError) as e:
            raise StoreError(f"cannot open store {_shown(url)!r}: {e}") from e
        if self.engine.dialect.name == "sqlite":
            _check_sqlite()

            @event.listens_for(self.engine, "connect")
            def _pragmas(conn, _record):  # WAL: ingest and readers do not block each other
                cur = conn.cursor()
                cur.execute("PRAGMA journal_mode=WAL")
                # FULL: each commit is on disk (the WAL fsynced) before it returns, since
                # ingest acknowledges after the commit and the agent then deletes its copy;
                # NORMAL would survive a crash of this process but not of the machine.
                cur.execute("PRAGMA synchronous=FULL")
                cur.execute(f"PRAGMA wal_autocheckpoint={SQLITE_WAL_CHECKPOINT_PAGES}")
                # A WAL grown past that (a reader held its snapshot over many commits)
                # is cut back to this once copied back, not kept at its largest.
                cur.execute(f"PRAGMA journal_size_limit={SQLITE_WAL_KEEP_BYTES}")
                cur.execute("PRAGMA foreign_keys=ON")
                cur.close()
        try:
            Base.metadata.create_all(self.engine)
            _upgrade_telemetry(self.engine)
            # Events from before their keys keep none: they are not compared.
            _add_column(self.engine, "events", "dedupe_key", "VARCHAR(32)")
            _add_column(self.engine, "devices", "version_proof", "JSON")
            _drop_indexes(self.engine, _REDUNDANT_INDEXES)
            # create_all skips tables that exist: add indexes a newer version declares.
            with self.engine.begin() as conn:
                for table in Base.metadata.sorted_tables:
                    for index in table.indexes:
                        index.create(conn, checkfirst=True)
        except SQLAlchemyError as e:
            raise StoreError(f"cannot initialise store {_shown(url)!r}: {e}") from e
        self._session = sessionmaker(self.engine, expire_on_commit=False)
        # The lease this thread's writes are fenced by (see ``fenced``).
        self._fence = threading.local()
        event.listen(self.engine, "before_cursor_execute", self._fence_write)
        for end in ("commit", "rollback"):
            event.listen(self.engine, end, _forget_fence)
        event.listen(self.engine, "checkin", lambda _dbapi, record: record.info.pop(
            _FENCE_PROVEN, None))

    def ping(self) -> None:
        """One round trip to the database; :class:`StoreError` when it does not answer."""
        try:
            with self.engine.connect() as c:
                c.exec_driver_sql("SELECT 1")
        except SQLAlchemyError as e:
            raise StoreError(str(e)) from e

    @contextmanager
    def session(self) -> Iterator[Session]:
        """One transaction, committed at the end; SQLAlchemy errors become StoreError
        (inside ``fenced``, a lost lease is LeaseLostError)."""
        s = self._session()
        try:
            yield s
            s.commit()
        except IntegrityError as e:
            s.rollback()
            raise StoreConflictError(str(e.orig)) from e
        except DataError as e:
            s.rollback()
            raise StoreDataError(str(e.orig)) from e
        except SQLAlchemyError as e:
            s.rollback()
            raise StoreError(str(e)) from e
        finally:
            s.close()

    def close(self) -> None:
        self.engine.dispose()

    # -- ingest -------------------------------------------------------------------------
    def add_telemetry(self, b: TelemetryBatch, received_at: float | None = None) -> bool:
        """Store a batch; False when ``(device_id, incarnation, seq)`` was already stored."""
        for attempt in range(2):
            try:
                return self._insert_telemetry([b], received_at)[0]
            except StoreConflictError as e:
                # Another ingester stored it (the next try finds it) or added its device.
                if attempt:
                    raise StoreError(f"telemetry of {b.device_id} not stored: {e}") from e
        raise AssertionError("unreachable")

    def add_telemetry_batches(
        self, batches: list[TelemetryBatch], received_at: float | None = None
    ) -> list[bool]:
        """Store ``batches`` in one transaction; per batch, False when it was already
        stored (or repeats one earlier in the list). Several servers may race: on a
        conflict, each batch is tried again on its own."""
        if not batches:
            return []
        try:
            return self._insert_telemetry(batches, received_at)
        except StoreConflictError:
            if len(batches) == 1:
                return [self.add_telemetry(batches[0], received_at)]
            return [self.add_telemetry(b, received_at) for b in batches]

    def _insert_telemetry(
        self, batches: list[TelemetryBatch], received_at: float | None
    ) -> list[bool]:
        now = time.time()
        received = received_at or now
        result, fresh, seen = [], [], set()
        for b in batches:  # a repeat within the list is a duplicate too
            key = (b.device_id, b.incarnation, b.seq)
            result.append(key not in seen)
            if key not in seen:
                seen.add(key)
                fresh.append(b)
        # INSERT … ON CONFLICT DO NOTHING dedupes against the store; the ids of the rows
        # it wrote key the children, which go in multi-row statements too. Written as SQL:
        # building it with SQLAlchemy expressions cost several times the write itself.
        ph = "?" if self.engine.dialect.paramstyle == "qmark" else "%s"
        rows = [(b.device_id, b.incarnation, b.seq, b.interval_start, b.interval_end,
                 b.active_variant, b.battery_percent, b.charging, b.cpu_percent,
                 b.mem_percent, b.temperature_c, b.energy_j, b.batches_dropped,
                 b.switches_dropped, received) for b in fresh]
        pg = self.engine.dialect.name == "postgresql"
        with self.session() as s, _sqlite_errors():
            conn = s.connection()
            execute: Callable[[str, Any], Any]
            if pg:
                execute = conn.exec_driver_sql
                id_of = self._insert_telemetry_pg(conn, rows)
            else:
                # The devices' last_seen first, through SQLAlchemy (it takes the write
                # lock, and a fenced thread's proof comes with it); the rest on the DBAPI
                # cursor: SQLAlchemy's work per statement cost more than SQLite's.
                self._touch_many(conn, "?", sorted({r[0] for r in rows}), now)
                raw = conn.connection.driver_connection
                assert raw is not None  # a checked-out connection's
                execute = raw.cursor().execute
                id_of = self._insert_telemetry_sqlite(execute, rows)
            stored = [(id_of[key], b) for b in fresh
                      if (key := (b.device_id, b.incarnation, b.seq)) in id_of]
            usage = [(tid, b.device_id, name, v.requests, v.errors, v.labeled, v.correct,
                      v.latency_ms_p50, v.latency_ms_p95, v.latency_ms_p99)
                     for tid, b in stored for name, v in b.variants.items()]
            _insert_rows(execute, pg, "telemetry_variants", _VARIANT_COLUMNS, usage)
            switches = [(tid, b.device_id, sw.ts, sw.from_variant, sw.to_variant,
                         sw.reason.value)
                        for tid, b in stored for sw in b.switches]
            shadow = [(tid, b.device_id, b.interval_end, b.shadow.rollout_id, name,
                       v.reference, v.samples, v.agreed, v.divergence_sum, v.errors,
                       v.latency_ms_p95, v.profile_latency_ms)
                      for tid, b in stored if b.shadow
                      for name, v in b.shadow.variants.items()]
            _insert_rows(execute, pg, "telemetry_shadow", _SHADOW_COLUMNS, shadow)
            _insert_rows(execute, pg, "switches", _SWITCH_COLUMNS, switches)
            # Only reported state (and its Last Will) says online or offline: a batch may
            # have waited in a queue and arrive after the will. Every device of the group
            # is seen, a re-sent batch's too (SQLite: touched first, above).
            if pg:
                self._touch_many(conn, ph, sorted({b.device_id for b in fresh}), now)
        return [new and (b.device_id, b.incarnation, b.seq) in id_of
                for b, new in zip(batches, result, strict=True)]

    @staticmethod
    def _insert_telemetry_pg(conn: Connection, rows: list[tuple]) -> dict[tuple, int]:
        """The rows as one array per column; the ids of those written (not there yet)."""
        written = conn.exec_driver_sql(
            f"INSERT INTO telemetry ({', '.join(_TELEMETRY_COLUMNS)}) SELECT * FROM unnest("
            + ", ".join(f"%s::{t}[]" for t in _TELEMETRY_PG_TYPES) + ")"
            " ON CONFLICT (device_id, incarnation, seq) DO NOTHING"
            " RETURNING id, device_id, incarnation, seq",
            tuple(list(column) for column in zip(*rows, strict=True)))
        return {(d, i, q): tid for tid, d, i, q in written}

    @staticmethod
    def _insert_telemetry_sqlite(execute: Callable[[str, Any], Any],
                                 rows: list[tuple]) -> dict[tuple, int]:
        """The rows in a few multi-row statements; the ids of those written. The caller
        has written the devices' ``last_seen`` in this transaction already.

        Not ``RETURNING``: Python's sqlite3 lets go of the GIL for every row returned, and
        taking it back from ingest's busy threads can wait a switch interval each time
        (docs/ingest.md). Instead: the write before took SQLite's write lock for this
        transaction, so no one else writes until it ends, and SQLite gives each new row
        the highest id plus one: the rows past the highest id read now are this
        transaction's, read back in one row. (Past the largest id SQLite picks ids at
        random: then ``RETURNING`` names them.)
        """
        before = execute("SELECT coalesce(max(id), 0) FROM telemetry", ()).fetchone()[0]
        columns = ", ".join(_TELEMETRY_COLUMNS)
        row = "(" + ", ".join(["?"] * len(_TELEMETRY_COLUMNS)) + ")"
        returning = before > _SQLITE_MAX_ROWID - len(rows)
        id_of: dict[tuple, int] = {}
        inserted = 0
        for part in _sqlite_parts(rows):
            result = execute(
                f"INSERT INTO telemetry ({columns}) VALUES " + ", ".join([row] * len(part))
                + " ON CONFLICT (device_id, incarnation, seq) DO NOTHING"
                + (" RETURNING id, device_id, incarnation, seq" if returning else ""),
                tuple(chain.from_iterable(part)))
            if returning:
                id_of.update(((d, i, q), tid) for tid, d, i, q in result.fetchall())
            else:
                inserted += result.rowcount
        if returning:
            return id_of
        found = json.loads(execute(
            "SELECT json_group_array(json_array(id, device_id, incarnation, seq))"
            " FROM telemetry WHERE id > ?", (before,)).fetchone()[0])
        if len(found) != inserted:
            raise StoreError(f"{inserted} telemetry rows written, but {len(found)} found "
                             "past the highest id before them")
        return {(d, i, q): tid for tid, d, i, q in found}

    @staticmethod
    def _touch_many(conn: Connection, ph: str, device_ids: list[str], now: float) -> None:
        """``last_seen`` of these devices (sorted, so that concurrent servers lock rows in
        one order), adding those the store does not know yet: one upsert statement (the
        ORM's select, update and insert cost as much as the telemetry rows)."""
        upsert = " ON CONFLICT (device_id) DO UPDATE SET last_seen = excluded.last_seen"
        columns = "INSERT INTO devices (device_id, online, last_seen, installed, counters) "
        if ph == "%s":  # PostgreSQL: one array, whatever the number (see _TELEMETRY_PG_TYPES)
            conn.exec_driver_sql(
                columns + "SELECT d, FALSE, %s, '[]'::json, '{}'::json "
                "FROM unnest(%s::varchar[]) AS d" + upsert, (now, device_ids))
            return
        for part in _sqlite_parts(device_ids):
            conn.exec_driver_sql(
                columns + "VALUES " + ", ".join(
                    [f"({ph}, FALSE, {ph}, '[]', '{{}}')"] * len(part)) + upsert,
                tuple(v for d in part for v in (d, now)))

    def stored_seqs(self, device_id: str, incarnation: str, start: int,
                    limit: int = 4096) -> list[int]:
        """Stored seqs of one agent incarnation from ``start`` up, lowest first."""
        with self.session() as s:
            return list(s.scalars(
                select(Telemetry.seq).where(
                    Telemetry.device_id == device_id, Telemetry.incarnation == incarnation,
                    Telemetry.seq >= start)
                .order_by(Telemetry.seq).limit(limit)
            ))

    def stored_seqs_many(self, starts: dict[tuple[str, str], int], limit: int = 4096
                         ) -> dict[tuple[str, str], list[int]]:
        """:meth:`stored_seqs` for several (device, incarnation) keys (a group's devices
        this process meets for the first time), mostly in one query: the keys of a part
        share one limit of ``limit`` per key, and when a part fills it (one key with many
        seqs stored above its start, which would crowd the others out) each of its keys
        is read alone instead, so that every key gets its own seqs, up to ``limit``."""
        out: dict[tuple[str, str], list[int]] = {k: [] for k in starts}
        items = list(starts.items())
        pg = self.engine.dialect.name == "postgresql"
        # One statement whatever the number of keys, the keys its parameters: an OR of a
        # clause per key was a statement of its own shape per group size, compiled anew
        # each time (129 µs per key seeded, most of a first contact's cost).
        many = ("SELECT t.device_id, t.incarnation, t.seq FROM "
                + ("unnest(%s::varchar[], %s::varchar[], %s::bigint[]) AS k(d, i, s)"
                   " JOIN telemetry AS t ON t.device_id = k.d AND t.incarnation = k.i"
                   " AND t.seq >= k.s ORDER BY t.seq LIMIT %s" if pg else
                   "json_each(?) AS k JOIN telemetry AS t"
                   " ON t.device_id = json_extract(k.value, '$[0]')"
                   " AND t.incarnation = json_extract(k.value, '$[1]')"
                   " AND t.seq >= json_extract(k.value, '$[2]') ORDER BY t.seq LIMIT ?"))
        with self.session() as s:
            conn = s.connection()
            for k in range(0, len(items), _KEYS_PER_QUERY):
                part = items[k:k + _KEYS_PER_QUERY]
                if pg:
                    params: tuple = ([d for (d, _), _ in part], [i for (_, i), _ in part],
                                     [start for _, start in part], limit * len(part))
                else:
                    params = (json.dumps([[d, i, start] for (d, i), start in part]),
                              limit * len(part))
                rows = conn.exec_driver_sql(many, params).all()
                if len(rows) == limit * len(part) and len(part) > 1:
                    for (d, i), start in part:
                        out[(d, i)] = list(s.scalars(
                            select(Telemetry.seq).where(
                                Telemetry.device_id == d, Telemetry.incarnation == i,
                                Telemetry.seq >= start).order_by(Telemetry.seq).limit(limit)))
                    continue
                for d, i, seq in rows:
                    out[(d, i)].append(seq)
        return out

    def _touch(self, s: Session, device_id: str, online: bool | None = None,
               rows: _Rows | None = None) -> Device:
        rows = rows or _Rows(s)
        d = rows.get(Device, device_id)
        if d is None:
            d = Device(device_id=device_id, installed=[])
            rows.add(d)
        d.last_seen = time.time()
        if online is not None:
            d.online = online
        return d

    def set_reported(self, r: ReportedState) -> None:
        for attempt in range(2):
            try:
                with self.session() as s:
                    self._set_reported(s, r)
                return
            except StoreConflictError:
                if attempt:
                    raise
                # a concurrent insert of the same new device: update it instead

    def write_reports(self, items: Sequence[ReportedState | Event]) -> list[bool]:
        """What ingest does with one group's reported states and events, in one
        transaction (each its own cost a commit, and on SQLite an fsync, apiece: a fleet
        reconnecting at once sent hundreds per group): per reported state, as
        :meth:`set_reported`, :meth:`set_measurements` and, when it carries one,
        :meth:`record_rollout_report`; per event, :meth:`add_event`. Returns, per item,
        False for a rollout report about a manifest never offered to its device (dropped)
        and for an event stored already (another delivery of it), else True. Raises
        :class:`StoreError` and writes nothing when any item fails: the caller writes them
        one at a time then, so that one the store refuses costs only itself."""
        out = [True] * len(items)
        # By device (each device's own in arrival order): rows are locked in one order
        # whoever writes, as telemetry's _touch_many does, so two replicas given the same
        # devices in different orders (a shared subscription spreads messages, not
        # devices) do not deadlock on PostgreSQL.
        order = sorted(range(len(items)), key=lambda k: items[k].device_id)
        states = [m for m in items if isinstance(m, ReportedState)]
        with self.session() as s:
            rows = _Rows(s)
            if states:
                # Every device row first, in one statement (device order, as above); then
                # what the states read, in a few queries.
                ids = sorted({m.device_id for m in states})
                pg = self.engine.dialect.name == "postgresql"
                self._touch_many(s.connection(), "%s" if pg else "?", ids, time.time())
                rows.preload(ids, {p.sha256 for m in states if m.online
                                   for p in m.profiles.values()})
            events = [k for k in order if isinstance(items[k], Event)]
            for k in order:
                m = items[k]
                if isinstance(m, Event):
                    continue
                self._set_reported(s, m, rows)
                self._set_measurements(s, m, rows)
                out[k] = m.rollout is None or self._record_rollout_report(
                    s, m.device_id, m.rollout, m.ts or time.time(), rows)
            for k, written in zip(events, self._add_events(
                    s, [cast(Event, items[k]) for k in events]), strict=True):
                out[k] = written
        return out

    def _set_reported(self, s: Session, r: ReportedState, rows: _Rows | None = None) -> None:
        rows = rows or _Rows(s)
        d = self._touch(s, r.device_id, online=r.online, rows=rows)
        proof = [p.model_dump() for p in r.version_proof] or None
        if not r.online and r.manifest_version is not None:
            # A goodbye or Last Will naming the version it accepted: versions only rise on
            # a device, and a will may be older than the last report (it names the version
            # at its last report).
            if r.manifest_version > (d.manifest_version or 0):
                d.manifest_version, d.version_proof = r.manifest_version, proof
            elif r.manifest_version == d.manifest_version and proof:
                d.version_proof = proof
        if r.online:
            d.agent_version = r.agent_version
            d.manifest_version = r.manifest_version
            d.version_proof = proof if r.manifest_version is not None else None
            d.active_variant = r.active_variant
            d.installed = [v.model_dump() for v in r.installed]
            d.last_error = r.last_error
            d.counters = dict(r.counters)
            self._request_group(rows, r.device_id, r.group)

    @staticmethod
    def _request_group(rows: _Rows, device_id: str, group: str | None) -> None:
        """A reported group is only a request: membership is the operator's (devices
        set-groups / approve). The request is dropped once granted or no longer asked."""
        req = rows.get(GroupRequest, device_id)
        member = group is not None and rows.get(DeviceGroup, (device_id, group)) is not None
        if group is None or member:
            if req is not None:
                rows.delete(req)
        elif req is None:
            rows.add(GroupRequest(device_id=device_id, group_name=group, ts=time.time()))
        elif req.group_name != group:
            req.group_name, req.ts = group, time.time()

    def add_event(self, e: Event) -> bool:
        """Store an event; False when it is stored already (another delivery of it)."""
        with self.session() as s:
            return self._add_events(s, [e])[0]

    def _add_events(self, s: Session, events: Sequence[Event]) -> list[bool]:
        """Store events unless their key is stored (see :func:`event_key`); per event,
        whether it was written (False: another delivery of one stored, or of one earlier
        in ``events``). One dated more than a day ahead (a wrong clock, or a lying device)
        is dated when it arrived, since by its own date retention would never take it; its
        key keeps the date it was sent with, so that every delivery of it has the same.

        PostgreSQL: one statement for them all, in key order (two replicas writing the
        same events lock them in one order), returning the keys written. SQLite: one
        statement each, its row count telling (``RETURNING`` needs SQLite 3.35)."""
        if not events:
            return []
        now = time.time()
        rows = [(e.device_id, now if e.ts > now + FUTURE_SKEW_S else e.ts, e.kind.value,
                 e.variant, e.detail, event_key(e)) for e in events]
        insert = ("INSERT INTO events (device_id, ts, kind, variant, detail, dedupe_key) ")
        conflict = " ON CONFLICT (dedupe_key) DO NOTHING"
        conn = s.connection()
        if self.engine.dialect.name == "postgresql":
            written = {k for (k,) in conn.exec_driver_sql(
                insert + "SELECT * FROM unnest(%s::varchar[], %s::float8[], %s::varchar[],"
                " %s::varchar[], %s::text[], %s::varchar[]) AS u(d, t, k, v, x, key)"
                " ORDER BY key" + conflict + " RETURNING dedupe_key",
                tuple(list(column) for column in zip(*rows, strict=True)))}
            out = []
            for row in rows:  # the first of a key in ``events`` is the one written
                out.append(row[5] in written)
                written.discard(row[5])
            return out
        return [conn.exec_driver_sql(insert + "VALUES (?, ?, ?, ?, ?, ?)" + conflict,
                                     row).rowcount == 1 for row in rows]

    # -- registry and manifests -----------------------------------------------------------
    def add_variant(self, name: str, sha256: str, path: str, spec: dict, report: dict) -> None:
        with self.session() as s:
            row = s.get(VariantRow, sha256)
            if row is None:
                s.add(VariantRow(sha256=sha256, name=name, path=path, spec=spec, report=report,
                                 created_at=time.time()))
            else:
                row.name, row.path, row.spec, row.report = name, path, spec, report

    def variants(self) -> list[VariantRow]:
        with self.session() as s:
            return list(s.scalars(select(VariantRow).order_by(VariantRow.created_at)))

    def next_manifest_version(self, certifies: Certifier | None = None, *,
                              unproven: bool = True, keyset: tuple[str, ...] = ()) -> int:
        """Above every manifest this store issued and every version devices report they
        accepted, as far as the claims are believed: a new or restored store must not sign
        what agents refuse as rollbacks, and lying devices must not push the counter where
        agents refuse every later version as too large a jump.

        ``certifies(version, proof)`` checks a device's version certificates with the
        signer's keys (``shared/signing.py``; ``keyset`` names those keys: answers are
        remembered under it, so a key retired since is asked again): a claim whose proof
        holds counts in full, whoever reports it (that version was signed). A claim without
        one (an agent of an earlier release, a manifest from before certificates, or a
        lie) counts, with ``unproven``, only as :func:`adopted_claim` judges the fleet's
        claims (within CLAIM_MARGIN of their median), and not at all without it: the
        server's ``version_claims = "certified"``, for a fleet whose every agent reports
        certificates. Certificates only ever raise the floor. Raises :class:`StoreError`
        when this store has signed its last version."""
        with self.session() as s:
            cur = int(s.scalar(select(func.max(ManifestRow.version))) or 0)
            rows = s.execute(select(Device.manifest_version, Device.version_proof)
                             .where(Device.manifest_version > cur)).all()
            # The claims' shape: they are judged again (all of them) only when it changes.
            shape = s.execute(select(func.max(Device.manifest_version),
                                     func.count(Device.manifest_version))).one() if (
                rows and unproven) else (0, 0)
        floor = cur
        if rows:  # devices ahead of this store
            if certifies is not None:
                floor = max(floor, self._proven_claim(rows, certifies, keyset))
            if unproven:
                key = (int(shape[0] or 0), int(shape[1] or 0))
                if self._claims[0] != key:  # the claims changed: judge them again
                    with self.session() as s:
                        claims = sorted(int(v) for v in s.scalars(
                            select(Device.manifest_version)
                            .where(Device.manifest_version.is_not(None))) if v is not None)
                    self._claims = (key, adopted_claim(claims))
                floor = max(floor, self._claims[1])
        ignored = sum(1 for v, _ in rows if v > floor)
        if ignored != self.version_claims_ignored:  # said once per change, not per draw
            self.version_claims_ignored = ignored
            if ignored:
                log.warning("%d devices claim a manifest version above %d, the highest "
                            "this store signed or a claim it believes; their claims do not "
                            "count", ignored, floor)
        if floor >= MAX_VERSION:
            raise StoreError(f"desired-state versions are exhausted: this store has signed "
                             f"version {MAX_VERSION}, the largest a device accepts")
        return floor + 1

    def _proven_claim(self, rows: Iterable[Any], certifies: Certifier,
                      keyset: tuple[str, ...]) -> int:
        """The highest claimed version in ``rows`` (version, proof) whose proof
        ``certifies`` holds; 0 for none. Each distinct (version, proof) is checked at most
        once per ``keyset`` (remembered, up to PROOFS_REMEMBERED, the oldest forgotten
        first), highest first, until one holds: most devices report the same few, and a
        device's junk proof costs one check, not one per version drawn."""
        distinct: dict[tuple[int, str], list] = {}
        for version, proof in rows:
            if proof:
                distinct.setdefault((int(version), json.dumps(proof, sort_keys=True)), proof)
        memo = self._proofs
        for (version, text), proof in sorted(distinct.items(), reverse=True):
            ok = memo.get((keyset, version, text))
            if ok is None:
                try:
                    ok = certifies(version, [Signature.model_validate(p) for p in proof])
                except (ValidationError, TypeError):
                    ok = False
                if len(memo) >= PROOFS_REMEMBERED:
                    memo.pop(next(iter(memo)))
                memo[(keyset, version, text)] = ok
            if ok:
                return version
        return 0

    def save_manifest(self, version: int, target: str, signed: str) -> None:
        with self.session() as s:
            s.add(ManifestRow(version=version, target=target, signed=signed,
                              created_at=time.time()))

    # -- leases -------------------------------------------------------------------------
    def take_lease(self, name: str, holder: str, ttl_s: float,
                   now: float | None = None) -> float | None:
        """Take or renew lease ``name`` for ``holder``: its new expiry, or None while another
        holder's has not expired. One atomic UPDATE (… WHERE expired OR holder = me); the
        first take is an INSERT, which a racing replica loses on the primary key."""
        now = time.time() if now is None else now
        until = now + ttl_s
        try:
            with self.session() as s:
                res = s.execute(
                    update(Lease).where(Lease.name == name)
                    .where((Lease.expires_at < now) | (Lease.holder == holder))
                    .values(holder=holder, expires_at=until))
                if res.rowcount:  # type: ignore[attr-defined]
                    return until
                if s.get(Lease, name) is not None:
                    return None
                s.add(Lease(name=name, holder=holder, expires_at=until))
        except StoreConflictError:
            return None  # another replica inserted it first
        return until

    @contextmanager
    def fenced(self, name: str, holder: str, clock: Callable[[], float],
               margin_s: float = 0.0) -> Iterator[None]:
        """Fence this thread's writes by lease ``name``: the first write of each
        transaction inside first proves, in that transaction, that ``holder`` holds the
        lease until at least ``clock() + margin_s``, and raises LeaseLostError when not (the
        transaction is rolled back: nothing of it is written). Reads are not fenced, nor
        are other threads' transactions.

        A process that checked its lease and then stalled (a frozen VM, SIGSTOP, a long
        pause) so writes nothing once another took over. The proof is a no-op ``UPDATE``
        of the lease row, which holds the row (PostgreSQL) or the database (SQLite) until
        the commit: a takeover waits for it, then finds the lease as the commit left it."""
        prev = getattr(self._fence, "lease", None)
        self._fence.lease = (name, holder, clock, margin_s)
        try:
            yield
        finally:
            self._fence.lease = prev

    def _fence_write(self, conn: Connection, cursor: Any, statement: str, parameters: Any,
                     context: Any, executemany: bool) -> None:
        fence = getattr(self._fence, "lease", None)
        if fence is None or conn.info.get(_FENCE_PROVEN) or \
                statement.lstrip()[:6].upper() not in ("INSERT", "UPDATE", "DELETE"):
            return
        name, holder, clock, margin_s = fence
        conn.info[_FENCE_PROVEN] = True  # this transaction's proof, not a write to fence
        ph = "?" if self.engine.dialect.paramstyle == "qmark" else "%s"
        cursor.execute(f"UPDATE leases SET holder = {ph} WHERE name = {ph} AND holder = {ph}"
                       f" AND expires_at > {ph}", (holder, name, holder, clock() + margin_s))
        if cursor.rowcount != 1:
            raise LeaseLostError(f"{holder} no longer holds the lease {name!r}: "
                                 "nothing written")

    def release_lease(self, name: str, holder: str) -> None:
        """Let the next replica take the lease at once (a clean stop)."""
        with self.session() as s:
            s.execute(update(Lease).where(Lease.name == name, Lease.holder == holder)
                      .values(expires_at=0.0))

    def lease(self, name: str) -> Lease | None:
        with self.session() as s:
            return s.get(Lease, name)

    # -- queries ------------------------------------------------------------------------
    def online_versions(self) -> list[tuple[str, int | None]]:
        """(device id, the desired-state version it reports) of each online device."""
        with self.session() as s:
            return [(d, v) for d, v in s.execute(
                select(Device.device_id, Device.manifest_version).where(Device.online))]

    def devices(self) -> list[Device]:
        with self.session() as s:
            return list(s.scalars(select(Device).order_by(Device.device_id)))

    def telemetry_count(self, device_id: str | None = None) -> int:
        with self.session() as s:
            q = select(func.count(Telemetry.id))
            if device_id is not None:
                q = q.where(Telemetry.device_id == device_id)
            return int(s.scalar(q) or 0)

    def switches(self, device_id: str) -> list[Switch]:
        with self.session() as s:
            return list(s.scalars(
                select(Switch).where(Switch.device_id == device_id).order_by(Switch.ts)
            ))

    def usage(self, device_id: str) -> dict[str, dict[str, int]]:
        """Requests, labelled and correct answers per variant, over all stored telemetry."""
        with self.session() as s:
            rows = s.execute(
                select(
                    VariantUsage.variant,
                    func.sum(VariantUsage.requests),
                    func.sum(VariantUsage.labeled),
                    func.sum(VariantUsage.correct),
                    func.sum(VariantUsage.errors),
                )
                .join(Telemetry, Telemetry.id == VariantUsage.telemetry_id)
                .where(Telemetry.device_id == device_id)
                .group_by(VariantUsage.variant)
            ).all()
        return {
            r[0]: {"requests": int(r[1] or 0), "labeled": int(r[2] or 0),
                   "correct": int(r[3] or 0), "errors": int(r[4] or 0)}
            for r in rows
        }

    def events(self, device_id: str | None = None) -> list[EventRow]:
        with self.session() as s:
            q = select(EventRow).order_by(EventRow.ts)
            if device_id is not None:
                q = q.where(EventRow.device_id == device_id)
            return list(s.scalars(q))

    def battery_trace(self, device_id: str) -> list[float]:
        """Battery percent of each stored batch, in interval order."""
        with self.session() as s:
            return [b for b in s.scalars(
                select(Telemetry.battery_percent).where(Telemetry.device_id == device_id)
                .order_by(Telemetry.interval_start)
            ) if b is not None]

    def telemetry_seqs(self, device_id: str) -> list[int]:
        with self.session() as s:
            return list(s.scalars(
                select(Telemetry.seq).where(Telemetry.device_id == device_id)
                .order_by(Telemetry.seq)
            ))

    # -- groups ---------------------------------------------------------------------------
    def set_device_groups(self, device_id: str, groups: list[str]) -> None:
        """Replace the groups of ``device_id``; an unknown device is registered (offline)."""
        with self.session() as s:
            # The device's row first (locked on PostgreSQL), as ingest and a decommission
            # take it, before the rows about it.
            if s.get(Device, device_id, with_for_update=True) is None:
                s.add(Device(device_id=device_id, installed=[], online=False, last_seen=0.0))
            for row in s.scalars(select(DeviceGroup).where(DeviceGroup.device_id == device_id)):
                s.delete(row)
            s.flush()
            for g in sorted(set(groups)):
                s.add(DeviceGroup(device_id=device_id, group_name=g))
            req = s.get(GroupRequest, device_id)
            if req is not None and req.group_name in groups:
                s.delete(req)  # granted

    def device_groups(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        with self.session() as s:
            for row in s.scalars(select(DeviceGroup).order_by(DeviceGroup.group_name)):
                out.setdefault(row.device_id, []).append(row.group_name)
        return out

    def group_requests(self) -> dict[str, str]:
        """device id → the group it asks to join (not yet approved)."""
        with self.session() as s:
            return {r.device_id: r.group_name for r in s.scalars(select(GroupRequest))}

    def approve_group_request(self, device_id: str) -> str | None:
        """Make the device a member of the group it asked for; the group, or None when it
        asked for none."""
        with self.session() as s:
            # The device's row first (locked on PostgreSQL), as ingest takes it before the
            # request: read first, a request that a group of reported states then changed
            # failed that group's write as stale (found by a review).
            s.get(Device, device_id, with_for_update=True)
            req = s.get(GroupRequest, device_id)
            if req is None:
                return None
            group = req.group_name
            if s.get(DeviceGroup, (device_id, group)) is None:
                s.add(DeviceGroup(device_id=device_id, group_name=group))
            s.delete(req)
            return group

    def revoke_device(self, device_id: str, ts: float | None = None) -> float:
        """Mark the device revoked (kept if it already is) and offline: nothing it says
        counts any more, its "online" included (the broker drops a revoked client without
        its Last Will, so no "offline" would ever come). When it was revoked."""
        with self.session() as s:
            row = s.get(DeviceRevocation, device_id)
            if row is None:
                row = DeviceRevocation(device_id=device_id, ts=time.time() if ts is None else ts)
                s.add(row)
            d = s.get(Device, device_id)
            if d is not None:
                d.online = False
            return row.ts

    def revocations(self) -> dict[str, float]:
        """device id → when it was revoked."""
        with self.session() as s:
            return {r.device_id: r.ts for r in s.scalars(select(DeviceRevocation))}

    def group_members(self, group: str) -> list[str]:
        with self.session() as s:
            return list(s.scalars(
                select(DeviceGroup.device_id).where(DeviceGroup.group_name == group)
                .order_by(DeviceGroup.device_id)
            ))

    def class_members(self, device_class: str) -> list[str]:
        """Devices whose last reported facts name ``device_class`` (a reported fact, not
        membership the server grants)."""
        with self.session() as s:
            return list(s.scalars(
                select(DeviceFactsRow.device_id)
                .where(DeviceFactsRow.device_class == device_class)
                .order_by(DeviceFactsRow.device_id)
            ))

    def device(self, device_id: str) -> Device | None:
        with self.session() as s:
            return s.get(Device, device_id)

    # -- rollouts -------------------------------------------------------------------------
    def record_rollout_report(self, device_id: str, report: RolloutReport, ts: float) -> bool:
        """Keep the device's last rollout report; update the rollout that offered it.

        A report counts only for a manifest this server issued to the device (or to a group
        it is in or asks for): one about a version it was never offered, or not yet, is
        dropped (False), so it cannot be waiting when that version is offered later."""
        for attempt in range(2):
            try:
                with self.session() as s:
                    return self._record_rollout_report(s, device_id, report, ts)
            except StoreConflictError:
                if attempt:
                    raise
                # a concurrent first report of the same device: update it instead
        return False

    def _record_rollout_report(self, s: Session, device_id: str, report: RolloutReport,
                               ts: float, rows: _Rows | None = None) -> bool:
        rows = rows or _Rows(s)
        if not self._issued_to(rows, device_id, report.manifest_version):
            return False
        row = rows.get(DeviceRolloutReport, device_id)
        if row is None:
            row = DeviceRolloutReport(device_id=device_id)
            rows.add(row)
        row.manifest_version = report.manifest_version
        row.phase = report.phase.value
        row.progress = report.progress
        row.reason = report.reason
        row.ts = ts
        for rd in s.scalars(select(RolloutDevice).where(
            RolloutDevice.device_id == device_id,
            RolloutDevice.offered_version == report.manifest_version,
        )):
            _apply_report(rd, row)
        return True

    @staticmethod
    def _issued_to(rows: _Rows, device_id: str, version: int) -> bool:
        m = rows.get(ManifestRow, version)
        if m is None:
            return False
        if m.target == device_id:
            return True
        req = rows.get(GroupRequest, device_id)
        return (rows.get(DeviceGroup, (device_id, m.target)) is not None
                or (req is not None and req.group_name == m.target))

    def rollout_report(self, device_id: str) -> DeviceRolloutReport | None:
        with self.session() as s:
            return s.get(DeviceRolloutReport, device_id)

    def create_rollout(
        self, *, target_kind: str, target: dict, variants: list[dict],
        pinned_variant: str | None, config: dict, status: str, stage: str,
        devices: list[str], now: float | None = None, policy: dict | None = None,
    ) -> int:
        now = time.time() if now is None else now
        with self.session() as s:
            row = RolloutRow(
                target_kind=target_kind, target=target, variants=variants,
                pinned_variant=pinned_variant, policy=policy, config=config, status=status,
                stage=stage, stage_started_at=now, reason="", created_at=now, updated_at=now,
                history=[{"ts": now, "note": f"created for {len(devices)} devices"}],
            )
            s.add(row)
            s.flush()
            for d in devices:
                s.add(RolloutDevice(rollout_id=row.id, device_id=d, updated_at=now))
            return int(row.id)

    def rollout(self, rollout_id: int) -> RolloutRow | None:
        with self.session() as s:
            return s.get(RolloutRow, rollout_id)

    def rollouts(self, statuses: list[str] | None = None) -> list[RolloutRow]:
        with self.session() as s:
            q = select(RolloutRow).order_by(RolloutRow.id)
            if statuses:
                q = q.where(RolloutRow.status.in_(statuses))
            return list(s.scalars(q))

    def update_rollout(self, rollout_id: int, note: str | None = None, **fields) -> None:
        """Set ``fields`` of a rollout; ``note`` is appended to its history."""
        now = time.time()
        with self.session() as s:
            row = s.get(RolloutRow, rollout_id)
            if row is None:
                raise StoreError(f"no rollout {rollout_id}")
            for k, v in fields.items():
                setattr(row, k, v)
            if note:
                row.history = [*(row.history or []), {"ts": now, "note": note}][-200:]
            row.updated_at = now

    def put_rollout_record(self, rollout_id: int, key: str, value: dict,
                           now: float | None = None) -> None:
        with self.session() as s:
            row = s.get(RolloutRecord, (rollout_id, key))
            if row is None:
                s.add(RolloutRecord(rollout_id=rollout_id, key=key, value=value,
                                    ts=time.time() if now is None else now))
            else:
                row.value, row.ts = value, time.time() if now is None else now

    def rollout_records(self, rollout_id: int) -> dict[str, dict]:
        with self.session() as s:
            return {r.key: r.value for r in s.scalars(
                select(RolloutRecord).where(RolloutRecord.rollout_id == rollout_id))}

    def rollout_devices(self, rollout_id: int) -> list[RolloutDevice]:
        with self.session() as s:
            return list(s.scalars(
                select(RolloutDevice).where(RolloutDevice.rollout_id == rollout_id)
                .order_by(RolloutDevice.device_id)
            ))

    def add_rollout_devices(self, rollout_id: int, device_ids: list[str]) -> None:
        now = time.time()
        with self.session() as s:
            for d in device_ids:
                if s.get(RolloutDevice, (rollout_id, d)) is None:
                    s.add(RolloutDevice(rollout_id=rollout_id, device_id=d, updated_at=now))

    def previous_before_offer(self, rollout_id: int, device_id: str,
                              version: int | None) -> int | None:
        """What a device ran before a rollout's first offer to it, kept before that offer is
        signed: the recorded one when an earlier attempt kept it and died before the offer
        was marked (the manifest it had signed meanwhile is not what the device ran),
        else ``version``, recorded (0 for none). Returns the version to restore, or None."""
        with self.session() as s:
            rd = s.get(RolloutDevice, (rollout_id, device_id))
            if rd is None or rd.offered_version is not None:
                return version  # offered before: the caller's rule (a re-offer) stands
            if rd.previous_version is not None:
                return rd.previous_version or None
            rd.previous_version = version or 0
            return version

    def mark_offered(
        self, rollout_id: int, device_id: str, *, stage: str | None, version: int,
        previous_version: int | None, now: float | None = None,
    ) -> None:
        """Record the manifest a device was offered (``stage`` None keeps the stage)."""
        now = time.time() if now is None else now
        with self.session() as s:
            rd = s.get(RolloutDevice, (rollout_id, device_id))
            if rd is None:
                rd = RolloutDevice(rollout_id=rollout_id, device_id=device_id)
                s.add(rd)
            if stage is not None:
                rd.stage = stage
            rd.offered_version = version
            rd.offered_at = now
            rd.previous_version = previous_version
            rd.phase, rd.progress, rd.reason, rd.updated_at = None, 0.0, None, now
            rd.acknowledged = False
            # The device may have reported on this manifest before this row was written.
            last = s.get(DeviceRolloutReport, device_id)
            if last is not None and last.manifest_version == version:
                _apply_report(rd, last)

    def retarget_offers(self, device_id: str, old_version: int, new_version: int) -> None:
        """The same desired state was re-signed as ``new_version``: rollouts follow it."""
        with self.session() as s:
            for rd in s.scalars(select(RolloutDevice).where(
                RolloutDevice.device_id == device_id,
                RolloutDevice.offered_version == old_version,
            )):
                rd.offered_version = new_version
            last = s.get(DeviceRolloutReport, device_id)
            if last is not None and last.manifest_version == new_version:
                for rd in s.scalars(select(RolloutDevice).where(
                    RolloutDevice.device_id == device_id,
                    RolloutDevice.offered_version == new_version,
                )):
                    _apply_report(rd, last)

    def acknowledge_failures(self, rollout_id: int) -> int:
        with self.session() as s:
            rows = list(s.scalars(select(RolloutDevice).where(
                RolloutDevice.rollout_id == rollout_id, RolloutDevice.phase == "failed",
                RolloutDevice.acknowledged.is_(False),
            )))
            for rd in rows:
                rd.acknowledged = True
            return len(rows)

    def manifest(self, version: int) -> ManifestRow | None:
        with self.session() as s:
            return s.get(ManifestRow, version)

    def latest_manifest(self, target: str) -> ManifestRow | None:
        with self.session() as s:
            return s.scalar(
                select(ManifestRow).where(ManifestRow.target == target)
                .order_by(ManifestRow.version.desc()).limit(1)
            )

    def latest_manifest_versions(self) -> dict[str, tuple[int, float]]:
        """Each target's newest manifest as (version, created_at), in one query (the
        signed text is left in the store: read it with ``manifest(version)``)."""
        with self.session() as s:
            newest = (select(ManifestRow.target, func.max(ManifestRow.version).label("v"))
                      .group_by(ManifestRow.target).subquery())
            rows = s.execute(select(ManifestRow.target, ManifestRow.version,
                                    ManifestRow.created_at)
                             .join(newest, ManifestRow.version == newest.c.v))
            return {t: (v, c) for t, v, c in rows}

    def variant(self, ref: str) -> VariantRow | None:
        """A registered variant by sha256, or the newest one registered under a name."""
        with self.session() as s:
            if len(ref) == 64:
                row = s.get(VariantRow, ref)
                if row is not None:
                    return row
            return s.scalar(
                select(VariantRow).where(VariantRow.name == ref)
                .order_by(VariantRow.created_at.desc()).limit(1)
            )

    def prune_telemetry(self, before: float) -> dict[str, int]:
        """Retention: delete telemetry of intervals that ended before ``before`` (with its
        per-variant rows, switches and shadow figures) and events from before it.

        A batch dated more than a day ahead (a device's wrong clock, or a lying device)
        goes when it was received before ``before``: by its date it would stay for good."""
        ahead = time.time() + FUTURE_SKEW_S
        gone = (Telemetry.interval_end < before) | (
            (Telemetry.interval_end > ahead) & (Telemetry.received_at < before))
        with self.session() as s:
            old = select(Telemetry.id).where(gone)
            out = {"telemetry": s.scalar(select(func.count()).select_from(old.subquery())) or 0}
            for model in (VariantUsage, Switch, ShadowRow):
                s.execute(delete(model).where(model.telemetry_id.in_(old)))
            s.execute(delete(Telemetry).where(gone))
            out["events"] = s.scalar(select(func.count()).select_from(EventRow)
                                     .where(EventRow.ts < before)) or 0
            s.execute(delete(EventRow).where(EventRow.ts < before))
            return out

    def delete_device(self, device_id: str) -> bool:
        """Decommission: every row about the device, except its revocation (credentials
        stay refused) and the manifests signed for it. False when it was not known."""
        with self.session() as s:
            # The device's row first (locked on PostgreSQL), as ingest takes it before the
            # rows about it: in the other order a decommission and a group of reported
            # states each held what the other wanted, and one failed as a deadlock.
            known = s.get(Device, device_id, with_for_update=True) is not None
            ids = select(Telemetry.id).where(Telemetry.device_id == device_id)
            for child in (VariantUsage, Switch, ShadowRow):
                s.execute(delete(child).where(child.telemetry_id.in_(ids)))
            for model in (Telemetry, EventRow, DeviceGroup, GroupRequest, DeviceRolloutReport,
                          RolloutDevice, DeviceFactsRow, DeviceProfileRow, Device):
                s.execute(delete(model).where(model.device_id == device_id))
            return known

    def rollout_shadow_rows(self, rollout_id: int, wave_stage: str) -> list[ShadowRow]:
        """In one query: the shadow figures of one rollout that devices of one wave (stage)
        reported after they were offered: cut after it (``interval_end``, the device's
        clock) and received after it (the server's), since a device may date a batch
        ahead and send it before the rollout exists."""
        with self.session() as s:
            return list(s.scalars(
                select(ShadowRow).join(RolloutDevice, (RolloutDevice.device_id
                                                       == ShadowRow.device_id))
                .join(Telemetry, Telemetry.id == ShadowRow.telemetry_id)
                .where(RolloutDevice.rollout_id == rollout_id,
                       RolloutDevice.stage == wave_stage,
                       RolloutDevice.offered_at.is_not(None),
                       ShadowRow.rollout_id == rollout_id,
                       ShadowRow.interval_end > RolloutDevice.offered_at,
                       Telemetry.received_at > RolloutDevice.offered_at)
                .order_by(ShadowRow.interval_end)))

    def telemetry_summary(self, since: float = 0.0) -> dict:
        """Fleet-wide aggregates: devices, batches, and requests and accuracy per variant."""
        with self.session() as s:
            devices = int(s.scalar(select(func.count(Device.device_id))) or 0)
            online = int(s.scalar(
                select(func.count(Device.device_id)).where(Device.online.is_(True))
            ) or 0)
            batches = int(s.scalar(
                select(func.count(Telemetry.id)).where(Telemetry.interval_end >= since)
            ) or 0)
            rows = s.execute(
                select(
                    VariantUsage.variant,
                    func.count(func.distinct(VariantUsage.device_id)),
                    func.sum(VariantUsage.requests),
                    func.sum(VariantUsage.errors),
                    func.sum(VariantUsage.labeled),
                    func.sum(VariantUsage.correct),
                    func.avg(VariantUsage.latency_ms_p50),
                )
                .join(Telemetry, Telemetry.id == VariantUsage.telemetry_id)
                .where(Telemetry.interval_end >= since)
                .group_by(VariantUsage.variant)
                .order_by(VariantUsage.variant)
            ).all()
            switches = s.execute(
                select(Switch.reason, func.count(Switch.id))
                .where(Switch.ts >= since).group_by(Switch.reason).order_by(Switch.reason)
            ).all()
        variants = {}
        for name, devs, req, err, lab, cor, p50 in rows:
            lab = int(lab or 0)
            variants[name] = {
                "devices": int(devs or 0), "requests": int(req or 0), "errors": int(err or 0),
                "labeled": lab, "correct": int(cor or 0),
                "accuracy": (int(cor or 0) / lab) if lab else None,
                "latency_ms_p50_mean": float(p50) if p50 is not None else None,
            }
        return {
            "devices": devices, "online": online, "batches": batches, "variants": variants,
            "switches": {r: int(n) for r, n in switches},
        }

    # -- device measurements (facts and on-device profiles) -------------------------------
    def set_measurements(self, r: ReportedState) -> int:
        """Keep what an online device measured: its facts when it sent them, and the
        profiles of variants it has installed that this server registered (a profile of
        anything else counts for nothing). Returns the profiles kept."""
        if not r.online:  # a Last Will or a goodbye says nothing about measurements
            return 0
        with self.session() as s:
            return self._set_measurements(s, r)

    @staticmethod
    def _set_measurements(s: Session, r: ReportedState, rows: _Rows | None = None) -> int:
        if not r.online:
            return 0
        rows = rows or _Rows(s)
        installed = {v.name: v.sha256 for v in r.installed}
        now = time.time()
        if r.facts is not None:
            frow = rows.get(DeviceFactsRow, r.device_id)
            if frow is None:
                frow = DeviceFactsRow(device_id=r.device_id)
                rows.add(frow)
            frow.device_class = r.facts.device_class
            frow.facts = r.facts.model_dump(mode="json")
            frow.ts = now
        wanted = {p.sha256: n for n, p in r.profiles.items() if installed.get(n) == p.sha256}
        known = rows.known_variants(list(wanted)) if wanted else set()
        old = rows.profiles(r.device_id)
        for sha, gone in list(old.items()):
            if sha not in known:
                rows.delete(gone)  # no longer installed there
                del old[sha]
        for sha in known:
            name = wanted[sha]
            prow = old.get(sha)
            if prow is None:
                prow = old[sha] = DeviceProfileRow(device_id=r.device_id, sha256=sha)
                s.add(prow)
            prow.variant = name
            prow.profile = r.profiles[name].model_dump(mode="json")
            prow.ts = now
        return len(known)

    def device_measurements(self, device_id: str) -> tuple[dict | None, dict[str, dict]]:
        """(facts, variant name → profile) of one device."""
        with self.session() as s:
            f = s.get(DeviceFactsRow, device_id)
            rows = s.scalars(select(DeviceProfileRow).where(
                DeviceProfileRow.device_id == device_id).order_by(DeviceProfileRow.variant))
            return (None if f is None else dict(f.facts),
                    {r.variant: {**r.profile, "received_at": r.ts} for r in rows})

    def class_measurements(self) -> dict[str, dict]:
        """Per device class: its devices, and each registered variant's figures as the
        class's devices measured them (count, median, quartiles, range)."""
        with self.session() as s:
            classes = dict(s.execute(select(DeviceFactsRow.device_id,
                                            DeviceFactsRow.device_class)).all())
            rows = s.execute(select(DeviceProfileRow.device_id, DeviceProfileRow.sha256,
                                    DeviceProfileRow.variant, DeviceProfileRow.profile)).all()
            names = dict(s.execute(select(VariantRow.sha256, VariantRow.name)).all())
        out: dict[str, dict] = {}
        for cls in classes.values():
            out.setdefault(cls, {"devices": 0, "variants": {}})["devices"] += 1
        per: dict[tuple[str, str], list[dict]] = {}
        for device, sha, _variant, profile in rows:
            of = classes.get(device)
            if of is not None and sha in names:
                per.setdefault((of, sha), []).append(profile)
        for (cls, sha), profiles in sorted(per.items()):
            fig = {"name": names[sha], "sha256": sha, "devices": len(profiles),
                   "energy_sources": dict(sorted(Counter(
                       str(p.get("energy_source")) for p in profiles).items()))}
            for key in _PROFILE_FIGURES:
                fig[key] = _spread([p.get(key) for p in profiles])
            out[cls]["variants"][names[sha]] = fig
        return dict(sorted(out.items()))


_PROFILE_FIGURES = ("latency_ms_p50", "latency_ms_p95", "cpu_ms", "energy_mj", "memory_mb")


def _spread(values: list) -> dict | None:
    """Count, median, quartiles and range of the numbers among ``values``."""
    xs = sorted(float(v) for v in values if isinstance(v, int | float) and math.isfinite(v))
    if not xs:
        return None

    def q(f: float) -> float:
        k = (len(xs) - 1) * f
        lo, hi = math.floor(k), math.ceil(k)
        return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)

    return {"n": len(xs), "median": q(0.5), "p25": q(0.25), "p75": q(0.75),
            "min": xs[0], "max": xs[-1]}


def _apply_report(rd: RolloutDevice, report: DeviceRolloutReport) -> None:
    rd.phase = report.phase
    rd.progress = report.progress
    rd.reason = report.reason
    rd.updated_at = report.ts
