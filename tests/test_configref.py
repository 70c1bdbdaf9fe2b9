"""docs/agent-config.md is the configuration model, every key explained, every switch
reason too: a key or reason added without a description, or a stale file, fails here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from prunefleet.agent.config import AgentConfig
from prunefleet.agent.configref import REASONS, RELOADED, render
from prunefleet.shared.messages import Reason

DOC = Path(__file__).resolve().parent.parent / "docs" / "agent-config.md"
REGENERATE = "prunefleet-agent --config-reference > docs/agent-config.md"


def test_the_reference_in_docs_is_the_configuration_model():
    assert DOC.read_text() == render(), f"docs/agent-config.md is stale: run `{REGENERATE}`"


def test_the_agent_prints_the_reference():
    r = subprocess.run([sys.executable, "-m", "prunefleet.agent.cli", "--config-reference"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout == render()


def _keys(model, prefix=""):
    for name, field in model.model_fields.items():
        sub = next((a for a in (field.annotation, *getattr(field.annotation, "__args__", ()))
                    if isinstance(a, type) and hasattr(a, "model_fields")), None)
        yield prefix + name, field, sub
        if sub is not None:
            yield from _keys(sub, f"{prefix}{name}.")


def _sections(text: str) -> dict[str, str]:
    """Each ``## `` section's text by its title (``Top level``, ``[policy]``, …)."""
    out = {}
    for block in text.split("\n## ")[1:]:
        title, _, body = block.partition("\n")
        out[title.strip("`")] = body
    return out


def test_every_key_is_in_the_reference_with_its_meaning():
    sections = _sections(DOC.read_text())
    for key, field, sub in _keys(AgentConfig):
        assert field.description, f"{key}: add a docstring under the field"
        *section, name = key.split(".")
        if sub is not None:  # a section of its own
            assert f"[{key}]" in sections or f"[[{key}]]" in sections, key
            continue
        title = f"[{'.'.join(section)}]" if section else "Top level"
        body = sections.get(title) or sections.get(f"[{title}]", "")
        assert f"| `{name}` |" in body, f"{key} is not in section {title}"
    # What a new operator looked for and did not find.
    assert '| `kind` | `"system"` or `"simulated"` | `"system"` |' in sections["[sensors]"]
    top = sections["Top level"]
    assert '| `state_dir` | path | `"/var/lib/prunefleet-agent"` |' in top
    assert "`PRUNEFLEET_AGENT_STATE_DIR`" in top


def test_what_reload_applies_names_real_keys():
    keys = {k for k, _, _ in _keys(AgentConfig)}
    for r in RELOADED:
        assert r.rstrip(".") in keys, r


def test_every_switch_reason_is_explained():
    text = _sections(DOC.read_text())["Switch reasons"]
    assert set(REASONS) == set(Reason)
    for reason in Reason:
        line = next((ln for ln in text.splitlines() if ln.startswith(f"| `{reason.value}` |")),
                    None)
        assert line is not None, f"switch reason {reason.value!r} is not in {DOC.name}"
        assert len(line.split("|")[2].strip()) > 20, line
    assert "| `fallback` |" in text
