"""Fleet history: telemetry over a time range, bucketed by the database, and the device
list searched and paged in one query.

Read-only queries over the store's tables, for the API and the dashboard. Buckets are
computed in SQL (``GROUP BY`` a bucket index, the same statement on SQLite and
PostgreSQL), so a week of a large fleet never travels to Python row by row, and every
answer is bounded: at most :data:`MAX_BUCKETS` buckets over at most :data:`MAX_RANGE_S`,
at most :data:`MAX_SWITCHES` switch events.

Buckets are ``resolution_s`` wide and aligned to multiples of it since the epoch, so the
same bucket keeps its start time from one request to the next. A telemetry batch belongs
to the bucket its ``interval_end`` falls in; a switch to the bucket of its ``ts``. Per
bucket:

* battery, CPU and temperature: the mean over the bucket's batches;
* requests, errors and energy: sums;
* latency p50: the request-weighted mean of the batches' p50; latency p95: the highest
  batch p95 (percentiles do not add up; the highest is an upper bound that does not hide
  one slow interval);
* active variant: the one the bucket's last batch reported serving;
* shadow agreement: of the shadow runs in the bucket's batches, the share whose top-1
  answer agreed with the reference variant (all variants pooled, and per variant);
  ``None`` where the batches carry no shadow evaluation.

Fleet energy by variant: a batch's energy counts for the variant the batch reported
active at the end of its interval (a telemetry interval is 10 s by default, so a switch
inside one moves at most that interval's energy to the next variant); this reads the
telemetry table alone, without joining per-variant rows. The store keeps no history of
online states, so the fleet's "devices online" per bucket counts the devices that sent
telemetry in it. Rollout progress per bucket counts a
rollout's devices whose last report (succeeded or failed) came before the bucket's end.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, Field
from sqlalchemy import (
    BigInteger,
    Float,
    Integer,
    and_,
    case,
    cast,
    exists,
    func,
    literal,
    or_,
    select,
)
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.sql.functions import aggregate_strings

from .store import (
    Device,
    DeviceGroup,
    DeviceRolloutReport,
    RolloutDevice,
    RolloutRow,
    ShadowRow,
    Store,
    Switch,
    Telemetry,
    VariantUsage,
)

__all__ = [
    "DEFAULT_BUCKETS", "MAX_BUCKETS", "MAX_RANGE_S", "MAX_SWITCHES", "DeviceBucket",
    "DeviceHistory", "FleetBucket", "FleetSeries", "RolloutPoint", "RolloutSeries",
    "SwitchPoint", "TimeRange", "device_history", "device_page", "fleet_series",
    "parse_range", "to_csv", "to_jsonl",
]

MAX_BUCKETS = 1000
MAX_RANGE_S = 31 * 86400
MAX_SWITCHES = 5000
MAX_ROLLOUTS = 8  # the most recent rollouts that overlap the range
DEFAULT_BUCKETS = 240  # what a chart can show without merging points
# The resolutions chosen when a request names none: the finest one giving at most
# DEFAULT_BUCKETS buckets over the range.
LADDER_S = (10, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400)
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)?\s*$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


# -- answers --------------------------------------------------------------------------------
class SwitchPoint(BaseModel):
    ts: float
    from_variant: str | None
    to_variant: str
    reason: str


class DeviceBucket(BaseModel):
    t: float = Field(description="bucket start, seconds since the epoch")
    batches: int
    battery_percent: float | None
    cpu_percent: float | None
    temperature_c: float | None
    requests: int
    errors: int
    latency_ms_p50: float | None
    latency_ms_p95: float | None
    energy_j: float
    active_variant: str | None
    variants: dict[str, int] = Field(description="requests per variant")
    switches: int
    shadow_agreement: float | None = Field(
        default=None, description="agreed / samples over the bucket's shadow runs")
    shadow_samples: int = 0
    shadow_variants: dict[str, float] = Field(
        default_factory=dict, description="shadow agreement per evaluated variant")


class DeviceHistory(BaseModel):
    device_id: str
    since: float
    until: float
    resolution_s: float
    buckets: list[DeviceBucket] = Field(description="buckets with telemetry, oldest first")
    switches: list[SwitchPoint] = Field(description="every switch in the range, oldest first")
    switches_truncated: bool = Field(
        description=f"more than {MAX_SWITCHES} switches: the newest are left out")


class FleetBucket(BaseModel):
    t: float
    requests: dict[str, int] = Field(description="requests served, by variant")
    energy_j: dict[str, float] = Field(
        description="energy by variant: each batch's energy counts for the variant it "
        "reported active at the end of its interval")
    switches: dict[str, int] = Field(description="switches, by reason")
    devices_online: int = Field(description="devices that sent telemetry in the bucket")


class RolloutPoint(BaseModel):
    t: float
    succeeded: int
    failed: int


class RolloutSeries(BaseModel):
    id: int
    status: str
    total: int
    points: list[RolloutPoint] = Field(
        description="devices succeeded and failed by the end of each bucket where it changed")


class FleetSeries(BaseModel):
    since: float
    until: float
    resolution_s: float
    variants: list[str]
    reasons: list[str]
    buckets: list[FleetBucket]
    rollouts: list[RolloutSeries]


# -- the time range -------------------------------------------------------------------------
class TimeRange(BaseModel):
    since: float  # aligned down to a multiple of resolution_s
    until: float
    resolution_s: float

    @property
    def count(self) -> int:
        return math.ceil((self.until - self.since) / self.resolution_s)

    def start_of(self, index: int) -> float:
        return self.since + index * self.resolution_s


def parse_duration(text: str) -> float:
    """``"90"``, ``"90s"``, ``"5m"``, ``"24h"``, ``"7d"``, ``"1w"`` in seconds."""
    m = _DURATION.match(text)
    if not m:
        raise ValueError(f"{text!r} is not a duration (examples: 30s, 5m, 24h, 7d)")
    return float(m.group(1)) * _UNIT_S[m.group(2) or "s"]


def parse_time(text: str, now: float) -> float:
    """A point in time: seconds since the epoch, an ISO 8601 time, ``now``, or a duration
    before now (``24h``)."""
    text = text.strip()
    if text == "now":
        return now
    try:
        value = float(text)
    except ValueError:
        pass
    else:
        if not math.isfinite(value):
            raise ValueError(f"{text!r} is not a time")
        return value
    m = _DURATION.match(text.lstrip("-"))
    if m and m.group(2):
        return now - parse_duration(text.lstrip("-"))
    try:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"{text!r} is not a time (seconds since the epoch, ISO 8601, "
                         "'now', or a duration before now such as 24h)") from None
    return (dt if dt.tzinfo else dt.replace(tzinfo=UTC)).timestamp()


def parse_range(since: str | None, until: str | None, resolution: str | None,
                now: float | None = None, default_since_s: float = 86400) -> TimeRange:
    """The range a request asks for, checked against the bounds (``ValueError`` says why)."""
    now = time.time() if now is None else now
    end = parse_time(until, now) if until else now
    start = parse_time(since, now) if since else end - default_since_s
    if start < 0 or end <= start:
        raise ValueError("since must be before until")
    if end - start > MAX_RANGE_S:
        raise ValueError(f"the range is longer than {MAX_RANGE_S // 86400} days")
    if resolution:
        res = parse_duration(resolution)
        if not 1 <= res <= LADDER_S[-1]:
            raise ValueError("resolution must be between 1 s and 1 d")
    else:
        span = end - start
        res = next((r for r in LADDER_S if span / r <= DEFAULT_BUCKETS), LADDER_S[-1])
    aligned = math.floor(start / res) * res
    r = TimeRange(since=aligned, until=end, resolution_s=res)
    if r.count > MAX_BUCKETS:
        raise ValueError(f"{r.count} buckets: at most {MAX_BUCKETS} (choose a coarser "
                         "resolution or a shorter range)")
    return r


# -- SQL helpers ----------------------------------------------------------------------------
def _bucket(store: Store, col: Any, r: TimeRange) -> ColumnElement[int]:
    """The bucket index of ``col`` (rows are filtered to ``col >= r.since``)."""
    x = (col - literal(r.since, Float)) / literal(r.resolution_s, Float)
    if store.engine.dialect.name == "sqlite":
        return cast(x, Integer)  # truncation is floor for x >= 0; SQLite may lack floor()
    return cast(func.floor(x), BigInteger)


def _in(col: Any, r: TimeRange) -> ColumnElement[bool]:
    return and_(col >= r.since, col < r.until)


def _f(x: Any) -> float | None:
    return None if x is None else float(x)


# -- one device -----------------------------------------------------------------------------
def device_history(store: Store, device_id: str, r: TimeRange) -> DeviceHistory:
    t = Telemetry
    batches = select(
        t.interval_end, t.battery_percent, t.cpu_percent, t.temperature_c, t.energy_j,
        t.active_variant, _bucket(store, t.interval_end, r).label("b"),
    ).where(t.device_id == device_id, _in(t.interval_end, r)).subquery()
    per_bucket = select(
        batches.c.b, func.count(), func.avg(batches.c.battery_percent),
        func.avg(batches.c.cpu_percent), func.avg(batches.c.temperature_c),
        func.sum(batches.c.energy_j),
    ).group_by(batches.c.b)
    ranked = select(
        batches.c.b, batches.c.active_variant,
        func.row_number().over(partition_by=batches.c.b,
                               order_by=batches.c.interval_end.desc()).label("rn"),
    ).subquery()
    last_variant = select(ranked.c.b, ranked.c.active_variant).where(ranked.c.rn == 1)

    vu = VariantUsage
    usage_rows = select(
        vu.variant, vu.requests, vu.errors, vu.latency_ms_p50, vu.latency_ms_p95,
        _bucket(store, t.interval_end, r).label("b"),
    ).join(t, t.id == vu.telemetry_id).where(
        t.device_id == device_id, _in(t.interval_end, r)).subquery()
    usage = select(
        usage_rows.c.b, usage_rows.c.variant, func.sum(usage_rows.c.requests),
        func.sum(usage_rows.c.errors),
        func.sum(usage_rows.c.latency_ms_p50 * usage_rows.c.requests),
        func.sum(case((usage_rows.c.latency_ms_p50.is_not(None), usage_rows.c.requests),
                      else_=0)),
        func.max(usage_rows.c.latency_ms_p95),
    ).group_by(usage_rows.c.b, usage_rows.c.variant)

    sh_rows = select(ShadowRow.variant, ShadowRow.samples, ShadowRow.agreed,
                     _bucket(store, ShadowRow.interval_end, r).label("b")).where(
        ShadowRow.device_id == device_id, _in(ShadowRow.interval_end, r)).subquery()
    shadow = select(sh_rows.c.b, sh_rows.c.variant, func.sum(sh_rows.c.samples),
                    func.sum(sh_rows.c.agreed)).group_by(sh_rows.c.b, sh_rows.c.variant)

    sw_rows = select(_bucket(store, Switch.ts, r).label("b")).where(
        Switch.device_id == device_id, _in(Switch.ts, r)).subquery()
    sw_counts = select(sw_rows.c.b, func.count()).group_by(sw_rows.c.b)
    sw_list = select(Switch.ts, Switch.from_variant, Switch.to_variant, Switch.reason).where(
        Switch.device_id == device_id, _in(Switch.ts, r),
    ).order_by(Switch.ts, Switch.id).limit(MAX_SWITCHES + 1)

    with store.session() as s:
        rows = s.execute(per_bucket).all()
        variants_at = {int(b): v for b, v in s.execute(last_variant)}
        usage_at = s.execute(usage).all()
        switches_at = {int(b): int(n) for b, n in s.execute(sw_counts)}
        switches = s.execute(sw_list).all()
        shadow_at = s.execute(shadow).all()

    lat: dict[int, list[float]] = {}  # bucket -> [sum p50*requests, requests with p50]
    out: dict[int, dict[str, Any]] = {}
    for b, n, battery, cpu, temp, energy in rows:
        out[int(b)] = {
            "t": r.start_of(int(b)), "batches": int(n), "battery_percent": _f(battery),
            "cpu_percent": _f(cpu), "temperature_c": _f(temp), "requests": 0, "errors": 0,
            "latency_ms_p50": None, "latency_ms_p95": None, "energy_j": float(energy or 0),
            "active_variant": variants_at.get(int(b)), "variants": {},
            "switches": switches_at.get(int(b), 0),
        }
    for b, variant, req, err, p50_weighted, p50_requests, p95 in usage_at:
        row = out.get(int(b))
        if row is None:
            continue
        row["requests"] += int(req or 0)
        row["errors"] += int(err or 0)
        row["variants"][variant] = int(req or 0)
        acc = lat.setdefault(int(b), [0.0, 0.0])
        acc[0] += float(p50_weighted or 0)
        acc[1] += float(p50_requests or 0)
        if p95 is not None and (row["latency_ms_p95"] is None or p95 > row["latency_ms_p95"]):
            row["latency_ms_p95"] = float(p95)
    for b, (weighted, weight) in lat.items():
        if weight > 0:
            out[b]["latency_ms_p50"] = weighted / weight
    agreed: dict[int, int] = {}
    for b, variant, samples, ok in shadow_at:
        row = out.get(int(b))
        if row is None or not samples:
            continue
        row["shadow_samples"] = row.get("shadow_samples", 0) + int(samples)
        agreed[int(b)] = agreed.get(int(b), 0) + int(ok or 0)
        row.setdefault("shadow_variants", {})[variant] = int(ok or 0) / int(samples)
    for b, ok in agreed.items():
        out[b]["shadow_agreement"] = ok / out[b]["shadow_samples"]
    return DeviceHistory(
        device_id=device_id, since=r.since, until=r.until, resolution_s=r.resolution_s,
        buckets=[DeviceBucket(**out[b]) for b in sorted(out)],
        switches=[SwitchPoint(ts=ts, from_variant=f, to_variant=to, reason=reason)
                  for ts, f, to, reason in switches[:MAX_SWITCHES]],
        switches_truncated=len(switches) > MAX_SWITCHES,
    )


CSV_COLUMNS = ("t", "time_utc", "batches", "battery_percent", "cpu_percent", "temperature_c",
               "requests", "errors", "latency_ms_p50", "latency_ms_p95", "energy_j",
               "active_variant", "switches", "shadow_agreement", "shadow_samples")


def to_csv(h: DeviceHistory) -> str:
    """One row per bucket (requests and shadow agreement per variant are in the JSON forms
    only)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for b in h.buckets:
        d = b.model_dump()
        d["time_utc"] = datetime.fromtimestamp(b.t, UTC).isoformat().replace("+00:00", "Z")
        w.writerow(["" if d[c] is None else d[c] for c in CSV_COLUMNS])
    return buf.getvalue()


