"""Python client of the agent's local inference API (numpy only; no torch, no onnxruntime).

    with Client("/run/prunefleet/agent.sock") as c:
        p = c.predict(x)            # x: float32 (1, 8, 8) or a batch (N, 1, 8, 8)
        p.label, p.labels, p.logits, p.variant, p.reason, p.latency_ms

Every answer the agent refuses becomes a typed exception; each is also one of the agent's
own errors, so ``except BadInputError`` catches a bad input whether the model ran in this
process or behind the socket::

    ApiError (AgentError)           anything the local API reports; ``.code`` is the wire code
    ├── ApiConnectionError          cannot connect, connection lost, timed out
    │   └── ServerBusyError         busy: the agent has max_connections clients already
    ├── BadFrameError               bad_frame: bytes that are not frames (either direction)
    ├── BadRequestError             bad_request: a frame that is not a valid request
    ├── ApiBadInputError            bad_input (also a BadInputError)
    │   ├── BadShapeError           bad_shape: not the model's input shape
    │   ├── BadDtypeError           bad_dtype: not float32
    │   └── TooLargeError           too_large: over max_request_bytes or max_batch
    ├── ApiNoVariantError           no_variant (also a NoVariantError)
    └── ApiInferenceError           inference_failed, internal (also an InferenceError)

After an error the connection is kept when the server keeps it (all but ``bad_frame``,
``busy`` and lost connections); otherwise the next call reconnects.
"""

from __future__ import annotations

import math
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .api import COALESCE_BYTES, MAGIC, PREFIX, ErrorCode, FrameError, FrameReader
from .errors import AgentError, BadInputError, InferenceError, NoVariantError

__all__ = [
    "ApiBadInputError",
    "ApiConnectionError",
    "ApiError",
    "ApiInferenceError",
    "ApiNoVariantError",
    "BadDtypeError",
    "BadFrameError",
    "BadRequestError",
    "BadShapeError",
    "Client",
    "Prediction",
    "ServerBusyError",
    "TooLargeError",
]

_F32 = np.dtype("<f4")
# A response body the client accepts at most (logits of a large batch fit easily).
MAX_RESPONSE_BYTES = 256 * 1024 * 1024


class ApiError(AgentError):
    """The local API refused a request or could not be reached."""

    def __init__(self, message: str, code: str | None = None):
        super().__init__(message)
        self.code = code


class ApiConnectionError(ApiError):
    pass


class ServerBusyError(ApiConnectionError):
    pass


class BadFrameError(ApiError):
    pass


class BadRequestError(ApiError):
    pass


class ApiBadInputError(ApiError, BadInputError):
    pass


class BadShapeError(ApiBadInputError):
    pass


class BadDtypeError(ApiBadInputError):
    pass


class TooLargeError(ApiBadInputError):
    pass


class ApiNoVariantError(ApiError, NoVariantError):
    pass


class ApiInferenceError(ApiError, InferenceError):
    pass


_BY_CODE: dict[str, type[ApiError]] = {
    ErrorCode.BAD_FRAME: BadFrameError,
    ErrorCode.BAD_REQUEST: BadRequestError,
    ErrorCode.BAD_DTYPE: BadDtypeError,
    ErrorCode.BAD_SHAPE: BadShapeError,
    ErrorCode.BAD_INPUT: ApiBadInputError,
    ErrorCode.TOO_LARGE: TooLargeError,
    ErrorCode.NO_VARIANT: ApiNoVariantError,
    ErrorCode.INFERENCE_FAILED: ApiInferenceError,
    ErrorCode.INTERNAL: ApiInferenceError,
    ErrorCode.BUSY: ServerBusyError,
}
# Codes after which the server has closed the connection.
_CLOSING = frozenset({ErrorCode.BAD_FRAME, ErrorCode.BUSY})


class _ClosedIdle(Exception):
    """The connection was closed before any byte of the answer came back."""

    def __init__(self, error: ApiConnectionError) -> None:
        super().__init__(str(error))
        self.error = error


@dataclass(frozen=True)
class Prediction:
    """The agent's answer to one request (one input or a batch)."""

    labels: np.ndarray  # (N,) int64: argmax of each row of logits
    logits: np.ndarray  # (N, classes) float32
    variant: str  # the variant that served it
    reason: str  # why that variant (a telemetry reason code, e.g. "complexity_low")
    latency_ms: float  # inference time on the agent

    @property
    def label(self) -> int:
        """The class of the first (or only) input."""
        return int(self.labels[0])


