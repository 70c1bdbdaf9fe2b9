"""One test per attack on distribution (TUF-lite), each against real mosquitto.

Every test first installs a good variant, then plays the attacker, and asserts that the
agent rejected the attack, said why (an event the server stored), and kept serving.
"""

from __future__ import annotations

import json
import time

import numpy as np
from fleet_helpers import wait_for
from onnx_models import mlp_spec

from prunefleet.shared.chunks import encode_frame
from prunefleet.shared.messages import Manifest, SignedManifest
from prunefleet.shared.signing import SigningKey


def _x():
    return np.random.default_rng(0).normal(0, 1, (1, 1, 8, 8)).astype(np.float32)


def _install_good(tmp_path, srv, agent):
    good = mlp_spec(tmp_path / "good.onnx", "good", hidden=32, seed=1, chunk_bytes=2048)
    srv.publish_artifact(good, (tmp_path / "good.onnx").read_bytes())
    srv.deploy("dev-1", [good])
    wait_for(lambda: "good" in agent.pool.table, 20, what="the good variant installed")
    return good, agent.predict(_x()).logits.copy()


def _still_serving(agent, logits):
    out = agent.predict(_x())
    assert out.variant == "good"
    np.testing.assert_allclose(out.logits, logits)
    assert set(agent.pool.specs) == {"good"}


def _rejected(srv, agent, fragment: str, before: int):
    wait_for(lambda: agent.counters.rejected_manifests > before, 15,
             what="the manifest to be rejected")
    wait_for(lambda: any(e.kind == "rejected" and fragment in e.detail
                         for e in srv.store.events("dev-1")), 10,
             what=f"a 'rejected' event saying {fragment!r}")


def _manifest(spec, version, ttl=3600.0, issued=None):
    now = time.time() if issued is None else issued
    return Manifest(target="dev-1", version=version, issued_at=now, expires_at=now + ttl,
                    variants=[spec])


def test_tampered_manifest(tmp_path, fleet):
    srv, agent = fleet
    good, logits = _install_good(tmp_path, srv, agent)
    evil = mlp_spec(tmp_path / "evil.onnx", "evil", hidden=16, seed=9, chunk_bytes=2048)
    srv.publish_artifact(evil, (tmp_path / "evil.onnx").read_bytes())
    signed = srv.key.sign(_manifest(good, srv.store.next_manifest_version()))
    payload = json.loads(signed.payload)
    payload["variants"] = [json.loads(evil.model_dump_json())]
    forged = SignedManifest(payload=json.dumps(payload), signatures=signed.signatures)
    before = agent.counters.rejected_manifests
    srv.publish_raw(srv.topics.desired("dev-1"), forged.encode(), retain=True)
    _rejected(srv, agent, "does not verify", before)
    _still_serving(agent, logits)


def test_unknown_key(tmp_path, fleet):
    srv, agent = fleet
    _good, logits = _install_good(tmp_path, srv, agent)
    evil = mlp_spec(tmp_path / "evil.onnx", "evil", hidden=16, seed=9, chunk_bytes=2048)
    srv.publish_artifact(evil, (tmp_path / "evil.onnx").read_bytes())
    stranger = SigningKey.generate()
    before = agent.counters.rejected_manifests
    srv.publish_raw(srv.topics.desired("dev-1"),
                    stranger.sign(_manifest(evil, 99)).encode(), retain=True)
    _rejected(srv, agent, "no trusted key", before)
    _still_serving(agent, logits)


def test_replayed_older_manifest(tmp_path, fleet):
    srv, agent = fleet
    old = mlp_spec(tmp_path / "old.onnx", "old", hidden=16, seed=3, chunk_bytes=2048)
    srv.publish_artifact(old, (tmp_path / "old.onnx").read_bytes())
    srv.deploy("dev-1", [old])
    wait_for(lambda: "old" in agent.pool.table, 20, what="old installed")
    captured = srv.key.sign(_manifest(old, 1))  # what an attacker recorded earlier
    assert srv.store.next_manifest_version() == 2
    _good, logits = _install_good(tmp_path, srv, agent)
    wait_for(lambda: "old" not in agent.pool.specs, 10, what="old retired")
    before = agent.counters.rejected_manifests
    srv.publish_raw(srv.topics.desired("dev-1"), captured.encode(), retain=True)
    _rejected(srv, agent, "older than accepted", before)
    _still_serving(agent, logits)
    assert agent.store.accepted_version() == 2


def test_expired_manifest(tmp_path, fleet):
    srv, agent = fleet
    _good, logits = _install_good(tmp_path, srv, agent)
    evil = mlp_spec(tmp_path / "evil.onnx", "evil", hidden=16, seed=9, chunk_bytes=2048)
    srv.publish_artifact(evil, (tmp_path / "evil.onnx").read_bytes())
    stale = _manifest(evil, 50, ttl=60, issued=time.time() - 3600)  # a frozen mirror
    before = agent.counters.rejected_manifests
    srv.publish_raw(srv.topics.desired("dev-1"), srv.key.sign(stale).encode(), retain=True)
    _rejected(srv, agent, "expired", before)
    _still_serving(agent, logits)


