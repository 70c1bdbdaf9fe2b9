"""The pure stepper for rollouts in waves, table-driven: each wave is judged only on its own
devices' shadow evidence against the gate."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from prunefleet.server.rollout import (
    Action,
    DeviceView,
    Evidence,
    Gate,
    RolloutConfig,
    RolloutView,
    Stage,
    Status,
    step,
    wave_of,
    wave_sizes,
    wave_stage,
)
from prunefleet.shared.messages import RolloutPhase as P

NOW = 10_000.0
W = Stage.WAVE
GATE = Gate(min_agreement=0.97, max_p95_ratio=1.3, max_error_rate=0.01, min_requests=200,
            observe_s=600)
CFG = RolloutConfig(waves=[10, 50, 100], gate=GATE)
HOLD = RolloutConfig(waves=[10, 50, 100], gate=GATE, on_fail="hold")

GOOD = {"v2": Evidence(samples=150, agreed=149, divergence_sum=1.5, p95_ratios=(1.1,))}
BAD = {"v2": Evidence(samples=150, agreed=60, divergence_sum=90.0, p95_ratios=(1.0,))}
FEW = {"v2": Evidence(samples=50, agreed=50)}
ERRS = {"v2": Evidence(samples=150, agreed=140, errors=10)}
SLOW = {"v2": Evidence(samples=150, agreed=150, p95_ratios=(1.9, 2.0, 1.0))}


def dev(i, wave=None, evidence=None, online=True, phase=P.ACTIVE):
    return DeviceView(f"d{i:02d}", online, W if wave else None, NOW - 50 if wave else None,
                      phase if wave else None, False, wave, evidence or {})


def view(wave: int, started: float = NOW - 60) -> RolloutView:
    return RolloutView(Status.ACTIVE, W, started, wave)


def rest(n: int, start: int):
    return [dev(i) for i in range(start, n)]


CASES = [
    # (id, config, rollout, devices, action, devices named, reason contains)
    ("wave 1 offers 10% (online devices first)", CFG, view(1),
     [dev(0, online=False), *rest(20, 1)], Action.OFFER, ("d01", "d02"), "wave 1: 2 device"),
    ("no evidence yet: wait", CFG, view(1), [dev(0, 1), dev(1, 1), *rest(20, 2)],
     Action.WAIT, (), "no shadow samples yet"),
    ("too few samples: wait", CFG, view(1), [dev(0, 1, FEW), dev(1, 1, FEW), *rest(20, 2)],
     Action.WAIT, (), "100 of 200 samples"),
    ("enough samples but one device silent: wait", CFG, view(1),
     [dev(0, 1, {"v2": Evidence(samples=300, agreed=300)}), dev(1, 1), *rest(20, 2)],
     Action.WAIT, (), "1 of 2 devices reported"),
    ("evidence meets the gate: next wave", CFG, view(1),
     [dev(0, 1, GOOD), dev(1, 1, GOOD), *rest(20, 2)], Action.PROMOTE, (), "wave 1 of 3 passed"),
    ("wave 2 offers up to 50%", CFG, view(2),
     [dev(0, 1, GOOD), dev(1, 1, GOOD), *rest(20, 2)], Action.OFFER,
     tuple(f"d{i:02d}" for i in range(2, 10)), "wave 2: 8 device"),
    ("wave 2 is judged on its own devices only", CFG, view(2),
     [dev(0, 1, BAD), dev(1, 1, BAD), *[dev(i, 2, GOOD) for i in range(2, 10)],
      *rest(20, 10)], Action.PROMOTE, (), "wave 2 of 3 passed"),
    ("disagreement fails the wave and rolls its devices back", CFG, view(1),
     [dev(0, 1, BAD), dev(1, 1, GOOD), *rest(20, 2)], Action.HALT, ("d00", "d01"),
     "agreement 0.697 < 0.97"),
    ("errors fail the wave", CFG, view(1), [dev(0, 1, ERRS), dev(1, 1, ERRS), *rest(20, 2)],
     Action.HALT, ("d00", "d01"), "error rate 0.067 > 0.01"),
    ("slow p95 against the profile fails the wave", CFG, view(1),
     [dev(0, 1, SLOW), dev(1, 1, SLOW), *rest(20, 2)], Action.HALT, ("d00", "d01"),
     "p95 ratio 1.90 > 1.3"),
    ("observe window over without enough evidence: halt, never pass", CFG,
     view(1, started=NOW - 601), [dev(0, 1, FEW), dev(1, 1, FEW), *rest(20, 2)],
     Action.HALT, (), "insufficient evidence after 600 s"),
    ("a device offline for the whole wave is missing evidence", CFG,
     view(1, started=NOW - 601),
     [dev(0, 1, {"v2": Evidence(samples=400, agreed=400)}), dev(1, 1, online=False),
      *rest(20, 2)], Action.HALT, (), "1 of 2 devices reported"),
    ("a failed install does not need evidence",
     RolloutConfig(waves=[10, 50, 100], gate=GATE, failure_threshold=0.5), view(1),
     [dev(0, 1, GOOD), dev(1, 1, GOOD), dev(2, 1, phase=P.FAILED), *rest(40, 3)],
     Action.PROMOTE, (), "passed"),
    ("last wave passes: complete", CFG, view(3),
     [dev(i, 3 if i > 9 else 2, GOOD) for i in range(20)], Action.COMPLETE, (),
     "wave 3 of 3 passed"),
]


@pytest.mark.parametrize(("cfg", "rollout", "devices", "action", "named", "reason"),
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_step(cfg, rollout, devices, action, named, reason) -> None:
    d = step(cfg, rollout, devices, NOW)
    assert (d.action, d.devices) == (action, named), d.reason
    assert reason in d.reason


def test_a_failing_wave_on_hold_keeps_its_devices() -> None:
    d = step(HOLD, view(1), [dev(0, 1, BAD), dev(1, 1, BAD), *rest(20, 2)], NOW)
    assert d.action is Action.HALT and not d.rollback
    assert step(CFG, view(1), [dev(0, 1, BAD), dev(1, 1, BAD), *rest(20, 2)], NOW).rollback


def test_status_shows_measured_values_against_the_gate() -> None:
    d = step(CFG, view(1), [dev(0, 1, BAD), dev(1, 1, GOOD), *rest(20, 2)], NOW)
    assert d.judgement is not None
    m = d.judgement.measured(GATE)
    v2 = m["variants"]["v2"]
    assert (m["wave"], m["verdict"], m["reporting"]) == (1, "fail", 2)
    assert (v2["samples"], round(v2["agreement"], 3), v2["min_agreement"]) == (300, 0.697, 0.97)


def test_one_device_reporting_a_billion_agreeing_samples_does_not_carry_its_wave() -> None:
    """Each device weighs at most twice the median device: one with valid credentials that
    reports a billion fast, agreeing samples over a thousand intervals cannot outweigh the
    wave's other devices, which disagree and are slow."""
    honest = {"v2": Evidence(samples=150, agreed=75, divergence_sum=60.0,
                             p95_ratios=(3.0,) * 5)}
    liar = {"v2": Evidence(samples=10**9, agreed=10**9, p95_ratios=(1.0,) * 1000)}
    wave = [dev(i, 1, honest) for i in range(9)] + [dev(9, 1, liar)]
    d = step(CFG, view(1), [*wave, *rest(100, 10)], NOW)
    assert d.action is Action.HALT, d.reason
    assert "agreement 0.5" in d.reason and "p95 ratio 3.00 > 1.3" in d.reason
    # A device with twice the median's traffic still counts in full.
    busy = {"v2": Evidence(samples=300, agreed=297, divergence_sum=3.0, p95_ratios=(1.1,))}
    j = step(CFG, view(1), [dev(0, 1, GOOD), dev(1, 1, busy), *rest(20, 2)], NOW).judgement
    assert j is not None and j.variants["v2"].samples == 450


