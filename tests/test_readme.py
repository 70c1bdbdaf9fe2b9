"""The README's "Operating a fleet" commands run as written against a real server, so the
README cannot name a command, option or variant that the code lacks.

Each command is taken from the README's block and run in a fresh directory (so the default
paths, `.prunefleet/keys` and `.prunefleet/server/api-token`, are the ones a new operator
gets). Only what cannot run here is changed, and said so in ``adapt``: the broker and store
addresses, and sizes (the shipped recipe with one epoch and the README's variants only; a
few simulated devices for a few seconds)."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tomllib
import uuid
from pathlib import Path

import pytest
from conftest import free_port, wait_for_port
from fleet_helpers import wait_for

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
GROUP = "field"


def readme_commands() -> list[list[str]]:
    """The commands of the sh block under "## Operating a fleet", one argv each:
    continuation lines joined, comments and a trailing `&` dropped, `a|b|c` alternatives
    expanded into one command each."""
    section = README.read_text().split("\n## Operating a fleet\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```sh\n(.*?)```", section, re.S)
    assert block, "no sh block in README's 'Operating a fleet'"
    commands = []
    for line in block.group(1).replace("\\\n", " ").splitlines():
        argv = shlex.split(line, comments=True)
        if argv and argv[-1] == "&":
            argv = argv[:-1]
        if not argv:
            continue
        alternatives = [i for i, a in enumerate(argv) if "|" in a]
        if alternatives:
            (i,) = alternatives
            commands += [[*argv[:i], a, *argv[i + 1:]] for a in argv[i].split("|")]
        else:
            commands.append(argv)
    return commands


def option(argv: list[str], name: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == name]


def replace_option(argv: list[str], name: str, value: str) -> list[str]:
    assert name in argv, (name, argv)
    i = argv.index(name)
    return [*argv[:i + 1], value, *argv[i + 2:]]


def toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(v)


def recipe_file(ref: str) -> Path:
    """The file of a recipe the README names: a shipped one by name, or a path."""
    from prunefleet.server.recipes import shipped_recipe

    found = shipped_recipe(ref)
    return Path(str(found.file)) if found is not None else REPO / ref


def small_recipe(shipped: Path, names: set[str], out: Path) -> Path:
    """The shipped recipe cut down to ``names``, one epoch of training and fine-tuning and a
    short latency measurement: the same code path as the full recipe, in seconds."""
    data = tomllib.loads(shipped.read_text())
    data["train"]["epochs"] = 1
    data["data"]["max_eval"] = 64
    data["prepare"].update(latency_runs=10, latency_rounds=1, latency_warmup=0,
                           calibration_samples=16)
    data["variant"] = [dict(v, finetune_epochs=min(v.get("finetune_epochs", 0), 1))
                       for v in data["variant"] if v["name"] in names]
    lines = []
    for table, values in data.items():
        rows = values if isinstance(values, list) else [values]
        for row in rows:
            lines.append(f"[[{table}]]" if isinstance(values, list) else f"[{table}]")
            lines += [f"{k} = {toml_value(v)}" for k, v in row.items()]
    out.write_text("\n".join(lines) + "\n")
    return out


def test_readme_names_only_variants_the_shipped_recipe_makes():
    commands = readme_commands()
    (prepare,) = [c for c in commands if c[1] == "prepare"]
    recipe = recipe_file(prepare[2])
    assert recipe.is_file(), f"README's recipe {prepare[2]} does not exist"
    made = {v["name"] for v in tomllib.loads(recipe.read_text())["variant"]}
    named = {v for c in commands for v in option(c, "--variant")}
    assert named and named <= made, f"README names {sorted(named - made)}; the recipe makes " \
                                    f"{sorted(made)}"


@pytest.mark.timeout(180)
def test_operating_a_fleet_runs_as_written(tmp_path, mosquitto):
    commands = readme_commands()
    assert all(c[0] == "prunefleet" for c in commands), commands
    port = free_port()
    prefix = f"t{uuid.uuid4().hex[:10]}"
    env = {**os.environ, "PRUNEFLEET_SERVER": f"http://127.0.0.1:{port}",
           "PYTHONUNBUFFERED": "1"}
    env.pop("PRUNEFLEET_TOKEN", None)
    names = {v for c in commands for v in option(c, "--variant")}

    def adapt(argv: list[str]) -> list[str]:
        """What cannot run here as written: addresses and sizes."""
        cmd = argv[1]
        if cmd == "prepare":
            recipe = small_recipe(recipe_file(argv[2]), names, tmp_path / "recipe.toml")
            return [*argv[:2], str(recipe), *argv[3:]]
        if cmd == "serve":
            argv = replace_option(argv, "--broker", mosquitto.url)
            argv = replace_option(argv, "--db", f"sqlite:///{tmp_path / 'fleet.db'}")
            return [*argv, "--listen", f"127.0.0.1:{port}", "--prefix", prefix]
        if cmd == "simulate":
            argv = replace_option(argv, "--broker", mosquitto.url)
            argv = replace_option(argv, "--devices", "3")
            return [*argv, "--prefix", prefix, "--group", GROUP, "--duration", "3",
                    "--status-interval", "1"]
        return argv

    def run(argv: list[str]) -> subprocess.CompletedProcess:
        r = subprocess.run([sys.executable, "-m", "prunefleet.server.cli", *argv[1:]],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, f"{shlex.join(argv)} exited {r.returncode}:\n{r.stderr}"
        assert "Traceback" not in r.stderr, r.stderr
        return r

    # What each command prints when it did its work (the exit code is checked too).
    expect = {"prepare": "report:", "keys": "signing key", "variants": "registered",
              "devices": "parked-0", "rollout": "#1", "simulate": "telemetry batches"}
    server = None
    try:
        for argv in map(adapt, commands):
            if argv[1] != "serve":
                assert expect[argv[1]] in run(argv).stdout, shlex.join(argv)
                continue
            server = subprocess.Popen(
                [sys.executable, "-m", "prunefleet.server.cli", *argv[1:]], cwd=tmp_path,
                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            wait_for(lambda: wait_for_port("127.0.0.1", port, 0.2), 30,
                     what="serve to listen", procs=[server])
            # A device in the rollout's group that never comes online keeps the rollout
            # active, so that `pause` finds it running whatever the simulated devices do.
            run(["prunefleet", "devices", "set-groups", "parked-0", GROUP])
        assert server is not None, "the README starts no server"
        report = json.loads((tmp_path / "variants" / "report.json").read_text())
        assert {v["name"] for v in report["variants"]} == names
    finally:
        if server is not None:
            server.send_signal(signal.SIGTERM)
            out, _ = server.communicate(timeout=30)
    assert server.returncode == 0, out.decode()
