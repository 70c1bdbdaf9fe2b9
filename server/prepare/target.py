"""Preparing for a target: a device class's instruction set and latency, or this host.

* Channel rounding (``round_to = "auto"``): :func:`rounding_for` gives the multiple a
  class's instruction set favours (one FP32 SIMD register of channels: AVX-512 16, AVX2 8,
  NEON 4; the INT8 dot-product extensions 8). When the host is the target, the pipeline
  also times half, that and twice that on the host (:func:`pick_rounding`) and keeps the one
  whose measured speedup is the largest share of its ideal (MACs) speedup, the rule's
  choice on a tie: a bigger multiple rounds more channels away, so raw latency alone
  would always favour it.
* A latency model per class (:func:`fit_latency`): ``p95 ≈ a + b·MACs`` per family (FP32,
  INT8), least squares over the class's profiled variants, with its leave-one-out error.
  :func:`class_model_from_api` builds it from what ``GET /v1/classes`` and
  ``GET /v1/variants`` return; without fleet profiles the pipeline fits it on the host.
* :func:`macs_for_budget` inverts the model (the least pruning predicted to meet a
  latency budget); :func:`int8_verdict` keeps an INT8 variant only where it is faster
  than its FP32 twin, or where size is the goal; :func:`check_target` marks the budgets a
  variant misses.

Nothing here imports torch: the server side reads it too.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

# Best feature first, as agent/devicefacts.py names a class: <arch>-<tier>-<cores>c.
TIERS = ("amx", "avx512vnni", "avx512", "avxvnni", "avx2", "i8mm", "dotprod", "neon")
# FP32 lanes of the widest SIMD register the tier brings (ONNX Runtime's MLAS kernels
# block output channels by it); dot-product ARM cores run INT8 in blocks of 8 channels.
ROUNDING = {"amx": 16, "avx512vnni": 16, "avx512": 16, "avxvnni": 8, "avx2": 8,
            "i8mm": 8, "dotprod": 8, "neon": 4, "base": 4}
MIN_FIT_POINTS = 2  # a family needs this many profiled variants for a fitted line
MIN_IDEAL_SPEEDUP = 1.05  # a timed rounding that removed less than this is not a candidate
TIE_SHARE = 0.03  # efficiencies this close count as equal: the ISA rule's choice wins


def isa_tier(isa: Iterable[str]) -> str:
    have = set(isa)
    return next((t for t in TIERS if t in have), "base")


def tier_of_class(name: str) -> str | None:
    """The tier a derived class name carries (``x86_64-avx512vnni-8c``); None for a
    configured name that does not follow the pattern."""
    parts = name.split("-")
    for p in parts[1:]:
        if p in TIERS or p == "base":
            return p
    return None


def host_tier() -> str:
    from prunefleet.agent.devicefacts import read_facts

    return isa_tier(read_facts(ort_version="", providers=[]).isa)


def host_class() -> str:
    from prunefleet.agent.devicefacts import read_facts

    return read_facts(ort_version="", providers=[]).device_class


def rounding_for(tier: str) -> int:
    return ROUNDING.get(tier, 8)


def rounding_candidates(tier: str) -> list[int]:
    """What is timed on the host: the rule's choice first, then half and twice it."""
    r = rounding_for(tier)
    return [r, *([r // 2] if r >= 8 else []), r * 2]


def pick_rounding(measured: Mapping[int, tuple[float, float]], preferred: int) -> int:
    """The rounding whose measured speedup is the largest share of its ideal speedup.

    ``measured``: rounding → (measured speedup over dense, ideal speedup = dense MACs /
    MACs); a rounding that pruned (almost) nothing is left out. Shares within
    :data:`TIE_SHARE` of the best count as equal; among those the ``preferred`` one (the
    ISA rule's), else the smallest (it keeps the most channels).
    """
    # A multiple as wide as the layers prunes nothing: "efficient", and useless.
    pruning = {r: v for r, v in measured.items() if v[1] >= MIN_IDEAL_SPEEDUP}
    eff = {r: s / ideal for r, (s, ideal) in (pruning or measured).items() if ideal > 0}
    if not eff:
        return preferred
    best = max(eff.values())
    close = sorted(r for r, e in eff.items() if e >= best * (1 - TIE_SHARE))
    return preferred if preferred in close else close[0]


# --------------------------------------------------------------------------- latency model


@dataclass(frozen=True)
class LatencyFit:
    """``latency_ms ≈ a + b · MACs`` of one family, and how well it predicts."""

    family: str  # "fp32" or "int8"
    a: float
    b: float  # ms per MAC
    n: int
    loo_mae_ms: float | None  # leave-one-out mean absolute error (None below 3 points)
    loo_mape: float | None  # the same relative to the measured latency
    points: list[tuple[str, int, float]] = field(default_factory=list)  # name, MACs, ms

    def predict(self, macs: int | float) -> float:
        return self.a + self.b * float(macs)

    def macs_for(self, latency_ms: float) -> float | None:
        """The MACs at which the line reaches ``latency_ms`` (None: it never does)."""
        if self.b <= 0:
            return None
        return (latency_ms - self.a) / self.b

    def describe(self) -> dict[str, Any]:
        d = asdict(self)
        d["b_ms_per_mmac"] = self.b * 1e6
        d["points"] = [list(p) for p in self.points]
        return d


def _line(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """Least-squares ``y = a + b x``; through the origin scaled when x does not vary."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if n < 2 or sxx <= 0:
        return 0.0, (my / mx if mx else 0.0)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    return my - b * mx, b


def fit_latency(points: Sequence[tuple[str, int, float]], family: str = "fp32"
                ) -> LatencyFit | None:
    """Fit ``(name, MACs, latency_ms)`` points; None with fewer than two."""
    pts = [(n, int(m), float(y)) for n, m, y in points
           if m is not None and y is not None and math.isfinite(float(y))]
    if len(pts) < MIN_FIT_POINTS:
        return None
    xs, ys = [float(m) for _, m, _ in pts], [y for _, _, y in pts]
    a, b = _line(xs, ys)
    mae = mape = None
    if len(pts) >= 3:
        errs, rels = [], []
        for i in range(len(pts)):
            a_i, b_i = _line(xs[:i] + xs[i + 1:], ys[:i] + ys[i + 1:])
            err = abs(a_i + b_i * xs[i] - ys[i])
            errs.append(err)
            rels.append(err / ys[i] if ys[i] > 0 else 0.0)
        mae, mape = sum(errs) / len(errs), sum(rels) / len(rels)
    return LatencyFit(family, a, b, len(pts), mae, mape, pts)


def family_of(technique: str | None, quantize: str | None = None) -> str:
    """``"int8"`` for a quantized variant (``structured+int8``, ``int8``), else ``"fp32"``."""
    return "int8" if quantize == "int8" or "int8" in (technique or "") else "fp32"


@dataclass
class ClassModel:
    """A class's latency model: one fit per family, where its figures came from."""

    device_class: str
    tier: str | None
    source: str  # "fleet" (the class's profiles) or "host" (measured here)
    fits: dict[str, LatencyFit]
    devices: int = 0
    note: str | None = None

    def predict(self, macs: int, family: str) -> float | None:
        fit = self.fits.get(family)
        return None if fit is None else fit.predict(macs)

    def describe(self) -> dict[str, Any]:
        return {"device_class": self.device_class, "tier": self.tier, "source": self.source,
                "devices": self.devices, "note": self.note, "metric": "latency_ms_p95",
                "form": "a + b * MACs",
                "fits": {k: f.describe() for k, f in sorted(self.fits.items())}}


def class_model_from_api(device_class: str, classes: Mapping[str, Any],
                         variants: Sequence[Mapping[str, Any]]) -> ClassModel | None:
    """The class's model from ``GET /v1/classes`` (``{"classes": {...}}`` or its inner
    mapping) and ``GET /v1/variants`` (their MACs and technique); None when the class has
    no family with two profiled variants."""
    table = classes.get("classes", classes)
    cls = table.get(device_class)
    if not cls:
        return None
    by_sha = {v.get("sha256"): v for v in variants}
    per: dict[str, list[tuple[str, int, float]]] = {}
    for name, fig in (cls.get("variants") or {}).items():
        reg = by_sha.get(fig.get("sha256")) or next(
            (v for v in variants if v.get("name") == name), None)
        p95 = (fig.get("latency_ms_p95") or {}).get("median")
        if reg is None or p95 is None or reg.get("macs") is None:
            continue
        fam = family_of(reg.get("technique"), reg.get("quantize"))
        per.setdefault(fam, []).append((name, int(reg["macs"]), float(p95)))
    fits = {fam: f for fam, pts in per.items() if (f := fit_latency(pts, fam)) is not None}
    if not fits:
        return None
    return ClassModel(device_class, tier_of_class(device_class), "fleet", fits,
                      devices=int(cls.get("devices") or 0))


def macs_for_budget(model: ClassModel, budget_ms: float, family: str = "fp32"
                    ) -> float | None:
    fit = model.fits.get(family)
    return None if fit is None else fit.macs_for(budget_ms)


# --------------------------------------------------------------------------- verdicts


def int8_verdict(int8_ms: float | None, fp32_ms: float | None, goal: str, where: str
                 ) -> tuple[bool, str]:
    """Keep an INT8 variant? ``where`` says where the figures come from (for the reason)."""
    if int8_ms is None or fp32_ms is None:
        return True, f"no {where} latency to compare with its FP32 twin"
    if int8_ms < fp32_ms:
        return True, f"INT8 faster than its FP32 twin {where}: {int8_ms:.3f} vs {fp32_ms:.3f} ms"
    slower = (f"INT8 slower than its FP32 twin {where}: p95 {int8_ms:.3f} vs "
              f"{fp32_ms:.3f} ms")
    if goal == "size":
        return True, slower + "; kept: the target's goal is size"
    return False, slower


def check_target(target: Any, latency_ms: float | None, latency_from: str,
                 memory_mb: float | None, accuracy_drop_pp: float | None) -> dict[str, Any]:
    """Which of ``target``'s budgets (a :class:`~.recipe.TargetSpec`) a variant misses."""
    misses = []
    if target.latency_budget_ms is not None and latency_ms is not None \
            and latency_ms > target.latency_budget_ms:
        misses.append(f"p95 {latency_ms:.3f} ms ({latency_from}) over the "
                      f"{target.latency_budget_ms:g} ms budget")
    if target.memory_budget_mb is not None and memory_mb is not None \
            and memory_mb > target.memory_budget_mb:
        misses.append(f"session memory {memory_mb:.1f} MB over the "
                      f"{target.memory_budget_mb:g} MB budget")
    if target.max_accuracy_drop_pp is not None and accuracy_drop_pp is not None \
            and accuracy_drop_pp > target.max_accuracy_drop_pp:
        misses.append(f"accuracy {accuracy_drop_pp:.2f} points below dense (at most "
                      f"{target.max_accuracy_drop_pp:g})")
    return {"meets": not misses, "misses": misses, "latency_ms_p95": latency_ms,
            "latency_from": latency_from, "memory_mb": memory_mb,
            "accuracy_drop_pp": accuracy_drop_pp}
