"""Rollout stepping: what a staged rollout should do next. No I/O.

A rollout offers a set of variants to its devices in two stages. First a **canary**
share (``canary_percent`` of the devices, at least ``canary_min_devices``, online devices
first); once ``success_threshold`` of the canary devices report success, the rollout is
**promoted** and the **rest** of the devices are offered. It **halts** as soon as the share
of failed devices among those offered exceeds ``failure_threshold``, or when the canary
does not succeed within ``canary_timeout_s``. It **completes** when every device offered
has succeeded, failed, or stayed silent past ``device_timeout_s`` (such a device is not
blocking: it still receives its retained desired state whenever it comes back).

With ``waves`` (cumulative percents of the target, e.g. 1, 10, 50, 100) a rollout goes in
**waves** instead, each judged by its ``gate`` on measured behaviour: the shadow figures
its own devices reported since they were offered (:class:`Evidence`). A wave passes once
it has enough evidence and every variant under evaluation meets the gate; it **fails**
(halts; its devices roll back or hold, ``on_fail``) when the evidence misses the gate;
it halts with "insufficient evidence" when its ``observe_s`` window ends first. A device
that reported nothing (offline for the whole wave) is missing evidence, never a success.

:func:`step` is a pure function of (config, rollout, devices, now) → :class:`Decision`;
the controller (``controller.py``) applies one decision, persists it, and steps again.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from prunefleet.shared.messages import RolloutPhase

__all__ = [
    "Action",
    "Decision",
    "DeviceView",
    "Evidence",
    "Gate",
    "RolloutConfig",
    "RolloutView",
    "Stage",
    "Status",
    "Tally",
    "Verdict",
    "WaveJudgement",
    "canary_size",
    "judge_wave",
    "step",
    "tally",
    "wave_of",
    "wave_sizes",
    "wave_stage",
]


class Stage(StrEnum):
    CANARY = "canary"
    REST = "rest"
    WAVE = "wave"  # stored as "wave<k>" (see wave_stage)


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


# The longest observe window or timeout a rollout takes (30 days): a longer one is a typo,
# and an endless one (JSON's Infinity) made the first wave's shadow window unsignable after
# the rollout had been created (and had superseded another).
MAX_WAIT_S = 30 * 86_400.0

class Gate(BaseModel):
    """What a wave's evidence must show, per variant under evaluation."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_agreement: float = Field(default=0.97, ge=0, le=1)
    # Shadow-run latency p95 over the variant's on-device profile p95 (where known).
    max_p95_ratio: float | None = Field(default=1.3, gt=0)
    max_error_rate: float = Field(default=0.01, ge=0, le=1)
    # Shadow samples per variant over the wave's devices before it is judged.
    min_requests: int = Field(default=200, ge=1, le=10**9)
    # Share of the wave's devices (not failed to install) that must have reported samples.
    min_device_share: float = Field(default=1.0, gt=0, le=1)
    # How long a wave may take to gather that evidence.
    observe_s: float = Field(default=600.0, gt=0, le=MAX_WAIT_S, allow_inf_nan=False)
    # Share of live requests each device of a wave replays for the evaluation.
    sample_share: float = Field(default=0.05, gt=0, le=1)


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
    canary_timeout_s: float = Field(default=900.0, gt=0, le=MAX_WAIT_S, allow_inf_nan=False)
    device_timeout_s: float = Field(default=1800.0, gt=0, le=MAX_WAIT_S, allow_inf_nan=False)
    # Waves instead of canary and rest: cumulative percents of the target, increasing,
    # the last 100; each judged by ``gate``.
    waves: list[float] | None = Field(default=None, min_length=1, max_length=20)
    gate: Gate = Field(default_factory=lambda: Gate())
    # A failing wave's devices: "rollback" to what they ran before, or "hold" them.
    on_fail: Literal["rollback", "hold"] = "rollback"
    # Offer the variants as profile-only beside what each device runs (``prunefleet
    # tune``): installed, smoke-tested and profiled, never served.
    profile_only: bool = False

    @model_validator(mode="after")
    def _waves(self) -> RolloutConfig:
        if self.profile_only and self.waves is not None:
            raise ValueError("a profile-only rollout has no waves: nothing serves to judge")
        w = self.waves
        if w is not None:
            if any(not 0 < p <= 100 for p in w) or any(b <= a for a, b in itertools.pairwise(w)):
                raise ValueError("waves must be increasing percents in (0, 100]")
            if w[-1] != 100:
                raise ValueError("the last wave must be 100 (percent of the target)")
        return self


