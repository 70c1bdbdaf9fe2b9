"""ONNX Runtime static INT8 quantization (QDQ, per channel) with calibration data.

Static quantization runs the FP32 model over calibration inputs, records the range of every
activation and writes a QDQ model: ONNX Runtime fuses the QuantizeLinear / DequantizeLinear
pairs around convolutions into integer kernels. Activations are ``uint8`` and weights
``int8`` (per output channel), the combination ONNX Runtime's x86 kernels run fastest
(``int8`` activations ran 3x slower here). Dynamic quantization is not offered: on
convolutions it was slower than FP32 on the CPU.

Weights are quantized to 7 bits by default (``reduce_range``). On x86 CPUs without VNNI
(AVX2, AVX-512 without VNNI) ONNX Runtime's ``uint8 x int8`` kernels multiply with
``VPMADDUBSW``, which adds two ``u8 x s8`` products into a *saturating* 16-bit integer:
255 x 127 x 2 = 64,770 does not fit, and a full-range weight next to a large activation
silently clips. Measured on an AVX2 EPYC: a branchy digits net whose first convolution sees
all its inputs clip agreed with its FP32 model on 82% of the inputs; the same QDQ model run
without the integer kernels agreed on 98%, and with 7-bit weights (255 x 64 x 2 = 32,640:
no saturation possible) on 98% again. A variant runs on devices the preparing host is not,
so the model must be right on every CPU, not only on this one (a VNNI host never shows the
fault).

:func:`quantize_checked` quantizes and checks the result against the FP32 ONNX model (not
PyTorch: INT8 rounding makes a tight tolerance meaningless), with a tolerance relative to the
size of the logits and a minimum top-1 agreement. When MinMax calibration misses, it tries
the fallbacks in :data:`FALLBACKS` (Percentile, Entropy, then the classifier kept in FP32)
and returns which one passed; :class:`ParityError` with every attempt when none does. Each
check also runs the QDQ model with ONNX Runtime's graph optimisations off (the model's own
arithmetic, no integer kernels): when that agrees and the kernels do not, the kernels
saturate, and the message says so.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import onnxruntime as ort

from .errors import ParityError, PrepareError
from .export import INPUT_NAME, inline_constant_identities, onnx_logits

log = logging.getLogger(__name__)

CALIBRATION_BATCH = 16
Method = Literal["minmax", "percentile", "entropy"]
METHODS: tuple[Method, ...] = ("minmax", "percentile", "entropy")
HEAD_OPS = ("Gemm", "MatMul")
KERNEL_GAP_WARN = 0.01  # of the largest logit
# Nodes a classifier's output passes through on its way to the graph output.
_PASS_THROUGH = {"Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Cast",
                 "Add", "Mul", "Div", "Softmax", "LogSoftmax", "Transpose"}


@dataclass(frozen=True)
class Int8Config:
    """How one INT8 model is made: calibration method, 7-bit weights, classifier in FP32."""

    method: Method = "minmax"
    reduce_range: bool = True
    fp32_head: bool = False

    @property
    def label(self) -> str:
        parts: list[str] = [self.method]
        if self.fp32_head:
            parts.append("fp32 classifier")
        parts.append("7-bit weights" if self.reduce_range else "8-bit weights")
        return ", ".join(parts)


# Tried in order after the first configuration misses parity.
FALLBACKS: tuple[Int8Config, ...] = (
    Int8Config("percentile"),
    Int8Config("entropy"),
    Int8Config("minmax", fp32_head=True),
    Int8Config("percentile", fp32_head=True),
)


@dataclass(frozen=True)
class Int8Parity:
    """INT8 vs FP32 ONNX on the check inputs."""

    max_abs_diff: float
    rel_diff: float  # max_abs_diff / largest |FP32 logit|
    top1_agreement: float
    n: int
    # The same QDQ model with graph optimisations off: its own arithmetic, no integer kernels.
    reference_top1: float | None = None
    reference_rel_diff: float | None = None
    # Largest |kernels - reference| / largest |FP32 logit|: ~0 unless the kernels saturate.
    kernel_gap: float | None = None

    def passes(self, rel_tol: float, min_top1: float) -> bool:
        return bool(np.isfinite(self.max_abs_diff)) and self.rel_diff <= rel_tol \
            and self.top1_agreement >= min_top1

    def kernels_saturate(self, rel_tol: float, min_top1: float) -> bool:
        """The model's arithmetic agrees with FP32, this CPU's integer kernels do not."""
        if self.reference_top1 is None or self.reference_rel_diff is None:
            return False
        return (not self.passes(rel_tol, min_top1) and self.reference_top1 >= min_top1
                and self.reference_rel_diff <= rel_tol)


@dataclass(frozen=True)
class Int8Result:
    onnx: bytes
    parity: Int8Parity
    config: Int8Config
    fp32_nodes: tuple[str, ...]  # nodes left in FP32 (the classifier, when asked)
    calibration_samples: int
    attempts: tuple[dict[str, Any], ...]  # every configuration tried, in order

    @property
    def fallback(self) -> str | None:
        """``None`` when the first configuration passed, else the one that did."""
        return self.config.label if len(self.attempts) > 1 else None

    def describe(self) -> dict[str, Any]:
        """What the report says about this INT8 model."""
        return {"calibration": self.config.method, "reduce_range": self.config.reduce_range,
                "fp32_nodes": list(self.fp32_nodes),
                "calibration_samples": self.calibration_samples,
                "fallback": self.fallback,
                "top1_agreement": round(self.parity.top1_agreement, 5),
                "rel_diff": round(self.parity.rel_diff, 5),
                "reference_top1": _round(self.parity.reference_top1),
                "kernel_gap": _round(self.parity.kernel_gap),
                "attempts": list(self.attempts)}


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 5)


@contextlib.contextmanager
def _quiet_quantizer():
    """The quantizer logs advice on the root logger (pre-processing, bias initializers)."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def head_nodes(model: onnx.ModelProto) -> list[str]:
    """The Gemm/MatMul nodes that compute the graph's outputs (the classifier), if any.

    Walks back from each graph output through reshapes, casts, additions and the like to the
    first Gemm or MatMul.
    """
    producer = {o: n for n in model.graph.node for o in n.output}
    inits = {i.name for i in model.graph.initializer}
    found: list[str] = []
    for out in model.graph.output:
        stack, seen = [out.name], set()
        while stack:
            name = stack.pop()
            node = producer.get(name)
            if node is None or name in seen:
                continue
            seen.add(name)
            if node.op_type in HEAD_OPS:
                if node.name and node.name not in found:
                    found.append(node.name)
            elif node.op_type in _PASS_THROUGH:
                stack.extend(i for i in node.input if i and i not in inits)
    return found


