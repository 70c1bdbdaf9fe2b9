"""ManifestFollower: which signed desired state a device follows, and what it takes.

A pure core, tested with real Ed25519 keys and plain values: every refusal is one row
with the reason a reader of the reported state would see, and a refusal changes nothing.
"""

from __future__ import annotations

import json

import pytest

from prunefleet.agent.follower import (
    DEFAULT_MAX_VERSION_JUMP,
    Follow,
    ManifestFollower,
    Plan,
    Rejected,
    Stale,
)
from prunefleet.shared import chunks
from prunefleet.shared.errors import SignatureError
from prunefleet.shared.messages import Manifest, Signature, SignedManifest, VariantSpec
from prunefleet.shared.policy import PolicyConfig, PolicyOverrideError
from prunefleet.shared.signing import SigningKey, TrustedKeys, certificate_keyid

NOW = 1_700_000_000.0
KEY = SigningKey.generate()
OTHER_KEY = SigningKey.generate()
DEVICE = "dev-1"
GROUP = "field"


def spec(name: str, content: bytes | None = None, macs: int = 1000) -> VariantSpec:
    data = content if content is not None else f"weights of {name}".encode() * 100
    p = chunks.plan(data, 1024)
    return VariantSpec(name=name, sha256=p.sha256, size=p.size, chunk_bytes=1024,
                       chunk_sha256=list(p.chunk_sha256), input_shape=[1, 1, 8, 8],
                       num_classes=10, params=1, macs=macs)


A, B, C = spec("a"), spec("b"), spec("c")


def manifest(version: int, *, target: str = DEVICE, ttl: float = 3600.0,
             variants: list[VariantSpec] | None = None, policy: dict | None = None,
             pinned: str | None = None, revoked: list[str] | None = None) -> Manifest:
    return Manifest(target=target, version=version, issued_at=NOW - 60, expires_at=NOW + ttl,
                    variants=variants or [A], policy=policy, pinned_variant=pinned,
                    revoked_keyids=revoked or [])


def signed(version: int, key: SigningKey = KEY, **kw) -> SignedManifest:
    return key.sign(manifest(version, **kw))


def follower(group: str | None = GROUP, floors: dict[str, int] | None = None,
             base: PolicyConfig | None = None) -> ManifestFollower:
    return ManifestFollower(TrustedKeys([KEY.public]), DEVICE, group, base or PolicyConfig(),
                            floors)


def state(f: ManifestFollower) -> tuple:
    return (f.manifest, dict(f.floors), f.policy)


# -- the first manifest -----------------------------------------------------------------------


def test_a_good_manifest_is_followed_with_its_policy() -> None:
    f = follower()
    v = f.offer(signed(3, policy={"battery_low_percent": 50.0}), "device", NOW)
    assert isinstance(v, Follow)
    assert (v.manifest.version, v.policy.battery_low_percent) == (3, 50.0)
    assert (f.manifest, f.policy) == (v.manifest, v.policy)
    assert f.floors == {"device": 3, "group": 0}
    assert f.is_current(NOW)


def test_a_group_manifest_is_followed_by_a_member_of_the_group() -> None:
    v = follower().offer(signed(2, target=GROUP), "group", NOW)
    assert isinstance(v, Follow) and v.manifest.target == GROUP


# -- refusals: each one names its cause and changes nothing -----------------------------------


def _tampered() -> SignedManifest:
    s = signed(9)
    raw = json.loads(s.payload)
    raw["pinned_variant"] = "a"  # a valid manifest, but not the one that was signed
    return SignedManifest(payload=json.dumps(raw), signatures=s.signatures)


