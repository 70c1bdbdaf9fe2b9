"""Runs rollouts: reads them from the store, asks the pure stepper (``rollout.py``) what
to do, does it through the fleet server, and writes the outcome back before the next step.

Everything a rollout is lives in the store, so a restarted server continues where the last
one stopped. Each device of a rollout gets its own signed desired state
(``FleetServer.deploy(device_id, …)``, retained), which is how the canary and the rest get
different manifests, and how a device that was offline catches up when it reconnects.

Targets (:class:`Target`):

* ``devices``: the listed device ids; each must be known to the server.
* ``group``: the devices the server has in that group (``PUT /v1/devices/{id}/groups``).
* ``class``: the devices whose last reported facts name that ``device_class``. The class
  is a fact each device reports, not membership the server grants: a device that lies
  about it can at most put itself into a rollout offered to that class.
* ``fleet``: every device the server knows.

Group, class and fleet membership is resolved again on every tick while the rollout is
unfinished, so a device that joins meanwhile is offered with the rest stage.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Annotated, Literal

import paho.mqtt.client as mqtt
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.config import JsonDict

from prunefleet.shared.errors import TransportError
from prunefleet.shared.messages import (
    Manifest,
    Name,
    RolloutPhase,
    ShadowSpec,
    SignedManifest,
    VariantSpec,
    decode,
)
from prunefleet.shared.policy import PolicyConfig, apply_overrides

from .errors import DistributionError, LeaseLostError, RolloutError, StoreError
from .fleet import FleetServer
from .rollout import (
    Action,
    Decision,
    DeviceView,
    Evidence,
    RolloutConfig,
    RolloutView,
    Stage,
    Status,
    step,
    tally,
    wave_of,
    wave_stage,
)
from .store import RolloutRow, Store

log = logging.getLogger(__name__)

MAX_VARIANT_REFS = 16
LEASE = "rollout-controller"


_NO_DEVICES: JsonDict = {"type": "array", "maxItems": 0}
_NO_GROUP: JsonDict = {"type": "null"}


class Target(BaseModel):
    # The document states the shape rules of _shape too, so a client (or a fuzzer) that
    # follows it is never refused for them.
    model_config = ConfigDict(extra="forbid", frozen=True, json_schema_extra={"oneOf": [
        {"properties": {"kind": {"const": "devices"},
                        "devices": {"type": "array", "minItems": 1, "uniqueItems": True},
                        "group": _NO_GROUP, "device_class": _NO_GROUP},
         "required": ["kind", "devices"]},
        {"properties": {"kind": {"const": "group"}, "devices": _NO_DEVICES,
                        "group": {"type": "string"}, "device_class": _NO_GROUP},
         "required": ["kind", "group"]},
        {"properties": {"kind": {"const": "class"}, "devices": _NO_DEVICES,
                        "group": _NO_GROUP, "device_class": {"type": "string"}},
         "required": ["kind", "device_class"]},
        {"properties": {"kind": {"const": "fleet"}, "devices": _NO_DEVICES,
                        "group": _NO_GROUP, "device_class": _NO_GROUP}, "required": ["kind"]},
    ]})

    kind: Literal["devices", "group", "class", "fleet"]
    devices: list[Name] = Field(default_factory=list, max_length=10000)
    group: Name | None = None
    # The reported device class (``DeviceFacts.device_class``) of a "class" target.
    device_class: Name | None = None

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
        if self.kind == "class" and self.device_class is None:
            raise ValueError("a 'class' target needs a device class")
        if self.kind != "class" and self.device_class is not None:
            raise ValueError(f"a {self.kind!r} target takes no device class")
        return self


class RolloutRequest(BaseModel):
    """What ``POST /v1/rollouts`` takes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    target: Target
    # Registered variants, by name (the newest registered under it) or sha256.
    variants: list[str] = Field(min_length=1, max_length=MAX_VARIANT_REFS,
                                json_schema_extra={"uniqueItems": True})
    pinned_variant: Name | None = None
    # Overrides of the agents' policy settings carried in the signed desired state.
    policy: dict[Annotated[str, Field(max_length=64)], float | int | bool | None] | None = (
        Field(default=None, max_length=64)
    )
    config: RolloutConfig = Field(default_factory=RolloutConfig)
    # Take over devices that an unfinished rollout still holds (it becomes "superseded").
    supersede: bool = False


class ReprofileRequest(BaseModel):
    """What ``POST /v1/profiles/refresh`` takes: profile every installed variant again on a
    device or on every device of a group. ``kind`` None: a device the server knows, else
    a group."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    target: Name
    kind: Literal["device", "group"] | None = None


class PinRequest(BaseModel):
    """What ``POST /v1/pins`` takes: pin ``variant`` (None: unpin) on a device or on every
    device of a group. ``kind`` None: a device the server knows, else a group."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    target: Name
    variant: Name | None = None
    kind: Literal["device", "group"] | None = None


_PUBLISH_ERRORS = (DistributionError, TransportError, RuntimeError, ValueError)
# A group state younger than this that a device has not taken yet is still on its way to it.
GROUP_STATE_ON_ITS_WAY_S = 600.0


