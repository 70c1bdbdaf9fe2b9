"""The digits preparation pipeline: train, prune, fine-tune, export, measure, report.

:func:`prepare_digits` turns a freshly trained reference CNN into a set of variants (the
dense model and one structurally pruned model per ratio), exports each to ONNX, measures
them side by side and writes ``report.json`` plus ``workload.npz`` (the held-out test split)
into ``out_dir``. Every file is written atomically and ``report.json`` last, so an
interrupted run leaves either the previous consistent set or no report at all; a report
whose parameter hash and file hashes all match is reused without training again.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from prunefleet.shared.chunks import sha256_file
from prunefleet.shared.messages import Golden

from . import measure
from .atomic import atomic_path, atomic_write_text
from .data import Dataset, load_digits_splits
from .errors import PrepareError
from .export import INPUT_NAME, OUTPUT_NAME, export_onnx
from .models import digits_cnn
from .prune import channel_widths, prune_structured
from .train import FINETUNE, TrainConfig, accuracy, finetune, fit, recalibrate_batchnorm

log = logging.getLogger(__name__)

# Bump when a change to this pipeline changes what it produces: old reports stop matching.
PIPELINE_VERSION = 1
REPORT_FORMAT = "prunefleet.prepare.report/1"
REPORT_NAME = "report.json"
WORKLOAD_NAME = "workload.npz"

MODEL_WIDTHS = (32, 64, 128)
DENSE_TRAIN = TrainConfig(epochs=15, lr=3e-3, shift_prob=0.5, noise_prob=0.5, noise_std=0.5)
STRUCT_FINETUNE = replace(FINETUNE, shift_prob=0.5)
ROUND_TO = 8
IMPORTANCE = "magnitude"
PARITY_ATOL = 1e-3
GOLDEN_ATOL = 1e-3
LATENCY_WARMUP = 50
LATENCY_RUNS = 500
MAX_TORCH_THREADS = 2


@dataclass(frozen=True)
class PreparedVariant:
    """One exported variant and what it measured; the fields of its report entry + ``path``."""

    name: str
    technique: str  # "none" (dense) or "structured"
    ratio: float  # share of channels removed per layer; 0.0 for dense
    params: int
    macs: int
    onnx_bytes: int
    compressed_bytes: int  # zlib level 9
    latency_ms_p50: float  # ONNX Runtime, batch 1, one intra-op thread
    latency_ms_p95: float
    speedup: float  # dense p50 / this p50, measured in the same run
    accuracy: float  # test split, computed with ONNX Runtime
    top1_agreement: float  # share of test inputs where the top-1 class equals dense's
    max_abs_diff: float  # ONNX vs PyTorch logits on the validation split
    sha256: str
    file: str  # relative to the report's directory
    input_shape: list[int]
    num_classes: int
    channels: dict[str, int]  # output width of every conv/linear layer
    golden: dict[str, Any]  # prunefleet.shared.messages.Golden fields
    path: Path

    def to_report(self) -> dict[str, Any]:
        d = asdict(self)
        del d["path"]
        return d

    @classmethod
    def from_report(cls, entry: dict[str, Any], out_dir: Path) -> PreparedVariant:
        names = {f.name for f in fields(cls)} - {"path"}
        missing = names - entry.keys()
        if missing:
            raise PrepareError(f"report entry lacks {sorted(missing)}")
        return cls(**{k: entry[k] for k in names}, path=Path(out_dir) / entry["file"])

    def golden_spec(self) -> Golden:
        return Golden(**self.golden)

    def golden_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """The golden input (shaped ``input_shape``) and expected logits (``(1, classes)``)."""
        x = np.frombuffer(base64.b64decode(self.golden["input_b64"]), np.float32)
        y = np.frombuffer(base64.b64decode(self.golden["output_b64"]), np.float32)
        return x.reshape(self.input_shape), y.reshape(1, self.num_classes)


@dataclass(frozen=True)
class PreparedSet:
    out_dir: Path
    variants: list[PreparedVariant]
    workload_path: Path
    report_path: Path
    cached: bool = False  # True when an existing, verified report was returned as is
    report: dict[str, Any] = field(default_factory=dict, repr=False)

    def variant(self, name: str) -> PreparedVariant:
        for v in self.variants:
            if v.name == name:
                return v
        raise KeyError(name)

    @property
    def names(self) -> list[str]:
        return [v.name for v in self.variants]


# --------------------------------------------------------------------------- helpers


def variant_name(ratio: float) -> str:
    """``0.5 -> "struct50"``; ``0.125 -> "struct12.5"`` style names stay distinct."""
    pct = ratio * 100
    text = f"{pct:.0f}" if abs(pct - round(pct)) < 1e-9 else f"{pct:g}".replace(".", "_")
    return f"struct{text}"


def _derived_seed(seed: int, label: str) -> int:
    digest = hashlib.sha256(f"{seed}:{label}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def _b64(a: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(a, dtype=np.float32).tobytes()).decode()


@contextlib.contextmanager
def _torch_session(seed: int) -> Iterator[None]:
    """Few threads, seeded RNG; the caller's thread count and RNG state come back after."""
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(max(1, min(MAX_TORCH_THREADS, prev_threads)))
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            yield
    finally:
        torch.set_num_threads(prev_threads)


