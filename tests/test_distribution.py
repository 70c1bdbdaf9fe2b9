"""Distribution on real mosquitto with an in-process agent: chunks, integrity, fallback."""

from __future__ import annotations

import numpy as np
from fleet_helpers import wait_for
from onnx_models import mlp_spec

from prunefleet.shared.chunks import encode_frame


def _x():
    return np.random.default_rng(0).normal(0, 1, (1, 1, 8, 8)).astype(np.float32)


def test_variant_arrives_in_chunks_and_serves(tmp_path, fleet):
    srv, agent = fleet
    spec = mlp_spec(tmp_path / "v1.onnx", "v1", hidden=64, chunk_bytes=2048)
    assert len(spec.chunk_sha256) >= 8
    srv.publish_artifact(spec, (tmp_path / "v1.onnx").read_bytes())
    srv.deploy("dev-1", [spec])
    wait_for(lambda: "v1" in agent.pool.table, 20, what="v1 installed")
    out = agent.predict(_x())
    assert out.variant == "v1" and out.logits.shape == (1, 10)
    assert agent.downloader.rejected_chunks == 0


def test_corrupted_chunk_is_rejected_and_old_variant_keeps_serving(tmp_path, fleet):
    srv, agent = fleet
    v1 = mlp_spec(tmp_path / "v1.onnx", "v1", hidden=32, seed=1, chunk_bytes=2048)
    srv.publish_artifact(v1, (tmp_path / "v1.onnx").read_bytes())
    srv.deploy("dev-1", [v1])
    wait_for(lambda: "v1" in agent.pool.table, 20, what="v1 installed")
    before = agent.predict(_x()).logits.copy()

    v2 = mlp_spec(tmp_path / "v2.onnx", "v2", hidden=96, seed=2, chunk_bytes=2048)
    srv.publish_artifact(v2, (tmp_path / "v2.onnx").read_bytes())
    # A hostile network flips bytes in chunk 3: same length, valid frame, wrong content.
    topic = srv.topics.chunk(v2.sha256, 3)
    data = (tmp_path / "v2.onnx").read_bytes()
    raw = bytearray(data[3 * 2048 : 4 * 2048])
    raw[100] ^= 0xFF
    srv.publish_raw(topic, encode_frame(v2.sha256, 3, len(v2.chunk_sha256), bytes(raw)),
                    retain=True)
    srv.deploy("dev-1", [v2])

    wait_for(lambda: agent.counters.install_failures >= 1, 30, what="install failure")
    assert agent.downloader.rejected_chunks >= 2
    assert "v2" not in agent.pool.table
    assert "v1" in agent.pool.table, "the last known good variant keeps serving"
    after = agent.predict(_x())
    assert after.variant == "v1"
    np.testing.assert_allclose(after.logits, before)
    assert not agent.store.path_of(v2.sha256).exists(), "nothing of v2 was installed"
    wait_for(
        lambda: any(e.kind == "install_failed" and "chunk 3" in e.detail
                    for e in srv.store.events("dev-1")),
        10, what="the failure reported to the server",
    )


def test_garbage_on_every_topic_is_counted_and_changes_nothing(tmp_path, fleet):
    srv, agent = fleet
    v1 = mlp_spec(tmp_path / "v1.onnx", "v1", hidden=16, chunk_bytes=2048)
    srv.publish_artifact(v1, (tmp_path / "v1.onnx").read_bytes())
    srv.deploy("dev-1", [v1])
    wait_for(lambda: "v1" in agent.pool.table, 20, what="v1 installed")
    wait_for(lambda: srv.store.device("dev-1"), 10, what="dev-1 known to the server")
    t = srv.topics
    agent_invalid = agent.counters.invalid_messages
    for payload in (b"", b"\x00\xff", b"{}", b'{"schema": 1}', b"[1,2]", b"x" * 100_000):
        if payload:
            srv.publish_raw(t.desired("dev-1"), payload)
        # The old commands topic: no agent subscribes to it any more.
        srv.publish_raw(f"{t.prefix}/devices/dev-1/commands", payload or b"null")
        srv.publish_raw(t.telemetry("dev-1"), payload or b"null")
        srv.publish_raw(t.reported("dev-1"), payload or b"null")
    # a well-formed batch that claims to come from another device
    srv.publish_raw(t.telemetry("dev-1"), b'{"schema":1,"device_id":"dev-2","seq":1,'
                    b'"interval_start":1,"interval_end":2}')
    wait_for(lambda: agent.counters.invalid_messages >= agent_invalid + 5, 10,
             what="the agent to count the invalid messages")
    wait_for(lambda: srv.counters.invalid >= 13, 10, what="the server to count them")
    assert "v1" in agent.pool.table and agent.predict(_x()).variant == "v1"
    assert srv.store.telemetry_count("dev-2") == 0
    # the drops are counted in the device's reported state, for operators to see
    assert agent.reported_state().counters["invalid_messages"] >= 5
    agent.reporter.mark()  # (normally within 10 s; the test does not wait)
    wait_for(lambda: (srv.store.device("dev-1").counters or {}).get("invalid_messages", 0)
             >= 5, 10, what="the counters stored by the server")
    assert agent.store.accepted_version() == 1