@dataclass(frozen=True)
class DeviceView:
    """One device of a rollout as the stepper sees it."""

    device_id: str
    online: bool = True
    stage: Stage | None = None  # None: not offered yet
    offered_at: float | None = None
    phase: RolloutPhase | None = None  # last report for the manifest this rollout offered
    acknowledged: bool = False  # a failure the operator accepted by resuming a halt
    wave: int | None = None  # 1-based, in a rollout with waves
    # Shadow figures per variant under evaluation since the device was offered.
    evidence: Mapping[str, Evidence] = field(default_factory=dict)


@dataclass(frozen=True)
class Evidence:
    """Shadow figures summed over telemetry intervals (and over devices, for a wave)."""

    samples: int = 0
    agreed: int = 0
    divergence_sum: float = 0.0
    errors: int = 0
    p95_ratios: tuple[float, ...] = ()  # per interval, where the profile is known

    def __add__(self, o: Evidence) -> Evidence:
        return Evidence(self.samples + o.samples, self.agreed + o.agreed,
                        self.divergence_sum + o.divergence_sum, self.errors + o.errors,
                        self.p95_ratios + o.p95_ratios)

    @property
    def agreement(self) -> float | None:
        ok = self.samples - self.errors
        return self.agreed / ok if ok > 0 else None

    @property
    def divergence(self) -> float | None:
        ok = self.samples - self.errors
        return self.divergence_sum / ok if ok > 0 else None

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.samples if self.samples else None

    @property
    def p95_ratio(self) -> float | None:
        """The median over intervals: one noisy interval does not decide."""
        r = sorted(self.p95_ratios)
        if not r:
            return None
        mid = len(r) // 2
        return r[mid] if len(r) % 2 else (r[mid - 1] + r[mid]) / 2


@dataclass(frozen=True)
class RolloutView:
    status: Status
    stage: Stage
    stage_started_at: float
    wave: int = 0  # the current wave (1-based) of a rollout with waves


@dataclass(frozen=True)
class Decision:
    action: Action
    devices: tuple[str, ...] = ()
    stage: Stage | None = None
    reason: str = ""
    wave: int | None = None  # OFFER into / PROMOTE to this wave
    rollback: bool = False  # HALT: give ``devices`` back what they ran before
    judgement: WaveJudgement | None = None


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
    if cfg.waves:
        return _step_waves(cfg, rollout, devices, now)

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


# -- waves ----------------------------------------------------------------------------------
def wave_stage(wave: int) -> str:
    """How a wave is stored in a stage column."""
    return f"wave{wave}"


def wave_of(stage: str | None) -> int | None:
    if stage and stage.startswith("wave") and stage[4:].isdigit():
        return int(stage[4:])
    return None


def wave_sizes(waves: Sequence[float], n: int) -> list[int]:
    """Cumulative device counts of each wave; each wave adds at least one device while
    any are left."""
    out: list[int] = []
    for p in waves:
        want = math.ceil(p / 100 * n - 1e-9)
        prev = out[-1] if out else 0
        out.append(min(n, max(want, prev + 1)))
    return out


class Verdict(StrEnum):
    PASS = "pass"
    FAIL = "fail"
    GATHERING = "gathering"  # not enough evidence yet
    INSUFFICIENT = "insufficient"  # not enough evidence within the observe window


