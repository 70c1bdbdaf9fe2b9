"""Errors of variant preparation, split by cause.

    PrepareError            preparing a variant failed (training, pruning, export, measurement)
    ├── RecipeError         the recipe is wrong: found before any long work starts
    ├── ParityError         the exported ONNX model does not compute what PyTorch computes
    ├── PruningError        a pruning request that cannot be honoured
    └── OutputExistsError   the output directory holds variants of another recipe
"""

from __future__ import annotations

from prunefleet.shared.errors import PrunefleetError


class PrepareError(PrunefleetError):
    """Preparing a variant failed (training, pruning, export or measurement)."""


class RecipeError(PrepareError):
    """A recipe that cannot be run (unknown key, factory that does not import, bad shape)."""


class ParityError(PrepareError):
    """The exported ONNX model does not compute what the PyTorch model computes."""


class PruningError(PrepareError):
    """A pruning request that cannot be honoured (bad ratio, nothing prunable, broken shape)."""


class OutputExistsError(PrepareError):
    """The output directory holds a report made from another recipe (use ``force``)."""
