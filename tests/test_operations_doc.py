"""docs/operations.md stays true to the CLI: every `prunefleet` command it shows parses
with the command line as it is, and every link it gives lands on a heading."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from prunefleet.server.cli import build_parser

DOCS = Path(__file__).resolve().parent.parent / "docs"


def _commands(text: str) -> list[str]:
    out = []
    for block in re.findall(r"```sh\n(.*?)```", text, re.S):
        for line in block.splitlines():
            line = line.split("  #")[0].strip().rstrip("&").strip()
            if line.startswith("prunefleet "):
                out.append(line)
    return out


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


COMMANDS = _commands((DOCS / "operations.md").read_text())


def test_the_page_walks_through_the_day():
    used = {shlex.split(c)[1] for c in COMMANDS}
    assert {"devices", "telemetry", "prepare", "variants", "rollout", "pin", "keys",
            "simulate", "serve"} <= used
    text = (DOCS / "operations.md").read_text()
    for words in ("systemctl reload prunefleet-agent", "journalctl -u prunefleet-agent",
                  "rollout pause", "rollout rollback", "Backups", "Where the state lives"):
        assert words in text


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_parses(command):
    argv = shlex.split(command.replace("PORT", "1883"))[1:]
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:
        raise AssertionError(f"docs/operations.md: `{command}` does not parse") from e
    assert callable(args.func)


def test_links_land_on_headings():
    text = (DOCS / "operations.md").read_text()
    for target, anchor in re.findall(r"\]\(([\w-]+\.md)(?:#([\w-]+))?\)", text):
        page = DOCS / target
        assert page.is_file(), target
        if anchor:
            slugs = {_slug(h) for h in re.findall(r"^#+ (.+)$", page.read_text(), re.M)}
            assert anchor in slugs, f"{target}#{anchor}"
