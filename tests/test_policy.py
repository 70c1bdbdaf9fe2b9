"""The variant policy (a pure function) and the input-complexity estimate that feeds it."""

from __future__ import annotations

import math

import numpy as np
import pytest
from pydantic import ValidationError

from prunefleet.agent.complexity import Ewma, complexity_per_sample, estimate_complexity
from prunefleet.agent.policy import (
    BatteryLevel,
    CascadePlan,
    Decision,
    PolicyConfig,
    PolicyState,
    VariantInfo,
    decide,
    drop_dominated,
    order_variants,
    plan_cascade,
)
from prunefleet.agent.sensors import Readings
from prunefleet.shared import chunks
from prunefleet.shared.messages import Reason, VariantProfile, VariantSpec

SMALL = VariantInfo("small", 1_000_000, accuracy=0.95, latency_ms=1.0)
MEDIUM = VariantInfo("medium", 4_000_000, accuracy=0.98, latency_ms=2.0)
LARGE = VariantInfo("large", 16_000_000, accuracy=0.99, latency_ms=4.0)
V3 = [SMALL, MEDIUM, LARGE]

# Defaults of a calm device: everything well inside its thresholds, hard inputs.
CALM = {"battery": 80.0, "charging": False, "cpu": 10.0, "mem": 50.0, "temp": 40.0}
HARD = 0.9
EASY = 0.1


def readings(
    battery: float | None = 80.0,
    charging: bool | None = False,
    cpu: float | None = 10.0,
    mem: float | None = 50.0,
    temp: float | None = 40.0,
) -> Readings:
    return Readings(
        battery_percent=battery,
        charging=charging,
        cpu_percent=cpu,
        mem_available_percent=mem,
        temperature_c=temp,
        ts=0.0,
    )


class Driver:
    """Calls ``decide`` the way the agent does: feeding back the state it returned."""

    def __init__(
        self, variants: list[VariantInfo] | None = None, config: PolicyConfig | None = None
    ) -> None:
        self.variants = V3 if variants is None else variants
        self.config = config or PolicyConfig()
        self.state: PolicyState | None = None
        self.switches = 0

    def at(
        self,
        now: float,
        complexity: float | None = HARD,
        latency_ms: float | None = None,
        pinned: str | None = None,
        **kw: float | bool | None,
    ) -> Decision:
        d = decide(
            readings(**kw),  # type: ignore[arg-type]
            self.variants,
            complexity,
            latency_ms,
            pinned,
            self.state,
            now,
            self.config,
        )
        self.state = d.state
        self.switches += d.switched
        return d


# --- budget: what a first decision picks ------------------------------------------------


@pytest.mark.parametrize(
    ("inputs", "complexity", "expected"),
    [
        ({}, HARD, "large"),
        ({"battery": None, "charging": None}, HARD, "large"),
        ({"battery": 25.0}, HARD, "medium"),
        ({"battery": 30.0}, HARD, "medium"),
        ({"battery": 10.0}, HARD, "small"),
        ({"battery": 10.0, "charging": True}, HARD, "large"),
        ({"battery": 25.0, "charging": True}, HARD, "large"),
        ({"cpu": 90.0}, HARD, "medium"),
        ({"temp": 85.0}, HARD, "medium"),
        ({"mem": 5.0}, HARD, "medium"),
        ({"cpu": 90.0, "temp": 85.0, "mem": 5.0}, HARD, "medium"),
        ({"battery": 25.0, "cpu": 90.0}, HARD, "small"),
        ({"battery": 10.0, "cpu": 5.0}, EASY, "small"),
        ({}, EASY, "medium"),
        ({"battery": 25.0}, EASY, "small"),
        ({}, 0.5, "large"),  # inside the band, the first decision assumes hard inputs
        ({}, None, "large"),
        ({"cpu": None, "mem": None, "temp": None}, HARD, "large"),
    ],
)
def test_first_decision_budget(inputs: dict, complexity: float | None, expected: str) -> None:
    d = Driver().at(0.0, complexity=complexity, **inputs)
    assert (d.variant, d.reason, d.previous, d.switched) == (expected, Reason.INITIAL, None, True)


