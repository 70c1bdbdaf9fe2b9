"""The local inference API: a Unix domain socket for applications on the device.

Applications ask the agent for predictions over a stream socket; they never load a model
themselves, so every switch of variant, and the telemetry of what was served, stays with
the agent. :mod:`prunefleet.agent.client` is the Python client; ``docs/agent.md`` is the
protocol for clients in other languages.

Framing (both directions, every message)::

    magic "PFA1" | header_len u32 BE | body_len u32 BE | header (UTF-8 JSON) | body

A predict request's body is the input as raw little-endian float32 in C order, described
by ``dtype`` and ``shape`` in its header; a response's body is the logits, described the
same way. No pickle, nothing executable: a frame is lengths, JSON and numbers.

A connection carries one request at a time, in order (a client may pipeline). An error
answers ``{"ok": false, "error": CODE, "message": ...}``; after most errors the connection
stays usable. Only a frame that breaks the framing itself (``bad_frame``) or a refused
connection (``busy``) closes it, since the stream cannot be resynchronised. Nothing a
client sends stops the server: every failure is answered, logged or counted.

Threads: one accept thread (blocked in ``select``, so an idle server costs no CPU) and one
thread per connection, at most ``max_connections`` in all and ``max_connections_per_peer``
per peer (the client's user id, from ``SO_PEERCRED``). When a new connection would pass
either limit, the connection that has been idle longest (the same peer's, when that peer is
at its limit) is closed to make room, so idle connections cannot lock applications out;
only when every such connection is busy with a request is the new one answered ``busy``
and closed. Inference runs on the connection's thread, on the sessions the pool holds; ONNX
Runtime sessions take concurrent runs.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import selectors
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import AgentConfigError, BadInputError, InferenceError, NoVariantError

log = logging.getLogger(__name__)

__all__ = [
    "DISCARD_MAX_BYTES",
    "MAGIC",
    "MAX_HEADER_BYTES",
    "PROTOCOL_VERSION",
    "ApiCounters",
    "ApiServer",
    "ErrorCode",
    "FrameReader",
    "agent_info",
]

PROTOCOL_VERSION = 1
MAGIC = b"PFA1"
PREFIX = struct.Struct(">4sII")
MAX_HEADER_BYTES = 64 * 1024
# A too-large body up to this size is read and thrown away so the connection stays usable;
# past it the server answers and closes rather than read that much.
DISCARD_MAX_BYTES = 64 * 1024 * 1024
# Headers and bodies at most this big go out in one write (one copy, one syscall).
COALESCE_BYTES = 64 * 1024
_ENCODER = json.JSONEncoder(separators=(",", ":"))
# sun_path holds 108 bytes, terminating NUL included.
_SUN_PATH_MAX = 107


class ErrorCode:
    """The ``error`` field of a failed response (``docs/agent.md`` lists what each means)."""

    BAD_FRAME = "bad_frame"  # framing broken (magic, lengths): connection closed
    BAD_REQUEST = "bad_request"  # well framed, but not a request we understand
    BAD_DTYPE = "bad_dtype"
    BAD_SHAPE = "bad_shape"
    BAD_INPUT = "bad_input"  # rejected by the model pool for another reason
    TOO_LARGE = "too_large"  # body over max_request_bytes or batch over max_batch
    NO_VARIANT = "no_variant"
    INFERENCE_FAILED = "inference_failed"
    INTERNAL = "internal"  # an unexpected error in the agent (logged there)
    BUSY = "busy"  # max_connections reached: connection closed


# -- framing (shared with the client) ----------------------------------------------------


class FrameError(Exception):
    """Bytes on the socket that do not follow the framing, or a header we cannot read."""


def encode_frame(
    header: dict[str, Any], body: bytes | memoryview = b""
) -> list[bytes | memoryview]:
    """The buffers of one frame, to be written in order."""
    h = _ENCODER.encode(header).encode()
    head = PREFIX.pack(MAGIC, len(h), len(body)) + h
    if len(body) <= COALESCE_BYTES:
        return [head + bytes(body)]
    return [head, body]


def send_frame(sock: socket.socket, header: dict[str, Any], body: bytes | memoryview = b"") -> None:
    for buf in encode_frame(header, body):
        sock.sendall(buf)


class FrameReader:
    """Buffered reads from a stream socket: a small frame costs one ``recv``.

    What arrives beyond the current frame stays buffered for the next one (pipelining).
    Bodies much larger than the buffer are received straight into their own buffer.
    """

    def __init__(self, sock: socket.socket, size: int = 64 * 1024):
        self.sock = sock
        # time.monotonic() after which a read raises TimeoutError (a trickling sender).
        self.deadline: float | None = None
        self._buf = bytearray(size)
        self._view = memoryview(self._buf)
        self._lo = 0
        self._hi = 0

    @property
    def buffered(self) -> int:
        return self._hi - self._lo

    def _check_deadline(self) -> None:
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise TimeoutError("frame not complete in time")

    def fill(self) -> int:
        """Receive once into the buffer; the number of bytes, 0 at end of stream."""
        self._check_deadline()
        if self._lo == self._hi:
            self._lo = self._hi = 0
        elif self._hi == len(self._buf):
            n = self._hi - self._lo
            self._buf[:n] = self._view[self._lo : self._hi]
            self._lo, self._hi = 0, n
        k = self.sock.recv_into(self._view[self._hi :])
        self._hi += k
        return k

    def read_prefix(self) -> tuple[int, int]:
        """The next frame's ``(header_len, body_len)``; :class:`FrameError` if not a frame."""
        while self._hi - self._lo < PREFIX.size:
            if self.fill() == 0:
                raise EOFError("connection closed inside a frame prefix")
        prefix = PREFIX.unpack_from(self._buf, self._lo)
        self._lo += PREFIX.size
        return check_prefix(*prefix)

    def read_frame(self, max_body: int) -> tuple[dict[str, Any], bytearray]:
        """The next whole frame: its header (parsed) and body."""
        hlen, blen = self.read_prefix()
        if blen > max_body:
            raise FrameError(f"body of {blen} bytes, more than {max_body}")
        lo = self._lo
        if self._hi - lo >= hlen + blen:  # all here already: no extra calls
            self._lo = lo + hlen + blen
            return parse_header(self._buf[lo : lo + hlen]), self._buf[lo + hlen : self._lo]
        return parse_header(self.read(hlen)), self.read(blen)

    def read(self, n: int) -> bytearray:
        """Exactly ``n`` bytes; ``EOFError`` if the stream ends first."""
        lo = self._lo
        if self._hi - lo >= n:
            self._lo = lo + n
            return self._buf[lo : lo + n]
        out = bytearray(n)
        have = min(n, self._hi - self._lo)
        out[:have] = self._view[self._lo : self._lo + have]
        self._lo += have
        view = memoryview(out)
        while have < n:
            if n - have >= len(self._buf) // 2:
                self._check_deadline()
                k = self.sock.recv_into(view[have:])
                if k == 0:
                    raise EOFError(f"connection closed after {have} of {n} bytes")
                have += k
                continue
            if self.fill() == 0:
                raise EOFError(f"connection closed after {have} of {n} bytes")
            take = min(n - have, self._hi - self._lo)
            view[have : have + take] = self._view[self._lo : self._lo + take]
            self._lo += take
            have += take
        return out

    def skip(self, n: int) -> None:
        """Drop ``n`` bytes in bounded memory."""
        while n > 0:
            if self._lo == self._hi and self.fill() == 0:
                raise EOFError("connection closed while discarding a body")
            take = min(n, self._hi - self._lo)
            self._lo += take
            n -= take