def test_a_quiet_device_does_not_keep_its_wave_from_being_judged() -> None:
    """Weighing caps each device at twice the median device, but enough evidence is
    counted in samples as reported: a wave whose quiet device has 2 samples is judged on
    its busy one's 300 too (capped, it never reached min_requests: insufficient evidence,
    where the variant disagreed plainly)."""
    quiet = {"v2": Evidence(samples=2, agreed=2)}
    busy_bad = {"v2": Evidence(samples=300, agreed=120)}
    d = step(CFG, view(1), [dev(0, 1, quiet), dev(1, 1, busy_bad), *rest(20, 2)], NOW)
    assert d.action is Action.HALT and "agreement" in d.reason, d.reason


@pytest.mark.parametrize(("waves", "n", "sizes"), [
    ([1, 10, 50, 100], 200, [2, 20, 100, 200]),
    ([1, 10, 50, 100], 4, [1, 2, 3, 4]),  # each wave adds a device while any are left
    ([50, 100], 1, [1, 1]),
])
def test_wave_sizes(waves, n, sizes) -> None:
    assert wave_sizes(waves, n) == sizes


def test_a_small_target_skips_waves_with_nobody_left() -> None:
    d = step(RolloutConfig(waves=[50, 60, 100], gate=GATE), view(2),
             [dev(0, 1, GOOD)], NOW)
    assert d.action is Action.PROMOTE and d.wave == 3


@pytest.mark.parametrize("waves", [[10, 5, 100], [10, 50], [0, 100], [10, 10, 100]])
def test_bad_waves_are_refused(waves) -> None:
    with pytest.raises(ValidationError):
        RolloutConfig(waves=waves)


def test_wave_stage_round_trip() -> None:
    assert wave_of(wave_stage(3)) == 3 and wave_of("canary") is None