def _calibration_batches(calib: np.ndarray, method: Method) -> list[np.ndarray]:
    """Batches of CALIBRATION_BATCH. Histogram calibrators (percentile, entropy) stack the
    batches of each tensor and need them of one size: their remainder is dropped."""
    n = len(calib)
    if method != "minmax" and n > CALIBRATION_BATCH:
        n -= n % CALIBRATION_BATCH
    return [calib[i : min(i + CALIBRATION_BATCH, n)] for i in range(0, n, CALIBRATION_BATCH)]


def _quantize(
    fp32_onnx: bytes, calibration: np.ndarray, config: Int8Config, input_name: str
) -> tuple[bytes, tuple[str, ...], int]:
    """(INT8 model, nodes left in FP32, calibration inputs used)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    calib = np.ascontiguousarray(calibration, dtype=np.float32)
    if len(calib) == 0:
        raise PrepareError("INT8 quantization needs at least one calibration input")
    batches = _calibration_batches(calib, config.method)
    method = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
              "entropy": CalibrationMethod.Entropy}[config.method]

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches = iter([{input_name: b} for b in batches])

        def get_next(self):
            return next(self._batches, None)

    proto = inline_constant_identities(onnx.load_from_string(fp32_onnx))
    with tempfile.TemporaryDirectory(prefix="prunefleet-int8-") as tmp, _quiet_quantizer():
        src, pre, dst = (Path(tmp) / n for n in ("fp32.onnx", "pre.onnx", "int8.onnx"))
        onnx.save(proto, src)
        pre_error: Exception | None = None
        try:
            quant_pre_process(str(src), str(pre))
        except Exception as e:  # pre-processing is an optimisation; quantize the plain model
            pre, pre_error = src, e
        # Node names of the model that is quantized (pre-processing may rename).
        exclude = tuple(head_nodes(onnx.load(str(pre)))) if config.fp32_head else ()
        if config.fp32_head and not exclude:
            raise PrepareError("the model has no Gemm/MatMul classifier to keep in FP32")
        try:
            quantize_static(
                str(pre), str(dst), _Reader(),
                quant_format=QuantFormat.QDQ, per_channel=True,
                reduce_range=config.reduce_range,
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                calibrate_method=method, nodes_to_exclude=list(exclude),
            )
        except Exception as e:
            raise PrepareError(f"INT8 quantization ({config.label}) failed: {e}") from e
        data = dst.read_bytes()
    if pre_error is not None:  # logged here: the quantizer's quiet block hides warnings
        log.warning("INT8 pre-processing skipped (%s: %s); quantized the plain model",
                    type(pre_error).__name__, pre_error)
    return data, exclude, sum(len(b) for b in batches)


def quantize_int8(
    fp32_onnx: bytes,
    calibration: np.ndarray,
    *,
    method: Method = "minmax",
    reduce_range: bool = True,
    fp32_head: bool = False,
    input_name: str = INPUT_NAME,
) -> bytes:
    """Static INT8 (QDQ, per channel) of a model, calibrated over ``calibration``.

    ``reduce_range`` quantizes weights to 7 bits (see the module doc: without it the
    ``u8 x s8`` kernels of x86 CPUs without VNNI saturate); ``fp32_head`` leaves the
    classifier (the last Gemm/MatMul) in FP32.
    """
    return _quantize(fp32_onnx, calibration, Int8Config(method, reduce_range, fp32_head),
                     input_name)[0]


def _reference_logits(int8_onnx: bytes, x: np.ndarray) -> np.ndarray:
    """The QDQ model evaluated as written: no fusion into integer kernels."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(int8_onnx, opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i : i + 256]})[0]
                           for i in range(0, len(x), 256)])


