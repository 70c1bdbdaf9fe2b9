"""Agents as remote devices on bad links (system suite: ``make test-system``; needs root).

Two agent processes run in network namespaces of their own, each behind a link that loses
10% of the packets and delays each by 300 ms both ways (tests/lossy_link.py: tc netem, or a
user-space link where the kernel has no netem); mosquitto and `prunefleet serve` run on the
host side. During a rollout and steady telemetry both links are cut for 30 s. Then:

- the rollout completes;
- no telemetry batch is lost or stored twice: per device, what the server stored and what
  the agent still queues are every sequence number the agent issued, each once;
- no chunk is fetched again after it was written (the agents' ``repeated_chunks``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from conftest import MosquittoProcess, find_mosquitto
from fleet_helpers import stop_agent, wait_for
from lossy_link import HOST_IP, LossyLink
from onnx_models import make_mlp

pytestmark = [
    pytest.mark.system,
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None,
                       reason="network namespaces need root and iproute2"),
]

DEVICES = ["dev-a", "dev-b"]
PARTITION_S = 30.0


def _agent_config(tmp: Path, device: str, broker_url: str, prefix: str, key: Path) -> Path:
    path = tmp / f"{device}.toml"
    path.write_text("\n".join([
        f'device_id = "{device}"',
        f'broker_url = "{broker_url}"',
        f'fleet_prefix = "{prefix}"',
        f'state_dir = "{tmp / device}"',
        f'trusted_keys = ["{key}"]',
        "telemetry_interval_s = 1.0",
        "reconnect_min_s = 0.5",
        "reconnect_max_s = 2.0",
        "[sensors]",
        'kind = "simulated"',
    ]) + "\n")
    return path


def _issued(tmp: Path, device: str) -> int:
    """Sequence numbers the agent has handed out (its queue's next_seq)."""
    try:
        return int((tmp / device / "telemetry" / "next_seq").read_text())
    except FileNotFoundError:
        return 0


def _queued(tmp: Path, device: str) -> set[int]:
    return {int(p.stem) for p in (tmp / device / "telemetry").glob("*.json")}


def test_rollout_and_telemetry_survive_loss_delay_and_a_partition(tmp_path) -> None:
    from prunefleet.server.adminclient import AdminClient
    from prunefleet.server.serve import FleetService, ServeOptions

    tag = uuid.uuid4().hex[:6]
    links = [LossyLink(tag, i + 1) for i in range(len(DEVICES))]
    agents: list[subprocess.Popen[bytes]] = []
    broker = svc = None
    try:
        for link in links:
            link.start()
        broker = MosquittoProcess(find_mosquitto(), tmp_path, host=HOST_IP)
        broker.start()
        prefix = f"t{tag}"
        svc = FleetService(ServeOptions(
            state_dir=tmp_path / "server", broker_url=broker.url, listen="127.0.0.1:0",
            prefix=prefix, tick_s=0.5, client_id=f"pf-test-{prefix}",
        )).start()
        api = AdminClient(svc.url, svc.token, timeout_s=30)
        key = tmp_path / "server" / "keys" / "public.pem"
        for device, link in zip(DEVICES, links, strict=True):
            config = _agent_config(tmp_path, device, broker.url, prefix, key)
            with open(tmp_path / f"{device}.log", "wb") as log:
                agents.append(subprocess.Popen(
                    link.command([sys.executable, "-m", "prunefleet.agent.cli",
                                  "--config", str(config)]),
                    stdout=log, stderr=subprocess.STDOUT))
        wait_for(lambda: {d["device_id"] for d in api.devices() if d["online"]} >= set(DEVICES),
                 90, what="both agents online over their lossy links", procs=agents)

        # ~600 KB in 4 KiB chunks: the download lasts well into the partition
        model = make_mlp(tmp_path / "wide.onnx", hidden=2048, seed=3)
        api.register_variant(model, name="wide", macs=64 * 2048 + 2048 * 10, chunk_bytes=4096)
        rollout = api.create_rollout({"target": {"kind": "devices", "devices": DEVICES},
                                      "variants": ["wide"]})

        def downloading() -> bool:
            r = api.rollout(rollout["id"])
            return any(d["phase"] == "downloading" and d["progress"] > 0 for d in r["devices"])

        wait_for(downloading, 90, what="a download under way", procs=agents)
        for link in links:
            link.partition(True)
        time.sleep(PARTITION_S)  # the fault itself, not a wait for a result
        for link in links:
            link.partition(False)
        issued_at_heal = {d: _issued(tmp_path, d) for d in DEVICES}

        def completed() -> bool:
            return api.rollout(rollout["id"])["status"] == "completed"

        wait_for(completed, 240, every_s=1.0, what="the rollout to complete", procs=agents)
        # every batch cut before the link came back reaches the server
        for d in DEVICES:
            wait_for(lambda d=d: set(range(issued_at_heal[d])) <= set(svc.store.telemetry_seqs(d)),
                     120, every_s=1.0, what=f"{d}'s batches from the partition stored")
        for p in agents:
            assert stop_agent(p, timeout_s=60) == 0, "an agent did not stop cleanly"

        for d in DEVICES:
            stored = svc.store.telemetry_seqs(d)
            assert len(stored) == len(set(stored)), f"{d}: a batch stored twice"
            assert set(stored) | _queued(tmp_path, d) == set(range(_issued(tmp_path, d))), \
                f"{d}: batches lost"
        # the agents' last reported states (online=false, with their counters) are in
        wait_for(lambda: not any(d["online"] for d in api.devices()
                                 if d["device_id"] in DEVICES), 30,
                 what="the agents' goodbyes")
        devices = {d["device_id"]: d for d in api.devices()}
        for d in DEVICES:
            assert "wide" in {v["name"] for v in devices[d]["installed"]}, devices[d]
            assert devices[d]["counters"].get("repeated_chunks", 0) == 0, \
                f"{d} fetched chunks again after writing them: {devices[d]['counters']}"
    finally:
        for p in agents:
            if p.poll() is None:
                p.kill()
                p.wait()
        if svc is not None:
            svc.stop()
        if broker is not None:
            broker.stop()
        for link in links:
            link.close()