REJECTIONS = [
    ("tampered payload", _tampered, "device", "signature does not verify"),
    ("unknown key", lambda: signed(9, OTHER_KEY), "device", "signed by no trusted key"),
    ("expired", lambda: signed(9, ttl=-1.0), "device", "expired"),
    ("wrong target", lambda: signed(9, target="dev-2"), "device", "not this device"),
    ("group state on the device topic", lambda: signed(9, target=GROUP), "device",
     "not this device"),
    ("replay of an older device state", lambda: signed(4), "device",
     "older than accepted 5"),
    ("unknown policy setting", lambda: signed(9, policy={"battery_low": 40}), "device",
     "manifest policy is invalid: battery_low"),
    ("policy value out of range", lambda: signed(9, policy={"battery_low_percent": 150}),
     "device", "manifest policy is invalid: battery_low_percent"),
    ("critical at or above low", lambda: signed(9, policy={"battery_critical_percent": 30}),
     "device", "battery_critical_percent must be below battery_low_percent"),
    ("version jump", lambda: signed(5 + DEFAULT_MAX_VERSION_JUMP + 1), "device",
     f"jumps more than {DEFAULT_MAX_VERSION_JUMP} past the last accepted 5"),
    ("version jump on the group topic", lambda: signed(10**15, target=GROUP), "group",
     "jumps more than"),
    ("signed only by the key it revokes", lambda: signed(9, revoked=[KEY.keyid]), "device",
     "signed only by keys it revokes"),
]


@pytest.mark.parametrize(("case", "make", "source", "reason"), REJECTIONS,
                         ids=[r[0] for r in REJECTIONS])
def test_refused_manifest_changes_nothing(case, make, source, reason) -> None:
    f = follower()
    assert isinstance(f.offer(signed(5, policy={"battery_low_percent": 40.0}), "device", NOW),
                      Follow)
    f.offer(signed(3, target=GROUP), "group", NOW)  # a group floor to keep too
    before = state(f)
    v = f.offer(make(), source, NOW)
    assert isinstance(v, Rejected), v
    assert reason in v.reason
    assert state(f) == before
    assert f.policy.battery_low_percent == 40.0


@pytest.mark.parametrize(
    ("make", "source", "claimed"),
    [
        (_tampered, "device", 9),
        (lambda: signed(9, OTHER_KEY), "device", 9),
        (lambda: signed(9, ttl=-1.0), "device", 9),
        (lambda: signed(10**15), "device", 10**15),
        (lambda: signed(9, target="dev-2"), "device", None),  # not ours to report on
        (lambda: signed(4, OTHER_KEY, target=GROUP), "group", 4),
    ],
)
def test_a_refusal_names_the_version_the_manifest_claims(make, source, claimed) -> None:
    """So the device can report that version as failed; the server counts it only for a
    version it offered this device."""
    v = follower().offer(make(), source, NOW)
    assert isinstance(v, Rejected) and v.version == claimed


def test_a_jump_within_the_bound_is_followed_and_a_fresh_device_is_bounded_too() -> None:
    f = follower(floors={"device": 5})
    assert isinstance(f.offer(signed(5 + DEFAULT_MAX_VERSION_JUMP), "device", NOW), Follow)
    fresh = ManifestFollower(TrustedKeys([KEY.public]), DEVICE, GROUP, PolicyConfig(),
                             max_version_jump=100)
    assert isinstance(fresh.offer(signed(101), "device", NOW), Rejected)
    assert isinstance(fresh.offer(signed(100), "device", NOW), Follow)
    # Later manifests are still followed: the refused jump locked nothing.
    assert isinstance(fresh.offer(signed(150), "device", NOW), Follow)


# -- key retirement: a signed revocation ----------------------------------------------------


def _both() -> ManifestFollower:
    return ManifestFollower(TrustedKeys([KEY.public, OTHER_KEY.public]), DEVICE, GROUP,
                            PolicyConfig())


