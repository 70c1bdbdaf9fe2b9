"""The agent starts whatever its state directory holds: a damaged variant, index, saved
manifest or trust file is logged and counted, and the agent serves what still loads.

A state directory is prepared as an agent leaves it (blobs under their digest, the index,
the saved signed manifest), then damaged, then a real Agent (ONNX Runtime engine) starts
on the in-memory broker with a fake clock.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest
from onnx_models import mlp_spec

from prunefleet.agent.config import AgentConfig, SensorConfig
from prunefleet.agent.runtime import OnnxEngine
from prunefleet.agent.service import Agent
from prunefleet.agent.store import VariantStore
from prunefleet.agent.telemetry import MemoryQueue
from prunefleet.server.fleet import spec_from_file
from prunefleet.shared.clock import FakeClock
from prunefleet.shared.memtransport import MemoryBroker, MemoryTransport
from prunefleet.shared.messages import Manifest, VariantSpec
from prunefleet.shared.signing import SigningKey
from prunefleet.shared.topics import Topics
from prunefleet.shared.transport import TransportOptions

DEVICE = "dev-start"


class Device:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.state = tmp / "state"
        self.key = SigningKey.generate()
        self.pem = tmp / "public.pem"
        self.pem.write_bytes(self.key.public_pem())
        self.broker = MemoryBroker()
        self.clock = FakeClock()
        self.topics = Topics("pf")

    def install(self, spec: VariantSpec, data: bytes) -> None:
        """What a finished install leaves on disk."""
        store = VariantStore(self.state)
        store.path_of(spec.sha256).write_bytes(data)
        store.record(spec)

    def save_manifest(self, variants: list[VariantSpec], key: SigningKey | None = None) -> None:
        now = self.clock.time()
        m = Manifest(target=DEVICE, version=3, issued_at=now - 10, expires_at=now + 3600,
                     variants=variants)
        VariantStore(self.state).save_manifest((key or self.key).sign(m).encode())

    def start(self) -> Agent:
        config = AgentConfig(device_id=DEVICE, fleet_prefix="pf", state_dir=self.state,
                             trusted_keys=[self.pem], sensors=SensorConfig(kind="simulated"))
        transport = MemoryTransport(self.broker, TransportOptions(client_id=f"pf-{DEVICE}"))
        agent = Agent(config, transport=transport, clock=self.clock, engine=OnnxEngine(),
                      telemetry_queue=MemoryQueue(10))
        agent.start()
        return agent


def _variant(tmp: Path, name: str, hidden: int, **golden: str) -> tuple[VariantSpec, bytes]:
    path = tmp / f"{name}.onnx"
    spec = mlp_spec(path, name, hidden=hidden)
    if golden:
        assert spec.golden is not None
        spec = spec.model_copy(update={"golden": spec.golden.model_copy(update=golden)})
    return spec, path.read_bytes()


def _x() -> np.ndarray:
    return np.zeros((1, 1, 8, 8), np.float32)


@pytest.mark.timeout(30)
def test_variants_that_no_longer_load_are_counted_and_the_rest_serve(tmp_path) -> None:
    dev = Device(tmp_path)
    good, good_data = _variant(tmp_path, "good", 16)
    dev.install(good, good_data)
    # A golden input of the wrong size (registered by an older server, or restored badly).
    short = base64.b64encode(np.ones(7, np.float32).tobytes()).decode()
    wrong_size, data = _variant(tmp_path, "wrong-size", 24, input_b64=short)
    dev.install(wrong_size, data)
    # A golden input that is not even base64.
    not_b64, data = _variant(tmp_path, "not-b64", 32, input_b64="%%%")
    dev.install(not_b64, data)
    # Bytes onnxruntime cannot load (a file damaged on disk).
    garbage = tmp_path / "broken.onnx"
    garbage.write_bytes(b"\x00not an onnx model" * 100)
    broken = spec_from_file(garbage, name="broken", input_shape=[1, 1, 8, 8], num_classes=10,
                            params=1, macs=1)
    dev.install(broken, garbage.read_bytes())
    # The saved manifest was signed by a key this agent no longer trusts.
    dev.save_manifest([good], key=SigningKey.generate())

    agent = dev.start()
    assert set(agent.pool.table) == {"good"}
    assert agent.predict(_x()).variant == "good"
    assert agent.counters.install_failures == 3
    assert agent.counters.rejected_manifests == 1 and agent.manifest is None
    state = agent.reported_state()
    assert state.counters["install_failures"] == 3
    assert state.last_error is not None and "saved manifest ignored" in state.last_error
    assert set(VariantStore(dev.state).installed()) == {"good"}, "the broken ones forgotten"


@pytest.mark.timeout(30)
@pytest.mark.parametrize("index", [b"[1, 2, 3]", b"\xff\xfe not json", b'{"good": 7}',
                                   b"[" * 100_000])
def test_a_corrupt_index_and_manifest_start_an_empty_agent_that_recovers(tmp_path,
                                                                        index) -> None:
    dev = Device(tmp_path)
    good, good_data = _variant(tmp_path, "good", 16)
    dev.install(good, good_data)
    (dev.state / "installed.json").write_bytes(index)
    (dev.state / "manifest.json").write_bytes(index)
    (dev.state / "trust.json").write_bytes(index)

    agent = dev.start()
    assert agent.pool.table == {} and agent.manifest is None
    # The retained desired state comes again: the blob still on disk is installed from it.
    now = dev.clock.time()
    m = Manifest(target=DEVICE, version=4, issued_at=now, expires_at=now + 3600,
                 variants=[good])
    server = MemoryTransport(dev.broker, TransportOptions(client_id="server"))
    server.start()
    server.publish(dev.topics.desired(DEVICE), dev.key.sign(m).encode(), qos=1, retain=True)
    for _ in range(5):
        agent.step()
        if "good" in agent.pool.table:
            break
    assert agent.predict(_x()).variant == "good"
    assert json.loads((dev.state / "trust.json").read_text())["device"] == 4
