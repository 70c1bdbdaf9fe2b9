"""Each package's public names are pinned: a rename or a removal is a decision, not an
accident. Every listed name resolves, and importing a package stays light."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

PUBLIC = {
    "prunefleet.shared": [
        "BrokerAddress", "Clock", "FakeClock", "MemoryBroker", "MemoryTransport",
        "MqttTransport", "PolicyConfig", "PrunefleetError", "SCHEMA_VERSION", "SigningKey",
        "SystemClock", "Topics", "Transport", "TrustedKeys", "__version__",
        "apply_overrides", "atomic_write", "decode",
    ],
    "prunefleet.agent": [
        "Agent", "AgentConfig", "Aggregator", "Client", "ManifestFollower", "decide",
        "load_config", "order_variants", "plan_cascade", "rollout_report",
    ],
    "prunefleet.server": [
        "FleetServer", "FleetService", "SimOptions", "Simulator", "Store", "main",
    ],
}


@pytest.mark.parametrize("package", sorted(PUBLIC))
def test_public_names_are_pinned_and_resolve(package):
    mod = importlib.import_module(package)
    assert sorted(mod.__all__) == sorted(PUBLIC[package])
    for name in mod.__all__:
        assert getattr(mod, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        mod.nope  # noqa: B018 - the lookup itself is the test


def test_importing_the_packages_loads_no_heavy_module():
    code = (
        "import sys, prunefleet.shared, prunefleet.agent, prunefleet.server\n"
        "from prunefleet.agent import client\n"
        "heavy = [m for m in ('torch', 'onnxruntime', 'onnx', 'sqlalchemy') if m in sys.modules]\n"
        "print(heavy); sys.exit(1 if heavy else 0)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_pure_cores_import_without_paho_or_onnxruntime():
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('paho', 'onnxruntime'):\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import prunefleet.agent.follower, prunefleet.agent.phase\n"
        "import prunefleet.agent.policy, prunefleet.agent.telemetry\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
