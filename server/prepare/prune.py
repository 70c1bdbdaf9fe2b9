"""Pruning behind a small interface of our own: structured (Torch-Pruning) and unstructured.

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
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

import torch
import torch_pruning as tp
from torch import nn

from .errors import PruningError
from .models import classifier_of

ImportanceName = Literal["magnitude", "random"]

_PRUNABLE = (nn.Conv2d, nn.Conv1d, nn.Linear)
PrunableLayer = nn.Conv2d | nn.Conv1d | nn.Linear


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


def out_channels(module: PrunableLayer) -> int:
    if isinstance(module, nn.Linear):
        return module.out_features
    return module.out_channels


def channel_widths(model: nn.Module) -> dict[str, int]:
    """Output width of every convolution and linear layer, by module name."""
    return {
        name: out_channels(m) for name, m in model.named_modules() if isinstance(m, _PRUNABLE)
    }


def _is_depthwise(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d | nn.Conv1d) and m.groups == m.out_channels > 1


def _layer_ratio(
    channels: int, ratio: float, round_to: int | None, groups: int = 1
) -> float | None:
    """The ratio to ask Torch-Pruning for so that the kept width is a multiple of
    ``round_to`` (and of ``groups``) and at least that multiple. ``None``: leave it alone.
    """
    step = math.lcm(round_to or 1, groups)
    if channels <= step:
        return None
    kept = int(channels * (1 - ratio) + 1e-9)
    kept = max(step, kept - kept % step)
    if kept >= channels:
        return None
    # Torch-Pruning keeps int(channels * (1 - r)) per group: the half channel guards
    # against float rounding.
    return 1 - (kept + 0.5) / channels


def _check_round_to(round_to: int | None) -> None:
    if round_to is not None and round_to < 1:
        raise PruningError(f"round_to must be a positive integer or None, got {round_to}")


def _output_shape(model: nn.Module, example_input: torch.Tensor) -> torch.Size:
    was_training = model.training
    model.eval()
    with torch.no_grad():
        shape = model(example_input).shape
    model.train(was_training)
    return shape


def _ignored_names(model: nn.Module, ignored_layers: Iterable[nn.Module] | None) -> set[str]:
    names = {id(m): name for name, m in model.named_modules()}
    ignored = {names[id(classifier_of(model))]}
    for layer in ignored_layers or ():
        if id(layer) not in names:
            raise PruningError(f"ignored layer {type(layer).__name__} is not part of the model")
        ignored.add(names[id(layer)])
    return ignored


def prune_structured(
    model: nn.Module,
    example_input: torch.Tensor,
    ratio: float | Mapping[str, float],
    round_to: int | None = 8,
    ignored_layers: Iterable[nn.Module] | None = None,
    *,
    importance: ImportanceName | tp.importance.Importance = "magnitude",
) -> nn.Module:
    """Return a copy of ``model`` with whole channels removed (physically smaller).

    ``ratio`` is the share of output channels removed from every prunable layer (0.5 keeps
    half; layers are pruned independently, not ranked globally), or a mapping from layer
    name (as in ``named_modules``; the root of a coupled group, see :func:`channel_groups`)
    to that layer's ratio, other layers kept whole. Coupled layers (residual adds,
    concatenations, depthwise convolutions) lose the same channels. ``ignored_layers`` are
    modules *of the given model* that keep their outputs; the classifier is always among
    them. ``importance`` ranks the channels: ``"magnitude"`` (group L2 norm) or ``"random"``
    (a baseline), or any Torch-Pruning importance object.

    The returned model is in eval mode and computes the same output shape as ``model``.
    """
    per_layer: dict[str, float] | None
    if isinstance(ratio, Mapping):
        per_layer, uniform = dict(ratio), 0.0
    else:
        per_layer, uniform = None, float(ratio)
    ratios = list(per_layer.values()) if per_layer is not None else [uniform]
    for r in ratios:
        if not 0.0 <= r < 1.0:
            raise PruningError(f"pruning ratio must be in [0, 1), got {r}")
    _check_round_to(round_to)
    example_input = example_input.detach()
    expected_shape = _output_shape(model, example_input)
    ignored_names = _ignored_names(model, ignored_layers)
    pruned = copy.deepcopy(model).eval()
    modules = dict(pruned.named_modules())
    if per_layer is not None:
        unknown = sorted(set(per_layer) - set(modules))
        if unknown:
            raise PruningError(f"no layer named {unknown[0]!r} in the model")
    ignored = [modules[n] for n in sorted(ignored_names)]
    if all(r == 0.0 for r in ratios):
        return pruned

    # Torch-Pruning's own round_to miscounts grouped convolutions; the exact per-layer ratios
    # computed here give widths that are multiples of round_to (and of the groups) instead.
    ratio_dict: dict[nn.Module, float] = {}
    for name, m in pruned.named_modules():
        if not isinstance(m, _PRUNABLE) or name in ignored_names or _is_depthwise(m):
            continue
        wanted = per_layer.get(name, 0.0) if per_layer is not None else uniform
        if wanted <= 0:
            continue
        layer_ratio = _layer_ratio(out_channels(m), wanted, round_to, getattr(m, "groups", 1))
        if layer_ratio is None:
            ignored.append(m)
        else:
            ratio_dict[m] = layer_ratio

    pruner = tp.pruner.BasePruner(
        pruned,
        example_input,
        importance=make_importance(importance),
        pruning_ratio=0.0,
        pruning_ratio_dict=ratio_dict,
        ignored_layers=ignored,
        round_to=None,
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
    shape = _output_shape(pruned, example_input)
    if shape != expected_shape:
        raise PruningError(f"pruning changed the output shape {tuple(expected_shape)} to "
                           f"{tuple(shape)}")
    return pruned


@dataclass(frozen=True)
class ChannelGroup:
    """Layers whose output channels must be removed together; named by their root layer."""

    root: str
    channels: int
    layers: tuple[str, ...]


def channel_groups(
    model: nn.Module,
    example_input: torch.Tensor,
    round_to: int | None = 8,
    ignored_layers: Iterable[nn.Module] | None = None,
) -> list[ChannelGroup]:
    """The prunable coupled groups of ``model`` (what sensitivity analysis scans)."""
    ignored_names = _ignored_names(model, ignored_layers)
    names = {m: n for n, m in model.named_modules()}
    ignored = [m for m, n in names.items() if n in ignored_names]
    graph = tp.DependencyGraph().build_dependency(model.eval(), example_inputs=example_input)
    groups = []
    for group in graph.get_all_groups(ignored_layers=ignored, root_module_types=[
            nn.Conv2d, nn.Conv1d, nn.Linear]):
        layers: list[PrunableLayer] = []
        for dep, _ in group:
            for m in (dep.source.module, dep.target.module):
                if isinstance(m, _PRUNABLE) and m in names and m not in layers:
                    layers.append(m)
        # Name the group by a layer whose outputs it prunes (a depthwise conv follows them).
        producers = [m for m in layers if not _is_depthwise(m) and m not in ignored
                     and out_channels(m) == out_channels(group[0].dep.target.module)]
        if not producers:
            continue
        root = producers[0]
        if out_channels(root) <= (round_to or 1):
            continue
        groups.append(ChannelGroup(names[root], out_channels(root),
                                   tuple(names[m] for m in layers)))
    return groups


def ratio_for_macs(
    count: Callable[[float], int], dense_macs: int, macs_ratio: float, *, tol: float = 0.005,
    max_iter: int = 14,
) -> float:
    """The smallest uniform channel ratio whose model keeps at most ``macs_ratio`` of the MACs.

    ``count(ratio)`` prunes at ``ratio`` and returns the MACs (a bisection; rounding to
    multiples of ``round_to`` makes the curve a staircase, so the result is the first step
    at or below the target).
    """
    if not 0.0 < macs_ratio < 1.0:
        raise PruningError(f"macs_ratio must be in (0, 1), got {macs_ratio}")
    lo, hi = 0.0, 0.99
    if count(hi) > macs_ratio * dense_macs:
        raise PruningError(f"cannot keep only {macs_ratio:.0%} of the MACs by removing channels "
                           "(layers keep at least round_to channels)")
    for _ in range(max_iter):
        if hi - lo < tol:
            break
        mid = (lo + hi) / 2
        if count(mid) <= macs_ratio * dense_macs:
            hi = mid
        else:
            lo = mid
    return hi


# --------------------------------------------------------------------------- unstructured


def prunable_weights(model: nn.Module) -> list[tuple[str, PrunableLayer]]:
    """Convolution and linear layers whose ``weight`` unstructured pruning may zero."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _PRUNABLE)]


