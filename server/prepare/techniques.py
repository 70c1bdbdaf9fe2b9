"""The four pruning techniques, each optionally iterative and fine-tuned with distillation.

:func:`make_variant` turns the dense model and one :class:`~.recipe.VariantSpec` into the
variant's PyTorch model:

* ``magnitude``: unstructured, the smallest weights (global or per layer) set to zero;
* ``structured``: whole channels removed by group L2 norm through Torch-Pruning's
  dependency graph, widths rounded to multiples of ``round_to``;
* ``sensitivity``: each coupled channel group is pruned alone at several ratios and scored
  on the validation split; per-group ratios are then chosen greedily (least accuracy lost
  per channel or MAC saved) until the target is met;
* ``random``: channels chosen at random, same widths as ``structured`` (the baseline).

With ``iterative_steps = k`` the target is approached in k equal steps, fine-tuning after
each (``finetune_epochs`` spread over the steps); ``distill`` fine-tunes against the dense
model's logits.
"""

from __future__ import annotations

import copy
import logging
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from . import measure
from .data import Dataset, Split
from .errors import PruningError
from .prune import (
    _PRUNABLE,
    ChannelGroup,
    _ignored_names,
    _is_depthwise,
    attention_heads,
    channel_groups,
    channel_widths,
    finalize_masks,
    kept_whole,
    prune_magnitude,
    prune_structured,
    ratio_for_macs,
)
from .recipe import FinetuneSpec, Settings, VariantSpec
from .train import TrainConfig, accuracy, finetune, recalibrate_batchnorm

log = logging.getLogger(__name__)

RECALIBRATION_SAMPLES = 1024


@dataclass
class Context:
    """What every technique may use; ``data`` is ``None`` for a recipe without data."""

    example: torch.Tensor  # (1, ...) input
    settings: Settings
    finetune: FinetuneSpec
    data: Dataset | None
    progress: bool = False
    seed: int = 0
    dense_macs: int = 0


@dataclass
class Made:
    model: nn.Module
    info: dict[str, Any]


def finetune_config(spec: FinetuneSpec, epochs: int) -> TrainConfig:
    return TrainConfig(
        epochs=epochs, lr=spec.lr, batch_size=spec.batch_size, kd_alpha=spec.kd_alpha,
        kd_temperature=spec.kd_temperature, noise_prob=spec.noise_prob,
        noise_std=spec.noise_std, shift_prob=spec.shift_prob,
    )


def _epochs_per_step(total: int, steps: int) -> list[int]:
    base, extra = divmod(total, steps)
    return [base + (1 if i >= steps - extra else 0) for i in range(steps)]


def _prunable_layers(model: nn.Module, round_to: int) -> list[str]:
    ignored = _ignored_names(model, None)
    return [n for n, m in model.named_modules()
            if isinstance(m, _PRUNABLE) and n not in ignored and not _is_depthwise(m)]


def _step_ratios(final: dict[str, float], dense_w: dict[str, int], cur_w: dict[str, int],
                 fraction: float) -> dict[str, float]:
    """Per-layer ratios, relative to the current widths, that reach ``fraction`` of the
    final (dense-relative) ratios."""
    out = {}
    for name, r in final.items():
        keep = dense_w[name] * (1 - r * fraction)
        rel = 1 - keep / cur_w[name]
        if rel > 1e-9:
            out[name] = min(rel, 0.999)
    return out


def _recalibrate(model: nn.Module, data: Dataset | None) -> None:
    if data is not None:
        recalibrate_batchnorm(model, data.train.x[:RECALIBRATION_SAMPLES])


def _cap(split: Split, n: int) -> Split:
    return split if len(split) <= n else Split(split.x[:n], split.y[:n])


# --------------------------------------------------------------------------- sensitivity


