"""Runs rollouts: reads them from the store, asks the pure stepper (``rollout.py``) what
to do, does it through the fleet server, and writes the outcome back before the next step.

Everything a rollout is lives in the store, so a restarted server continues where the last
one stopped. Each device of a rollout gets its own signed desired state
(``FleetServer.deploy(device_id, …)``, retained), which is how the canary and the rest get
different manifests, and how a device that was offline catches up when it reconnects.

Targets (:class:`Target`):

* ``devices``: the listed device ids; each must be known to the server.
* ``group``: the devices the server has in that group (``PUT /v1/devices/{id}/groups``).
* ``fleet``: every device the server knows.

Group and fleet membership is resolved again on every tick while the rollout is
unfinished, so a device that joins meanwhile is offered with the rest stage.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from prunefleet.shared.errors import TransportError
from prunefleet.shared.messages import (
    Manifest,
    Name,
    RolloutPhase,
    SignedManifest,
    VariantSpec,
    decode,
)
from prunefleet.shared.policy import PolicyConfig, apply_overrides

from .errors import DistributionError, RolloutError, StoreError
from .fleet import FleetServer
from .rollout import (
    Action,
    Decision,
    DeviceView,
    RolloutConfig,
    RolloutView,
    Stage,
    Status,
    step,
    tally,
)
from .store import RolloutRow, Store

log = logging.getLogger(__name__)

MAX_VARIANT_REFS = 16


class Target(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["devices", "group", "fleet"]
    devices: list[Name] = Field(default_factory=list, max_length=10000)
    group: Name | None = None

    @model_validator(mode="after")
    def _shape(self) -> Target:
        if self.kind == "devices" and not self.devices:
            raise ValueError("a 'devices' target needs at least one device id")
        if self.kind == "devices" and len(set(self.devices)) != len(self.devices):
            raise ValueError("device ids must be unique")
        if self.kind != "devices" and self.devices:
            raise ValueError(f"a {self.kind!r} target takes no device list")
        if self.kind == "group" and self.group is None:
            raise ValueError("a 'group' target needs a group name")
        if self.kind != "group" and self.group is not None:
            raise ValueError(f"a {self.kind!r} target takes no group")
        return self


class RolloutRequest(BaseModel):
    """What ``POST /v1/rollouts`` takes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    target: Target
    # Registered variants, by name (the newest registered under it) or sha256.
    variants: list[str] = Field(min_length=1, max_length=MAX_VARIANT_REFS)
    pinned_variant: Name | None = None
    # Overrides of the agents' policy settings carried in the signed desired state.
    policy: dict[Annotated[str, Field(max_length=64)], float | int | bool | None] | None = (
        Field(default=None, max_length=64)
    )
    config: RolloutConfig = Field(default_factory=RolloutConfig)
    # Take over devices that an unfinished rollout still holds (it becomes "superseded").
    supersede: bool = False


_PUBLISH_ERRORS = (DistributionError, TransportError, RuntimeError, ValueError)


