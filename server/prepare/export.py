"""ONNX export with a parity check against PyTorch, written atomically.

:func:`export_onnx` exports a model with a dynamic batch dimension, loads the result in ONNX
Runtime, compares its logits with PyTorch's on the given check inputs (largest absolute
difference and top-1 agreement), raises :class:`ParityError` when they disagree, and only
then writes the file atomically (:func:`prunefleet.shared.fsutil.atomic_write`), so a failed
or interrupted export never leaves a file behind.

Two exporters are supported. ``"torchscript"`` (``dynamo=False``) is fast (~0.1 s for these
models) and folds BatchNorm into the convolutions; torch deprecates it, so its warning is
silenced here and, should it fail, the export falls back to ``"dynamo"`` (``torch.export``
based, needs ``onnxscript``; ~0.5 s per model after a ~2 s first call).
"""

from __future__ import annotations

import io
import logging
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import torch
from torch import nn

from prunefleet.shared.fsutil import atomic_write

from .errors import ParityError, PrepareError

log = logging.getLogger(__name__)

Exporter = Literal["torchscript", "dynamo"]

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
TORCHSCRIPT_OPSET = 17
DYNAMO_OPSET = 18  # the dynamo exporter's native opset; lower ones go through a converter


@dataclass(frozen=True)
class Parity:
    """How closely the ONNX model reproduces PyTorch on the check inputs."""

    max_abs_diff: float
    top1_agreement: float
    n: int


@dataclass(frozen=True)
class Exported:
    path: Path
    onnx_bytes: bytes
    exporter: str
    opset: int
    parity: Parity


@contextmanager
def _quiet_export():
    """Silence the exporters' deprecation warnings and registry chatter."""
    noisy = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo")]
    levels = [lg.level for lg in noisy]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", UserWarning)
        for lg in noisy:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(noisy, levels, strict=True):
                lg.setLevel(level)


def to_onnx_bytes(
    model: nn.Module,
    example_input: torch.Tensor,
    *,
    exporter: Exporter = "torchscript",
    opset: int | None = None,
    input_name: str = INPUT_NAME,
    output_name: str = OUTPUT_NAME,
) -> tuple[bytes, str, int]:
    """Export ``model`` (in eval mode) to ONNX bytes with a dynamic batch dimension.

    Returns ``(bytes, exporter used, opset)``.
    """
    model = model.eval()
    example = example_input.detach()
    if exporter == "torchscript":
        op = opset or TORCHSCRIPT_OPSET
        buf = io.BytesIO()
        try:
            with _quiet_export(), torch.no_grad():
                # torch annotates ``f`` as a path, but the TorchScript exporter also
                # writes to a binary file object (its documented in-memory use).
                torch.onnx.export(
                    model, (example[:1],), buf,  # type: ignore[arg-type]
                    dynamo=False, opset_version=op,
                    input_names=[input_name], output_names=[output_name],
                    dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}},
                    do_constant_folding=True,
                )
            return buf.getvalue(), "torchscript", op
        except Exception as e:  # deprecated path: fall back to the supported exporter
            log.warning("TorchScript ONNX export failed (%s); trying the dynamo exporter", e)
            exporter = "dynamo"
            opset = None
    if exporter != "dynamo":
        raise PrepareError(f"unknown exporter {exporter!r}; use 'torchscript' or 'dynamo'")
    op = opset or DYNAMO_OPSET
    # torch.export specialises a batch of 1; an example batch of 2 keeps the dim symbolic.
    batch2 = example[:1].expand(2, *example.shape[1:]).contiguous()
    try:
        with _quiet_export():
            program = torch.onnx.export(
                model, (batch2,), dynamo=True, opset_version=op, verbose=False,
                input_names=[input_name], output_names=[output_name],
                dynamic_shapes=({0: torch.export.Dim("batch")},), optimize=True,
            )
    except Exception as e:
        raise PrepareError(f"ONNX export failed: {e}") from e
    assert program is not None  # export returns None only with dynamo=False
    return program.model_proto.SerializeToString(), "dynamo", op