def test_latency_over_slo_steps_down_once() -> None:
    d = Driver(config=PolicyConfig(latency_slo_ms=20.0)).at(0.0, latency_ms=30.0)
    assert d.variant == "medium"
    d = Driver(config=PolicyConfig(latency_slo_ms=20.0)).at(0.0, latency_ms=30.0, cpu=95.0)
    assert d.variant == "small"


@pytest.mark.parametrize(
    ("n", "low_battery_index"), [(1, 0), (2, 0), (3, 1), (4, 1), (5, 2), (6, 2)]
)
def test_low_battery_caps_at_middle_of_table(n: int, low_battery_index: int) -> None:
    table = [VariantInfo(f"v{i}", 1000 * (i + 1)) for i in range(n)]
    assert Driver(table).at(0.0, battery=20.0).variant == f"v{low_battery_index}"
    assert Driver(table).at(0.0, battery=90.0).variant == f"v{n - 1}"


def test_table_order_does_not_matter() -> None:
    shuffled = [MEDIUM, LARGE, SMALL]
    assert order_variants(shuffled) == (SMALL, MEDIUM, LARGE)
    for kw in ({}, {"battery": 25.0}, {"cpu": 90.0}):
        assert Driver(shuffled).at(0.0, **kw).variant == Driver(V3).at(0.0, **kw).variant


# --- one change at a time: the variant moves and the reason names the input -------------


@pytest.mark.parametrize(
    ("before", "after", "expected", "reason"),
    [
        # constraints arriving
        ({}, {"battery": 25.0}, "medium", Reason.BATTERY_LOW),
        ({}, {"battery": 10.0}, "small", Reason.BATTERY_CRITICAL),
        ({}, {"cpu": 90.0}, "medium", Reason.CPU_HIGH),
        ({}, {"temp": 85.0}, "medium", Reason.THERMAL),
        ({}, {"mem": 5.0}, "medium", Reason.MEMORY_LOW),
        ({}, {"complexity": EASY}, "medium", Reason.COMPLEXITY_LOW),
        ({"battery": 25.0}, {"battery": 10.0}, "small", Reason.BATTERY_CRITICAL),
        # constraints leaving
        ({"battery": 25.0}, {"battery": 50.0}, "large", Reason.BATTERY_RECOVERED),
        ({"battery": 10.0}, {"battery": 25.0}, "medium", Reason.BATTERY_RECOVERED),
        ({"battery": 25.0}, {"battery": 25.0, "charging": True}, "large", Reason.CHARGING),
        ({"battery": 10.0}, {"battery": 10.0, "charging": True}, "large", Reason.CHARGING),
        ({"cpu": 90.0}, {"cpu": 30.0}, "large", Reason.CPU_RECOVERED),
        ({"temp": 85.0}, {"temp": 60.0}, "large", Reason.THERMAL_RECOVERED),
        ({"mem": 5.0}, {"mem": 40.0}, "large", Reason.MEMORY_RECOVERED),
        ({"complexity": EASY}, {"complexity": HARD}, "large", Reason.COMPLEXITY_HIGH),
        # unplugging a low battery
        (
            {"battery": 25.0, "charging": True},
            {"battery": 25.0, "charging": False},
            "medium",
            Reason.BATTERY_LOW,
        ),
    ],
)
def test_change_names_its_cause(before: dict, after: dict, expected: str, reason: Reason) -> None:
    p = Driver()
    first = p.at(0.0, **before)
    steady = p.at(5.0, **before)
    assert (steady.variant, steady.reason, steady.switched) == (
        first.variant,
        Reason.INITIAL,
        False,
    )
    d = p.at(10.0, **after)
    assert (d.variant, d.reason, d.switched, d.previous) == (expected, reason, True, first.variant)
    # Nothing new: the variant and its reason stay.
    again = p.at(20.0, **after)
    assert (again.variant, again.reason, again.switched) == (expected, reason, False)


def test_slo_steps_down_and_returns_only_when_the_dearer_variant_would_meet_it() -> None:
    p = Driver(config=PolicyConfig(latency_slo_ms=20.0))  # released below 16 ms predicted
    assert p.at(0.0, latency_ms=10.0).variant == "large"
    d = p.at(10.0, latency_ms=30.0)
    assert (d.variant, d.reason) == ("medium", Reason.SLO)
    # medium at 9 ms predicts large (twice the latency in the table) at 18 ms: stay.
    assert p.at(20.0, latency_ms=9.0).variant == "medium"
    assert p.at(30.0, latency_ms=7.9).variant == "large"
    assert p.state is not None and p.state.reason == Reason.SLO_RECOVERED


