"""bench/hardware.py's pure parts: the class profiles it hands the planner, the budget
rule, the choice and the targets. No timing here (the bench itself measures)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from prunefleet.server.prepare.target import class_model_from_api

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def hw():
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("bench_hardware", BENCH / "hardware.py")
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.path.remove(str(BENCH))


def _prof(p95: float) -> dict[str, float]:
    return {"latency_ms_p50": p95 * 0.9, "latency_ms_p95": p95, "cpu_ms": p95 * 0.8}


def test_class_profiles_fit_through_the_planner_s_reader(hw):
    refs = {n: {"name": n, "sha256": c * 64, "macs": m, "technique": t}
            for n, c, m, t in (("dense", "a", 100_000_000, "none"),
                               ("ref30", "b", 50_000_000, "structured"),
                               ("ref60", "c", 20_000_000, "structured"))}
    # Three rounds ("devices") per class; the slow class is twice the fast one, plus noise
    # in one round that the median ignores.
    rounds = {
        "emu-fast": {"dense": [_prof(2.0), _prof(2.1), _prof(9.0)],
                     "ref30": [_prof(1.0), _prof(1.05), _prof(1.0)],
                     "ref60": [_prof(0.4), _prof(0.4), _prof(0.45)]},
        "emu-slow": {"dense": [_prof(4.0), _prof(4.2), _prof(4.1)],
                     "ref30": [_prof(2.0), _prof(2.1), _prof(2.0)],
                     "ref60": [_prof(0.8), _prof(0.8), _prof(0.9)]},
    }
    api = hw.classes_json(rounds, refs)
    fast = api["classes"]["emu-fast"]
    assert fast["devices"] == 3
    assert fast["variants"]["dense"]["latency_ms_p95"]["median"] == 2.1
    assert fast["variants"]["dense"]["latency_ms_p95"]["max"] == 9.0
    mf = class_model_from_api("emu-fast", api, list(refs.values()))
    ms = class_model_from_api("emu-slow", api, list(refs.values()))
    assert mf is not None and ms is not None and mf.source == "fleet"
    assert ms.fits["fp32"].b > 1.8 * mf.fits["fp32"].b
    assert mf.predict(100_000_000, "fp32") == pytest.approx(2.1, rel=0.1)


def test_budget_is_a_share_of_the_fast_class_dense_p95(hw):
    budget, fast, slow = hw.budget_for({"emu-slow": 5.3, "emu-fast": 2.757})
    assert (fast, slow) == ("emu-fast", "emu-slow")
    assert budget == pytest.approx(2.06)  # 0.75 x 2.757 = 2.0678, rounded down
    assert budget < 2.757


def test_choose_takes_the_most_accurate_variant_meeting_the_target(hw):
    entries = [
        {"name": "dense", "accuracy": 0.99, "macs": 100, "target": {"meets": False}},
        {"name": "fit", "accuracy": 0.97, "macs": 60, "target": {"meets": True}},
        {"name": "other", "accuracy": 0.97, "macs": 40, "target": {"meets": True}},
        {"name": "worse", "accuracy": 0.95, "macs": 30, "target": {"meets": True}},
    ]
    assert hw.choose(entries)["name"] == "fit"  # a tie goes to the one pruned least
    assert hw.choose(entries[:1]) is None
    assert hw.choose([{"name": "x", "macs": 1, "target": None}]) is None


def test_targets_state_misses_and_ties(hw):
    def cls(chosen, acc, pred, meas):
        return {"budget_ms": 2.0, "chosen": chosen, "accuracy": acc, "predicted_ms": pred,
                "measured_p95_ms": meas, "prediction_error": hw.rel_error(pred, meas)}

    res = hw.targets({"f": cls("fit", 0.98, 1.9, 1.95), "s": cls("fit", 0.98, 1.95, 2.4)},
                     "f", "s")
    met = {t: ok for t, ok, _ in res}
    assert met["f: chosen variant meets the budget as measured on the class"] is True
    assert met["s: chosen variant meets the budget as measured on the class"] is False
    assert met["the faster class gets the more accurate variant"] is False
    assert "a tie" in next(m for t, _, m in res if t.startswith("the faster"))
    assert met["f: prediction error <= 15%"] is True
    assert met["s: prediction error <= 15%"] is False  # 0.45 / 2.4 = 18.75%
    assert hw.rel_error(None, 2.0) is None


def test_rounds_alternate_and_redo_profiles_other_jobs_disturbed(hw):
    class Fake:
        def __init__(self, shares):
            self.shares = list(shares)
            self.calls = []

        def measure(self, names, runs):
            self.calls.append(list(names))
            return {n: _prof(1.0) for n in names}, self.shares.pop(0)

    # fast: its first profile disturbed twice, then clean; slow: "a" always disturbed
    # (kept after the redos), "b" clean.
    fast = Fake([0.5, 0.4, 0.02, 0.01, 0.03, 0.0])
    worst = [0.9] * (hw.MAX_REDO + 1)
    slow = Fake([*worst, 0.0, 0.0, *worst])
    foreign: dict = {}
    redone: dict = {}
    out = hw.rounds({"f": fast, "s": slow}, {"f": ["a", "b"], "s": ["a", "b"]}, 2, 10,
                    foreign, redone)
    assert [len(v) for v in out["f"].values()] == [2, 2]
    assert [len(v) for v in out["s"].values()] == [2, 2]
    assert redone == {"f": 2, "s": 2 * hw.MAX_REDO}
    assert foreign == {"f": [0.02, 0.01, 0.03, 0.0], "s": [0.9, 0.0, 0.0, 0.9]}
    # Round 1 in order a, b; round 2 reversed.
    assert fast.calls == [["a"], ["a"], ["a"], ["b"], ["b"], ["a"]]
    assert not fast.shares and not slow.shares