def check_prefix(magic: bytes, hlen: int, blen: int) -> tuple[int, int]:
    if magic != MAGIC:
        raise FrameError(f"bad magic {magic!r}: not a prunefleet API frame (expected {MAGIC!r})")
    if not 0 < hlen <= MAX_HEADER_BYTES:
        raise FrameError(f"header length {hlen} outside 1..{MAX_HEADER_BYTES}")
    return hlen, blen


def parse_header(raw: bytes | bytearray) -> dict[str, Any]:
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError) as e:  # not UTF-8, not JSON, or nested too deep
        raise FrameError(f"header is not UTF-8 JSON: {e}") from e
    if not isinstance(header, dict):
        raise FrameError("header is not a JSON object")
    return header


def check_shape(shape: object) -> tuple[int, ...]:
    """A header's ``shape``: a list of at most 32 non-negative ints."""
    if (
        not isinstance(shape, list)
        or len(shape) > 32
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
    ):
        raise FrameError("shape must be a list of at most 32 non-negative integers")
    return tuple(shape)


# -- server ------------------------------------------------------------------------------


@dataclass
class ApiCounters:
    """What the server has seen since start (read them from any thread; approximate)."""

    connections: int = 0
    refused_busy: int = 0
    evicted_idle: int = 0  # idle connections closed to make room for a new one
    requests: int = 0
    errors: int = 0
    bad_frames: int = 0


