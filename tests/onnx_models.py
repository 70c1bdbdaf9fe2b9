"""Small real ONNX models for tests that need variants but not training."""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from prunefleet.server.fleet import spec_from_file
from prunefleet.shared.messages import Golden, VariantSpec


def make_mlp(path: Path, hidden: int, seed: int = 0, nan: bool = False) -> Path:
    """An 8x8 → hidden → 10 MLP with dynamic batch, written to ``path``."""
    rng = np.random.default_rng(seed)
    w1 = rng.normal(0, 0.2, (64, hidden)).astype(np.float32)
    b1 = np.zeros(hidden, np.float32)
    w2 = rng.normal(0, 0.2, (hidden, 10)).astype(np.float32)
    b2 = np.full(10, np.nan if nan else 0.0, np.float32)
    g = helper.make_graph(
        [
            helper.make_node("Flatten", ["input"], ["flat"], axis=1),
            helper.make_node("Gemm", ["flat", "w1", "b1"], ["h"]),
            helper.make_node("Relu", ["h"], ["hr"]),
            helper.make_node("Gemm", ["hr", "w2", "b2"], ["logits"]),
        ],
        "mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"),
                                                    (b2, "b2"))],
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def golden_for(path: Path, seed: int = 1) -> tuple[str, str]:
    x = np.random.default_rng(seed).normal(0, 1, (1, 1, 8, 8)).astype(np.float32)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    y = sess.run(None, {"input": x})[0].astype(np.float32)
    return base64.b64encode(x.tobytes()).decode(), base64.b64encode(y.tobytes()).decode()


def mlp_spec(
    path: Path, name: str, hidden: int, seed: int = 0, chunk_bytes: int = 4096,
    golden: bool = True,
) -> VariantSpec:
    make_mlp(path, hidden, seed)
    g = None
    if golden:
        gi, go = golden_for(path)
        g = Golden(input_b64=gi, output_b64=go)
    return spec_from_file(
        path, name=name, input_shape=[1, 1, 8, 8], num_classes=10,
        params=64 * hidden + hidden * 10, macs=64 * hidden + hidden * 10,
        golden=g, chunk_bytes=chunk_bytes,
    )


def workload(path: Path, n: int = 200, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 1, (n, 1, 8, 8)).astype(np.float32)
    y = rng.integers(0, 10, n).astype(np.int64)
    np.savez(path, x=x, y=y)
    return path


def scaled_copy(src: Path, dst: Path, scale: float = 0.9) -> Path:
    """``src`` with its output layer scaled: a different file that gives the same top-1
    answers (a well fine-tuned variant's stand-in in shadow evaluation)."""
    m = onnx.load(str(src))
    for init in m.graph.initializer:
        if init.name == "w2":
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * scale, "w2"))
    onnx.save(m, str(dst))
    return dst
