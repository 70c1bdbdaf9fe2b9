"""The request path: one request in, the answer of the variant the policy picks out.

Any thread may call :meth:`RequestPath.predict` (the local API's connection threads, the
simulated application). The loop thread feeds in what changes slowly (sensor readings,
the pin, the effective policy); the installed table comes from the pool. The decision
itself is :func:`~prunefleet.agent.policy.decide` (and :func:`plan_cascade` for the
confidence cascade); what this module adds is the bookkeeping around it, under one lock:
the smoothed input complexity, the recent latencies, the policy's state, and a short
cache so that the policy runs at most every ``policy_eval_interval_s`` between changes.
With ``battery_life_target_h`` set it also keeps lifetime mode's state
(:class:`~prunefleet.agent.lifetime.Lifetime`: request rate, plan, deficit counters) and
passes its pick to the policy; while lifetime mode picks, the cascade is not used (the mix
is planned on each variant's own energy).
"""

from __future__ import annotations

import collections
import logging
import statistics
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from prunefleet.shared.clock import Clock
from prunefleet.shared.messages import Reason, VariantProfile, VariantSpec
from prunefleet.shared.policy import PolicyConfig

from .complexity import Ewma, estimate_complexity
from .config import CascadeConfig
from .devicefacts import FALLBACK_ACTIVE_POWER_W
from .energy import estimate_j
from .errors import NoVariantError
from .lifetime import Lifetime, Option
from .policy import (
    PolicyState,
    VariantInfo,
    cascade_applies,
    decide,
    drop_dominated,
    order_variants,
    plan_cascade,
)
from .profile import Activity
from .runtime import ModelPool, Served
from .sensors import Readings, SimulatedBattery
from .shadow import ShadowEvaluator
from .telemetry import Aggregator

log = logging.getLogger(__name__)

__all__ = ["RequestPath", "ServingOptions"]

_UNSET = object()


@dataclass(frozen=True)
class ServingOptions:
    cascade: CascadeConfig
    # Watts a busy core draws above idle: the energy of a variant not profiled yet is its
    # inference time times this (``cpu_time_estimate``).
    active_power_w: float = FALLBACK_ACTIVE_POWER_W
    complexity_ewma_alpha: float = 0.2
    complexity_min_interval_s: float = 0.005
    policy_eval_interval_s: float = 0.01


