"""A server (``FleetService``: MQTT + rollouts + HTTP API) and in-process agents for tests.

Every fleet gets its own topic prefix, so retained messages of one test never reach
another on the session's mosquitto.
"""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from fleet_helpers import wait_for
from onnx_models import make_mlp

from prunefleet.agent.config import load_config
from prunefleet.agent.service import Agent
from prunefleet.server.adminclient import AdminClient
from prunefleet.server.serve import FleetService, ServeOptions


class Fleet:
    def __init__(self, tmp: Path, broker_url: str, db_url: str | None = None):
        self.tmp = tmp
        self.broker_url = broker_url
        self.db_url = db_url
        self.prefix = f"t{uuid.uuid4().hex[:10]}"
        self.state_dir = tmp / "server"
        self.svc: FleetService | None = None
        self.agents: dict[str, tuple[Agent, threading.Event, threading.Thread]] = {}
        self._starts = 0

    # -- server -------------------------------------------------------------------------------
    def start_server(self) -> FleetService:
        self._starts += 1
        self.svc = FleetService(ServeOptions(
            state_dir=self.state_dir, broker_url=self.broker_url, db_url=self.db_url,
            listen="127.0.0.1:0", prefix=self.prefix, tick_s=0.2,
            client_id=f"pf-test-{self.prefix}-{self._starts}",
        )).start()
        return self.svc

    def stop_server(self) -> None:
        if self.svc is not None:
            self.svc.stop()
            self.svc = None

    @property
    def api(self) -> AdminClient:
        return AdminClient(self.svc.url, self.svc.token, timeout_s=30)

    # -- agents -------------------------------------------------------------------------------
    def start_agent(self, device_id: str, trusted: list[Path] | None = None,
                    group: str | None = None, **config) -> Agent:
        """``group``: the group in the agent's own configuration (a request to the server);
        ``config``: other agent settings (e.g. ``device_class``)."""
        cfg = load_config(
            None, env={}, device_id=device_id, broker_url=self.broker_url,
            fleet_prefix=self.prefix, state_dir=self.tmp / "agents" / device_id,
            trusted_keys=trusted or [self.state_dir / "keys" / "public.pem"],
            chunk_timeout_s=2.0, telemetry_interval_s=1.0, reconnect_max_s=2.0,
            sensors={"kind": "simulated"}, group=group, **config,
        )
        agent = Agent(cfg)
        stop = threading.Event()
        t = threading.Thread(target=agent.run, kwargs={"until": stop}, daemon=True,
                             name=f"agent-{device_id}")
        t.start()
        self.agents[device_id] = (agent, stop, t)
        return agent

    def stop_agent(self, device_id: str) -> None:
        _, stop, t = self.agents.pop(device_id)
        stop.set()
        t.join(15)

    def agent(self, device_id: str) -> Agent:
        return self.agents[device_id][0]

    def close(self) -> None:
        for d in list(self.agents):
            self.stop_agent(d)
        self.stop_server()

    # -- helpers ------------------------------------------------------------------------------
    def wait_known(self, devices: list[str], timeout_s: float = 20) -> None:
        wait_for(lambda: {d["device_id"] for d in self.api.devices() if d["online"]}
                 >= set(devices), timeout_s, what=f"devices {devices} online at the server")

    def register_mlp(self, name: str, hidden: int, seed: int = 0, **meta) -> dict:
        path = make_mlp(self.tmp / f"{name}.onnx", hidden, seed)
        return self.api.register_variant(path, name=name, macs=64 * hidden + hidden * 10,
                                         chunk_bytes=4096, **meta)

    def serve_two_variants(self, devices: list[str], requests: int) -> None:
        """Agents ``devices`` install "small" and "big" through a completed rollout, then
        each serves ``requests`` labelled requests (labels alternate 0 and 1)."""
        import numpy as np

        for d in devices:
            self.start_agent(d)
        self.wait_known(devices)
        self.register_mlp("small", hidden=8)
        self.register_mlp("big", hidden=32, seed=1)
        r = self.api.create_rollout({"target": {"kind": "devices", "devices": devices},
                                     "variants": ["small", "big"]})
        self.wait_rollout(r["id"], "completed")
        x = np.zeros((1, 1, 8, 8), np.float32)
        for d in devices:
            for i in range(requests):
                self.agent(d).predict(x, label=i % 2)

    def wait_rollout(self, rid: int, status: str, timeout_s: float = 30) -> dict:
        def done():
            r = self.api.rollout(rid)
            return r if r["status"] == status else None
        try:
            return wait_for(done, timeout_s, what=f"rollout #{rid} {status}")
        except AssertionError as e:
            raise AssertionError(f"{e}; rollout is {self.api.rollout(rid)}") from None


PG_URL = os.environ.get("PRUNEFLEET_TEST_PG_URL",
                        "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def pg_schema_url() -> Iterator[str]:
    """A PostgreSQL URL whose search_path is a fresh schema, dropped afterwards."""
    if PG_URL == "skip":
        pytest.skip("PRUNEFLEET_TEST_PG_URL=skip")
    import psycopg

    schema = f"pf_{uuid.uuid4().hex[:12]}"
    plain = PG_URL.replace("postgresql+psycopg://", "postgresql://")
    try:
        conn = psycopg.connect(plain, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as e:
        pytest.fail(f"PostgreSQL at {PG_URL} is not reachable ({e}); start it, point "
                    "PRUNEFLEET_TEST_PG_URL at one, or set it to 'skip'", pytrace=False)
    with conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
        try:
            sep = "&" if "?" in PG_URL else "?"
            yield f"{PG_URL}{sep}options=-csearch_path%3D{schema}"
        finally:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
