"""The server's store: SQLite file by default, PostgreSQL by URL (SQLAlchemy 2).

Telemetry is idempotent: ``(device_id, seq)`` is unique, a repeated batch is ignored.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import (
    JSON,
    Boolean,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    func,
    select,
)
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from prunefleet.shared.messages import Event, ReportedState, TelemetryBatch

from .errors import StoreError


class Base(DeclarativeBase):
    pass


class Device(Base):
    __tablename__ = "devices"
    device_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    online: Mapped[bool] = mapped_column(Boolean, default=False)
    last_seen: Mapped[float] = mapped_column(Float, default=0.0)
    agent_version: Mapped[str | None] = mapped_column(String(32), nullable=True)
    manifest_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    active_variant: Mapped[str | None] = mapped_column(String(64), nullable=True)
    installed: Mapped[list] = mapped_column(JSON, default=list)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)


class Telemetry(Base):
    __tablename__ = "telemetry"
    __table_args__ = (UniqueConstraint("device_id", "seq", name="uq_telemetry_device_seq"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(String(64), index=True)
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
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    telemetry_id: Mapped[int] = mapped_column(ForeignKey("telemetry.id", ondelete="CASCADE"))
    device_id: Mapped[str] = mapped_column(String(64), index=True)
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
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    telemetry_id: Mapped[int] = mapped_column(ForeignKey("telemetry.id", ondelete="CASCADE"))
    device_id: Mapped[str] = mapped_column(String(64), index=True)
    ts: Mapped[float] = mapped_column(Float)
    from_variant: Mapped[str | None] = mapped_column(String(64), nullable=True)
    to_variant: Mapped[str] = mapped_column(String(64))
    reason: Mapped[str] = mapped_column(String(32))


class EventRow(Base):
    __tablename__ = "events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(String(64), index=True)
    ts: Mapped[float] = mapped_column(Float)
    kind: Mapped[str] = mapped_column(String(32))
    variant: Mapped[str | None] = mapped_column(String(64), nullable=True)
    detail: Mapped[str] = mapped_column(Text, default="")


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


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{Path(path).resolve()}"


class Store:
    def __init__(self, url: str):
        self.url = url
        try:
            self.engine = create_engine(url, future=True, pool_pre_ping=True)
        except (SQLAlchemyError, ImportError, ValueError) as e:
            raise StoreError(f"cannot open store {url!r}: {e}") from e
        if self.engine.dialect.name == "sqlite":
            @event.listens_for(self.engine, "connect")
            def _pragmas(conn, _record):  # WAL: ingest and readers do not block each other
                cur = conn.cursor()
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA synchronous=NORMAL")
                cur.execute("PRAGMA foreign_keys=ON")
                cur.close()
        try:
            Base.metadata.create_all(self.engine)
        except SQLAlchemyError as e:
            raise StoreError(f"cannot initialise store {url!r}: {e}") from e
        self._session = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        s = self._session()
        try:
            yield s
            s.commit()
        except IntegrityError:
            s.rollback()
            raise
        except SQLAlchemyError as e:
            s.rollback()
            raise StoreError(str(e)) from e
        finally:
            s.close()

    def close(self) -> None:
        self.engine.dispose()

    # -- ingest -------------------------------------------------------------------------
    def add_telemetry(self, b: TelemetryBatch, received_at: float | None = None) -> bool:
        """Store a batch; False when ``(device_id, seq)`` was already stored."""
        try:
            with self.session() as s:
                exists = s.scalar(
                    select(Telemetry.id).where(
                        Telemetry.device_id == b.device_id, Telemetry.seq == b.seq
                    )
                )
                if exists is not None:
                    return False
                row = Telemetry(
                    device_id=b.device_id, seq=b.seq, interval_start=b.interval_start,
                    interval_end=b.interval_end, active_variant=b.active_variant,
                    battery_percent=b.battery_percent, charging=b.charging,
                    cpu_percent=b.cpu_percent, mem_percent=b.mem_percent,
                    temperature_c=b.temperature_c, energy_j=b.energy_j,
                    batches_dropped=b.batches_dropped, switches_dropped=b.switches_dropped,
                    received_at=received_at or time.time(),
                )
                s.add(row)
                s.flush()
                for name, v in b.variants.items():
                    s.add(VariantUsage(
                        telemetry_id=row.id, device_id=b.device_id, variant=name,
                        requests=v.requests, errors=v.errors, labeled=v.labeled,
                        correct=v.correct, latency_ms_p50=v.latency_ms_p50,
                        latency_ms_p95=v.latency_ms_p95, latency_ms_p99=v.latency_ms_p99,
                    ))
                for sw in b.switches:
                    s.add(Switch(
                        telemetry_id=row.id, device_id=b.device_id, ts=sw.ts,
                        from_variant=sw.from_variant, to_variant=sw.to_variant,
                        reason=sw.reason.value,
                    ))
                self._touch(s, b.device_id, online=True)
            return True
        except IntegrityError:
            return False  # another ingester stored it first

    def _touch(self, s: Session, device_id: str, online: bool | None = None) -> Device:
        d = s.get(Device, device_id)
        if d is None:
            d = Device(device_id=device_id, installed=[])
            s.add(d)
        d.last_seen = time.time()
        if online is not None:
            d.online = online
        return d

    def set_reported(self, r: ReportedState) -> None:
        for _ in range(2):
            try:
                with self.session() as s:
                    d = self._touch(s, r.device_id, online=r.online)
                    if r.online:
                        d.agent_version = r.agent_version
                        d.manifest_version = r.manifest_version
                        d.active_variant = r.active_variant
                        d.installed = [v.model_dump() for v in r.installed]
                        d.last_error = r.last_error
                return
            except IntegrityError:
                continue  # a concurrent insert of the same new device; update it instead

    def add_event(self, e: Event) -> None:
        with self.session() as s:
            s.add(EventRow(device_id=e.device_id, ts=e.ts, kind=e.kind.value,
                           variant=e.variant, detail=e.detail))

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

    def next_manifest_version(self) -> int:
        with self.session() as s:
            cur = s.scalar(select(func.max(ManifestRow.version)))
        return int(cur or 0) + 1

    def save_manifest(self, version: int, target: str, signed: str) -> None:
        with self.session() as s:
            s.add(ManifestRow(version=version, target=target, signed=signed,
                              created_at=time.time()))

    # -- queries ------------------------------------------------------------------------
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
                .where(VariantUsage.device_id == device_id)
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