def to_jsonl(h: DeviceHistory) -> str:
    """One JSON object per bucket, then one per switch (``"kind"`` tells them apart)."""
    lines: Iterable[dict] = (
        *({"kind": "bucket", "device_id": h.device_id, **b.model_dump()} for b in h.buckets),
        *({"kind": "switch", "device_id": h.device_id, **s.model_dump()} for s in h.switches),
    )
    return "".join(json.dumps(x, separators=(",", ":")) + "\n" for x in lines)


# -- the fleet ------------------------------------------------------------------------------
def fleet_series(store: Store, r: TimeRange) -> FleetSeries:
    t, vu = Telemetry, VariantUsage
    online_rows = select(t.device_id, _bucket(store, t.interval_end, r).label("b")).where(
        _in(t.interval_end, r)).subquery()
    online = select(online_rows.c.b, func.count(func.distinct(online_rows.c.device_id))) \
        .group_by(online_rows.c.b)

    usage_rows = select(vu.variant, vu.requests, _bucket(store, t.interval_end, r).label("b")) \
        .join(t, t.id == vu.telemetry_id).where(_in(t.interval_end, r)).subquery()
    usage = select(usage_rows.c.b, usage_rows.c.variant, func.sum(usage_rows.c.requests)) \
        .group_by(usage_rows.c.b, usage_rows.c.variant)
    energy_rows = select(
        func.coalesce(t.active_variant, "none").label("variant"), t.energy_j,
        _bucket(store, t.interval_end, r).label("b"),
    ).where(_in(t.interval_end, r)).subquery()
    energy = select(energy_rows.c.b, energy_rows.c.variant, func.sum(energy_rows.c.energy_j)) \
        .group_by(energy_rows.c.b, energy_rows.c.variant)

    sw_rows = select(Switch.reason, _bucket(store, Switch.ts, r).label("b")).where(
        _in(Switch.ts, r)).subquery()
    switches = select(sw_rows.c.b, sw_rows.c.reason, func.count()) \
        .group_by(sw_rows.c.b, sw_rows.c.reason)

    buckets: dict[int, dict[str, Any]] = {}

    def at(b: Any) -> dict[str, Any]:
        return buckets.setdefault(int(b), {"t": r.start_of(int(b)), "requests": {},
                                           "energy_j": {}, "switches": {},
                                           "devices_online": 0})

    with store.session() as s:
        for b, n in s.execute(online):
            at(b)["devices_online"] = int(n)
        for b, variant, req in s.execute(usage):
            at(b)["requests"][variant] = int(req or 0)
        for b, variant, joules in s.execute(energy):
            at(b)["energy_j"][variant] = float(joules or 0)
        for b, reason, n in s.execute(switches):
            at(b)["switches"][reason] = int(n)
        rollouts = _rollout_series(store, s, r)

    variants = sorted({v for b in buckets.values() for v in (*b["requests"], *b["energy_j"])})
    reasons = sorted({k for b in buckets.values() for k in b["switches"]})
    return FleetSeries(
        since=r.since, until=r.until, resolution_s=r.resolution_s, variants=variants,
        reasons=reasons, buckets=[FleetBucket(**buckets[b]) for b in sorted(buckets)],
        rollouts=rollouts,
    )


