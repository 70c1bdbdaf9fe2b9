"""ONNX Runtime static INT8 quantization (QDQ, per channel) with calibration data.

Static quantization runs the FP32 model over calibration inputs, records the range of every
activation (MinMax) and writes a QDQ model: ONNX Runtime fuses the QuantizeLinear /
DequantizeLinear pairs around convolutions into integer kernels. Activations are ``uint8``
and weights ``int8`` (per output channel), the combination ONNX Runtime's x86 kernels run
fastest (``int8`` activations ran 3x slower here). Dynamic quantization is not offered: on
convolutions it was slower than FP32 on the CPU.

The result is checked against the FP32 ONNX model (not PyTorch: INT8 rounding makes a tight
tolerance meaningless) with a tolerance relative to the size of the logits and a minimum
top-1 agreement; :class:`ParityError` when it is not met.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from .errors import ParityError, PrepareError
from .export import INPUT_NAME, inline_constant_identities, onnx_logits

CALIBRATION_BATCH = 16


@dataclass(frozen=True)
class Int8Parity:
    """INT8 vs FP32 ONNX on the check inputs."""

    max_abs_diff: float
    rel_diff: float  # max_abs_diff / largest |FP32 logit|
    top1_agreement: float
    n: int


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


def quantize_int8(
    fp32_onnx: bytes, calibration: np.ndarray, *, input_name: str = INPUT_NAME
) -> bytes:
    """Static INT8 (QDQ, per channel, MinMax calibration over ``calibration``) of a model."""
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

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches = iter(
                [{input_name: calib[i : i + CALIBRATION_BATCH]}
                 for i in range(0, len(calib), CALIBRATION_BATCH)]
            )

        def get_next(self):
            return next(self._batches, None)

    proto = inline_constant_identities(onnx.load_from_string(fp32_onnx))
    with tempfile.TemporaryDirectory(prefix="prunefleet-int8-") as tmp, _quiet_quantizer():
        src, pre, dst = (Path(tmp) / n for n in ("fp32.onnx", "pre.onnx", "int8.onnx"))
        onnx.save(proto, src)
        try:
            quant_pre_process(str(src), str(pre))
        except Exception:  # pre-processing is an optimisation; quantize the plain model
            pre = src
        try:
            quantize_static(
                str(pre), str(dst), _Reader(),
                quant_format=QuantFormat.QDQ, per_channel=True,
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
            )
        except Exception as e:
            raise PrepareError(f"INT8 quantization failed: {e}") from e
        return dst.read_bytes()


def check_int8(
    int8_onnx: bytes, fp32_onnx: bytes, x: np.ndarray, *, rel_tol: float, min_top1: float
) -> Int8Parity:
    """Compare INT8 with FP32 ONNX Runtime outputs; raise :class:`ParityError` when apart."""
    try:
        ref = onnx_logits(fp32_onnx, x)
        got = onnx_logits(int8_onnx, x)
    except Exception as e:
        raise ParityError(f"ONNX Runtime could not run the INT8 model: {e}") from e
    if got.shape != ref.shape:
        raise ParityError(f"INT8 output shape {got.shape} differs from FP32 {ref.shape}")
    diff = float(np.abs(got - ref).max())
    scale = float(np.abs(ref).max()) or 1.0
    top1 = float((got.argmax(1) == ref.argmax(1)).mean())
    parity = Int8Parity(diff, diff / scale, top1, len(x))
    if not np.isfinite(diff) or diff / scale > rel_tol or top1 < min_top1:
        raise ParityError(
            f"INT8 model disagrees with FP32 on {len(x)} inputs: max_abs_diff={diff:.3g} "
            f"({diff / scale:.1%} of the largest logit, allowed {rel_tol:.0%}), "
            f"top1_agreement={top1:.4f} (required {min_top1:g})"
        )
    return parity