def _params(
    seed: int, epochs: int, finetune_epochs: int, ratios: Sequence[float]
) -> dict[str, Any]:
    return {
        "pipeline_version": PIPELINE_VERSION,
        "model": {"name": "digits_cnn", "widths": list(MODEL_WIDTHS)},
        "dataset": "sklearn.digits",
        "seed": seed,
        "epochs": epochs,
        "finetune_epochs": finetune_epochs,
        "ratios": [float(r) for r in ratios],
        "train": asdict(replace(DENSE_TRAIN, epochs=epochs)),
        "finetune": asdict(replace(STRUCT_FINETUNE, epochs=finetune_epochs)),
        "round_to": ROUND_TO,
        "importance": IMPORTANCE,
        "torch": torch.__version__.split("+")[0],
    }


def params_hash(params: dict[str, Any]) -> str:
    canon = json.dumps(params, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()


def _check_args(epochs: int, finetune_epochs: int, ratios: Sequence[float]) -> list[float]:
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}")
    if finetune_epochs < 0:
        raise ValueError(f"finetune_epochs must be 0 or more, got {finetune_epochs}")
    out = [float(r) for r in ratios]
    for r in out:
        if not 0.0 < r < 1.0:
            raise ValueError(f"pruning ratios must be in (0, 1), got {r}")
    names = [variant_name(r) for r in out]
    if len(set(names)) != len(names):
        raise ValueError(f"pruning ratios give duplicate variant names: {names}")
    return out


# --------------------------------------------------------------------------- cache


