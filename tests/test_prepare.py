"""Variant preparation: what an operator (and a device) notices about its output.

One full ``prepare_digits`` run (about 6 s on 2 cores) is shared by the module; the other
tests are unit tests of the pieces and run in well under a second each, except the two that
train a one-epoch model to check cache invalidation and interruption.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from prunefleet.server.prepare import (
    REPORT_NAME,
    WORKLOAD_NAME,
    ParityError,
    PreparedSet,
    PruningError,
    load_report,
    prepare_digits,
    prune_structured,
)
from prunefleet.server.prepare import pipeline as pipeline_mod
from prunefleet.server.prepare.export import export_onnx
from prunefleet.server.prepare.models import digits_cnn
from prunefleet.server.prepare.prune import channel_widths
from prunefleet.shared.fsutil import atomic_path
from prunefleet.shared.messages import Golden

REPORT_FIELDS = {
    "name", "technique", "ratio", "params", "macs", "onnx_bytes", "compressed_bytes",
    "latency_ms_p50", "latency_ms_p95", "speedup", "accuracy", "top1_agreement",
    "max_abs_diff", "sha256", "file", "input_shape", "num_classes", "golden",
}


def _session(path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _leftovers(directory: Path) -> list[str]:
    """Temporary files an interrupted atomic write would leave behind."""
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> tuple[PreparedSet, float]:
    out = tmp_path_factory.mktemp("variants")
    t0 = time.perf_counter()
    result = prepare_digits(out, seed=0, progress=False)
    return result, time.perf_counter() - t0


@pytest.fixture(scope="module")
def report(prepared) -> dict:
    result, _ = prepared
    return json.loads((result.out_dir / REPORT_NAME).read_text())


# --------------------------------------------------------------------------- the full run


@pytest.mark.slow
def test_report_lists_every_variant_with_its_fields(prepared, report):
    result, elapsed = prepared
    assert not result.cached
    assert [v.name for v in result.variants] == ["dense", "struct50", "struct75"]
    assert [e["name"] for e in report["variants"]] == result.names
    for entry, v in zip(report["variants"], result.variants, strict=True):
        assert REPORT_FIELDS.issubset(entry)
        assert entry == v.to_report()
        assert v.path == result.out_dir / v.file and v.path.is_file()
        assert v.input_shape == [1, 1, 8, 8] and v.num_classes == 10
        assert v.latency_ms_p50 > 0 and v.latency_ms_p95 >= v.latency_ms_p50
    dense, s50, s75 = result.variants
    assert (dense.technique, dense.ratio, dense.speedup) == ("none", 0.0, 1.0)
    assert dense.top1_agreement == 1.0
    assert (s50.technique, s50.ratio) == ("structured", 0.5)
    assert (s75.technique, s75.ratio) == ("structured", 0.75)
    assert report["input_name"] == "input" and report["output_name"] == "logits"
    assert len(report["params_hash"]) == 64
    assert _leftovers(result.out_dir) == []
    print(f"prepare_digits took {elapsed:.1f} s")


@pytest.mark.slow
def test_structured_variants_are_physically_smaller(prepared):
    dense, s50, s75 = prepared[0].variants
    for small, big in ((s50, dense), (s75, s50)):
        assert small.params < big.params
        assert small.macs < big.macs
        assert small.onnx_bytes < big.onnx_bytes
        assert small.compressed_bytes < big.compressed_bytes
    # Half the channels of every layer: about a quarter of the convolution weights.
    assert s50.params < 0.35 * dense.params and s50.macs < 0.35 * dense.macs
    for v in (s50, s75):
        widths = {k: c for k, c in v.channels.items() if k != "classifier"}
        assert all(c % 8 == 0 and c >= 8 for c in widths.values()), widths
        assert v.channels["classifier"] == 10


@pytest.mark.slow
def test_structured_variants_are_not_slower(prepared):
    dense, s50, s75 = prepared[0].variants
    # Interleaved measurement in one run; generous margin for a noisy shared machine.
    assert s50.speedup > 0.9 and s75.speedup > 0.9
    assert s75.latency_ms_p50 < 1.1 * dense.latency_ms_p50


@pytest.mark.slow
def test_accuracy_survives_pruning(prepared):
    dense, s50, s75 = prepared[0].variants
    assert dense.accuracy >= 0.98
    assert s50.accuracy >= dense.accuracy - 0.01
    assert s75.accuracy >= dense.accuracy - 0.03
    assert s50.top1_agreement >= 0.97 and s75.top1_agreement >= 0.95
    for v in (dense, s50, s75):
        assert v.max_abs_diff < 1e-3


@pytest.mark.slow
def test_onnx_files_load_and_reproduce_the_golden_output(prepared):
    for v in prepared[0].variants:
        data = v.path.read_bytes()
        assert hashlib.sha256(data).hexdigest() == v.sha256
        assert len(data) == v.onnx_bytes
        sess = _session(v.path)
        assert [i.name for i in sess.get_inputs()] == ["input"]
        assert [o.name for o in sess.get_outputs()] == ["logits"]
        golden = Golden.model_validate(v.golden)  # the shape a manifest carries
        x = np.frombuffer(base64.b64decode(golden.input_b64), np.float32).reshape(1, 1, 8, 8)
        want = np.frombuffer(base64.b64decode(golden.output_b64), np.float32).reshape(1, 10)
        got = sess.run(None, {"input": x})[0]
        np.testing.assert_allclose(got, want, atol=golden.atol, rtol=0)
        gx, gy = v.golden_arrays()
        assert np.array_equal(gx, x) and np.array_equal(gy, want)
        # The batch dimension is dynamic.
        assert sess.run(None, {"input": np.repeat(x, 7, axis=0)})[0].shape == (7, 10)


@pytest.mark.slow
def test_workload_is_the_normalised_test_split(prepared, report):
    result = prepared[0]
    assert result.workload_path == result.out_dir / WORKLOAD_NAME
    with np.load(result.workload_path, allow_pickle=False) as w:
        x, y = w["x"], w["y"]
    assert x.dtype == np.float32 and y.dtype == np.int64
    assert x.ndim == 4 and x.shape[1:] == (1, 8, 8) and len(x) == len(y) == report["workload"]["n"]
    assert set(np.unique(y)) == set(range(10))
    # Normalised as the models expect: feeding it to ONNX Runtime gives the reported accuracy.
    for v in result.variants:
        logits = _session(v.path).run(None, {"input": x})[0]
        assert float((logits.argmax(1) == y).mean()) == pytest.approx(v.accuracy)


@pytest.mark.slow
def test_second_call_is_a_fast_cache_hit(prepared):
    first = prepared[0]
    mtimes = {p.name: p.stat().st_mtime_ns for p in first.out_dir.iterdir()}
    again = prepare_digits(first.out_dir, seed=0, progress=False)
    assert again.cached  # nothing trained, exported or measured again (mtimes below)
    assert [v.sha256 for v in again.variants] == [v.sha256 for v in first.variants]
    assert again.variants == first.variants
    assert {p.name: p.stat().st_mtime_ns for p in first.out_dir.iterdir()} == mtimes


@pytest.mark.slow
def test_cache_is_refused_when_a_file_changed(prepared, report, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(prepared[0].out_dir, copy)
    assert load_report(copy, report["params_hash"]) is not None
    assert load_report(copy, "0" * 64) is None  # other parameters
    with open(copy / "struct75.onnx", "ab") as f:
        f.write(b"\0")
    assert load_report(copy, report["params_hash"]) is None


@pytest.mark.slow
def test_other_parameters_prepare_again(prepared, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(prepared[0].out_dir, copy)
    small = prepare_digits(copy, epochs=1, finetune_epochs=0, ratios=(0.5,), progress=False)
    assert not small.cached
    assert small.names == ["dense", "struct50"]
    assert small.variant("struct50").sha256 != prepared[0].variants[1].sha256
    assert prepare_digits(copy, epochs=1, finetune_epochs=0, ratios=(0.5,),
                          progress=False).cached
    assert not prepare_digits(copy, epochs=1, finetune_epochs=0, ratios=(0.5,),
                              progress=False, force=True).cached


@pytest.mark.slow
def test_interrupted_run_leaves_no_report_and_no_partial_file(tmp_path, monkeypatch):
    def interrupt(path, data):
        with atomic_path(path) as tmp:
            tmp.write_bytes(b"half a workl")
            raise KeyboardInterrupt

    monkeypatch.setattr(pipeline_mod, "_write_workload", interrupt)
    with pytest.raises(KeyboardInterrupt):
        prepare_digits(tmp_path, epochs=1, finetune_epochs=0, ratios=(0.5,), progress=False)
    assert not (tmp_path / REPORT_NAME).exists()
    assert not (tmp_path / WORKLOAD_NAME).exists()
    assert _leftovers(tmp_path) == []
    assert load_report(tmp_path) is None


# --------------------------------------------------------------------------- the pieces


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError):
        prepare_digits(tmp_path, ratios=(1.0,), progress=False)
    with pytest.raises(ValueError):
        prepare_digits(tmp_path, ratios=(0.5, 0.5), progress=False)
    with pytest.raises(ValueError):
        prepare_digits(tmp_path, epochs=0, progress=False)


def test_prune_structured_returns_a_smaller_copy():
    model = digits_cnn((32, 64, 128)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, 1, 8, 8)
    pruned = prune_structured(model, x[:1], 0.5)
    assert channel_widths(pruned) == {
        "features.0": 16, "features.3": 32, "features.7": 64, "classifier": 10,
    }
    assert pruned(x).shape == (4, 10)
    # The input model is untouched.
    assert channel_widths(model)["features.0"] == 32
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_prune_structured_rounds_to_8_and_keeps_at_least_8_channels():
    model = digits_cnn((16, 64, 128)).eval()
    x = torch.randn(1, 1, 8, 8)
    widths = channel_widths(prune_structured(model, x, 0.75))
    # 16 * 0.25 = 4 channels would be rounded to 0: the layer keeps 8 instead.
    assert widths == {"features.0": 8, "features.3": 16, "features.7": 32, "classifier": 10}
    widths = channel_widths(prune_structured(model, x, 0.3, round_to=None))
    assert widths["features.3"] == 44 and widths["classifier"] == 10


def test_prune_structured_honours_ignored_layers_and_rejects_bad_ratios():
    model = digits_cnn((32, 64, 128)).eval()
    x = torch.randn(1, 1, 8, 8)
    widths = channel_widths(
        prune_structured(model, x, 0.5, ignored_layers=[model.features[0]], importance="random")
    )
    assert widths["features.0"] == 32 and widths["features.3"] == 32
    for bad in (-0.1, 1.0):
        with pytest.raises(PruningError):
            prune_structured(model, x, bad)
    with pytest.raises(PruningError):
        prune_structured(model, x, 0.5, ignored_layers=[nn.Linear(2, 2)])


class _SignBranch(nn.Module):
    """Eager Python branch on the data: tracing bakes in the branch of the example input."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x.flatten(1))
        return y if float(x.sum()) > 0 else -y


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_export_refuses_a_model_that_onnx_does_not_reproduce(tmp_path):
    x = np.concatenate([np.ones((1, 1, 8, 8)), -np.ones((7, 1, 8, 8))]).astype(np.float32)
    target = tmp_path / "bad.onnx"
    with pytest.raises(ParityError, match="max_abs_diff"):
        export_onnx(_SignBranch().eval(), target, check_inputs=x)
    assert not target.exists() and _leftovers(tmp_path) == []


def test_export_writes_a_checked_model(tmp_path):
    model = digits_cnn((8, 8, 8)).eval()
    x = np.random.default_rng(0).normal(size=(16, 1, 8, 8)).astype(np.float32)
    out = export_onnx(model, tmp_path / "m.onnx", check_inputs=x, metadata={"k": "v"})
    assert out.parity.max_abs_diff < 1e-4 and out.parity.top1_agreement == 1.0
    sess = _session(out.path)
    assert sess.get_modelmeta().custom_metadata_map["k"] == "v"
    assert sess.run(None, {"input": x[:3]})[0].shape == (3, 10)

