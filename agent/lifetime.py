"""Lifetime mode: the mix of variants with the highest expected accuracy that lasts until a
target time on battery.

Pure parts, each with an injected ``now`` (monotonic seconds) and no clock, file or sensor:

- :func:`plan_mix`, the planner. On battery the energy a device may still spend on
  inference is the remaining charge less what everything else draws until the target
  (idle power times time left); spread over the requests expected until then (observed
  rate times time left) it is a budget per inference, ``e*``. Choosing the share of requests each
  variant serves to maximise expected accuracy with a mean energy at most ``e*`` is a
  linear programme whose optimum lies on the upper convex hull of the variants'
  (energy, accuracy) points (:func:`upper_hull`): the most accurate variant when it fits
  the budget; the cheapest variant, all the time, when even it does not (the target is
  then out of reach, and :attr:`Mix.reachable` says so); otherwise the two adjacent hull
  variants whose energies bracket ``e*``, in the proportion that spends exactly ``e*``.
- :class:`MixScheduler`, the deterministic assignment of requests to a mix: a deficit
  counter (each request credits every variant with its share and debits the one that
  served it). It stays on a variant until that variant is ``hold`` requests ahead of its
  share, then moves to the one most behind, so each run lasts about the policy's dwell time
  and over a cycle the served shares are the planned ones, without random draws.
- :class:`RateMeter`, the smoothed request rate (inferences per second, an EWMA of counts
  over fixed windows).
- :class:`Lifetime`, the state that ties them together for the request path: since when
  the device is on battery (as this agent saw it: a restart counts from the restart), the
  request rate, an estimate of the idle power (observed drain less the energy attributed
  to inference), and when to plan again: every ``replan_s``,
  when the charge fell by ``charge_step`` of the capacity since the last plan, when the
  rate moved by ``rate_step``, or when the variants changed.

The policy composes the pick with its other rules (:func:`prunefleet.agent.policy.decide`):
a pin wins; the mix replaces the battery thresholds' budget; thermal, CPU, memory and SLO
limits cap it.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = ["Lifetime", "Mix", "MixScheduler", "Option", "Pick", "RateMeter",
           "per_inference_budget", "plan_mix", "upper_hull"]


@dataclass(frozen=True)
class Option:
    """A variant as the planner sees it: joules per inference and expected accuracy."""

    name: str
    energy_j: float
    accuracy: float


@dataclass(frozen=True)
class Mix:
    """The share of requests each variant serves (cheapest first; shares sum to 1)."""

    shares: tuple[tuple[str, float], ...]
    # Joules per inference the target allows (negative: idle power alone empties the
    # battery before the target); ``inf`` when no request is expected.
    budget_j: float
    energy_j: float  # the mix's mean joules per inference
    accuracy: float  # the mix's expected accuracy
    reachable: bool  # False: even the cheapest variant all the time does not last

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(n for n, _ in self.shares)

    def share(self, name: str) -> float:
        return dict(self.shares).get(name, 0.0)


def upper_hull(options: Iterable[Option]) -> tuple[Option, ...]:
    """The variants worth mixing, cheapest first: the upper convex hull of (energy,
    accuracy) from the cheapest of the most accurate-at-its-cost to the most accurate.
    A variant costlier and no more accurate than another, or below the segment between
    two others, is never part of an optimal mix."""
    pts = sorted(options, key=lambda o: (o.energy_j, -o.accuracy, o.name))
    frontier: list[Option] = []
    for o in pts:  # Pareto: strictly more accurate as the energy grows
        if not frontier or o.accuracy > frontier[-1].accuracy:
            if frontier and o.energy_j == frontier[-1].energy_j:
                continue
            frontier.append(o)
    hull: list[Option] = []
    for o in frontier:
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # b on or below the segment a-o: never better than mixing a and o.
            left = (b.energy_j - a.energy_j) * (o.accuracy - a.accuracy)
            right = (b.accuracy - a.accuracy) * (o.energy_j - a.energy_j)
            if left - right >= -1e-9 * (abs(left) + abs(right)):  # on it: rounding
                hull.pop()
            else:
                break
        hull.append(o)
    return tuple(hull)


def per_inference_budget(remaining_j: float, idle_w: float, rate_hz: float,
                         time_left_s: float) -> float:
    """Joules per inference that spend the charge exactly at the target: what is left
    after the idle draw until then, over the inferences expected until then."""
    if time_left_s <= 0:
        return math.inf
    expected = rate_hz * time_left_s
    spendable = remaining_j - max(idle_w, 0.0) * time_left_s
    if expected <= 0:
        return math.inf if spendable >= 0 else -math.inf
    return spendable / expected


def plan_mix(options: Iterable[Option], remaining_j: float, idle_w: float, rate_hz: float,
             time_left_s: float) -> Mix:
    """The mix with the highest expected accuracy whose energy lasts ``time_left_s`` at
    ``rate_hz`` inferences per second (see the module's docstring). ``options`` must not
    be empty."""
    hull = upper_hull(options)
    if not hull:
        raise ValueError("plan_mix needs at least one option")
    e = per_inference_budget(remaining_j, idle_w, rate_hz, time_left_s)
    top, low = hull[-1], hull[0]
    if e >= top.energy_j:
        return Mix(((top.name, 1.0),), e, top.energy_j, top.accuracy, True)
    if e < low.energy_j:
        return Mix(((low.name, 1.0),), e, low.energy_j, low.accuracy, False)
    for a, b in itertools.pairwise(hull):
        if a.energy_j <= e < b.energy_j:
            hi = (e - a.energy_j) / (b.energy_j - a.energy_j)
            if hi <= 0.0:
                return Mix(((a.name, 1.0),), e, a.energy_j, a.accuracy, True)
            acc = (1 - hi) * a.accuracy + hi * b.accuracy
            return Mix(((a.name, 1 - hi), (b.name, hi)), e, e, acc, True)
    raise AssertionError("unreachable: the budget lies within the hull")  # pragma: no cover


class MixScheduler:
    """Which variant of the mix serves the next request: a deficit counter.

    ``served`` credits each variant of the mix with its share of the ``n`` inferences and
    debits the one that served them; ``pick`` keeps the current variant until it is
    ``hold`` inferences ahead of its share, then takes the one furthest behind (ties: the
    cheaper, i.e. earlier in the mix). A new mix of the same variants keeps the counters; a
    mix of other variants starts them at zero. Requests served by a variant outside the mix
    (capped by another rule) count for nothing."""

    def __init__(self) -> None:
        self.mix: Mix | None = None
        self._deficit: dict[str, float] = {}
        self._hold = 1.0

    def set_mix(self, mix: Mix, hold: float = 1.0) -> None:
        if self.mix is None or set(mix.names) != set(self._deficit):
            self._deficit = dict.fromkeys(mix.names, 0.0)
        self.mix = mix
        self._hold = max(float(hold), 1.0)

    def pick(self, current: str | None) -> str:
        assert self.mix is not None, "set_mix first"
        d = self._deficit
        if len(d) == 1:
            return next(iter(d))
        if current in d and d[current] > -self._hold:
            return current
        names = self.mix.names
        return max(names, key=lambda n: (d[n], -names.index(n)))

    def served(self, name: str, n: int = 1) -> None:
        if self.mix is None or name not in self._deficit:
            return
        bound = 2.0 * self._hold + n  # the counters never bank more than a run or two
        for k, share in self.mix.shares:
            v = self._deficit[k] + share * n - (n if k == name else 0)
            self._deficit[k] = min(max(v, -bound), bound)

    @property
    def deficits(self) -> dict[str, float]:
        return dict(self._deficit)


class RateMeter:
    """Inferences per second: counts over windows of ``window_s``, smoothed by an EWMA
    (``alpha`` per window; a window with no request counts as zero). Before the first
    window closes, the mean since the first request once ``warmup_s`` has passed."""

    def __init__(self, window_s: float = 5.0, alpha: float = 0.3, warmup_s: float = 1.0) -> None:
        self.window_s, self.alpha, self.warmup_s = window_s, alpha, warmup_s
        self._start: float | None = None
        self._count = 0
        self._value: float | None = None
        self._first: float | None = None

    def _close(self, now: float) -> None:
        if self._start is None:
            return
        elapsed = now - self._start
        if elapsed < self.window_s:
            return
        sample = self._count / self.window_s
        self._value = sample if self._value is None else (
            self.alpha * sample + (1 - self.alpha) * self._value)
        empty = int((elapsed - self.window_s) // self.window_s)  # windows with no request
        if empty:
            self._value *= (1 - self.alpha) ** min(empty, 10_000)
        self._start += self.window_s * (1 + empty)
        self._count = 0

    def add(self, now: float, n: int = 1) -> None:
        if self._start is None:
            self._start = self._first = now
        self._close(now)
        self._count += n

    def rate(self, now: float) -> float | None:
        self._close(now)
        if self._value is not None:
            return self._value
        if self._first is None or now - self._first < self.warmup_s:
            return None
        return self._count / (now - self._first)


@dataclass(frozen=True)
class Pick:
    """What lifetime mode wants served now, and the plan behind it."""

    variant: str
    mix: Mix
    time_left_s: float
    rate_hz: float
    idle_w: float


class Lifetime:
    """Lifetime mode's state for the request path. Call :meth:`power` with each reading,
    :meth:`served` after each request, and :meth:`pick` to get the variant to serve (None:
    lifetime mode has nothing to say: off, charging, past the target, rate not known yet,
    or no variant with both an energy and an accuracy figure)."""

    def __init__(self, *, replan_s: float = 30.0, charge_step: float = 0.01,
                 rate_step: float = 0.1, idle_after_s: float = 60.0,
                 rate: RateMeter | None = None) -> None:
        self.replan_s, self.charge_step, self.rate_step = replan_s, charge_step, rate_step
        self.idle_after_s = idle_after_s
        self.meter = rate or RateMeter()
        self.scheduler = MixScheduler()
        self.on_battery_since: float | None = None
        self.plan: Pick | None = None
        self.plans = 0  # how many times it planned (tests, logs)
        self._key: tuple | None = None
        self._planned_at = -math.inf
        self._planned_charge = math.inf
        self._planned_rate = 0.0
        # Idle estimate: charge and inference energy when the device went on battery.
        self._start_charge: float | None = None
        self._charge_since = 0.0
        self._inference_j = 0.0

    def power(self, now: float, on_battery: bool, remaining_j: float | None) -> None:
        """The device is (still) on battery, with ``remaining_j`` joules if known, or not."""
        if not on_battery:
            self.on_battery_since = None
            self.plan = None
            self._start_charge = None
            return
        if self.on_battery_since is None:
            self.on_battery_since = now
            self.plan = None
        if self._start_charge is None and remaining_j is not None:
            # The idle estimate counts from the first known charge on battery.
            self._start_charge, self._charge_since = remaining_j, now
            self._inference_j = 0.0

    def served(self, now: float, variant: str, n: int, joules: float) -> None:
        self.meter.add(now, n)
        self._inference_j += joules
        self.scheduler.served(variant, n)

    def idle_w(self, now: float, remaining_j: float) -> float:
        """What the battery lost to anything but inference, per second, since the device
        went on battery (0 until ``idle_after_s`` has passed: a gauge's steps are coarse)."""
        if self.on_battery_since is None or self._start_charge is None:
            return 0.0
        elapsed = now - self._charge_since
        if elapsed < self.idle_after_s:
            return 0.0
        return max(self._start_charge - remaining_j - self._inference_j, 0.0) / elapsed

    def pick(self, now: float, options: Sequence[Option], remaining_j: float,
             capacity_j: float, target_s: float, current: str | None,
             hold_s: float) -> Pick | None:
        """The variant to serve now under a target of ``target_s`` on battery; plans again
        when due. ``hold_s``: the least time a run of one variant should last (the dwell)."""
        if self.on_battery_since is None or not options:
            return None
        time_left = target_s - (now - self.on_battery_since)
        rate = self.meter.rate(now)
        if time_left <= 0 or rate is None:
            self.plan = None
            return None
        key = (*sorted(options, key=lambda o: o.name), target_s)
        if (self.plan is None or key != self._key or now - self._planned_at >= self.replan_s
                or self._planned_charge - remaining_j >= self.charge_step * capacity_j
                or abs(rate - self._planned_rate) > self.rate_step * max(self._planned_rate,
                                                                         1e-9)):
            idle = self.idle_w(now, remaining_j)
            mix = plan_mix(options, remaining_j, idle, rate, time_left)
            # Runs of about ``hold_s`` for the variant with the smaller share.
            hold = 0.5 * rate * hold_s * max(s for _, s in mix.shares)
            self.scheduler.set_mix(mix, hold)
            self.plan = Pick(mix.names[0], mix, time_left, rate, idle)
            self.plans += 1
            self._key, self._planned_at = key, now
            self._planned_charge, self._planned_rate = remaining_j, rate
        assert self.plan is not None
        variant = self.scheduler.pick(current)
        return Pick(variant, self.plan.mix, time_left, rate, self.plan.idle_w)
