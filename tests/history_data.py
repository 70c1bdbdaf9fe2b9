"""A day of fleet history written straight into a store, and the figures a chart of it must
show, computed here in Python from the stored rows (not by the SQL under test).

60 devices (``site-000`` … ``site-059``; every fourth offline; groups ``north`` for the
first 30, ``south`` for the rest); three of them (``site-000``, ``site-001``, ``site-002``)
sent telemetry: every 10 min for the day until 65 min ago, every minute for the last
55 min. ``site-000``
switched variant three times in the last hour, ``site-001`` once two hours ago;
``site-000`` ran shadow evaluation of ``small`` against ``big`` for the last 20 min. A
completed rollout to ``north``: 27 devices active, 3 failed, before the last hour.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

from sqlalchemy import select

from prunefleet.server.rollout import RolloutConfig
from prunefleet.server.store import ShadowRow, Store, Switch, Telemetry, VariantUsage
from prunefleet.shared.messages import ReportedState, RolloutReport, TelemetryBatch

DEVICES = [f"site-{i:03d}" for i in range(60)]
REPORTING = DEVICES[:3]


@dataclass
class History:
    now: float
    batches: list[TelemetryBatch] = field(default_factory=list)
    rollout_id: int = 0

    def switches(self, device_id: str) -> list[tuple[float, str | None, str, str]]:
        return sorted((s.ts, s.from_variant, s.to_variant, s.reason.value)
                      for b in self.batches if b.device_id == device_id for s in b.switches)


def _schedule(now: float) -> dict[str, list[tuple[float, str, str]]]:
    """device -> [(ts, to_variant, reason)], the variant before the first being "big"."""
    return {
        "site-000": [(now - 2410.5, "small", "battery_low"), (now - 1205.25, "big", "charging"),
                     (now - 330.75, "small", "complexity_high")],
        "site-001": [(now - 7190.0, "small", "cpu_high")],
        "site-002": [],
    }


def write_history(store: Store, now: float) -> History:
    h = History(now=now)
    for i, d in enumerate(DEVICES):
        store.set_device_groups(d, ["north" if i < 30 else "south"])
        store.set_reported(ReportedState(
            device_id=d, online=i % 4 != 3, agent_version="0.1.0",
            active_variant="small" if i % 2 else "big"))
    for k, d in enumerate(REPORTING):
        plan = _schedule(now)[d]
        ends = [now - 86400 + 300 + 600 * j for j in range(138)]  # … now - 3900
        ends += [now - 3300 + 60 * i for i in range(55)]
        for seq, end in enumerate(ends):
            start = end - (600 if end <= now - 3600 else 60)
            before = [v for ts, v, _ in plan if ts <= start]
            variant = before[-1] if before else "big"
            inside = [(ts, v, r) for ts, v, r in plan if start < ts <= end]
            x = (end - now + 86400) / 86400  # 0 … 1 over the day
            requests = 20 + (seq % 7) * 3
            served = {variant: requests}
            switches = []
            for ts, to, reason in inside:
                switches.append({"ts": ts, "from_variant": variant, "to_variant": to,
                                 "reason": reason})
                served[to] = served.get(to, 0) + 5
                variant = to
            stats = {
                v: {"requests": n, "errors": 1 if seq % 5 == 0 else 0,
                    "latency_ms_p50": round((1.5 if v == "small" else 4.0) + (seq % 4) * 0.25, 3),
                    "latency_ms_p95": round((3.0 if v == "small" else 7.5) + (seq % 6) * 0.5, 3),
                    "latency_ms_p99": 20.0}
                for v, n in served.items()
            }
            shadow = None
            if d == "site-000" and end >= now - 1200:
                shadow = {"variants": {"small": {"reference": "big", "samples": 20,
                                                 "agreed": 16 + seq % 5}}, "sampled": 20}
            h.batches.append(TelemetryBatch(
                device_id=d, seq=seq, interval_start=start, interval_end=end,
                variants=stats, switches=switches, active_variant=variant, shadow=shadow,
                battery_percent=round(max(3.0, 97 - 70 * x - 4 * k), 2),
                cpu_percent=round(35 + 25 * math.sin(seq / 5 + k), 2),
                temperature_c=round(41 + 5 * math.sin(seq / 9) + k, 2),
                energy_j=round(sum(n * (0.05 if v == "small" else 0.2)
                                   for v, n in served.items()), 3),
            ))
    for b in h.batches:
        assert store.add_telemetry(b, received_at=b.interval_end)

    north = DEVICES[:30]
    store.save_manifest(1, "north", "{}")
    h.rollout_id = store.create_rollout(
        target_kind="group", target={"kind": "group", "group": "north"},
        variants=[{"name": "small", "sha256": "0" * 64, "size": 1}], pinned_variant=None,
        config=RolloutConfig().model_dump(), status="completed", stage="rest",
        devices=north, now=now - 5400)
    for i, d in enumerate(north):
        store.mark_offered(h.rollout_id, d, stage="rest", version=1, previous_version=None,
                           now=now - 5300)
        phase = "failed" if i >= 27 else "active"
        store.record_rollout_report(
            d, RolloutReport(manifest_version=1, phase=phase), ts=now - 5000 + 45 * i)
    return h


# -- what the charts must show, from the stored rows -------------------------------------------
def stored_rows(store: Store) -> tuple[list[Telemetry], list[VariantUsage], list[Switch]]:
    with store.session() as s:
        return (list(s.scalars(select(Telemetry))), list(s.scalars(select(VariantUsage))),
                list(s.scalars(select(Switch))))


def stored_shadow(store: Store) -> list[ShadowRow]:
    with store.session() as s:
        return list(s.scalars(select(ShadowRow)))


def expected_fleet(store: Store, x0: float, x1: float, step: float) -> dict[str, dict]:
    """(series, bucket start) -> value for the fleet charts over ``[x0, x1)``."""
    tel, usage, switches = stored_rows(store)
    bucket = {t.id: x0 + math.floor((t.interval_end - x0) / step) * step
              for t in tel if x0 <= t.interval_end < x1}
    by_id = {t.id: t for t in tel}
    requests: dict[tuple[str, float], float] = defaultdict(float)
    for u in usage:
        if u.telemetry_id in bucket:
            requests[(u.variant, bucket[u.telemetry_id])] += u.requests
    energy: dict[tuple[str, float], float] = defaultdict(float)
    for tid, t in bucket.items():  # a batch's energy counts for the variant active at its end
        energy[(by_id[tid].active_variant or "none", t)] += by_id[tid].energy_j
    online: dict[float, set] = defaultdict(set)
    for tid, t in bucket.items():
        online[t].add(by_id[tid].device_id)
    reasons: dict[tuple[str, float], int] = defaultdict(int)
    for s in switches:
        if x0 <= s.ts < x1:
            reasons[(s.reason, x0 + math.floor((s.ts - x0) / step) * step)] += 1
    return {"requests": dict(requests), "energy": dict(energy),
            "online": {("online", t): len(v) for t, v in online.items()},
            "switches": dict(reasons), "buckets": set(bucket.values())}


def expected_device(store: Store, device_id: str, x0: float, x1: float,
                    step: float) -> dict[float, dict]:
    """bucket start -> the device's figures (one batch per bucket at the resolutions the
    tests use, so the mean of one value is that value)."""
    tel, usage, _ = stored_rows(store)
    out: dict[float, dict] = {}
    rows = {t.id: t for t in tel if t.device_id == device_id and x0 <= t.interval_end < x1}
    for t in rows.values():
        b = x0 + math.floor((t.interval_end - x0) / step) * step
        assert b not in out, "the test expects one batch per bucket"
        out[b] = {"battery_percent": t.battery_percent, "cpu_percent": t.cpu_percent,
                  "temperature_c": t.temperature_c, "active_variant": t.active_variant,
                  "requests": 0, "p95": None, "_p50": [0.0, 0], "shadow": {}}
    for u in usage:
        t = rows.get(u.telemetry_id)
        if t is None:
            continue
        b = out[x0 + math.floor((t.interval_end - x0) / step) * step]
        b["requests"] += u.requests
        b["p95"] = max(b["p95"] or 0, u.latency_ms_p95)
        b["_p50"][0] += u.latency_ms_p50 * u.requests
        b["_p50"][1] += u.requests
    for b in out.values():
        w, n = b.pop("_p50")
        b["p50"] = w / n if n else None
    for sh in stored_shadow(store):
        t = rows.get(sh.telemetry_id)
        if t is not None:
            b = out[x0 + math.floor((t.interval_end - x0) / step) * step]
            b["shadow"][sh.variant] = sh.agreed / sh.samples
    return out
