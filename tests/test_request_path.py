"""RequestPath: the thread-safe request path around the policy.

Simulated inference (no ONNX Runtime) and a fake clock: many threads at once lose no
request and keep the smoothed complexity sane; the policy's short cache is invalidated by
a change of input and otherwise holds until the clock passes the interval; a pin acts at
once. These run with the confidence cascade off, so the input's own statistics estimate
complexity; the cascade's default (on where the variant set allows it) is tested last.
"""

from __future__ import annotations

import dataclasses
import math
import threading
from pathlib import Path

import numpy as np
import pytest

from prunefleet.agent.complexity import estimate_complexity
from prunefleet.agent.config import CascadeConfig
from prunefleet.agent.runtime import ModelPool
from prunefleet.agent.sensors import Readings, SimulatedBattery
from prunefleet.agent.serving import RequestPath, ServingOptions
from prunefleet.agent.simulated import SimulatedEngine
from prunefleet.agent.telemetry import Aggregator
from prunefleet.shared import chunks
from prunefleet.shared.clock import FakeClock
from prunefleet.shared.messages import Reason, VariantProfile, VariantSpec
from prunefleet.shared.policy import PolicyConfig


def _spec(name: str, macs: int, latency_ms: float, accuracy: float = 0.9) -> VariantSpec:
    p = chunks.plan(name.encode() * 600, 1024)
    return VariantSpec(name=name, sha256=p.sha256, size=p.size, chunk_bytes=1024,
                       chunk_sha256=list(p.chunk_sha256), input_shape=[1, 1, 8, 8],
                       num_classes=10, params=macs, macs=macs, accuracy=accuracy,
                       latency_ms=latency_ms)


SPECS = [_spec("small", 1_000, 1.0), _spec("medium", 4_000, 2.0), _spec("large", 16_000, 4.0)]
HARD = np.random.default_rng(0).normal(0, 1, (1, 1, 8, 8)).astype(np.float32)
EASY = np.zeros((1, 1, 8, 8), np.float32)
CALM = Readings(battery_percent=80.0, charging=False, cpu_percent=10.0,
                mem_available_percent=50.0, temperature_c=40.0, ts=0.0)


def readings(**kw: float | bool | None) -> Readings:
    return dataclasses.replace(CALM, **kw)  # type: ignore[arg-type]


class Rig:
    """A RequestPath on a pool of simulated variants; ``switches`` records ``on_switch``."""

    def __init__(self, *, policy: PolicyConfig | None = None, eval_interval_s: float = 10.0,
                 complexity_interval_s: float = 0.0, alpha: float = 1.0,
                 specs: list[VariantSpec] = SPECS,
                 cascade: CascadeConfig = CascadeConfig(enabled=False)) -> None:
        self.clock = FakeClock()
        self.agg = Aggregator("dev-1", self.clock.time())
        engine = SimulatedEngine()
        self.pool = ModelPool(engine=engine)
        for spec in specs:
            self.pool.put(engine.load(Path("unused"), spec))
        self.switches: list[tuple[str | None, str, Reason]] = []
        self.path = RequestPath(
            self.pool, self.agg, self.clock,
            ServingOptions(cascade=cascade, active_power_w=2.0,
                           complexity_ewma_alpha=alpha,
                           complexity_min_interval_s=complexity_interval_s,
                           policy_eval_interval_s=eval_interval_s),
            policy or PolicyConfig(min_dwell_s=0.0), CALM,
            on_switch=lambda old, new, why: self.switches.append((old, new, why)))

    def serve(self, x: np.ndarray = HARD) -> tuple[str, Reason]:
        served = self.path.predict(x)
        return served.variant, served.reason

    def complexity(self) -> float | None:
        # Not exposed by RequestPath; read here only to check it stays a sane number.
        return self.path._ewma.value


def test_inputs_are_what_the_test_thinks() -> None:
    assert estimate_complexity(HARD) >= PolicyConfig().complexity_high
    assert estimate_complexity(EASY) <= PolicyConfig().complexity_low