class Client:
    """A connection to the agent's API socket; thread-safe (calls take turns).

    Connects on first use and again after a call that lost the connection. ``timeout_s``
    bounds every socket operation (connect, each send and receive). For requests in
    parallel, use one client per thread.
    """

    def __init__(self, socket_path: Path | str, timeout_s: float = 5.0):
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        self.socket_path = Path(socket_path)
        self.timeout_s = timeout_s
        self._sock: socket.socket | None = None
        self._reader: FrameReader | None = None
        self._heads: dict[tuple[str, tuple[int, ...]], bytes] = {}
        self._lock = threading.Lock()
        self._next_id = 1

    # -- connection -----------------------------------------------------------------------
    def connect(self) -> None:
        with self._lock:
            self._connected()

    def close(self) -> None:
        with self._lock:
            self._drop()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _connected(self) -> socket.socket:
        if self._sock is not None:
            return self._sock
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout_s)
        deadline = time.monotonic() + self.timeout_s
        try:
            while True:
                try:
                    sock.connect(str(self.socket_path))
                    break
                except BlockingIOError:
                    # The agent's backlog is full (a burst of connections): it frees up as
                    # the agent accepts; wait within the timeout, as a TCP connect would.
                    if time.monotonic() >= deadline:
                        raise
                    time.sleep(0.01)
        except (FileNotFoundError, ConnectionRefusedError) as e:
            sock.close()
            raise ApiConnectionError(
                f"no agent serving {self.socket_path} ({e.strerror}); is the agent running "
                "with api_socket set to this path?"
            ) from e
        except OSError as e:
            sock.close()
            raise ApiConnectionError(f"cannot connect to {self.socket_path}: {e}") from e
        self._sock = sock
        self._reader = FrameReader(sock, 16 * 1024)
        return sock

    def _drop(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            self._reader = None

    # -- calls ----------------------------------------------------------------------------
    def predict(self, x: np.ndarray, label: int | None = None) -> Prediction:
        """Logits and labels for one input or a batch, served by the agent's current variant.

        ``label`` (the true class of a single input, when the application knows it) lets
        the agent's telemetry count served accuracy.
        """
        a = x
        if type(a) is not np.ndarray or a.dtype != _F32 or not a.flags.c_contiguous:
            a = np.asarray(x)
            if a.dtype.kind not in "biuf":
                raise BadDtypeError(f"input dtype {a.dtype} cannot be sent; expected float32",
                                    ErrorCode.BAD_DTYPE)
            a = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))
        # The header is built by hand: its fields are numbers and fixed strings, and this is
        # the request path (json.dumps costs more than the rest of the client).
        key = (a.dtype.str, a.shape)
        head = self._heads.get(key)
        if head is None:
            dtype = "float32" if a.dtype == _F32 else a.dtype.name
            head = (f'{{"op":"predict","dtype":"{dtype}",'
                    f'"shape":[{",".join(map(str, a.shape))}]').encode()
            if len(self._heads) < 64:
                self._heads[key] = head
        tail = b"}" if label is None else b',"label":%d}' % int(label)
        resp, body = self._call(head, tail, a.tobytes())
        try:
            shape = tuple(resp["shape"])
            if resp.get("dtype") != "float32" or len(shape) != 2 or len(body) != 4 * math.prod(
                shape
            ):
                raise ValueError(f"logits {resp.get('dtype')} {shape} in {len(body)} bytes")
            logits = np.frombuffer(body, dtype="<f4").reshape(shape)
            labels = np.array(resp["labels"], dtype=np.int64)
            return Prediction(labels, logits, str(resp["variant"]), str(resp["reason"]),
                              float(resp["latency_ms"]))
        except (KeyError, TypeError, ValueError) as e:
            raise BadFrameError(f"malformed predict response: {e}", ErrorCode.BAD_FRAME) from e

    def info(self) -> dict[str, Any]:
        """The agent's device id, active variant, installed variants, input shape, limits."""
        resp, _ = self._call(b'{"op":"info"', b"}", b"")
        info = resp.get("info")
        if not isinstance(info, dict):
            raise BadFrameError("malformed info response", ErrorCode.BAD_FRAME)
        return info

    def _call(self, head: bytes, tail: bytes, body: bytes) -> tuple[dict, bytearray]:
        """Send the request whose JSON header is ``head`` + its id + ``tail``; the answer.

        The agent may close an idle connection at any time (its idle timeout, or to make
        room for another client); a request that meets such a closed connection was not
        served, so it is sent once more on a new one."""
        with self._lock:
            reused = self._sock is not None
            try:
                return self._exchange(head, tail, body)
            except _ClosedIdle as e:
                if not reused:
                    raise e.error from e.error.__cause__
            try:
                return self._exchange(head, tail, body)
            except _ClosedIdle as e:
                raise e.error from e.error.__cause__

    def _exchange(self, head: bytes, tail: bytes, body: bytes) -> tuple[dict, bytearray]:
        """One request and its answer; the caller holds the lock."""
        sock = self._connected()
        rid = self._next_id
        self._next_id += 1
        header = b'%s,"id":%d%s' % (head, rid, tail)
        send_error: OSError | None = None
        try:
            frame = PREFIX.pack(MAGIC, len(header), len(body)) + header
            if len(body) <= COALESCE_BYTES:
                sock.sendall(frame + body)
            else:
                sock.sendall(frame)
                sock.sendall(body)
        except TimeoutError as e:
            self._drop()
            raise ApiConnectionError(f"timed out sending to {self.socket_path}") from e
        except OSError as e:
            # The server may have answered before closing (busy, too large): read it.
            send_error = e
        try:
            assert self._reader is not None
            resp, rbody = self._read(self._reader)
        except TimeoutError as e:
            self._drop()
            raise ApiConnectionError(
                f"no answer from {self.socket_path} in {self.timeout_s:g} s") from e
        except FrameError as e:
            self._drop()
            raise BadFrameError(f"bad response frame: {e}", ErrorCode.BAD_FRAME) from e
        except (EOFError, OSError) as e:
            nothing_back = self._reader is not None and self._reader.buffered == 0
            self._drop()
            lost = ApiConnectionError(f"connection to {self.socket_path} lost: "
                                      f"{send_error or e}")
            lost.__cause__ = send_error or e
            if nothing_back:
                raise _ClosedIdle(lost) from None
            raise lost from (send_error or e)
        if send_error is not None:
            self._drop()
        if not resp.get("ok"):
            code = str(resp.get("error"))
            if code in _CLOSING:
                self._drop()
            cls = _BY_CODE.get(code, ApiError)
            raise cls(str(resp.get("message", "")) or code, code)
        if resp.get("id") != rid:
            self._drop()
            raise BadFrameError(f"response id {resp.get('id')!r}, expected {rid}",
                                ErrorCode.BAD_FRAME)
        return resp, rbody

    @staticmethod
    def _read(reader: FrameReader) -> tuple[dict, bytearray]:
        return reader.read_frame(MAX_RESPONSE_BYTES)