def measure_int8(
    int8_onnx: bytes, fp32_onnx: bytes, x: np.ndarray, *, reference: bool = True
) -> Int8Parity:
    """INT8 vs FP32 ONNX Runtime outputs on ``x`` (and the QDQ reference, when asked)."""
    try:
        ref = onnx_logits(fp32_onnx, x)
        got = onnx_logits(int8_onnx, x)
        emu = _reference_logits(int8_onnx, x) if reference else None
    except Exception as e:
        raise ParityError(f"ONNX Runtime could not run the INT8 model: {e}") from e
    if got.shape != ref.shape:
        raise ParityError(f"INT8 output shape {got.shape} differs from FP32 {ref.shape}")
    scale = float(np.abs(ref).max()) or 1.0
    diff = float(np.abs(got - ref).max())
    top1 = float((got.argmax(1) == ref.argmax(1)).mean())
    ref_top1 = ref_rel = gap = None
    if emu is not None:
        ref_top1 = float((emu.argmax(1) == ref.argmax(1)).mean())
        ref_rel = float(np.abs(emu - ref).max()) / scale
        gap = float(np.abs(got - emu).max()) / scale
    return Int8Parity(diff, diff / scale, top1, len(x), ref_top1, ref_rel, gap)


def _verdict(p: Int8Parity, rel_tol: float, min_top1: float) -> str:
    text = (f"max_abs_diff={p.max_abs_diff:.3g} ({p.rel_diff:.1%} of the largest logit, "
            f"allowed {rel_tol:.0%}), top1_agreement={p.top1_agreement:.4f} "
            f"(required {min_top1:g})")
    if p.reference_top1 is not None:
        text += f", without integer kernels {p.reference_top1:.4f}"
    if p.kernels_saturate(rel_tol, min_top1):
        text += (" (this CPU's integer kernels saturate: quantize with 7-bit weights, "
                 "int8_reduce_range = true)")
    return text


