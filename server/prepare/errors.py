"""Errors of variant preparation."""

from __future__ import annotations

from prunefleet.shared.errors import PrunefleetError


class PrepareError(PrunefleetError):
    """Preparing a variant failed (training, pruning, export or measurement)."""


class ParityError(PrepareError):
    """The exported ONNX model does not compute what the PyTorch model computes."""


class PruningError(PrepareError):
    """A pruning request that cannot be honoured (bad ratio, nothing prunable, broken shape)."""
