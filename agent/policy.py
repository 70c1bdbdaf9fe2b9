"""Which variant to serve, and why: a pure function of what the agent knows.

``decide`` reads no clock, file or sensor; the caller passes the readings, the variant
table, the smoothed input complexity, the recent latency, the pinned variant, the previous
:class:`PolicyState` and ``now`` (monotonic seconds). Identical arguments give identical
decisions, so every rule below is tested with plain values.

The rule, in order:

1. **Pinned** wins: an installed pinned variant is served at once (``PINNED``). A pin
   naming a variant that is not installed is ignored and the policy decides, with reason
   ``FALLBACK`` on the decision that first sees it. Leaving a pin also acts at once.
2. **Budget**: the most expensive variant allowed, as an index into the table sorted by
   cost, cheapest first (:func:`order_variants`: this device's measured latency when every
   variant has a profile; variants another one beats on both latency and accuracy, by
   more than ``accuracy_margin_pp``, are left out before, :func:`drop_dominated`):

   - battery critical (and not charging): the cheapest variant, whatever else holds;
   - battery low: at most the middle of the table (index ``(n - 1) // 2``);
   - battery ok, or charging, or no battery: the whole table;
   - then CPU high, or too hot, or memory low: one step down (one step for any of them);
   - then recent latency above the SLO: one more step down.

3. **Complexity** picks within the budget: high complexity takes the budget; low takes
   one step cheaper (never below the cheapest).

**Lifetime mode** (``battery_life_target_h`` set, on battery, before the target): the
caller passes ``lifetime``, the variant the lifetime mix wants now
(:mod:`prunefleet.agent.lifetime`). It *replaces* the battery rules of step 2 (low and
critical levels) and the complexity step: the budget is that variant, capped by the other
limits of step 2 (CPU, temperature, memory: at most one step below the dearest; the SLO: one
more). A pin still wins, the dwell still holds, and a move the mix causes says
``BATTERY_LIFETIME``. Charging, past the target, or without a plan (``lifetime=None``) the
rules above apply unchanged.

Every threshold is *latched* with hysteresis, and the latched levels live in the state:
the battery enters "low" at ``battery_low_percent`` and leaves it only above
``battery_low_percent + hysteresis_percent``; CPU enters "high" at ``cpu_high_percent`` and
leaves below ``cpu_high_percent - cpu_hysteresis_percent``; complexity is "high" from
``complexity_high`` and "low" from ``complexity_low`` and keeps its level in between. A
reading of ``None`` changes no level. The SLO latch is released only when the variant it
would return to is predicted (from the measured latencies, else the declared ones, else
MACs) to run below ``latency_slo_ms * (1 - latency_hysteresis_percent / 100)``, so
stepping down does not immediately step back up.

A change of variant waits until ``min_dwell_s`` after the last one, except when the
battery is critical, which acts at once. The reason of a change names the input that
caused it: the highest-priority latched level that changed since the last switch in the
direction of the move (battery/charging, thermal, memory, CPU, SLO, complexity). With no
change, the previous variant and reason are returned. A previous variant that is no longer
installed is replaced at once (``FALLBACK``).

The enum has no "recovered" codes for temperature, memory or the SLO, so a change caused
by their recovery carries ``THERMAL``, ``MEMORY_LOW`` or ``SLO``: the input, not its
direction.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import TYPE_CHECKING

from prunefleet.shared.messages import Reason
from prunefleet.shared.policy import PolicyConfig

if TYPE_CHECKING:
    from prunefleet.shared.messages import VariantProfile, VariantSpec

    from .sensors import Readings

__all__ = [
    "BatteryLevel",
    "CascadePlan",
    "ComplexityLevel",
    "Decision",
    "Levels",
    "PolicyConfig",
    "PolicyState",
    "VariantInfo",
    "cascade_applies",
    "decide",
    "drop_dominated",
    "order_variants",
    "plan_cascade",
]


@dataclass(frozen=True)
class VariantInfo:
    """What the policy needs to know about one installed variant: what its manifest
    declares (MACs, accuracy, the latency measured where it was prepared) and what this
    device measured (its profile: latency p50, energy per inference)."""

    name: str
    macs: int
    accuracy: float | None = None
    latency_ms: float | None = None
    measured_latency_ms: float | None = None
    energy_mj: float | None = None

    @classmethod
    def from_spec(cls, spec: VariantSpec, profile: VariantProfile | None = None) -> VariantInfo:
        """``profile`` counts only when it measured this very artifact."""
        if profile is None or profile.sha256 != spec.sha256:
            return cls(spec.name, spec.macs, spec.accuracy, spec.latency_ms)
        return cls(spec.name, spec.macs, spec.accuracy, spec.latency_ms,
                   profile.latency_ms_p50, profile.energy_mj)


def order_variants(variants: Iterable[VariantInfo]) -> tuple[VariantInfo, ...]:
    """The table as the policy sees it: cheapest first.

    The cost is this device's measured latency when every variant has a profile (then its
    energy per inference breaks ties); else the latency declared by preparation when every
    variant has one, since MACs mislead where kernels differ (an INT8 variant has its FP32
    twin's MACs and runs faster); otherwise MACs, then latency, then the name. Every
    ordering of variants in the agent is this one.
    """
    vs = list(variants)
    if vs and all(v.measured_latency_ms is not None for v in vs):
        return tuple(sorted(vs, key=lambda v: (
            v.measured_latency_ms, v.energy_mj if v.energy_mj is not None else float("inf"),
            v.macs, v.name)))
    if vs and all(v.latency_ms is not None for v in vs):
        return tuple(sorted(vs, key=lambda v: (v.latency_ms, v.macs, v.name)))
    return tuple(
        sorted(
            vs,
            key=lambda v: (
                v.macs,
                v.latency_ms if v.latency_ms is not None else float("inf"),
                v.name,
            ),
        )
    )


def drop_dominated(variants: Iterable[VariantInfo], keep: str | None = None,
                   margin: float = 0.0) -> tuple[VariantInfo, ...]:
    """The variants worth serving on this device: without any that another variant beats
    on both counts, slower (as measured here) and less accurate by more than ``margin``
    (a fraction: 0.01 is one point). A variant without a profile or an accuracy is never
    dropped, nor ``keep`` (an operator's pin)."""
    vs = list(variants)

    def beaten(v: VariantInfo) -> bool:
        if v.name == keep or v.measured_latency_ms is None or v.accuracy is None:
            return False
        return any(w.measured_latency_ms is not None and w.accuracy is not None
                   and w.measured_latency_ms < v.measured_latency_ms
                   and w.accuracy > v.accuracy + margin for w in vs)

    return tuple(v for v in vs if not beaten(v))


@dataclass(frozen=True)
class CascadePlan:
    """Which variant answers first, and which one a too-unsure answer escalates to."""

    first: str
    escalate_to: str | None  # None: the first stage is already the budget

    def escalates(self, confidence: float, threshold: float) -> bool:
        """True when an answer with top-class probability ``confidence`` must be re-run."""
        return self.escalate_to is not None and confidence < threshold


def cascade_applies(specs: Iterable[VariantSpec]) -> bool:
    """Whether the confidence cascade can serve with these servable variants: two or more
    that answer the same question, the same input shape and the same classes (two or more
    of them). Then the cheap variant's output is class scores whose top-class probability
    (the softmax of its scores) says how sure it is, and the dearer one's answer can stand
    in for it. Otherwise every request is served by one variant, as the policy picks."""
    vs = list(specs)
    questions = {(tuple(s.input_shape[1:]), s.num_classes) for s in vs}
    return len(vs) >= 2 and len(questions) == 1 and vs[0].num_classes >= 2


def plan_cascade(variants: Iterable[VariantInfo], budget: str,
                 critical: bool = False) -> CascadePlan:
    """The confidence cascade: the cheapest variant first; escalate to ``budget`` (the
    variant the policy allows for a hard input) when it is unsure.

    ``critical`` (the battery is critical, not charging): the budget is the cheapest
    variant, yet unsure answers still escalate to the low level's budget (the middle of
    the table). The cheapest already answers everything it is sure of; stopping the
    escalation too would serve the cheapest's unsure answers, its wrong ones, for the last
    of the charge (on the digits bench that was most of the default's accuracy loss)."""
    table = order_variants(variants)
    if not table:
        raise ValueError("plan_cascade needs at least one variant")
    first = table[0].name
    if critical and budget == first:
        budget = table[(len(table) - 1) // 2].name
    return CascadePlan(first, None if budget == first else budget)


class BatteryLevel(StrEnum):
    OK = "ok"
    LOW = "low"
    CRITICAL = "critical"


class ComplexityLevel(StrEnum):
    HIGH = "high"
    LOW = "low"


class _Power(StrEnum):
    """The battery level as the budget sees it: charging overrides the level."""

    CRITICAL = "critical"
    LOW = "low"
    OK = "ok"
    CHARGING = "charging"


_POWER_RANK = {_Power.CRITICAL: 0, _Power.LOW: 1, _Power.OK: 2, _Power.CHARGING: 2}


@dataclass(frozen=True)
class Levels:
    """The latched level of every input; hysteresis lives here."""

    battery: BatteryLevel = BatteryLevel.OK
    charging: bool = False
    cpu_high: bool = False
    hot: bool = False
    memory_low: bool = False
    slo_violated: bool = False
    # Until the inputs say otherwise, serve the most accurate variant the budget allows.
    complexity: ComplexityLevel = ComplexityLevel.HIGH
    # Lifetime mode: the table index of the variant its mix wants now (None: not active).
    lifetime: int | None = None

    @property
    def power(self) -> _Power:
        return _Power.CHARGING if self.charging else _Power(self.battery.value)

    @property
    def critical(self) -> bool:
        """The battery rule of a critical level holds (not charging, not lifetime mode)."""
        return self.power == _Power.CRITICAL and self.lifetime is None


@dataclass(frozen=True)
class PolicyState:
    """What ``decide`` remembers between calls; pass back the one it returned."""

    variant: str
    reason: Reason
    # ``now`` when ``variant`` was first chosen; the dwell time counts from here.
    since: float
    levels: Levels
    # Levels when the variant or reason last changed; a later change is explained by what
    # moved since then.
    levels_at_switch: Levels
    # The pin requested on the previous call (installed or not).
    pinned: str | None = None
    # Variant names (cheapest first) when the variant or reason last changed.
    table_at_switch: tuple[str, ...] = ()


@dataclass(frozen=True)
class Decision:
    """The variant to serve now, why, and the state to pass to the next call."""

    variant: str
    reason: Reason
    state: PolicyState
    previous: str | None = None

    @property
    def switched(self) -> bool:
        """True when the served variant changes with this decision."""
        return self.variant != self.previous


_DEFAULT_CONFIG = PolicyConfig()


def decide(
    readings: Readings,
    variants: Iterable[VariantInfo],
    complexity: float | None,
    recent_latency_ms: float | None,
    pinned: str | None,
    state: PolicyState | None,
    now: float,
    config: PolicyConfig = _DEFAULT_CONFIG,
    lifetime: str | None = None,
) -> Decision:
    """Choose the variant to serve. Pass ``state=None`` on the first call, then the
    ``Decision.state`` of the previous call. ``variants`` must not be empty. ``lifetime``:
    the variant lifetime mode wants now (ignored when it is not in the table)."""
    table = order_variants(variants)
    if not table:
        raise ValueError("decide needs at least one variant")
    names = tuple(v.name for v in table)
    n = len(table)
    previous = state.variant if state else None
    current = names.index(previous) if previous in names else None

    levels = _latch(readings, complexity, state.levels if state else Levels(), config)
    levels = replace(levels, lifetime=names.index(lifetime) if lifetime in names else None)
    levels = replace(
        levels, slo_violated=_slo_latch(levels, recent_latency_ms, table, current, config)
    )
    target = _target(levels, n)

    def choose(variant: str, reason: Reason) -> Decision:
        since = now if state is None or variant != state.variant else state.since
        if state is not None and variant == state.variant and reason == state.reason:
            at_switch, table_at_switch = state.levels_at_switch, state.table_at_switch
        else:
            at_switch, table_at_switch = levels, names
        new = PolicyState(variant, reason, since, levels, at_switch, pinned, table_at_switch)
        return Decision(variant, reason, new, previous)

    if pinned is not None and pinned in names:
        return choose(pinned, Reason.PINNED)
    if state is None:
        return choose(names[target], Reason.INITIAL if pinned is None else Reason.FALLBACK)
    if pinned is not None and (pinned != state.pinned or state.reason == Reason.PINNED):
        return choose(names[target], Reason.FALLBACK)
    if state.reason == Reason.PINNED:
        return choose(names[target], _explain(levels))
    if current is None:
        return choose(names[target], Reason.FALLBACK)
    if target == current:
        return choose(state.variant, state.reason)

    critical_cut = (levels.power == _Power.CRITICAL and levels.lifetime is None
                    and target < current)
    if now - state.since < config.min_dwell_s and not critical_cut:
        return choose(state.variant, state.reason)
    reason = _attribute(state.levels_at_switch, levels, current, target, n)
    if reason is None:
        reason = Reason.INSTALLED if names != state.table_at_switch else _explain(levels)
    return choose(names[target], reason)


# --- latching ---------------------------------------------------------------------------


def _latch(r: Readings, complexity: float | None, prev: Levels, cfg: PolicyConfig) -> Levels:
    """Every level except the SLO's, from the readings and the previous levels."""
    return Levels(
        battery=_battery_level(prev.battery, r.battery_percent, cfg),
        charging=prev.charging if r.charging is None else r.charging,
        cpu_high=_above(
            prev.cpu_high, r.cpu_percent, cfg.cpu_high_percent, cfg.cpu_hysteresis_percent
        ),
        hot=_above(prev.hot, r.temperature_c, cfg.temperature_high_c, cfg.temperature_hysteresis_c),
        memory_low=_below(
            prev.memory_low,
            r.mem_available_percent,
            cfg.mem_low_percent,
            cfg.mem_hysteresis_percent,
        ),
        slo_violated=prev.slo_violated,
        complexity=_complexity_level(prev.complexity, complexity, cfg),
    )


def _battery_level(prev: BatteryLevel, percent: float | None, cfg: PolicyConfig) -> BatteryLevel:
    if percent is None:
        return prev
    h = cfg.hysteresis_percent
    crit = cfg.battery_critical_percent
    if percent <= crit or (prev == BatteryLevel.CRITICAL and percent <= crit + h):
        return BatteryLevel.CRITICAL
    low = cfg.battery_low_percent
    if percent <= low or (prev != BatteryLevel.OK and percent <= low + h):
        return BatteryLevel.LOW
    return BatteryLevel.OK


def _above(prev: bool, value: float | None, high: float, hysteresis: float) -> bool:
    """Latched ``value >= high``, released only below ``high - hysteresis``."""
    if value is None:
        return prev
    return value >= high or (prev and value >= high - hysteresis)


def _below(prev: bool, value: float | None, low: float, hysteresis: float) -> bool:
    """Latched ``value <= low``, released only above ``low + hysteresis``."""
    if value is None:
        return prev
    return value <= low or (prev and value <= low + hysteresis)


def _complexity_level(
    prev: ComplexityLevel, value: float | None, cfg: PolicyConfig
) -> ComplexityLevel:
    if value is None:
        return prev
    if value >= cfg.complexity_high:
        return ComplexityLevel.HIGH
    if value <= cfg.complexity_low:
        return ComplexityLevel.LOW
    return prev


def _slo_latch(
    levels: Levels,
    latency_ms: float | None,
    table: tuple[VariantInfo, ...],
    current: int | None,
    cfg: PolicyConfig,
) -> bool:
    slo = cfg.latency_slo_ms
    if slo is None:
        return False
    if latency_ms is None:
        return levels.slo_violated
    if latency_ms > slo:
        return True
    if not levels.slo_violated:
        return False
    # Release only if the variant we would return to is expected to meet the SLO too.
    back_to = _target(replace(levels, slo_violated=False), len(table))
    predicted = latency_ms * _cost_ratio(table, current, back_to)
    return predicted >= slo * (1.0 - cfg.latency_hysteresis_percent / 100.0)


def _cost_ratio(table: tuple[VariantInfo, ...], frm: int | None, to: int) -> float:
    if frm is None or frm == to:
        return 1.0
    a, b = table[frm], table[to]
    if a.measured_latency_ms and b.measured_latency_ms:
        return b.measured_latency_ms / a.measured_latency_ms
    if a.latency_ms and b.latency_ms:
        return b.latency_ms / a.latency_ms
    if a.macs > 0 and b.macs > 0:
        return b.macs / a.macs
    return 1.0


# --- budget -----------------------------------------------------------------------------


def _target(levels: Levels, n: int) -> int:
    """Index into the cheapest-first table of the variant these levels call for."""
    if levels.lifetime is not None:
        # The mix replaces the battery budget and the complexity step; the other limits cap.
        cap = n - 1
        if levels.cpu_high or levels.hot or levels.memory_low:
            cap -= 1
        if levels.slo_violated:
            cap -= 1
        return max(min(levels.lifetime, cap), 0)
    power = levels.power
    if power == _Power.CRITICAL:
        return 0
    top = n - 1
    if power == _Power.LOW:
        top = min(top, (n - 1) // 2)
    if levels.cpu_high or levels.hot or levels.memory_low:
        top -= 1
    if levels.slo_violated:
        top -= 1
    top = max(top, 0)
    if levels.complexity == ComplexityLevel.LOW:
        top -= 1
    return max(top, 0)


# --- reasons ----------------------------------------------------------------------------

# Highest priority first: the first of these that explains a move names it.
_INPUTS = ("power", "lifetime", "hot", "memory_low", "cpu_high", "slo_violated",
           "complexity")
_NO_LIFETIME = 1 << 30  # lifetime mode off: no limit of its own


def _get(levels: Levels, key: str) -> object:
    return levels.power if key == "power" else getattr(levels, key)


def _revert(new: Levels, old: Levels, key: str) -> Levels:
    if key == "power":
        return replace(new, battery=old.battery, charging=old.charging)
    return replace(new, **{key: getattr(old, key)})


def _direction(key: str, old: Levels, new: Levels) -> int:
    """+1 when the change allows a dearer variant, -1 when it demands a cheaper one."""
    if key == "power":
        delta = _POWER_RANK[new.power] - _POWER_RANK[old.power]
        return (delta > 0) - (delta < 0)
    if key == "complexity":
        return 1 if new.complexity == ComplexityLevel.HIGH else -1
    if key == "lifetime":
        a = _NO_LIFETIME if old.lifetime is None else old.lifetime
        b = _NO_LIFETIME if new.lifetime is None else new.lifetime
        return (b > a) - (b < a)
    return -1 if getattr(new, key) else 1


def _attribute(old: Levels, new: Levels, current: int, target: int, n: int) -> Reason | None:
    """The input whose change since ``old`` explains moving from ``current`` to ``target``.

    Prefers an input that alone makes the difference (undoing its change alone changes the
    target), then any changed input pushing the same way; highest priority first.
    """
    move = 1 if target > current else -1
    # In lifetime mode the battery level limits nothing: it explains no move.
    inputs = [k for k in _INPUTS if not (k == "power" and new.lifetime is not None)]
    same_way = [
        k for k in inputs if _get(old, k) != _get(new, k) and _direction(k, old, new) == move
    ]
    decisive = [k for k in same_way if _target(_revert(new, old, k), n) != target]
    chosen = decisive or same_way
    return _reason(chosen[0], old, new) if chosen else None


def _reason(key: str, old: Levels, new: Levels) -> Reason:
    if key == "power":
        power = new.power
        if power == _Power.CRITICAL:
            return Reason.BATTERY_CRITICAL
        if power == _Power.CHARGING:
            return Reason.CHARGING
        if power == _Power.LOW and old.power != _Power.CRITICAL:
            return Reason.BATTERY_LOW
        return Reason.BATTERY_RECOVERED
    if key == "lifetime":
        return Reason.BATTERY_LIFETIME
    if key == "cpu_high":
        return Reason.CPU_HIGH if new.cpu_high else Reason.CPU_RECOVERED
    if key == "complexity":
        if new.complexity == ComplexityLevel.HIGH:
            return Reason.COMPLEXITY_HIGH
        return Reason.COMPLEXITY_LOW
    on, off = _REASON_OF[key]
    return on if getattr(new, key) else off


_REASON_OF = {
    "hot": (Reason.THERMAL, Reason.THERMAL_RECOVERED),
    "memory_low": (Reason.MEMORY_LOW, Reason.MEMORY_RECOVERED),
    "slo_violated": (Reason.SLO, Reason.SLO_RECOVERED),
}


def _explain(levels: Levels) -> Reason:
    """The strongest constraint behind the current levels' choice (when no change explains
    it, e.g. after a pin is lifted)."""
    if levels.lifetime is not None:
        for key in ("hot", "memory_low", "cpu_high", "slo_violated"):
            if getattr(levels, key):
                return _REASON_OF[key][0] if key in _REASON_OF else Reason.CPU_HIGH
        return Reason.BATTERY_LIFETIME
    power = levels.power
    if power == _Power.CRITICAL:
        return Reason.BATTERY_CRITICAL
    if power == _Power.LOW:
        return Reason.BATTERY_LOW
    if levels.hot:
        return Reason.THERMAL
    if levels.memory_low:
        return Reason.MEMORY_LOW
    if levels.cpu_high:
        return Reason.CPU_HIGH
    if levels.slo_violated:
        return Reason.SLO
    if levels.complexity == ComplexityLevel.LOW:
        return Reason.COMPLEXITY_LOW
    if power == _Power.CHARGING:
        return Reason.CHARGING
    return Reason.COMPLEXITY_HIGH