def load_report(out_dir: Path, expected_hash: str | None = None) -> PreparedSet | None:
    """The prepared set in ``out_dir`` if its report is intact, else ``None``.

    Intact means: the report parses, has the expected parameter hash (when given), and every
    file it names exists with the SHA-256 it records.
    """
    out_dir = Path(out_dir)
    report_path = out_dir / REPORT_NAME
    try:
        report = json.loads(report_path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        log.info("ignoring unreadable %s: %s", report_path, e)
        return None
    try:
        if report.get("format") != REPORT_FORMAT:
            log.info("ignoring %s: format %r", report_path, report.get("format"))
            return None
        if expected_hash is not None and report.get("params_hash") != expected_hash:
            log.info("%s was made with other parameters; preparing again", report_path)
            return None
        variants = [PreparedVariant.from_report(e, out_dir) for e in report["variants"]]
        workload = report["workload"]
        workload_path = out_dir / workload["file"]
        for path, digest in [(v.path, v.sha256) for v in variants] + [
            (workload_path, workload["sha256"])
        ]:
            if not path.is_file() or sha256_file(path) != digest:
                log.info("%s does not match %s; preparing again", path, report_path)
                return None
    except (KeyError, TypeError, PrepareError) as e:
        log.info("ignoring malformed %s: %s", report_path, e)
        return None
    return PreparedSet(out_dir, variants, workload_path, report_path, cached=True, report=report)


# --------------------------------------------------------------------------- stages


@dataclass
class _Candidate:
    name: str
    technique: str
    ratio: float
    model: nn.Module
    val_accuracy: float = 0.0
    train_s: float = 0.0


def _train_dense(data: Dataset, seed: int, epochs: int, progress: bool) -> _Candidate:
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    model = digits_cnn(MODEL_WIDTHS, data.num_classes)
    result = fit(
        model, data.train, data.val, replace(DENSE_TRAIN, epochs=epochs),
        seed=seed, progress=progress, desc="dense",
    )
    return _Candidate("dense", "none", 0.0, model, result.val_accuracy,
                      time.perf_counter() - t0)


def _structured(
    dense: nn.Module, data: Dataset, ratio: float, seed: int, finetune_epochs: int,
    progress: bool,
) -> _Candidate:
    t0 = time.perf_counter()
    name = variant_name(ratio)
    example = torch.from_numpy(data.val.x[:1])
    model = prune_structured(dense, example, ratio, round_to=ROUND_TO, importance=IMPORTANCE)
    if finetune_epochs > 0:
        result = finetune(
            model, data.train, data.val, replace(STRUCT_FINETUNE, epochs=finetune_epochs),
            seed=_derived_seed(seed, name), teacher=dense, progress=progress, desc=name,
        )
        val_acc = result.val_accuracy
    else:
        recalibrate_batchnorm(model, data.train.x)
        val_acc = accuracy(model, data.val)
    return _Candidate(name, "structured", ratio, model, val_acc, time.perf_counter() - t0)


def _pick_golden(logits: dict[str, np.ndarray], y: np.ndarray) -> int:
    """The test sample every variant classifies right with the widest top-1 margin."""
    worst_margin = np.full(len(y), np.inf)
    for out in logits.values():
        top2 = np.sort(out, axis=1)[:, -2:]
        margin = np.where(out.argmax(1) == y, top2[:, 1] - top2[:, 0], -np.inf)
        worst_margin = np.minimum(worst_margin, margin)
    return int(np.argmax(worst_margin))


def _write_workload(path: Path, data: Dataset) -> str:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, x=data.test.x.astype(np.float32), y=data.test.y.astype(np.int64))
    return sha256_file(path)


# --------------------------------------------------------------------------- entry point


