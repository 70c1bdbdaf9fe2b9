"""What a hostile peer can send, under hypothesis: any bytes given to a wire-message decoder
end as the message or as ``ProtocolError`` (counted and dropped by the caller), and any bytes
on the agent's local socket end as frames, ``FrameError`` or ``EOFError``. Never another
exception: that would crash-loop an agent or kill a server thread.

Bounded: a fixed number of examples per decoder, no deadline (the machines are shared).
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prunefleet.agent.api import MAGIC, PREFIX, FrameError, FrameReader, parse_header
from prunefleet.shared import messages
from prunefleet.shared.errors import ProtocolError
from prunefleet.shared.messages import WireModel, decode


def _wire_models() -> list[type[WireModel]]:
    out, todo = [], list(WireModel.__subclasses__())
    while todo:
        cls = todo.pop()
        todo += cls.__subclasses__()
        if cls.__module__ == messages.__name__:
            out.append(cls)
    return sorted(out, key=lambda c: c.__name__)


MODELS = _wire_models()
FUZZ = settings(max_examples=150, deadline=None, database=None, derandomize=True,
                suppress_health_check=list(HealthCheck))

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=20,
)


def _nested(depth: int, opener: str, closer: str, inner: str = "0") -> str:
    return opener * depth + inner + closer * depth


@st.composite
def hostile_payloads(draw: Any, model: type[WireModel]) -> bytes:
    fields = sorted(model.model_fields)
    kind = draw(st.sampled_from(["bytes", "json", "fields", "deep", "huge_int"]))
    if kind == "bytes":
        return draw(st.binary(max_size=2048))
    if kind == "json":
        return json.dumps(draw(json_values)).encode()
    if kind == "fields":  # the model's own field names with any values: deeper validation
        keys = st.sampled_from(fields) if fields else st.text(max_size=8)
        doc = draw(st.dictionaries(keys, json_values, max_size=len(fields) + 1))
        return json.dumps(doc).encode()
    field = json.dumps(draw(st.sampled_from(fields or ["x"])))
    if kind == "deep":  # nested far past any recursion limit, inside a real field
        depth = draw(st.integers(100, 200_000))
        opener, closer = draw(st.sampled_from([("[", "]"), ('{"a":', "}")]))
        return ("{" + field + ":" + _nested(depth, opener, closer) + "}").encode()
    digits = draw(st.integers(4000, 20_000))  # past Python's int-to-str limit
    return ("{" + field + ":" + "7" * digits + "}").encode()


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
def test_any_payload_decodes_or_is_a_protocol_error(model: type[WireModel]) -> None:
    @FUZZ
    @given(payload=hostile_payloads(model))
    def check(payload: bytes) -> None:
        try:
            out = decode(model, payload)
        except ProtocolError:
            return
        assert isinstance(out, model)

    check()


def test_every_wire_model_is_fuzzed() -> None:
    names = {m.__name__ for m in MODELS}
    assert {"Manifest", "SignedManifest", "ReportedState", "TelemetryBatch", "Event",
            "Command"} <= names, names


# -- the agent's local socket ----------------------------------------------------------------


def _frame(header: bytes, body: bytes) -> bytes:
    return PREFIX.pack(MAGIC, len(header), len(body)) + header + body


@st.composite
def streams(draw: Any) -> bytes:
    """Bytes as a client might send them: garbage, frames, frames with broken parts."""
    parts = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["garbage", "frame", "bad_header", "lying_lengths"]))
        if kind == "garbage":
            parts.append(draw(st.binary(max_size=256)))
        elif kind == "frame":
            header = json.dumps(draw(st.dictionaries(st.text(max_size=8), json_values,
                                                     max_size=4))).encode()
            parts.append(_frame(header, draw(st.binary(max_size=64))))
        elif kind == "bad_header":
            header = draw(st.binary(min_size=1, max_size=256) | st.just(
                _nested(5000, "[", "]").encode()) | st.just(b"7" * 5000))
            parts.append(_frame(header, b""))
        else:
            hlen = draw(st.integers(0, 2**32 - 1))
            blen = draw(st.integers(0, 2**32 - 1))
            parts.append(PREFIX.pack(MAGIC, hlen, blen) + draw(st.binary(max_size=64)))
    return b"".join(parts)


@FUZZ
@given(data=streams())
def test_any_bytes_on_the_socket_are_frames_or_a_frame_error(data: bytes) -> None:
    a, b = socket.socketpair()

    def send() -> None:
        with a, contextlib.suppress(OSError):  # the reader may stop reading first
            a.sendall(data)

    writer = threading.Thread(target=send, daemon=True)
    writer.start()
    reader = FrameReader(b, size=1024)
    try:
        for _ in range(64):
            try:
                header, body = reader.read_frame(max_body=1 << 20)
            except (FrameError, EOFError):
                break
            assert isinstance(header, dict) and isinstance(body, bytes | bytearray)
    finally:
        b.close()
        writer.join(5)


@FUZZ
@given(raw=st.binary(max_size=512) | json_values.map(lambda v: json.dumps(v).encode()))
def test_any_header_is_a_dict_or_a_frame_error(raw: bytes) -> None:
    with contextlib.suppress(FrameError):
        assert isinstance(parse_header(raw), dict)
