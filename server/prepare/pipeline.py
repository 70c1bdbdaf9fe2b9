"""The preparation pipeline: recipe in, measured variants out.

:func:`prepare` checks the recipe (imports the factory, loads checkpoint and data, runs and
exports the model once) before any long work, trains the model when the recipe asks for it,
makes every variant (:mod:`.techniques`), exports each to ONNX with a parity check, quantizes
to INT8 where asked (:mod:`.quantize`), measures all of them side by side (latency
interleaved, one ONNX Runtime thread, batch 1) and writes ``report.json``, ``report.md``,
``report.png``, the ONNX files and ``workload.npz`` (the evaluation split, when there is
data) into the output directory.

Everything is built in a hidden staging directory inside the output directory and moved in
only when the whole set is done, ``report.json`` last: an interrupted run (Ctrl-C included)
leaves the previous set or nothing, never a half-written variant. A report whose parameter
hash and file hashes all match is reused without work unless ``force``.

:func:`prepare_digits` is the demo's recipe (a CNN trained on digits, structured 50% and 75%)
built in code.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from prunefleet.shared.chunks import sha256_file
from prunefleet.shared.fsutil import atomic_path, atomic_write, fsync_dir
from prunefleet.shared.messages import Golden

from . import measure
from .data import Dataset, Split, load_recipe_data
from .errors import OutputExistsError, PrepareError, RecipeError
from .export import INPUT_NAME, OUTPUT_NAME, export_onnx, to_onnx_bytes
from .plan import plan_variants
from .prune import channel_widths, weight_sparsity
from .quantize import FALLBACKS, quantize_checked
from .recipe import (
    STRUCTURAL,
    Recipe,
    TargetSpec,
    VariantSpec,
    build_model,
    file_digest,
    parse_recipe,
)
from .report import UNSTRUCTURED_NOTE, markdown, pareto_front, plot_png
from .target import ClassModel, check_target, family_of, int8_verdict
from .techniques import Context, generated_inputs, make_variant
from .train import TrainConfig, fit

log = logging.getLogger(__name__)

# Bump when a change to this pipeline changes what it produces: old reports stop matching.
# 3: INT8 with 7-bit weights, random calibration sample, fallbacks
# 4: session memory and host energy per variant, [target], round_to = "auto", --for-class
PIPELINE_VERSION = 4
REPORT_FORMAT = "prunefleet.prepare.report/2"
REPORT_NAME = "report.json"
REPORT_MD = "report.md"
REPORT_PNG = "report.png"
WORKLOAD_NAME = "workload.npz"
STAGE_PREFIX = ".prepare-"
GOLDEN_ATOL = 1e-3
# INT8 kernels differ between CPUs (VNNI or not, saturation): a device may round otherwise.
GOLDEN_INT8_REL = 0.02  # of the largest golden logit
GENERATED_INPUTS = 64  # parity / agreement inputs for a recipe without data
PARITY_MAX = 512  # inputs of the parity check at most


@dataclass(frozen=True)
class PreparedVariant:
    """One exported variant and what it measured; the fields of its report entry + ``path``."""

    name: str
    technique: str  # "none", "magnitude", "structured", "sensitivity", "random"
    ratio: float | None  # share of channels (or weights, magnitude) removed; 0.0 for dense
    macs_ratio: float | None  # share of dense MACs asked to keep, when the target was MACs
    quantize: str | None  # "int8" or None
    finetune_epochs: int
    distill: bool
    iterative_steps: int
    params: int
    nonzero_params: int
    sparsity: float  # share of conv/linear weights that are zero
    macs: int
    ideal_speedup: float  # dense MACs / these MACs
    onnx_bytes: int
    compressed_bytes: int  # zlib level 9
    latency_ms_p50: float  # ONNX Runtime, batch 1, one intra-op thread
    latency_ms_p95: float
    speedup: float  # dense p50 / this p50, measured in the same run
    accuracy: float | None  # evaluation split, computed with ONNX Runtime; None without data
    val_accuracy: float | None  # PyTorch, validation split, after fine-tuning
    top1_agreement: float  # share of evaluation inputs where the top-1 class equals dense's
    max_abs_diff: float  # ONNX vs PyTorch logits on the parity inputs
    max_abs_diff_fp32: float | None  # INT8 only: vs the FP32 ONNX model
    sha256: str
    file: str  # relative to the report's directory
    input_shape: list[int]
    num_classes: int
    channels: dict[str, int]  # output width of every conv/linear layer
    golden: dict[str, Any]  # prunefleet.shared.messages.Golden fields
    pareto: bool
    note: str | None
    details: dict[str, Any]  # technique specifics (sensitivity scan, layer ratios, ...)
    # What creating its ONNX Runtime session and one run added to a fresh process's RSS.
    memory_mb: float | None
    cpu_ms: float | None  # CPU time per inference on the preparing host
    energy_mj: float | None  # energy per inference on the preparing host
    energy_source: str | None  # rapl, hwmon, battery or cpu_time_estimate
    target: dict[str, Any] | None  # the [target] budgets it meets or misses
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
    workload_path: Path | None  # None without data
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
    """``0.5 -> "struct50"``; ``0.125 -> "struct12_5"`` style names stay distinct."""
    pct = ratio * 100
    text = f"{pct:.0f}" if abs(pct - round(pct)) < 1e-9 else f"{pct:g}".replace(".", "_")
    return f"struct{text}"


def _round(v: object, digits: int) -> float | None:
    return round(float(v), digits) if isinstance(v, int | float) else None


def _b64(a: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(a, dtype=np.float32).tobytes()).decode()


@contextlib.contextmanager
def _torch_session(seed: int, threads: int) -> Iterator[None]:
    """Few threads, seeded RNG; the caller's thread count and RNG state come back after."""
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(max(1, min(threads, os.cpu_count() or 1)))
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            yield
    finally:
        torch.set_num_threads(prev_threads)