def test_slo_release_uses_macs_when_the_table_has_no_latencies() -> None:
    table = [VariantInfo("a", 1000), VariantInfo("b", 2000)]
    p = Driver(table, PolicyConfig(latency_slo_ms=10.0))  # released below 8 ms predicted
    assert p.at(0.0, latency_ms=12.0).variant == "a"
    assert p.at(10.0, latency_ms=5.0).variant == "a"  # b predicted at 10 ms
    assert p.at(20.0, latency_ms=3.9).variant == "b"


def test_no_slo_configured_ignores_latency() -> None:
    assert Driver().at(0.0, latency_ms=10_000.0).variant == "large"


# --- hysteresis -----------------------------------------------------------------------------


def test_battery_oscillating_around_threshold_does_not_flap() -> None:
    p = Driver()
    assert p.at(0.0, battery=50.0).variant == "large"
    assert (p.at(10.0, battery=29.0).variant, p.switches) == ("medium", 2)
    for i, pct in enumerate([31.0, 33.0, 29.0, 31.0, 33.0, 35.0, 30.0, 34.9]):
        d = p.at(20.0 + 10 * i, battery=pct)
        assert (d.variant, d.reason) == ("medium", Reason.BATTERY_LOW), pct
    d = p.at(200.0, battery=36.0)
    assert (d.variant, d.reason, p.switches) == ("large", Reason.BATTERY_RECOVERED, 3)
    assert p.state is not None and p.state.levels.battery == BatteryLevel.OK


def test_without_hysteresis_the_same_oscillation_flaps() -> None:
    p = Driver(config=PolicyConfig(hysteresis_percent=0.0))
    for i, pct in enumerate([50.0, 29.0, 31.0, 29.0, 31.0]):
        p.at(10.0 * i, battery=pct)
    assert p.switches == 5


def test_critical_battery_has_its_own_hysteresis() -> None:
    p = Driver()
    p.at(0.0, battery=40.0)
    assert p.at(10.0, battery=14.0).variant == "small"
    for i, pct in enumerate([16.0, 19.0, 20.0, 15.5]):
        assert p.at(20.0 + 10 * i, battery=pct).variant == "small", pct
    d = p.at(100.0, battery=21.0)
    assert (d.variant, d.reason) == ("medium", Reason.BATTERY_RECOVERED)
    # Still latched "low" from below: 33 % does not recover it.
    assert p.at(110.0, battery=33.0).variant == "medium"


@pytest.mark.parametrize(
    ("field", "enter", "hold", "release"),
    [
        ("cpu", 80.0, [79.0, 75.0, 70.0], 69.9),
        ("temp", 80.0, [79.0, 76.0, 75.0], 74.9),
    ],
)
def test_upper_thresholds_latch(
    field: str, enter: float, hold: list[float], release: float
) -> None:
    p = Driver()
    p.at(0.0, **{field: 10.0})
    assert p.at(10.0, **{field: enter}).variant == "medium"
    for i, v in enumerate(hold):
        assert p.at(20.0 + 10 * i, **{field: v}).variant == "medium", v
    assert p.at(100.0, **{field: release}).variant == "large"


def test_low_memory_latches() -> None:
    p = Driver()
    p.at(0.0, mem=50.0)
    assert p.at(10.0, mem=10.0).variant == "medium"
    assert p.at(20.0, mem=15.0).variant == "medium"
    assert p.at(30.0, mem=15.1).variant == "large"


def test_complexity_band_is_a_hysteresis() -> None:
    p = Driver()
    steps = [
        (0.9, "large"),
        (0.5, "large"),
        (0.41, "large"),
        (0.4, "medium"),
        (0.5, "medium"),
        (0.59, "medium"),
        (0.6, "large"),
        (0.45, "large"),
    ]
    for i, (c, expected) in enumerate(steps):
        assert p.at(10.0 * i, complexity=c).variant == expected, c


def test_missing_readings_keep_latched_levels() -> None:
    p = Driver()
    p.at(0.0)
    p.at(10.0, battery=25.0, cpu=90.0, complexity=EASY)
    d = p.at(20.0, battery=None, charging=None, cpu=None, mem=None, temp=None, complexity=None)
    assert (d.variant, d.switched) == ("small", False)