@dataclass(frozen=True)
class WaveJudgement:
    """One wave's evidence against its gate, per variant under evaluation."""

    wave: int
    verdict: Verdict
    reason: str
    devices: int = 0
    reporting: int = 0  # devices with any samples
    variants: Mapping[str, Evidence] = field(default_factory=dict)  # weighed per device
    failures: tuple[str, ...] = ()
    # Samples per variant as reported (what ``min_requests`` is counted in, and shown).
    gathered: Mapping[str, int] = field(default_factory=dict)

    def measured(self, gate: Gate) -> dict:
        """The figures against the gate, as ``rollout status`` shows them."""
        out: dict = {}
        for name, e in sorted(self.variants.items()):
            out[name] = {
                "samples": self.gathered.get(name, e.samples),
                "min_requests": gate.min_requests,
                "agreement": e.agreement, "min_agreement": gate.min_agreement,
                "divergence": e.divergence,
                "error_rate": e.error_rate, "max_error_rate": gate.max_error_rate,
                "p95_ratio": e.p95_ratio, "max_p95_ratio": gate.max_p95_ratio,
            }
        return {"wave": self.wave, "verdict": self.verdict.value, "reason": self.reason,
                "devices": self.devices, "reporting": self.reporting, "variants": out,
                "failures": list(self.failures)}


def _misses(gate: Gate, name: str, e: Evidence) -> list[str]:
    out = []
    a, r, p = e.agreement, e.error_rate, e.p95_ratio
    if a is None or a < gate.min_agreement:
        shown = "none" if a is None else f"{a:.3f}"
        out.append(f"{name}: agreement {shown} < {gate.min_agreement}")
    if r is not None and r > gate.max_error_rate:
        out.append(f"{name}: error rate {r:.3f} > {gate.max_error_rate}")
    if gate.max_p95_ratio is not None and p is not None and p > gate.max_p95_ratio:
        out.append(f"{name}: p95 ratio {p:.2f} > {gate.max_p95_ratio}")
    return out


# No device's samples weigh more than this many times the median reporting device's.
MAX_DEVICE_WEIGHT = 2


