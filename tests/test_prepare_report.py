"""A recipe with data and every technique: the report an operator reads, and Ctrl-C."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import onnxruntime as ort
import pytest

from prunefleet.server.prepare import REPORT_NAME, parse_recipe, prepare
from prunefleet.server.prepare import pipeline as pipeline_mod
from prunefleet.server.prepare.data import load_digits_splits

ISSUE_FIELDS = {
    "name", "technique", "params", "macs", "onnx_bytes", "compressed_bytes", "latency_ms_p50",
    "latency_ms_p95", "speedup", "accuracy", "top1_agreement", "max_abs_diff", "sha256",
    "file",
}


def _recipe(tmp_path, variants=None):
    d = load_digits_splits()
    npz = tmp_path / "digits.npz"
    # The .npz route of [data], with a test split.
    np.savez(npz, x_train=d.train.x[:500], y_train=d.train.y[:500], x_val=d.val.x,
             y_val=d.val.y, x_test=d.test.x, y_test=d.test.y)
    return parse_recipe({
        "model": {"factory": "prunefleet.server.prepare.models:branchy_net",
                  "input_shape": [1, 1, 8, 8], "kwargs": {"width": 32}},
        "data": {"source": str(npz)},
        "train": {"epochs": 5, "lr": 1e-2},
        "finetune": {"lr": 3e-3},
        "prepare": {"latency_runs": 40, "latency_rounds": 4, "latency_warmup": 5,
                    "calibration_samples": 32, "sensitivity_ratios": [0.5]},
        "variant": variants or [
            {"name": "dense", "technique": "none"},
            {"name": "mag50", "technique": "magnitude", "ratio": 0.5, "finetune_epochs": 1},
            {"name": "s50", "technique": "structured", "ratio": 0.5, "finetune_epochs": 2,
             "distill": True},
            {"name": "s50-int8", "technique": "structured", "ratio": 0.5,
             "finetune_epochs": 2, "distill": True, "quantize": "int8"},
            {"name": "sens", "technique": "sensitivity", "macs_ratio": 0.6},
            {"name": "rand50", "technique": "random", "ratio": 0.5},
        ],
    }, base_dir=tmp_path)


# One PyTorch thread, as the pipeline uses (conftest.py).
pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    return prepare(_recipe(tmp), tmp / "out", progress=False)


@pytest.mark.slow
def test_report_lists_every_variant_with_the_issue_fields(prepared):
    report = json.loads(prepared.report_path.read_text())
    names = [v["name"] for v in report["variants"]]
    assert names == ["dense", "mag50", "s50", "s50-int8", "sens", "rand50"]
    by = {v["name"]: v for v in report["variants"]}
    for v in report["variants"]:
        assert set(v) >= ISSUE_FIELDS
        assert 0 < v["accuracy"] <= 1 and 0 <= v["top1_agreement"] <= 1
        assert v["latency_ms_p95"] >= v["latency_ms_p50"] > 0
        data = (prepared.out_dir / v["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == v["sha256"] and len(data) == v["onnx_bytes"]
    assert by["dense"]["speedup"] == 1.0 and by["dense"]["top1_agreement"] == 1.0
    # ONNX was checked against PyTorch; INT8 against FP32 ONNX, with its larger error shown.
    for n in ("dense", "mag50", "s50", "sens", "rand50"):
        assert by[n]["max_abs_diff"] < 1e-3 and by[n]["max_abs_diff_fp32"] is None
    q = by["s50-int8"]
    assert q["max_abs_diff"] > 1e-4 and q["max_abs_diff_fp32"] is not None
    assert abs(q["accuracy"] - by["s50"]["accuracy"]) < 0.03  # INT8 keeps the accuracy
    # 7-bit weights: the integer kernels compute what the QDQ model says on any CPU (8-bit
    # weights saturate the u8s8 kernels of x86 CPUs without VNNI); how it was made is shown.
    int8 = q["details"]["int8"]
    assert report["export"]["int8"]["reduce_range"] is True and int8["reduce_range"] is True
    assert int8["kernel_gap"] < 0.01 and int8["top1_agreement"] >= 0.9
    assert int8["calibration"] == "minmax" and int8["attempts"][-1]["passed"]
    assert by["s50-int8"]["compressed_bytes"] < 0.5 * by["s50"]["compressed_bytes"]
    # Structured variants are physically smaller; unstructured ones say what they gain.
    assert by["s50"]["params"] < 0.5 * by["dense"]["params"]
    assert by["s50"]["onnx_bytes"] < 0.5 * by["dense"]["onnx_bytes"]
    assert by["mag50"]["params"] == by["dense"]["params"]
    assert by["mag50"]["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert by["mag50"]["compressed_bytes"] < by["dense"]["compressed_bytes"]
    assert "no faster" in by["mag50"]["note"] and "compressed size" in by["mag50"]["note"]
    assert by["sens"]["macs"] <= 0.6 * by["dense"]["macs"]
    assert by["sens"]["details"]["sensitivity"]
    assert report["workload"]["split"] == "test"


@pytest.mark.slow
def test_pareto_keeps_exactly_the_unbeaten_variants(prepared):
    vs = prepared.report["variants"]

    def beats(a, b):
        return (a["latency_ms_p50"] <= b["latency_ms_p50"] and a["accuracy"] >= b["accuracy"]
                and (a["latency_ms_p50"] < b["latency_ms_p50"] or a["accuracy"] > b["accuracy"]))

    for v in vs:
        assert v["pareto"] == (not any(beats(o, v) for o in vs if o is not v)), v["name"]
    assert prepared.report["pareto"] == [v["name"] for v in sorted(
        (v for v in vs if v["pareto"]), key=lambda v: v["latency_ms_p50"])]


@pytest.mark.slow
def test_report_md_and_plot_are_written_beside_it(prepared):
    md = (prepared.out_dir / "report.md").read_text()
    for v in prepared.variants:
        assert f"| {v.name} |" in md
    assert "Pareto front" in md and "report.png" in md
    assert (prepared.out_dir / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_variants_run_in_onnx_runtime_with_the_reported_accuracy(prepared):
    with np.load(prepared.workload_path) as w:
        x, y = w["x"], w["y"]
    for v in prepared.variants:
        sess = ort.InferenceSession(str(v.path), providers=["CPUExecutionProvider"])
        acc = float((sess.run(None, {"input": x})[0].argmax(1) == y).mean())
        assert acc == pytest.approx(v.accuracy)


@pytest.mark.slow
def test_ctrl_c_leaves_no_half_written_variant(tmp_path, monkeypatch):
    recipe = _recipe(tmp_path, [
        {"name": "s50", "technique": "structured", "ratio": 0.5},
        {"name": "s50-int8", "technique": "structured", "ratio": 0.5, "quantize": "int8"},
    ])
    out = tmp_path / "out"

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline_mod, "quantize_checked", interrupt)
    with pytest.raises(KeyboardInterrupt):
        prepare(recipe, out, progress=False)
    assert list(out.iterdir()) == []  # not even the finished dense and s50 files
    monkeypatch.undo()
    done = prepare(recipe, out, progress=False)
    assert [v.name for v in done.variants] == ["dense", "s50", "s50-int8"]
    assert (out / REPORT_NAME).is_file()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


@pytest.mark.slow
def test_a_killed_runs_staging_directory_is_cleaned_up(tmp_path):
    out = tmp_path / "out"
    stale = out / ".prepare-999999999-abc"  # no such process
    stale.mkdir(parents=True)
    (stale / "half.onnx").write_bytes(b"\x08")
    prepare(_recipe(tmp_path, [{"name": "s50", "technique": "structured", "ratio": 0.5}]), out,
            progress=False)
    assert not stale.exists()
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []
