"""Models structured pruning cannot fully narrow: a recurrent layer, a custom module with its
own parameters, attention. They are pruned where they can be, the rest is left whole and the
report says what and why; no Torch-Pruning traceback ends ``prepare``."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from prunefleet.server.prepare import PruningError, parse_recipe, prepare, prune_structured
from prunefleet.server.prepare.data import load_digits_splits
from prunefleet.server.prepare.export import to_onnx_bytes
from prunefleet.server.prepare.models import gated_cnn, row_gru, row_transformer
from prunefleet.server.prepare.prune import (
    attention_heads,
    channel_groups,
    channel_widths,
    kept_whole,
)

X1 = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(0))
XS = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(1))

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _runs_in_onnx_runtime(model: nn.Module) -> None:
    data, _, _ = to_onnx_bytes(model, X1)
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    with torch.no_grad():
        ref = model(XS).numpy()
    got = sess.run(None, {"input": XS.numpy()})[0]
    assert np.abs(got - ref).max() < 1e-4


def _kept(model: nn.Module) -> dict[str, str]:
    return {k.layer: k.reason for k in kept_whole(model, X1)}


def test_a_gru_is_left_whole_with_the_layer_feeding_it():
    dense = row_gru().eval()
    pruned = prune_structured(dense, X1, 0.5)
    w0, w1 = channel_widths(dense), channel_widths(pruned)
    assert w1["features.0"] == w0["features.0"] // 2  # the rest is pruned
    assert w1["features.3"] == w0["features.3"]  # it feeds the GRU
    assert pruned.rnn.input_size == dense.rnn.input_size
    assert pruned.rnn.hidden_size == dense.rnn.hidden_size
    kept = _kept(dense)
    assert set(kept) == {"rnn", "features.3"}
    assert "recurrent" in kept["rnn"] and "GRU" in kept["rnn"]
    assert "feed rnn" in kept["features.3"]
    assert [g.root for g in channel_groups(dense, X1)] == ["features.0"]
    _runs_in_onnx_runtime(pruned)


def test_an_lstm_and_torch_attention_are_left_whole_too():
    class Seq(nn.Module):
        def __init__(self, layer: nn.Module) -> None:
            super().__init__()
            self.conv = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(16, 16, 3, padding=1), nn.ReLU())
            self.layer = layer
            self.classifier = nn.Linear(16, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            rows = self.conv(x).mean(3).transpose(1, 2)
            if isinstance(self.layer, nn.MultiheadAttention):
                out = self.layer(rows, rows, rows, need_weights=False)[0]
            else:
                out = self.layer(rows)[0]
            return self.classifier(out[:, -1])

    for layer, word in ((nn.LSTM(16, 16, batch_first=True, bidirectional=False), "LSTM"),
                        (nn.MultiheadAttention(16, 2, batch_first=True), "heads")):
        dense = Seq(layer).eval()
        pruned = prune_structured(dense, X1, 0.5)
        assert channel_widths(pruned)["conv.0"] == 8
        assert channel_widths(pruned)["conv.2"] == 16
        kept = _kept(dense)
        assert word in kept["layer"] and "conv.2" in kept
        assert pruned(XS).shape == (16, 10)


def test_a_custom_module_with_its_own_parameters_is_left_whole():
    dense = gated_cnn().eval()
    pruned = prune_structured(dense, X1, 0.5)
    w0, w1 = channel_widths(dense), channel_widths(pruned)
    assert w1["stem.0"] == w0["stem.0"] and pruned.gate.logit.shape == dense.gate.logit.shape
    assert w1["body.0"] == w0["body.0"] // 2 and w1["body.4"] == w0["body.4"] // 2
    kept = _kept(dense)
    assert set(kept) == {"gate", "stem.0"}
    assert "custom module (ChannelGate)" in kept["gate"]
    _runs_in_onnx_runtime(pruned)


def test_attention_loses_whole_heads_and_keeps_their_width():
    torch.manual_seed(0)
    dense = row_transformer(dim=32, num_heads=4, mlp=64).eval()
    pruned = prune_structured(dense, X1, 0.5)
    assert attention_heads(dense) == {"attn": 4} and attention_heads(pruned) == {"attn": 2}
    assert pruned.attn.head_dim == dense.attn.head_dim == 8
    assert pruned.attn.q.out_features == 16 and pruned.attn.proj.in_features == 16
    assert pruned.mlp[0].out_features == 32  # the MLP is narrowed as usual
    # The kept rows of q, k and v are two whole heads of the dense ones, the same two.
    kept_heads = []
    for name in ("q", "k", "v"):
        d = getattr(dense.attn, name).weight.detach().reshape(4, 8, -1)
        p = getattr(pruned.attn, name).weight.detach().reshape(2, 8, -1)
        kept_heads.append([next(h for h in range(4) if torch.equal(d[h], p[i]))
                           for i in range(2)])
    assert kept_heads[0] == kept_heads[1] == kept_heads[2]
    # The residual stream meets the position table (a custom module): it keeps its width.
    kept = _kept(dense)
    assert {"pos", "embed", "attn.proj", "mlp.2"} <= set(kept)
    _runs_in_onnx_runtime(pruned)


def test_a_model_the_graph_cannot_see_ends_with_a_pruning_error_not_a_traceback():
    class Shifted(nn.Module):  # a buffer on the model itself: invisible to the graph
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 16, 3, padding=1)
            self.register_buffer("shift", torch.ones(1, 16, 1, 1))
            self.classifier = nn.Linear(16, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.classifier((self.conv(x) + self.shift).mean((2, 3)))

    with pytest.raises(PruningError, match="no longer runs"):
        prune_structured(Shifted().eval(), X1, 0.5)


@pytest.fixture(scope="module")
def tiny_npz(tmp_path_factory):
    d = load_digits_splits()
    path = tmp_path_factory.mktemp("whole") / "digits.npz"
    np.savez(path, x_train=d.train.x[:256], y_train=d.train.y[:256], x_val=d.val.x[:128],
             y_val=d.val.y[:128])
    return path


@pytest.mark.slow
@pytest.mark.parametrize(("factory", "kept", "extra"), [
    ("row_gru", {"rnn", "features.3"}, None),
    ("gated_cnn", {"gate", "stem.0"}, None),
    ("row_transformer", {"pos", "embed", "attn.proj", "mlp.2"}, "attention_heads"),
])
def test_prepare_prunes_the_rest_and_the_report_says_what_was_left(
        tmp_path, tiny_npz, factory, kept, extra):
    recipe = parse_recipe({
        "model": {"factory": f"prunefleet.server.prepare.models:{factory}",
                  "input_shape": [1, 1, 8, 8]},
        "data": {"source": str(tiny_npz)},
        "train": {"epochs": 1, "lr": 1e-2},
        "prepare": {"latency_runs": 10, "latency_rounds": 1, "latency_warmup": 1},
        "variant": [{"name": "s50", "technique": "structured", "ratio": 0.5,
                     "finetune_epochs": 1}],
    }, base_dir=tmp_path)
    done = prepare(recipe, tmp_path / "out", progress=False)
    report = json.loads(done.report_path.read_text())
    by = {v["name"]: v for v in report["variants"]}
    s50 = by["s50"]
    assert s50["params"] < by["dense"]["params"]  # something was pruned
    left = {k["layer"]: k["reason"] for k in s50["details"]["kept_whole"]}
    assert set(left) == kept and all(left.values())
    assert "Left whole:" in s50["note"]
    if extra:
        assert s50["details"][extra] == {"attn": [4, 2]}
    assert "Left whole" in (done.out_dir / "report.md").read_text()
    with np.load(done.workload_path) as w:
        x, y = w["x"], w["y"]
    sess = ort.InferenceSession(str(done.variant("s50").path),
                                providers=["CPUExecutionProvider"])
    acc = float((sess.run(None, {"input": x})[0].argmax(1) == y).mean())
    assert acc == pytest.approx(s50["accuracy"])
