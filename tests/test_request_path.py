"""RequestPath: the thread-safe request path around the policy.

Simulated inference (no ONNX Runtime) and a fake clock: many threads at once lose no
request and keep the smoothed complexity sane; the policy's short cache is invalidated by
a change of input and otherwise holds until the clock passes the interval; a pin acts at
once.
"""

from __future__ import annotations

import dataclasses
import math
import threading
from pathlib import Path

import numpy as np
import pytest

from prunefleet.agent.complexity import estimate_complexity
from prunefleet.agent.config import CascadeConfig, EnergyConfig
from prunefleet.agent.runtime import ModelPool
from prunefleet.agent.sensors import Readings
from prunefleet.agent.serving import RequestPath, ServingOptions
from prunefleet.agent.simulated import SimulatedEngine
from prunefleet.agent.telemetry import Aggregator
from prunefleet.shared import chunks
from prunefleet.shared.clock import FakeClock
from prunefleet.shared.messages import Reason, VariantSpec
from prunefleet.shared.policy import PolicyConfig


def _spec(name: str, macs: int, latency_ms: float) -> VariantSpec:
    p = chunks.plan(name.encode() * 600, 1024)
    return VariantSpec(name=name, sha256=p.sha256, size=p.size, chunk_bytes=1024,
                       chunk_sha256=list(p.chunk_sha256), input_shape=[1, 1, 8, 8],
                       num_classes=10, params=macs, macs=macs, accuracy=0.9,
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
                 complexity_interval_s: float = 0.0, alpha: float = 1.0) -> None:
        self.clock = FakeClock()
        self.agg = Aggregator("dev-1", self.clock.time())
        engine = SimulatedEngine()
        self.pool = ModelPool(engine=engine)
        for spec in SPECS:
            self.pool.put(engine.load(Path("unused"), spec))
        self.switches: list[tuple[str | None, str, Reason]] = []
        self.path = RequestPath(
            self.pool, self.agg, self.clock,
            ServingOptions(cascade=CascadeConfig(), energy=EnergyConfig(),
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
