"""The pure rollout stepper, table-driven: (config, rollout, devices, now) → decision."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from prunefleet.server.rollout import (
    Action,
    DeviceView,
    RolloutConfig,
    RolloutView,
    Stage,
    Status,
    canary_size,
    step,
    tally,
)
from prunefleet.shared.messages import RolloutPhase as P

C, R = Stage.CANARY, Stage.REST
NOW = 10_000.0


def dev(i: int, stage=None, phase=None, online=True, offered_at=NOW - 10, ack=False):
    return DeviceView(f"d{i:02d}", online, stage, offered_at if stage else None, phase, ack)


def fleet(n: int, **kw):
    return [dev(i, **kw) for i in range(n)]


ACTIVE_CANARY = RolloutView(Status.ACTIVE, C, NOW - 10)
ACTIVE_REST = RolloutView(Status.ACTIVE, R, NOW - 10)
DEFAULT = RolloutConfig()
LENIENT = RolloutConfig(failure_threshold=0.5, success_threshold=0.5, canary_percent=50)

CASES = [
    # (id, config, rollout, devices, action, devices offered, reason contains)
    ("first step offers the canary", DEFAULT, ACTIVE_CANARY, fleet(20),
     Action.OFFER, ("d00", "d01"), "canary: 2 of 20"),
    ("canary prefers online devices", RolloutConfig(canary_percent=0, canary_min_devices=2),
     ACTIVE_CANARY, [dev(0, online=False), dev(1), dev(2, online=False), dev(3)],
     Action.OFFER, ("d01", "d03"), "canary"),
    ("no canary configured: straight to the rest",
     RolloutConfig(canary_percent=0, canary_min_devices=0), ACTIVE_CANARY, fleet(3),
     Action.PROMOTE, (), "no canary"),
    ("canary pending: wait", DEFAULT, ACTIVE_CANARY,
     [dev(0, C, P.DOWNLOADING), dev(1, C, P.INSTALLED), *fleet(3)[2:]],
     Action.WAIT, (), "1 of 2"),
    ("canary succeeded: promote", DEFAULT, ACTIVE_CANARY,
     [dev(0, C, P.ACTIVE), dev(1, C, P.INSTALLED), *fleet(5)[2:]],
     Action.PROMOTE, (), "2 of 2 canary"),
    ("success phase 'active' does not count installed",
     RolloutConfig(success_phase="active", canary_min_devices=2), ACTIVE_CANARY,
     [dev(0, C, P.ACTIVE), dev(1, C, P.INSTALLED), *fleet(5)[2:]],
     Action.WAIT, (), "1 of 2"),
    ("success threshold below 1 promotes early", LENIENT, ACTIVE_CANARY,
     [dev(0, C, P.INSTALLED), dev(1, C, P.VERIFYING), dev(2), dev(3)],
     Action.PROMOTE, (), "1 of 2"),
    ("a canary failure halts at the default threshold", DEFAULT, ACTIVE_CANARY,
     [dev(0, C, P.FAILED), dev(1, C, P.INSTALLED), *fleet(5)[2:]],
     Action.HALT, (), "1 of 2 offered devices failed"),
    ("failures within the threshold do not halt", LENIENT, ACTIVE_CANARY,
     [dev(0, C, P.FAILED), dev(1, C, P.INSTALLED), dev(2), dev(3)],
     Action.PROMOTE, (), "1 of 2"),
    ("acknowledged failures do not halt again", DEFAULT, ACTIVE_CANARY,
     [dev(0, C, P.FAILED, ack=True), dev(1, C, P.INSTALLED), dev(2), dev(3)],
     Action.PROMOTE, (), "1 of 2"),
    ("canary timeout halts", RolloutConfig(canary_timeout_s=5), ACTIVE_CANARY,
     [dev(0, C, P.DOWNLOADING), *fleet(4)[1:]],
     Action.HALT, (), "canary timed out"),
    ("rest stage offers everyone left, sorted", DEFAULT, ACTIVE_REST,
     [dev(3), dev(0, C, P.ACTIVE), dev(2), dev(1)],
     Action.OFFER, ("d01", "d02", "d03"), "rest: 3"),
    ("rest pending: wait", DEFAULT, ACTIVE_REST,
     [dev(0, C, P.ACTIVE), dev(1, R, P.DOWNLOADING), dev(2, R, P.INSTALLED)],
     Action.WAIT, (), "1 of 3 devices pending"),
    ("all done: complete", DEFAULT, ACTIVE_REST, fleet(12, stage=R, phase=P.INSTALLED),
     Action.COMPLETE, (), "12 succeeded, 0 failed"),
    ("failures past the threshold in the rest halt", DEFAULT, ACTIVE_REST,
     [*fleet(8, stage=R, phase=P.INSTALLED), dev(8, R, P.FAILED), dev(9, R, P.FAILED)],
     Action.HALT, (), "2 of 10"),
    ("one failure in ten is within 10%", DEFAULT, ACTIVE_REST,
     [*fleet(9, stage=R, phase=P.INSTALLED), dev(9, R, P.FAILED)],
     Action.COMPLETE, (), "9 succeeded, 1 failed"),
    ("a silent device times out and does not block completion",
     RolloutConfig(device_timeout_s=60), ACTIVE_REST,
     [dev(0, R, P.INSTALLED), dev(1, R, None, offered_at=NOW - 61)],
     Action.COMPLETE, (), "1 timed out"),
    ("paused: nothing happens", DEFAULT, RolloutView(Status.PAUSED, C, NOW), fleet(5),
     Action.WAIT, (), "paused"),
    ("halted: nothing happens", DEFAULT, RolloutView(Status.HALTED, R, NOW), fleet(5),
     Action.WAIT, (), "halted"),
    ("completed: nothing happens", DEFAULT, RolloutView(Status.COMPLETED, R, NOW), fleet(5),
     Action.WAIT, (), "completed"),
    ("empty target: wait", DEFAULT, ACTIVE_CANARY, [], Action.WAIT, (), "no devices"),
]


@pytest.mark.parametrize(("config", "rollout", "devices", "action", "offered", "reason"),
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_step(config, rollout, devices, action, offered, reason):
    d = step(config, rollout, devices, NOW)
    assert d.action is action, d.reason
    assert d.devices == offered
    assert reason in d.reason
    if action is Action.OFFER:
        assert d.stage is (C if rollout.stage is C else R)


@pytest.mark.parametrize(("percent", "minimum", "n", "want"), [
    (10, 1, 20, 2), (10, 1, 3, 1), (10, 0, 3, 1), (0, 0, 5, 0), (50, 1, 4, 2),
    (100, 1, 7, 7), (10, 5, 3, 3), (33, 1, 100, 33), (25, 1, 4, 1),
])
def test_canary_size(percent, minimum, n, want):
    cfg = RolloutConfig(canary_percent=percent, canary_min_devices=minimum)
    assert canary_size(cfg, n) == want


def test_a_whole_rollout_steps_to_completion():
    """Applying each decision as the controller would ends in COMPLETE, in order."""
    cfg = RolloutConfig(canary_percent=25)
    devices = {d.device_id: d for d in fleet(8)}
    view = ACTIVE_CANARY
    seen = []
    for _ in range(20):
        d = step(cfg, view, list(devices.values()), NOW)
        seen.append(d.action)
        if d.action is Action.OFFER:
            for name in d.devices:  # every offered device installs at once
                devices[name] = DeviceView(name, True, d.stage, NOW, P.INSTALLED)
        elif d.action is Action.PROMOTE:
            view = RolloutView(Status.ACTIVE, R, NOW)
        elif d.action is Action.COMPLETE:
            break
    assert seen == [Action.OFFER, Action.PROMOTE, Action.OFFER, Action.COMPLETE]


def test_tally_buckets_every_device_once():
    cfg = RolloutConfig(device_timeout_s=60)
    devices = [dev(0), dev(1, C, P.ACTIVE), dev(2, R, P.FAILED), dev(3, R, P.OFFERED),
               dev(4, R, None, offered_at=NOW - 100)]
    t = tally(cfg, devices, NOW)
    assert (t.total, t.waiting, t.pending, t.succeeded, t.failed, t.timed_out) == (
        5, 1, 1, 1, 1, 1)
    assert t.offered == 4


@pytest.mark.parametrize("bad", [
    {"canary_percent": 101}, {"failure_threshold": 1.0}, {"success_threshold": 0},
    {"success_phase": "verifying"}, {"canary_timeout_s": 0}, {"surprise": 1},
    # An endless or absurd wait: Infinity is valid JSON to Python's parser. A first wave
    # whose shadow window could not be signed left a created (and superseding) rollout
    # that never advanced, behind a 500.
    {"canary_timeout_s": float("inf")}, {"device_timeout_s": 1e308},
    {"gate": {"observe_s": float("inf")}}, {"gate": {"observe_s": 7e9}},
])
def test_config_rejects_nonsense(bad):
    with pytest.raises(ValidationError):
        RolloutConfig(**bad)