def test_artifact_larger_than_declared(tmp_path, fleet):
    srv, agent = fleet
    _good, logits = _install_good(tmp_path, srv, agent)
    big = mlp_spec(tmp_path / "big.onnx", "big", hidden=64, seed=4, chunk_bytes=2048)
    data = (tmp_path / "big.onnx").read_bytes()
    srv.publish_artifact(big, data)
    # The last chunk grows past the size the manifest declares (endless data).
    last = len(big.chunk_sha256) - 1
    tail = data[last * 2048:] + b"\x00" * 50_000
    srv.publish_raw(srv.topics.chunk(big.sha256, last),
                    encode_frame(big.sha256, last, last + 1, tail), retain=True)
    failures = agent.counters.install_failures
    srv.deploy("dev-1", [big])
    wait_for(lambda: agent.counters.install_failures > failures, 30, what="install failure")
    wait_for(lambda: any(e.kind == "install_failed" and "declared size" in e.detail
                         for e in srv.store.events("dev-1")), 10, what="the reason reported")
    assert not agent.store.path_of(big.sha256).exists()
    part = agent.store.part_path(big.sha256)
    assert not part.exists() or part.stat().st_size == big.size
    _still_serving(agent, logits)


def test_variant_from_another_manifest(tmp_path, fleet):
    """Mix and match: chunks of one manifest's artifact served for another's."""
    srv, agent = fleet
    good, logits = _install_good(tmp_path, srv, agent)
    a = mlp_spec(tmp_path / "a.onnx", "next", hidden=48, seed=5, chunk_bytes=2048)
    b = mlp_spec(tmp_path / "b.onnx", "next", hidden=48, seed=6, chunk_bytes=2048)
    assert a.size == b.size and a.sha256 != b.sha256
    srv.publish_artifact(a, (tmp_path / "a.onnx").read_bytes())
    data_b = (tmp_path / "b.onnx").read_bytes()
    # The attacker answers every chunk topic of `a` with the chunks of `b`.
    for i in range(len(a.chunk_sha256)):
        raw = data_b[i * 2048:(i + 1) * 2048]
        srv.publish_raw(srv.topics.chunk(a.sha256, i),
                        encode_frame(a.sha256, i, len(a.chunk_sha256), raw), retain=True)
    failures = agent.counters.install_failures
    srv.deploy("dev-1", [a])
    wait_for(lambda: agent.counters.install_failures > failures, 30, what="install failure")
    wait_for(lambda: any(e.kind == "install_failed" and "does not match" in e.detail
                         for e in srv.store.events("dev-1")), 10, what="the reason reported")
    _still_serving(agent, logits)

    # And a manifest stitched from two signed manifests does not verify either.
    m1 = srv.key.sign(_manifest(good, 40))
    m2 = srv.key.sign(_manifest(b, 41))
    p = json.loads(m2.payload)
    p["variants"] += json.loads(m1.payload)["variants"]
    stitched = SignedManifest(payload=json.dumps(p), signatures=m2.signatures + m1.signatures)
    before = agent.counters.rejected_manifests
    srv.publish_raw(srv.topics.desired("dev-1"), stitched.encode(), retain=True)
    _rejected(srv, agent, "does not verify", before)
    _still_serving(agent, logits)


def test_an_older_group_state_beside_a_newer_device_state_is_no_attack(tmp_path, mosquitto):
    """Not an attack: each source has its own rollback floor, and the newest is followed,
    across a restart too, with nothing fetched again and no false alarm."""
    from fleet_helpers import make_server, run_agent

    srv = make_server(tmp_path, mosquitto.url)
    try:
        a = mlp_spec(tmp_path / "a.onnx", "a", hidden=16, seed=1, chunk_bytes=2048)
        b = mlp_spec(tmp_path / "b.onnx", "b", hidden=24, seed=2, chunk_bytes=2048)
        for spec, f in ((a, "a.onnx"), (b, "b.onnx")):
            srv.publish_artifact(spec, (tmp_path / f).read_bytes())
        with run_agent(tmp_path, mosquitto.url, device="dev-g", group="lab") as agent:
            srv.deploy("lab", [a], group=True)  # v1, for the group
            wait_for(lambda: "a" in agent.pool.specs, 20, what="a from the group state")
            srv.deploy("dev-g", [b])  # v2, for this device
            wait_for(lambda: set(agent.pool.specs) == {"b"}, 20, what="b from the device")
        # (Both retained states arriving again after the restart, step by step:
        # test_agent_memory.py, on the in-memory broker.)
        with run_agent(tmp_path, mosquitto.url, device="dev-g", group="lab") as again:
            assert set(again.pool.specs) == {"b"}
            assert again.store.accepted_version("group") == 1
            assert again.store.accepted_version("device") == 2
            srv.deploy("lab", [a], group=True)  # v3: the group's state is now the newest
            wait_for(lambda: set(again.pool.specs) == {"a"}, 20, what="the group's newer state")
            assert again.counters.rejected_manifests == 0

        def events(kind: str) -> list[str | None]:
            return [e.variant for e in srv.store.events("dev-g") if e.kind == kind]

        wait_for(lambda: len(events("installed")) == 3, 10, what="three installs reported")
        # "b" was fetched once; "a" again only for v3 (retired when "b" took over).
        assert sorted(events("download_started")) == ["a", "a", "b"]
        assert events("rejected") == []
    finally:
        srv.stop()
