"""The shared wire protocol: topics, messages, chunk frames, signatures."""

from __future__ import annotations

import json
import time

import pytest

from prunefleet.shared import chunks
from prunefleet.shared.errors import (
    ArtifactSizeError,
    ChunkHashError,
    ExpiredError,
    ProtocolError,
    RollbackError,
    SignatureError,
    TopicError,
)
from prunefleet.shared.messages import (
    Manifest,
    ReportedState,
    SignedManifest,
    TelemetryBatch,
    VariantSpec,
    decode,
)
from prunefleet.shared.signing import SigningKey, TrustedKeys
from prunefleet.shared.topics import Topics


def _spec(data: bytes = b"x" * 5000, name: str = "v") -> VariantSpec:
    p = chunks.plan(data, 1024)
    return VariantSpec(name=name, sha256=p.sha256, size=p.size, chunk_bytes=1024,
                       chunk_sha256=list(p.chunk_sha256), input_shape=[1, 1, 8, 8],
                       num_classes=10, params=1, macs=1)


def _manifest(version: int = 1, ttl: float = 60.0, target: str = "dev-1") -> Manifest:
    now = time.time()
    return Manifest(target=target, version=version, issued_at=now, expires_at=now + ttl,
                    variants=[_spec()])


def test_topics_are_per_device_under_the_prefix():
    t = Topics("acme/fleet")
    assert t.telemetry("cam-7") == "acme/fleet/devices/cam-7/telemetry"
    assert t.parse_device("acme/fleet/devices/cam-7/reported") == ("cam-7", "reported")
    sha = "a" * 64
    assert t.parse_chunk(t.chunk(sha, 12)) == (sha, 12)
    assert t.shared("ingest", t.all_devices("telemetry")) == (
        "$share/ingest/acme/fleet/devices/+/telemetry")


@pytest.mark.parametrize("bad", ["", "a/b", "+", "#", "dev#1", "x" * 65, "-lead", "a b"])
def test_topic_parts_reject_wildcards_and_separators(bad):
    with pytest.raises(TopicError):
        Topics().telemetry(bad)


def test_bad_prefix_is_rejected():
    with pytest.raises(TopicError):
        Topics("fleet/#")


def test_messages_round_trip_with_schema_version():
    r = ReportedState(device_id="d1", online=True, active_variant="dense")
    raw = json.loads(r.encode())
    assert raw["schema"] == 1
    assert decode(ReportedState, r.encode()) == r


@pytest.mark.parametrize(
    "payload, fragment",
    [
        (b"not json", "not JSON"),
        (b"[]", "JSON object"),
        (b'{"schema": 1, "device_id": "d1", "online": true, "extra": 1}', "extra"),
        (b'{"schema": 2, "device_id": "d1", "online": true}', "schema"),
        (b'{"schema": 1, "device_id": "a/b", "online": true}', "device_id"),
        (b"\xff\xfe", "not JSON"),
    ],
)
def test_invalid_messages_raise_protocol_error(payload, fragment):
    with pytest.raises(ProtocolError) as e:
        decode(ReportedState, payload)
    assert fragment in str(e.value)


def test_oversized_message_is_refused_before_parsing():
    big = b'{"schema": 1, "device_id": "d1", "seq": 0, "padding": "' + b"x" * 200_000 + b'"}'
    with pytest.raises(ProtocolError, match="over its limit"):
        decode(TelemetryBatch, big)


def test_variant_spec_checks_chunk_count():
    s = _spec()
    with pytest.raises(ValueError):
        VariantSpec(**{**s.model_dump(), "chunk_sha256": s.chunk_sha256[:-1]})


def test_chunk_frames_round_trip_and_detect_tampering():
    data = b"".join(f"weight row {i:05d}\n".encode() for i in range(600))[:10240]
    p = chunks.plan(data, 1024)
    frame = chunks.encode_frame(p.sha256, 2, p.count, data[2048:3072])
    header, raw = chunks.decode_frame(frame, 1024)
    assert header.index == 2 and raw == data[2048:3072]
    assert len(frame) < 1024  # compressed on the wire
    chunks.verify_chunk(p, 2, raw)
    with pytest.raises(ChunkHashError):
        chunks.verify_chunk(p, 2, raw[:-1] + b"\x00")
    with pytest.raises(ChunkHashError):
        chunks.verify_chunk(p, 3, raw)


def test_chunks_that_do_not_compress_travel_raw():
    import os

    noise = os.urandom(4096)
    header, raw = chunks.decode_frame(chunks.encode_frame("a" * 64, 0, 1, noise), 4096)
    assert header.compression == "none" and raw == noise
    text = b"abc" * 1000
    header, raw = chunks.decode_frame(chunks.encode_frame("a" * 64, 0, 1, text), 3000)
    assert header.compression == "zlib" and raw == text


def test_zip_bomb_chunk_is_refused():
    import os
    import zlib

    frame = chunks.encode_frame("a" * 64, 0, 1, b"\x00" * 10_000)
    with pytest.raises(ArtifactSizeError, match="past its declared size"):
        chunks.decode_frame(frame, 1024)
    noise = chunks.encode_frame("a" * 64, 0, 1, os.urandom(2048))
    with pytest.raises(ArtifactSizeError, match="larger than its declared size"):
        chunks.decode_frame(noise, 1024)
    assert len(zlib.compress(b"\x00" * 10_000)) < 1024


def test_signed_manifest_verifies_with_pinned_key():
    k = SigningKey.generate()
    signed = decode(SignedManifest, k.sign(_manifest(3)).encode())
    m = TrustedKeys([k.public]).verify(signed, min_version=3)
    assert m.version == 3


def test_tampered_manifest_is_rejected():
    k = SigningKey.generate()
    signed = k.sign(_manifest())
    forged = SignedManifest(payload=signed.payload.replace('"version":1', '"version":9'),
                            signatures=signed.signatures)
    with pytest.raises(SignatureError, match="does not verify"):
        TrustedKeys([k.public]).verify(forged)


def test_unknown_key_is_rejected_and_rotation_accepts_both():
    old, new = SigningKey.generate(), SigningKey.generate()
    with pytest.raises(SignatureError, match="no trusted key"):
        TrustedKeys([old.public]).verify(new.sign(_manifest()))
    both = TrustedKeys([old.public, new.public])
    assert both.verify(old.sign(_manifest())).version == 1
    assert both.verify(new.sign(_manifest())).version == 1


def test_expired_and_rolled_back_manifests_are_rejected():
    k = SigningKey.generate()
    keys = TrustedKeys([k.public])
    with pytest.raises(ExpiredError):
        keys.verify(k.sign(_manifest(ttl=60)), now=time.time() + 120)
    with pytest.raises(RollbackError):
        keys.verify(k.sign(_manifest(version=4)), min_version=5)