def _rollout_series(store: Store, s: Any, r: TimeRange) -> list[RolloutSeries]:
    rows = list(s.scalars(
        select(RolloutRow).where(
            RolloutRow.created_at < r.until,
            or_(RolloutRow.updated_at >= r.since, RolloutRow.status.in_(("active", "paused"))),
        ).order_by(RolloutRow.id.desc()).limit(MAX_ROLLOUTS)
    ))
    out = []
    rd = RolloutDevice
    for row in reversed(rows):
        ok_phases = ("active",) if (row.config or {}).get("success_phase") == "active" \
            else ("installed", "active")
        outcome = case((rd.phase.in_(ok_phases), "succeeded"),
                       (rd.phase == "failed", "failed"), else_="pending").label("outcome")
        # Reports before the range count from its first bucket (index -1 here).
        b = case((rd.updated_at < r.since, -1),
                 else_=_bucket(store, rd.updated_at, r)).label("b")
        per = select(rd.device_id, outcome, b).where(
            rd.rollout_id == row.id, rd.updated_at < r.until).subquery()
        counts = s.execute(
            select(per.c.b, per.c.outcome, func.count()).group_by(per.c.b, per.c.outcome)
        ).all()
        total = int(s.scalar(select(func.count()).where(rd.rollout_id == row.id)) or 0)
        changes: dict[int, dict[str, int]] = {}
        for bucket, kind, n in counts:
            if kind != "pending":
                changes.setdefault(max(int(bucket), 0), {}).setdefault(kind, 0)
                changes[max(int(bucket), 0)][kind] += int(n)
        first = max(0, min(r.count - 1, int((row.created_at - r.since) // r.resolution_s)))
        done = {"succeeded": 0, "failed": 0}
        points = []
        for i in sorted({first, *changes}):
            for kind, n in changes.get(i, {}).items():
                done[kind] += n
            points.append(RolloutPoint(t=r.start_of(i), **done))
        out.append(RolloutSeries(id=row.id, status=row.status, total=total, points=points))
    return out


# -- the device list ------------------------------------------------------------------------
def _like(q: str) -> str:
    return "%" + q.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def device_page(
    store: Store, *, q: str | None = None, group: str | None = None,
    online: bool | None = None, limit: int | None = None, offset: int = 0,
) -> tuple[int, list[tuple[Device, DeviceRolloutReport | None, list[str]]]]:
    """``(total matching, one page)``: devices whose id or active variant contains ``q``
    (case-insensitive), in ``group``, online or not, ordered by id; each with its last
    rollout report and its groups. One statement (the total is a window count)."""
    where = []
    if q:
        pattern = _like(q.lower())
        where.append(or_(func.lower(Device.device_id).like(pattern, escape="\\"),
                         func.lower(Device.active_variant).like(pattern, escape="\\")))
    if group is not None:
        where.append(exists().where(DeviceGroup.device_id == Device.device_id,
                                    DeviceGroup.group_name == group))
    if online is not None:
        where.append(Device.online.is_(online))
    # The page's ids and the count of all matches first (the window runs over ids only),
    # then the page's rows with their report and groups.
    ids = select(Device.device_id, func.count().over().label("total")).where(*where) \
        .order_by(Device.device_id).offset(offset)
    if limit is not None:
        ids = ids.limit(limit)
    page = ids.subquery()
    groups = select(aggregate_strings(DeviceGroup.group_name, ",")).where(
        DeviceGroup.device_id == Device.device_id).scalar_subquery()
    stmt = select(Device, DeviceRolloutReport, groups.label("groups"), page.c.total) \
        .join(page, page.c.device_id == Device.device_id) \
        .outerjoin(DeviceRolloutReport, DeviceRolloutReport.device_id == Device.device_id) \
        .order_by(Device.device_id)
    with store.session() as s:
        rows = s.execute(stmt).all()
        if rows:
            total = int(rows[0].total)
        else:  # past the last page: the window count has no row to ride on
            total = int(s.scalar(select(func.count()).select_from(Device).where(*where)) or 0)
    return total, [(d, rep, sorted(g.split(",")) if g else []) for d, rep, g, _ in rows]
