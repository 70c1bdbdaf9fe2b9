"""`prunefleet prepare` for someone who installed the package: shipped recipes by name, a
line per stage when stderr is not a terminal, a table that stays aligned."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from importlib.resources import files
from pathlib import Path

import pytest
from test_prepare_recipe import NO_DATA

from prunefleet.server import cli
from prunefleet.server.recipes import shipped

REPO = Path(__file__).resolve().parent.parent


def _prunefleet(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "prunefleet.server.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


def test_shipped_recipes_are_package_data_and_listed_by_name(capsys, tmp_path, monkeypatch):
    recipes = {r.name: r for r in shipped()}
    assert "digits" in recipes
    # Found through the package, not the source tree: what a pip install has.
    in_package = files("prunefleet.server").joinpath("prepare", "recipes", "digits.toml")
    assert recipes["digits"].text == in_package.read_text(encoding="utf-8")
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "recipes/*.toml" in \
        pyproject["tool"]["setuptools"]["package-data"]["prunefleet.server.prepare"]

    assert cli.main(["prepare", "--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(recipes)
    assert lines[0].startswith("digits  The digits CNN")
    assert cli.main(["prepare", "--list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in listed] == sorted(recipes)

    # By name from any directory; a name that is neither a file nor shipped is a usage
    # error that says where to look.
    from prunefleet.server.cli import _load_recipe

    monkeypatch.chdir(tmp_path)
    recipe = _load_recipe("digits")
    assert {"dense", "struct50", "struct75-iter"} <= {v.name for v in recipe.variant}
    assert cli.main(["prepare", "digitz", "--out", "out"]) == 2
    err = capsys.readouterr().err
    assert "no shipped recipe of that name (shipped: digits" in err and "--list" in err
    assert cli.main(["prepare", "digits"]) == 2  # no --out
    assert "--out DIR" in capsys.readouterr().err


@pytest.mark.timeout(600)
def test_prepare_without_a_terminal_says_each_stage_and_aligns_its_table(tmp_path):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(NO_DATA)  # dense, s50 and s50-int8, without data
    r = _prunefleet("prepare", str(recipe), "--out", "out", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    # stderr is a pipe here: no progress bars, one log line per stage instead.
    for line in ("variant 1 of 3: dense (none)", "variant 3 of 3: s50-int8 (structured+int8)",
                 "measuring 3 variants side by side", "writing the report"):
        assert line in r.stderr, r.stderr
    assert "\r" not in r.stderr and "it/s" not in r.stderr
    table = r.stdout.splitlines()
    header = table[0]
    rows = {ln.split()[0]: ln for ln in table[1:4]}
    assert set(rows) == {"dense", "s50", "s50-int8"}
    assert "structured+int8" in rows["s50-int8"] and "int8" not in rows["s50"]
    # Every column starts (left-aligned) or ends (right-aligned) where its header does.
    tech_at = header.index("technique")
    params_end = header.index("params") + len("params")
    for row in rows.values():
        assert row[tech_at - 1] == " " and row[tech_at] != " ", (header, row)
        assert row[params_end - 1] != " " and row[params_end] == " ", (header, row)