class RolloutController:
    def __init__(
        self,
        fleet: FleetServer,
        store: Store,
        *,
        clock: Callable[[], float] = time.time,
        max_steps: int = 16,
        holder: str | None = None,
        lease_ttl_s: float = 10.0,
    ):
        """``holder``: this replica's id for the controller lease in the store; with one,
        only the replica holding the lease applies rollout steps (None: always this one)."""
        self.fleet = fleet
        self.store = store
        self.clock = clock
        self.max_steps = max_steps
        self.holder = holder
        self.lease_ttl_s = lease_ttl_s
        self._lease_until = 0.0
        self.lease_lost = 0  # steps refused by the fence: the lease went while one ran
        # Desired states published again by repair_desired (acknowledged by the broker),
        # which (target, version), and those sent and not yet acknowledged.
        self.republished = 0
        self._republished: set[tuple[str, int]] = set()
        self._repairs_pending: dict[tuple[str, int], mqtt.MQTTMessageInfo] = {}
        # One writer: API requests and the background tick never interleave.
        self._lock = threading.RLock()
        # Desired states published under the lock, waited for after it is released.
        self._sent: list[mqtt.MQTTMessageInfo] = []

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold the lock for the work, then wait on the broker's acknowledgements outside
        it: an operator's pause is never stuck behind a slow or absent broker."""
        sent: list[mqtt.MQTTMessageInfo] = []
        try:
            with self._lock:
                try:
                    yield
                finally:
                    sent, self._sent = self._sent, []
        finally:
            self._confirm(sent)

    @staticmethod
    def _confirm(sent: list[mqtt.MQTTMessageInfo], timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        late = 0
        for info in sent:
            info.wait_for_publish(max(0.1, deadline - time.monotonic()))
            late += not info.is_published()
        if late:
            log.warning("the broker has not acknowledged %d desired state(s) yet; they are "
                        "sent when it is reachable again", late)

    # -- lease ------------------------------------------------------------------------------
    @property
    def holds_lease(self) -> bool:
        """Whether this replica may apply rollout steps now."""
        if self.holder is None:
            return True
        # A margin, so the lease lapses here before another replica may take it.
        return self.clock() < self._lease_until - self._margin_s

    def renew_lease(self) -> bool:
        """Take or renew the controller lease (each tick); whether this replica holds it."""
        if self.holder is None:
            return True
        was = self.holds_lease
        try:
            until = self.store.take_lease(LEASE, self.holder, self.lease_ttl_s, self.clock())
        except StoreError as e:
            log.error("cannot renew the rollout controller lease: %s", e)
            until = self._lease_until  # it lapses by itself if the store stays away
        self._lease_until = until or 0.0
        now = self.holds_lease
        if now and not was:
            log.info("%s holds the rollout controller lease: this replica runs rollouts",
                     self.holder)
        elif was and not now:
            log.warning("%s lost the rollout controller lease: another replica runs rollouts",
                        self.holder)
        return now

    @property
    def _margin_s(self) -> float:
        # The lease lapses here this long before another replica may take it.
        return min(1.0, self.lease_ttl_s / 4)

    def _fenced(self) -> AbstractContextManager[None]:
        """The store writes of a rollout step, fenced by the lease: each transaction first
        proves in the store that this replica still holds it, so a holder that stalled
        after its check (a frozen VM, SIGSTOP) writes, signs and publishes nothing once
        another replica took over (``Store.fenced``)."""
        if self.holder is None:
            return nullcontext()
        return self.store.fenced(LEASE, self.holder, self.clock, self._margin_s)

    def _lost_lease(self, e: LeaseLostError, what: str) -> None:
        self._lease_until = 0.0
        self.lease_lost += 1
        log.warning("%s stopped: %s (another replica runs rollouts)", what, e)

    def release_lease(self) -> None:
        """On a clean stop: another replica takes over at once instead of after the TTL."""
        if self.holder is not None and self._lease_until:
            self._lease_until = 0.0
            try:
                self.store.release_lease(LEASE, self.holder)
            except StoreError as e:
                log.warning("cannot release the rollout controller lease: %s", e)

    # -- operator actions -------------------------------------------------------------------
    def create(self, req: RolloutRequest) -> int:
        with self._locked():
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
            hoppers = self._class_hoppers(req.target, devices)
            if hoppers:
                devices = [d for d in devices if d not in hoppers]
                log.info("rollout to class %s: %d device(s) left out, in another class's "
                         "unfinished rollout: %s", req.target.device_class, len(hoppers),
                         ", ".join(sorted(hoppers)[:10]))
                if not devices:
                    raise RolloutError(
                        f"every device reporting the class {req.target.device_class!r} is in "
                        "another class's unfinished rollout", 409)
            if req.config.profile_only:
                self._check_profile_only(req, specs, devices)
            holders = self._holders(set(devices))
            if holders and not req.supersede:
                ids = ", ".join(f"#{r}" for r in sorted(holders))
                raise RolloutError(
                    f"devices are held by unfinished rollout(s) {ids}: pause is not enough; "
                    "roll them back, wait for them, or pass supersede", 409
                )
            for rid in holders:
                self._freeze_counts(self._get(rid))
                self.store.update_rollout(
                    rid, status=Status.SUPERSEDED.value, reason="superseded by a newer rollout",
                    note="superseded by a newer rollout",
                )
                log.info("rollout #%d superseded by a newer rollout", rid)
            rid = self.store.create_rollout(
                target_kind=req.target.kind,
                target=req.target.model_dump(mode="json"),
                variants=[s.model_dump(mode="json") for s in specs],
                pinned_variant=req.pinned_variant,
                policy=req.policy,
                config=req.config.model_dump(mode="json"),
                status=Status.ACTIVE.value,
                stage=wave_stage(1) if req.config.waves else Stage.CANARY.value,
                devices=devices,
                now=self.clock(),
            )
            log.info("rollout #%d created: %s to %d devices", rid, ", ".join(names), len(devices))
            self._advance(rid)
            return rid

    def pause(self, rollout_id: int) -> None:
        with self._locked():
            row = self._get(rollout_id)
            if row.status != Status.ACTIVE.value:
                raise RolloutError(f"rollout #{rollout_id} is {row.status}, not active", 409)
            self.store.update_rollout(rollout_id, status=Status.PAUSED.value,
                                      reason="paused by the operator", note="paused")
            log.info("rollout #%d paused by the operator", rollout_id)

    def resume(self, rollout_id: int) -> None:
        """Resume a paused or halted rollout; failures seen so far are acknowledged."""
        with self._locked():
            row = self._get(rollout_id)
            if row.status not in (Status.PAUSED.value, Status.HALTED.value):
                raise RolloutError(
                    f"rollout #{rollout_id} is {row.status}; only a paused or halted "
                    "rollout resumes", 409,
                )
            acked = self.store.acknowledge_failures(rollout_id)
            renewed = self._renew_shadow(row)
            note = f"resumed from {row.status}"
            if renewed:
                note += f"; shadow evaluation renewed on {renewed} device(s) of the wave"
            if acked:
                note += f"; {acked} failed device(s) acknowledged"
            self.store.update_rollout(
                rollout_id, status=Status.ACTIVE.value, reason=note,
                stage_started_at=self.clock(), note=note,
            )
            log.info("rollout #%d %s", rollout_id, note)
            self._advance(rollout_id)

    def rollback(self, rollout_id: int) -> dict:
        """Give every device this rollout offered its previous desired state, re-signed
        with a new (higher) version, since agents refuse versions below one they took."""
        with self._locked():
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
            restored, skipped, unchanged = self._restore(rollout_id, rds)
            # An active or paused rollout that restores nobody still stops offering.
            if not restored and row.status not in (Status.ACTIVE.value, Status.PAUSED.value):
                why = (f"{len(unchanged)} device(s) already run what they ran before"
                       if unchanged else "no device has an earlier desired state")
                raise RolloutError(f"rollback of #{rollout_id} changes nothing: {why}", 409)
            note = f"rolled back {len(restored)} device(s)"
            if skipped:
                note += (f"; {len(skipped)} had no earlier desired state and keep this "
                         f"one: {', '.join(skipped[:10])}")
            if unchanged:
                note += f"; {len(unchanged)} already ran what they ran before"
            self._freeze_counts(row)
            self.store.update_rollout(rollout_id, status=Status.ROLLED_BACK.value,
                                      reason=note, note=note)
            log.info("rollout #%d %s", rollout_id, note)
            out: dict = {"restored": restored, "skipped": skipped}
            if unchanged:
                out["unchanged"] = unchanged
            return out

    def _restore(self, rollout_id: int, rds: list) -> tuple[list[str], list[str], list[str]]:
        """Give ``rds`` their previous desired state: (restored, skipped for having none,
        unchanged because they already follow one with the same contents)."""
        # Read every previous manifest before publishing anything: a missing or
        # unreadable one refuses the whole rollback, leaving nothing half done.
        plan: list[tuple[str, Manifest | None, Manifest | None, int | None]] = []
        for rd in rds:
            prev = self._manifest(rd.previous_version) if rd.previous_version else None
            cur = self._manifest(rd.offered_version) if rd.offered_version else None
            plan.append((rd.device_id, prev, cur, rd.previous_version))
        restored: list[str] = []
        skipped: list[str] = []
        unchanged: list[str] = []
        for device_id, prev, cur, prev_version in plan:
            if prev is None:
                skipped.append(device_id)
                continue
            if cur is not None and _same_state(cur, prev):
                unchanged.append(device_id)
                continue
            try:
                m = self.fleet.deploy(device_id, list(prev.variants), sent=self._sent,
                                      pinned=prev.pinned_variant, policy=prev.policy,
                                      reprofile=max(prev.reprofile,
                                                    cur.reprofile if cur else 0))
            except _PUBLISH_ERRORS as e:
                raise RolloutError(
                    f"rollback of #{rollout_id} stopped at {device_id}: {e}; "
                    f"{len(restored)} device(s) restored so far; run rollback again", 503,
                ) from e
            self.store.mark_offered(rollout_id, device_id, stage=None, version=m.version,
                                    previous_version=prev_version, now=self.clock())
            restored.append(device_id)
        return restored, skipped, unchanged

    def _renew_shadow(self, row: RolloutRow) -> int:
        """A resumed wave gets a new observe window: its devices' desired state again, with
        shadow evaluation until the window's end (the old one has ended on the devices)."""
        wave = wave_of(row.stage)
        if not wave:
            return 0
        cfg = RolloutConfig.model_validate(row.config)
        count = 0
        for rd in self.store.rollout_devices(row.id):
            m = self._manifest(rd.offered_version) if rd.offered_version else None
            if wave_of(rd.stage) != wave or m is None or m.shadow is None:
                continue
            shadow = m.shadow.model_copy(update={"until": self.clock() + cfg.gate.observe_s})
            try:
                new = self.fleet.deploy(rd.device_id, list(m.variants), pinned=m.pinned_variant,
                                        policy=m.policy, shadow=shadow, sent=self._sent,
                                        reprofile=m.reprofile)
            except _PUBLISH_ERRORS as e:
                raise RolloutError(f"resume of #{row.id} stopped at {rd.device_id}: {e}; "
                                   "resume again", 503) from e
            self.store.retarget_offers(rd.device_id, m.version, new.version)
            count += 1
        return count

    def _freeze_counts(self, row: RolloutRow) -> None:
        """Keep a finishing rollout's counts as they are now: they never change after."""
        counts = self._describe(row, False)["counts"]
        self.store.put_rollout_record(row.id, "counts", counts, now=self.clock())

    def pin(self, req: PinRequest) -> dict:
        """Pin (or unpin) through the signed desired state: each device gets its current
        desired state (the newest this server issued to it or to one of its groups) again,
        same variants and policy, with the pin, under a new version. Nothing else can pin:
        agents take no unsigned command."""
        with self._locked():
            kind, devices = self._members(req.target, req.kind)
            groups = self.store.device_groups()
            plan: list[tuple[str, int | None, Manifest]] = []
            skipped: list[dict] = []
            for device_id in devices:
                own, m = self._current(device_id, groups)
                why = None
                if m is None:
                    why = "no desired state from this server yet"
                elif req.variant and req.variant not in {v.name for v in m.variants}:
                    why = f"{req.variant!r} is not in its desired state v{m.version}"
                elif req.variant in m.profile_only:
                    why = f"{req.variant!r} is only being profiled there (prunefleet tune)"
                elif m.pinned_variant == req.variant:
                    why = f"already {'pinned to ' + req.variant if req.variant else 'unpinned'}"
                if why or m is None:
                    skipped.append({"device_id": device_id, "reason": why})
                    continue
                plan.append((device_id, own, m))
            if kind == "device" and skipped and "already" not in skipped[0]["reason"]:
                raise RolloutError(f"cannot pin {req.target}: {skipped[0]['reason']}", 409)
            done: list[dict] = []
            for device_id, own, m in plan:
                try:
                    # The same state, pin aside: a wave's shadow section stays, so the
                    # device keeps gathering the evidence its wave is judged on.
                    new = self.fleet.deploy(device_id, list(m.variants), pinned=req.variant,
                                            policy=m.policy, shadow=m.shadow, sent=self._sent,
                                            reprofile=m.reprofile)
                except _PUBLISH_ERRORS as e:
                    raise RolloutError(
                        f"pin stopped at {device_id}: {e}; {len(done)} device(s) done so "
                        "far; run it again", 503) from e
                if own is not None:
                    self.store.retarget_offers(device_id, own, new.version)
                done.append({"device_id": device_id, "manifest_version": new.version})
            log.info("%s %s on %d device(s)", "pinned " + req.variant if req.variant
                     else "unpinned", req.target, len(done))
            return {"target": req.target, "kind": kind, "variant": req.variant,
                    "devices": done, "skipped": skipped}

    def reprofile(self, req: ReprofileRequest) -> dict:
        """Ask a device, or every device of a group, to profile each installed variant
        again: its current desired state (as :meth:`pin` finds it) under a new version,
        with a new re-profile epoch (``Manifest.reprofile``). The epoch is the next
        manifest version, above every one issued so far, so a device acts on it once
        whatever desired states came before; later ones carry it on."""
        with self._locked():
            kind, devices = self._members(req.target, req.kind)
            groups = self.store.device_groups()
            epoch = self.fleet.next_manifest_version()
            done: list[dict] = []
            skipped: list[dict] = []
            for device_id in devices:
                own, m = self._current(device_id, groups)
                if m is None:
                    skipped.append({"device_id": device_id,
                                    "reason": "no desired state from this server yet"})
                    continue
                try:
                    new = self.fleet.deploy(device_id, list(m.variants), pinned=m.pinned_variant,
                                            policy=m.policy, shadow=m.shadow, sent=self._sent,
                                            reprofile=max(epoch, m.reprofile + 1))
                except _PUBLISH_ERRORS as e:
                    raise RolloutError(
                        f"re-profile request stopped at {device_id}: {e}; {len(done)} "
                        "device(s) done so far; run it again", 503) from e
                if own is not None:
                    self.store.retarget_offers(device_id, own, new.version)
                done.append({"device_id": device_id, "manifest_version": new.version,
                             "reprofile": new.reprofile})
            if kind == "device" and skipped:
                raise RolloutError(f"cannot ask {req.target} to profile again: "
                                   f"{skipped[0]['reason']}", 409)
            log.info("asked %d device(s) of %s to profile again", len(done), req.target)
            return {"target": req.target, "kind": kind, "devices": done, "skipped": skipped}

    def _members(self, target: str, kind: str | None) -> tuple[str, list[str]]:
        """(kind, devices) of a device or group target; ``kind`` None: a device the server
        knows, else a group."""
        kind = kind or ("device" if self.store.device(target) else "group")
        if kind == "device":
            if self.store.device(target) is None:
                raise RolloutError(f"no device {target!r}", 404)
            return kind, [target]
        devices = self.store.group_members(target)
        if not devices:
            raise RolloutError(f"no device {target!r} and no group of that name with "
                               "devices", 404)
        return kind, devices

    def _current(self, device_id: str, groups: dict[str, list[str]]
                 ) -> tuple[int | None, Manifest | None]:
        """The device's current desired state: the newest this server issued to it or to
        one of its groups; and that version when it is the device's own (rollouts that
        offered it follow the new one), else None."""
        rows = [r for r in (self.store.latest_manifest(t) for t in
                            (device_id, *groups.get(device_id, []))) if r]
        row = max(rows, key=lambda r: r.version, default=None)
        m = self._manifest(row.version) if row else None
        own = row.version if row is not None and row.target == device_id else None
        return own, m

    def refresh_desired(self, older_than_s: float | None = None) -> int:
        """Re-sign each device's current desired state under a new version, same contents.

        After a key change (so retained states carry the current signatures) and before
        manifests expire (so a device that was offline for long still accepts its state).
        ``older_than_s``: only manifests issued at least that long ago. Rollouts follow the
        new version. Returns how many were republished.
        """
        if not self.holds_lease:
            return 0  # the replica holding the lease refreshes them
        done: list[str] = []
        with self._locked():
            try:
                with self._fenced():
                    self._refresh_desired(older_than_s, done)
            except LeaseLostError as e:
                self._lost_lease(e, "re-signing desired states")
        count = len(done)
        if count:
            log.info("re-signed the desired state of %d device(s)", count)
        return count

    def _refresh_desired(self, older_than_s: float | None, done: list[str]) -> None:
        now = self.clock()
        # One query for every device's newest manifest, and only the old enough ones are
        # read and decoded (this runs every few minutes, for the whole fleet).
        latest = self.store.latest_manifest_versions()
        groups = self.store.device_groups()
        for dev in self.store.devices():
            newest = latest.get(dev.device_id)
            if newest is None:
                continue
            version, created_at = newest
            if dev.manifest_version is not None and dev.manifest_version > version:
                continue  # it follows a newer (group) manifest: leave that in charge
            if any(latest[g][0] > version and now - latest[g][1] < GROUP_STATE_ON_ITS_WAY_S
                   for g in groups.get(dev.device_id, ()) if g in latest):
                # A newer group state, published moments ago, is on its way: re-signed,
                # the device's own state would be newer still and override it. (One the
                # device has not taken for longer, it does not follow: a group the server
                # gave it that its agent does not ask for. Its own state is re-signed.)
                continue
            if older_than_s is not None and now - created_at < older_than_s:
                continue  # signed at its save: not old enough (checked again below)
            m = self._manifest(version)
            if m is None or (older_than_s is not None and now - m.issued_at < older_than_s):
                continue
            try:
                new = self.fleet.deploy(dev.device_id, list(m.variants), sent=self._sent,
                                        pinned=m.pinned_variant, policy=m.policy,
                                        shadow=m.shadow, reprofile=m.reprofile)
            except _PUBLISH_ERRORS as e:
                log.warning("cannot refresh the desired state of %s: %s", dev.device_id, e)
                return
            self.store.retarget_offers(dev.device_id, version, new.version)
            done.append(dev.device_id)

    def repair_desired(self, settle_s: float = 30.0) -> int:
        """Publish again, as stored, the newest desired state of each online device that
        reports an older version than it, once per (target, version) in this process.

        The broker's retained desired state can be older than the store's newest: a
        replica that saved a desired state, then stalled past its lease (a frozen VM)
        before publishing it, publishes it when it wakes, over the newer one the next
        holder published meanwhile; or it died between the save and the publish, and the
        newest state never reached the broker at all. The store's fence cannot reach the
        broker (docs/scaling.md). A device that comes online then follows the older state
        and reports its version: this puts the newest one back. A state signed less than
        ``settle_s`` ago may still be on its way, and one the device answered (its
        rollout report names that version: refused, failed) is not sent again. Only on
        the replica holding the controller lease, and while the broker is connected;
        returns how many were sent (``republished`` counts those the broker
        acknowledged)."""
        self._settle_repairs()
        if not self.holds_lease or not self.fleet.transport.connected.is_set():
            return 0  # not while the broker is away: paho would queue them, blind
        # Read without the controller's lock (this reads the whole fleet; an operator's
        # request must not wait on it): each state is checked again against the store,
        # under the lock that orders deploys, as it is sent (FleetServer.republish_newest).
        now = self.clock()
        latest = self.store.latest_manifest_versions()
        groups = self.store.device_groups()
        sent = 0
        for device_id, reported in self.store.online_versions():
            options = [(latest[t][0], latest[t][1], t, t != device_id)
                       for t in (device_id, *groups.get(device_id, ())) if t in latest]
            if not options:
                continue
            version, created_at, target, group = max(options)
            key = (target, version)
            if ((reported or 0) >= version or now - created_at < settle_s
                    or key in self._republished or key in self._repairs_pending):
                continue
            report = self.store.rollout_report(device_id)
            if report is not None and report.manifest_version >= version:
                continue  # it answered that version: sending it again changes nothing
            infos: list[mqtt.MQTTMessageInfo] = []
            try:
                if not self.fleet.republish_newest(target, version, group, sent=infos):
                    continue
            except _PUBLISH_ERRORS as e:  # the broker went away meanwhile: next pass
                log.warning("cannot publish the desired state of %s again: %s", target, e)
                break
            self._repairs_pending.update((key, info) for info in infos)
            sent += 1
            log.warning("%s reports desired-state version %s, but the newest for %s %s is "
                        "%d: publishing it again", device_id, reported,
                        "group" if group else "device", target, version)
        self._settle_repairs()
        return sent

    def _settle_repairs(self) -> None:
        """Count the repairs the broker has acknowledged (never waiting: the pass runs on
        the tick's thread, which renews the lease); those it has not stay pending, not
        sent again by this process until it does or they fail."""
        for key, info in list(self._repairs_pending.items()):
            try:
                done, failed = info.is_published(), info.rc != mqtt.MQTT_ERR_SUCCESS
            except (RuntimeError, ValueError):
                done, failed = False, True
            if done:
                self._republished.add(key)
                self.republished += 1
            if done or failed:
                del self._repairs_pending[key]

    # -- background -------------------------------------------------------------------------
    def tick(self) -> None:
        """Advance every unfinished rollout (the serve loop calls this every second), on
        the replica that holds the controller lease."""
        if not self.renew_lease():
            return
        with self._locked(), self._fenced():
            for row in self.store.rollouts([Status.ACTIVE.value]):
                try:
                    if row.target_kind != "devices":
                        target = Target.model_validate(row.target)
                        known = {rd.device_id for rd in self.store.rollout_devices(row.id)}
                        new = [d for d in self._resolve_target(target, strict=False)
                               if d not in known]
                        if new:  # one in another unfinished rollout joins once it ends
                            held = self._held(set(new))
                            new = [d for d in new if d not in held]
                        if new:
                            self.store.add_rollout_devices(row.id, new)
                            self.store.update_rollout(
                                row.id, note=f"{len(new)} device(s) joined the target"
                            )
                    self._advance(row.id)
                except LeaseLostError as e:
                    self._lost_lease(e, f"rollout #{row.id}")
                    return
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
        records = self.store.rollout_records(row.id)
        counts = {
            "total": t.total, "waiting": t.waiting, "pending": t.pending,
            "succeeded": t.succeeded, "failed": t.failed, "timed_out": t.timed_out,
        }
        if Status(row.status).finished and "counts" in records:
            counts = records["counts"]
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
            "counts": counts,
        }
        if cfg.waves:
            out["wave"] = wave_of(row.stage)
            out["waves"] = [records[k] for k in sorted(
                (k for k in records if wave_of(k)), key=lambda k: wave_of(k) or 0)]
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
    def _view(rd, online: dict[str, bool],
              evidence: dict[str, Evidence] | None = None) -> DeviceView:
        wave = wave_of(rd.stage)
        return DeviceView(
            device_id=rd.device_id,
            online=online.get(rd.device_id, False),
            stage=Stage.WAVE if wave else Stage(rd.stage) if rd.stage else None,
            offered_at=rd.offered_at,
            phase=RolloutPhase(rd.phase) if rd.phase else None,
            acknowledged=rd.acknowledged,
            wave=wave,
            evidence=evidence or {},
        )

    def _evidence(self, row: RolloutRow, wave: int) -> dict[str, dict[str, Evidence]]:
        """Per device of the wave, per variant of the rollout: the shadow figures it
        reported for this rollout since it was offered (a name the rollout does not offer is
        no evidence: a device could otherwise hold a wave on a variant nobody sends)."""
        names = {v["name"] for v in row.variants}
        sums: dict[tuple[str, str], list] = {}
        for r in self.store.rollout_shadow_rows(row.id, wave_stage(wave)):
            if r.variant not in names:
                continue
            acc = sums.setdefault((r.device_id, r.variant), [0, 0, 0.0, 0, []])
            acc[0] += r.samples
            acc[1] += r.agreed
            acc[2] += r.divergence_sum
            acc[3] += r.errors
            if r.latency_ms_p95 is not None and r.profile_latency_ms:
                acc[4].append(r.latency_ms_p95 / r.profile_latency_ms)
        out: dict[str, dict[str, Evidence]] = {}
        for (device_id, variant), (n, agreed, div, errors, ratios) in sums.items():
            out.setdefault(device_id, {})[variant] = Evidence(n, agreed, div, errors,
                                                              tuple(ratios))
        return out

    def _wave_manifest(self, row: RolloutRow, specs: list[VariantSpec], prev: Manifest | None,
                       cfg: RolloutConfig, now: float
                       ) -> tuple[list[VariantSpec], ShadowSpec | None]:
        """A wave's desired state: the rollout's variants beside what the device had (the
        reference stays installed), and shadow evaluation of those new to it."""
        names = {s.name for s in specs}
        # Candidates a tune left behind are not carried into a wave.
        kept = [v for v in prev.variants if v.name not in names and not v.profile_only
                ] if prev else []
        had = {v.sha256 for v in prev.variants if not v.profile_only} if prev else set()
        new = [s.name for s in specs if s.sha256 not in had]
        shadow = None
        if new:
            shadow = ShadowSpec(rollout_id=row.id, sample_share=cfg.gate.sample_share,
                                variants=new, until=now + cfg.gate.observe_s)
        return (specs + kept)[:MAX_VARIANT_REFS], shadow

    def _check_profile_only(self, req: RolloutRequest, specs: list[VariantSpec],
                            devices: list[str]) -> None:
        """A profile-only rollout keeps each device's own desired state (its variants, pin
        and policy) and adds the candidates beside it: each device needs one, with room."""
        if req.pinned_variant is not None or req.policy:
            raise RolloutError("a profile-only rollout takes no pin and no policy: each "
                               "device keeps its own", 422)
        if req.target.kind != "devices":
            raise RolloutError("a profile-only rollout names its devices", 422)
        bare, full = [], []
        for device_id in devices:
            prev = self._previous_version(device_id)
            pm = self._manifest(prev) if prev else None
            if pm is None:
                bare.append(device_id)
            elif len(_profile_offer(specs, pm)) > MAX_VARIANT_REFS:
                full.append(device_id)
        if bare:
            raise RolloutError(f"no desired state from this server yet on "
                               f"{', '.join(bare[:10])}: nothing would serve beside the "
                               "profile-only variants", 422)
        if full:
            raise RolloutError(f"more than {MAX_VARIANT_REFS} variants with the candidates "
                               f"on {', '.join(full[:10])}: offer fewer", 422)

    def _resolve_variants(self, refs: list[str]) -> list[VariantSpec]:
        specs = []
        for ref in refs:
            row = self.store.variant(ref)
            if row is None:
                raise RolloutError(f"no registered variant {ref!r}", 404)
            specs.append(VariantSpec.model_validate(row.spec))
        return specs

    def _resolve_target(self, target: Target, strict: bool) -> list[str]:
        """The target's devices, revoked ones left out (they are offered nothing)."""
        revoked = set(self.store.revocations())
        return [d for d in self._target_devices(target, strict) if d not in revoked]

    def _target_devices(self, target: Target, strict: bool) -> list[str]:
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
        if target.kind == "class":
            members = self.store.class_members(target.device_class or "")
            if not members and strict:
                raise RolloutError(f"no device has reported the class {target.device_class!r}",
                                   422)
            return members
        if not known and strict:
            raise RolloutError("the fleet has no devices yet", 422)
        return sorted(known)

    def _holders(self, devices: set[str]) -> set[int]:
        """Unfinished rollouts that include any of ``devices``."""
        return set(self._held(devices).values())

    def _held(self, devices: set[str]) -> dict[str, int]:
        """Those of ``devices`` in an unfinished rollout, and which."""
        out: dict[str, int] = {}
        for row in self.store.rollouts():
            if Status(row.status).finished:
                continue
            for rd in self.store.rollout_devices(row.id):
                if rd.device_id in devices:
                    out[rd.device_id] = row.id
        return out

    def _class_hoppers(self, target: Target, devices: list[str]) -> set[str]:
        """Devices of a class target held by an unfinished rollout to another class: they
        reported that class then this one. The class is the device's word, so such a
        device must not hold (409) or supersede the other class's rollout; it stays where
        it was offered and joins this one when that one ends."""
        if target.kind != "class":
            return set()
        held = self._held(set(devices))
        rows = {rid: self._get(rid) for rid in set(held.values())}
        return {device_id for device_id, rid in held.items()
                if rows[rid].target_kind == "class"
                and (rows[rid].target or {}).get("device_class") != target.device_class}

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
            wave = wave_of(row.stage)
            evidence = self._evidence(row, wave) if wave else {}
            views = [self._view(rd, online, evidence.get(rd.device_id) if wave and
                                wave_of(rd.stage) == wave else None)
                     for rd in self.store.rollout_devices(rollout_id)]
            rv = RolloutView(Status(row.status), Stage.WAVE if wave else Stage(row.stage),
                             row.stage_started_at, wave or 0)
            d = step(cfg, rv, views, self.clock())
            if d.judgement is not None:
                rec = {**d.judgement.measured(cfg.gate), "action": d.action.value}
                if self.store.rollout_records(rollout_id).get(wave_stage(d.judgement.wave)) \
                        != rec:
                    self.store.put_rollout_record(rollout_id, wave_stage(d.judgement.wave),
                                                  rec, now=self.clock())
            if d.action is Action.WAIT or not self._apply(row, d):
                return

    def _apply(self, row: RolloutRow, d: Decision) -> bool:
        """Carry out one decision; False when it could not (try again next tick)."""
        if not self.holds_lease:
            return False  # the replica holding the lease applies it
        try:
            with self._fenced():
                return self._apply_step(row, d)
        except LeaseLostError as e:
            self._lost_lease(e, f"rollout #{row.id}: {d.action.value}")
            return False

    def _apply_step(self, row: RolloutRow, d: Decision) -> bool:
        now = self.clock()
        if d.action is Action.OFFER:
            specs = [VariantSpec.model_validate(v) for v in row.variants]
            cfg = RolloutConfig.model_validate(row.config)
            for device_id in d.devices:
                # Kept before the offer is signed: a server killed between signing and
                # marking the offer must not take its own new manifest for what the
                # device ran before (a rollback would then restore nothing).
                prev = self.store.previous_before_offer(row.id, device_id,
                                                        self._previous_version(device_id))
                offer, shadow = specs, None
                pinned, policy = row.pinned_variant, row.policy
                pm = self._manifest(prev) if prev else None
                if d.wave is not None:
                    offer, shadow = self._wave_manifest(row, specs, pm, cfg, now)
                elif cfg.profile_only and pm is not None:
                    offer = _profile_offer(specs, pm)
                    pinned, policy = pm.pinned_variant, pm.policy
                try:
                    m = self.fleet.deploy(device_id, offer, pinned=pinned,
                                          policy=policy, shadow=shadow, sent=self._sent,
                                          reprofile=pm.reprofile if pm else 0)
                except _PUBLISH_ERRORS as e:
                    log.warning("rollout #%d: cannot offer to %s yet: %s", row.id, device_id, e)
                    return False
                stage = wave_stage(d.wave) if d.wave is not None else (
                    d.stage.value if d.stage else None)
                self.store.mark_offered(row.id, device_id, stage=stage, version=m.version,
                                        previous_version=prev, now=now)
            self.store.update_rollout(row.id, note=f"offered: {d.reason}")
        elif d.action is Action.PROMOTE:
            stage = wave_stage(d.wave) if d.wave is not None else Stage.REST.value
            self.store.update_rollout(row.id, stage=stage, stage_started_at=now,
                                      reason=f"promoted: {d.reason}", note=f"promoted: {d.reason}")
        elif d.action is Action.HALT:
            reason = f"halted: {d.reason}"
            if d.rollback:
                rds = [rd for rd in self.store.rollout_devices(row.id)
                       if rd.device_id in set(d.devices) and rd.offered_version]
                try:
                    restored, skipped, _ = self._restore(row.id, rds)
                except RolloutError as e:  # halt anyway: the operator finishes the rollback
                    reason += f"; {e}"
                else:
                    reason += f"; rolled back its {len(restored)} device(s)"
                    if skipped:
                        reason += f" ({len(skipped)} had no earlier desired state)"
            self.store.update_rollout(row.id, status=Status.HALTED.value,
                                      reason=reason, note=reason)
        elif d.action is Action.COMPLETE:
            self._freeze_counts(row)
            self.store.update_rollout(row.id, status=Status.COMPLETED.value,
                                      reason=f"completed: {d.reason}",
                                      note=f"completed: {d.reason}")
        if d.action is Action.HALT:
            log.warning("rollout #%d halted: %s", row.id, d.reason)
        else:
            log.info("rollout #%d %s: %s", row.id, _DONE[d.action], d.reason)
        return True


_DONE = {Action.OFFER: "offered", Action.PROMOTE: "promoted to the rest stage",
         Action.COMPLETE: "completed"}


def _profile_offer(specs: list[VariantSpec], prev: Manifest) -> list[VariantSpec]:
    """A profile-only offer: what the device's desired state serves (leftover candidates
    dropped), and beside it each candidate it does not have already, profile-only. A
    candidate whose name the device's set uses for another digest is not offered there."""
    kept = [v for v in prev.variants if not v.profile_only]
    names, digests = {v.name for v in kept}, {v.sha256 for v in kept}
    return kept + [s.model_copy(update={"profile_only": True}) for s in specs
                   if s.sha256 not in digests and s.name not in names]


def _same_state(a: Manifest, b: Manifest) -> bool:
    """The same desired contents, whatever the version and signature."""
    return ([(v.sha256, v.profile_only) for v in a.variants], a.pinned_variant, a.policy) == (
        [(v.sha256, v.profile_only) for v in b.variants], b.pinned_variant, b.policy)
