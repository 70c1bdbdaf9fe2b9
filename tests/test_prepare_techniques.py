"""Each pruning technique on a small net with a residual add, a concatenation, a depthwise
and a grouped convolution; INT8; ONNX parity. Tiny data and epochs: seconds in all."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from prunefleet.server.prepare import PruningError, prune_magnitude, prune_structured
from prunefleet.server.prepare.data import Dataset, Split, load_digits_splits
from prunefleet.server.prepare.export import export_onnx, to_onnx_bytes
from prunefleet.server.prepare.measure import count_macs, count_params
from prunefleet.server.prepare.models import (
    branchy_net,
    mobilenetv2_cifar,
    resnet18_cifar,
)
from prunefleet.server.prepare.prune import channel_groups, channel_widths, weight_sparsity
from prunefleet.server.prepare.quantize import check_int8, quantize_int8
from prunefleet.server.prepare.recipe import FinetuneSpec, Settings, VariantSpec
from prunefleet.server.prepare.techniques import Context, make_variant
from prunefleet.server.prepare.train import TrainConfig, accuracy, fit

X1 = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(0))


# One PyTorch thread, as the pipeline uses (conftest.py).
pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def digits() -> Dataset:
    d = load_digits_splits()
    # A third of the training split keeps every fit here well under a second.
    return Dataset("digits-small", Split(d.train.x[:400], d.train.y[:400]), d.val, d.test,
                   d.normalization, d.split_seed)


@pytest.fixture(scope="module")
def trained(digits) -> nn.Module:
    torch.manual_seed(0)
    model = branchy_net(1, 16)
    fit(model, digits.train, digits.val, TrainConfig(epochs=3, lr=1e-2, noise_prob=0),
        progress=False)
    return model.eval()


def _ctx(data: Dataset | None, model: nn.Module, **settings) -> Context:
    return Context(example=X1, settings=Settings(**settings), finetune=FinetuneSpec(),
                   data=data, dense_macs=count_macs(model, X1))


def _parity_ok(model: nn.Module, tmp_path) -> float:
    x = np.random.default_rng(1).normal(size=(32, 1, 8, 8)).astype(np.float32)
    return export_onnx(model, tmp_path / "m.onnx", check_inputs=x).parity.max_abs_diff


def test_structured_keeps_residual_concat_depthwise_and_grouped_paths_consistent(tmp_path):
    model = branchy_net(1, 32).eval()
    pruned = prune_structured(model, X1, 0.5)
    w = channel_widths(pruned)
    # Residual add: the stem and the block's last conv keep the same channels; the
    # depthwise conv follows them.
    assert w["stem.0"] == w["res.3"] == pruned.branch_b[0].out_channels == 16
    assert pruned.branch_b[0].groups == 16
    # Concatenation: the next layer takes exactly the two branches' channels.
    assert pruned.fuse[0].in_channels == w["branch_a.0"] + w["branch_b.3"] == 16
    # Grouped conv: still 4 groups, widths divisible by them and by 8.
    assert pruned.mix[0].groups == 4 and w["mix.0"] == 32
    assert all(c % 8 == 0 for k, c in w.items() if k != "classifier")
    assert pruned(torch.randn(5, 1, 8, 8)).shape == (5, 10)
    assert count_params(pruned) < 0.35 * count_params(model)
    assert _parity_ok(pruned, tmp_path) < 1e-4
    # Physically smaller ONNX.
    assert len(to_onnx_bytes(pruned, X1)[0]) < 0.4 * len(to_onnx_bytes(model, X1)[0])


def test_channel_groups_name_coupled_layers():
    groups = {g.root: g for g in channel_groups(branchy_net(1, 32).eval(), X1)}
    residual = next(g for g in groups.values() if "stem.0" in g.layers)
    assert {"stem.0", "res.3", "branch_b.0"} <= set(residual.layers)
    assert "classifier" not in groups  # the classes are never pruned


@pytest.mark.parametrize("factory", [resnet18_cifar, mobilenetv2_cifar])
def test_structured_prunes_resnet_and_mobilenet_to_smaller_exportable_models(factory, tmp_path):
    model = factory().eval()
    x = torch.randn(1, 3, 32, 32)
    pruned = prune_structured(model, x, 0.5)
    assert count_macs(pruned, x) < 0.3 * count_macs(model, x)
    w = channel_widths(pruned)
    assert all(c % 8 == 0 for k, c in w.items() if k != "classifier")
    assert w["classifier"] == 10


def test_random_removes_as_many_channels_but_other_ones(trained):
    s = prune_structured(trained, X1, 0.5, importance="magnitude")
    r = prune_structured(trained, X1, 0.5, importance="random")
    assert channel_widths(s) == channel_widths(r)
    assert not torch.equal(s.stem[0].weight, r.stem[0].weight)


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_magnitude_zeroes_weights_only_and_fine_tuning_keeps_them_zero(trained, digits, scope):
    spec = VariantSpec(name="m", technique="magnitude", ratio=0.6, scope=scope,
                       finetune_epochs=1)
    made = make_variant(trained, spec, _ctx(digits, trained))
    assert weight_sparsity(made.model) == pytest.approx(0.6, abs=0.01)
    if scope == "layer":
        for _name, m in made.model.named_modules():
            if isinstance(m, nn.Conv2d | nn.Linear) and m.weight.numel() > 100:
                assert float((m.weight == 0).float().mean()) == pytest.approx(0.6, abs=0.02)
    # Biases and BatchNorm parameters are never pruned.
    assert torch.equal(made.model.classifier.bias != 0, trained.classifier.bias != 0)
    assert not any(n.endswith(("weight_orig", "weight_mask"))
                   for n, _ in made.model.named_parameters())
    assert count_params(made.model) == count_params(trained)  # same shapes: no speedup


def test_magnitude_refuses_a_macs_target():
    with pytest.raises(ValueError, match="keeps every MAC"):
        VariantSpec(name="m", technique="magnitude", macs_ratio=0.5)
    with pytest.raises(PruningError):
        prune_magnitude(branchy_net(), 1.0)


def test_structured_meets_a_macs_target(trained):
    spec = VariantSpec(name="s", technique="structured", macs_ratio=0.4)
    ctx = _ctx(None, trained)
    made = make_variant(trained, spec, ctx)
    macs = count_macs(made.model, X1)
    assert macs <= 0.4 * ctx.dense_macs
    assert macs > 0.15 * ctx.dense_macs  # the smallest ratio that meets it, not any


def test_sensitivity_meets_the_target_and_spares_sensitive_layers(trained, digits):
    spec = VariantSpec(name="s", technique="sensitivity", macs_ratio=0.5)
    ctx = _ctx(digits, trained, sensitivity_ratios=[0.25, 0.5, 0.75])
    made = make_variant(trained, spec, ctx)
    assert count_macs(made.model, X1) <= 0.5 * ctx.dense_macs
    scan = made.info["sensitivity"]
    ratios = made.info["layer_ratios"]
    assert scan and ratios and set(ratios) <= set(scan)
    # Every scanned entry records what pruning that group alone cost and saved.
    for entries in scan.values():
        assert all({"ratio", "accuracy_loss", "macs_saved"} <= set(e) for e in entries)
    # Choosing per-group ratios from the scan loses no more than pruning every layer alike
    # to the same MACs (both without fine-tuning here).
    uniform = make_variant(trained, VariantSpec(name="u", technique="structured",
                                                macs_ratio=0.5), ctx)
    assert accuracy(made.model, digits.val) >= accuracy(uniform.model, digits.val)


def test_sensitivity_needs_data():
    from prunefleet.server.prepare import RecipeError, parse_recipe

    with pytest.raises(RecipeError, match="sensitivity needs a \\[data\\] table"):
        parse_recipe({"model": {"factory": "a.b:c", "input_shape": [1, 1, 8, 8]},
                      "variant": [{"name": "s", "technique": "sensitivity", "ratio": 0.5}]})


def test_iterative_reaches_the_one_shot_widths_with_fine_tuning(trained, digits):
    ctx = _ctx(digits, trained)
    one = make_variant(trained, VariantSpec(name="a", technique="structured", ratio=0.75), ctx)
    it = make_variant(trained, VariantSpec(name="b", technique="structured", ratio=0.75,
                                           iterative_steps=3, finetune_epochs=3,
                                           distill=True), ctx)
    assert channel_widths(it.model) == channel_widths(one.model)
    assert it.info["val_accuracy"] is not None
    assert channel_widths(trained)["stem.0"] == 16  # the dense model is untouched


def test_int8_is_static_qdq_smaller_and_close_to_fp32(trained, digits):
    fp32, _, _ = to_onnx_bytes(trained, X1)
    q = quantize_int8(fp32, digits.train.x[:64])
    ops = {n.op_type for n in onnx.load_from_string(q).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert len(q) < 0.75 * len(fp32)
    parity = check_int8(q, fp32, digits.val.x, rel_tol=0.5, min_top1=0.9)
    assert parity.top1_agreement >= 0.9 and parity.rel_diff < 0.5


def test_int8_that_disagrees_is_refused(trained, digits):
    from prunefleet.server.prepare import ParityError

    fp32, _, _ = to_onnx_bytes(trained, X1)
    other, _, _ = to_onnx_bytes(branchy_net(1, 16).eval(), X1)
    q = quantize_int8(other, digits.train.x[:16])
    with pytest.raises(ParityError, match="INT8"):
        check_int8(q, fp32, digits.val.x, rel_tol=0.25, min_top1=0.9)


def test_sensitivity_says_when_its_scan_cannot_reach_the_target(trained, digits):
    spec = VariantSpec(name="s", technique="sensitivity", macs_ratio=0.05)
    with pytest.raises(PruningError, match="add larger sensitivity_ratios"):
        make_variant(trained, spec, _ctx(digits, trained, sensitivity_ratios=[0.25]))