# --- dwell ----------------------------------------------------------------------------------


def test_switch_waits_for_min_dwell() -> None:
    p = Driver()
    p.at(0.0)
    for t in (0.5, 1.0, 1.99):
        d = p.at(t, cpu=95.0)
        assert (d.variant, d.reason) == ("large", Reason.INITIAL), t
    d = p.at(2.0, cpu=95.0)
    assert (d.variant, d.reason) == ("medium", Reason.CPU_HIGH)
    # The clock restarts at the switch.
    assert p.at(3.5, cpu=10.0).variant == "medium"
    d = p.at(4.0, cpu=10.0)
    assert (d.variant, d.reason) == ("large", Reason.CPU_RECOVERED)


def test_a_change_that_reverts_within_the_dwell_causes_no_switch() -> None:
    p = Driver()
    p.at(0.0)
    p.at(0.5, complexity=EASY)
    p.at(1.0, complexity=HARD)
    assert (p.at(5.0, complexity=HARD).variant, p.switches) == ("large", 1)


def test_rapidly_alternating_inputs_switch_at_most_once_per_dwell() -> None:
    p = Driver()
    for i in range(200):  # 20 s at 10 Hz, complexity flipping each step
        p.at(0.1 * i, complexity=EASY if i % 2 else HARD)
    assert p.switches <= 20 / PolicyConfig().min_dwell_s + 1


def test_critical_battery_acts_at_once() -> None:
    p = Driver()
    p.at(0.0)
    d = p.at(0.1, battery=12.0)
    assert (d.variant, d.reason) == ("small", Reason.BATTERY_CRITICAL)

    p = Driver()
    p.at(0.0)
    assert p.at(10.0, battery=25.0).variant == "medium"
    d = p.at(10.1, battery=14.0)
    assert (d.variant, d.reason) == ("small", Reason.BATTERY_CRITICAL)
    # Leaving critical does wait for the dwell.
    assert p.at(10.5, battery=25.0, charging=True).variant == "small"
    assert p.at(12.1, battery=25.0, charging=True).variant == "large"


# --- pin, fallback, table changes -------------------------------------------------------------


def test_pinned_wins_over_everything_and_acts_at_once() -> None:
    p = Driver()
    p.at(0.0)
    d = p.at(0.1, pinned="small")
    assert (d.variant, d.reason) == ("small", Reason.PINNED)
    d = p.at(0.2, pinned="large", battery=5.0, cpu=99.0, complexity=EASY)
    assert (d.variant, d.reason) == ("large", Reason.PINNED)
    # Unpinning returns to the policy at once, explaining what constrains it.
    d = p.at(0.3, battery=5.0)
    assert (d.variant, d.reason) == ("small", Reason.BATTERY_CRITICAL)


def test_unpin_with_nothing_constraining() -> None:
    p = Driver()
    p.at(0.0, pinned="small")
    d = p.at(0.1)
    assert (d.variant, d.reason, d.switched) == ("large", Reason.COMPLEXITY_HIGH, True)


def test_pin_to_uninstalled_variant_falls_back_to_the_policy() -> None:
    p = Driver()
    d = p.at(0.0, pinned="huge")
    assert (d.variant, d.reason) == ("large", Reason.FALLBACK)
    # The same unknown pin is not news; the policy goes on as usual.
    d = p.at(10.0, pinned="huge", battery=25.0)
    assert (d.variant, d.reason) == ("medium", Reason.BATTERY_LOW)
    # From an honoured pin to an unknown one: at once, and said so.
    p.at(20.0, pinned="small", battery=25.0)
    d = p.at(20.1, pinned="huge", battery=25.0)
    assert (d.variant, d.reason) == ("medium", Reason.FALLBACK)


def test_pinned_variant_uninstalled_while_pinned() -> None:
    p = Driver()
    p.at(0.0, pinned="small")
    p.variants = [MEDIUM, LARGE]
    d = p.at(0.1, pinned="small")
    assert (d.variant, d.reason) == ("large", Reason.FALLBACK)


def test_served_variant_removed_from_table_falls_back_at_once() -> None:
    p = Driver()
    p.at(0.0)
    p.variants = [SMALL, MEDIUM]
    d = p.at(0.1)
    assert (d.variant, d.reason, d.previous) == ("medium", Reason.FALLBACK, "large")