def check_int8(
    int8_onnx: bytes, fp32_onnx: bytes, x: np.ndarray, *, rel_tol: float, min_top1: float
) -> Int8Parity:
    """Compare INT8 with FP32 ONNX Runtime outputs; raise :class:`ParityError` when apart."""
    parity = measure_int8(int8_onnx, fp32_onnx, x)
    if not parity.passes(rel_tol, min_top1):
        raise ParityError(f"INT8 model disagrees with FP32 on {len(x)} inputs: "
                          + _verdict(parity, rel_tol, min_top1))
    return parity


def quantize_checked(
    fp32_onnx: bytes,
    calibration: np.ndarray,
    check_inputs: np.ndarray,
    *,
    rel_tol: float,
    min_top1: float,
    reduce_range: bool = True,
    fallbacks: Sequence[Int8Config] = FALLBACKS,
    input_name: str = INPUT_NAME,
) -> Int8Result:
    """Quantize with MinMax calibration; on a parity miss try ``fallbacks`` in order.

    Every configuration uses ``reduce_range`` unless an attempt shows this CPU's kernels
    saturating with 8-bit weights: then the rest (starting with the one that missed) use
    7-bit weights. Raises :class:`ParityError` listing every attempt when none passes.
    """
    todo = [Int8Config("minmax", reduce_range), *(replace(c, reduce_range=reduce_range)
                                                  for c in fallbacks)]
    attempts: list[dict[str, Any]] = []
    done: set[Int8Config] = set()
    has_head = True
    while todo:
        config = todo.pop(0)
        if config in done or (config.fp32_head and not has_head):
            continue
        done.add(config)
        record: dict[str, Any] = {"config": config.label, **asdict(config)}
        try:
            data, fp32_nodes, used = _quantize(fp32_onnx, calibration, config, input_name)
        except PrepareError as e:
            if config.fp32_head and "no Gemm/MatMul" in str(e):
                has_head = False
                continue
            attempts.append(record | {"error": str(e)})
            log.warning("INT8 %s: %s", config.label, e)
            continue
        parity = measure_int8(data, fp32_onnx, check_inputs)
        ok = parity.passes(rel_tol, min_top1)
        attempts.append(record | {
            "calibration_samples": used, "top1_agreement": round(parity.top1_agreement, 5),
            "rel_diff": round(parity.rel_diff, 5), "reference_top1": _round(parity.reference_top1),
            "kernel_gap": _round(parity.kernel_gap), "passed": ok})
        if ok:
            if (parity.kernel_gap or 0.0) > KERNEL_GAP_WARN:
                log.warning("INT8 %s: this CPU's integer kernels differ from the model's own "
                            "arithmetic by %.1f%% of the largest logit (saturation); other "
                            "CPUs will answer otherwise", config.label,
                            100 * (parity.kernel_gap or 0.0))
            if len(attempts) > 1:
                log.info("INT8: %s missed parity; %s passed", attempts[0]["config"],
                         config.label)
            return Int8Result(data, parity, config, fp32_nodes, used, tuple(attempts))
        log.info("INT8 %s missed parity: %s", config.label, _verdict(parity, rel_tol, min_top1))
        if not config.reduce_range and parity.kernels_saturate(rel_tol, min_top1):
            todo = [replace(c, reduce_range=True) for c in (config, *todo)]
    tried = "; ".join(
        f"{a['config']}: " + (a["error"] if "error" in a else
                              f"top1_agreement={a['top1_agreement']:.4f}, "
                              f"rel_diff={a['rel_diff']:.1%}")
        for a in attempts)
    raise ParityError(f"INT8 model disagrees with FP32 on {len(check_inputs)} inputs with every "
                      f"calibration tried (required top-1 agreement {min_top1:g}, relative "
                      f"difference {rel_tol:.0%}): {tried}")
