"""The server's store: SQLite file by default, PostgreSQL by URL (SQLAlchemy 2).

Telemetry is idempotent: ``(device_id, seq)`` is unique, a repeated batch is ignored.

SQLAlchemy's errors stop here: every one leaves this module as a :class:`StoreError`
(``from`` the original), a unique-constraint race as its :class:`StoreConflictError`.
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
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, IntegrityError, SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from prunefleet.shared.messages import Event, ReportedState, RolloutReport, TelemetryBatch

from .errors import StoreConflictError, StoreError


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
    # What the agent dropped or refused since it started (ReportedState.counters).
    counters: Mapped[dict] = mapped_column(JSON, default=dict)


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


class DeviceGroup(Base):
    """A device's membership of a group (server-side labels that rollouts can target)."""

    __tablename__ = "device_groups"
    device_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    group_name: Mapped[str] = mapped_column(String(64), primary_key=True, index=True)


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


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{Path(path).resolve()}"


def _shown(url: str) -> str:
    """``url`` without its password, for messages."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):
        return "(a URL SQLAlchemy cannot parse)"


class Store:
    def __init__(self, url: str):
        self.url = url
        try:
            self.engine = create_engine(url, future=True, pool_pre_ping=True)
        except (SQLAlchemyError, ImportError, ValueError) as e:
            raise StoreError(f"cannot open store {_shown(url)!r}: {e}") from e
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
            raise StoreError(f"cannot initialise store {_shown(url)!r}: {e}") from e
        self._session = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """One transaction, committed at the end; SQLAlchemy errors become StoreError."""
        s = self._session()
        try:
            yield s
            s.commit()
        except IntegrityError as e:
            s.rollback()
            raise StoreConflictError(str(e.orig)) from e
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
                # Only reported state (and its Last Will) says online or offline: a batch
                # may have waited in a queue and arrive after the will.
                self._touch(s, b.device_id)
            return True
        except StoreConflictError:
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
        for attempt in range(2):
            try:
                with self.session() as s:
                    d = self._touch(s, r.device_id, online=r.online)
                    if r.online:
                        d.agent_version = r.agent_version
                        d.manifest_version = r.manifest_version
                        d.active_variant = r.active_variant
                        d.installed = [v.model_dump() for v in r.installed]
                        d.last_error = r.last_error
                        d.counters = dict(r.counters)
                    if r.group is not None:
                        # The group an agent is configured with joins the labels the
                        # operator set (`devices set-groups`); none is removed here.
                        known = {g.group_name for g in s.scalars(
                            select(DeviceGroup).where(DeviceGroup.device_id == r.device_id))}
                        if r.group not in known:
                            s.add(DeviceGroup(device_id=r.device_id, group_name=r.group))
                return
            except StoreConflictError:
                if attempt:
                    raise
                # a concurrent insert of the same new device: update it instead

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

    # -- groups ---------------------------------------------------------------------------
    def set_device_groups(self, device_id: str, groups: list[str]) -> None:
        """Replace the groups of ``device_id``; an unknown device is registered (offline)."""
        with self.session() as s:
            if s.get(Device, device_id) is None:
                s.add(Device(device_id=device_id, installed=[], online=False, last_seen=0.0))
            for row in s.scalars(select(DeviceGroup).where(DeviceGroup.device_id == device_id)):
                s.delete(row)
            s.flush()
            for g in sorted(set(groups)):
                s.add(DeviceGroup(device_id=device_id, group_name=g))

    def device_groups(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        with self.session() as s:
            for row in s.scalars(select(DeviceGroup).order_by(DeviceGroup.group_name)):
                out.setdefault(row.device_id, []).append(row.group_name)
        return out

    def group_members(self, group: str) -> list[str]:
        with self.session() as s:
            return list(s.scalars(
                select(DeviceGroup.device_id).where(DeviceGroup.group_name == group)
                .order_by(DeviceGroup.device_id)
            ))

    def device(self, device_id: str) -> Device | None:
        with self.session() as s:
            return s.get(Device, device_id)

    # -- rollouts -------------------------------------------------------------------------
    def record_rollout_report(self, device_id: str, report: RolloutReport, ts: float) -> None:
        """Keep the device's last rollout report; update the rollout that offered it."""
        for attempt in range(2):
            try:
                with self.session() as s:
                    row = s.get(DeviceRolloutReport, device_id)
                    if row is None:
                        row = DeviceRolloutReport(device_id=device_id)
                        s.add(row)
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
                return
            except StoreConflictError:
                if attempt:
                    raise
                # a concurrent first report of the same device: update it instead

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


def _apply_report(rd: RolloutDevice, report: DeviceRolloutReport) -> None:
    rd.phase = report.phase
    rd.progress = report.progress
    rd.reason = report.reason
    rd.updated_at = report.ts