class _Reply(Exception):
    """An error answer to the current request; ``close`` ends the connection after it."""

    def __init__(self, code: str, message: str, close: bool = False):
        super().__init__(message)
        self.code = code
        self.message = message
        self.close = close


Predict = Callable[[np.ndarray, "int | None"], Any]  # returns a runtime.Served

_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def peer_of(conn: socket.socket) -> tuple[int | None, int | None]:
    """``(uid, pid)`` of the process at the other end (Linux ``SO_PEERCRED``)."""
    try:
        pid, uid, _gid = _PEERCRED.unpack(
            conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
    except (AttributeError, OSError, struct.error):
        return None, None
    return uid, pid


@dataclass
class _Conn:
    """One connection's bookkeeping (under the server's lock)."""

    thread: threading.Thread
    uid: int | None
    pid: int | None
    idle_since: float | None  # monotonic time it began waiting; None while serving
    evicted: bool = False


class ApiServer:
    """Serve ``predict`` and ``info`` on a Unix stream socket at ``socket_path``.

    ``predict(x, label)`` is :meth:`Agent.predict`: ``x`` float32 ``(N, *sample)``, and
    the result has ``variant``, ``reason``, ``logits`` ``(N, classes)`` and ``latency_ms``.
    ``info()`` returns a JSON-serialisable dict; when it has ``input_shape`` (the model's,
    batch dimension first) requests are checked against it here, so a wrong shape is
    answered ``bad_shape`` and a batch over ``max_batch`` ``too_large`` before any work.
    ``input_shape()``, if given, is used for that instead of calling ``info()`` per request.

    The socket file gets mode ``mode`` (0660: the agent's user and group); a stale file
    from a dead agent is replaced, a live one is left alone (start fails).
    """

    def __init__(
        self,
        socket_path: Path | str,
        predict: Predict,
        info: Callable[[], dict[str, Any]],
        *,
        input_shape: Callable[[], Sequence[int] | None] | None = None,
        max_request_bytes: int = 8 * 1024 * 1024,
        max_batch: int = 64,
        max_connections: int = 16,
        max_connections_per_peer: int = 8,
        idle_timeout_s: float = 300.0,
        io_timeout_s: float = 5.0,
        mode: int = 0o660,
    ) -> None:
        if (max_request_bytes < 1 or max_batch < 1 or max_connections < 1
                or max_connections_per_peer < 1):
            raise AgentConfigError("api limits must be positive")
        if idle_timeout_s <= 0 or io_timeout_s <= 0:
            raise AgentConfigError("api timeouts must be positive")
        self.socket_path = Path(socket_path)
        if len(os.fsencode(self.socket_path)) > _SUN_PATH_MAX - 16:
            raise AgentConfigError(
                f"api socket path too long for a Unix socket ({self.socket_path}); "
                f"keep it under {_SUN_PATH_MAX - 16} bytes"
            )
        self._predict = predict
        self._info = info
        self._input_shape = input_shape
        self.max_request_bytes = max_request_bytes
        self.max_batch = max_batch
        self.max_connections = max_connections
        self.max_connections_per_peer = max_connections_per_peer
        self.idle_timeout_s = idle_timeout_s
        self.io_timeout_s = io_timeout_s
        self.mode = mode
        self.counters = ApiCounters()

        self._listener: socket.socket | None = None
        self._inode: tuple[int, int] | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._conns: dict[socket.socket, _Conn] = {}
        self._stopping = threading.Event()
        self._conn_seq = 0

    @classmethod
    def for_agent(cls, agent: Any, socket_path: Path | str, **limits: Any) -> ApiServer:
        """A server wired to an :class:`~prunefleet.agent.service.Agent`."""
        return cls(
            socket_path,
            agent.predict,
            lambda: agent_info(agent),
            input_shape=lambda: _input_shape_of(agent.pool.specs),
            **limits,
        )

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        """Bind (replacing a stale socket file), then accept on a background thread."""
        if self._listener is not None:
            return
        path = self.socket_path
        path.parent.mkdir(parents=True, exist_ok=True)
        _clear_stale(path)
        # Bind under a temporary name, set the mode, then rename into place: the socket is
        # never reachable with looser permissions, and the path appears atomically.
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(tmp))
            os.chmod(tmp, self.mode)
            # The kernel's largest backlog: a flood of connections from one peer waits in it
            # to be refused, and must not leave no room for another app's connect().
            sock.listen(max(self.max_connections, socket.SOMAXCONN))
            os.replace(tmp, path)
            st = os.stat(path)
        except OSError as e:
            sock.close()
            tmp.unlink(missing_ok=True)
            raise AgentConfigError(f"cannot listen on {path}: {e}") from e
        sock.setblocking(False)
        self._inode = (st.st_dev, st.st_ino)
        self._listener = sock
        self._wake_r, self._wake_w = socket.socketpair()
        self._stopping.clear()
        self._accept_thread = threading.Thread(target=self._accept_loop, name="api-accept",
                                               daemon=True)
        self._accept_thread.start()
        log.info("local API listening on %s", path)

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop accepting, end every connection, remove the socket file."""
        if self._listener is None:
            return
        self._stopping.set()
        assert self._wake_w is not None
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        if self._accept_thread is not None:
            self._accept_thread.join(timeout_s)
        with self._lock:
            conns = dict(self._conns)
        # Drain: stop reading new requests (a waiting reader sees end of stream) but let a
        # request already being served finish and send its answer.
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RD)
        deadline = time.monotonic() + timeout_s
        for c in conns.values():
            c.thread.join(max(0.0, deadline - time.monotonic()))
        self._listener.close()
        self._listener = None
        for s in (self._wake_r, self._wake_w):
            if s is not None:
                s.close()
        self._wake_r = self._wake_w = None
        self._remove_socket_file()
        log.info("local API on %s stopped", self.socket_path)

    def __enter__(self) -> ApiServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _count(self, *names: str) -> None:
        with self._lock:
            for n in names:
                setattr(self.counters, n, getattr(self.counters, n) + 1)

    @property
    def connections(self) -> int:
        with self._lock:
            return len(self._conns)

    def _remove_socket_file(self) -> None:
        try:
            st = os.lstat(self.socket_path)
        except FileNotFoundError:
            return
        if (st.st_dev, st.st_ino) == self._inode:  # not a newer server's socket
            self.socket_path.unlink(missing_ok=True)

    # -- accepting ------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        assert self._listener is not None and self._wake_r is not None
        sel = selectors.DefaultSelector()
        sel.register(self._listener, selectors.EVENT_READ)
        sel.register(self._wake_r, selectors.EVENT_READ)
        try:
            while not self._stopping.is_set():
                for key, _ in sel.select():
                    if key.fileobj is self._listener:
                        self._accept()
        finally:
            sel.close()

    def _accept(self) -> None:
        assert self._listener is not None
        while True:
            try:
                conn, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                # EMFILE and friends: log, back off briefly, keep serving who is connected.
                log.warning("local API accept failed: %s", e)
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    time.sleep(0.05)
                return
            conn.setblocking(True)
            uid, pid = peer_of(conn)
            with self._lock:
                victim, full = self._make_room(uid)
                if not full:
                    self._conn_seq += 1
                    t = threading.Thread(target=self._serve, args=(conn,),
                                         name=f"api-conn-{self._conn_seq}", daemon=True)
                    self._conns[conn] = _Conn(t, uid, pid, time.monotonic())
                    self.counters.connections += 1
                else:
                    self.counters.refused_busy += 1
            if victim is not None:
                log.info("local API: closed an idle connection to make room for uid %s pid %s",
                         uid, pid)
                with contextlib.suppress(OSError):
                    victim.shutdown(socket.SHUT_RDWR)  # its thread sees the end and exits
            if full:
                self._refuse(conn)
            else:
                t.start()

    def _make_room(self, uid: int | None) -> tuple[socket.socket | None, bool]:
        """Under the lock: the idle connection to close for a new one from ``uid`` (or
        None when there is room), and whether the new one must be refused instead."""
        same = [s for s, c in self._conns.items() if c.uid == uid and not c.evicted]
        live = [s for s, c in self._conns.items() if not c.evicted]
        if len(same) >= self.max_connections_per_peer:
            pool = same
        elif len(live) >= self.max_connections:
            pool = live
        else:
            return None, False
        idle = [s for s in pool if self._conns[s].idle_since is not None]
        if not idle:
            return None, True
        victim = min(idle, key=lambda s: self._conns[s].idle_since or 0.0)
        self._conns[victim].evicted = True
        self.counters.evicted_idle += 1
        return victim, False

    def _idle(self, conn: socket.socket, idle: bool) -> bool:
        """Mark ``conn`` idle or busy; False when it was closed to make room."""
        with self._lock:
            c = self._conns.get(conn)
            if c is None or c.evicted:
                return False
            if not idle:
                c.idle_since = None
            elif c.idle_since is None:  # (a new connection is idle since it was accepted)
                c.idle_since = time.monotonic()
            return True

    def _refuse(self, conn: socket.socket) -> None:
        """Answer ``busy`` and close, on the accept thread, without waiting for anything:
        waiting to drain each refused connection (50 ms) let one peer's flood of connections
        hold the accept thread, fill the backlog and lock every other app out."""
        with conn:
            conn.setblocking(False)
            with contextlib.suppress(OSError):
                send_frame(conn, _error_header(None, ErrorCode.BUSY,
                                               f"too many connections (max "
                                               f"{self.max_connections}); retry later"))
            # Read what the client already sent, so that no reset loses the answer; never
            # wait for more (a non-blocking read with nothing there raises, and ends it).
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_WR)
                for _ in range(16):
                    if not conn.recv(65536):
                        break

    # -- one connection -------------------------------------------------------------------
    def _serve(self, conn: socket.socket) -> None:
        reader = FrameReader(conn)
        # One timeout for every read: a stall mid-frame ends the connection after
        # io_timeout_s; between frames, waits add up to idle_timeout_s.
        conn.settimeout(min(self.io_timeout_s, self.idle_timeout_s))
        try:
            while not self._stopping.is_set():
                idle_since = time.monotonic()
                reader.deadline = None
                if reader.buffered == 0 and not self._idle(conn, True):
                    return
                while reader.buffered == 0:
                    try:
                        if reader.fill() == 0:
                            return  # the client closed between requests (or was evicted)
                    except TimeoutError:
                        if time.monotonic() - idle_since >= self.idle_timeout_s:
                            log.debug("closing idle API connection")
                            return
                if not self._idle(conn, False):
                    return  # closed to make room just as this request arrived: unserved
                # The whole frame must arrive within io_timeout_s of its first bytes.
                reader.deadline = time.monotonic() + self.io_timeout_s
                if not self._one_request(conn, reader):
                    return
        except (EOFError, TimeoutError, OSError) as e:
            # The client vanished or stalled mid-frame: nothing to answer.
            log.debug("API connection ended: %s", e)
        except Exception:
            # A bug of ours must cost one connection, never the server.
            log.exception("API connection failed")
        finally:
            with self._lock:
                self._conns.pop(conn, None)
            with contextlib.suppress(OSError):
                conn.close()

    def _one_request(self, conn: socket.socket, reader: FrameReader) -> bool:
        """Read the rest of one frame, answer it; False when the connection must close."""
        rid: object = None
        try:
            try:
                hlen, blen = reader.read_prefix()
            except FrameError as e:
                raise _Reply(ErrorCode.BAD_FRAME, str(e), close=True) from e
            header_raw = reader.read(hlen)
            header: dict[str, Any] | None = None
            bad_header: FrameError | None = None
            try:
                header = parse_header(header_raw)
                rid = _request_id(header.get("id"))
            except FrameError as e:
                bad_header = e  # answered once the body is read: the stream stays in step
            if blen > self.max_request_bytes:
                close = blen > DISCARD_MAX_BYTES
                if not close:
                    reader.skip(blen)
                raise _Reply(ErrorCode.TOO_LARGE,
                             f"request body of {blen} bytes exceeds max_request_bytes "
                             f"({self.max_request_bytes})", close=close)
            body = reader.read(blen) if blen else bytearray()
            if bad_header is not None or header is None:
                raise _Reply(ErrorCode.BAD_REQUEST, str(bad_header))
            reply, out = self._dispatch(header, body)
            reply["id"] = rid
            self._count("requests")
            send_frame(conn, reply, out)
            return True
        except FrameError as e:
            return self._answer_error(conn, rid, _Reply(ErrorCode.BAD_REQUEST, str(e)))
        except _Reply as r:
            return self._answer_error(conn, rid, r)

    def _answer_error(self, conn: socket.socket, rid: object, r: _Reply) -> bool:
        self._count("requests", "errors", *(("bad_frames",) if r.code == ErrorCode.BAD_FRAME
                                             else ()))
        log.debug("API request failed: %s: %s", r.code, r.message)
        send_frame(conn, _error_header(rid, r.code, r.message))
        if r.close:
            _close_gently(conn)
            return False
        return True

    def _dispatch(self, header: dict[str, Any], body: bytearray) -> tuple[dict, bytes | memoryview]:
        op = header.get("op")
        if op == "predict":
            return self._do_predict(header, body)
        if op == "info":
            return self._do_info(), b""
        raise _Reply(ErrorCode.BAD_REQUEST, f"unknown op {op!r}: expected 'predict' or 'info'")

    def _do_info(self) -> dict[str, Any]:
        try:
            info = dict(self._info())
        except Exception as e:
            log.exception("API info() failed")
            raise _Reply(ErrorCode.INTERNAL, f"info failed: {type(e).__name__}: {e}") from e
        info["api"] = {
            "protocol": PROTOCOL_VERSION,
            "max_request_bytes": self.max_request_bytes,
            "max_batch": self.max_batch,
            "max_connections": self.max_connections,
            "max_connections_per_peer": self.max_connections_per_peer,
        }
        return {"ok": True, "info": info}

    def _do_predict(self, header: dict[str, Any], body: bytearray) -> tuple[dict, memoryview]:
        dtype = header.get("dtype")
        if dtype != "float32":
            raise _Reply(ErrorCode.BAD_DTYPE, f"input dtype {dtype!r}, expected 'float32'")
        shape = check_shape(header.get("shape"))
        if len(body) != 4 * math.prod(shape):
            raise _Reply(ErrorCode.BAD_REQUEST,
                         f"body of {len(body)} bytes does not hold float32 {list(shape)}")
        label = header.get("label")
        if label is not None and (not isinstance(label, int) or isinstance(label, bool)):
            raise _Reply(ErrorCode.BAD_REQUEST, "label must be an integer or null")
        x = np.frombuffer(body, dtype="<f4").reshape(shape)
        x = self._check_against_model(x)
        if label is not None and x.shape[0] != 1:
            raise _Reply(ErrorCode.BAD_REQUEST, "label is accepted only with a single input")

        t0 = time.perf_counter()
        try:
            served = self._predict(x, label)
        except BadInputError as e:
            raise _Reply(ErrorCode.BAD_INPUT, str(e)) from e
        except NoVariantError as e:
            raise _Reply(ErrorCode.NO_VARIANT, str(e)) from e
        except InferenceError as e:
            raise _Reply(ErrorCode.INFERENCE_FAILED, str(e)) from e
        except Exception as e:
            log.exception("API predict failed")
            raise _Reply(ErrorCode.INTERNAL, f"{type(e).__name__}: {e}") from e
        logits = np.ascontiguousarray(served.logits, dtype="<f4")
        if logits.ndim == 1:
            logits = logits[None]
        reply = {
            "ok": True,
            "variant": served.variant,
            "reason": str(getattr(served.reason, "value", served.reason)),
            "latency_ms": round(float(served.latency_ms), 4),
            "server_ms": round((time.perf_counter() - t0) * 1000.0, 4),
            "labels": logits.argmax(axis=1).tolist(),
            "dtype": "float32",
            "shape": list(logits.shape),
        }
        return reply, logits.data.cast("B")

    def _check_against_model(self, x: np.ndarray) -> np.ndarray:
        """Shape and batch checks against the installed model, before any work is done."""
        want = self._model_input_shape()
        if want is None:
            if x.ndim >= 2 and x.shape[0] > self.max_batch:
                raise _Reply(ErrorCode.TOO_LARGE, f"batch of {x.shape[0]} exceeds max_batch "
                                                  f"({self.max_batch})")
            return x  # the pool decides (or reports that nothing is installed)
        sample = tuple(want[1:])
        if x.shape == sample:
            x = x[None]
        elif x.ndim != len(sample) + 1 or x.shape[1:] != sample:
            dims = ", ".join(map(str, sample))
            raise _Reply(ErrorCode.BAD_SHAPE,
                         f"input shape {tuple(x.shape)}, expected (N, {dims}) or ({dims})")
        if x.shape[0] < 1:
            raise _Reply(ErrorCode.BAD_SHAPE, "empty batch")
        if x.shape[0] > self.max_batch:
            raise _Reply(ErrorCode.TOO_LARGE,
                         f"batch of {x.shape[0]} exceeds max_batch ({self.max_batch})")
        return x

    def _model_input_shape(self) -> tuple[int, ...] | None:
        try:
            if self._input_shape is not None:
                shape = self._input_shape()
            else:
                shape = self._info().get("input_shape")
        except Exception:
            log.exception("API could not read the model's input shape")
            return None
        return None if shape is None else tuple(int(d) for d in shape)


def _request_id(value: object) -> object:
    """Echo a client's id only if it is a small int or short string."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) < 2**53:
        return value
    if isinstance(value, str) and len(value) <= 128:
        return value
    return None


