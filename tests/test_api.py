"""The local inference API: a real in-process agent behind a real Unix socket."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from fleet_helpers import make_server, prefix_for, wait_for
from onnx_models import mlp_spec

from prunefleet.agent.api import MAGIC, ApiServer
from prunefleet.agent.client import (
    ApiConnectionError,
    ApiError,
    ApiNoVariantError,
    BadDtypeError,
    BadFrameError,
    BadRequestError,
    BadShapeError,
    Client,
    ServerBusyError,
    TooLargeError,
)
from prunefleet.agent.config import load_config
from prunefleet.agent.errors import AgentConfigError, BadInputError, NoVariantError
from prunefleet.agent.runtime import load_session
from prunefleet.agent.service import Agent
from prunefleet.server.keys import load_or_create


def _agent(tmp: Path, broker_url: str = "mqtt://127.0.0.1:1", device: str = "dev-api") -> Agent:
    load_or_create(tmp / "keys")
    cfg = load_config(
        None, env={}, device_id=device, broker_url=broker_url, state_dir=tmp / device,
        trusted_keys=[tmp / "keys" / "public.pem"], sensors={"kind": "simulated"},
        fleet_prefix=prefix_for(tmp),
    )
    return Agent(cfg)


def _install(agent: Agent, tmp: Path, name: str, hidden: int, seed: int) -> Path:
    path = tmp / f"{name}.onnx"
    agent.pool.put(load_session(path, mlp_spec(path, name, hidden=hidden, seed=seed)))
    return path


class Direct:
    """ONNX Runtime on the same files, without the agent: what the API must reproduce."""

    def __init__(self, files: dict[str, Path]):
        self.sessions = {n: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
                         for n, p in files.items()}

    def __call__(self, variant: str, x: np.ndarray) -> np.ndarray:
        x = x if x.ndim == 4 else x[None]
        return self.sessions[variant].run(None, {"input": x.astype(np.float32)})[0]


@pytest.fixture
def served(tmp_path):
    agent = _agent(tmp_path)
    files = {"small": _install(agent, tmp_path, "small", 16, 1),
             "large": _install(agent, tmp_path, "large", 64, 2)}
    server = ApiServer.for_agent(agent, tmp_path / "api.sock", max_batch=8,
                                 max_request_bytes=64 * 1024, io_timeout_s=1.0)
    server.start()
    yield server, agent, Direct(files)
    server.stop()


def _inputs(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 1, (n, 1, 8, 8)).astype(np.float32)


def test_predictions_match_onnxruntime_and_info_describes_the_agent(served):
    server, agent, direct = served
    with Client(server.socket_path) as c:
        for x in _inputs(20):  # single inputs, without the batch dimension
            p = c.predict(x)
            assert p.logits.shape == (1, 10) and p.labels.shape == (1,)
            np.testing.assert_allclose(p.logits, direct(p.variant, x), rtol=1e-5, atol=1e-6)
            assert p.label == int(np.argmax(direct(p.variant, x)))
            assert p.reason and p.latency_ms >= 0
        assert p.variant == agent.active_variant
        info = c.info()
    assert info["device_id"] == "dev-api"
    assert info["input_shape"] == [1, 1, 8, 8] and info["num_classes"] == 10
    assert [v["name"] for v in info["variants"]] == ["small", "large"]  # cheapest first
    assert info["active_variant"] == p.variant
    assert info["api"]["max_batch"] == 8 and info["api"]["protocol"] == 1


def test_a_batch_is_served_in_one_request(served):
    server, _, direct = served
    x = _inputs(8, seed=3)
    with Client(server.socket_path) as c:
        p = c.predict(x)
    assert p.logits.shape == (8, 10)
    np.testing.assert_allclose(p.logits, direct(p.variant, x), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(p.labels, direct(p.variant, x).argmax(axis=1))
    assert server.counters.requests == 1


def test_each_error_is_typed_and_the_connection_stays_usable(served):
    server, _, _ = served
    good = _inputs(1)
    cases = [
        (good.astype(np.float64), BadDtypeError),
        (good.astype(np.int32), BadDtypeError),
        (np.array(["a"]), BadDtypeError),  # cannot even be framed: refused by the client
        (good[0, 0], BadShapeError),  # (8, 8): channel missing
        (np.zeros((2, 1, 8, 9), np.float32), BadShapeError),
        (np.zeros((0, 1, 8, 8), np.float32), BadShapeError),
        (np.float32(1.0), BadShapeError),
        (_inputs(9), TooLargeError),  # max_batch is 8
        (np.zeros((300, 1, 8, 8), np.float32), TooLargeError),  # 76.8 kB > 64 KiB
    ]
    with Client(server.socket_path) as c:
        c.predict(good)
        for x, error in cases:
            with pytest.raises(error) as info:
                c.predict(x)
            assert isinstance(info.value, BadInputError) and isinstance(info.value, ApiError)
            assert str(info.value)
            assert c.predict(good).logits.shape == (1, 10)
        with pytest.raises(BadRequestError, match="single input"):
            c.predict(_inputs(2), label=3)
        assert c.predict(good, label=3).logits.shape == (1, 10)
    assert server.counters.connections == 1, "every error was answered on the same connection"


def test_no_variant_installed_is_reported_until_one_is(tmp_path):
    agent = _agent(tmp_path)
    with ApiServer.for_agent(agent, tmp_path / "api.sock") as server, \
            Client(server.socket_path) as c:
        with pytest.raises(ApiNoVariantError) as info:
            c.predict(_inputs(1))
        assert isinstance(info.value, NoVariantError) and info.value.code == "no_variant"
        assert c.info()["variants"] == [] and c.info()["input_shape"] is None
        _install(agent, tmp_path, "v1", 16, 0)
        assert c.predict(_inputs(1)).variant == "v1"
        assert server.counters.connections == 1


def _raw(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(str(path))
    return s


def _frame(header: dict | bytes, body: bytes = b"", blen: int | None = None) -> bytes:
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack(">4sII", MAGIC, len(h), len(body) if blen is None else blen) + h + body


def _answer(s: socket.socket) -> tuple[dict, bytes] | None:
    """One frame from the server, or None if it closed the connection."""
    data = b""
    while len(data) < 12 or len(data) < 12 + sum(struct.unpack(">II", data[4:12])):
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            chunk = b""  # closed with our bytes unread: as good as closed
        if not chunk:
            return None
        data += chunk
    hlen, blen = struct.unpack(">II", data[4:12])
    assert data[:4] == MAGIC
    return json.loads(data[12:12 + hlen]), data[12 + hlen:12 + hlen + blen]


def test_garbage_bytes_are_answered_and_never_stop_the_server(served):
    server, _, direct = served
    path = server.socket_path
    rng = np.random.default_rng(7)
    # Random bytes: answered bad_frame, then closed (the stream cannot be resynchronised).
    for n in (1, 11, 12, 100, 5000):
        with _raw(path) as s:
            s.sendall(rng.bytes(n))
            if n >= 12:
                head, _ = _answer(s)
                assert head["ok"] is False and head["error"] == "bad_frame"
                assert _answer(s) is None
            s.shutdown(socket.SHUT_WR)  # a short prefix, then nothing: server just closes
    # Well-framed nonsense: answered, and the same connection carries on.
    with _raw(path) as s:
        bad = [
            (_frame(b"\xff\xfe not json"), "bad_request"),
            (_frame(b"[1, 2]"), "bad_request"),
            (_frame(b"[" * 60_000), "bad_request"),  # nested deeper than json can parse
            (_frame({"op": "explode", "id": 1}), "bad_request"),
            (_frame({"op": "predict", "id": 2, "dtype": "float32", "shape": [1, 1, 8, 8]},
                    b"\0" * 12), "bad_request"),  # body does not hold the shape
            (_frame({"op": "predict", "id": 3, "dtype": "float32", "shape": "big"}),
             "bad_request"),
            (_frame({"op": "predict", "id": 4, "dtype": "float16", "shape": [1]}, b"\0\0"),
             "bad_dtype"),
            (_frame({"op": "predict", "id": 5}, b"\0" * 70_000), "too_large"),  # discarded
        ]
        for frame, code in bad:
            s.sendall(frame)
            head, _ = _answer(s)
            assert (head["ok"], head["error"]) == (False, code), head
        x = _inputs(1)
        s.sendall(_frame({"op": "predict", "id": 9, "dtype": "float32", "shape": [1, 1, 8, 8]},
                         x.tobytes()))
        head, body = _answer(s)
        assert head["ok"] and head["id"] == 9
        np.testing.assert_allclose(np.frombuffer(body, "<f4").reshape(1, 10),
                                   direct(head["variant"], x), rtol=1e-5, atol=1e-6)
    # A header larger than allowed, or a body too large to discard: answered, then closed.
    for frame, code in [(struct.pack(">4sII", MAGIC, 1 << 30, 0), "bad_frame"),
                        (_frame({"op": "info", "id": 1}, blen=1 << 30), "too_large")]:
        with _raw(path) as s:
            s.sendall(frame)
            head, _ = _answer(s)
            assert head["error"] == code
            assert _answer(s) is None
    # A client that stalls mid-frame, or trickles a frame in, is dropped after io_timeout_s.
    with _raw(path) as s:
        s.sendall(_frame({"op": "info"}, blen=100)[:20])
        assert _answer(s) is None
    with _raw(path) as s:
        # One byte every 0.1 s of a frame that would take 100 s: each read succeeds, so
        # only the whole-frame deadline (1 s) can cut it off; the write then fails.
        frame = _frame({"op": "info"}, blen=1000)
        sent = 0
        with contextlib.suppress(OSError):
            for b in frame[:100]:
                s.sendall(bytes([b]))
                sent += 1
                time.sleep(0.1)
        assert _answer(s) is None and sent < 100
    with Client(path) as c:
        assert c.predict(_inputs(1)).logits.shape == (1, 10)
    assert server.counters.bad_frames == 4  # three random prefixes, one huge header
    wait_for(lambda: server.connections == 0, 5, what="every raw connection to be closed")


def test_a_garbage_response_is_a_bad_frame_for_the_client(tmp_path):
    path = tmp_path / "fake.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)

    def fake_server():
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")

    t = threading.Thread(target=fake_server, daemon=True)
    t.start()
    with Client(path, timeout_s=2) as c, pytest.raises(BadFrameError):
        c.info()
    t.join(5)
    listener.close()


def test_concurrent_clients_each_get_their_own_answers(served):
    server, _, direct = served
    failures: list[str] = []

    def worker(seed: int, client: Client) -> None:
        try:
            for i, x in enumerate(_inputs(40, seed=seed)):
                xb = x if i % 3 else np.stack([x, x])
                p = client.predict(xb)
                np.testing.assert_allclose(p.logits, direct(p.variant, xb), rtol=1e-5,
                                           atol=1e-6)
        except Exception as e:  # reported below, with the seed
            failures.append(f"{seed}: {e!r}")

    own = [Client(server.socket_path) for _ in range(6)]
    shared = Client(server.socket_path)  # one client used by several threads in turn
    threads = [threading.Thread(target=worker, args=(i, c)) for i, c in enumerate(own)]
    threads += [threading.Thread(target=worker, args=(100 + i, shared)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for c in [*own, shared]:
        c.close()
    assert not failures, failures
    assert server.counters.connections == 7 and server.counters.errors == 0


def _blocking_server(path: Path, **limits) -> tuple[ApiServer, threading.Event, list]:
    """A server whose predict waits for ``release``; ``serving`` lists requests in it."""
    from prunefleet.agent.runtime import Served
    from prunefleet.shared.messages import Reason

    release = threading.Event()
    serving: list = []

    def predict(x, label):
        serving.append(x)
        release.wait(10)
        return Served("v", Reason.INITIAL, np.zeros((x.shape[0], 10), np.float32), 1.0)

    server = ApiServer(path, predict, dict, input_shape=lambda: [1, 1, 8, 8], **limits)
    return server, release, serving


def test_a_new_connection_is_refused_busy_only_when_every_slot_serves(tmp_path):
    server, release, serving = _blocking_server(tmp_path / "api.sock", max_connections=2)
    with server:
        answers: list = []
        busy = [threading.Thread(target=lambda: answers.append(
            Client(server.socket_path, timeout_s=10).predict(_inputs(1)).variant))
            for _ in range(2)]
        for t in busy:
            t.start()
        wait_for(lambda: len(serving) == 2, 5, what="two requests being served")
        c = Client(server.socket_path)
        with pytest.raises(ServerBusyError) as info:
            c.info()
        assert info.value.code == "busy" and isinstance(info.value, ApiConnectionError)
        release.set()
        for t in busy:
            t.join(10)
        assert answers == ["v", "v"]
        assert c.info()["api"]["max_connections"] == 2, "c reconnects once a slot is free"
        assert server.counters.refused_busy == 1 and server.counters.evicted_idle == 0
        c.close()


def test_a_flood_of_connections_gets_busy_answers_and_locks_no_client_out(tmp_path):
    """Every slot busy, and one peer connecting as fast as it can and holding each
    connection: the accept thread answers each "busy" without waiting on it, so another
    client still gets in and hears "busy" (then is served once a slot frees), where the
    flood used to fill the backlog and its connect() failed at once."""
    server, release, serving = _blocking_server(tmp_path / "api.sock", max_connections=2)
    with server:
        held = [threading.Thread(target=lambda: Client(
            server.socket_path, timeout_s=20).predict(_inputs(1))) for _ in range(2)]
        for t in held:
            t.start()
        wait_for(lambda: len(serving) == 2, 5, what="two requests being served")
        stop = threading.Event()
        flood: list[socket.socket] = []

        def connect_forever() -> None:
            while not stop.is_set() and len(flood) < 3000:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    s.connect(str(server.socket_path))
                flood.append(s)  # never read, never closed until the end

        flooders = [threading.Thread(target=connect_forever) for _ in range(4)]
        for t in flooders:
            t.start()
        try:
            wait_for(lambda: server.counters.refused_busy > 100, 10, what="the flood refused")
            for _ in range(5):
                with pytest.raises(ServerBusyError):
                    Client(server.socket_path, timeout_s=5).info()
        finally:
            stop.set()
            for t in flooders:
                t.join(10)
            release.set()
            for t in held:
                t.join(10)
            for s in flood:
                s.close()
        with Client(server.socket_path, timeout_s=5) as c:
            assert c.info()["api"]["max_connections"] == 2


def test_idle_connections_cannot_lock_applications_out(tmp_path):
    """16 connections that send nothing: the next application is served, the one idle
    longest is closed to make room."""
    agent = _agent(tmp_path)
    _install(agent, tmp_path, "v1", 16, 0)
    with ApiServer.for_agent(agent, tmp_path / "api.sock", max_connections=16,
                             max_connections_per_peer=16) as server:
        idle = []
        for _ in range(16):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(str(server.socket_path))
            idle.append(s)
        wait_for(lambda: server.connections == 16, 5, what="16 idle connections accepted")
        with Client(server.socket_path) as app:
            assert app.predict(_inputs(1)).variant == "v1"
        idle[0].settimeout(5)
        assert idle[0].recv(1) == b"", "the longest idle connection was closed"
        assert server.counters.evicted_idle == 1 and server.counters.refused_busy == 0
        for s in idle:
            s.close()


def test_one_peer_holds_at_most_its_share_and_an_evicted_client_reconnects(tmp_path):
    agent = _agent(tmp_path)
    _install(agent, tmp_path, "v1", 16, 0)
    with ApiServer.for_agent(agent, tmp_path / "api.sock", max_connections=16,
                             max_connections_per_peer=2) as server:
        a, b, c = (Client(server.socket_path) for _ in range(3))
        a.info()
        b.info()
        assert c.info()["api"]["max_connections_per_peer"] == 2  # a, idle longest, closed
        wait_for(lambda: server.connections == 2, 5, what="a's connection to end")
        # a's next call meets its closed connection: it is sent again on a new one.
        assert a.predict(_inputs(1)).variant == "v1"
        assert server.counters.evicted_idle == 2  # b made room for a in turn
        assert b.predict(_inputs(1)).variant == "v1"
        assert server.counters.errors == 0 and server.counters.refused_busy == 0
        for cl in (a, b, c):
            cl.close()


def test_socket_file_mode_stale_file_and_removal(tmp_path):
    agent = _agent(tmp_path)
    path = tmp_path / "run" / "agent.sock"
    path.parent.mkdir()
    # A socket file left by a dead agent: nobody listens on it.
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()
    assert stat.S_ISSOCK(os.lstat(path).st_mode)

    server = ApiServer.for_agent(agent, path)
    server.start()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
    assert Client(path).info()["device_id"] == "dev-api"
    with pytest.raises(AgentConfigError, match="another process"):
        ApiServer.for_agent(agent, path).start()  # a live server is left alone
    server.stop()
    assert not path.exists()
    with pytest.raises(ApiConnectionError, match="no agent serving"):
        Client(path).info()

    path.write_text("not a socket")
    with pytest.raises(AgentConfigError, match="not a socket"):
        ApiServer.for_agent(agent, path).start()
    assert path.read_text() == "not a socket"


def test_a_variant_delivered_over_mqtt_is_served_on_the_socket(tmp_path, mosquitto):
    srv = make_server(tmp_path, mosquitto.url)
    agent = _agent(tmp_path, mosquitto.url, device="dev-e2e")
    stop = threading.Event()
    loop = threading.Thread(target=agent.run, kwargs={"until": stop}, daemon=True)
    api = ApiServer.for_agent(agent, tmp_path / "api.sock")
    api.start()
    loop.start()
    try:
        with Client(api.socket_path) as c:
            with pytest.raises(NoVariantError):
                c.predict(_inputs(1))
            spec = mlp_spec(tmp_path / "v1.onnx", "v1", hidden=32, chunk_bytes=2048)
            srv.publish_artifact(spec, (tmp_path / "v1.onnx").read_bytes())
            srv.deploy("dev-e2e", [spec])
            wait_for(lambda: "v1" in agent.pool.table, 20, what="v1 installed")
            x = _inputs(4, seed=5)
            p = c.predict(x)
            assert p.variant == "v1"
            np.testing.assert_allclose(
                p.logits, Direct({"v1": tmp_path / "v1.onnx"})("v1", x), rtol=1e-5, atol=1e-6)
    finally:
        api.stop()
        stop.set()
        loop.join(10)
        srv.stop()


def test_the_client_needs_neither_onnxruntime_nor_torch():
    code = ("import sys, prunefleet.agent.client\n"
            "bad = [m for m in ('onnxruntime', 'torch', 'paho') if m in sys.modules]\n"
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_stopping_answers_the_request_in_flight_then_refuses_new_ones(tmp_path):
    """SIGTERM drains: a request being served when the API stops still gets its answer."""
    from prunefleet.agent.runtime import Served
    from prunefleet.shared.messages import Reason

    started = threading.Event()

    def slow_predict(x, label):
        started.set()
        time.sleep(0.5)
        return Served("v", Reason.INITIAL, np.zeros((x.shape[0], 10), np.float32), 500.0)

    server = ApiServer(tmp_path / "drain.sock", slow_predict, dict,
                       input_shape=lambda: [1, 1, 8, 8])
    server.start()
    result: dict = {}

    def ask():
        with Client(server.socket_path, timeout_s=5) as c:
            result["p"] = c.predict(_inputs(1))

    t = threading.Thread(target=ask)
    t.start()
    assert started.wait(5)
    server.stop()  # while the request is being served
    t.join(5)
    assert result["p"].variant == "v", "the request in flight was answered"
    assert not server.socket_path.exists()
    with pytest.raises(ApiConnectionError):
        Client(server.socket_path, timeout_s=1).predict(_inputs(1))