# -- (a) many threads ------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_concurrent_requests_are_all_counted_and_complexity_stays_sane() -> None:
    p = Rig(eval_interval_s=0.0, alpha=0.2)  # every request estimates and decides
    threads, per_thread = 8, 150
    rng = np.random.default_rng(1)
    inputs = [(rng.normal(0, rng.uniform(0, 2), (1, 1, 8, 8))).astype(np.float32)
              for _ in range(32)]
    start = threading.Barrier(threads + 1)
    served: list[str] = []
    errors: list[BaseException] = []
    seen: list[float] = []

    def client(i: int) -> None:
        start.wait()
        try:
            for k in range(per_thread):
                served.append(p.path.predict(inputs[(i * 7 + k) % len(inputs)]).variant)
                c = p.complexity()
                if c is not None:
                    seen.append(c)
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    workers = [threading.Thread(target=client, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    start.wait()
    # The loop thread meanwhile feeds in new readings, as the agent does.
    for k in range(200):
        p.path.update(readings=readings(battery_percent=90.0 if k % 2 else 20.0))
    for w in workers:
        w.join()

    assert errors == []
    n = threads * per_thread
    assert len(served) == n and set(served) <= {"small", "medium", "large"}
    batch = p.agg.cut(0, p.clock.time(), None, p.path.active)
    assert sum(s.requests for s in batch.variants.values()) == n
    assert all(math.isfinite(c) and 0.0 <= c <= 1.0 for c in seen)
    c = p.complexity()
    assert c is not None and math.isfinite(c) and 0.0 <= c <= 1.0
    # Every switch the callback saw was recorded in telemetry, and the last one names
    # the variant served now.
    assert len(batch.switches) == len(p.switches) >= 1
    assert p.path.active in {new for _, new, _ in p.switches}


# -- (b) the policy cache --------------------------------------------------------------------


def test_a_change_of_readings_is_decided_at_once_within_the_interval() -> None:
    p = Rig(eval_interval_s=10.0)
    assert p.serve() == ("large", Reason.INITIAL)
    p.path.update(readings=readings(battery_percent=20.0))
    assert p.serve() == ("medium", Reason.BATTERY_LOW)  # the clock has not moved
    p.path.update(readings=readings(battery_percent=20.0, charging=True))
    assert p.serve() == ("large", Reason.CHARGING)
    assert [new for _, new, _ in p.switches] == ["large", "medium", "large"]


def test_a_change_of_policy_is_decided_at_once_within_the_interval() -> None:
    p = Rig(eval_interval_s=10.0)
    p.path.update(readings=readings(battery_percent=45.0))
    assert p.serve()[0] == "large"
    p.path.update(policy=PolicyConfig(min_dwell_s=0.0, battery_low_percent=50.0))
    assert p.serve() == ("medium", Reason.BATTERY_LOW)


def test_without_a_change_the_decision_is_cached_until_the_interval_passes() -> None:
    p = Rig(eval_interval_s=10.0)
    assert p.serve(HARD) == ("large", Reason.INITIAL)
    # Easy inputs lower the smoothed complexity at once (alpha 1), but the policy is not
    # asked again until the interval has passed: the cached answer stands.
    for _ in range(5):
        assert p.serve(EASY) == ("large", Reason.INITIAL)
    assert p.complexity() == 0.0
    p.clock.tick(9.99)
    assert p.serve(EASY) == ("large", Reason.INITIAL)
    p.clock.tick(0.01)
    assert p.serve(EASY) == ("medium", Reason.COMPLEXITY_LOW)
    assert len(p.switches) == 2


def test_a_new_variant_in_the_pool_invalidates_the_cache() -> None:
    p = Rig(eval_interval_s=10.0)
    p.pool.remove("large")
    assert p.serve() == ("medium", Reason.INITIAL)
    engine = SimulatedEngine()
    p.pool.put(engine.load(Path("unused"), SPECS[2]))
    assert p.serve() == ("large", Reason.INSTALLED)


# -- (c) pin and unpin -----------------------------------------------------------------------


def test_pin_and_unpin() -> None:
    p = Rig(eval_interval_s=10.0)
    assert p.serve()[0] == "large"
    p.path.update(pinned="small")
    assert p.path.pinned == "small"
    assert p.serve() == ("small", Reason.PINNED)
    # Readings change while pinned: the pin still wins.
    p.path.update(readings=readings(battery_percent=20.0))
    assert p.serve() == ("small", Reason.PINNED)
    assert p.path.pinned == "small"  # an update without ``pinned`` keeps the pin
    p.path.update(pinned=None)
    assert p.path.pinned is None
    assert p.serve() == ("medium", Reason.BATTERY_LOW)
    assert [(old, new) for old, new, _ in p.switches] == [
        (None, "large"), ("large", "small"), ("small", "medium")]


def test_a_pin_to_a_variant_not_installed_is_served_by_the_policy() -> None:
    p = Rig(eval_interval_s=10.0)
    p.path.update(pinned="huge")
    assert p.serve() == ("large", Reason.FALLBACK)


# -- (d) this device's profiles: energy and the table ----------------------------------------


def _profile(spec: VariantSpec, latency_ms: float, energy_mj: float,
             source: str = "hwmon") -> VariantProfile:
    return VariantProfile(sha256=spec.sha256, latency_ms_p50=latency_ms,
                          latency_ms_p95=latency_ms, cpu_ms=latency_ms, energy_mj=energy_mj,
                          energy_source=source, runs=100, threads=1)  # type: ignore[arg-type]


def test_the_battery_drains_by_the_measured_energy_and_telemetry_names_its_source() -> None:
    p = Rig()
    p.path.battery = battery = SimulatedBattery(100.0, clock=p.clock)
    # Not profiled yet: the inference time times the active power (2 W), an estimate.
    served = p.path.predict(HARD)
    assert served.variant == "large"
    estimate = served.latency_ms / 1000.0 * 2.0
    assert battery.consumed_j == pytest.approx(estimate)
    first = p.agg.cut(0, p.clock.time(), None, p.path.active)
    assert first.energy_by_source == {"cpu_time_estimate": pytest.approx(estimate)}
    # Profiled: the measured energy per inference, per input of the batch.
    p.path.set_profiles({s.name: _profile(s, 1.0, 5.0) for s in SPECS})
    p.path.predict(np.repeat(HARD, 3, axis=0))
    assert battery.consumed_j - estimate == pytest.approx(3 * 0.005)
    second = p.agg.cut(1, p.clock.time(), None, p.path.active)
    assert second.energy_by_source == {"hwmon": pytest.approx(0.015)}
    assert second.energy_j == pytest.approx(0.015)


def test_a_profile_of_another_artifact_does_not_count() -> None:
    p = Rig()
    p.path.battery = battery = SimulatedBattery(100.0, clock=p.clock)
    stale = _profile(SPECS[2], 1.0, 500.0).model_copy(update={"sha256": "f" * 64})
    p.path.set_profiles({"large": stale})
    served = p.path.predict(HARD)
    assert battery.consumed_j == pytest.approx(served.latency_ms / 1000.0 * 2.0)


def test_a_variant_slower_and_less_accurate_here_is_never_served_unless_pinned() -> None:
    specs = [_spec("small", 1_000, 1.0, 0.90), _spec("medium", 4_000, 2.0, 0.95),
             _spec("large", 16_000, 4.0, 0.97)]
    p = Rig(eval_interval_s=0.0, specs=specs)
    p.path.update(readings=readings(battery_percent=20.0))  # low: the middle of the table
    assert p.serve()[0] == "medium"
    # Measured here, medium is slower than large and less accurate.
    small, medium, large = specs
    p.path.set_profiles({"small": _profile(small, 0.5, 1.0), "medium": _profile(medium, 5.0, 9.0),
                         "large": _profile(large, 2.0, 4.0)})
    served = set()
    for battery in (90.0, 20.0, 5.0):
        for cpu in (10.0, 95.0):
            p.path.update(readings=readings(battery_percent=battery, cpu_percent=cpu))
            for x in (HARD, EASY):
                served.add(p.serve(x)[0])
    assert "medium" not in served and served == {"small", "large"}
    p.path.update(pinned="medium")
    assert p.serve() == ("medium", Reason.PINNED)


# -- (e) the confidence cascade by default ---------------------------------------------------


def _served_by(p: Rig, n: int = 200) -> set[tuple[str, Reason]]:
    rng = np.random.default_rng(2)
    return {p.serve(rng.normal(0, 1, (1, 1, 8, 8)).astype(np.float32)) for _ in range(n)}


def test_the_cascade_is_on_by_default_where_the_variants_answer_the_same_question() -> None:
    p = Rig(cascade=CascadeConfig())
    # The cheapest answers when sure, the budget (large) when unsure: nothing else serves.
    assert _served_by(p) == {("small", Reason.COMPLEXITY_LOW), ("large", Reason.CASCADE)}
    p.path.update(pinned="medium")  # a pin wins over the cascade: it answers everything
    assert _served_by(p) == {("medium", Reason.PINNED)}


def test_enabled_false_turns_the_cascade_off() -> None:
    p = Rig(cascade=CascadeConfig(enabled=False))
    assert {why for _, why in _served_by(p)} <= {Reason.INITIAL, Reason.COMPLEXITY_HIGH,
                                                 Reason.COMPLEXITY_LOW}


@pytest.mark.parametrize("other", [
    {"num_classes": 3},  # another question: its confidence is not comparable
    {"input_shape": [1, 1, 4, 4]},  # another input: the same request cannot run on both
    {"num_classes": 1},  # one score, no class probabilities
])
def test_a_variant_set_that_does_not_allow_it_serves_without_the_cascade(other) -> None:
    specs = [*SPECS[:2], SPECS[2].model_copy(update=other)]
    if other.get("num_classes") == 1:
        specs = [s.model_copy(update=other) for s in SPECS]
    p = Rig(cascade=CascadeConfig(), specs=specs)
    assert Reason.CASCADE not in {why for _, why in _served_by(p)}
    assert not p.path._cascade_applies()
