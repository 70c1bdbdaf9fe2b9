"""Bad input to the command lines ends with one clear line and a non-zero exit; the
``prunefleet`` conventions (exit codes, ``--version``, ``--json``, option names, a closed
stdout) hold for every command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from conftest import free_port
from onnx_models import make_mlp

from prunefleet.server.adminclient import AdminClient


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


# -- prunefleet: conventions every command follows ------------------------------------------
# Exit code 0 on success, 1 for a failure, 2 for a usage error; an expected failure is one
# line on stderr and never a traceback; a closed stdout ends a command quietly.


def _prunefleet(*args: str, env: dict | None = None, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "prunefleet.server.cli", *args],
                          capture_output=True, text=True, timeout=120, cwd=cwd,
                          env={**os.environ, **(env or {})})


def _one_line(r: subprocess.CompletedProcess, code: int, *words: str) -> str:
    """The one stderr line of a command that exited ``code``, holding every one of ``words``."""
    assert "Traceback" not in r.stderr, r.stderr
    assert r.returncode == code, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


# Nothing listens here: a command that validates its input first never gets this far.
_NOWHERE = {"PRUNEFLEET_SERVER": "http://127.0.0.1:9", "PRUNEFLEET_TOKEN": "t" * 32}


def test_version_names_the_release():
    from prunefleet.shared import __version__

    r = _prunefleet("--version")
    assert r.returncode == 0 and r.stdout == f"prunefleet {__version__}\n", r


@pytest.mark.parametrize("argv, words", [
    (["devices", "set-groups", "bad id!", "lab"], ["invalid device id 'bad id!'"]),
    (["devices", "set-groups", "a/b", "lab"], ["invalid device id 'a/b'"]),
    (["devices", "set-groups", "dev-1", "lab/x"], ["invalid group 'lab/x'"]),
    (["devices", "--group", "a b"], ["invalid group 'a b'"]),
    (["rollout", "create", "--device", "a/b", "--variant", "v"], ["invalid device id"]),
    (["rollout", "create", "--fleet", "--variant", "../v"], ["invalid variant", "'../v'"]),
])
def test_a_bad_id_is_refused_in_one_line_before_any_request(argv, words):
    _one_line(_prunefleet(*argv, env=_NOWHERE), 2, *words)


@pytest.mark.parametrize("policy, words", [
    ("battery_low_percent=200", ["invalid policy override battery_low_percent",
                                 "less than or equal to 100"]),
    ("battery_critical_percent=50", ["invalid policy override",
                                     "battery_critical_percent must be below"]),
    ("no_such_setting=1", ["'no_such_setting': not a policy setting", "min_dwell_s"]),
    ("min_dwell_s=soon", ["--policy min_dwell_s", "not a number"]),
    ("min_dwell_s", ["KEY=VALUE"]),
])
def test_a_bad_policy_value_is_one_readable_line(policy, words):
    r = _prunefleet("rollout", "create", "--fleet", "--variant", "v", "--policy", policy,
                    env=_NOWHERE)
    line = _one_line(r, 2, *words)
    assert "validation error" not in line and "errors.pydantic.dev" not in line


@pytest.mark.parametrize("argv, words", [
    (["rollout", "status", "one"], ["invalid int value"]),
    (["--log-level", "chatty", "devices"], ["--log-level"]),
    (["devices", "--server", "localhost:8080"], ["bad --server 'localhost:8080'"]),
    (["serve", "--listen", "8080"], ["bad --listen '8080'"]),
    (["serve", "--prefix", "a/+"], ["prefix"]),
    (["simulate", "--broker", "mqtt://127.0.0.1:9", "--devices", "0"], ["--devices"]),
    (["prepare", "no-such-recipe.toml", "--out", "out"], ["cannot read recipe"]),
])
def test_usage_errors_exit_2(argv, words, tmp_path):
    r = _prunefleet(*argv, env=_NOWHERE, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]  # argparse prints its usage line first
    for w in words:
        assert w in last, (w, r.stderr)


def test_an_unreachable_api_says_what_to_do():
    r = _prunefleet("devices", "--server", f"http://127.0.0.1:{free_port()}", "--token", "t")
    _one_line(r, 1, "cannot reach the server", "prunefleet serve", "--server")


def test_an_unreachable_broker_says_what_to_do(tmp_path, capsys, monkeypatch):
    from prunefleet.server.cli import main
    from prunefleet.server.fleet import FleetServer

    start = FleetServer.start  # 15 s to find out is right for an operator, long for a test
    monkeypatch.setattr(FleetServer, "start", lambda self, timeout_s=15.0: start(self, 1.0))
    rc = main(["serve", "--broker", f"mqtt://127.0.0.1:{free_port()}", "--state-dir",
               str(tmp_path / "srv"), "--keys", str(tmp_path / "keys"),
               "--listen", "127.0.0.1:0"])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err
    (line,) = [ln for ln in err.splitlines() if ln.startswith("prunefleet:")]
    assert "cannot reach the broker" in line and "--broker" in line


def _closed_stdout(*args: str, env: dict | None = None) -> tuple[int, str]:
    """Run a command whose stdout reader has gone (as `| head` does once it has enough)."""
    p = subprocess.Popen([sys.executable, "-m", "prunefleet.server.cli", *args],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env={**os.environ, **(env or {})})
    p.stdout.close()  # before the interpreter has even started: every write fails
    err = p.stderr.read().decode()
    return p.wait(60), err


@pytest.mark.parametrize("json_flag", [[], ["--json"]])
def test_a_closed_stdout_ends_quietly(tmp_path, json_flag):
    rc, err = _closed_stdout("keys", "init", "--keys", str(tmp_path / "keys"), *json_flag)
    assert rc == 141 and err == "", err  # 128 + SIGPIPE, as a shell reports it
    assert (tmp_path / "keys" / "public.pem").exists(), "the work was done"


def test_keys_takes_keys_dir_prints_json_and_keeps_dir_as_a_hidden_alias(tmp_path, capsys):
    from prunefleet.server.cli import main

    keys = tmp_path / "keys"
    assert main(["keys", "init", "--keys", str(keys), "--json"]) == 0
    init = json.loads(capsys.readouterr().out)
    assert init["created"] is True and init["public_key"] == str(keys / "public.pem")
    assert main(["keys", "rotate", "--keys", str(keys), "--json"]) == 0
    rotated = json.loads(capsys.readouterr().out)
    assert rotated["previous"] == init["keyid"] != rotated["current"]
    assert Path(rotated["previous_public_key"]).name == "previous-public.pem"
    assert main(["keys", "retire", "--dir", str(keys), "--json"]) == 0  # the old name
    cap = capsys.readouterr()
    assert json.loads(cap.out) == {"retired": init["keyid"]}
    assert cap.err.strip() == "prunefleet: --dir is deprecated; use --keys"
    assert main(["keys", "retire", "--keys", str(keys)]) == 1  # nothing left to retire
    assert capsys.readouterr().err.strip() == \
        "prunefleet: no previous key: no rotation in progress"
    for command in ("init", "rotate", "retire"):
        with pytest.raises(SystemExit):
            main(["keys", command, "--help"])
        help_text = capsys.readouterr().out
        assert "--keys DIR" in help_text and "--dir" not in help_text


def test_serve_help_says_what_the_state_dir_holds(capsys):
    from prunefleet.server.cli import main

    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split()).split("options:", 1)[1]
    state_dir = text.split("--state-dir STATE_DIR", 1)[1].split(" --", 1)[0]
    assert "token" in state_dir and "key" not in state_dir, state_dir
    assert "--keys DIR signing key directory" in text


TINY_RECIPE = """
[model]
factory = "prunefleet.server.prepare.models:branchy_net"
input_shape = [1, 1, 8, 8]
kwargs = {width = 8}

