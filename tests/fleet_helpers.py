"""Helpers to run a server and agents against a real broker in tests."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from prunefleet.server.fleet import FleetServer
from prunefleet.server.keys import load_or_create
from prunefleet.server.store import Store, sqlite_url


def wait_for(cond: Callable[[], object], timeout_s: float = 20.0, every_s: float = 0.1,
             what: str = "condition", procs: list[subprocess.Popen] = ()) -> object:
    """Poll ``cond`` until true; fail at once if one of ``procs`` died meanwhile."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        for p in procs:
            if p.poll() is not None:
                raise AssertionError(f"process {p.args} exited with {p.returncode} "
                                     f"while waiting for {what}")
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def prefix_for(tmp: Path) -> str:
    """A fleet prefix of the test's own: retained messages of other tests stay apart."""
    import hashlib

    return "t" + hashlib.sha256(str(tmp).encode()).hexdigest()[:12]


def make_server(tmp: Path, broker_url: str, name: str = "server") -> FleetServer:
    store = Store(sqlite_url(tmp / f"{name}.db"))
    key = load_or_create(tmp / "keys")
    # A unique id: the server's MQTT session is persistent, and must not inherit the
    # queue of another test's server.
    srv = FleetServer(broker_url, store, key, prefix=prefix_for(tmp),
                      client_id=f"pf-test-{name}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    srv.start()
    return srv


def agent_toml(
    device_id: str, broker_url: str, state_dir: Path, key: Path, *, group: str | None = None,
    workload: Path | None = None, extra: str = "", battery_percent: float = 90.0,
    rate_hz: float = 50.0,
) -> str:
    # The test's fleet prefix: keys live in <tmp>/keys, as make_server puts them.
    lines = [
        f'fleet_prefix = "{prefix_for(Path(key).parent.parent)}"',
        f'device_id = "{device_id}"',
        f'broker_url = "{broker_url}"',
        f'state_dir = "{state_dir}"',
        f'trusted_keys = ["{key}"]',
        "telemetry_interval_s = 0.5",
        "sensor_interval_s = 0.2",
        "chunk_timeout_s = 3.0",
        "reconnect_max_s = 2.0",
    ]
    if group:
        lines.append(f'group = "{group}"')
    lines.append(extra)
    lines += [
        "[sensors]",
        'kind = "simulated"',
        f"battery_initial_percent = {battery_percent}",
        "battery_capacity_j = 1000.0",
    ]
    if workload is not None:
        lines += ["[workload]", f'data = "{workload}"', f"rate_hz = {rate_hz}"]
    return "\n".join(lines) + "\n"


def spawn_agent(config: Path, log: Path) -> subprocess.Popen:
    with open(log, "wb") as f:
        return subprocess.Popen(
            [sys.executable, "-m", "prunefleet.agent.cli", "--config", str(config)],
            stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )


def stop_agent(p: subprocess.Popen, timeout_s: float = 15.0) -> int:
    if p.poll() is None:
        p.terminate()
    try:
        return p.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        p.kill()
        return p.wait()


@contextlib.contextmanager
def run_agent(tmp: Path, url: str, device: str = "dev-1", **overrides):
    """An in-process Agent with simulated sensors, its loop on a thread."""
    from prunefleet.agent.config import load_config
    from prunefleet.agent.service import Agent

    fields = {
        "device_id": device, "broker_url": url, "state_dir": tmp / device,
        "trusted_keys": [tmp / "keys" / "public.pem"], "chunk_timeout_s": 1.0,
        "max_chunk_failures": 2, "sensors": {"kind": "simulated"},
        "reconnect_max_s": 2.0, "fleet_prefix": prefix_for(tmp),
    }
    fields.update(overrides)
    agent = Agent(load_config(None, env={}, **fields))
    stop = threading.Event()
    t = threading.Thread(target=agent.run, kwargs={"until": stop}, daemon=True)
    t.start()
    try:
        yield agent
    finally:
        stop.set()
        t.join(15)


class TcpRelay:
    """A TCP relay from a free loopback port to ``host:port``, for a server that loses its
    database (or broker) on the network: :meth:`cut` closes every relayed connection and
    refuses new ones from then on, as a host gone away; :meth:`silence` lets nothing
    through either way but closes nothing, as a network that drops every packet (no
    refusal ever comes); :meth:`restore` relays again."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._open = True
        self._silent = False
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            if not self._open:
                client.close()
                continue
            if self._silent:  # accepted, and never answered
                with self._lock:
                    self._conns.append(client)
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                if not self._silent:
                    dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        self._open = False
        with self._lock:
            conns, self._conns = self._conns, []
        for s in conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def silence(self) -> None:
        self._silent = True

    def restore(self) -> None:
        self._open, self._silent = True, False

    def close(self) -> None:
        self.cut()
        self._listener.close()