def prepare_digits(
    out_dir: Path,
    *,
    seed: int = 0,
    epochs: int = 15,
    finetune_epochs: int = 5,
    ratios: Sequence[float] = (0.5, 0.75),
    progress: bool = True,
    force: bool = False,
) -> PreparedSet:
    """Train a small CNN on digits and prepare its dense and structurally pruned variants.

    Writes ``<name>.onnx`` per variant, ``workload.npz`` (the normalised test split, ``x``
    float32 ``(N, 1, 8, 8)`` and ``y`` int64) and ``report.json`` into ``out_dir``. Returns
    the existing set without training when ``report.json`` was made with the same
    parameters and all its files still match their hashes, unless ``force``.
    """
    out_dir = Path(out_dir)
    ratio_list = _check_args(epochs, finetune_epochs, ratios)
    params = _params(seed, epochs, finetune_epochs, ratio_list)
    phash = params_hash(params)
    if not force:
        cached = load_report(out_dir, phash)
        if cached is not None:
            log.info("using prepared variants in %s", out_dir)
            return cached

    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    with _torch_session(seed):
        data = load_digits_splits()
        dense = _train_dense(data, seed, epochs, progress)
        log.info("dense: val accuracy %.4f in %.1f s", dense.val_accuracy, dense.train_s)
        candidates = [dense]
        for r in ratio_list:
            cand = _structured(dense.model, data, r, seed, finetune_epochs, progress)
            log.info("%s: val accuracy %.4f in %.1f s", cand.name, cand.val_accuracy,
                     cand.train_s)
            candidates.append(cand)
        timings["train_s"] = time.perf_counter() - t_start

        # Export (parity-checked on the validation split) and measure.
        t0 = time.perf_counter()
        example = torch.from_numpy(data.val.x[:1])
        exported, sizes, sessions = {}, {}, {}
        for c in candidates:
            path = out_dir / f"{c.name}.onnx"
            exported[c.name] = export_onnx(
                c.model, path, check_inputs=data.val.x, atol=PARITY_ATOL,
                metadata={"prunefleet.variant": c.name, "prunefleet.technique": c.technique,
                          "prunefleet.params_hash": phash},
            )
            sizes[c.name] = measure.size_of(c.model, example, path)
            sessions[c.name] = measure.session(exported[c.name].onnx_bytes, threads=1)
        timings["export_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    test_logits = {k: measure.run_batched(s, data.test.x) for k, s in sessions.items()}
    dense_pred = test_logits["dense"].argmax(1)
    g = _pick_golden(test_logits, data.test.y)
    golden_x = data.test.x[g : g + 1]
    lat = measure.latency_many(sessions, golden_x, warmup=LATENCY_WARMUP, runs=LATENCY_RUNS)
    timings["measure_s"] = time.perf_counter() - t0

    input_shape = [1, *data.input_shape]
    variants = []
    for c in candidates:
        e, sz, lt = exported[c.name], sizes[c.name], lat[c.name]
        golden_y = sessions[c.name].run(None, {INPUT_NAME: golden_x})[0]
        golden = Golden(input_b64=_b64(golden_x), output_b64=_b64(golden_y), atol=GOLDEN_ATOL)
        pred = test_logits[c.name].argmax(1)
        variants.append(PreparedVariant(
            name=c.name,
            technique=c.technique,
            ratio=c.ratio,
            params=sz.params,
            macs=sz.macs,
            onnx_bytes=sz.onnx_bytes,
            compressed_bytes=sz.compressed_bytes,
            latency_ms_p50=round(lt.p50_ms, 5),
            latency_ms_p95=round(lt.p95_ms, 5),
            speedup=round(lat["dense"].p50_ms / lt.p50_ms, 4),
            accuracy=float((pred == data.test.y).mean()),
            top1_agreement=float((pred == dense_pred).mean()),
            max_abs_diff=e.parity.max_abs_diff,
            sha256=hashlib.sha256(e.onnx_bytes).hexdigest(),
            file=e.path.name,
            input_shape=input_shape,
            num_classes=data.num_classes,
            channels=channel_widths(c.model),
            golden=golden.model_dump(),
            path=e.path,
        ))

    workload_path = out_dir / WORKLOAD_NAME
    workload_sha = _write_workload(workload_path, data)
    timings["total_s"] = time.perf_counter() - t_start
    import onnxruntime
    import torch_pruning

    report = {
        "format": REPORT_FORMAT,
        "params_hash": phash,
        "params": params,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": {
            "torch": torch.__version__,
            "torch_pruning": torch_pruning.__version__,
            "onnxruntime": onnxruntime.__version__,
        },
        "dataset": data.describe(),
        "input_name": INPUT_NAME,
        "output_name": OUTPUT_NAME,
        "input_shape": input_shape,
        "num_classes": data.num_classes,
        "golden_index": g,
        "golden_label": int(data.test.y[g]),
        "workload": {"file": WORKLOAD_NAME, "sha256": workload_sha, "n": len(data.test)},
        "export": {
            "exporter": exported["dense"].exporter,
            "opset": exported["dense"].opset,
            "parity_inputs": "val",
            "parity_atol": PARITY_ATOL,
        },
        "latency": {
            "runtime": "onnxruntime",
            "provider": "CPUExecutionProvider",
            "intra_op_num_threads": 1,
            "batch": 1,
            "warmup": LATENCY_WARMUP,
            "runs": LATENCY_RUNS,
            "interleaved": True,
        },
        "training": {c.name: {"val_accuracy": c.val_accuracy, "seconds": round(c.train_s, 3)}
                     for c in candidates},
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "variants": [v.to_report() for v in variants],
    }
    report_path = out_dir / REPORT_NAME
    atomic_write_text(report_path, json.dumps(report, indent=2) + "\n")
    return PreparedSet(out_dir, variants, workload_path, report_path, cached=False, report=report)
