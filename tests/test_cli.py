"""Bad input to the command lines ends with one clear line and a non-zero exit."""

from __future__ import annotations

import subprocess
import sys

import pytest


def _agent(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "prunefleet.agent.cli", *args],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(
    "toml, message",
    [
        (None, "config file not found"),
        ('device_id = "a/b"\n', "invalid device id 'a/b'"),
        ('device_id = "ok"\ntrusted_keys = ["/nonexistent/key.pem"]\n', "trusted key not found"),
        ('device_id = "ok"\nbogus = 1\n', "bogus: Extra inputs are not permitted"),
        ('device_id = "ok"\n[policy]\nbattery_low_percent = "x"\n', "battery_low_percent"),
        ('device_id = = "ok"\n', "not valid TOML"),
    ],
)
def test_agent_refuses_a_bad_config_in_one_line(tmp_path, toml, message):
    path = tmp_path / "agent.toml"
    if toml is not None:
        path.write_text(toml)
    r = _agent("--config", str(path), "--state-dir", str(tmp_path / "state"))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_demo_refuses_zero_agents(capsys):
    from prunefleet.server.cli import main

    assert main(["demo", "--agents", "0"]) == 2
    assert "--agents must be at least 1" in capsys.readouterr().err
