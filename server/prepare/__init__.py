"""Variant preparation: train, prune, fine-tune, export to ONNX, measure.

The entry point is :func:`prepare_digits`; the building blocks live in submodules meant to be
reused by recipe-driven pipelines:

* :mod:`.data` -- the digits data set, normalised and split;
* :mod:`.models` -- small reference CNNs;
* :mod:`.train` -- training and fine-tuning loops, knowledge distillation;
* :mod:`.prune` -- structured pruning (Torch-Pruning behind :func:`prune_structured`);
* :mod:`.export` -- ONNX export with a parity check;
* :mod:`.measure` -- parameters, MACs, bytes, ONNX Runtime latency;
* :mod:`.pipeline` -- the pipeline and its report.
"""

from __future__ import annotations

from .errors import ParityError, PrepareError, PruningError
from .pipeline import (
    REPORT_NAME,
    WORKLOAD_NAME,
    PreparedSet,
    PreparedVariant,
    load_report,
    prepare_digits,
)
from .prune import prune_structured

__all__ = [
    "REPORT_NAME",
    "WORKLOAD_NAME",
    "ParityError",
    "PrepareError",
    "PreparedSet",
    "PreparedVariant",
    "PruningError",
    "load_report",
    "prepare_digits",
    "prune_structured",
]