def inline_constant_identities(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Replace ``Identity(initializer)`` nodes by initializers of their own.

    The TorchScript exporter's constant folding shares equal tensors (for example the zero
    biases of freshly initialised BatchNorms) through Identity nodes; the INT8 quantizer then
    finds convolution biases that are not initializers and leaves those convolutions in FP32.
    """
    inits = {t.name: t for t in proto.graph.initializer}
    kept = []
    for node in proto.graph.node:
        if node.op_type == "Identity" and node.input[0] in inits:
            t = onnx.TensorProto()
            t.CopyFrom(inits[node.input[0]])
            t.name = node.output[0]
            proto.graph.initializer.append(t)
            inits[t.name] = t
        else:
            kept.append(node)
    if len(kept) != len(proto.graph.node):
        del proto.graph.node[:]
        proto.graph.node.extend(kept)
    return proto


def onnx_logits(onnx_bytes_or_path: bytes | str | Path, x: np.ndarray, batch: int = 256):
    """Run an ONNX classifier in ONNX Runtime (one thread) and return its logits."""
    from .measure import run_batched, session

    sess = session(onnx_bytes_or_path, threads=1)
    return run_batched(sess, x, batch)


def check_parity(
    model: nn.Module,
    onnx_bytes: bytes,
    x: np.ndarray,
    *,
    atol: float = 1e-3,
    min_top1: float = 0.99,
) -> Parity:
    """Compare ONNX Runtime with PyTorch on ``x``; raise :class:`ParityError` on mismatch.

    Also runs one single-sample batch, so a model whose batch dimension did not stay dynamic
    fails here rather than on a device.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    if len(x) == 0:
        raise PrepareError("parity check needs at least one input")
    model.eval()
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    try:
        got = onnx_logits(onnx_bytes, x)
        got1 = onnx_logits(onnx_bytes, x[:1], batch=1)
    except Exception as e:
        raise ParityError(f"ONNX Runtime could not run the exported model: {e}") from e
    if got.shape != ref.shape:
        raise ParityError(f"ONNX output shape {got.shape} differs from PyTorch {ref.shape}")
    diff = float(max(np.abs(got - ref).max(), np.abs(got1 - ref[:1]).max()))
    top1 = float((got.argmax(1) == ref.argmax(1)).mean())
    parity = Parity(max_abs_diff=diff, top1_agreement=top1, n=len(x))
    if not np.isfinite(diff) or diff > atol or top1 < min_top1:
        raise ParityError(
            f"ONNX model disagrees with PyTorch on {len(x)} inputs: max_abs_diff={diff:.3g} "
            f"(allowed {atol:g}), top1_agreement={top1:.4f} (required {min_top1:g})"
        )
    return parity


def export_onnx(
    model: nn.Module,
    path: Path,
    *,
    check_inputs: np.ndarray,
    exporter: Exporter = "torchscript",
    opset: int | None = None,
    atol: float = 1e-3,
    min_top1: float = 0.99,
    metadata: dict[str, str] | None = None,
) -> Exported:
    """Export, validate (ONNX checker + parity on ``check_inputs``) and write ``path``.

    ``metadata`` goes into the model's ``metadata_props`` (visible in ONNX Runtime's
    ``get_modelmeta().custom_metadata_map``).
    """
    example = torch.from_numpy(np.ascontiguousarray(check_inputs[:1], dtype=np.float32))
    data, used, op = to_onnx_bytes(model, example, exporter=exporter, opset=opset)
    proto = inline_constant_identities(onnx.load_from_string(data))
    data = proto.SerializeToString()
    if metadata:
        for key, value in sorted(metadata.items()):
            entry = proto.metadata_props.add()
            entry.key, entry.value = str(key), str(value)
        data = proto.SerializeToString()
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as e:
        raise PrepareError(f"exported ONNX model is invalid: {e}") from e
    parity = check_parity(model, data, check_inputs, atol=atol, min_top1=min_top1)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, data)
    return Exported(Path(path), data, used, op, parity)
