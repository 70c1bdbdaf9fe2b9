"""Logs an operator can follow: the agent says when its broker is unreachable and how long
it waits, the server logs API changes and rollout transitions, and under systemd both
write what journald reads (``<N>`` priorities, no timestamp of their own)."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys

import pytest
from conftest import free_port
from fleet_helpers import stop_agent, wait_for
from rollout_helpers import Fleet

from prunefleet.server.adminclient import ApiError
from prunefleet.server.keys import load_or_create
from prunefleet.shared.logsetup import configure_logging

TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")


def _journal_env(fileobj) -> str:
    """What systemd puts in $JOURNAL_STREAM for a stream: its ``device:inode``."""
    st = os.fstat(fileobj.fileno())
    return f"{st.st_dev}:{st.st_ino}"


def _log_one(tmp_path, fmt: str, journal: str | None) -> list[str]:
    """Lines that one warning, one info and one error with a traceback leave in a file."""
    path = tmp_path / f"{fmt}.log"
    with open(path, "w") as f:
        env = {} if journal is None else {"JOURNAL_STREAM": journal or _journal_env(f)}
        root = logging.getLogger()
        before = root.handlers[:], root.level
        handler = configure_logging("INFO", fmt, stream=f, env=env, force=True)
        assert handler is not None
        try:
            log = logging.getLogger("prunefleet.test")
            log.warning("broker gone")
            log.info("rollout #1 paused")
            try:
                raise ValueError("boom")
            except ValueError:
                log.exception("tick failed")
        finally:
            root.removeHandler(handler)
            root.handlers[:] = before[0]
            root.setLevel(before[1])
    return path.read_text().splitlines()


def test_under_systemd_lines_carry_syslog_priorities_and_no_timestamp(tmp_path):
    lines = _log_one(tmp_path, "auto", journal="")  # "": the file's own device:inode
    assert lines[:2] == ["<4>prunefleet.test: broker gone", "<6>prunefleet.test: rollout #1 paused"]
    # A traceback stays at its record's priority, line by line.
    assert lines[2] == "<3>prunefleet.test: tick failed"
    assert all(line.startswith("<3>") for line in lines[3:]) and "ValueError: boom" in lines[-1]
    assert not any(TIMESTAMP.search(line) for line in lines)


def test_elsewhere_lines_are_timestamped_text_or_json(tmp_path):
    # JOURNAL_STREAM inherited, but stderr was redirected to another file: plain text.
    lines = _log_one(tmp_path, "auto", journal="1:1")
    assert TIMESTAMP.match(lines[0]) and "WARNING prunefleet.test: broker gone" in lines[0]
    objs = [json.loads(line) for line in _log_one(tmp_path, "json", journal=None)]
    assert [(o["level"], o["message"]) for o in objs] == [
        ("WARNING", "broker gone"), ("INFO", "rollout #1 paused"), ("ERROR", "tick failed")]
    assert "ValueError: boom" in objs[2]["exc"]


@pytest.mark.timeout(60)
def test_an_agent_without_its_broker_says_so_and_how_long_it_waits(tmp_path):
    key = load_or_create(tmp_path / "keys")
    assert key.keyid
    port = free_port()  # nothing listens there
    cfg = tmp_path / "agent.toml"
    cfg.write_text(
        f'device_id = "dev-lonely"\nbroker_url = "mqtt://127.0.0.1:{port}"\n'
        f'state_dir = "{tmp_path / "state"}"\n'
        f'trusted_keys = ["{tmp_path / "keys" / "public.pem"}"]\n'
        "reconnect_min_s = 0.2\nreconnect_max_s = 0.5\n[sensors]\nkind = \"simulated\"\n")
    log_path = tmp_path / "agent.log"
    with open(log_path, "wb") as f:
        # As under systemd: stderr is the journal's stream.
        p = subprocess.Popen(
            [sys.executable, "-m", "prunefleet.agent.cli", "--config", str(cfg)],
            stdout=f, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "JOURNAL_STREAM": _journal_env(f)})
    try:
        def said_it():
            text = log_path.read_text()
            return "attempt 3" in text and text
        text = wait_for(said_it, 40, what="the agent's reconnect log", procs=[p])
    finally:
        assert stop_agent(p) == 0
    lines = text.splitlines()
    assert f"<6>prunefleet.agent.service: device dev-lonely: connecting to the broker " \
           f"mqtt://127.0.0.1:{port}" in lines
    first = next(ln for ln in lines if "attempt 1" in ln)
    assert re.fullmatch(
        rf"<4>prunefleet\.shared\.transport: cannot reach the broker mqtt://127\.0\.0\.1:{port}"
        r" \(Connection refused\); reconnecting in \d+\.\d s \(attempt 1\)", first), first
    assert "further attempts logged every 10th" in next(ln for ln in lines if "attempt 3" in ln)
    assert not any(TIMESTAMP.search(line) for line in lines)


@pytest.fixture
def fleet(tmp_path, mosquitto):
    f = Fleet(tmp_path, mosquitto.url)
    f.start_server()
    yield f
    f.close()


@pytest.mark.timeout(60)
def test_the_server_logs_api_changes_and_rollout_transitions(fleet, caplog):
    caplog.set_level(logging.INFO, logger="prunefleet")
    api = fleet.api
    api.set_groups("dev-a", ["lab"])
    fleet.register_mlp("v1", hidden=8)
    r = api.create_rollout({"target": {"kind": "devices", "devices": ["dev-a"]},
                            "variants": ["v1"]})
    api.rollout_action(r["id"], "pause")

    def logged(*needles: str):
        return lambda: [m for m in caplog.messages if all(n in m for n in needles)]
    rid = r["id"]
    for needles in [
        ("PUT /v1/devices/dev-a/groups from 127.0.0.1:", ": 200 device dev-a groups set to lab"),
        ("POST /v1/variants from 127.0.0.1:", "201 variant v1 (", "registered"),
        ("POST /v1/rollouts from 127.0.0.1:", f"201 rollout #{rid} created: v1 to 1 device(s)"),
        (f"POST /v1/rollouts/{rid}/pause from 127.0.0.1:", f"200 rollout #{rid} paused"),
        (f"rollout #{rid} created: v1 to 1 devices",),
        (f"rollout #{rid} offered: canary",),
        (f"rollout #{rid} paused by the operator",),
    ]:
        wait_for(logged(*needles), 10, what=f"a log line with {needles}")
    # A refused change is logged too, as a warning.
    with pytest.raises(ApiError, match="paused, not active"):
        api.rollout_action(rid, "pause")
    refused = wait_for(logged(f"POST /v1/rollouts/{rid}/pause", "409 refused"), 10,
                       what="the refused pause in the log")
    assert any(rec.levelno == logging.WARNING and rec.getMessage() == refused[0]
               for rec in caplog.records)