def params_hash(params: dict[str, Any]) -> str:
    canon = json.dumps(params, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()


def _versions() -> dict[str, str]:
    import onnxruntime
    import torch_pruning

    return {"torch": torch.__version__, "torch_pruning": torch_pruning.__version__,
            "onnxruntime": onnxruntime.__version__}


def _with_dense(recipe: Recipe) -> list[VariantSpec]:
    """The recipe's variants, with a dense reference first when the recipe has none."""
    dense = recipe.dense_name()
    if any(v.name == dense for v in recipe.variant):
        return list(recipe.variant)
    return [VariantSpec(name=dense, technique="none"), *recipe.variant]


def _params(recipe: Recipe) -> dict[str, Any]:
    p: dict[str, Any] = {"pipeline_version": PIPELINE_VERSION, "recipe": recipe.canonical(),
                         "torch": torch.__version__.split("+")[0]}
    if recipe.model.checkpoint:
        path = recipe.resolve_path(recipe.model.checkpoint)
        if path.is_file():
            p["checkpoint_sha256"] = file_digest(path)
    if recipe.data and recipe.data.source.endswith(".npz"):
        path = recipe.resolve_path(recipe.data.source)
        if path.is_file():
            p["data_sha256"] = file_digest(path)
    return p


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
            log.info("%s was made with other parameters", report_path)
            return None
        variants = [PreparedVariant.from_report(e, out_dir) for e in report["variants"]]
        checks = [(v.path, v.sha256) for v in variants]
        workload = report.get("workload")
        workload_path = None
        if workload is not None:
            workload_path = out_dir / workload["file"]
            checks.append((workload_path, workload["sha256"]))
        for path, digest in checks:
            if not path.is_file() or sha256_file(path) != digest:
                log.info("%s does not match %s", path, report_path)
                return None
    except (KeyError, TypeError, PrepareError) as e:
        log.info("ignoring malformed %s: %s", report_path, e)
        return None
    return PreparedSet(out_dir, variants, workload_path, report_path, cached=True, report=report)


# --------------------------------------------------------------------------- checking


@dataclass
class Resolved:
    """A recipe whose model, data and export were tried: ready for the long work."""

    recipe: Recipe
    model: nn.Module
    data: Dataset | None
    example: torch.Tensor
    num_classes: int
    variants: list[VariantSpec]


def check_recipe(recipe: Recipe) -> Resolved:
    """Everything that can fail fast: factory, checkpoint, input shape, data, ONNX export."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.prepare.seed)  # the factory's initial weights are seeded
        model = build_model(recipe)
    shape = recipe.model.input_shape
    example = torch.zeros(shape)
    with torch.no_grad():
        num_classes = int(model(example).shape[1])
    data = None
    if recipe.data is not None:
        data = load_recipe_data(recipe.data.source, tuple(shape[1:]), recipe.base_dir)
        if data.num_classes > num_classes:
            raise RecipeError(f"data has {data.num_classes} classes, the model outputs "
                              f"{num_classes} logits")
    try:
        to_onnx_bytes(model, example)
    except PrepareError as e:
        raise RecipeError(f"the model does not export to ONNX: {e}") from e
    return Resolved(recipe, model, data, example, num_classes, _with_dense(recipe))


# --------------------------------------------------------------------------- the pipeline


def _stage(progress: bool, msg: str, *args: object) -> None:
    """One line per stage when no progress bar shows it (stderr is not a terminal)."""
    log.log(logging.DEBUG if progress else logging.INFO, msg, *args)


def _train_dense(res: Resolved, progress: bool) -> float | None:
    spec, data = res.recipe.train, res.data
    if spec is None or data is None:
        return None
    _stage(progress, "training the dense model: %d epochs on %d samples", spec.epochs,
           len(data.train))
    cfg = TrainConfig(epochs=spec.epochs, lr=spec.lr, batch_size=spec.batch_size,
                      noise_prob=spec.noise_prob, noise_std=spec.noise_std,
                      shift_prob=spec.shift_prob)
    result = fit(res.model, data.train, data.val, cfg, seed=res.recipe.prepare.seed,
                 progress=progress, desc="train dense")
    return result.val_accuracy


def _pick_golden(logits: dict[str, np.ndarray], y: np.ndarray | None, dense: str) -> int:
    """The input every variant classifies right (or like dense) with the widest margin."""
    target = y if y is not None else logits[dense].argmax(1)
    worst_margin = np.full(len(target), np.inf)
    for out in logits.values():
        top2 = np.sort(out, axis=1)[:, -2:]
        margin = np.where(out.argmax(1) == target, top2[:, 1] - top2[:, 0], -np.inf)
        worst_margin = np.minimum(worst_margin, margin)
    return int(np.argmax(worst_margin))


def _write_workload(path: Path, data: Dataset) -> str:
    split = data.eval_split
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, x=split.x.astype(np.float32), y=split.y.astype(np.int64))
    return sha256_file(path)


def _cap(split: Split, n: int) -> Split:
    return split if len(split) <= n else Split(split.x[:n], split.y[:n])


def calibration_sample(x: np.ndarray, n: int, seed: int) -> np.ndarray:
    """``n`` inputs (all when there are fewer) drawn at random from ``x``, seeded.

    A random sample rather than the first ``n``: a split sorted by class (or by anything)
    would calibrate the activation ranges on part of the distribution only.
    """
    if n >= len(x):
        return x
    idx = np.random.default_rng(seed).choice(len(x), size=n, replace=False)
    return x[np.sort(idx)]


@dataclass
class _Built:
    spec: VariantSpec
    model: nn.Module
    onnx: bytes
    max_abs_diff: float
    max_abs_diff_fp32: float | None
    info: dict[str, Any]
    seconds: float


def _remove_stale_stages(out_dir: Path) -> None:
    """Staging directories of runs that were killed outright (SIGKILL, power loss)."""
    for p in out_dir.glob(f"{STAGE_PREFIX}*"):
        try:
            pid = int(p.name[len(STAGE_PREFIX):].split("-", 1)[0])
            os.kill(pid, 0)  # signal 0: only asks whether the process exists
            alive = True
        except (ValueError, ProcessLookupError):
            alive = False
        except PermissionError:
            alive = True
        if not alive and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)


def _commit(stage: Path, out_dir: Path, names: list[str]) -> None:
    """Move the staged set into ``out_dir``; ``report.json`` goes last."""
    old = load_report(out_dir)
    old_files = {v.file for v in old.variants} if old else set()
    (out_dir / REPORT_NAME).unlink(missing_ok=True)  # no report while files are swapped
    for name in names:
        os.replace(stage / name, out_dir / name)
    for name in old_files - set(names):
        (out_dir / name).unlink(missing_ok=True)
    os.replace(stage / REPORT_NAME, out_dir / REPORT_NAME)
    fsync_dir(out_dir)
    shutil.rmtree(stage, ignore_errors=True)


def prepare(
    recipe: Recipe,
    out_dir: Path,
    *,
    force: bool = False,
    replace_other: bool = False,
    progress: bool = True,
    resolved: Resolved | None = None,
    for_class: str | None = None,
    class_model: ClassModel | None = None,
) -> PreparedSet:
    """Prepare, measure and write the variants a recipe asks for (see the module doc).

    Returns the existing set when ``out_dir`` holds a report of the same recipe whose files
    all match, unless ``force``. A report of another recipe is replaced only with ``force``
    or ``replace_other``; otherwise :class:`OutputExistsError`.

    ``for_class``: prepare for that device class (its instruction set, its latency);
    ``class_model`` is its latency model fitted on the fleet's profiles (:mod:`.target`),
    None to model and measure latency on this host.
    """
    out_dir = Path(out_dir)
    params = _params(recipe)
    if for_class is not None:
        params["for_class"] = {"name": for_class, "model": class_model.describe()
                               if class_model else None}
    phash = params_hash(params)
    if not force:
        cached = load_report(out_dir, phash)
        if cached is not None:
            log.info("using prepared variants in %s", out_dir)
            return cached
        if (out_dir / REPORT_NAME).exists() and not replace_other:
            raise OutputExistsError(f"{out_dir} holds variants of another recipe (or changed "
                                    "files); use --force to replace them")
    res = resolved or check_recipe(recipe)
    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_stages(out_dir)
    stage = Path(tempfile.mkdtemp(prefix=f"{STAGE_PREFIX}{os.getpid()}-", dir=out_dir))
    try:
        with _torch_session(recipe.prepare.seed, recipe.prepare.torch_threads):
            report = _run(res, stage, phash, params, progress, for_class, class_model)
        names = [v["file"] for v in report["variants"]] + [REPORT_MD, REPORT_PNG]
        if report.get("workload"):
            names.append(WORKLOAD_NAME)
        _commit(stage, out_dir, names)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    result = load_report(out_dir, phash)
    if result is None:
        raise PrepareError(f"{out_dir / REPORT_NAME} did not verify after writing")
    return PreparedSet(result.out_dir, result.variants, result.workload_path,
                       result.report_path, cached=False, report=result.report)


def _run(res: Resolved, stage: Path, phash: str, params: dict[str, Any], progress: bool,
         for_class: str | None = None, class_model: ClassModel | None = None
         ) -> dict[str, Any]:
    recipe, data, settings = res.recipe, res.data, res.recipe.prepare
    shape = recipe.model.input_shape
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    dense_val = _train_dense(res, progress)
    timings["train_s"] = time.perf_counter() - t_start
    dense_model = res.model.eval()

    if data is not None:
        parity_x = _cap(data.val, min(PARITY_MAX, recipe.data.max_eval)).x  # type: ignore[union-attr]
        eval_split = _cap(data.eval_split, recipe.data.max_eval)  # type: ignore[union-attr]
        eval_x, eval_y = eval_split.x, eval_split.y
        calib = calibration_sample(data.train.x, settings.calibration_samples, settings.seed)
    else:
        parity_x = generated_inputs(shape, GENERATED_INPUTS, settings.seed)
        eval_x, eval_y = parity_x, None
        calib = generated_inputs(shape, settings.calibration_samples, settings.seed + 1)

    ctx = Context(example=res.example, settings=settings, finetune=recipe.finetune, data=data,
                  progress=progress, seed=settings.seed,
                  dense_macs=measure.count_macs(dense_model, res.example))
    t0 = time.perf_counter()
    _stage(progress, "planning for the target (rounding, latency model)")
    plan = plan_variants(recipe, res.variants, dense_model, res.example, ctx.dense_macs,
                         for_class=for_class, class_model=class_model)
    timings["plan_s"] = time.perf_counter() - t0
    specs = plan.variants
    t0 = time.perf_counter()
    built: dict[str, _Built] = {}
    fp32_cache: dict[str, _Built] = {}
    twin_of: dict[str, str] = {}  # INT8 variant -> the key of its FP32 twin's session
    bar = tqdm(specs, desc="variants", unit="variant", disable=not progress,
               file=sys.stderr, dynamic_ncols=True)
    for i, spec in enumerate(bar, 1):
        bar.set_postfix_str(spec.name)
        _stage(progress, "variant %d of %d: %s (%s)", i, len(specs), spec.name,
               "+".join(t for t in (spec.technique, spec.quantize) if t and t != "none")
               or "none")
        ts = time.perf_counter()
        key = json.dumps(spec.model_dump(exclude={"name", "quantize"}), sort_keys=True)
        base = fp32_cache.get(key)
        if base is None:
            made = make_variant(dense_model, spec, ctx)
            exported = export_onnx(
                made.model, stage / f".{spec.name}.fp32.onnx", check_inputs=parity_x,
                atol=settings.parity_atol,
                metadata={"prunefleet.variant": spec.name,
                          "prunefleet.technique": spec.technique,
                          "prunefleet.params_hash": phash},
            )
            (stage / f".{spec.name}.fp32.onnx").unlink()
            base = _Built(spec, made.model, exported.onnx_bytes, exported.parity.max_abs_diff,
                          None, made.info, 0.0)
            fp32_cache[key] = base
        if spec.quantize == "int8":
            twin_of[spec.name] = key
            qr = quantize_checked(base.onnx, calib, parity_x, rel_tol=settings.int8_rel_tol,
                                  min_top1=settings.int8_min_top1,
                                  reduce_range=settings.int8_reduce_range)
            with torch.no_grad():
                ref = base.model(torch.from_numpy(parity_x)).numpy()
            vs_torch = float(np.abs(measure.run_batched(measure.session(qr.onnx), parity_x)
                                    - ref).max())
            b = _Built(spec, base.model, qr.onnx, vs_torch, qr.parity.max_abs_diff,
                       base.info | {"int8": qr.describe()}, 0.0)
        else:
            b = _Built(spec, base.model, base.onnx, base.max_abs_diff, None, base.info, 0.0)
        b.seconds = time.perf_counter() - ts
        atomic_write(stage / f"{spec.name}.onnx", b.onnx)
        built[spec.name] = b
        log.info("%s: made in %.1f s", spec.name, b.seconds)
    timings["variants_s"] = time.perf_counter() - t0

    # Measure all variants side by side.
    t0 = time.perf_counter()
    dense_name = recipe.dense_name()
    _stage(progress, "measuring %d variants side by side (accuracy, latency)", len(built))
    sessions = {n: measure.session(b.onnx, threads=1) for n, b in built.items()}
    logits = {n: measure.run_batched(s, eval_x) for n, s in sessions.items()}
    # Each INT8 variant's FP32 twin is timed with them: a variant of the recipe, else the
    # FP32 model it was quantized from, timed under a hidden name.
    fp32_by_key = {json.dumps(b.spec.model_dump(exclude={"name", "quantize"}),
                              sort_keys=True): n
                   for n, b in built.items() if b.spec.quantize is None}
    twin_name: dict[str, str] = {}
    for name, key in twin_of.items():
        if key not in fp32_by_key:
            fp32_by_key[key] = f".fp32-twin.{name}"
            sessions[fp32_by_key[key]] = measure.session(fp32_cache[key].onnx, threads=1)
        twin_name[name] = fp32_by_key[key]
    g = _pick_golden(logits, eval_y, dense_name)
    golden_x = eval_x[g : g + 1]
    lat = measure.latency_many(
        sessions, golden_x, warmup=settings.latency_warmup, runs=settings.latency_runs,
        rounds=settings.latency_rounds, progress=progress,
    )
    foot = {}
    for name in built:
        foot[name] = measure.footprint(stage / f"{name}.onnx", list(shape))
        if "error" in foot[name]:
            log.warning("%s: %s", name, foot[name]["error"])
    timings["measure_s"] = time.perf_counter() - t0
    dense_pred = logits[dense_name].argmax(1)
    dense_p50 = lat[dense_name].p50_ms
    target = recipe.target
    if target is None and for_class is not None:
        target = TargetSpec()
    # Latency against the target: the class's fleet model where there is one, else the host.
    cmodel = plan.model if plan.model is not None and plan.model.source == "fleet" else None
    dense_score = (float((logits[dense_name].argmax(1) == eval_y).mean())
                   if eval_y is not None else 1.0)

    entries = []
    dropped = []
    for name, b in built.items():
        spec, model = b.spec, b.model
        macs = measure.count_macs(model, res.example)
        params_n = measure.count_params(model)
        zeros = sum(int((p.detach() == 0).sum()) for p in model.parameters())
        golden_y = sessions[name].run(None, {INPUT_NAME: golden_x})[0]
        pred = logits[name].argmax(1)
        notes = [UNSTRUCTURED_NOTE] if spec.technique == "magnitude" else []
        if b.info.get("kept_whole"):
            notes.append("Left whole: " + "; ".join(
                f"{k['layer']} ({k['reason']})" for k in b.info["kept_whole"]) + ".")
        int8 = b.info.get("int8")
        if int8 and int8["fallback"]:
            missed = int8["attempts"][0]
            notes.append(f"INT8 fallback: {int8['fallback']} (MinMax calibration missed "
                         f"parity: top-1 agreement {missed.get('top1_agreement', 'n/a')}).")
        keep_why = None
        if spec.quantize == "int8":
            twin = twin_name[name]
            goal = target.goal if target else "latency"
            if cmodel is not None and {"int8", "fp32"} <= cmodel.fits.keys():
                # The twin has the same channels, hence the same MACs.
                keep, why = int8_verdict(cmodel.predict(macs, "int8"),
                                         cmodel.predict(macs, "fp32"), goal,
                                         f"predicted for class {cmodel.device_class}")
            else:
                keep, why = int8_verdict(lat[name].p50_ms, lat[twin].p50_ms, goal,
                                         "on this host (p50)")
            if not keep and target is not None:
                dropped.append({"name": name, "reason": why})
                (stage / f"{name}.onnx").unlink(missing_ok=True)
                continue
            keep_why = why
            if not keep:  # no [target]: kept as the recipe asks, with the reason
                notes.append(why + ".")
        predicted = (cmodel.predict(macs, family_of(spec.technique, spec.quantize))
                     if cmodel is not None else None)
        fp = foot[name]
        score = (float((pred == eval_y).mean()) if eval_y is not None
                 else float((pred == dense_pred).mean()))
        verdict = None
        if target is not None:
            verdict = check_target(
                target,
                round(predicted, 5) if predicted is not None else round(lat[name].p95_ms, 5),
                f"predicted for class {cmodel.device_class}" if cmodel is not None
                else "measured on this host", fp.get("memory_mb"),  # type: ignore[arg-type]
                round(100 * (dense_score - score), 3))
            if keep_why:
                verdict["int8"] = keep_why
            if spec.name in plan.info.get("search", {}):
                verdict["search"] = plan.info["search"][spec.name]
            if not verdict["meets"]:
                notes.append("Misses the target: " + "; ".join(verdict["misses"]) + ".")
        note = " ".join(notes) or None
        entries.append({
            "name": name,
            "technique": spec.technique,
            "ratio": 0.0 if spec.technique == "none" else spec.ratio,
            "macs_ratio": spec.macs_ratio,
            "quantize": spec.quantize,
            "finetune_epochs": spec.finetune_epochs,
            "distill": spec.distill,
            "iterative_steps": spec.iterative_steps,
            "params": params_n,
            "nonzero_params": params_n - zeros,
            "sparsity": round(weight_sparsity(model), 6),
            "macs": macs,
            "ideal_speedup": round(ctx.dense_macs / macs, 4) if macs else None,
            "onnx_bytes": len(b.onnx),
            "compressed_bytes": measure.compressed_size(b.onnx),
            "latency_ms_p50": round(lat[name].p50_ms, 5),
            "latency_ms_p95": round(lat[name].p95_ms, 5),
            "speedup": round(dense_p50 / lat[name].p50_ms, 4),
            "accuracy": None if eval_y is None else float((pred == eval_y).mean()),
            "val_accuracy": (b.info.get("val_accuracy") if spec.technique != "none"
                             else (b.info.get("val_accuracy") or dense_val)),
            "top1_agreement": float((pred == dense_pred).mean()),
            "max_abs_diff": b.max_abs_diff,
            "max_abs_diff_fp32": b.max_abs_diff_fp32,
            "sha256": hashlib.sha256(b.onnx).hexdigest(),
            "file": f"{name}.onnx",
            "input_shape": list(shape),
            "num_classes": res.num_classes,
            "channels": channel_widths(model),
            "golden": Golden(
                input_b64=_b64(golden_x), output_b64=_b64(golden_y),
                atol=GOLDEN_ATOL if spec.quantize is None else max(
                    GOLDEN_ATOL, GOLDEN_INT8_REL * float(np.abs(golden_y).max())),
            ).model_dump(),
            "pareto": False,
            "note": note,
            "details": {k: v for k, v in b.info.items() if k != "val_accuracy"}
                       | {"seconds": round(b.seconds, 3)}
                       | ({"round_to": spec.round_to} if spec.technique in STRUCTURAL
                          else {}),
            "memory_mb": _round(fp.get("memory_mb"), 3),
            "cpu_ms": _round(fp.get("cpu_ms"), 6),
            "energy_mj": _round(fp.get("energy_mj"), 6),
            "energy_source": fp.get("energy_source"),
            "target": verdict,
        })
    metric = "accuracy" if eval_y is not None else "top1_agreement"
    front = pareto_front([(e["name"], e["latency_ms_p50"], e[metric]) for e in entries])
    for e in entries:
        e["pareto"] = e["name"] in front

    workload = None
    if data is not None:
        sha = _write_workload(stage / WORKLOAD_NAME, data)
        workload = {"file": WORKLOAD_NAME, "sha256": sha, "n": len(data.eval_split),
                    "split": "test" if len(data.test) else "val"}
    timings["total_s"] = time.perf_counter() - t_start
    exporter = "torchscript"
    report = {
        "format": REPORT_FORMAT,
        "params_hash": phash,
        "params": params,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": _versions(),
        "model": recipe.model.model_dump(mode="json"),
        "dataset": data.describe() if data is not None else None,
        "input_name": INPUT_NAME,
        "output_name": OUTPUT_NAME,
        "input_shape": list(shape),
        "num_classes": res.num_classes,
        "dense": dense_name,
        "dense_macs": ctx.dense_macs,
        "golden_index": g,
        "golden_label": int(eval_y[g]) if eval_y is not None else None,
        "workload": workload,
        "export": {"exporter": exporter, "parity_inputs": "val" if data else "generated",
                   "parity_atol": settings.parity_atol,
                   "int8": {"format": "QDQ", "per_channel": True, "activations": "uint8",
                            "weights": "int8", "reduce_range": settings.int8_reduce_range,
                            "calibration": "MinMax",
                            "fallbacks": [c.method + (" + fp32 classifier" if c.fp32_head
                                                      else "") for c in FALLBACKS],
                            "calibration_samples": len(calib),
                            "calibration_inputs": ("train (seeded random sample)" if data
                                                   else "generated"),
                            "checked_against": "fp32 onnx",
                            "rel_tol": settings.int8_rel_tol,
                            "min_top1": settings.int8_min_top1}},
        "latency": {"runtime": "onnxruntime", "provider": "CPUExecutionProvider",
                    "intra_op_num_threads": 1, "batch": 1, "warmup": settings.latency_warmup,
                    "runs": settings.latency_runs, "rounds": settings.latency_rounds,
                    "interleaved": True},
        "pareto_metric": metric,
        "pareto": front,
        "target": None if target is None and not plan.info.get("round_to") else {
            **(target.model_dump() if target else {}), **plan.info,
            "latency_source": (f"fleet profiles of class {cmodel.device_class}"
                               if cmodel is not None else "measured on this host"),
            "dropped": dropped},
        "footprint": {"memory": "RSS added by creating the session and one run, in a "
                                "child process", "energy": "per inference on this host"},
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "variants": entries,
    }
    _stage(progress, "writing the report (report.json, report.md, report.png)")
    atomic_write(stage / REPORT_PNG, plot_png(report))
    atomic_write(stage / REPORT_MD, markdown(report, REPORT_PNG).encode())
    atomic_write(stage / REPORT_NAME, (json.dumps(report, indent=2) + "\n").encode())
    return report


# --------------------------------------------------------------------------- digits (demo)


def digits_recipe(
    *, seed: int = 0, epochs: int = 15, finetune_epochs: int = 5,
    ratios: Sequence[float] = (0.5, 0.75),
) -> Recipe:
    """The demo's recipe: a 3-conv CNN trained on digits, structured variants with KD."""
    variants: list[dict[str, Any]] = [{"name": "dense", "technique": "none"}]
    for r in ratios:
        variants.append({"name": variant_name(r), "technique": "structured", "ratio": r,
                         "finetune_epochs": finetune_epochs, "distill": finetune_epochs > 0})
    return parse_recipe({
        "model": {"factory": "prunefleet.server.prepare.models:digits_cnn",
                  "input_shape": [1, 1, 8, 8]},
        "data": {"source": "digits"},
        "train": {"epochs": epochs, "lr": 3e-3, "noise_prob": 0.5, "noise_std": 0.5,
                  "shift_prob": 0.5},
        "finetune": {"lr": 1e-2, "noise_prob": 0.5, "noise_std": 0.5, "shift_prob": 0.5},
        "prepare": {"seed": seed, "latency_warmup": 50, "latency_runs": 500},
        "variant": variants,
    }, source="digits recipe")


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
    ratio_list = _check_args(epochs, finetune_epochs, ratios)
    recipe = digits_recipe(seed=seed, epochs=epochs, finetune_epochs=finetune_epochs,
                           ratios=ratio_list)
    return prepare(recipe, Path(out_dir), force=force, replace_other=True, progress=progress)
