"""The HTTP API's front door: the bearer token and the body size, checked before any route.

An ASGI middleware, outside FastAPI's routing and body parsing, so that a request that must
be refused costs the server nothing it did not have to read:

* a protected path (``/v1/…``, and ``/metrics`` unless it is public) without the right
  ``Authorization: Bearer`` token is answered 401 from its headers alone; its body is
  never read;
* a body whose ``Content-Length`` is above the route's cap is answered 413 from its headers;
* a body without a length (chunked) is counted as it streams in, and the request is
  answered 413 as soon as the count passes the cap: it is never read whole;
* an open path (no token needed: ``/healthz``, ``/readyz``, the dashboard, the OpenAPI
  document) with a chunked body or one over 64 KiB is answered 413 and closed from its
  headers: no open route reads a body, and the HTTP server would drain one after the
  answer.

The routes check the token too (their OpenAPI document says so); this is the layer that
makes the check cheap.

A refused request whose body is small and framed by its ``Content-Length`` keeps its
connection: the HTTP server reads the rest of that body and drops it, as it does after any
answer. Only a body that is large, chunked or unframeable closes the connection, since
reading it would be the cost the guard is there to avoid; closing a socket that still has
unread bytes in it makes the kernel reset the connection, and the reset can overtake the
answer on its way to the client (a client that sends its headers and its body in separate
writes, as most do, would otherwise see a reset instead of its 401 now and then).

Every refusal is counted by status in ``refused`` (exported as
``prunefleet_http_requests_refused_total``): a client that keeps sending after its 413 may
see the connection reset instead of the answer (the server closes a socket with unread
bytes in it), and the count is then the only trace of why.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# JSON bodies: the largest legitimate one is a rollout naming 10,000 devices (~0.7 MB) or
# a registration with a golden pair (~0.4 MB).
MAX_JSON_BODY_BYTES = 4 * 1024 * 1024
# Requests that take no body (GET, HEAD, DELETE, OPTIONS) may still carry a little.
MAX_OTHER_BODY_BYTES = 64 * 1024
# A refused request announcing at most this many body bytes keeps its connection (the
# server reads them and drops them); a larger one is answered and closed.
DRAIN_BODY_BYTES = 64 * 1024


def _small_framed_body(headers: list[tuple[bytes, bytes]], lengths: list[bytes]) -> bool:
    """The request's body is framed by one ``Content-Length`` (or absent) and is small
    enough for the server to read and drop after the answer."""
    if any(n.lower() == b"transfer-encoding" for n, _ in headers) or len(lengths) > 1:
        return False
    if not lengths:
        return True
    value = lengths[0].strip()
    return value.isdigit() and int(value) <= DRAIN_BODY_BYTES


def problem(status: int, message: str) -> bytes:
    return json.dumps({"error": {"status": status, "message": message,
                                 "details": []}}).encode()


async def _reply(send: Send, status: int, message: str,
                 headers: list[tuple[bytes, bytes]] | None = None, *, close: bool) -> None:
    body = problem(status, message)
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        *([(b"connection", b"close")] if close else []), *(headers or []),
    ]})
    await send({"type": "http.response.body", "body": body})


class RequestGuard:
    """``protected(path)``: the path needs the token. ``body_cap(method, path)``: the most
    bytes its body may have."""

    def __init__(self, app: ASGIApp, *, token: str,
                 protected: Callable[[str], bool],
                 body_cap: Callable[[str, str], int],
                 refused: MutableMapping[int, int] | None = None) -> None:
        self.app = app
        self.refused: MutableMapping[int, int] = refused if refused is not None else {}
        self._token = token.encode()
        self.protected = protected
        self.body_cap = body_cap

    def _authorized(self, headers: list[tuple[bytes, bytes]]) -> bool:
        for name, value in headers:
            if name.lower() == b"authorization":
                scheme, _, credentials = value.partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(
                    credentials.strip(), self._token)
        return False

    async def _refuse(self, send: Send, status: int, message: str,
                      headers: list[tuple[bytes, bytes]] | None = None, *,
                      close: bool = True) -> None:
        self.refused[status] = self.refused.get(status, 0) + 1
        await _reply(send, status, message, headers, close=close)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path, method = scope["path"], scope["method"]
        headers: list[tuple[bytes, bytes]] = scope.get("headers") or []
        lengths = [v for n, v in headers if n.lower() == b"content-length"]
        if self.protected(path) and not self._authorized(headers):
            await self._refuse(send, 401, "missing or wrong bearer token",
                               [(b"www-authenticate", b"Bearer")],
                               close=not _small_framed_body(headers, lengths))
            return
        if not self.protected(path) and not _small_framed_body(headers, lengths):
            # No open route takes a body, and one its route does not read the HTTP server
            # drains after the answer, whatever its size (64 MiB chunked, measured): the
            # token's check would be no help there.
            await self._refuse(send, 413, "this route takes no request body")
            return
        cap = self.body_cap(method, path)
        if lengths:
            if len(lengths) > 1 or not lengths[0].strip().isdigit():
                await self._refuse(send, 400, "bad Content-Length")
                return
            if int(lengths[0]) > cap:
                await self._refuse(send, 413, f"request body of {int(lengths[0])} bytes is over "
                                        f"this route's limit of {cap}")
                return

        received = 0
        too_large = False
        started = False

        async def counted_receive() -> Message:
            nonlocal received, too_large
            if too_large:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > cap:
                    too_large = True
                    if not started:
                        await self._refuse(send, 413, f"request body is over this route's limit "
                                                f"of {cap} bytes")
                    # The route sees the client gone and stops reading.
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if too_large:
                return  # the 413 went out instead
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except Exception:
            if not too_large:
                raise
            # The route failed on the cut-off body; the client already has its 413.