def test_a_revocation_signed_by_a_current_key_drops_the_retired_key_for_good() -> None:
    f = _both()
    assert isinstance(f.offer(signed(1, OTHER_KEY), "device", NOW), Follow)  # still trusted
    v = f.offer(signed(2, revoked=[OTHER_KEY.keyid]), "device", NOW)
    assert isinstance(v, Follow)
    assert f.revoked == {OTHER_KEY.keyid} and f.trusted.keyids == {KEY.keyid}
    before = state(f)
    refused = f.offer(signed(3, OTHER_KEY), "device", NOW)
    assert refused == Rejected("manifest is signed by a revoked key", 3)
    assert state(f) == before
    # A later manifest that no longer names it does not bring it back,
    assert isinstance(f.offer(signed(4), "device", NOW), Follow)
    assert isinstance(f.offer(signed(5, OTHER_KEY), "device", NOW), Rejected)
    # nor does pinning it again (a reload), nor a restart with the revocations kept on disk.
    f.set_trusted(TrustedKeys([KEY.public, OTHER_KEY.public]))
    assert isinstance(f.offer(signed(6, OTHER_KEY), "device", NOW), Rejected)
    again = ManifestFollower(TrustedKeys([KEY.public, OTHER_KEY.public]), DEVICE, GROUP,
                             PolicyConfig(), revoked=f.revoked)
    assert isinstance(again.offer(signed(7, OTHER_KEY), "device", NOW), Rejected)
    assert isinstance(again.offer(signed(7), "device", NOW), Follow)


def test_a_manifest_signed_by_old_and_new_keys_may_revoke_the_old() -> None:
    from prunefleet.server.keys import KeyRing

    ring = KeyRing(KEY, OTHER_KEY, revoked=(OTHER_KEY.keyid,))
    f = _both()
    assert isinstance(f.offer(ring.sign(manifest(1, revoked=[OTHER_KEY.keyid])), "device",
                              NOW), Follow)
    assert f.revoked == {OTHER_KEY.keyid}


@pytest.mark.parametrize(
    "make",
    [
        lambda: signed(2, SigningKey.generate(), revoked=[KEY.keyid]),  # by an unknown key
        lambda: signed(2, revoked=[OTHER_KEY.keyid], policy={"nope": 1}),  # refused
        lambda: signed(2, revoked=[OTHER_KEY.keyid], ttl=-1.0),  # expired
    ],
)
def test_a_refused_manifest_revokes_nothing(make) -> None:
    f = _both()
    assert isinstance(f.offer(make(), "device", NOW), Rejected)
    assert f.revoked == frozenset() and f.trusted.keyids == {KEY.keyid, OTHER_KEY.keyid}


def test_a_group_state_is_refused_by_a_device_without_a_group() -> None:
    f = follower(group=None)
    v = f.offer(signed(2, target=GROUP), "group", NOW)
    assert v == Rejected("a group desired state, but this device has no group")
    assert state(f) == (None, {"device": 0, "group": 0}, PolicyConfig())


def test_expiry_is_judged_at_the_time_given() -> None:
    s = signed(1, ttl=10.0)
    assert isinstance(follower().offer(s, "device", NOW + 9.9), Follow)
    assert isinstance(follower().offer(s, "device", NOW + 10.0), Rejected)


def test_floors_restored_from_disk_refuse_a_replay() -> None:
    f = follower(floors={"device": 7, "group": 2})
    assert "older than accepted 7" in f.offer(signed(6), "device", NOW).reason  # type: ignore[union-attr]
    assert isinstance(f.offer(signed(3, target=GROUP), "group", NOW), Follow)


# -- several sources, several versions ---------------------------------------------------------


def test_an_older_group_state_beside_a_newer_device_state_is_stale_not_an_error() -> None:
    f = follower()
    device = f.offer(signed(5), "device", NOW)
    assert isinstance(device, Follow)
    group = f.offer(signed(3, target=GROUP), "group", NOW)
    assert isinstance(group, Stale) and group.manifest.version == 3
    assert f.manifest == device.manifest
    assert f.floors == {"device": 5, "group": 3}  # the group's floor rose all the same
    # …so a replay of an even older group state is now refused,
    assert "older than accepted 3" in f.offer(signed(2, target=GROUP), "group", NOW).reason  # type: ignore[union-attr]
    # while the same group state again is only stale.
    assert isinstance(f.offer(signed(3, target=GROUP), "group", NOW), Stale)


def test_the_same_version_seen_again_is_stale() -> None:
    f = follower()
    s = signed(4)
    first = f.offer(s, "device", NOW)
    assert isinstance(first, Follow)
    again = f.offer(s, "device", NOW + 5)
    assert again == Stale(first.manifest)
    assert f.manifest == first.manifest and f.floors["device"] == 4