def sensitivity_scan(
    dense: nn.Module, ctx: Context, round_to: int
) -> tuple[list[ChannelGroup], dict[str, list[tuple[float, float, int, int]]]]:
    """For each group and ratio: (ratio, accuracy loss, MACs saved, channels removed).

    Each group is pruned alone (BatchNorm statistics re-estimated, no fine-tuning) and scored
    on the validation split.
    """
    assert ctx.data is not None
    val = _cap(ctx.data.val, ctx.data.val.x.shape[0])
    groups = channel_groups(dense, ctx.example, round_to)
    if not groups:
        raise PruningError("the model has no channel group to prune")
    base = accuracy(dense, val)
    dense_w = channel_widths(dense)
    table: dict[str, list[tuple[float, float, int, int]]] = {}
    jobs = [(g, r) for g in groups for r in ctx.settings.sensitivity_ratios]
    bar = tqdm(jobs, desc="sensitivity", unit="prune", disable=not ctx.progress,
               file=sys.stderr, leave=False, dynamic_ncols=True)
    for g, r in bar:
        pruned = prune_structured(dense, ctx.example, {g.root: r}, round_to=round_to)
        _recalibrate(pruned, ctx.data)
        removed = dense_w[g.root] - channel_widths(pruned)[g.root]
        if removed <= 0:
            continue
        loss = base - accuracy(pruned, val)
        saved = ctx.dense_macs - measure.count_macs(pruned, ctx.example)
        entries = table.setdefault(g.root, [])
        if not entries or removed > entries[-1][3]:  # rounding may merge ratios
            entries.append((r, loss, saved, removed))
    return groups, table


def plan_sensitivity(
    dense: nn.Module, ctx: Context, spec: VariantSpec, round_to: int
) -> tuple[dict[str, float], dict[str, Any]]:
    """Per-group ratios that meet the variant's target while losing least accuracy."""
    groups, table = sensitivity_scan(dense, ctx, round_to)
    total_channels = sum(g.channels for g in groups)
    by_macs = spec.macs_ratio is not None
    level = {g.root: 0 for g in groups}  # index into table[g] + 1 (0 = not pruned)

    def estimate() -> tuple[float, float]:
        """(MACs kept share, channel share removed) if savings added up."""
        saved = removed = 0
        for root, lv in level.items():
            if lv:
                saved += table[root][lv - 1][2]
                removed += table[root][lv - 1][3]
        return 1 - saved / ctx.dense_macs, removed / total_channels

    def met_by(macs_kept: float, removed_share: float) -> bool:
        if by_macs:
            return macs_kept <= spec.macs_ratio  # type: ignore[operator]
        return removed_share >= spec.ratio  # type: ignore[operator]

    def step_once() -> bool:
        """Raise the level of the group with the least loss per unit saved."""
        best, best_score = None, None
        for root, lv in level.items():
            options = table.get(root, [])
            if lv >= len(options):
                continue
            prev = options[lv - 1] if lv else (0.0, 0.0, 0, 0)
            nxt = options[lv]
            gain = (nxt[2] - prev[2]) if by_macs else (nxt[3] - prev[3])
            if gain <= 0:
                continue
            score = max(nxt[1] - prev[1], 0.0) + 1e-6
            score /= gain
            if best_score is None or score < best_score:
                best, best_score = root, score
        if best is None:
            return False
        level[best] += 1
        return True

    def ratios() -> dict[str, float]:
        return {root: table[root][lv - 1][0] for root, lv in level.items() if lv}

    while not met_by(*estimate()):
        if not step_once():
            break
    # Savings do not add up exactly (neighbouring layers share MACs): check the real model.
    # Each failed check raises one level, and there are finitely many levels.
    while True:
        pruned = prune_structured(dense, ctx.example, ratios(), round_to=round_to)
        macs_kept = measure.count_macs(pruned, ctx.example) / ctx.dense_macs
        removed_share = 1 - sum(channel_widths(pruned)[g.root] for g in groups) / total_channels
        if met_by(macs_kept, removed_share):
            break
        if not step_once():
            kept = kept_whole(dense, ctx.example)
            also = (f" (left whole, so not counted: {', '.join(k.layer for k in kept)})"
                    if kept else "")
            raise PruningError(
                f"sensitivity: the largest scanned ratio "
                f"({ctx.settings.sensitivity_ratios[-1]}) does not reach the target{also}; "
                "add larger sensitivity_ratios or ask for less")
    scan = {root: [{"ratio": r, "accuracy_loss": round(loss, 5), "macs_saved": s,
                    "channels_removed": c} for r, loss, s, c in entries]
            for root, entries in table.items()}
    return ratios(), {"sensitivity": scan, "layer_ratios": ratios()}


