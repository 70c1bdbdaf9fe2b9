"""INT8 that is right on every CPU: 7-bit weights, a calibration fallback ladder, the report.

The fault these guard against: on x86 CPUs without VNNI, ONNX Runtime's ``u8 x s8`` kernels
add pairs of products in saturating 16-bit integers, so full 8-bit weights next to large
activations clip (an AVX2 host measured 82% top-1 agreement where the model's own QDQ
arithmetic gave 98%). A VNNI host never shows it, which is why it must not depend on the host.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from prunefleet.server.prepare import ParityError, parse_recipe, prepare
from prunefleet.server.prepare import quantize as qmod
from prunefleet.server.prepare.export import to_onnx_bytes
from prunefleet.server.prepare.pipeline import calibration_sample
from prunefleet.server.prepare.quantize import (
    Int8Config,
    Int8Parity,
    head_nodes,
    measure_int8,
    quantize_checked,
    quantize_int8,
)

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _saturating_net() -> nn.Module:
    """A first convolution with all-positive weights over inputs in [0, 1]: the uint8 inputs
    reach 255 and the int8 weights 127, so 8-bit pairs overflow 16 bits (255 x 127 x 2)."""
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10),
    )
    with torch.no_grad():
        m[0].weight.uniform_(0.5, 1.0)
    return m.eval()


@pytest.fixture(scope="module")
def net() -> tuple[bytes, np.ndarray]:
    x = np.random.default_rng(0).uniform(0, 1, (200, 1, 8, 8)).astype(np.float32)
    fp32, _, _ = to_onnx_bytes(_saturating_net(), torch.from_numpy(x[:1]))
    return fp32, x


def _conv_weights(q: bytes) -> list[np.ndarray]:
    model = onnx.load_from_string(q)
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    out = []
    for node in model.graph.node:
        if node.op_type == "Conv":
            dq = producer[node.input[1]]
            out.append(inits[dq.input[0]])
    return out


def test_weights_are_7_bit_so_the_kernels_compute_what_the_model_says(net):
    fp32, x = net
    q = quantize_int8(fp32, x[:64])
    for w in _conv_weights(q):
        assert w.dtype == np.int8 and int(np.abs(w).max()) <= 64  # 255 x 64 x 2 < 2**15
    parity = measure_int8(q, fp32, x[64:])
    # The integer kernels and the QDQ arithmetic (no fusion) agree on any CPU.
    assert parity.kernel_gap is not None and parity.kernel_gap < 1e-4
    assert parity.top1_agreement >= 0.95 and parity.reference_top1 is not None
    full = quantize_int8(fp32, x[:64], reduce_range=False)
    assert max(int(np.abs(w).max()) for w in _conv_weights(full)) == 127


def test_saturating_kernels_are_diagnosed_and_7_bit_weights_chosen(net, monkeypatch):
    """With 8-bit weights asked for, a CPU whose kernels miss where the model's arithmetic
    does not (as an AVX2 host does) gets 7-bit weights instead, and the report says so."""
    fp32, x = net
    real = qmod.measure_int8

    def host(int8, ref, xs, **kw):
        p = real(int8, ref, xs, **kw)
        if int(np.abs(_conv_weights(int8)[0]).max()) > 64:  # 8-bit weights: clip, as AVX2
            return Int8Parity(p.max_abs_diff * 10, 0.9, 0.5, p.n, p.top1_agreement,
                              p.rel_diff, 0.8)
        return p

    monkeypatch.setattr(qmod, "measure_int8", host)
    r = quantize_checked(fp32, x[:64], x[64:], rel_tol=0.5, min_top1=0.9, reduce_range=False)
    assert r.config == Int8Config("minmax", reduce_range=True)
    assert [a["reduce_range"] for a in r.attempts] == [False, True]
    assert r.describe()["fallback"] == "minmax, 7-bit weights"
    p = Int8Parity(1.0, 0.9, 0.5, 10, 0.98, 0.1, 0.8)
    assert p.kernels_saturate(0.5, 0.9) and not p.passes(0.5, 0.9)
    with pytest.raises(ParityError, match="integer kernels saturate"):
        monkeypatch.setattr(qmod, "measure_int8", lambda *a, **k: p)
        qmod.check_int8(b"", b"", x, rel_tol=0.5, min_top1=0.9)


def test_a_minmax_miss_falls_back_and_says_which_passed(net, monkeypatch):
    fp32, x = net
    real = qmod.measure_int8
    seen: list[str] = []

    def strict(int8, ref, xs, **kw):
        p = real(int8, ref, xs, **kw)
        seen.append("x")
        return p if len(seen) >= 3 else Int8Parity(9.0, 0.9, 0.3, p.n, 0.3, 0.9, 0.0)

    monkeypatch.setattr(qmod, "measure_int8", strict)
    r = quantize_checked(fp32, x[:40], x[64:], rel_tol=0.5, min_top1=0.9)
    assert [a["method"] for a in r.attempts] == ["minmax", "percentile", "entropy"]
    assert [a["passed"] for a in r.attempts] == [False, False, True]
    assert r.fallback == "entropy, 7-bit weights"
    # Histogram calibrators stack equal batches: 40 inputs are used as 32.
    assert r.calibration_samples == 32 and r.attempts[0]["calibration_samples"] == 40


def test_the_classifier_can_stay_fp32(net):
    fp32, x = net
    heads = head_nodes(onnx.load_from_string(fp32))
    assert len(heads) == 1
    q = onnx.load_from_string(quantize_int8(fp32, x[:32], fp32_head=True))
    gemm = [n for n in q.graph.node if n.op_type in ("Gemm", "MatMul")]
    assert len(gemm) == 1
    inits = {i.name: i for i in q.graph.initializer}
    b = gemm[0].input[1]  # FP32 weights, an FP32 Gemm (it reads its input dequantized)
    assert b in inits and inits[b].data_type == onnx.TensorProto.FLOAT
    assert any(n.op_type == "QuantizeLinear" for n in q.graph.node)  # the convs still are


def test_when_every_calibration_misses_the_error_lists_them(net):
    fp32, x = net
    with pytest.raises(ParityError) as e:
        quantize_checked(fp32, x[:32], x[64:], rel_tol=0.5, min_top1=1.01)
    text = str(e.value)
    for what in ("minmax", "percentile", "entropy", "fp32 classifier"):
        assert what in text


def test_calibration_is_a_seeded_random_sample_of_training_data():
    x = np.arange(1000, dtype=np.float32).reshape(1000, 1, 1, 1)
    a = calibration_sample(x, 64, seed=0)
    assert len(a) == 64 and len(np.unique(a)) == 64
    assert np.array_equal(a, calibration_sample(x, 64, seed=0))
    assert a.max() > 500  # not the first 64
    assert calibration_sample(x[:10], 64, seed=0).shape[0] == 10


@pytest.mark.slow
def test_the_report_says_how_each_int8_variant_was_made(tmp_path, monkeypatch):
    real = qmod.measure_int8
    calls: list[int] = []

    def minmax_misses(int8, ref, xs, **kw):
        calls.append(1)
        p = real(int8, ref, xs, **kw)
        return p if len(calls) > 1 else Int8Parity(5.0, 0.9, 0.2, p.n, 0.2, 0.9, 0.0)

    monkeypatch.setattr(qmod, "measure_int8", minmax_misses)
    recipe = parse_recipe({
        "model": {"factory": "prunefleet.server.prepare.models:branchy_net",
                  "input_shape": [1, 1, 8, 8], "kwargs": {"width": 16}},
        "prepare": {"latency_runs": 10, "latency_rounds": 1, "latency_warmup": 1,
                    "calibration_samples": 48, "int8_min_top1": 0.5},
        "variant": [{"name": "q", "technique": "none", "quantize": "int8"}],
    }, base_dir=tmp_path)
    done = prepare(recipe, tmp_path / "out", progress=False)
    report = json.loads(done.report_path.read_text())
    assert report["export"]["int8"]["reduce_range"] is True
    assert "percentile" in report["export"]["int8"]["fallbacks"]
    q = next(v for v in report["variants"] if v["name"] == "q")
    int8 = q["details"]["int8"]
    assert int8["reduce_range"] is True and int8["fallback"] == "percentile, 7-bit weights"
    assert [a["passed"] for a in int8["attempts"]] == [False, True]
    assert "INT8 fallback: percentile" in q["note"]
    assert "INT8 fallback" in (done.out_dir / "report.md").read_text()
