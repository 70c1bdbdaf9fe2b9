"""Preparing for a target (issue 11): the ``[target]`` recipe section, ``round_to = "auto"``,
INT8 kept only where it is faster (or size is the goal), session memory and host energy
per variant, and ``prepare --for-class`` with a latency model fitted on a class's fleet
profiles (or on this host without them)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from onnx_models import make_mlp

from prunefleet.server.cli import main
from prunefleet.server.prepare import RecipeError, load_recipe, prepare
from prunefleet.server.prepare import measure as measure_mod
from prunefleet.server.prepare.target import (
    class_model_from_api,
    fit_latency,
    int8_verdict,
    pick_rounding,
    rounding_candidates,
    rounding_for,
    tier_of_class,
)

# Tiny and without data: a prepare run takes a few seconds.
RECIPE = """
[model]
factory = "prunefleet.server.prepare.models:branchy_net"
input_shape = [1, 1, 8, 8]
kwargs = {width = 32}

[prepare]
latency_runs = 20
latency_rounds = 2
latency_warmup = 2
calibration_samples = 16

[[variant]]
name = "s30"
technique = "structured"
ratio = 0.3

[[variant]]
name = "s30-int8"
technique = "structured"
ratio = 0.3
quantize = "int8"
"""

CLASS = "aarch64-dotprod-4c"


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.toml"
    path.write_text(text)
    return path


def _with_target(text: str, target: str) -> str:
    return text + "\n[target]\n" + target + "\n"


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(["prepare", *argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


# --------------------------------------------------------------------------- recipe


BAD = [
    ("[target]\nlatency_budget_ms = 0\n", ["target.latency_budget_ms", "greater than 0"]),
    ("[target]\nmemory_budget_mb = -5\n", ["target.memory_budget_mb"]),
    ("[target]\nmax_accuracy_drop_pp = 120\n", ["target.max_accuracy_drop_pp"]),
    ("[target]\ngoal = \"speed\"\n", ["target.goal", "'latency' or 'size'"]),
    ("[target]\nlatency_ms = 3\n", ["target.latency_ms", "unknown key"]),
    ("[prepare2]\n", ["prepare2", "unknown key"]),
]


@pytest.mark.parametrize(("extra", "words"), BAD)
def test_a_bad_target_ends_with_one_line_before_any_work(tmp_path, capsys, extra, words):
    recipe = _write(tmp_path, RECIPE + "\n" + extra)
    rc, _, err = _run(capsys, str(recipe), "--out", str(tmp_path / "out"))
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("prunefleet: "), err
    for w in words:
        assert w in lines[0], lines[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value", ['"fast"', "0", "-8", "true", "2.5"])
def test_round_to_is_a_positive_integer_or_auto(tmp_path, value):
    text = RECIPE.replace("calibration_samples = 16",
                          f"calibration_samples = 16\nround_to = {value}")
    with pytest.raises(RecipeError,
                       match=r'prepare\.round_to: must be a positive integer or "auto"'):
        load_recipe(_write(tmp_path, text))
    text = RECIPE.replace("ratio = 0.3\n", f"ratio = 0.3\nround_to = {value}\n", 1)
    with pytest.raises(RecipeError, match=r"variant\[0\]\.round_to"):
        load_recipe(_write(tmp_path, text))


def test_a_good_target_parses(tmp_path):
    text = _with_target(RECIPE.replace("calibration_samples = 16",
                                       'calibration_samples = 16\nround_to = "auto"'),
                        'latency_budget_ms = 2.5\nmemory_budget_mb = 64\n'
                        'max_accuracy_drop_pp = 1\ngoal = "size"')
    r = load_recipe(_write(tmp_path, text))
    assert r.prepare.round_to == "auto"
    assert r.target is not None and r.target.latency_budget_ms == 2.5
    assert r.target.goal == "size" and r.target.max_accuracy_drop_pp == 1


# --------------------------------------------------------------------------- rounding


@pytest.mark.parametrize(("cls", "tier", "rounding"), [
    ("x86_64-avx512vnni-8c", "avx512vnni", 16),
    ("x86_64-avx512-4c", "avx512", 16),
    ("x86_64-amx-56c", "amx", 16),
    ("x86_64-avx2-4c", "avx2", 8),
    ("aarch64-dotprod-4c", "dotprod", 8),
    ("aarch64-neon-4c", "neon", 4),
    ("armv7l-base-4c", "base", 4),
])
def test_auto_rounding_follows_the_class_instruction_set(cls, tier, rounding):
    assert tier_of_class(cls) == tier
    assert rounding_for(tier) == rounding
    assert rounding_candidates(tier)[0] == rounding  # the rule's choice is timed first


def test_a_configured_class_name_names_no_instruction_set():
    assert tier_of_class("kiosk-floor2") is None


def test_pick_rounding_prefers_real_gains_over_the_rule():
    # 16 reaches a far larger share of its ideal speedup than 8: 16 wins.
    assert pick_rounding({8: (1.2, 2.0), 16: (1.9, 2.0), 32: (1.5, 2.2)}, preferred=8) == 16
    # Within the tie margin the ISA rule's choice wins.
    assert pick_rounding({8: (1.80, 2.0), 16: (1.78, 2.0)}, preferred=16) == 16
    # A multiple as wide as the layers prunes nothing: 100% of its ideal 1.0x, not chosen.
    assert pick_rounding({16: (1.4, 2.8), 32: (1.07, 1.0)}, preferred=16) == 16
    assert pick_rounding({}, preferred=8) == 8


# --------------------------------------------------------------------------- INT8


def test_int8_verdict():
    keep, why = int8_verdict(1.2, 1.0, "latency", "on this host (p50)")
    assert not keep and "slower than its FP32 twin on this host" in why and "1.200" in why
    keep, why = int8_verdict(1.2, 1.0, "size", "on this host (p50)")
    assert keep and "goal is size" in why
    assert int8_verdict(0.8, 1.0, "latency", "x")[0]


def _int8_slower(monkeypatch):
    """Every INT8 session times 3x the slowest FP32 one (a fake timer: the host may say
    either)."""
    real = measure_mod.latency_many

    def fake(sessions, x1, **kw):
        out = real(sessions, x1, warmup=1, runs=10, rounds=1)
        ms = 3 * max(v.p50_ms for k, v in out.items() if "int8" not in k)
        return {k: measure_mod.Latency(ms, ms, ms, v.runs) if "int8" in k else v
                for k, v in out.items()}

    monkeypatch.setattr(measure_mod, "latency_many", fake)


def test_an_int8_variant_slower_than_its_fp32_twin_is_dropped_with_the_reason(
        tmp_path, capsys, monkeypatch):
    _int8_slower(monkeypatch)
    recipe = _write(tmp_path, _with_target(RECIPE, 'goal = "latency"'))
    out = tmp_path / "out"
    rc, stdout, err = _run(capsys, str(recipe), "--out", str(out))
    assert rc == 0, err
    report = json.loads((out / "report.json").read_text())
    assert [v["name"] for v in report["variants"]] == ["dense", "s30"]
    [dropped] = report["target"]["dropped"]
    assert dropped["name"] == "s30-int8"
    assert "INT8 slower than its FP32 twin on this host" in dropped["reason"]
    assert not (out / "s30-int8.onnx").exists()
    assert "dropped s30-int8: INT8 slower" in stdout
    assert "dropped `s30-int8`" in (out / "report.md").read_text()


def test_an_int8_variant_without_its_twin_in_the_recipe_is_timed_against_it(
        tmp_path, capsys, monkeypatch):
    _int8_slower(monkeypatch)
    only_int8 = RECIPE[:RECIPE.index("[[variant]]")] + RECIPE[RECIPE.index(
        '[[variant]]\nname = "s30-int8"'):]
    out = tmp_path / "out"
    rc, _, err = _run(capsys, str(_write(tmp_path, _with_target(only_int8, ""))),
                      "--out", str(out))
    assert rc == 0, err
    report = json.loads((out / "report.json").read_text())
    assert [v["name"] for v in report["variants"]] == ["dense"]
    assert report["target"]["dropped"][0]["name"] == "s30-int8"
    assert sorted(p.name for p in out.iterdir()) == ["dense.onnx", "report.json",
                                                     "report.md", "report.png"]


def test_with_size_as_the_goal_a_slower_int8_variant_stays(tmp_path, capsys, monkeypatch):
    _int8_slower(monkeypatch)
    recipe = _write(tmp_path, _with_target(RECIPE, 'goal = "size"'))
    rc, _, err = _run(capsys, str(recipe), "--out", str(tmp_path / "out"))
    assert rc == 0, err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    entry = {v["name"]: v for v in report["variants"]}["s30-int8"]
    assert report["target"]["dropped"] == []
    assert "goal is size" in entry["target"]["int8"]


def test_without_a_target_a_slower_int8_variant_is_kept_and_noted(tmp_path, capsys,
                                                                   monkeypatch):
    _int8_slower(monkeypatch)
    rc, _, err = _run(capsys, str(_write(tmp_path, RECIPE)), "--out", str(tmp_path / "out"))
    assert rc == 0, err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    entry = {v["name"]: v for v in report["variants"]}["s30-int8"]
    assert "INT8 slower than its FP32 twin" in entry["note"]
    assert entry["target"] is None and report["target"] is None


# --------------------------------------------------------------------------- memory, energy


def test_footprint_of_a_real_model_in_a_child_process(tmp_path):
    fp = measure_mod.footprint(make_mlp(tmp_path / "m.onnx", 64), [1, 1, 8, 8], runs=50)
    assert "error" not in fp, fp
    assert fp["memory_mb"] > 0
    assert fp["cpu_ms"] > 0 and fp["energy_mj"] > 0
    assert fp["energy_source"] in ("rapl", "hwmon", "battery", "cpu_time_estimate")


def test_footprint_of_a_broken_file_says_why_in_one_line(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    fp = measure_mod.footprint(bad, [1, 1, 8, 8])
    assert fp["error"].startswith("footprint not measured") and "\n" not in fp["error"]


# --------------------------------------------------------------------------- latency model


def test_latency_fit_and_its_leave_one_out_error():
    rng = np.random.default_rng(0)
    macs = [1e6, 2e6, 3e6, 4e6, 6e6]
    noise = rng.normal(0, 0.01, len(macs))
    pts = [(f"v{i}", int(m), 0.2 + 3e-7 * m + e) for i, (m, e) in enumerate(
        zip(macs, noise, strict=True))]
    fit = fit_latency(pts)
    assert fit is not None and fit.n == 5
    assert fit.a == pytest.approx(0.2, abs=0.05) and fit.b == pytest.approx(3e-7, rel=0.05)
    # Leave-one-out by hand with numpy: fit on the others, predict the one left out.
    errs = []
    for i in range(len(pts)):
        xs = [p[1] for j, p in enumerate(pts) if j != i]
        ys = [p[2] for j, p in enumerate(pts) if j != i]
        b, a = np.polyfit(xs, ys, 1)
        errs.append(abs(a + b * pts[i][1] - pts[i][2]))
    assert fit.loo_mae_ms == pytest.approx(float(np.mean(errs)), rel=1e-6)
    assert 0 < fit.loo_mape < 0.05
    assert fit.macs_for(0.2 + 3e-7 * 2e6) == pytest.approx(2e6, rel=0.05)
    # Two points: a line, no leave-one-out; one point: no fit.
    two = fit_latency(pts[:2])
    assert two is not None and two.loo_mae_ms is None
    assert fit_latency(pts[:1]) is None


def _fig(x: float) -> dict:
    return {"n": 3, "median": x, "p25": x, "p75": x, "min": x, "max": x}


def fleet_table(fp32: list[tuple[int, float]], int8: list[tuple[int, float]],
                cls: str = CLASS) -> dict:
    """What ``GET /v1/classes`` and ``GET /v1/variants`` return, for a synthetic class."""
    classes: dict = {cls: {"devices": 3, "variants": {}}}
    variants = []
    i = 0
    for fam, pts in (("structured", fp32), ("structured+int8", int8)):
        for m, p95 in pts:
            i += 1
            sha = f"{i:064x}"
            classes[cls]["variants"][f"v{i}"] = {
                "name": f"v{i}", "sha256": sha, "devices": 3,
                "latency_ms_p50": _fig(0.9 * p95), "latency_ms_p95": _fig(p95)}
            variants.append({"name": f"v{i}", "sha256": sha, "macs": m, "technique": fam})
    # A profiled variant the registry no longer knows counts for nothing.
    classes[cls]["variants"]["gone"] = {"name": "gone", "sha256": "f" * 64, "devices": 1,
                                        "latency_ms_p95": _fig(99.0)}
    return {"classes": {"classes": classes}, "variants": variants}


# INT8 runs slower than FP32 on this (synthetic) ARM class.
FP32_PTS = [(1_000_000, 0.5), (2_000_000, 0.9), (3_000_000, 1.32)]
INT8_PTS = [(1_000_000, 0.6), (2_000_000, 1.1)]


def test_class_model_from_the_api_fits_each_family():
    t = fleet_table(FP32_PTS, INT8_PTS)
    model = class_model_from_api(CLASS, t["classes"], t["variants"])
    assert model is not None and model.source == "fleet" and model.devices == 3
    assert model.fits["fp32"].n == 3 and model.fits["int8"].n == 2
    assert model.fits["fp32"].b == pytest.approx(4.1e-7, rel=0.01)
    assert model.predict(2_000_000, "int8") == pytest.approx(1.1)
    assert model.fits["fp32"].loo_mae_ms is not None and model.fits["fp32"].loo_mae_ms < 0.05
    assert class_model_from_api("x86_64-avx2-4c", t["classes"], t["variants"]) is None
    one = fleet_table(FP32_PTS[:1], [])
    assert class_model_from_api(CLASS, one["classes"], one["variants"]) is None


# --------------------------------------------------------------------------- --for-class


def test_prepare_for_a_class_with_fleet_profiles(tmp_path, capsys):
    profiles = tmp_path / "profiles.json"
    profiles.write_text(json.dumps(fleet_table(FP32_PTS, INT8_PTS)))
    text = _with_target(RECIPE.replace("calibration_samples = 16",
                                       'calibration_samples = 16\nround_to = "auto"'),
                        "latency_budget_ms = 0.3\nmemory_budget_mb = 500")
    out = tmp_path / "out"
    rc, stdout, err = _run(capsys, str(_write(tmp_path, text)), "--out", str(out),
                           "--for-class", CLASS, "--class-profiles", str(profiles))
    assert rc == 0, err
    report = json.loads((out / "report.json").read_text())
    t = report["target"]
    assert t["device_class"] == CLASS
    assert t["latency_source"] == f"fleet profiles of class {CLASS}"
    # Not the host: the dotprod rule's rounding, nothing timed here.
    assert t["round_to"]["chosen"] == 8 and "timed" not in t["round_to"]
    assert t["latency_model"]["source"] == "fleet"
    assert t["latency_model"]["fits"]["fp32"]["loo_mae_ms"] is not None
    # s30 is predicted to miss 0.3 ms: pruned harder, to the least ratio predicted to meet it.
    search = t["search"]["s30"]
    assert search["ratio"] > 0.3 and search["predicted_ms"] <= 0.3
    # With the fit's own leave-one-out error as the margin below the budget.
    mape = t["latency_model"]["fits"]["fp32"]["loo_mape"]
    assert mape > 0 and search["margin"] == round(mape, 4)
    assert search["predicted_ms"] <= 0.3 / (1 + mape) + 1e-5
    entries = {v["name"]: v for v in report["variants"]}
    s30 = entries["s30"]
    assert s30["ratio"] == search["ratio"] and s30["details"]["round_to"] == 8
    assert s30["target"]["latency_ms_p95"] <= 0.3 and s30["target"]["meets"]
    assert all(w % 8 == 0 for k, w in s30["channels"].items() if k != "classifier")
    # INT8 is predicted slower on this class: dropped, and the report says so.
    assert "s30-int8" not in entries
    assert "predicted for class" in t["dropped"][0]["reason"]
    # The dense model misses the budget: produced, and marked.
    assert not entries["dense"]["target"]["meets"]
    assert "dense" in stdout and "missing the target" in stdout
    for v in report["variants"]:
        assert v["memory_mb"] > 0 and v["energy_mj"] > 0 and v["energy_source"]
    md = (out / "report.md").read_text()
    assert f"## Target: class `{CLASS}`" in md and "leave-one-out error" in md
    assert math.isfinite(t["latency_model"]["fits"]["fp32"]["a"])


def test_prepare_for_a_class_without_profiles_measures_on_this_host(tmp_path, capsys):
    profiles = tmp_path / "profiles.json"
    profiles.write_text(json.dumps(fleet_table([], [])))
    text = _with_target(RECIPE, "latency_budget_ms = 50\nmemory_budget_mb = 0.5")
    out = tmp_path / "out"
    rc, stdout, err = _run(capsys, str(_write(tmp_path, text)), "--out", str(out),
                           "--for-class", "x86_64-avx2-2c", "--class-profiles", str(profiles))
    assert rc == 0, err
    assert "latency is measured on this host" in err
    report = json.loads((out / "report.json").read_text())
    t = report["target"]
    assert t["latency_source"] == "measured on this host"
    assert t["latency_model"]["source"] == "host"
    assert "no fleet profiles" in t["latency_model"]["note"]
    # Half a megabyte: no ONNX Runtime session fits; every variant is produced, and marked.
    for v in report["variants"]:
        assert (out / v["file"]).is_file()
        assert not v["target"]["meets"]
        assert any("session memory" in m for m in v["target"]["misses"])
        assert v["target"]["latency_from"] == "measured on this host"
    assert "missing the target (measured on this host): dense, s30" in stdout


@pytest.mark.parametrize(("argv", "words"), [
    (["--for-class", "bad class!"], ["--for-class", "device class name"]),
    (["--for-class", CLASS, "--class-profiles", "/nonexistent/p.json"], ["--class-profiles"]),
])
def test_bad_for_class_arguments_end_with_one_line(tmp_path, capsys, argv, words):
    rc, _, err = _run(capsys, str(_write(tmp_path, RECIPE)), "--out", str(tmp_path / "o"),
                      *argv)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for w in words:
        assert w in lines[0]
    assert not (tmp_path / "o").exists()


def test_auto_rounding_of_a_tiny_model_follows_the_rule(tmp_path):
    text = RECIPE.replace("calibration_samples = 16",
                          'calibration_samples = 16\nround_to = "auto"')
    result = prepare(load_recipe(_write(tmp_path, text)), tmp_path / "out", progress=False)
    r = result.report["target"]["round_to"]
    # 0.1 ms of dense latency: overhead, not channel blocking, would decide the timing.
    assert r["source"] == "instruction set rule" and "not_timed" in r and "timed" not in r
    assert r["chosen"] == r["rule"] == result.variant("s30").details["round_to"]
    assert "not timed" in (tmp_path / "out" / "report.md").read_text()


def test_auto_rounding_on_the_host_is_timed_and_reported(tmp_path, monkeypatch):
    from prunefleet.server.prepare import plan

    monkeypatch.setattr(plan, "MIN_TIMED_MS", 0.0)  # time even this tiny model
    text = RECIPE.replace("calibration_samples = 16",
                          'calibration_samples = 16\nround_to = "auto"')
    result = prepare(load_recipe(_write(tmp_path, text)), tmp_path / "out", progress=False)
    r = result.report["target"]["round_to"]
    assert r["source"].startswith("host timing")
    assert r["chosen"] in {int(k) for k in r["timed"]}
    assert result.variant("s30").details["round_to"] == r["chosen"]


def test_for_class_reads_the_profiles_from_the_server(monkeypatch):
    import argparse

    from prunefleet.server import adminclient
    from prunefleet.server.cli import _class_model

    table = fleet_table(FP32_PTS, INT8_PTS)
    calls = []

    def fake(path):
        def get(self):
            calls.append((self.base_url, self.token, path))
            return table["classes"] if path == "classes" else table["variants"]
        return get

    monkeypatch.setattr(adminclient.AdminClient, "classes", fake("classes"))
    monkeypatch.setattr(adminclient.AdminClient, "variants", fake("variants"))
    args = argparse.Namespace(for_class=CLASS, class_profiles=None,
                              server="http://127.0.0.1:8080", token="t0k3n", token_file=None)
    model = _class_model(args)
    assert model is not None and model.source == "fleet" and set(model.fits) == {"fp32", "int8"}
    assert [c[2] for c in calls] == ["classes", "variants"]
    assert calls[0][1] == "t0k3n"
    # Neither --server nor $PRUNEFLEET_SERVER nor a file: measured on this host.
    monkeypatch.delenv("PRUNEFLEET_SERVER", raising=False)
    args.server = None
    assert _class_model(args) is None