def prune_magnitude(
    model: nn.Module, ratio: float, scope: Literal["global", "layer"] = "global"
) -> nn.Module:
    """Return a copy of ``model`` with ``ratio`` of its conv/linear weights set to zero.

    The weights of smallest magnitude go, ranked over the whole model (``"global"``) or
    within each layer (``"layer"``); biases and normalisation parameters are never touched.
    The zeros are kept by a mask (``torch.nn.utils.prune``), so fine-tuning cannot revive
    them; call :func:`finalize_masks` before export. The tensors keep their shapes: no
    runtime runs the result faster, its gain is compressed size.
    """
    from torch.nn.utils import prune as tprune

    if not 0.0 < ratio < 1.0:
        raise PruningError(f"pruning ratio must be in (0, 1), got {ratio}")
    pruned = copy.deepcopy(model).eval()
    layers = prunable_weights(pruned)
    if not layers:
        raise PruningError("the model has no convolution or linear weights to prune")
    if scope == "global":
        scores = torch.cat([m.weight.detach().abs().flatten() for _, m in layers])
        k = round(ratio * scores.numel())
        threshold = torch.kthvalue(scores, k).values if k > 0 else scores.min() - 1
        for _, m in layers:
            mask = m.weight.detach().abs() > threshold
            tprune.custom_from_mask(m, "weight", mask)
    elif scope == "layer":
        for _, m in layers:
            w = m.weight.detach().abs().flatten()
            k = round(ratio * w.numel())
            mask = torch.ones_like(m.weight, dtype=torch.bool)
            if k > 0:
                idx = torch.argsort(w)[:k]
                mask.view(-1)[idx] = False
            tprune.custom_from_mask(m, "weight", mask)
    else:
        raise PruningError(f"unknown scope {scope!r}; use 'global' or 'layer'")
    return pruned


def finalize_masks(model: nn.Module) -> nn.Module:
    """Make masked weights plain parameters again (zeros stay zeros)."""
    from torch.nn.utils import prune as tprune

    for _, m in prunable_weights(model):
        if tprune.is_pruned(m) and hasattr(m, "weight_mask"):
            tprune.remove(m, "weight")
    return model


def weight_sparsity(model: nn.Module) -> float:
    """Share of conv/linear weights that are exactly zero."""
    total = zeros = 0
    for _, m in prunable_weights(model):
        w = m.weight.detach()
        total += w.numel()
        zeros += int((w == 0).sum())
    return zeros / total if total else 0.0