def wave_evidence(per_device: Sequence[Evidence]) -> Evidence:
    """One variant's evidence over a wave's devices, each device weighed at most
    :data:`MAX_DEVICE_WEIGHT` times the median reporting device (its figures scaled down
    to that many samples), and its p95 ratio as one entry: the median of its intervals.

    Summed as they came, one device with valid credentials could report a billion agreeing
    samples, or a thousand fast intervals, and outweigh every other device of the wave."""
    counts = sorted(e.samples for e in per_device if e.samples > 0)
    cap = MAX_DEVICE_WEIGHT * counts[(len(counts) - 1) // 2] if counts else 0
    samples = agreed = errors = 0
    divergence = 0.0
    ratios = []
    for e in per_device:
        f = cap / e.samples if e.samples > cap else 1.0
        samples += round(e.samples * f)
        agreed += round(e.agreed * f)
        errors += round(e.errors * f)
        divergence += e.divergence_sum * f
        if (p := e.p95_ratio) is not None:
            ratios.append(p)
    return Evidence(samples, agreed, divergence, errors, tuple(ratios))


def judge_wave(gate: Gate, wave: int, devices: Sequence[DeviceView], elapsed_s: float
               ) -> WaveJudgement:
    """The wave's verdict from its own devices' evidence, ``elapsed_s`` after it began."""
    judged = [d for d in devices if d.phase is not RolloutPhase.FAILED]
    per_variant: dict[str, list[Evidence]] = {}
    reporting = 0
    for d in judged:
        if any(e.samples for e in d.evidence.values()):
            reporting += 1
        for name, e in d.evidence.items():
            per_variant.setdefault(name, []).append(e)
    totals = {name: wave_evidence(es) for name, es in per_variant.items()}
    # Enough evidence is counted in samples as reported: weighed, a wave whose quietest
    # device has few samples would cap the others and never gather ``min_requests``. The
    # figures judged are the weighed ones (one device cannot carry them).
    gathered = {name: sum(e.samples for e in es) for name, es in per_variant.items()}

    def verdict(v: Verdict, reason: str, failures: tuple[str, ...] = ()) -> WaveJudgement:
        return WaveJudgement(wave, v, reason, len(devices), reporting, totals, failures,
                             gathered)

    need_devices = math.ceil(gate.min_device_share * len(judged) - 1e-9)
    short = [f"{n}: {gathered[n]} of {gate.min_requests} samples"
             for n in sorted(totals) if gathered[n] < gate.min_requests]
    if not totals and judged:
        short = [f"no shadow samples yet (0 of {gate.min_requests})"]
    enough = not short and reporting >= need_devices
    if enough and judged:
        misses = [m for n, e in sorted(totals.items()) for m in _misses(gate, n, e)]
        if misses:
            return verdict(Verdict.FAIL, "; ".join(misses), tuple(misses))
        return verdict(Verdict.PASS, _figures(totals))
    if not judged:
        why = "every device of the wave failed to install"
    else:
        why = "; ".join(short) if short else ""
        if reporting < need_devices:
            why = (why + "; " if why else "") + (
                f"{reporting} of {len(judged)} devices reported shadow figures "
                f"({need_devices} needed)")
    if elapsed_s > gate.observe_s:
        return verdict(Verdict.INSUFFICIENT,
                       f"insufficient evidence after {gate.observe_s:.0f} s: {why}")
    return verdict(Verdict.GATHERING, why)


def _figures(totals: Mapping[str, Evidence]) -> str:
    parts = []
    for n, e in sorted(totals.items()):
        p = e.p95_ratio
        parts.append(f"{n}: agreement {e.agreement:.3f}, error rate {e.error_rate:.3f}, "
                     f"p95 ratio {'n/a' if p is None else f'{p:.2f}'}, {e.samples} samples")
    return "; ".join(parts) or "nothing new to evaluate"


def _step_waves(cfg: RolloutConfig, rollout: RolloutView, devices: Sequence[DeviceView],
                now: float) -> Decision:
    waves = cfg.waves or [100.0]
    last = len(waves)
    offered = [d for d in devices if d.stage is not None]
    failed = sum(1 for d in offered if d.phase is RolloutPhase.FAILED and not d.acknowledged)
    if offered and failed / len(offered) > cfg.failure_threshold:
        return Decision(Action.HALT, reason=f"{failed} of {len(offered)} offered devices "
                        f"failed to install (failure threshold {cfg.failure_threshold:.0%})")
    k = max(rollout.wave, 1)
    current = [d for d in devices if d.wave == k]
    waiting = sorted((d for d in devices if d.stage is None),
                     key=lambda d: (not d.online, d.device_id))
    sizes = wave_sizes(waves, len(devices))
    want = len(waiting) if k == last else sizes[k - 1] - len(offered)
    if waiting and want > 0 and (not current or k == last):
        pick = tuple(d.device_id for d in waiting[:want])
        return Decision(Action.OFFER, pick, Stage.WAVE, wave=k,
                        reason=f"wave {k}: {len(pick)} device(s), "
                        f"{len(offered) + len(pick)} of {len(devices)} ({waves[k - 1]:g}%)")
    if not current:  # nothing to add in this wave (a small target): go on
        if k == last:
            return Decision(Action.COMPLETE, reason="no devices left to offer")
        return Decision(Action.PROMOTE, wave=k + 1, reason=f"wave {k} had no devices")
    j = judge_wave(cfg.gate, k, current, now - rollout.stage_started_at)
    if j.verdict is Verdict.FAIL:
        return Decision(Action.HALT, tuple(d.device_id for d in current),
                        reason=f"wave {k} failed its gate: {j.reason}",
                        rollback=cfg.on_fail == "rollback", judgement=j)
    if j.verdict is Verdict.INSUFFICIENT:
        return Decision(Action.HALT, reason=f"wave {k}: {j.reason}", judgement=j)
    if j.verdict is Verdict.GATHERING:
        return Decision(Action.WAIT, reason=f"wave {k}: gathering evidence: {j.reason}",
                        judgement=j)
    if k == last:
        return Decision(Action.COMPLETE, reason=f"wave {k} of {last} passed: {j.reason}",
                        judgement=j)
    return Decision(Action.PROMOTE, wave=k + 1,
                    reason=f"wave {k} of {last} passed: {j.reason}", judgement=j)
