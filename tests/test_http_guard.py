"""The HTTP API refuses before it reads: raw HTTP against a running server.

A request without the bearer token is answered 401 from its headers, whatever body it
announces (nothing of the body is sent here: an answer proves it was not waited for); with
the token, a body above the route's cap is answered 413 from its ``Content-Length``, and a
chunked one as soon as its count passes the cap, long before the client finished sending.
"""

from __future__ import annotations

import http.client
import json
import select
import socket

import pytest
from rollout_helpers import Fleet

from prunefleet.server.httpguard import MAX_JSON_BODY_BYTES

MIB = 1024 * 1024


@pytest.fixture
def server(tmp_path, mosquitto):
    f = Fleet(tmp_path, mosquitto.url)
    svc = f.start_server()
    yield svc
    f.close()


def _announce(svc, method: str, path: str, length: int, token: str | None = None,
              ) -> tuple[int, dict]:
    """Send only the headers of a request announcing ``length`` body bytes; the answer."""
    conn = http.client.HTTPConnection(svc.host, svc.port, timeout=10)
    try:
        conn.putrequest(method, path)
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(length))
        if token is not None:
            conn.putheader("Authorization", f"Bearer {token}")
        conn.endheaders()
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


@pytest.mark.parametrize(("method", "path"), [
    ("POST", "/v1/rollouts"),
    ("PUT", "/v1/blobs/" + "a" * 64),
    ("POST", "/v1/pins"),
    ("POST", "/v1/profiles/refresh"),
    ("PUT", "/v1/devices/dev-1/groups"),
])
def test_no_token_is_refused_before_any_body_is_read(server, method, path):
    status, body = _announce(server, method, path, 32 * MIB)
    assert status == 401
    assert body["error"]["message"] == "missing or wrong bearer token"
    status, _ = _announce(server, method, path, 32 * MIB, token="not-the-token-at-all")
    assert status == 401


def test_a_refused_small_body_keeps_the_connection_and_is_never_reset(server):
    """A client that writes its headers and its body separately (most do) gets its 401
    whole, and the connection stays usable: the server drops the late body instead of
    closing on it (a close with unread bytes resets the connection, and the reset can
    overtake the 401)."""
    sock = socket.create_connection((server.host, server.port), timeout=10)
    body = json.dumps({"target": "0", "kind": None}).encode()
    try:
        sock.sendall((f"POST /v1/profiles/refresh HTTP/1.1\r\nHost: {server.host}\r\n"
                      f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
                      ).encode())
        first = http.client.HTTPResponse(sock)
        first.begin()
        assert first.status == 401 and first.getheader("Connection") != "close"
        assert json.loads(first.read())["error"]["message"] == "missing or wrong bearer token"
        sock.sendall(body)  # late, after the answer: read and dropped, not a reset
        sock.sendall((f"GET /v1/devices HTTP/1.1\r\nHost: {server.host}\r\n"
                      f"Authorization: Bearer {server.token}\r\n\r\n").encode())
        second = http.client.HTTPResponse(sock)
        second.begin()
        assert second.status == 200, second.read()[:200]
        assert isinstance(json.loads(second.read()), (list, dict))
    finally:
        sock.close()


def test_a_body_over_the_routes_cap_is_refused_from_its_length(server):
    status, body = _announce(server, "POST", "/v1/rollouts", MAX_JSON_BODY_BYTES + 1,
                             token=server.token)
    assert status == 413 and "over this route's limit" in body["error"]["message"]
    # A blob may be large: the same length is not refused there (the upload then stalls,
    # and the client gives up; nothing is registered).
    conn = http.client.HTTPConnection(server.host, server.port, timeout=10)
    conn.request("PUT", "/v1/blobs/" + "b" * 64, body=b"x" * 1000,
                 headers={"Authorization": f"Bearer {server.token}"})
    assert conn.getresponse().status != 413
    conn.close()


def _refused(svc, status: int) -> float:
    conn = http.client.HTTPConnection(svc.host, svc.port, timeout=10)
    conn.request("GET", "/metrics", headers={"Authorization": f"Bearer {svc.token}"})
    text = conn.getresponse().read().decode()
    conn.close()
    prefix = f'prunefleet_http_requests_refused_total{{status="{status}"}} '
    return sum(float(line[len(prefix):]) for line in text.splitlines()
               if line.startswith(prefix))


@pytest.mark.parametrize("path", ["/v1/rollouts", "/healthz", "/nowhere"])
def test_a_chunked_body_is_cut_off_at_the_cap_not_read_whole(server, path):
    """With the token, at the route's cap; on an open path (no token needed, no route
    that reads a body), at once: the HTTP server drained it after its 405 or 404 before,
    64 MiB and more."""
    before = _refused(server, 413)
    sock = socket.create_connection((server.host, server.port), timeout=10)
    sock.sendall((f"POST {path} HTTP/1.1\r\nHost: {server.host}\r\n"
                  f"Authorization: Bearer {server.token}\r\n"
                  "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
                  ).encode())
    chunk = b"%x\r\n%s\r\n" % (MIB, b" " * MIB)
    sent = 0
    answer = b""
    reset = False
    try:
        while sent < 256 * MIB:
            readable, writable, _ = select.select([sock], [sock], [], 10)
            if readable:
                break  # the server answered (or closed)
            assert writable, "the server neither reads nor answers"
            sock.sendall(chunk)
            sent += MIB
        while b"\r\n\r\n" not in answer:
            data = sock.recv(65536)
            if not data:
                break
            answer += data
    except (ConnectionResetError, BrokenPipeError):
        # The server answered and closed with our unread bytes in its buffer: the kernel
        # resets the connection, and the reset may overtake the answer in flight.
        reset = True
    finally:
        sock.close()
    assert sent < 64 * MIB, f"{sent // MIB} MiB sent before the server stopped reading"
    if not reset or answer:
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    # Whether or not the client saw its answer, the refusal is counted where operators look.
    assert _refused(server, 413) == before + 1


def test_the_token_and_a_small_body_still_work(server):
    conn = http.client.HTTPConnection(server.host, server.port, timeout=10)
    body = json.dumps({"groups": ["lab"]})
    conn.request("PUT", "/v1/devices/dev-1/groups", body=body,
                 headers={"Authorization": f"Bearer {server.token}",
                          "Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200 and json.loads(resp.read())["groups"] == ["lab"]
    conn.close()
