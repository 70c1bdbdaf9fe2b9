"""Which desired state a device follows, and what following it takes: a pure core.

:class:`ManifestFollower` does no I/O. It is offered signed desired states from the
device's own topic and its group's, checks each (signature by a pinned key, expiry,
target, the per-source rollback floor, the policy overrides it carries), follows the
newest one that passes, and says what the device must do about it (:meth:`plan`: what to
download, what to install from a blob already on disk, which downloads to cancel) and
which installed variants it may retire. The agent applies these answers (downloader,
store, sessions); the simulator runs the very same class.

Each source has its own floor: a group's desired state older than the device's own is
verified, raises the group's floor, and is simply not followed (no false alarm), while a
replay of either source's older manifest is refused. A version more than
``max_version_jump`` above the highest floor is refused too: accepting it would make every
later manifest look like a rollback.

Key retirement is a signed revocation: a manifest that verifies names the retired key ids
(``revoked_keyids``); from then on the follower never trusts them (:attr:`revoked`, kept
across restarts by the agent), even where the configuration still pins them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from prunefleet.shared.errors import TrustError
from prunefleet.shared.messages import Manifest, Signature, SignedManifest, VariantSpec
from prunefleet.shared.policy import PolicyConfig, PolicyOverrideError, apply_overrides
from prunefleet.shared.signing import TrustedKeys

__all__ = [
    "DEFAULT_MAX_VERSION_JUMP",
    "Follow",
    "ManifestFollower",
    "Plan",
    "Rejected",
    "Source",
    "Stale",
    "Verdict",
]

Source = Literal["device", "group"]
SOURCES: tuple[Source, ...] = ("device", "group")
# Manifest versions are one counter across a fleet's devices, so a device that was away
# sees large gaps: 10**8 covers years of a large fleet, and still refuses a runaway one.
DEFAULT_MAX_VERSION_JUMP = 10**8


@dataclass(frozen=True)
class Rejected:
    """Refused: not signed by a pinned key, expired, a rollback, a version jump, for
    another target, or carrying a policy override this agent cannot apply. ``version`` is
    the version the manifest claims for this device (unverified: only for the report)."""

    reason: str
    version: int | None = None


@dataclass(frozen=True)
class Stale:
    """Valid, but not newer than the manifest followed (seen again, or a group's older
    state beside the device's own). Its source's floor was raised all the same."""

    manifest: Manifest


@dataclass(frozen=True)
class Follow:
    """The newest valid desired state: follow it (and keep ``signed`` for a restart)."""

    manifest: Manifest
    policy: PolicyConfig


Verdict = Rejected | Stale | Follow


@dataclass(frozen=True)
class Plan:
    """What following the manifest takes now."""

    download: tuple[VariantSpec, ...] = ()
    install: tuple[VariantSpec, ...] = ()  # the blob is on disk; verify and load it
    keep: frozenset[str] = field(default_factory=frozenset)  # digests still wanted


class ManifestFollower:
    """The manifest a device follows, its rollback floors, and its effective policy."""

    def __init__(
        self,
        trusted: TrustedKeys,
        device_id: str,
        group: str | None,
        base_policy: PolicyConfig,
        floors: Mapping[str, int] | None = None,
        *,
        revoked: Iterable[str] = (),
        max_version_jump: int = DEFAULT_MAX_VERSION_JUMP,
    ) -> None:
        self.revoked: frozenset[str] = trusted.revoked | frozenset(revoked)
        self.trusted = trusted.without(self.revoked)
        self.max_version_jump = max_version_jump
        self.device_id = device_id
        self.group = group
        self.base_policy = base_policy
        self.floors: dict[str, int] = {s: int((floors or {}).get(s, 0)) for s in SOURCES}
        self.manifest: Manifest | None = None
        # The server's certificates of the followed manifest's version (reported with it).
        self.proof: tuple[Signature, ...] = ()
        self.policy: PolicyConfig = base_policy

    # -- decisions ----------------------------------------------------------------------
    def offer(self, signed: SignedManifest, source: Source, now: float) -> Verdict:
        """Check a desired state from ``source`` at wall time ``now``."""
        target = self.device_id if source == "device" else self.group
        if target is None:
            return Rejected("a group desired state, but this device has no group")
        try:
            manifest = self.trusted.verify(
                signed, now=now, min_version=self.floors[source], target=target
            )
        except TrustError as e:
            return Rejected(str(e), _claimed_version(signed, target))
        highest = max(self.floors.values())
        if manifest.version > highest + self.max_version_jump:
            return Rejected(f"manifest version {manifest.version} jumps more than "
                            f"{self.max_version_jump} past the last accepted {highest}",
                            manifest.version)
        try:
            policy = apply_overrides(self.base_policy, manifest.policy)
        except PolicyOverrideError as e:
            return Rejected(f"manifest policy is invalid: {e}", manifest.version)
        self.revoke(manifest.revoked_keyids)
        self.floors[source] = max(self.floors[source], manifest.version)
        if self.manifest is not None and manifest.version <= self.manifest.version:
            return Stale(manifest)
        self.manifest = manifest
        self.proof = self.trusted.proof_of(signed, manifest.version)
        self.policy = policy
        return Follow(manifest, policy)

    def revoke(self, keyids: Iterable[str]) -> None:
        """Never trust ``keyids`` again (a verified manifest retired them)."""
        new = frozenset(keyids) - self.revoked
        if new:
            self.revoked |= new
            self.trusted = self.trusted.without(new)

    def set_trusted(self, trusted: TrustedKeys) -> None:
        """Keys reloaded from the configuration; revoked ones stay revoked."""
        self.trusted = trusted.without(self.revoked)

    def restore(self, signed: SignedManifest, now: float) -> Manifest | None:
        """Follow again, after a restart, the manifest followed before. Its signature is
        checked again; an expired one still says which manifest is newest, so it is
        followed but :meth:`is_current` is False until a fresh one arrives. Returns None (and
        follows nothing) when it no longer verifies, or is addressed neither to this device
        nor to its group (the group in the configuration changed meanwhile)."""
        try:
            manifest = self.trusted.verify(signed, now=0.0)
            policy = apply_overrides(self.base_policy, manifest.policy)
        except (TrustError, PolicyOverrideError):
            return None
        if manifest.target not in (self.device_id, self.group):
            return None
        self.manifest = manifest
        self.proof = self.trusted.proof_of(signed, manifest.version)
        self.policy = policy
        return manifest

    def set_base_policy(self, base: PolicyConfig) -> PolicyConfig:
        """A reloaded local policy; the followed manifest's overrides still apply. Raises
        :class:`PolicyOverrideError` (and changes nothing) when they no longer do."""
        policy = apply_overrides(base, self.manifest.policy if self.manifest else None)
        self.base_policy, self.policy = base, policy
        return policy

    def is_current(self, now: float) -> bool:
        """A manifest is followed and has not expired (only then is it reconciled)."""
        return self.manifest is not None and self.manifest.expires_at > now

    @property
    def pinned(self) -> str | None:
        return self.manifest.pinned_variant if self.manifest else None

    def plan(
        self,
        serving: Callable[[VariantSpec], bool],
        have_blob: Callable[[str], bool],
        failed: Collection[str],
    ) -> Plan:
        """What the followed manifest still needs: variants serving are done, those that
        failed are not retried until a new manifest, a blob already on disk (a download
        that finished before a restart) is installed without fetching it again."""
        m = self.manifest
        if m is None:
            return Plan()
        download: list[VariantSpec] = []
        install: list[VariantSpec] = []
        for spec in m.variants:
            if spec.sha256 in failed or serving(spec):
                continue
            (install if have_blob(spec.sha256) else download).append(spec)
        return Plan(tuple(download), tuple(install), frozenset(v.sha256 for v in m.variants))

    def retire(self, installed: Mapping[str, VariantSpec]) -> list[str]:
        """Installed variants the manifest no longer names (or names with another digest),
        once one of its own serves: until then the last known good ones keep serving. A
        profile-only variant installed never counts as serving."""
        m = self.manifest
        if m is None:
            return []
        wanted = {v.name: v.sha256 for v in m.variants}
        if not any(wanted.get(n) == s.sha256 and not s.profile_only
                   and n not in m.profile_only for n, s in installed.items()):
            return []
        return sorted(n for n, s in installed.items() if wanted.get(n) != s.sha256)


def _claimed_version(signed: SignedManifest, target: str) -> int | None:
    """The version a refused manifest claims, if it is addressed to ``target``: reported
    back as that version's failure, so the server need not wait for a timeout."""
    try:
        raw = json.loads(signed.payload)
    except (ValueError, RecursionError):
        return None
    if not isinstance(raw, dict) or raw.get("target") != target:
        return None
    v = raw.get("version")
    return v if isinstance(v, int) and not isinstance(v, bool) and 1 <= v < 2**63 else None
