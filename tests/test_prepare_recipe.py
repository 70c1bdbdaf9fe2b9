"""`prunefleet prepare RECIPE.toml --out DIR`: recipe errors end fast with one clear line;
a good recipe produces measured variants, is reused when unchanged and guarded otherwise."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from prunefleet.server.cli import main
from prunefleet.server.prepare import RecipeError, load_recipe

# A recipe without data: variants are made and measured for size and speed only.
NO_DATA = """
[model]
factory = "prunefleet.server.prepare.models:branchy_net"
input_shape = [1, 1, 8, 8]
kwargs = {width = 16}

[prepare]
latency_runs = 20
latency_rounds = 2
latency_warmup = 2
calibration_samples = 16

[[variant]]
name = "s50"
technique = "structured"
ratio = 0.5

[[variant]]
name = "s50-int8"
technique = "structured"
ratio = 0.5
quantize = "int8"
"""


def _write(tmp_path: Path, text: str, name: str = "recipe.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(["prepare", *argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


BAD = [
    # (what to change in NO_DATA, expected words in the one error line)
    (lambda t: t.replace('ratio = 0.5\n', 'ratio = 0.5\nspeed = "fast"\n', 1),
     ["variant[0].speed", "unknown key"]),
    (lambda t: t + '\n[extra]\nx = 1\n', ["extra", "unknown key"]),
    (lambda t: t.replace("models:branchy_net", "no_such_module_xyz:net"),
     ["factory", "no_such_module_xyz", "does not import"]),
    (lambda t: t.replace("models:branchy_net", "models:nothing_here"),
     ["no callable", "nothing_here"]),
    (lambda t: t.replace("input_shape = [1, 1, 8, 8]", "input_shape = [1, 3, 8, 8]"),
     ["rejects input_shape [1, 3, 8, 8]"]),
    (lambda t: t.replace('technique = "structured"', 'technique = "lottery"', 1),
     ["variant[0].technique"]),
    (lambda t: t.replace("ratio = 0.5\n", "ratio = 0.5\nmacs_ratio = 0.3\n", 1),
     ["exactly one of ratio, macs_ratio"]),
    (lambda t: t.replace("ratio = 0.5\n", "ratio = 1.5\n", 1), ["variant[0].ratio"]),
    (lambda t: t.replace('name = "s50-int8"', 'name = "s50"'), ["unique", "s50"]),
    (lambda t: t.replace("ratio = 0.5\n", "ratio = 0.5\nfinetune_epochs = 2\n", 1),
     ["fine-tuning needs a [data] table"]),
    (lambda t: t.replace('quantize = "int8"', 'quantize = "int4"'), ["variant[1].quantize"]),
    (lambda t: t.replace("[model]", "[model\n"), ["not valid TOML"]),
    (lambda t: t.replace('kwargs = {width = 16}', 'checkpoint = "missing.pt"'),
     ["missing.pt", "does not exist"]),
    (lambda t: t.replace("[prepare]", '[data]\nsource = "nowhere.npz"\n\n[prepare]'),
     ["nowhere.npz", "does not exist"]),
]


@pytest.mark.parametrize(("edit", "words"), BAD)
def test_a_bad_recipe_ends_with_one_clear_line_before_any_work(tmp_path, capsys, edit, words):
    recipe = _write(tmp_path, edit(NO_DATA))
    out = tmp_path / "out"
    rc, _stdout, err = _run(capsys, str(recipe), "--out", str(out))
    assert rc == 2  # a recipe error is the user's to fix: a usage error
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("prunefleet: ")
    for w in words:
        assert w in lines[0], lines[0]
    assert not out.exists()  # refused before any work: nothing written


def test_a_checkpoint_that_does_not_fit_the_model(tmp_path, capsys):
    torch.save({"w": torch.zeros(2)}, tmp_path / "other.pt")
    recipe = _write(tmp_path, NO_DATA.replace("kwargs = {width = 16}",
                                              'kwargs = {width = 16}\ncheckpoint = "other.pt"'))
    rc, _, err = _run(capsys, str(recipe), "--out", str(tmp_path / "out"))
    assert rc == 2 and "does not fit the model" in err and len(err.strip().splitlines()) == 1


def test_the_example_recipe_parses():
    from importlib.resources import files

    text = files("prunefleet.server.prepare").joinpath("recipes/digits.toml")
    recipe = load_recipe(Path(str(text)))
    techniques = {v.technique for v in recipe.variant}
    assert techniques == {"none", "magnitude", "structured", "sensitivity", "random"}
    assert any(v.quantize == "int8" for v in recipe.variant)


def test_a_recipe_may_not_smuggle_internal_keys(tmp_path):
    with pytest.raises(RecipeError, match="base_dir"):
        load_recipe(_write(tmp_path, 'base_dir = "/"\n' + NO_DATA))


@pytest.mark.slow
def test_prepare_without_data_measures_size_and_speed(tmp_path, capsys):
    recipe = _write(tmp_path, NO_DATA)
    out = tmp_path / "out"
    rc, stdout, err = _run(capsys, str(recipe), "--out", str(out))
    assert rc == 0, err
    report = json.loads((out / "report.json").read_text())
    names = [v["name"] for v in report["variants"]]
    assert names == ["dense", "s50", "s50-int8"]  # a dense reference is added
    for v in report["variants"]:
        assert v["accuracy"] is None
        assert 0 <= v["top1_agreement"] <= 1
        assert (out / v["file"]).is_file()
    assert report["pareto_metric"] == "top1_agreement"
    assert "s50-int8" in stdout and "report.json" in stdout
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["dense.onnx", "s50.onnx", "s50-int8.onnx", "report.json", "report.md", "report.png"])

    # The same recipe again: verified and reused, nothing rewritten.
    mtime = (out / "s50.onnx").stat().st_mtime_ns
    rc, stdout, _ = _run(capsys, str(recipe), "--out", str(out))
    assert rc == 0 and "up to date" in stdout
    assert (out / "s50.onnx").stat().st_mtime_ns == mtime

    # Another recipe into the same directory: refused unless --force.
    other = _write(tmp_path, NO_DATA.replace("ratio = 0.5", "ratio = 0.25"), "other.toml")
    rc, _, err = _run(capsys, str(other), "--out", str(out))
    assert rc == 1 and "--force" in err
    rc, _, err = _run(capsys, str(other), "--out", str(out), "--force")
    assert rc == 0, err
    assert json.loads((out / "report.json").read_text())["variants"][1]["ratio"] == 0.25


DATA_MODULE = '''
import torch
from torch.utils.data import TensorDataset


def load():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 1, 8, 8, generator=g)
    y = torch.arange(40) % 10
    return TensorDataset(x[:30], y[:30]), TensorDataset(x[30:], y[30:])
'''


def test_data_from_a_callable_returning_torch_datasets(tmp_path):
    from prunefleet.server.prepare.data import load_recipe_data

    (tmp_path / "mydata_for_prepare.py").write_text(DATA_MODULE)
    recipe = load_recipe(_write(tmp_path, NO_DATA.replace(
        "[prepare]", '[data]\nsource = "mydata_for_prepare:load"\n\n[prepare]')))
    data = load_recipe_data(recipe.data.source, (1, 8, 8), recipe.base_dir)
    assert (len(data.train), len(data.val), len(data.test)) == (30, 10, 0)
    assert data.train.x.shape == (30, 1, 8, 8) and data.num_classes == 10
    assert data.eval_split is data.val  # no test split: accuracy on validation
    with pytest.raises(RecipeError, match="do not match input_shape"):
        load_recipe_data(recipe.data.source, (1, 4, 4), recipe.base_dir)