class RolloutController:
    def __init__(
        self,
        fleet: FleetServer,
        store: Store,
        *,
        clock: Callable[[], float] = time.time,
        max_steps: int = 16,
    ):
        self.fleet = fleet
        self.store = store
        self.clock = clock
        self.max_steps = max_steps
        # One writer: API requests and the background tick never interleave.
        self._lock = threading.RLock()

    # -- operator actions -------------------------------------------------------------------
    def create(self, req: RolloutRequest) -> int:
        with self._lock:
            specs = self._resolve_variants(req.variants)
            names = [s.name for s in specs]
            if len(set(names)) != len(names):
                raise RolloutError(f"variant names must be unique, got {names}", 422)
            if req.pinned_variant is not None and req.pinned_variant not in names:
                raise RolloutError(
                    f"pinned variant {req.pinned_variant!r} is not among {names}", 422
                )
            if req.policy:
                try:
                    apply_overrides(PolicyConfig(), req.policy)
                except ValueError as e:
                    raise RolloutError(f"invalid policy override: {e}", 422) from e
            devices = self._resolve_target(req.target, strict=True)
            holders = self._holders(set(devices))
            if holders and not req.supersede:
                ids = ", ".join(f"#{r}" for r in sorted(holders))
                raise RolloutError(
                    f"devices are held by unfinished rollout(s) {ids}: pause is not enough; "
                    "roll them back, wait for them, or pass supersede", 409
                )
            for rid in holders:
                self.store.update_rollout(
                    rid, status=Status.SUPERSEDED.value, reason="superseded by a newer rollout",
                    note="superseded by a newer rollout",
                )
            rid = self.store.create_rollout(
                target_kind=req.target.kind,
                target=req.target.model_dump(mode="json"),
                variants=[s.model_dump(mode="json") for s in specs],
                pinned_variant=req.pinned_variant,
                policy=req.policy,
                config=req.config.model_dump(mode="json"),
                status=Status.ACTIVE.value,
                stage=Stage.CANARY.value,
                devices=devices,
                now=self.clock(),
            )
            log.info("rollout #%d created: %s to %d devices", rid, ", ".join(names), len(devices))
            self._advance(rid)
            return rid

    def pause(self, rollout_id: int) -> None:
        with self._lock:
            row = self._get(rollout_id)
            if row.status != Status.ACTIVE.value:
                raise RolloutError(f"rollout #{rollout_id} is {row.status}, not active", 409)
            self.store.update_rollout(rollout_id, status=Status.PAUSED.value,
                                      reason="paused by the operator", note="paused")

    def resume(self, rollout_id: int) -> None:
        """Resume a paused or halted rollout; failures seen so far are acknowledged."""
        with self._lock:
            row = self._get(rollout_id)
            if row.status not in (Status.PAUSED.value, Status.HALTED.value):
                raise RolloutError(
                    f"rollout #{rollout_id} is {row.status}; only a paused or halted "
                    "rollout resumes", 409,
                )
            acked = self.store.acknowledge_failures(rollout_id)
            note = f"resumed from {row.status}"
            if acked:
                note += f"; {acked} failed device(s) acknowledged"
            self.store.update_rollout(
                rollout_id, status=Status.ACTIVE.value, reason=note,
                stage_started_at=self.clock(), note=note,
            )
            self._advance(rollout_id)

    def rollback(self, rollout_id: int) -> dict:
        """Give every device this rollout offered its previous desired state, re-signed
        with a new (higher) version, since agents refuse versions below one they took."""
        with self._lock:
            row = self._get(rollout_id)
            if row.status in (Status.ROLLED_BACK.value, Status.SUPERSEDED.value):
                raise RolloutError(f"rollout #{rollout_id} is {row.status}", 409)
            rds = [rd for rd in self.store.rollout_devices(rollout_id) if rd.offered_version]
            newer = self._newer_offers(rollout_id, {rd.device_id for rd in rds})
            if newer:
                raise RolloutError(
                    f"a newer rollout (#{min(newer)}) has offered to these devices since; "
                    "roll that one back first", 409,
                )
            # Read every previous manifest before publishing anything: a missing or
            # unreadable one refuses the whole rollback, leaving nothing half done.
            plan: list[tuple[str, Manifest | None, int | None]] = []
            for rd in rds:
                prev = self._manifest(rd.previous_version) if rd.previous_version else None
                plan.append((rd.device_id, prev, rd.previous_version))
            restored: list[str] = []
            skipped: list[str] = []
            for device_id, prev, prev_version in plan:
                if prev is None:
                    skipped.append(device_id)
                    continue
                try:
                    m = self.fleet.deploy(device_id, list(prev.variants),
                                          pinned=prev.pinned_variant, policy=prev.policy)
                except _PUBLISH_ERRORS as e:
                    raise RolloutError(
                        f"rollback of #{rollout_id} stopped at {device_id}: {e}; "
                        f"{len(restored)} device(s) restored so far; run rollback again", 503,
                    ) from e
                self.store.mark_offered(rollout_id, device_id, stage=None, version=m.version,
                                        previous_version=prev_version, now=self.clock())
                restored.append(device_id)
            note = f"rolled back {len(restored)} device(s)"
            if skipped:
                note += (f"; {len(skipped)} had no earlier desired state and keep this "
                         f"one: {', '.join(skipped[:10])}")
            self.store.update_rollout(rollout_id, status=Status.ROLLED_BACK.value,
                                      reason=note, note=note)
            log.info("rollout #%d: %s", rollout_id, note)
            return {"restored": restored, "skipped": skipped}

    def refresh_desired(self, older_than_s: float | None = None) -> int:
        """Re-sign each device's current desired state under a new version, same contents.

        After a key change (so retained states carry the current signatures) and before
        manifests expire (so a device that was offline for long still accepts its state).
        ``older_than_s``: only manifests issued at least that long ago. Rollouts follow the
        new version. Returns how many were republished.
        """
        with self._lock:
            now = self.clock()
            count = 0
            for dev in self.store.devices():
                row = self.store.latest_manifest(dev.device_id)
                if row is None:
                    continue
                if dev.manifest_version is not None and dev.manifest_version > row.version:
                    continue  # it follows a newer (group) manifest: leave that in charge
                m = self._manifest(row.version)
                if m is None or (older_than_s is not None and now - m.issued_at < older_than_s):
                    continue
                try:
                    new = self.fleet.deploy(dev.device_id, list(m.variants),
                                            pinned=m.pinned_variant, policy=m.policy)
                except _PUBLISH_ERRORS as e:
                    log.warning("cannot refresh the desired state of %s: %s", dev.device_id, e)
                    return count
                self.store.retarget_offers(dev.device_id, row.version, new.version)
                count += 1
            if count:
                log.info("re-signed the desired state of %d device(s)", count)
            return count

    # -- background -------------------------------------------------------------------------
    def tick(self) -> None:
        """Advance every unfinished rollout (the serve loop calls this every second)."""
        with self._lock:
            for row in self.store.rollouts([Status.ACTIVE.value]):
                try:
                    if row.target_kind != "devices":
                        target = Target.model_validate(row.target)
                        known = {rd.device_id for rd in self.store.rollout_devices(row.id)}
                        new = [d for d in self._resolve_target(target, strict=False)
                               if d not in known]
                        if new:
                            self.store.add_rollout_devices(row.id, new)
                            self.store.update_rollout(
                                row.id, note=f"{len(new)} device(s) joined the target"
                            )
                    self._advance(row.id)
                except (StoreError, ValidationError) as e:
                    log.error("rollout #%d: %s", row.id, e)

    def run(self, stop: threading.Event, interval_s: float = 1.0) -> None:
        while not stop.wait(interval_s):
            try:
                self.tick()
            except Exception:  # the loop must survive anything one tick meets
                log.exception("rollout tick failed")

    # -- views ------------------------------------------------------------------------------
    def describe(self, rollout_id: int, with_devices: bool = True) -> dict:
        row = self._get(rollout_id)
        return self._describe(row, with_devices)

    def summaries(self) -> list[dict]:
        return [self._describe(r, False) for r in self.store.rollouts()]

    def _describe(self, row: RolloutRow, with_devices: bool) -> dict:
        cfg = RolloutConfig.model_validate(row.config)
        rds = self.store.rollout_devices(row.id)
        online = {d.device_id: d.online for d in self.store.devices()}
        views = [self._view(rd, online) for rd in rds]
        t = tally(cfg, views, self.clock())
        out = {
            "id": row.id,
            "status": row.status,
            "stage": row.stage,
            "reason": row.reason,
            "target": row.target,
            "variants": [{"name": v["name"], "sha256": v["sha256"], "size": v["size"]}
                         for v in row.variants],
            "pinned_variant": row.pinned_variant,
            "policy": row.policy,
            "config": row.config,
            "created_at": row.created_at,
            "updated_at": row.updated_at,
            "counts": {
                "total": t.total, "waiting": t.waiting, "pending": t.pending,
                "succeeded": t.succeeded, "failed": t.failed, "timed_out": t.timed_out,
            },
        }
        if with_devices:
            out["devices"] = [
                {
                    "device_id": rd.device_id, "online": online.get(rd.device_id, False),
                    "stage": rd.stage, "offered_version": rd.offered_version,
                    "offered_at": rd.offered_at, "phase": rd.phase, "progress": rd.progress,
                    "reason": rd.reason, "acknowledged": rd.acknowledged,
                }
                for rd in rds
            ]
            out["history"] = row.history or []
        return out

    # -- internals --------------------------------------------------------------------------
    def _get(self, rollout_id: int) -> RolloutRow:
        row = self.store.rollout(rollout_id)
        if row is None:
            raise RolloutError(f"no rollout #{rollout_id}", 404)
        return row

    @staticmethod
    def _view(rd, online: dict[str, bool]) -> DeviceView:
        return DeviceView(
            device_id=rd.device_id,
            online=online.get(rd.device_id, False),
            stage=Stage(rd.stage) if rd.stage else None,
            offered_at=rd.offered_at,
            phase=RolloutPhase(rd.phase) if rd.phase else None,
            acknowledged=rd.acknowledged,
        )

    def _resolve_variants(self, refs: list[str]) -> list[VariantSpec]:
        specs = []
        for ref in refs:
            row = self.store.variant(ref)
            if row is None:
                raise RolloutError(f"no registered variant {ref!r}", 404)
            specs.append(VariantSpec.model_validate(row.spec))
        return specs

    def _resolve_target(self, target: Target, strict: bool) -> list[str]:
        known = {d.device_id for d in self.store.devices()}
        if target.kind == "devices":
            missing = [d for d in target.devices if d not in known]
            if missing and strict:
                raise RolloutError(
                    f"unknown device(s): {', '.join(missing[:10])}; a device is known once it "
                    "has reported, or after `prunefleet devices set-groups`", 404,
                )
            return [d for d in target.devices if d in known]
        if target.kind == "group":
            members = self.store.group_members(target.group or "")
            if not members and strict:
                raise RolloutError(f"group {target.group!r} has no devices", 422)
            return members
        if not known and strict:
            raise RolloutError("the fleet has no devices yet", 422)
        return sorted(known)

    def _holders(self, devices: set[str]) -> set[int]:
        """Unfinished rollouts that include any of ``devices``."""
        out = set()
        for row in self.store.rollouts():
            if Status(row.status).finished:
                continue
            if any(rd.device_id in devices for rd in self.store.rollout_devices(row.id)):
                out.add(row.id)
        return out

    def _newer_offers(self, rollout_id: int, devices: set[str]) -> set[int]:
        out = set()
        for row in self.store.rollouts():
            if row.id <= rollout_id or row.status == Status.ROLLED_BACK.value:
                continue
            if any(rd.device_id in devices and rd.offered_version
                   for rd in self.store.rollout_devices(row.id)):
                out.add(row.id)
        return out

    def _manifest(self, version: int) -> Manifest | None:
        row = self.store.manifest(version)
        if row is None:
            return None
        signed = decode(SignedManifest, row.signed)
        return decode(Manifest, signed.payload)

    def _previous_version(self, device_id: str) -> int | None:
        """What the device holds (or will take) now: the highest of its reported manifest
        and the last one published to it, since an agent takes the highest it verifies."""
        dev = self.store.device(device_id)
        latest = self.store.latest_manifest(device_id)
        versions = [v for v in (dev.manifest_version if dev else None,
                                latest.version if latest else None) if v]
        for v in sorted(versions, reverse=True):
            if self.store.manifest(v) is not None:
                return v
        return None

    def _advance(self, rollout_id: int) -> None:
        for _ in range(self.max_steps):
            row = self._get(rollout_id)
            cfg = RolloutConfig.model_validate(row.config)
            online = {d.device_id: d.online for d in self.store.devices()}
            views = [self._view(rd, online) for rd in self.store.rollout_devices(rollout_id)]
            rv = RolloutView(Status(row.status), Stage(row.stage), row.stage_started_at)
            d = step(cfg, rv, views, self.clock())
            if d.action is Action.WAIT or not self._apply(row, d):
                return

    def _apply(self, row: RolloutRow, d: Decision) -> bool:
        """Carry out one decision; False when it could not (try again next tick)."""
        now = self.clock()
        if d.action is Action.OFFER:
            specs = [VariantSpec.model_validate(v) for v in row.variants]
            for device_id in d.devices:
                prev = self._previous_version(device_id)
                try:
                    m = self.fleet.deploy(device_id, specs, pinned=row.pinned_variant,
                                          policy=row.policy)
                except _PUBLISH_ERRORS as e:
                    log.warning("rollout #%d: cannot offer to %s yet: %s", row.id, device_id, e)
                    return False
                self.store.mark_offered(row.id, device_id, stage=d.stage.value if d.stage
                                        else None, version=m.version, previous_version=prev,
                                        now=now)
            self.store.update_rollout(row.id, note=f"offered: {d.reason}")
        elif d.action is Action.PROMOTE:
            self.store.update_rollout(row.id, stage=Stage.REST.value, stage_started_at=now,
                                      reason=f"promoted: {d.reason}", note=f"promoted: {d.reason}")
        elif d.action is Action.HALT:
            self.store.update_rollout(row.id, status=Status.HALTED.value,
                                      reason=f"halted: {d.reason}", note=f"halted: {d.reason}")
        elif d.action is Action.COMPLETE:
            self.store.update_rollout(row.id, status=Status.COMPLETED.value,
                                      reason=f"completed: {d.reason}",
                                      note=f"completed: {d.reason}")
        log.info("rollout #%d: %s %s", row.id, d.action.value, d.reason)
        return True
