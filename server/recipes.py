"""Recipes shipped in the package, addressable by name: ``prunefleet prepare digits``.

They are package data (``prunefleet/server/prepare/recipes/*.toml``), so a pip install has
them wherever it put the package. A recipe's description is the first sentence of its
leading comment. This module imports neither torch nor the prepare package, so
``prunefleet prepare --list`` answers at once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable

__all__ = ["ShippedRecipe", "shipped", "shipped_recipe"]


@dataclass(frozen=True)
class ShippedRecipe:
    name: str
    description: str
    file: Traversable  # open it with importlib.resources.as_file

    @property
    def text(self) -> str:
        return self.file.read_text(encoding="utf-8")


def _directory() -> Traversable:
    return resources.files("prunefleet.server").joinpath("prepare", "recipes")


def describe(text: str) -> str:
    """The first sentence of the leading ``#`` comment of a TOML text ("" without one)."""
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        stripped = line.lstrip("#").strip()
        if not stripped:
            break
        lines.append(stripped)
    words = " ".join(lines)
    m = re.match(r"(.+?[.:])(\s|$)", words)
    return (m.group(1) if m else words).rstrip(":.")


def shipped() -> list[ShippedRecipe]:
    """Every shipped recipe, by name."""
    out = []
    for entry in sorted(_directory().iterdir(), key=lambda e: e.name):
        if entry.is_file() and entry.name.endswith(".toml"):
            out.append(ShippedRecipe(entry.name.removesuffix(".toml"),
                                     describe(entry.read_text(encoding="utf-8")), entry))
    return out


def shipped_recipe(name: str) -> ShippedRecipe | None:
    return next((r for r in shipped() if r.name == name), None)
