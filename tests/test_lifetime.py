"""Lifetime mode (issue #11): the mix of variants with the highest expected accuracy that
lasts until a target time on battery.

The planner and its scheduler are pure (table tests); the request path re-plans on a fake
clock as the request rate changes; the policy composes the mix with its other rules; the
target travels as a policy override (manifest, CLI) like any other setting.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from prunefleet.agent.config import CascadeConfig
from prunefleet.agent.follower import Follow, ManifestFollower
from prunefleet.agent.lifetime import (
    Lifetime,
    MixScheduler,
    Option,
    RateMeter,
    per_inference_budget,
    plan_mix,
    upper_hull,
)
from prunefleet.agent.policy import VariantInfo, decide
from prunefleet.agent.runtime import ModelPool
from prunefleet.agent.sensors import Readings, SimulatedBattery
from prunefleet.agent.serving import RequestPath, ServingOptions
from prunefleet.agent.simulated import SimulatedEngine
from prunefleet.agent.telemetry import Aggregator
from prunefleet.shared import chunks
from prunefleet.shared.clock import FakeClock
from prunefleet.shared.messages import Manifest, Reason, VariantSpec
from prunefleet.shared.policy import PolicyConfig, PolicyOverrideError, apply_overrides
from prunefleet.shared.signing import SigningKey, TrustedKeys

SMALL, MEDIUM, LARGE = Option("small", 0.002, 0.90), Option("medium", 0.004, 0.95), Option(
    "large", 0.008, 0.97)
OPTS = [SMALL, MEDIUM, LARGE]
HOUR = 3600.0

# -- the hull ------------------------------------------------------------------------------


@pytest.mark.parametrize("options, hull", [
    ([SMALL, MEDIUM, LARGE], ["small", "medium", "large"]),
    # Dearer and less accurate than medium: never worth serving.
    ([SMALL, MEDIUM, Option("worse", 0.006, 0.94), LARGE], ["small", "medium", "large"]),
    # Below the segment small-large: mixing those two beats it at its own energy.
    ([SMALL, Option("dull", 0.005, 0.92), LARGE], ["small", "large"]),
    # On the segment: no better than the mix either.
    ([SMALL, Option("flat", 0.005, 0.935), LARGE], ["small", "large"]),
    # Same energy: the more accurate one only; same accuracy: the cheaper one only.
    ([SMALL, Option("twin", 0.002, 0.89), LARGE], ["small", "large"]),
    ([SMALL, Option("same", 0.003, 0.90), LARGE], ["small", "large"]),
    # The cheapest is the most accurate: nothing else is worth its energy.
    ([Option("best", 0.001, 0.99), MEDIUM, LARGE], ["best"]),
    ([LARGE], ["large"]),
])
def test_the_hull_keeps_only_variants_worth_mixing(options, hull) -> None:
    assert [o.name for o in upper_hull(options)] == hull
    assert [o.name for o in upper_hull(reversed(options))] == hull


# -- the plan ------------------------------------------------------------------------------


def _budget_charge(joules_per_inference: float, rate: float = 10.0, hours: float = 1.0,
                   idle_w: float = 0.0) -> float:
    """The charge that allows exactly this much energy per inference."""
    return joules_per_inference * rate * hours * HOUR + idle_w * hours * HOUR


@pytest.mark.parametrize("per_inference, idle_w, shares, reachable", [
    # Plenty: the most accurate variant all the time.
    (0.050, 0.0, {"large": 1.0}, True),
    (0.008, 0.0, {"large": 1.0}, True),
    # Between two adjacent hull variants: the mix that spends exactly the budget.
    (0.006, 0.0, {"medium": 0.5, "large": 0.5}, True),
    (0.007, 0.0, {"medium": 0.25, "large": 0.75}, True),
    (0.003, 0.0, {"small": 0.5, "medium": 0.5}, True),
    (0.004, 0.0, {"medium": 1.0}, True),
    # The same budget after idle power takes its share of the charge.
    (0.006, 0.5, {"medium": 0.5, "large": 0.5}, True),
    # Even the cheapest all the time does not last: the cheapest, and the plan says so.
    (0.001, 0.0, {"small": 1.0}, False),
])
def test_the_plan_is_the_most_accurate_mix_that_lasts(per_inference, idle_w, shares,
                                                      reachable) -> None:
    charge = _budget_charge(per_inference, idle_w=idle_w)
    mix = plan_mix(OPTS, charge, idle_w, 10.0, HOUR)
    assert dict(mix.shares) == pytest.approx(shares)
    assert mix.reachable is reachable
    assert sum(s for _, s in mix.shares) == pytest.approx(1.0)
    if reachable and len(mix.shares) == 2:  # spends the whole budget, no more
        assert mix.energy_j == pytest.approx(per_inference)
    # No single variant that lasts is more accurate than the mix.
    lasting = [o.accuracy for o in OPTS if o.energy_j <= mix.budget_j + 1e-12]
    assert mix.accuracy >= max(lasting, default=0.0) - 1e-12


def test_idle_power_alone_past_the_charge_leaves_the_cheapest() -> None:
    mix = plan_mix(OPTS, remaining_j=100.0, idle_w=1.0, rate_hz=10.0, time_left_s=HOUR)
    assert (mix.names, mix.reachable) == (("small",), False)
    assert mix.budget_j < 0


def test_without_requests_or_time_anything_lasts() -> None:
    assert per_inference_budget(10.0, 0.0, 0.0, HOUR) == math.inf
    assert per_inference_budget(10.0, 0.0, 5.0, 0.0) == math.inf
    assert plan_mix(OPTS, 10.0, 0.0, 0.0, HOUR).names == ("large",)


# -- the deficit counter -------------------------------------------------------------------


@pytest.mark.parametrize("share_large, hold", [(0.5, 5.0), (0.75, 5.0), (0.1, 3.0),
                                                (0.9, 10.0)])
def test_the_scheduler_serves_the_planned_shares_in_runs(share_large, hold) -> None:
    mix = plan_mix(OPTS, _budget_charge(0.004 + 0.004 * share_large), 0.0, 10.0, HOUR)
    assert mix.share("large") == pytest.approx(share_large)
    s = MixScheduler()
    s.set_mix(mix, hold)
    served, current, runs = [], None, []
    for _ in range(4000):
        current = s.pick(current)
        s.served(current)
        if not runs or runs[-1][0] != current:
            runs.append([current, 0])
        runs[-1][1] += 1
        served.append(current)
    counts = Counter(served)
    assert counts["large"] / 4000 == pytest.approx(share_large, abs=2 * hold / 4000 + 1e-9)
    # Runs, not alternation: the shorter one lasts about 2 * hold requests.
    assert min(n for _, n in runs[1:-1]) >= 2 * hold - 1
    # Deterministic: the same again.
    s2 = MixScheduler()
    s2.set_mix(mix, hold)
    again, current = [], None
    for _ in range(4000):
        current = s2.pick(current)
        s2.served(current)
        again.append(current)
    assert again == served


def test_a_request_outside_the_mix_counts_for_nothing() -> None:
    s = MixScheduler()
    s.set_mix(plan_mix(OPTS, _budget_charge(0.006), 0.0, 10.0, HOUR), 2.0)
    before = s.deficits
    s.served("small", 5)
    assert s.deficits == before


def test_the_rate_is_counted_per_window_and_smoothed() -> None:
    m = RateMeter(window_s=5.0, alpha=0.5, warmup_s=1.0)
    assert m.rate(0.0) is None
    for i in range(50):  # 10/s
        m.add(i * 0.1)
    assert m.rate(4.95) == pytest.approx(50 / 4.95)
    for i in range(50, 150):  # 20/s from t = 5
        m.add(5.0 + (i - 50) * 0.05)
    assert m.rate(10.0) == pytest.approx(0.5 * 20 + 0.5 * 10)
    # A long silence decays it.
    assert m.rate(120.0) < 0.001


# -- the policy composes the pick with its other rules -------------------------------------

TABLE = (VariantInfo("small", 1_000, 0.90), VariantInfo("medium", 4_000, 0.95),
         VariantInfo("large", 16_000, 0.97))
FULL = Readings(battery_percent=90.0, charging=False, cpu_percent=10.0,
                mem_available_percent=50.0, temperature_c=40.0, ts=0.0)
NO_DWELL = PolicyConfig(min_dwell_s=0.0)


def _decide(readings: Readings = FULL, lifetime: str | None = None, state=None, now=0.0,
            pinned: str | None = None, complexity: float = 1.0):
    return decide(readings, TABLE, complexity, None, pinned, state, now, NO_DWELL,
                  lifetime=lifetime)


@pytest.mark.parametrize("readings, lifetime, pinned, complexity, variant", [
    # The mix replaces the battery thresholds: low and even critical.
    (dataclasses.replace(FULL, battery_percent=20.0), "large", None, 1.0, "large"),
    (dataclasses.replace(FULL, battery_percent=5.0), "large", None, 1.0, "large"),
    (FULL, "small", None, 1.0, "small"),
    # ... and the complexity step.
    (FULL, "large", None, 0.0, "large"),
    # Thermal and CPU limits cap it (at most one step below the dearest).
    (dataclasses.replace(FULL, temperature_c=90.0), "large", None, 1.0, "medium"),
    (dataclasses.replace(FULL, cpu_percent=95.0), "small", None, 1.0, "small"),
    # A pin wins.
    (FULL, "small", "large", 1.0, "large"),
    # Without a pick the battery thresholds apply as before.
    (dataclasses.replace(FULL, battery_percent=20.0), None, None, 1.0, "medium"),
    # A pick not in the table is ignored.
    (FULL, "gone", None, 1.0, "large"),
])
def test_the_policy_composes_the_mix_with_its_other_rules(readings, lifetime, pinned,
                                                          complexity, variant) -> None:
    assert _decide(readings, lifetime, pinned=pinned, complexity=complexity).variant == variant


def test_a_move_of_the_mix_says_battery_lifetime_and_waits_for_the_dwell() -> None:
    d = decide(FULL, TABLE, 1.0, None, None, None, 0.0, PolicyConfig(min_dwell_s=2.0),
               lifetime="large")
    d = decide(FULL, TABLE, 1.0, None, None, d.state, 1.0, PolicyConfig(min_dwell_s=2.0),
               lifetime="medium")
    assert d.variant == "large"  # within the dwell
    d = decide(FULL, TABLE, 1.0, None, None, d.state, 2.5, PolicyConfig(min_dwell_s=2.0),
               lifetime="medium")
    assert (d.variant, d.reason) == ("medium", Reason.BATTERY_LIFETIME)
    d = _decide(lifetime="large", state=d.state, now=3.0)
    assert (d.variant, d.reason) == ("large", Reason.BATTERY_LIFETIME)
    # Lifetime mode ends (past the target) with the battery low: the thresholds again.
    d = _decide(dataclasses.replace(FULL, battery_percent=20.0), None, d.state, 4.0)
    assert (d.variant, d.reason) == ("medium", Reason.BATTERY_LOW)


def test_a_low_battery_explains_nothing_in_lifetime_mode() -> None:
    d = _decide(lifetime="large")
    d = _decide(dataclasses.replace(FULL, battery_percent=20.0), "medium", d.state, 1.0)
    assert (d.variant, d.reason) == ("medium", Reason.BATTERY_LIFETIME)


# -- the request path re-plans as the rate changes -----------------------------------------


def _spec(name: str, macs: int, latency_ms: float, accuracy: float) -> VariantSpec:
    p = chunks.plan(name.encode() * 600, 1024)
    return VariantSpec(name=name, sha256=p.sha256, size=p.size, chunk_bytes=1024,
                       chunk_sha256=list(p.chunk_sha256), input_shape=[1, 1, 8, 8],
                       num_classes=10, params=macs, macs=macs, accuracy=accuracy,
                       latency_ms=latency_ms)


# With 2 W per busy core: 2, 4 and 8 mJ per inference (the estimate from latency).
SPECS = [_spec("small", 1_000, 1.0, 0.90), _spec("medium", 4_000, 2.0, 0.95),
         _spec("large", 16_000, 4.0, 0.97)]
X = np.random.default_rng(0).normal(0, 1, (1, 1, 8, 8)).astype(np.float32)


class Device:
    """A request path on simulated variants with a simulated battery, on a fake clock."""

    def __init__(self, policy: PolicyConfig, capacity_j: float, *, charging: bool = False,
                 percent: float = 100.0,
                 cascade: CascadeConfig = CascadeConfig(enabled=False)) -> None:
        """The cascade is off unless asked for: what the thresholds serve outside lifetime
        mode is then one variant, which the tests compare with the mix."""
        self.clock = FakeClock()
        engine = SimulatedEngine(active_power_w=2.0)
        self.pool = ModelPool(engine=engine)
        for spec in SPECS:
            self.pool.put(engine.load(Path("unused"), spec))
        self.battery = SimulatedBattery(capacity_j, percent, charging=charging,
                                        clock=self.clock)
        self.switches: list[tuple[float, str, Reason]] = []
        self.path = RequestPath(
            self.pool, Aggregator("dev-1", self.clock.time()), self.clock,
            ServingOptions(cascade=cascade, active_power_w=2.0,
                           policy_eval_interval_s=0.0),
            policy, self.readings(), battery=self.battery,
            on_switch=lambda old, new, why: self.switches.append(
                (self.clock.monotonic(), new, why)))

    def readings(self) -> Readings:
        return Readings(battery_percent=self.battery.percent, charging=self.battery.charging,
                        cpu_percent=10.0, mem_available_percent=50.0, temperature_c=40.0,
                        ts=self.clock.time())

    def serve(self, seconds: float, rate: float) -> Counter:
        served: Counter = Counter()
        next_read = self.clock.monotonic()
        end = self.clock.monotonic() + seconds
        while self.clock.monotonic() < end - 1e-9:
            if self.clock.monotonic() >= next_read:
                self.path.update(readings=self.readings())
                next_read += 1.0
            served[self.path.predict(X).variant] += 1
            self.clock.advance(1.0 / rate)
        return served


def _shares(c: Counter) -> dict[str, float]:
    n = sum(c.values())
    return {k: round(v / n, 2) for k, v in sorted(c.items())}


def test_the_agent_plans_again_when_the_request_rate_changes() -> None:
    # One hour on a charge of 6 mJ per request at 10/s: medium and large half and half.
    target_h = 1.0
    dev = Device(PolicyConfig(battery_life_target_h=target_h), _budget_charge(0.006))
    t0 = dev.clock.monotonic()
    first = dev.serve(300.0, rate=10.0)
    plan = dev.path.lifetime.plan
    assert plan is not None and plan.mix.names == ("medium", "large")
    assert plan.mix.share("large") == pytest.approx(0.5, abs=0.03)
    assert _shares(first)["medium"] == pytest.approx(0.5, abs=0.05)
    assert {why for _, _, why in dev.switches[1:]} == {Reason.BATTERY_LIFETIME}
    # Twice the requests: the same charge now allows about half the energy per request.
    plans = dev.path.lifetime.plans
    dev.serve(60.0, rate=20.0)  # the smoothed rate follows
    before = dev.battery.energy_j
    second = dev.serve(300.0, rate=20.0)
    drain_w = (before - dev.battery.energy_j) / 300.0
    assert dev.path.lifetime.plans > plans
    plan = dev.path.lifetime.plan
    assert plan is not None and plan.mix.names == ("small", "medium")
    assert set(second) == {"small", "medium"}
    assert _shares(second)["small"] == pytest.approx(plan.mix.share("small"), abs=0.08)
    # At this pace the charge lasts until the target.
    left_h = target_h - (dev.clock.monotonic() - t0) / HOUR
    assert dev.battery.energy_j / drain_w / HOUR == pytest.approx(left_h, rel=0.05)


def test_charging_turns_lifetime_mode_off() -> None:
    dev = Device(PolicyConfig(battery_life_target_h=1.0), _budget_charge(0.003),
                 charging=True)
    assert set(dev.serve(30.0, rate=10.0)) == {"large"}
    assert dev.path.lifetime.plan is None
    dev.battery.charging = False
    dev.serve(60.0, rate=10.0)
    plan = dev.path.lifetime.plan
    assert plan is not None and plan.mix.names == ("small", "medium")
    assert set(dev.serve(60.0, rate=10.0)) == {"small", "medium"}


def test_past_the_target_the_battery_thresholds_apply() -> None:
    dev = Device(PolicyConfig(battery_life_target_h=0.01), _budget_charge(0.006), percent=20.0)
    dev.serve(40.0, rate=10.0)  # 36 s target
    assert dev.path.lifetime.plan is None
    assert dev.serve(5.0, rate=10.0) == Counter({"medium": 50})  # battery low: the middle


def test_the_target_counts_from_when_the_device_went_on_battery() -> None:
    dev = Device(PolicyConfig(), _budget_charge(0.006))
    dev.serve(600.0, rate=10.0)  # ten minutes on battery before the target is set
    dev.path.update(policy=PolicyConfig(battery_life_target_h=1.0))
    dev.serve(10.0, rate=10.0)
    plan = dev.path.lifetime.plan
    assert plan is not None and plan.time_left_s == pytest.approx(3000.0, abs=15.0)


def test_a_variant_under_evaluation_is_left_out_of_the_mix() -> None:
    dev = Device(PolicyConfig(battery_life_target_h=1.0), _budget_charge(0.006))
    dev.path.set_evaluating(["large"])
    assert set(dev.serve(60.0, rate=10.0)) <= {"large", "medium"}  # large: before the plan
    assert set(dev.serve(60.0, rate=10.0)) == {"medium"}
    dev.path.set_evaluating([])
    assert set(dev.serve(60.0, rate=10.0)) == {"medium", "large"}


def test_without_the_target_nothing_changes() -> None:
    dev = Device(PolicyConfig(), _budget_charge(0.003))
    assert set(dev.serve(30.0, rate=10.0)) == {"large"}
    assert dev.path.lifetime.plans == 0


def test_the_idle_drain_is_estimated_from_what_the_battery_lost() -> None:
    life = Lifetime(idle_after_s=10.0)
    life.power(0.0, True, 1000.0)
    life.served(5.0, "small", 10, 2.0)
    assert life.idle_w(5.0, 990.0) == 0.0  # too early to tell
    assert life.idle_w(20.0, 900.0) == pytest.approx((100.0 - 2.0) / 20.0)


# -- the target is a policy setting like the others ----------------------------------------


def test_the_target_is_an_override_and_is_checked() -> None:
    base = PolicyConfig()
    assert base.battery_life_target_h is None
    assert apply_overrides(base, {"battery_life_target_h": 8}).battery_life_target_h == 8.0
    p = apply_overrides(PolicyConfig(battery_life_target_h=8.0), {"battery_life_target_h": None})
    assert p.battery_life_target_h is None
    for bad in (0, -1, "soon"):
        with pytest.raises(PolicyOverrideError, match="battery_life_target_h"):
            apply_overrides(base, {"battery_life_target_h": bad})


def test_a_group_manifest_sets_the_target() -> None:
    key, now = SigningKey.generate(), 1_700_000_000.0
    spec = SPECS[0]
    m = Manifest(target="field", version=2, issued_at=now - 60, expires_at=now + 3600,
                 variants=[spec], policy={"battery_life_target_h": 6.5,
                                          "battery_capacity_wh": 20.0})
    f = ManifestFollower(TrustedKeys([key.public]), "dev-1", "field", PolicyConfig(), None)
    v = f.offer(key.sign(m), "group", now)
    assert isinstance(v, Follow)
    assert (v.policy.battery_life_target_h, v.policy.battery_capacity_wh) == (6.5, 20.0)


def test_the_admin_cli_takes_the_target() -> None:
    from prunefleet.server.admin import UsageError, _policy_overrides

    assert _policy_overrides(["battery_life_target_h=8"]) == {"battery_life_target_h": 8}
    assert _policy_overrides(["battery_life_target_h=null"]) == {"battery_life_target_h": None}
    with pytest.raises(UsageError, match="battery_life_target_h"):
        _policy_overrides(["battery_life_target_h=0"])


def test_while_lifetime_mode_picks_the_cascade_is_not_used() -> None:
    dev = Device(PolicyConfig(battery_life_target_h=1.0), _budget_charge(0.006),
                 cascade=CascadeConfig())  # the default: on where the variants allow it
    dev.serve(60.0, rate=10.0)
    reasons: Counter = Counter()
    for _ in range(600):
        reasons[dev.path.predict(X).reason] += 1
        dev.clock.advance(0.1)
    assert dev.path.lifetime.plan is not None
    assert Reason.CASCADE not in reasons
    # Charging: lifetime mode is off, and the cascade serves again.
    dev.battery.charging = True
    dev.path.update(readings=dev.readings())
    assert Reason.CASCADE in {dev.path.predict(X).reason for _ in range(200)}