@pytest.mark.parametrize(
    ("offers", "followed"),
    [
        ([("device", 5), ("group", 7)], ("field", 7)),
        ([("group", 7), ("device", 5)], ("field", 7)),
        ([("group", 7), ("device", 8)], ("dev-1", 8)),
        ([("device", 8), ("group", 7), ("device", 9)], ("dev-1", 9)),
    ],
)
def test_the_newest_across_sources_wins(offers, followed) -> None:
    f = follower()
    for source, version in offers:
        f.offer(signed(version, target=DEVICE if source == "device" else GROUP), source, NOW)
    assert f.manifest is not None
    assert (f.manifest.target, f.manifest.version) == followed
    assert f.floors == {s: max((v for src, v in offers if src == s), default=0)
                        for s in ("device", "group")}


def test_a_newer_manifest_replaces_the_policy_and_the_pin() -> None:
    f = follower()
    f.offer(signed(1, variants=[A, B], pinned="a", policy={"battery_low_percent": 45.0}),
            "device", NOW)
    assert (f.pinned, f.policy.battery_low_percent) == ("a", 45.0)
    v = f.offer(signed(2, variants=[A, B]), "device", NOW)
    assert isinstance(v, Follow)
    assert (f.pinned, f.policy) == (None, PolicyConfig())


# -- restart ----------------------------------------------------------------------------------


def test_restore_follows_an_expired_manifest_but_it_is_not_current() -> None:
    s = signed(6, ttl=10.0, policy={"battery_low_percent": 35.0})
    f = follower()
    m = f.restore(s, NOW + 3600)
    assert m is not None and m.version == 6
    assert f.manifest == m and f.policy.battery_low_percent == 35.0
    assert not f.is_current(NOW + 3600)
    assert f.is_current(NOW)
    # The same version re-offered is stale; a newer fresh one is followed and current.
    assert isinstance(f.offer(signed(6, ttl=7200.0), "device", NOW + 3600), Stale)
    assert isinstance(f.offer(signed(7, ttl=7200.0), "device", NOW + 3600), Follow)
    assert f.is_current(NOW + 3600)


@pytest.mark.parametrize(
    ("case", "make", "group"),
    [
        ("tampered", _tampered, GROUP),
        ("unknown key", lambda: signed(6, OTHER_KEY), GROUP),
        ("bad policy", lambda: signed(6, policy={"nope": 1}), GROUP),
        ("another device's", lambda: signed(6, target="dev-2"), GROUP),
        ("a group this device left", lambda: signed(6, target=GROUP), "other-group"),
    ],
)
def test_restore_follows_nothing_that_no_longer_verifies(case, make, group) -> None:
    f = follower(group=group)
    assert f.restore(make(), NOW) is None
    assert (f.manifest, f.policy) == (None, PolicyConfig())


def test_a_reloaded_base_policy_keeps_the_manifest_overrides_or_changes_nothing() -> None:
    f = follower()
    f.offer(signed(1, policy={"battery_low_percent": 35.0}), "device", NOW)
    p = f.set_base_policy(PolicyConfig(cpu_high_percent=70.0))
    assert (p.cpu_high_percent, p.battery_low_percent) == (70.0, 35.0) and f.policy == p
    with pytest.raises(PolicyOverrideError, match="battery_critical_percent"):
        f.set_base_policy(PolicyConfig(battery_critical_percent=40.0, battery_low_percent=50.0))
    assert f.policy == p and f.base_policy.cpu_high_percent == 70.0


# -- what following takes ---------------------------------------------------------------------


def _plan(serving: set[str], blobs: set[str], failed: set[str]) -> Plan:
    f = follower()
    f.offer(signed(1, variants=[A, B, C]), "device", NOW)
    by_name = {s.name: s for s in (A, B, C)}
    return f.plan(lambda s: s.name in serving, lambda sha: sha in {by_name[n].sha256
                                                                   for n in blobs},
                  {by_name[n].sha256 for n in failed})


