"""Rollout stepping: what a staged rollout should do next. No I/O.

A rollout offers a set of variants to its devices in two stages. First a **canary**
share (``canary_percent`` of the devices, at least ``canary_min_devices``, online devices
first); once ``success_threshold`` of the canary devices report success, the rollout is
**promoted** and the **rest** of the devices are offered. It **halts** as soon as the share
of failed devices among those offered exceeds ``failure_threshold``, or when the canary
does not succeed within ``canary_timeout_s``. It **completes** when every device offered
has succeeded, failed, or stayed silent past ``device_timeout_s`` (such a device is not
blocking: it still receives its retained desired state whenever it comes back).

:func:`step` is a pure function of (config, rollout, devices, now) → :class:`Decision`;
the controller (``controller.py``) applies one decision, persists it, and steps again.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from prunefleet.shared.messages import RolloutPhase

__all__ = [
    "Action",
    "Decision",
    "DeviceView",
    "RolloutConfig",
    "RolloutView",
    "Stage",
    "Status",
    "Tally",
    "canary_size",
    "step",
    "tally",
]


class Stage(StrEnum):
    CANARY = "canary"
    REST = "rest"


class Status(StrEnum):
    ACTIVE = "active"
    PAUSED = "paused"
    HALTED = "halted"
    COMPLETED = "completed"
    ROLLED_BACK = "rolled_back"
    SUPERSEDED = "superseded"

    @property
    def finished(self) -> bool:
        """A finished rollout never offers anything again."""
        return self in (Status.COMPLETED, Status.ROLLED_BACK, Status.SUPERSEDED)


class Action(StrEnum):
    WAIT = "wait"
    OFFER = "offer"
    PROMOTE = "promote"
    HALT = "halt"
    COMPLETE = "complete"


class RolloutConfig(BaseModel):
    """How a rollout stages, when it promotes, when it halts."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    canary_percent: float = Field(default=10.0, ge=0, le=100)
    canary_min_devices: int = Field(default=1, ge=0, le=100000)
    # Share of canary devices that must succeed before the rest is offered.
    success_threshold: float = Field(default=1.0, gt=0, le=1)
    # Halt once the share of failed devices among those offered is above this.
    failure_threshold: float = Field(default=0.1, ge=0, lt=1)
    # "installed": verified and loaded; "active": also serving requests.
    success_phase: Literal["installed", "active"] = "installed"
    canary_timeout_s: float = Field(default=900.0, gt=0)
    device_timeout_s: float = Field(default=1800.0, gt=0)


@dataclass(frozen=True)
class DeviceView:
    """One device of a rollout as the stepper sees it."""

    device_id: str
    online: bool = True
    stage: Stage | None = None  # None: not offered yet
    offered_at: float | None = None
    phase: RolloutPhase | None = None  # last report for the manifest this rollout offered
    acknowledged: bool = False  # a failure the operator accepted by resuming a halt


@dataclass(frozen=True)
class RolloutView:
    status: Status
    stage: Stage
    stage_started_at: float


@dataclass(frozen=True)
class Decision:
    action: Action
    devices: tuple[str, ...] = ()
    stage: Stage | None = None
    reason: str = ""


@dataclass(frozen=True)
class Tally:
    """Counts over a set of devices; each offered device is in exactly one bucket."""

    total: int = 0
    waiting: int = 0  # not offered yet
    pending: int = 0  # offered, no outcome yet
    succeeded: int = 0
    failed: int = 0
    timed_out: int = 0

    @property
    def offered(self) -> int:
        return self.total - self.waiting


def _succeeded(cfg: RolloutConfig, phase: RolloutPhase | None) -> bool:
    if cfg.success_phase == "active":
        return phase is RolloutPhase.ACTIVE
    return phase in (RolloutPhase.INSTALLED, RolloutPhase.ACTIVE)


def _outcome(cfg: RolloutConfig, d: DeviceView, now: float) -> str:
    if d.stage is None:
        return "waiting"
    if _succeeded(cfg, d.phase):
        return "succeeded"
    if d.phase is RolloutPhase.FAILED:
        return "failed"
    if d.offered_at is not None and now - d.offered_at > cfg.device_timeout_s:
        return "timed_out"
    return "pending"


def tally(cfg: RolloutConfig, devices: Sequence[DeviceView], now: float) -> Tally:
    counts = {"waiting": 0, "pending": 0, "succeeded": 0, "failed": 0, "timed_out": 0}
    for d in devices:
        counts[_outcome(cfg, d, now)] += 1
    return Tally(total=len(devices), **counts)


def canary_size(cfg: RolloutConfig, n: int) -> int:
    want = max(cfg.canary_min_devices, math.ceil(cfg.canary_percent / 100 * n - 1e-9))
    return min(n, want)


def _pick_canary(cfg: RolloutConfig, devices: Sequence[DeviceView]) -> tuple[str, ...]:
    # Online devices first, so the canary answers; then by id, so the choice is stable.
    ordered = sorted(devices, key=lambda d: (not d.online, d.device_id))
    return tuple(d.device_id for d in ordered[: canary_size(cfg, len(devices))])


def step(
    cfg: RolloutConfig, rollout: RolloutView, devices: Sequence[DeviceView], now: float
) -> Decision:
    """The next thing the rollout should do. Apply it, then call again until WAIT."""
    if rollout.status is not Status.ACTIVE:
        return Decision(Action.WAIT, reason=f"rollout is {rollout.status.value}")
    if not devices:
        return Decision(Action.WAIT, reason="no devices in the target")

    offered = [d for d in devices if d.stage is not None]
    failed = sum(
        1 for d in offered if d.phase is RolloutPhase.FAILED and not d.acknowledged
    )
    if offered and failed / len(offered) > cfg.failure_threshold:
        return Decision(
            Action.HALT,
            reason=f"{failed} of {len(offered)} offered devices failed "
            f"(failure threshold {cfg.failure_threshold:.0%})",
        )

    if rollout.stage is Stage.CANARY:
        canary = [d for d in devices if d.stage is Stage.CANARY]
        if not canary:
            pick = _pick_canary(cfg, devices)
            if not pick:
                return Decision(Action.PROMOTE, reason="no canary stage configured")
            return Decision(Action.OFFER, pick, Stage.CANARY,
                            reason=f"canary: {len(pick)} of {len(devices)} devices")
        t = tally(cfg, canary, now)
        # Failures the operator acknowledged when resuming are out of the count.
        counted = len(canary) - sum(1 for d in canary if d.acknowledged)
        need = math.ceil(cfg.success_threshold * counted - 1e-9)
        if t.succeeded >= need:
            return Decision(
                Action.PROMOTE,
                reason=f"{t.succeeded} of {len(canary)} canary devices succeeded",
            )
        if now - rollout.stage_started_at > cfg.canary_timeout_s:
            return Decision(
                Action.HALT,
                reason=f"canary timed out after {cfg.canary_timeout_s:.0f} s: "
                f"{t.succeeded} of {len(canary)} succeeded, {need} needed",
            )
        return Decision(Action.WAIT, reason=f"canary: {t.succeeded} of {need} needed succeeded")

    waiting = tuple(sorted(d.device_id for d in devices if d.stage is None))
    if waiting:
        return Decision(Action.OFFER, waiting, Stage.REST,
                        reason=f"rest: {len(waiting)} devices")
    t = tally(cfg, devices, now)
    if t.pending == 0:
        return Decision(
            Action.COMPLETE,
            reason=f"{t.succeeded} succeeded, {t.failed} failed, {t.timed_out} timed out",
        )
    return Decision(Action.WAIT, reason=f"{t.pending} of {t.total} devices pending")