def _error_header(rid: object, code: str, message: str) -> dict[str, Any]:
    return {"id": rid, "ok": False, "error": code, "message": message[:1024]}


def _close_gently(conn: socket.socket, drain_bytes: int = 1 << 20, drain_s: float = 0.2) -> None:
    """Half-close, then read a little of what the client still sends before closing.

    Closing a Unix socket with unread input resets the peer, which could lose the error
    answer just sent; draining briefly lets a well-meaning client read it.
    """
    with contextlib.suppress(OSError):
        conn.shutdown(socket.SHUT_WR)
        conn.settimeout(drain_s)
        deadline = time.monotonic() + drain_s
        while drain_bytes > 0 and time.monotonic() < deadline:
            k = len(conn.recv(min(drain_bytes, 65536)))
            if k == 0:
                break
            drain_bytes -= k


def _clear_stale(path: Path) -> None:
    """Remove a socket file no process serves; refuse to touch anything else."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise AgentConfigError(f"{path} exists and is not a socket; not replacing it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        log.info("removing stale API socket %s", path)
        path.unlink(missing_ok=True)
        return
    except OSError as e:
        raise AgentConfigError(f"{path}: cannot tell whether another agent serves it: {e}") from e
    finally:
        probe.close()
    raise AgentConfigError(f"another process is serving on {path}")


# -- wiring to the agent -----------------------------------------------------------------


def _input_shape_of(specs: dict[str, Any]) -> list[int] | None:
    for spec in specs.values():
        return list(spec.input_shape)
    return None


def agent_info(agent: Any) -> dict[str, Any]:
    """What ``info`` answers for an Agent: device, active variant, the installed variants."""
    pool = agent.pool
    specs, table = pool.specs, pool.table
    variants = sorted(
        (
            {
                "name": spec.name,
                "macs": spec.macs,
                "params": spec.params,
                "accuracy": spec.accuracy,
                "latency_ms": spec.latency_ms,
                "technique": spec.technique,
                "sha256": spec.sha256,
                "loaded": spec.name in table,
                # Installed only to be profiled (a tune candidate): never serves.
                "profile_only": spec.profile_only,
            }
            for spec in specs.values()
        ),
        key=lambda v: (v["macs"], v["name"]),
    )
    first = next(iter(specs.values()), None)
    return {
        "device_id": agent.device_id,
        "active_variant": agent.active_variant,
        "input_shape": None if first is None else list(first.input_shape),
        "num_classes": None if first is None else first.num_classes,
        "variants": variants,
    }