def test_new_dearer_variant_is_taken_up_after_the_dwell() -> None:
    p = Driver([SMALL, MEDIUM])
    p.at(0.0)
    p.variants = V3
    assert p.at(1.0).variant == "medium"
    d = p.at(2.0)
    assert (d.variant, d.reason) == ("large", Reason.INSTALLED)


def test_one_variant_is_always_served() -> None:
    p = Driver([MEDIUM])
    assert (p.at(0.0).variant, p.state and p.state.reason) == ("medium", Reason.INITIAL)
    for i, kw in enumerate(
        [
            {"battery": 5.0},
            {"battery": 25.0, "cpu": 99.0},
            {"temp": 99.0, "mem": 1.0, "complexity": EASY},
            {"pinned": "other"},
            {"pinned": "medium"},
            {},
        ]
    ):
        assert p.at(10.0 * (i + 1), **kw).variant == "medium", kw
    assert p.switches == 1


def test_empty_table_is_an_error() -> None:
    with pytest.raises(ValueError, match="at least one variant"):
        Driver([]).at(0.0)


def test_decide_is_pure() -> None:
    p = Driver()
    p.at(0.0)
    state = p.state
    args = (readings(battery=25.0, cpu=90.0), V3, 0.3, 12.0, None, state, 10.0, PolicyConfig())
    assert decide(*args) == decide(*args)
    assert p.state is state


# --- config -----------------------------------------------------------------------------------


def test_config_rejects_unknown_fields_and_disordered_thresholds() -> None:
    PolicyConfig(battery_low_percent=40, battery_critical_percent=20)
    with pytest.raises(ValidationError, match="extra"):
        PolicyConfig(battery_low=30)  # type: ignore[call-arg]
    with pytest.raises(ValidationError, match="battery_critical_percent"):
        PolicyConfig(battery_low_percent=10, battery_critical_percent=15)
    with pytest.raises(ValidationError, match="complexity_low"):
        PolicyConfig(complexity_low=0.7, complexity_high=0.6)
    with pytest.raises(ValidationError):
        PolicyConfig(latency_slo_ms=0)


# --- complexity -------------------------------------------------------------------------------


def _synthetic_digits(n: int, rng: np.random.Generator) -> np.ndarray:
    """8x8 images of one or two random thick strokes on a blank background, 0..16."""
    out = np.zeros((n, 8, 8), dtype=np.float32)
    for img in out:
        for _ in range(rng.integers(1, 3)):
            if rng.random() < 0.5:
                r = rng.integers(1, 7)
                img[r : r + 2, rng.integers(0, 3) : rng.integers(5, 8)] = 16
            else:
                c = rng.integers(1, 7)
                img[rng.integers(0, 3) : rng.integers(5, 8), c : c + 2] = 16
    return out


def _sklearn_digits() -> np.ndarray:
    datasets = pytest.importorskip("sklearn.datasets")
    return datasets.load_digits().images.astype(np.float32)


@pytest.mark.parametrize("source", ["sklearn", "synthetic"])
@pytest.mark.parametrize("normalisation", ["unit", "standard"])
@pytest.mark.parametrize("sigma", [0.5, 1.0])
def test_noisy_digits_score_higher_than_clean_ones(
    source: str, normalisation: str, sigma: float
) -> None:
    rng = np.random.default_rng(7)
    raw = _sklearn_digits() if source == "sklearn" else _synthetic_digits(500, rng)
    x = raw / 16.0
    if normalisation == "standard":
        x = (x - x.mean()) / x.std()
    clean = x[:, None].astype(np.float32)  # (N, 1, 8, 8)
    noisy = (clean + rng.normal(0.0, sigma, clean.shape)).astype(np.float32)
    c, n = complexity_per_sample(clean), complexity_per_sample(noisy)
    assert c.shape == n.shape == (len(x),)
    assert np.mean(n > c) >= 0.95
    # Clean digits sit below the default band, noisy ones clearly above clean ones.
    assert np.quantile(c, 0.95) < PolicyConfig().complexity_low
    assert np.median(n) - np.median(c) > 0.3


def test_complexity_does_not_depend_on_normalisation() -> None:
    x = _synthetic_digits(20, np.random.default_rng(1))[:, None]
    assert np.allclose(complexity_per_sample(x), complexity_per_sample(x / 16.0 * 3.0 - 1.2))


