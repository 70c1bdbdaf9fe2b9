"""End to end on real parts: mosquitto, a server, two agent processes."""

from __future__ import annotations

from pathlib import Path

import pytest
from fleet_helpers import (
    agent_toml,
    make_server,
    prefix_for,
    spawn_agent,
    stop_agent,
    wait_for,
)
from onnx_models import mlp_spec, workload

from prunefleet.server.store import Store


def _sent_seqs(state: Path) -> list[int]:
    """The telemetry an agent that has stopped got acknowledged: every batch it cut but
    those still queued in its state directory."""
    q = state / "telemetry"
    try:
        issued = int((q / "next_seq").read_text())
    except FileNotFoundError:
        issued = 0
    queued = {int(p.stem) for p in q.glob("*.json") if p.stem.isdigit()}
    return [s for s in range(issued) if s not in queued]


def _wait_stored(store: Store, tmp: Path, devices: tuple[str, ...]) -> None:
    """Acknowledged by the broker is not yet ingested: wait until the server stored every
    batch the stopped agents had confirmed. The store may hold more: a batch stored whose
    cursor reached the agent after its stop's flush gave up stays queued on its disk (it
    is sent again at the next start, and recognised), so equality raced the stop."""
    wait_for(lambda: all(set(_sent_seqs(tmp / d)) <= set(store.telemetry_seqs(d))
                         for d in devices),
             10, what="every acknowledged batch stored")


@pytest.mark.timeout(120)
def test_two_agents_fetch_install_serve_and_report(tmp_path, mosquitto):
    srv = make_server(tmp_path, mosquitto.url)
    procs = []
    try:
        small = mlp_spec(tmp_path / "small.onnx", "small", hidden=16, seed=1)
        large = mlp_spec(tmp_path / "large.onnx", "large", hidden=128, seed=2)
        assert len(large.chunk_sha256) > 5  # it really travels in several chunks
        for spec, path in ((small, "small.onnx"), (large, "large.onnx")):
            srv.publish_artifact(spec, (tmp_path / path).read_bytes())
        srv.deploy("e2e", [small, large], group=True)

        data = workload(tmp_path / "workload.npz")
        for dev in ("e2e-a", "e2e-b"):
            state = tmp_path / dev
            state.mkdir()
            cfg = state / "agent.toml"
            cfg.write_text(agent_toml(dev, mosquitto.url, state, tmp_path / "keys/public.pem",
                                      group="e2e", workload=data))
            procs.append(spawn_agent(cfg, state / "agent.log"))

        def both_installed():
            devs = {d.device_id: d for d in srv.store.devices()}
            return all(
                d in devs and {v["name"] for v in devs[d].installed} == {"small", "large"}
                for d in ("e2e-a", "e2e-b")
            )

        wait_for(both_installed, 60, what="both agents to report both variants installed",
                 procs=procs)

        def served():
            return all(
                sum(u["requests"] for u in srv.store.usage(d).values()) > 20
                for d in ("e2e-a", "e2e-b")
            )

        wait_for(served, 60, what="telemetry of served requests from both agents",
                 procs=procs)
        codes = [stop_agent(p) for p in procs]
        _wait_stored(srv.store, tmp_path, ("e2e-a", "e2e-b"))
    finally:
        for p in procs:
            stop_agent(p)
        srv.stop()
    assert codes == [0, 0], "agents must exit cleanly on SIGTERM"
    for dev in ("e2e-a", "e2e-b"):
        state = tmp_path / dev
        # the installed files are the verified artifacts, named by their digest
        assert (state / "variants" / f"{small.sha256}.onnx").exists()
        assert (state / "variants" / f"{large.sha256}.onnx").exists()
        assert not list((state / "variants").glob(".*.part"))
        seqs = srv.store.telemetry_seqs(dev)
        assert seqs and seqs == sorted(set(seqs))
    # The group in the agents' configuration is a request to the server, not membership.
    assert srv.store.group_requests() == {"e2e-a": "e2e", "e2e-b": "e2e"}
    assert srv.store.group_members("e2e") == []
    installed = [e for e in srv.store.events() if e.kind == "installed"]
    assert {(e.device_id, e.variant) for e in installed} >= {
        ("e2e-a", "small"), ("e2e-a", "large"), ("e2e-b", "small"), ("e2e-b", "large")
    }


@pytest.mark.timeout(60)
def test_two_servers_share_the_ingest_load_through_a_shared_subscription(tmp_path, mosquitto):
    import os
    import uuid

    from prunefleet.server.fleet import FleetServer
    from prunefleet.server.keys import load_or_create
    from prunefleet.server.store import sqlite_url

    key = load_or_create(tmp_path / "keys")
    store_url = sqlite_url(tmp_path / "shared.db")
    servers = [
        FleetServer(mosquitto.url, Store(store_url), key, share_group="ingest",
                    prefix=prefix_for(tmp_path),
                    client_id=f"pf-share-{i}-{os.getpid()}-{uuid.uuid4().hex[:6]}")
        for i in range(2)
    ]
    for s in servers:
        s.start()
    procs = []
    try:
        spec = mlp_spec(tmp_path / "v.onnx", "v", hidden=16)
        servers[0].publish_artifact(spec, (tmp_path / "v.onnx").read_bytes())
        servers[0].deploy("share", [spec], group=True)
        data = workload(tmp_path / "w.npz")
        for dev in ("sh-a", "sh-b", "sh-c"):
            state = tmp_path / dev
            state.mkdir()
            cfg = state / "agent.toml"
            cfg.write_text(agent_toml(dev, mosquitto.url, state, tmp_path / "keys/public.pem",
                                      group="share", workload=data))
            procs.append(spawn_agent(cfg, state / "agent.log"))
        wait_for(lambda: sum(s.counters.telemetry for s in servers) >= 30, 40,
                 what="30 batches ingested", procs=procs)
        for p in procs:
            stop_agent(p)
        _wait_stored(servers[0].store, tmp_path, ("sh-a", "sh-b", "sh-c"))
    finally:
        for p in procs:
            stop_agent(p)
        for s in servers:
            s.stop()
    counts = [s.counters.telemetry for s in servers]
    assert min(counts) > 0, f"both servers must take a share of the load: {counts}"
    assert sum(s.counters.duplicates for s in servers) == 0, "each batch went to one server"
    store = Store(store_url)
    for dev in ("sh-a", "sh-b", "sh-c"):
        seqs = store.telemetry_seqs(dev)
        assert seqs == list(range(len(seqs)))