@pytest.mark.parametrize(
    ("serving", "blobs", "failed", "download", "install"),
    [
        (set(), set(), set(), "abc", ""),
        ({"a"}, set(), set(), "bc", ""),
        ({"a", "b", "c"}, set(), set(), "", ""),
        (set(), {"b"}, set(), "ac", "b"),  # finished before a restart: no new fetch
        ({"a"}, {"a", "c"}, set(), "b", "c"),  # serving wins over the blob on disk
        (set(), {"c"}, {"b"}, "a", "c"),  # failed: not retried under this manifest
        (set(), set(), {"a", "b", "c"}, "", ""),
    ],
)
def test_plan(serving, blobs, failed, download, install) -> None:
    p = _plan(serving, blobs, failed)
    assert "".join(s.name for s in p.download) == download
    assert "".join(s.name for s in p.install) == install
    assert p.keep == {A.sha256, B.sha256, C.sha256}  # whatever is done or failed


def test_plan_without_a_manifest_is_empty() -> None:
    assert follower().plan(lambda s: False, lambda sha: False, ()) == Plan()


OLD = spec("old")
A2 = spec("a", b"the next weights of a" * 100)


@pytest.mark.parametrize(
    ("installed", "retired"),
    [
        ({"old": OLD}, []),  # nothing of the new manifest serves yet: keep the last good
        ({"old": OLD, "a": A2}, []),  # "a" with another digest is not the manifest's "a"
        ({"old": OLD, "b": B}, ["old"]),
        ({"old": OLD, "a": A2, "b": B}, ["a", "old"]),
        ({"a": A, "b": B}, []),
    ],
)
def test_retire_keeps_the_last_known_good_until_one_new_variant_serves(installed,
                                                                      retired) -> None:
    f = follower()
    assert f.retire(installed) == []  # no manifest: nothing is retired
    f.offer(signed(1, variants=[A, B]), "device", NOW)
    assert f.retire(installed) == retired



# -- version certificates ------------------------------------------------------------------------


def test_the_followed_manifests_version_certificate_is_what_the_device_reports() -> None:
    """The server certifies each version it signs (``SigningKey.certify``); the follower
    keeps the certificate of the manifest it follows, which the agent reports with its
    version, and keeps it across a restart. A manifest from a server that predates
    certificates follows as before, with no proof."""
    f = follower()
    m = signed(3)
    assert isinstance(f.offer(m, "device", NOW), Follow)
    assert f.proof and TrustedKeys([KEY.public]).certifies(3, f.proof)
    assert not TrustedKeys([KEY.public]).certifies(4, f.proof), "it proves version 3 only"
    assert not TrustedKeys([OTHER_KEY.public]).certifies(3, f.proof), "and only for its key"
    again = follower()
    assert again.restore(m, NOW) is not None and again.proof == f.proof

    older = SignedManifest(payload=m.payload, signatures=m.signatures[:1])  # no certificate
    g = follower()
    assert isinstance(g.offer(older, "device", NOW), Follow) and g.proof == ()


def test_a_certificate_never_passes_for_a_manifests_signature_nor_the_reverse() -> None:
    """A certificate signs another message, under an id no agent pins: a manifest whose
    only signature is a certificate is refused, and a manifest signature filed as a
    certificate proves nothing. An agent that predates certificates (the same check of
    the same list) skips them as an unknown key's and accepts the manifest."""
    m = signed(5)
    sig, cert = m.signatures
    with pytest.raises(SignatureError, match="no trusted key"):
        TrustedKeys([KEY.public]).verify(SignedManifest(payload=m.payload, signatures=[cert]),
                                         now=NOW)
    forged = Signature(keyid=certificate_keyid(KEY.keyid), sig=sig.sig)
    assert not TrustedKeys([KEY.public]).certifies(5, [forged])
    assert TrustedKeys([KEY.public]).verify(m, now=NOW).version == 5
    # A retired (revoked) key's certificates prove nothing either.
    assert not TrustedKeys([KEY.public], revoked=[KEY.keyid]).certifies(5, [cert])
