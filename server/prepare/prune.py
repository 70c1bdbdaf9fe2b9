"""Structured pruning behind a small interface of our own.

Torch-Pruning builds a dependency graph of the model, so removing an output channel of a
convolution also removes the matching BatchNorm entries and input channels of the next layer:
the result is a physically smaller dense model that every runtime speeds up. Its
``BasePruner`` takes many arguments (and mutates dict defaults); this module is the only
place that talks to it, so callers see :func:`prune_structured` and nothing else.

Rules applied here on top of Torch-Pruning:

* the input model is never modified: a pruned deep copy is returned;
* the final classifier's outputs (the classes) are never pruned;
* channel counts are rounded down to multiples of ``round_to`` (8 by default: ONNX Runtime's
  x86 convolution kernels are blocked by 8, so odd widths can be *slower*), but a layer never
  drops below ``round_to`` channels (Torch-Pruning would otherwise skip such a layer or
  remove it entirely); layers with ``round_to`` channels or fewer are left alone.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from typing import Literal

import torch
import torch_pruning as tp
from torch import nn

from .errors import PruningError
from .models import classifier_of

ImportanceName = Literal["magnitude", "random"]

_PRUNABLE = (nn.Conv2d, nn.Conv1d, nn.Linear)


def make_importance(importance: ImportanceName | tp.importance.Importance) -> object:
    """Map a criterion name to a Torch-Pruning importance estimator."""
    if not isinstance(importance, str):
        return importance
    if importance == "magnitude":
        # Group L2 norm over all weights coupled to a channel (conv, BN, next layer's inputs).
        return tp.importance.GroupMagnitudeImportance(p=2)
    if importance == "random":
        return tp.importance.RandomImportance()
    raise PruningError(f"unknown importance {importance!r}; use 'magnitude' or 'random'")


def out_channels(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.out_features
    return module.out_channels


def channel_widths(model: nn.Module) -> dict[str, int]:
    """Output width of every convolution and linear layer, by module name."""
    return {
        name: out_channels(m) for name, m in model.named_modules() if isinstance(m, _PRUNABLE)
    }


def _layer_ratio(channels: int, ratio: float, round_to: int | None) -> float | None:
    """The ratio to ask Torch-Pruning for so that at least ``round_to`` channels stay.

    ``None`` means: leave this layer alone.
    """
    step = round_to or 1
    if channels <= step:
        return None
    kept = int(channels * (1 - ratio))
    kept -= kept % step
    if kept >= step:
        return ratio
    # Ask for exactly ``step`` channels; the half channel guards against float rounding in
    # Torch-Pruning's ``int(channels * (1 - ratio))``.
    return 1 - (step + 0.5) / channels


def prune_structured(
    model: nn.Module,
    example_input: torch.Tensor,
    ratio: float,
    round_to: int | None = 8,
    ignored_layers: Iterable[nn.Module] | None = None,
    *,
    importance: ImportanceName | tp.importance.Importance = "magnitude",
) -> nn.Module:
    """Return a copy of ``model`` with ``ratio`` of the channels of each layer removed.

    ``ratio`` is the share of output channels removed from every prunable layer (0.5 keeps
    half; layers are pruned independently, not ranked globally). ``ignored_layers`` are
    modules *of the given model* that keep their outputs; the classifier is always among
    them. ``importance`` ranks the channels: ``"magnitude"`` (group L2 norm) or ``"random"``
    (a baseline), or any Torch-Pruning importance object.

    The returned model is in eval mode and computes the same output shape as ``model``.
    """
    if not 0.0 <= ratio < 1.0:
        raise PruningError(f"pruning ratio must be in [0, 1), got {ratio}")
    if round_to is not None and round_to < 1:
        raise PruningError(f"round_to must be a positive integer or None, got {round_to}")
    example_input = example_input.detach()
    was_training = model.training
    model.eval()
    with torch.no_grad():
        expected_shape = model(example_input).shape
    model.train(was_training)

    # Work on a copy; map the caller's modules to the copy's by name.
    names = {id(m): name for name, m in model.named_modules()}
    pruned = copy.deepcopy(model).eval()
    modules = dict(pruned.named_modules())
    ignored_names = {names[id(classifier_of(model))]}
    for layer in ignored_layers or ():
        if id(layer) not in names:
            raise PruningError(f"ignored layer {type(layer).__name__} is not part of the model")
        ignored_names.add(names[id(layer)])
    ignored = [modules[n] for n in sorted(ignored_names)]
    if ratio == 0.0:
        return pruned

    ratio_dict: dict[nn.Module, float] = {}
    for name, m in pruned.named_modules():
        if not isinstance(m, _PRUNABLE) or name in ignored_names:
            continue
        layer_ratio = _layer_ratio(out_channels(m), ratio, round_to)
        if layer_ratio is None:
            ignored.append(m)
        elif not math.isclose(layer_ratio, ratio):
            ratio_dict[m] = layer_ratio

    pruner = tp.pruner.BasePruner(
        pruned,
        example_input,
        importance=make_importance(importance),
        pruning_ratio=ratio,
        pruning_ratio_dict=ratio_dict,
        ignored_layers=ignored,
        round_to=round_to,
        global_pruning=False,
        in_channel_groups={},
        out_channel_groups={},
        num_heads={},
        channel_groups={},
    )
    pruner.step()
    pruned.eval()
    for name, m in pruned.named_modules():
        if isinstance(m, _PRUNABLE) and out_channels(m) == 0:
            raise PruningError(f"pruning removed every channel of {name}")
    with torch.no_grad():
        shape = pruned(example_input).shape
    if shape != expected_shape:
        raise PruningError(f"pruning changed the output shape {tuple(expected_shape)} to "
                           f"{tuple(shape)}")
    return pruned
