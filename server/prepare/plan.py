"""Before the variants are made: channel rounding, the latency model, the pruning search.

:func:`plan_variants` turns the recipe's variants into the ones to make for the target
(:mod:`.target`): ``round_to = "auto"`` becomes a number (the ISA rule, checked by timing
quick variants on the host when the host is the target), and, with a latency budget, a
structural variant predicted to miss it is given the least pruning (a MACs target) the
latency model predicts to meet it. The latency model is the device class's (fitted on the
fleet's profiles) when one is given, else fitted here on quick variants of the dense model
(pruned, not fine-tuned: latency does not depend on the weights). Quick variants cost a
prune, an export and a few hundred timed runs each: seconds for small models.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from . import measure
from .errors import PruningError
from .export import to_onnx_bytes
from .prune import prune_structured, ratio_for_macs
from .recipe import STRUCTURAL, Recipe, VariantSpec
from .target import (
    ClassModel,
    fit_latency,
    host_tier,
    pick_rounding,
    rounding_candidates,
    rounding_for,
    tier_of_class,
)

log = logging.getLogger(__name__)

# The roundings are timed on the dense model pruned to keep this share of its MACs, each at
# the ratio that reaches it with that multiple: equal work, so the one that runs it fastest
# wins. (At one channel ratio a wider multiple rounds more channels away, or none: its
# latency says more about how much it removed than about how well its widths run.)
PROBE_MACS = 0.4
# Below this dense p50 per-operator overhead dominates and the widths' blocking cannot show
# (digits CNN, 0.05 ms: the three roundings' order changed from run to run): the rule decides.
MIN_TIMED_MS = 1.0
FIT_RATIOS = (0.25, 0.5, 0.75)  # quick variants of the host's latency model
PROBE_RUNS = 200
PROBE_ROUNDS = 5
PROBE_WARMUP = 10
SEARCH_STEP = 0.05
# The most a fit's leave-one-out error widens the budget's margin (above, a warning).
MAX_MARGIN = 0.25


@dataclass
class Plan:
    variants: list[VariantSpec]
    info: dict[str, Any] = field(default_factory=dict)  # the report's "target" section
    model: ClassModel | None = None
    host_is_target: bool = True


def _quick(dense: nn.Module, example: torch.Tensor, ratio: float, round_to: int
           ) -> tuple[int, bytes]:
    model = dense if ratio == 0 else prune_structured(dense, example, ratio,
                                                      round_to=round_to)
    onnx_bytes = to_onnx_bytes(model, example)[0]
    return measure.count_macs(model, example), onnx_bytes


def _time(onnx: dict[str, bytes], x1: np.ndarray, runs: int = PROBE_RUNS
          ) -> dict[str, measure.Latency]:
    sessions = {k: measure.session(b, threads=1) for k, b in onnx.items()}
    return measure.latency_many(sessions, x1, warmup=PROBE_WARMUP, runs=runs,
                                rounds=PROBE_ROUNDS)


def time_roundings(dense: nn.Module, example: torch.Tensor, candidates: list[int],
                   macs_ratio: float = PROBE_MACS) -> dict[int, dict[str, float]]:
    """Each rounding's quick variant keeping at most ``macs_ratio`` of the MACs: its ratio,
    p50, speedup over dense and ideal speedup."""
    macs: dict[str, int] = {}
    onnx: dict[str, bytes] = {}
    ratios: dict[str, float] = {}
    macs["dense"], onnx["dense"] = _quick(dense, example, 0.0, 1)
    for r in candidates:
        try:
            ratio = ratio_for_macs(functools.partial(_macs_at, dense, example, round_to=r),
                                   macs["dense"], macs_ratio, tol=0.02)
            macs[str(r)], onnx[str(r)] = _quick(dense, example, ratio, r)
            ratios[str(r)] = round(ratio, 4)
        except PruningError as e:  # layers too narrow for the multiple, say
            log.info("round_to %d not timed: %s", r, e)
    lat = _time(onnx, np.zeros(tuple(example.shape), np.float32))
    dense_p50 = lat["dense"].p50_ms
    return {int(k): {"ratio": ratios[k], "p50_ms": round(lat[k].p50_ms, 5), "macs": macs[k],
                     "speedup": round(dense_p50 / lat[k].p50_ms, 4),
                     "ideal_speedup": round(macs["dense"] / macs[k], 4) if macs[k] else 0.0}
            for k in onnx if k != "dense"}


def host_model(dense: nn.Module, example: torch.Tensor, round_to: int, name: str
               ) -> ClassModel | None:
    """FP32 latency ≈ a + b·MACs on this host, from quick variants of the dense model."""
    onnx: dict[str, bytes] = {}
    macs: dict[str, int] = {}
    for r in (0.0, *FIT_RATIOS):
        key = f"quick{int(r * 100)}"
        try:
            macs[key], onnx[key] = _quick(dense, example, r, round_to)
        except PruningError as e:
            log.info("%s not fitted: %s", key, e)
    lat = _time(onnx, np.zeros(tuple(example.shape), np.float32))
    fit = fit_latency([(k, macs[k], lat[k].p95_ms) for k in onnx], "fp32")
    if fit is None:
        return None
    return ClassModel(name, host_tier(), "host", {"fp32": fit}, devices=1)


def _macs_at(dense: nn.Module, example: torch.Tensor, ratio: float, round_to: int) -> int:
    return measure.count_macs(prune_structured(dense, example, ratio, round_to=round_to),
                              example)


def search_ratio(dense: nn.Module, example: torch.Tensor, round_to: int, start: float,
                 predict: Any, budget_ms: float) -> tuple[float, int] | None:
    """The least uniform ratio from ``start`` up (steps of 0.05) whose MACs the model
    predicts to meet ``budget_ms``, with those MACs; None when none does."""
    ratio = start
    while ratio < 0.96:
        try:
            macs = _macs_at(dense, example, ratio, round_to)
        except PruningError:
            return None
        if predict(macs) <= budget_ms:
            return round(ratio, 4), macs
        ratio = round(ratio + SEARCH_STEP, 4)
    return None


def plan_variants(recipe: Recipe, variants: list[VariantSpec], dense: nn.Module,
                  example: torch.Tensor, dense_macs: int, *, for_class: str | None = None,
                  class_model: ClassModel | None = None) -> Plan:
    """The variants to make for the recipe's target (see the module doc)."""
    target = recipe.target
    settings = recipe.prepare
    tier = tier_of_class(for_class) if for_class else None
    mine = host_tier()
    host_is_target = for_class is None or tier == mine
    info: dict[str, Any] = {"device_class": for_class, "tier": tier or mine,
                            "host_tier": mine, "host_is_target": host_is_target}
    if for_class and tier is None:
        info["tier_note"] = (f"class {for_class!r} does not name its instruction set; "
                             f"the host's ({mine}) is assumed")
    auto = any(v.technique in STRUCTURAL
               and (v.round_to if v.round_to is not None else settings.round_to) == "auto"
               for v in variants)
    chosen = settings.round_to if isinstance(settings.round_to, int) else 8
    if auto:
        rule = rounding_for(tier or mine)
        chosen = rule
        rinfo: dict[str, Any] = {"tier": tier or mine, "rule": rule, "chosen": rule,
                                 "source": "instruction set rule"}
        dense_ms = (_time({"dense": _quick(dense, example, 0.0, 1)[1]},
                          np.zeros(tuple(example.shape), np.float32), runs=20)["dense"].p50_ms
                    if host_is_target else None)
        if dense_ms is not None and dense_ms < MIN_TIMED_MS:
            rinfo["not_timed"] = (f"dense p50 {dense_ms:.3f} ms on this host, under "
                                  f"{MIN_TIMED_MS:g} ms: overhead, not channel blocking, "
                                  "would decide")
        elif host_is_target:
            timed = time_roundings(dense, example, rounding_candidates(tier or mine))
            if timed:
                chosen = pick_rounding({r: (t["speedup"], t["ideal_speedup"])
                                        for r, t in timed.items()}, rule)
                rinfo.update(chosen=chosen, timed=timed, probe_macs_ratio=PROBE_MACS,
                             source="host timing (largest measured/ideal speedup; "
                                    "the rule's choice on a tie)")
        info["round_to"] = rinfo

    def resolved(v: VariantSpec) -> VariantSpec:
        if v.technique not in STRUCTURAL:
            return v
        r = v.round_to if v.round_to is not None else settings.round_to
        return v.model_copy(update={"round_to": chosen if r == "auto" else r})

    out = [resolved(v) for v in variants]
    budget = target.latency_budget_ms if target else None
    if budget is None and for_class is None:
        return Plan(out, info, None, host_is_target)
    model = class_model
    if model is None and budget is not None:  # the host's line serves the search only
        model = host_model(dense, example, chosen, for_class or "host")
        if model is not None and for_class:
            model.note = (f"no fleet profiles of class {for_class!r}: latency modelled and "
                          "measured on this host")
    info["latency_model"] = model.describe() if model else None
    if model is None and for_class:
        info["latency_note"] = (f"no fleet profiles of class {for_class!r}: latency measured "
                                "on this host")
    if budget is None or model is None:
        return Plan(out, info, model, host_is_target)
    search = {}
    for i, v in enumerate(out):
        if v.technique not in STRUCTURAL:
            continue
        fam = "int8" if v.quantize == "int8" and "int8" in model.fits else "fp32"
        fit = model.fits.get(fam)
        if fit is None:
            continue
        assert isinstance(v.round_to, int)
        if v.macs_ratio is not None:
            macs, start = int(v.macs_ratio * dense_macs), SEARCH_STEP
        else:  # sensitivity spreads the ratio unevenly: the uniform prune approximates it
            start = float(v.ratio)  # type: ignore[arg-type]
            macs = _macs_at(dense, example, start, v.round_to)
        predicted = fit.predict(macs)
        # The line's own leave-one-out error is the margin: a variant predicted exactly at
        # the budget misses it half the time (capped: a fit that bad is reported, not
        # trusted further).
        margin = min(fit.loo_mape or 0.0, MAX_MARGIN)
        aim = budget / (1.0 + margin)
        entry: dict[str, Any] = {"family": fam, "own_macs": macs,
                                 "own_predicted_ms": round(predicted, 5),
                                 "margin": round(margin, 4), "aim_ms": round(aim, 5)}
        if fit.loo_mape is not None and fit.loo_mape > MAX_MARGIN:
            entry["warning"] = (f"the latency model's leave-one-out error is "
                                f"{fit.loo_mape:.0%}: its predictions are rough")
        if predicted <= aim:
            entry["result"] = "kept: its own pruning is predicted to meet the budget"
        else:
            found = search_ratio(dense, example, v.round_to, start, fit.predict, aim)
            if found is None:
                entry["result"] = "no pruning is predicted to meet the budget: kept as is"
            else:
                ratio, macs = found
                out[i] = v.model_copy(update={"ratio": ratio, "macs_ratio": None})
                entry.update(result=f"ratio {ratio}: the least pruning predicted to meet "
                                    f"{budget:g} ms with a {margin:.0%} margin",
                             ratio=ratio, macs=macs,
                             predicted_ms=round(fit.predict(macs), 5))
        search[v.name] = entry
    info["search"] = search
    return Plan(out, info, model, host_is_target)
