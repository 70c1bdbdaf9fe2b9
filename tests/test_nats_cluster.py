"""A broker tier past one machine: a 3-node NATS cluster on loopback (JetStream, which
replicates retained messages and MQTT sessions, and the MQTT gateway on each node). Each
device reaches the cluster through a small TCP balancer that prefers its own node, as
devices behind a load balancer would; the server is on node 0. Node 1 is killed during a
rollout and steady telemetry: the rollout completes and no batch is lost."""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import textwrap
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import free_port
from fleet_helpers import wait_for
from rollout_helpers import Fleet
from test_ingest import start_agent, stop_agent

pytestmark = pytest.mark.system

LOOPBACK = "127.0.0.1"


class NatsNode:
    def __init__(self, exe: str, root: Path, name: str, cluster_ports: list[int], index: int):
        self.exe, self.name = exe, name
        self.port, self.mqtt_port, self.http_port = free_port(), free_port(), free_port()
        self.cluster_port = cluster_ports[index]
        self.conf = root / f"{name}.conf"
        routes = ", ".join(f"nats-route://{LOOPBACK}:{p}" for i, p in enumerate(cluster_ports)
                           if i != index)
        self.conf.write_text(textwrap.dedent(f"""\
            server_name: {name}
            listen: {LOOPBACK}:{self.port}
            http: {LOOPBACK}:{self.http_port}
            jetstream {{ store_dir: "{root / name}" }}
            cluster {{
              name: pf
              listen: {LOOPBACK}:{self.cluster_port}
              routes: [{routes}]
            }}
            # Replicated on every node, so the cluster keeps its quorum without one.
            mqtt {{ listen: {LOOPBACK}:{self.mqtt_port}, stream_replicas: 3 }}
            """))
        self.log = root / f"{name}.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen([self.exe, "-c", str(self.conf)], stdout=log,
                                         stderr=subprocess.STDOUT)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def ready(self) -> bool:
        """Routes to both other nodes, and JetStream current (``/healthz``)."""
        try:
            with urllib.request.urlopen(f"http://{LOOPBACK}:{self.http_port}/routez",
                                        timeout=2) as r:
                if json.load(r).get("num_routes") != 2:
                    return False
            with urllib.request.urlopen(f"http://{LOOPBACK}:{self.http_port}/healthz",
                                        timeout=2) as r:
                return r.status == 200
        except OSError:
            return False


class Balancer:
    """A TCP balancer: each connection goes to the first node of ``ports`` that accepts."""

    def __init__(self, ports: list[int]):
        self.ports = ports
        self.sock = socket.create_server((LOOPBACK, 0))
        self.port = self.sock.getsockname()[1]
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"mqtt://{LOOPBACK}:{self.port}"

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            for port in self.ports:
                try:
                    upstream = socket.create_connection((LOOPBACK, port), timeout=2)
                except OSError:
                    continue
                upstream.settimeout(None)
                for a, b in ((client, upstream), (upstream, client)):
                    threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()
                break
            else:
                client.close()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()

    def close(self) -> None:
        self._closed = True
        self.sock.close()


@pytest.fixture
def nats_cluster(tmp_path) -> Iterator[list[NatsNode]]:
    exe = shutil.which("nats-server")
    if exe is None:
        pytest.fail("nats-server is not installed: `make deps` installs it "
                    "(Debian package nats-server)", pytrace=False)
    cluster_ports = [free_port() for _ in range(3)]
    nodes = [NatsNode(exe, tmp_path, f"n{i}", cluster_ports, i) for i in range(3)]
    for n in nodes:
        n.start()
    try:
        # Clients only once the cluster has formed: MQTT's streams are made on the first
        # connection, with as many replicas as there are nodes then.
        wait_for(lambda: all(n.ready() for n in nodes), 60, what="the NATS cluster formed")
        yield nodes
    finally:
        for n in nodes:
            n.kill()


def test_a_rollout_completes_and_no_batch_is_lost_when_a_broker_node_dies(
        tmp_path, nats_cluster):
    nodes = nats_cluster
    ports = [n.mqtt_port for n in nodes]
    server_lb = Balancer(ports)  # node 0 first
    f = Fleet(tmp_path, server_lb.url)
    f.start_server()
    devices = [f"nats-{i}" for i in range(6)]
    balancers = []
    agents = []
    try:
        for i, d in enumerate(devices):  # spread: two devices on each node
            lb = Balancer(ports[i % 3:] + ports[:i % 3])
            balancers.append(lb)
            f.broker_url = lb.url
            agents.append(start_agent(f, d, telemetry_interval_s=0.5,
                                      telemetry_ack_timeout_s=5.0, chunk_timeout_s=2.0))
        f.wait_known(devices, 60)
        f.register_mlp("small", hidden=8)
        rid = f.api.create_rollout({"target": {"kind": "devices", "devices": devices},
                                    "variants": ["small"],
                                    "config": {"canary_percent": 34}})["id"]
        nodes[1].kill()  # two devices lose their node mid-rollout and mid-telemetry
        f.wait_rollout(rid, "completed", timeout_s=180)
        # Every device's telemetry flows again: what it had made by now is confirmed
        # stored. NATS refuses a reconnected device's subscriptions (its cursor among them)
        # until JetStream has re-elected the leaders of that session's consumers, and each
        # refusal holds the device's connection for NATS's 4 s request timeout; so a device
        # may catch up tens of seconds after the rollout completed. Its batches wait on its
        # disk meanwhile.
        made = {d: agent.tqueue.issued for d, (agent, _, _) in zip(devices, agents,
                                                                    strict=True)}

        def behind() -> str:
            return ", ".join(f"{d} {a.sender.stored_through + 1} of {made[d]}"
                             for d, (a, _, _) in zip(devices, agents, strict=True)
                             if a.sender.stored_through < made[d] - 1)

        try:
            wait_for(lambda: not behind(), 120, what="every device's telemetry confirmed")
        except AssertionError:
            raise AssertionError(
                f"devices still behind 120 s after the rollout: {behind()}") from None
        for _, stop, t in agents:
            stop_agent(stop, t)
        for d, (agent, _, _) in zip(devices, agents, strict=True):
            assert f.svc.store.telemetry_seqs(d) == list(range(agent.tqueue.issued)), (
                d, agent.sender.stored_through, agent.sender.in_flight)
    finally:
        for _, stop, _ in agents:
            stop.set()
        f.close()
        for lb in [server_lb, *balancers]:
            lb.close()