[prepare]
latency_runs = 10
latency_rounds = 1
latency_warmup = 0

[[variant]]
name = "dense"
technique = "none"
"""


def test_prepare_prints_json(tmp_path, capsys):
    from prunefleet.server.cli import main

    recipe = tmp_path / "recipe.toml"
    recipe.write_text(TINY_RECIPE)
    out = tmp_path / "out"
    assert main(["prepare", str(recipe), "--out", str(out), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["cached"] is False and printed["report"] == str(out / "report.json")
    (dense,) = printed["variants"]
    assert dense["name"] == "dense" and (out / dense["file"]).exists() and dense["macs"] > 0
    recipe.write_text(TINY_RECIPE.replace('technique = "none"', 'technique = "bogus"'))
    assert main(["prepare", str(recipe), "--out", str(out), "--json"]) == 2
    assert "technique" in capsys.readouterr().err


def test_simulate_prints_its_summary_as_json(tmp_path, mosquitto):
    from prunefleet.server.keys import load_or_create

    load_or_create(tmp_path / "keys")
    r = _prunefleet("simulate", "--broker", mosquitto.url, "--devices", "2",
                    "--duration", "1", "--status-interval", "0.5", "--keys",
                    str(tmp_path / "keys"), "--prefix", f"t{uuid.uuid4().hex[:10]}", "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)  # the status rows went to stderr
    assert summary["devices"] == 2 and summary["online"] == 2, summary
    assert "DEVICES" in r.stderr


# -- against a running server ---------------------------------------------------------------


@pytest.fixture
def server(tmp_path, mosquitto):
    from prunefleet.server.serve import FleetService, ServeOptions

    prefix = f"t{uuid.uuid4().hex[:10]}"
    svc = FleetService(ServeOptions(
        state_dir=tmp_path / "server", broker_url=mosquitto.url, listen="127.0.0.1:0",
        prefix=prefix, tick_s=0.2, client_id=f"pf-test-{prefix}",
    )).start()
    yield svc
    svc.stop()


def test_a_refused_token_names_where_it_came_from(server, tmp_path):
    wrong = "w" * 32
    (tmp_path / "token").write_text(wrong)
    env = {"PRUNEFLEET_SERVER": server.url}
    r = _prunefleet("rollout", "list", "--token", wrong, env=env)
    _one_line(r, 1, "wrong bearer token (HTTP 401)", "the token came from --token")
    r = _prunefleet("rollout", "list", env={**env, "PRUNEFLEET_TOKEN": wrong})
    _one_line(r, 1, "(HTTP 401)", "the token came from $PRUNEFLEET_TOKEN")
    r = _prunefleet("rollout", "list", "--token-file", str(tmp_path / "token"),
                    env={**env, "PRUNEFLEET_TOKEN": ""})
    _one_line(r, 1, "(HTTP 401)", f"the token came from {tmp_path / 'token'}")


def test_a_conflict_names_the_supersede_flag(server, tmp_path):
    env = {"PRUNEFLEET_SERVER": server.url, "PRUNEFLEET_TOKEN": server.token}
    api = AdminClient(server.url, server.token)
    api.register_variant(make_mlp(tmp_path / "m.onnx", 8), name="m8", macs=592)
    # A device that never comes online keeps its first rollout unfinished.
    r = _prunefleet("devices", "set-groups", "parked-1", "lab", "--json", env=env)
    assert r.returncode == 0 and json.loads(r.stdout)["groups"] == ["lab"], r.stderr
    r = _prunefleet("rollout", "create", "--group", "lab", "--variant", "m8", "--json",
                    env=env)
    assert r.returncode == 0 and json.loads(r.stdout)["id"] == 1, r.stderr
    r = _prunefleet("rollout", "create", "--device", "parked-1", "--variant", "m8", env=env)
    _one_line(r, 1, "(HTTP 409)", "pass --supersede")
    r = _prunefleet("rollout", "create", "--device", "parked-1", "--variant", "m8",
                    "--supersede", env=env)
    assert r.returncode == 0 and "created rollout #2" in r.stdout, r.stderr
    # and a reader that stops reading ends the command quietly, as `| head -1` does
    rc, err = _closed_stdout("rollout", "status", "2", env=env)
    assert rc == 141 and err == "", err


def test_a_refused_value_exits_2_and_a_missing_thing_1(server, tmp_path):
    env = {"PRUNEFLEET_SERVER": server.url, "PRUNEFLEET_TOKEN": server.token}
    AdminClient(server.url, server.token).register_variant(
        make_mlp(tmp_path / "m.onnx", 8), name="m8", macs=592)
    r = _prunefleet("devices", "set-groups", "parked-1", "lab", env=env)
    assert r.returncode == 0, r.stderr
    r = _prunefleet("rollout", "create", "--group", "lab", "--variant", "m8", "--variant",
                    "m8", env=env)
    _one_line(r, 2, "variant names must be unique", "(HTTP 422)")
    _one_line(_prunefleet("rollout", "status", "7", env=env), 1, "no rollout #7 (HTTP 404)")
