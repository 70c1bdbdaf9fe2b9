"""Variant preparation: train, prune, fine-tune, quantize, export to ONNX, measure.

The entry points are :func:`prepare` (a :class:`Recipe`, usually read with
:func:`load_recipe` from TOML) and :func:`prepare_digits` (the demo's recipe). The building
blocks live in submodules:

* :mod:`.recipe` -- the recipe format and its checks;
* :mod:`.data` -- digits, ``.npz`` or a dataset callable, as in-memory splits;
* :mod:`.models` -- reference networks (digits CNN, ResNet-18 and MobileNetV2 for 32x32);
* :mod:`.prune` -- structured (Torch-Pruning behind :func:`prune_structured`) and
  unstructured (:func:`prune_magnitude`) pruning;
* :mod:`.techniques` -- magnitude, structured, sensitivity and random variants, iterative,
  with fine-tuning and distillation;
* :mod:`.train` -- training and fine-tuning loops, knowledge distillation;
* :mod:`.export` -- ONNX export with a parity check;
* :mod:`.quantize` -- ONNX Runtime static INT8 (QDQ, per channel);
* :mod:`.measure` -- parameters, MACs, bytes, ONNX Runtime latency;
* :mod:`.report` -- Pareto selection, Markdown table, plot;
* :mod:`.pipeline` -- the pipeline and its report.
"""

from __future__ import annotations

from .errors import (
    OutputExistsError,
    ParityError,
    PrepareError,
    PruningError,
    RecipeError,
)
from .pipeline import (
    REPORT_NAME,
    WORKLOAD_NAME,
    PreparedSet,
    PreparedVariant,
    check_recipe,
    digits_recipe,
    load_report,
    prepare,
    prepare_digits,
)
from .prune import prune_magnitude, prune_structured
from .recipe import Recipe, VariantSpec, load_recipe, parse_recipe

__all__ = [
    "REPORT_NAME",
    "WORKLOAD_NAME",
    "OutputExistsError",
    "ParityError",
    "PrepareError",
    "PreparedSet",
    "PreparedVariant",
    "PruningError",
    "Recipe",
    "RecipeError",
    "VariantSpec",
    "check_recipe",
    "digits_recipe",
    "load_recipe",
    "load_report",
    "parse_recipe",
    "prepare",
    "prepare_digits",
    "prune_magnitude",
    "prune_structured",
]