class RequestPath:
    """Thread-safe; ``on_switch(old, new, reason)`` runs when the served variant changes."""

    def __init__(
        self,
        pool: ModelPool,
        agg: Aggregator,
        clock: Clock,
        options: ServingOptions,
        policy: PolicyConfig,
        readings: Readings,
        *,
        battery: SimulatedBattery | None = None,
        on_switch: Callable[[str | None, str, Reason], None] | None = None,
    ) -> None:
        self.pool = pool
        self.agg = agg
        self.clock = clock
        self.options = options
        self.battery = battery
        self.on_switch = on_switch
        self._lock = threading.Lock()
        self._ewma = Ewma(options.complexity_ewma_alpha)
        self._last_estimate = -1e18
        self._latencies: collections.deque[float] = collections.deque(maxlen=64)
        self._state: PolicyState | None = None
        self._active: str | None = None
        # Inputs that change slowly; each change bumps ``_inputs`` so the cache misses.
        self._policy = policy
        self._readings = readings
        self._pinned: str | None = None
        self._inputs = 0
        self._cache: tuple[tuple[int, int], float, str, Reason] | None = None
        self._infos: tuple[tuple[int, int, str | None, float], tuple[VariantInfo, ...]] = (
            (-1, -1, None, -1.0), ())
        # This device's profiles (variant → profile), replaced whole by the loop thread.
        self._profiles: dict[str, VariantProfile] = {}
        self._profiles_version = 0
        # Requests in flight and the last one's arrival: the profiler yields to them.
        self.activity = Activity()
        # Copies a sampled share of requests for shadow evaluation (never waits).
        self.shadow: ShadowEvaluator | None = None
        # Lifetime mode (``battery_life_target_h``): its state, and whether it picked last.
        self.lifetime = Lifetime()
        self._lifetime_on = False
        self._lifetime_warned = False
        # (pool version, whether its servable set allows the confidence cascade)
        self._cascade_set: tuple[int, bool] = (-1, False)
        # Variants under shadow evaluation: lifetime mode does not bet the charge on them.
        self._evaluating: frozenset[str] = frozenset()

    # -- inputs (loop thread) -------------------------------------------------------------
    def update(self, *, readings: Readings | None = None, policy: PolicyConfig | None = None,
               pinned: str | object | None = _UNSET) -> None:
        """Set any of the slowly changing inputs (``pinned=None`` unpins)."""
        with self._lock:
            if readings is not None:
                self._readings = readings
            if policy is not None:
                self._policy = policy
            if pinned is not _UNSET:
                assert pinned is None or isinstance(pinned, str)
                self._pinned = pinned
            self._inputs += 1

    def set_profiles(self, profiles: dict[str, VariantProfile]) -> None:
        """This device's measured profiles: the policy orders by them and the battery
        drains by their energy."""
        with self._lock:
            self._profiles = dict(profiles)
            self._profiles_version += 1
            self._inputs += 1

    def set_evaluating(self, names: Iterable[str]) -> None:
        """The variants a rollout is evaluating now (lifetime mode leaves them out of its
        mix while another variant can serve)."""
        with self._lock:
            self._evaluating = frozenset(names)
            self._inputs += 1

    @property
    def profiles(self) -> dict[str, VariantProfile]:
        return self._profiles

    def set_options(self, options: ServingOptions) -> None:
        with self._lock:
            self.options = options
            self._inputs += 1

    @property
    def readings(self) -> Readings:
        return self._readings

    @property
    def policy(self) -> PolicyConfig:
        return self._policy

    @property
    def pinned(self) -> str | None:
        return self._pinned

    @property
    def active(self) -> str | None:
        return self._active

    # -- the request path (any thread) -----------------------------------------------------
    def predict(self, x: np.ndarray, label: int | None = None) -> Served:
        """Serve one request (N inputs) on the variant the policy picks."""
        self.activity.begin()
        try:
            if self.options.cascade.enabled and self._cascade_applies() \
                    and not self._lifetime_on:
                served, used = self._predict_cascade(x)
            else:
                served = self.pool.run(x, self.choose)
                used = [(served.variant, served.latency_ms)]
        finally:
            self.activity.end()
        with self._lock:
            self._latencies.append(served.latency_ms)
        correct = None if label is None else bool(served.label == int(label))
        self.agg.record_request(served.variant, served.latency_ms, True, correct)
        if self.shadow is not None:
            self.shadow.offer(x)
        joules = self._energy(used, served.logits.shape[0])
        if self.battery is not None:
            self.battery.consume(joules)
        if self._policy.battery_life_target_h is not None:
            with self._lock:
                self.lifetime.served(self.clock.monotonic(), served.variant,
                                     served.logits.shape[0], joules)
        return served

    def _charge(self) -> tuple[float, float] | None:
        """(remaining, capacity) in joules: the simulated battery's own, else the gauge's
        percentage of ``battery_capacity_wh``; None when unknown."""
        if self.battery is not None:
            return self.battery.energy_j, self.battery.capacity_j
        wh, percent = self._policy.battery_capacity_wh, self._readings.battery_percent
        if wh is None or percent is None:
            return None
        return wh * 3600.0 * percent / 100.0, wh * 3600.0

    def _lifetime_pick(self, now: float, table: tuple[VariantInfo, ...]) -> str | None:
        """The variant lifetime mode wants now, or None (off, charging, past the target,
        nothing to plan with). Lock held."""
        target_h = self._policy.battery_life_target_h
        r = self._readings
        # The time on battery counts whether or not the mode is on (it may be set later).
        on_battery = (self.battery is not None or r.battery_percent is not None) and (
            r.charging is not True)
        if target_h is None:
            self.lifetime.power(now, on_battery, None)
            return None
        charge = self._charge()
        if charge is None and r.battery_percent is not None and not self._lifetime_warned:
            self._lifetime_warned = True
            log.warning("lifetime mode: the battery gives a percentage only; set "
                        "[policy] battery_capacity_wh to plan (battery thresholds apply)")
        self.lifetime.power(now, on_battery, charge[0] if charge else None)
        if charge is None or not on_battery:
            return None
        options = []
        for v in table:
            if v.accuracy is None:
                continue
            if v.energy_mj is not None:
                joules = v.energy_mj / 1000.0
            else:
                ms = v.measured_latency_ms or v.latency_ms
                if ms is None:
                    continue
                joules = estimate_j(ms / 1000.0, self.options.active_power_w)
            options.append(Option(v.name, joules, v.accuracy))
        settled = [o for o in options if o.name not in self._evaluating]
        options = settled or options
        plans = self.lifetime.plans
        pick = self.lifetime.pick(now, options, charge[0], charge[1], target_h * 3600.0,
                                  self._active, self._policy.min_dwell_s)
        if pick is not None and self.lifetime.plans != plans:
            log.debug("lifetime plan: %s (budget %.4g J/inference, %.4g h left, %.3g/s, "
                      "idle %.3g W%s)", ", ".join(f"{n} {s:.0%}" for n, s in pick.mix.shares),
                      pick.mix.budget_j, pick.time_left_s / 3600.0, pick.rate_hz, pick.idle_w,
                      "" if pick.mix.reachable else "; target out of reach")
        return None if pick is None else pick.variant

    def _energy(self, used: list[tuple[str, float]], n: int) -> float:
        """Joules the request took: each variant's profiled energy per inference, or, for
        one not profiled yet, its inference time times the active power (an estimate, and
        telemetry says so)."""
        total = 0.0
        specs, profiles = self.pool.specs, self._profiles
        for name, ms in used:
            spec, prof = specs.get(name), profiles.get(name)
            if prof is not None and spec is not None and prof.sha256 == spec.sha256:
                joules = prof.energy_mj / 1000.0 * n
                self.agg.record_energy(joules, prof.energy_source)
            else:
                joules = estimate_j(ms / 1000.0, self.options.active_power_w)
                self.agg.record_energy(joules, "cpu_time_estimate")
            total += joules
        return total

    def _predict_cascade(self, x: np.ndarray) -> tuple[Served, list[tuple[str, float]]]:
        """The cheapest variant first; escalate to the policy's budget for a hard input
        when any answer in the batch is less confident than the threshold."""
        specs = self.pool.servable
        if not specs or not self.pool.table:
            raise NoVariantError("no variant installed yet")
        x = self.pool.check_input(x, next(iter(specs.values())))
        budget, why = self.choose(x, specs, complexity=1.0)
        if why == Reason.PINNED:  # a pin wins: the pinned variant answers everything
            lv = self.pool.resolve(budget)
            y, ms = self.pool.infer(lv, x)
            reason = why if lv.name == budget else Reason.FALLBACK
            return Served(lv.name, reason, y, ms), [(lv.name, ms)]
        with self._lock:
            state = self._state
        critical = state is not None and state.levels.critical
        plan = plan_cascade(self._table(specs), budget, critical=critical)
        first = self.pool.resolve(plan.first)
        y, ms = self.pool.infer(first, x)
        if plan.escalate_to is None or not plan.escalates(
                _min_confidence(y), self.options.cascade.confidence):
            return Served(first.name, Reason.COMPLEXITY_LOW, y, ms), [(first.name, ms)]
        top = self.pool.resolve(plan.escalate_to)
        if top.name == first.name:
            return Served(first.name, Reason.COMPLEXITY_LOW, y, ms), [(first.name, ms)]
        y2, ms2 = self.pool.infer(top, x)
        return (Served(top.name, Reason.CASCADE, y2, ms + ms2),
                [(first.name, ms), (top.name, ms2)])

    def _cascade_applies(self) -> bool:
        """Whether the installed set allows the cascade (:func:`cascade_applies`), once per
        change of the set."""
        seen, applies = self._cascade_set
        version = self.pool.version  # before the set: a newer set is checked again next time
        if seen != version:
            applies = cascade_applies(self.pool.servable.values())
            self._cascade_set = (version, applies)
        return applies

    def _table(self, specs: dict[str, VariantSpec]) -> tuple[VariantInfo, ...]:
        """The policy's table: this device's figures where it has them, without variants
        another one beats on both latency and accuracy here (a pinned one stays)."""
        margin = self._policy.accuracy_margin_pp / 100.0
        key = (self.pool.version, self._profiles_version, self._pinned, margin)
        cached, infos = self._infos
        if cached != key:
            profiles = self._profiles
            infos = order_variants(drop_dominated(
                (VariantInfo.from_spec(s, profiles.get(s.name)) for s in specs.values()),
                keep=self._pinned, margin=margin))
            self._infos = (key, infos)
        return infos

    def choose(
        self, x: np.ndarray, specs: dict[str, VariantSpec], complexity: float | None = None
    ) -> tuple[str, Reason]:
        """The policy's choice for ``x`` (a :data:`~prunefleet.agent.runtime.Chooser`)."""
        now = self.clock.monotonic()
        with self._lock:
            if complexity is None:
                # The smoothed complexity follows the stream, not one input: under load it
                # is sampled (at most one estimate per ``complexity_min_interval_s``).
                if (now - self._last_estimate >= self.options.complexity_min_interval_s
                        or self._ewma.value is None):
                    self._last_estimate = now
                    complexity = self._ewma.update(estimate_complexity(x))
                else:
                    complexity = self._ewma.value
            key = (self._inputs, self.pool.version)
            c = self._cache
            if c is not None and c[0] == key and now - c[1] < self.options.policy_eval_interval_s:
                return c[2], c[3]
            lat = None
            if self._policy.latency_slo_ms is not None and self._latencies:
                lat = statistics.median(self._latencies)
            table = self._table(specs)
            life = self._lifetime_pick(now, table)
            self._lifetime_on = life is not None
            d = decide(self._readings, table, complexity, lat, self._pinned,
                       self._state, now, self._policy, lifetime=life)
            self._state = d.state
            old = self._active
            if d.variant != old:
                self._active = d.variant
                self._latencies.clear()  # the SLO check wants the new variant's latency
            self._cache = (key, now, d.variant, d.reason)
        if d.variant != old:
            self.agg.record_switch(self.clock.time(), old, d.variant, d.reason)
            log.info("switch %s → %s (%s)", old, d.variant, d.reason.value)
            if self.on_switch is not None:
                self.on_switch(old, d.variant, d.reason)
        return d.variant, d.reason


def _min_confidence(logits: np.ndarray) -> float:
    z = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    return float(p.max(axis=1).min())
