"""A device has no room for torch: importing the agent must not load it."""

import subprocess
import sys


def test_importing_every_agent_module_leaves_torch_out():
    code = """
import importlib, pkgutil, sys
import prunefleet.agent as pkg
names = [m.name for m in pkgutil.walk_packages(pkg.__path__, "prunefleet.agent.")]
assert len(names) >= 10, names
for n in names:
    importlib.import_module(n)
bad = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "sklearn", "onnx",
             "sqlalchemy", "torch_pruning"))
print(len(names), bad)
sys.exit(1 if bad else 0)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