@pytest.mark.parametrize(
    "shape", [(1, 1, 8, 8), (5, 1, 8, 8), (8, 8), (3, 28, 28), (1, 1, 1, 8), (10,), ()]
)
def test_complexity_is_a_float_in_unit_interval(shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(0)
    for x in (rng.normal(size=shape) * 100, np.zeros(shape), rng.random(shape)):
        v = estimate_complexity(x.astype(np.float32))
        assert isinstance(v, float) and 0.0 <= v <= 1.0


def test_blank_image_is_simplest_and_batch_score_is_the_mean() -> None:
    assert estimate_complexity(np.full((1, 1, 8, 8), 0.7, np.float32)) == 0.0
    x = np.random.default_rng(3).normal(size=(4, 1, 8, 8)).astype(np.float32)
    assert estimate_complexity(x) == pytest.approx(float(complexity_per_sample(x).mean()))


def test_ewma() -> None:
    e = Ewma(alpha=0.5)
    assert e.value is None
    assert e.update(1.0) == 1.0
    assert e.update(0.0) == 0.5
    assert e.update(math.nan) == 0.5
    e.reset()
    assert e.value is None
    half = Ewma.from_half_life(4)
    half.update(1.0)
    for _ in range(4):
        half.update(0.0)
    assert half.value == pytest.approx(0.5)
    with pytest.raises(ValueError):
        Ewma(alpha=0.0)
    with pytest.raises(ValueError):
        Ewma.from_half_life(0)


# --- ordering and the cascade -----------------------------------------------------------------

FP32 = VariantInfo("mid-fp32", 4_000_000, accuracy=0.98, latency_ms=2.0)
INT8 = VariantInfo("mid-int8", 4_000_000, accuracy=0.975, latency_ms=0.9)


def test_an_int8_variant_is_cheaper_than_its_fp32_twin_when_latencies_are_known() -> None:
    # Same MACs; by name alone "mid-fp32" would come first.
    assert order_variants([FP32, LARGE, INT8, SMALL]) == (INT8, SMALL, FP32, LARGE)
    # The policy's cheapest choice (critical battery) is then the faster twin.
    table = [FP32, INT8]
    assert Driver(table).at(0.0, battery=5.0).variant == "mid-int8"


def test_order_falls_back_to_macs_when_one_latency_is_missing() -> None:
    unmeasured = VariantInfo("huge", 64_000_000)
    assert order_variants([unmeasured, FP32, INT8, SMALL]) == (SMALL, INT8, FP32, unmeasured)
    # Equal MACs and a missing latency: the measured one first, then the name.
    a, b = VariantInfo("a", 1000), VariantInfo("b", 1000, latency_ms=5.0)
    assert order_variants([a, b]) == (b, a)
    assert order_variants([VariantInfo("z", 1), VariantInfo("y", 1)])[0].name == "y"


def measured(v: VariantInfo, latency_ms: float, energy_mj: float | None = None) -> VariantInfo:
    """``v`` as this device measured it (its profile)."""
    return VariantInfo(v.name, v.macs, v.accuracy, v.latency_ms, latency_ms, energy_mj)


def test_this_devices_measured_latency_orders_the_table_over_the_declared_one() -> None:
    # Prepared on a host where INT8 was faster; on this device it is the slowest.
    here = [measured(SMALL, 0.4), measured(INT8, 3.0), measured(FP32, 1.0),
            measured(LARGE, 2.0)]
    assert [v.name for v in order_variants(here)] == ["small", "mid-fp32", "large", "mid-int8"]
    # Equal latency: the lower energy first.
    a, b = measured(SMALL, 1.0, energy_mj=2.0), measured(MEDIUM, 1.0, energy_mj=1.0)
    assert order_variants([a, b]) == (b, a)
    # One variant not profiled yet: the declared latencies, as before.
    assert order_variants([measured(SMALL, 9.0), MEDIUM, LARGE]) == (
        measured(SMALL, 9.0), MEDIUM, LARGE)


def test_a_profile_counts_only_for_the_artifact_it_measured() -> None:
    p = chunks.plan(b"variant" * 300, 1024)
    spec = VariantSpec(name="small", sha256=p.sha256, size=p.size, chunk_bytes=1024,
                       chunk_sha256=list(p.chunk_sha256), input_shape=[1, 1, 8, 8],
                       num_classes=10, params=1000, macs=1000)
    prof = VariantProfile(sha256=spec.sha256, latency_ms_p50=0.5, latency_ms_p95=0.6,
                          cpu_ms=0.5, energy_mj=1.0, energy_source="rapl", runs=10, threads=1)
    assert VariantInfo.from_spec(spec, prof).measured_latency_ms == 0.5
    other = prof.model_copy(update={"sha256": "0" * 64})
    assert VariantInfo.from_spec(spec, other).measured_latency_ms is None


def test_a_variant_slower_and_less_accurate_than_another_here_is_never_chosen() -> None:
    # On this device the INT8 twin is slower than FP32 and less accurate: dominated.
    here = [measured(SMALL, 0.5), measured(INT8, 1.5), measured(FP32, 1.0),
            measured(LARGE, 2.0)]
    usable = drop_dominated(here)
    assert [v.name for v in usable] == ["small", "mid-fp32", "large"]
    # Whatever the inputs, the policy never serves it.
    for battery in (90.0, 25.0, 5.0):
        for cpu in (10.0, 95.0):
            for complexity in (HARD, EASY):
                d = decide(readings(battery=battery, cpu=cpu), usable, complexity, None,
                           None, None, 0.0)
                assert d.variant != "mid-int8"
    # An operator's pin keeps it; unmeasured or unrated variants are never dropped.
    assert "mid-int8" in {v.name for v in drop_dominated(here, keep="mid-int8")}
    assert drop_dominated([INT8, FP32]) == (INT8, FP32)
    # Half a point less accurate is within the noise of a held-out set: a tie at the
    # default margin (accuracy_margin_pp = 1), so the slower twin stays.
    margin = PolicyConfig().accuracy_margin_pp / 100
    assert "mid-int8" in {v.name for v in drop_dominated(here, margin=margin)}
    unrated = VariantInfo("x", 1, None, None, 5.0)
    assert unrated in drop_dominated([*here, unrated])


@pytest.mark.parametrize(
    ("table", "budget", "plan"),
    [
        (V3, "large", CascadePlan("small", "large")),
        (V3, "medium", CascadePlan("small", "medium")),
        (V3, "small", CascadePlan("small", None)),
        ([LARGE, MEDIUM, SMALL], "large", CascadePlan("small", "large")),
        ([MEDIUM], "medium", CascadePlan("medium", None)),
        ([FP32, INT8], "mid-fp32", CascadePlan("mid-int8", "mid-fp32")),
    ],
)
def test_plan_cascade(table: list[VariantInfo], budget: str, plan: CascadePlan) -> None:
    assert plan_cascade(table, budget) == plan


def test_on_a_critical_battery_unsure_answers_still_escalate_to_the_middle() -> None:
    assert plan_cascade(V3, "small", critical=True) == CascadePlan("small", "medium")
    assert plan_cascade([SMALL, LARGE], "small", critical=True) == CascadePlan("small", None)
    assert plan_cascade([MEDIUM], "medium", critical=True) == CascadePlan("medium", None)
    # The policy's levels say when: critical and not charging, outside lifetime mode.
    cfg = PolicyConfig()
    d = decide(readings(battery=5.0), V3, 0.9, None, None, None, 0.0, cfg)
    assert d.variant == "small" and d.state.levels.critical
    d = decide(readings(battery=5.0, charging=True), V3, 0.9, None, None, None, 0.0,
               cfg)
    assert not d.state.levels.critical


@pytest.mark.parametrize(
    ("plan", "confidence", "escalates"),
    [
        (CascadePlan("small", "large"), 0.5, True),
        (CascadePlan("small", "large"), 0.8999, True),
        (CascadePlan("small", "large"), 0.9, False),  # at the threshold: sure enough
        (CascadePlan("small", "large"), 0.99, False),
        (CascadePlan("small", None), 0.1, False),  # nowhere to go
    ],
)
def test_cascade_escalates_only_below_the_threshold(
    plan: CascadePlan, confidence: float, escalates: bool
) -> None:
    assert plan.escalates(confidence, threshold=0.9) is escalates


def test_plan_cascade_needs_a_variant() -> None:
    with pytest.raises(ValueError, match="at least one variant"):
        plan_cascade([], "large")
