"""The deploy/ files: the systemd unit verifies, its hardening leaves the agent working."""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "deploy" / "systemd" / "prunefleet-agent.service"


def _unit() -> configparser.ConfigParser:
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str  # keys are case-sensitive in systemd
    cp.read(UNIT)
    return cp


def test_unit_is_a_notify_service_with_watchdog_restart_and_state_dir():
    s = _unit()["Service"]
    assert s["Type"] == "notify"
    assert int(s["WatchdogSec"]) > 0
    assert s["Restart"] == "on-failure"
    # `systemctl reload` sends SIGHUP, which re-reads what can change without a restart.
    assert s["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert s["StateDirectory"] == "prunefleet-agent"
    for opt in ("NoNewPrivileges", "ProtectSystem", "ProtectHome", "PrivateTmp"):
        assert opt in s, opt
    assert s["ProtectSystem"] == "strict"
    assert "PRUNEFLEET_AGENT_STATE_DIR=/var/lib/prunefleet-agent" in s["Environment"]


def test_systemd_accepts_the_unit_and_rates_its_exposure(tmp_path):
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is needed to check the unit: `make deps` (Debian " \
                    "package systemd)"
    agent_bin = Path(sys.executable).with_name("prunefleet-agent")
    assert agent_bin.exists()
    text = UNIT.read_text().replace("/opt/prunefleet/venv/bin/prunefleet-agent", str(agent_bin))
    unit = tmp_path / "prunefleet-agent.service"
    unit.write_text(text)
    r = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True)
    problems = [ln for ln in (r.stdout + r.stderr).splitlines()
                if "prunefleet-agent.service" in ln]
    assert r.returncode == 0 and not problems, r.stdout + r.stderr
    r = subprocess.run([analyze, "security", "--offline=yes", str(unit)],
                       capture_output=True, text=True)
    m = re.search(r"Overall exposure level for \S+: ([\d.]+)", r.stdout + r.stderr)
    assert m, r.stdout + r.stderr
    assert float(m.group(1)) <= 4.0, "the unit's hardening must stay at 'OK' or better"


def test_agent_works_with_memory_deny_write_execute():
    """MemoryDenyWriteExecute=yes: ONNX Runtime, paho and Ed25519 under the same rule."""
    assert "MemoryDenyWriteExecute=yes" in UNIT.read_text()
    code = r"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN
    sys.exit(f"kernel refused PR_SET_MDWE: {os.strerror(ctypes.get_errno())}")
sys.path.insert(0, sys.argv[1])
import numpy as np
from pathlib import Path
from onnx_models import mlp_spec
from prunefleet.agent.runtime import load_session
from prunefleet.shared.signing import SigningKey
import paho.mqtt.client, psutil
spec = mlp_spec(Path(sys.argv[2]), "v", hidden=32)
lv = load_session(Path(sys.argv[2]), spec)
y = lv.session.run(None, {"input": np.zeros((4, 1, 8, 8), np.float32)})[0]
assert y.shape == (4, 10)
SigningKey.generate().public_pem()
print("ok")
"""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        r = subprocess.run([sys.executable, "-c", code, str(REPO / "tests"),
                            str(Path(d) / "v.onnx")], capture_output=True, text=True,
                           timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr


def test_example_agent_config_is_valid():
    from prunefleet.agent.config import load_config

    cfg = load_config(REPO / "deploy" / "agent.example.toml", env={})
    assert cfg.device_id == "device-0001" and cfg.broker_url.startswith("mqtts://")
    assert str(cfg.api_socket) == "/run/prunefleet/agent.sock"
    assert cfg.sensors.kind == "system"


def test_mosquitto_configs_set_nodelay_and_sized_queues():
    for name in ("test.conf", "prunefleet.conf"):
        text = (REPO / "deploy" / "mosquitto" / name).read_text()
        lines = {ln.split()[0]: ln.split()[1:] for ln in text.splitlines()
                 if ln.strip() and not ln.lstrip().startswith("#")}
        assert lines["set_tcp_nodelay"] == ["true"], name
        assert int(lines["max_queued_messages"][0]) >= 1000, name
        assert int(lines["max_inflight_messages"][0]) >= 1, name