# --------------------------------------------------------------------------- variants


def _fine_tune(model: nn.Module, dense: nn.Module, ctx: Context, spec: VariantSpec,
               epochs: int, step: int) -> float | None:
    if epochs <= 0 or ctx.data is None:
        return None
    result = finetune(
        model, ctx.data.train, ctx.data.val, finetune_config(ctx.finetune, epochs),
        teacher=dense if spec.distill else None, seed=ctx.seed + 1000 * step,
        progress=ctx.progress, desc=f"{spec.name} step {step + 1}",
    )
    return result.val_accuracy


def make_variant(dense: nn.Module, spec: VariantSpec, ctx: Context) -> Made:
    """The variant's model (a new module; ``dense`` is left as it is) and what was done."""
    torch.manual_seed(ctx.seed)
    info: dict[str, Any] = {}
    steps = spec.iterative_steps
    epochs = _epochs_per_step(spec.finetune_epochs, steps)
    if spec.technique == "none":
        model = copy.deepcopy(dense).eval()
        val_acc = _fine_tune(model, dense, ctx, spec, spec.finetune_epochs, 0)
        return Made(model, {"val_accuracy": val_acc})

    if spec.technique == "magnitude":
        assert spec.ratio is not None
        model = copy.deepcopy(dense).eval()
        val_acc = None
        for i in range(steps):
            model = prune_magnitude(finalize_masks(model), spec.ratio * (i + 1) / steps,
                                    spec.scope or "global")
            val_acc = _fine_tune(model, dense, ctx, spec, epochs[i], i) or val_acc
        finalize_masks(model)
        info.update(scope=spec.scope or "global", val_accuracy=val_acc)
        return Made(model.eval(), info)

    chosen = spec.round_to or ctx.settings.round_to
    if not isinstance(chosen, int):  # "auto" is resolved by the plan (plan.py) before this
        raise PruningError(f"{spec.name}: round_to {chosen!r} was not resolved to a number")
    round_to = chosen
    importance = "random" if spec.technique == "random" else "magnitude"
    layers = _prunable_layers(dense, round_to)
    kept = kept_whole(dense, ctx.example)
    if kept:  # recurrent layers, custom modules, and what is tied to them
        info["kept_whole"] = [k.to_dict() for k in kept]
        log.info("%s: left whole: %s", spec.name, ", ".join(k.layer for k in kept))
    if spec.technique == "sensitivity":
        final, extra = plan_sensitivity(dense, ctx, spec, round_to)
        info.update(extra)
    else:
        if spec.macs_ratio is not None:
            def count(r: float) -> int:
                return measure.count_macs(
                    prune_structured(dense, ctx.example, r, round_to=round_to,
                                     importance="magnitude"), ctx.example)

            try:
                uniform = ratio_for_macs(count, ctx.dense_macs, spec.macs_ratio)
            except PruningError as e:
                if not kept:
                    raise
                raise PruningError(f"{e}; left whole: {', '.join(k.layer for k in kept)}"
                                   ) from e
            info["uniform_ratio"] = round(uniform, 4)
        else:
            uniform = float(spec.ratio)  # type: ignore[arg-type]
        final = {n: uniform for n in layers}
    dense_w = channel_widths(dense)
    model = dense
    val_acc = None
    for i in range(steps):
        rel = _step_ratios(final, dense_w, channel_widths(model), (i + 1) / steps)
        model = prune_structured(model, ctx.example, rel, round_to=round_to,
                                 importance=importance)
        if epochs[i] > 0:
            val_acc = _fine_tune(model, dense, ctx, spec, epochs[i], i)
        else:
            _recalibrate(model, ctx.data)
    if model is dense:
        model = copy.deepcopy(dense)
    before = attention_heads(dense)
    if before:
        after = attention_heads(model)
        info["attention_heads"] = {n: [h, after.get(n, h)] for n, h in before.items()}
    info["val_accuracy"] = val_acc
    return Made(model.eval(), info)


def generated_inputs(shape: list[int], n: int, seed: int) -> np.ndarray:
    """Standard-normal inputs for a recipe without data (parity, calibration, latency)."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, *shape[1:]), dtype=np.float32)
