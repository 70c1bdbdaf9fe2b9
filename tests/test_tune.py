"""``prunefleet tune``: the choice of a variant set from measured candidates (table tests),
what a profile-only variant may and may not be on the wire and on the agent, and the loop
through the fleet against a fake API with a fake clock.

End to end on real mosquitto with real agents: ``tests/test_tune_fleet.py``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import pytest

from prunefleet.agent.follower import ManifestFollower
from prunefleet.agent.runtime import LoadedVariant, ModelPool
from prunefleet.server.adminclient import ApiError, UsageError
from prunefleet.server.tune import (
    Candidate,
    TuneOptions,
    candidates_from,
    choose,
    pick_devices,
    run_tune,
)
from prunefleet.shared import chunks
from prunefleet.shared.messages import Manifest, Reason, VariantSpec, decode
from prunefleet.shared.policy import PolicyConfig
from prunefleet.shared.signing import SigningKey, TrustedKeys

NOW = 1_700_000_000.0
KEY = SigningKey.generate()


def cand(name: str, acc: float | None, *p95: float) -> Candidate:
    devices = {f"d{i}": v for i, v in enumerate(p95)}
    return Candidate(name=name, sha256=name * 8, accuracy=acc, p95_ms=devices,
                     p50_ms={d: v / 2 for d, v in devices.items()}, expected=3)


def verdicts(rows) -> dict[str, tuple[bool, str]]:
    return {r.name: (r.chosen, r.why.split(":")[0]) for r in rows}


# -- the choice ---------------------------------------------------------------------------------
CASES = [
    # (candidates, budget, max, chosen in rank order, verdict of the others)
    pytest.param([cand("big", 0.98, 9, 10, 11), cand("mid", 0.97, 4, 5, 6),
                  cand("small", 0.90, 1, 1, 1)], None, 3, ["big", "mid", "small"], {},
                 id="no budget: the whole front, most accurate first"),
    pytest.param([cand("big", 0.98, 9, 10, 11), cand("mid", 0.97, 4, 5, 6),
                  cand("small", 0.90, 1, 1, 1)], 6.0, 3, ["mid", "small"],
                 {"big": "over budget"}, id="the budget is on the median p95"),
    pytest.param([cand("big", 0.98, 9, 10, 11), cand("mid", 0.97, 4, 5, 6),
                  cand("small", 0.90, 1, 1, 1)], 0.5, 3, [],
                 {"big": "over budget", "mid": "over budget", "small": "over budget"},
                 id="nothing meets the budget"),
    pytest.param([cand("int8", 0.96, 7, 7, 7), cand("fp32", 0.97, 5, 5, 5)], None, 3,
                 ["fp32"], {"int8": "beaten by fp32"},
                 id="slower and less accurate (an INT8 slower than FP32 here) is out"),
    pytest.param([cand("a", 0.97, 5), cand("b", 0.97, 5)], None, 3, ["a"],
                 {"b": "beaten by a"}, id="exact tie: one of the two, by digest"),
    pytest.param([cand("big", 0.98, 9), cand("mid", 0.97, 5), cand("small", 0.9, 1)], None, 2,
                 ["big", "mid"], {"small": "beyond --max-variants 2"},
                 id="at most max_variants"),
    pytest.param([cand("lost", 0.99), cand("mid", 0.97, 5)], None, 3, ["mid"],
                 {"lost": "no evidence"}, id="no profile anywhere: no evidence, not chosen"),
    pytest.param([cand("anon", None, 1), cand("mid", 0.97, 5)], None, 3, ["mid", "anon"], {},
                 id="unknown accuracy ranks last but is not beaten by a slower one"),
    pytest.param([cand("anon", None, 6), cand("mid", 0.97, 5)], None, 3, ["mid"],
                 {"anon": "beaten by mid"}, id="unknown accuracy and slower: out"),
]


@pytest.mark.parametrize("cands, budget, k, chosen, others", CASES)
def test_choice(cands, budget, k, chosen, others):
    rows = choose(cands, budget, k)
    assert [r.name for r in rows if r.chosen] == chosen
    got = verdicts(rows)
    for name, why in others.items():
        assert got[name] == (False, why)
    if chosen:
        assert rows[0].name == chosen[0] and rows[0].why == "the most accurate within budget"


def test_a_row_carries_the_figures_it_was_judged_on():
    (row,) = choose([cand("mid", 0.97, 4, 5, 60)], 10.0)
    assert row.p95_ms == 5 and row.p50_ms == 2.5 and row.meets_budget
    assert row.devices_measured == 3 and row.p95_ms_by_device == {"d0": 4, "d1": 5, "d2": 60}


def test_picks_online_devices_with_a_desired_state_by_id():
    listing = [{"device_id": "c", "online": True, "manifest_version": 3},
               {"device_id": "a", "online": True, "manifest_version": 3},
               {"device_id": "b", "online": False, "manifest_version": 3},
               {"device_id": "d", "online": True, "manifest_version": None},
               {"device_id": "e", "online": True, "manifest_version": 3, "revoked": True}]
    assert pick_devices(listing, 5) == ["a", "c"]
    assert pick_devices(listing, 1) == ["a"]


def test_candidates_come_from_a_prepare_output_directory_or_its_report(tmp_path):
    (tmp_path / "struct50.onnx").write_bytes(b"model bytes")
    (tmp_path / "report.json").write_text(json.dumps({"variants": [
        {"name": "struct50", "file": "struct50.onnx"},
        {"name": "int8", "file": "int8.onnx", "sha256": "d" * 64}]}))
    want = [chunks.sha256_bytes(b"model bytes"), "d" * 64]
    assert candidates_from(tmp_path) == want
    assert candidates_from(tmp_path / "report.json") == want
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(UsageError, match="not a prepare report or output directory"):
        candidates_from(tmp_path / "bad.json")


# -- profile-only on the wire -------------------------------------------------------------------
def spec(name: str, macs: int = 1000, profile_only: bool = False) -> VariantSpec:
    p = chunks.plan(f"weights of {name}".encode() * 100, 1024)
    return VariantSpec(name=name, sha256=p.sha256, size=p.size, chunk_bytes=1024,
                       chunk_sha256=list(p.chunk_sha256), input_shape=[1, 1, 8, 8],
                       num_classes=10, params=1, macs=macs, profile_only=profile_only)


def manifest(*variants: VariantSpec, version: int = 1, pinned: str | None = None) -> Manifest:
    return Manifest(target="dev-1", version=version, issued_at=NOW - 60, expires_at=NOW + 3600,
                    variants=list(variants), pinned_variant=pinned)


@pytest.mark.parametrize("variants, pinned, error", [
    ([spec("c", profile_only=True)], None, "every variant is profile-only"),
    ([spec("a"), spec("c", profile_only=True)], "c", "pinned variant 'c' is profile-only"),
])
def test_a_manifest_keeps_something_to_serve(variants, pinned, error):
    with pytest.raises(ValueError, match=error):
        manifest(*variants, pinned=pinned)


def test_profile_only_is_left_out_of_the_signed_bytes_unless_used():
    plain = KEY.sign(manifest(spec("a")))
    assert "profile_only" not in plain.payload  # agents of the last release accept it
    tuned = KEY.sign(manifest(spec("a"), spec("c", profile_only=True)))
    m = decode(Manifest, tuned.payload)
    assert m.profile_only == {"c"} and not m.variant("a").profile_only


def test_a_profile_only_offer_keeps_what_the_device_serves_and_adds_what_it_lacks():
    from prunefleet.server.controller import _profile_offer

    base, cand, other = spec("base"), spec("cand"), spec("other")
    prev = manifest(base, spec("old-cand", profile_only=True), pinned="base")
    renamed = cand.model_copy(update={"name": "base"})  # the device's name, another digest
    offer = _profile_offer([cand, base, renamed, other], prev)
    assert [(v.name, v.profile_only) for v in offer] == [
        ("base", False), ("cand", True), ("other", True)]  # the leftover candidate is gone


# -- profile-only on the agent ------------------------------------------------------------------
class _Engine:
    def infer(self, lv: LoadedVariant, x: np.ndarray) -> tuple[np.ndarray, float]:
        return np.zeros((x.shape[0], 10), np.float32), 0.1


def lv(s: VariantSpec) -> LoadedVariant:
    return LoadedVariant(s, None, "x")


def test_the_pool_never_serves_a_profile_only_variant():
    pool = ModelPool(engine=_Engine())
    pool.put(lv(spec("base", macs=100)))
    pool.put(lv(spec("cand", macs=100_000, profile_only=True)))
    assert set(pool.specs) == {"base", "cand"} and set(pool.servable) == {"base"}
    seen: list[set[str]] = []

    def chooser(x, specs):
        seen.append(set(specs))
        return "base", Reason.INITIAL

    x = np.zeros((1, 1, 8, 8), np.float32)
    assert pool.run(x, chooser).variant == "base"
    assert seen == [{"base"}]  # the policy never even sees it
    # The served one unloaded: the fallback takes a servable one, never the candidate.
    pool.unload("base")
    pool.put(lv(spec("other", macs=90_000)))
    assert pool.run(x, chooser).variant == "other"


def test_info_on_the_socket_api_marks_a_profile_only_variant():
    """An application asking the agent what it holds is told which variants never serve."""
    from types import SimpleNamespace

    from prunefleet.agent.api import agent_info

    pool = ModelPool(engine=_Engine())
    pool.put(lv(spec("base", macs=100)))
    pool.put(lv(spec("cand", macs=100_000, profile_only=True)))
    info = agent_info(SimpleNamespace(pool=pool, device_id="dev-1", active_variant="base"))
    assert {v["name"]: v["profile_only"] for v in info["variants"]} == {
        "base": False, "cand": True}


def test_a_profile_only_session_never_displaces_a_serving_one_under_the_cap():
    pool = ModelPool(max_loaded=1, engine=_Engine())
    pool.put(lv(spec("base")))
    pool.put(lv(spec("cand", profile_only=True)))
    assert set(pool.table) == {"base"} and "cand" in pool.specs


def test_a_candidate_offered_to_serve_later_is_installed_again():
    pool = ModelPool(engine=_Engine())
    pool.put(lv(spec("cand", profile_only=True)))
    assert not pool.serving(spec("cand"))
    assert pool.serving(spec("cand", profile_only=True))


def test_an_installed_candidate_does_not_retire_what_serves():
    f = ManifestFollower(TrustedKeys([KEY.public]), "dev-1", None, PolicyConfig())
    f.offer(KEY.sign(manifest(spec("new"), spec("cand", profile_only=True), version=2)),
            "device", NOW)
    installed = {"old": spec("old"), "cand": spec("cand", profile_only=True)}
    assert f.retire(installed) == []  # "new" is not in yet: "old" keeps serving
    installed["new"] = spec("new")
    assert f.retire(installed) == ["old"]


# -- the loop through the fleet (fake API, fake clock) ------------------------------------------
@dataclass
class FakeApi:
    """Two devices of the class; d1 profiles the candidate, d2 never does."""

    profiled: dict[str, dict] = field(default_factory=dict)
    actions: list[tuple[int, str]] = field(default_factory=list)
    polls: int = 0
    sha: str = "c" * 64

    def class_devices(self, cls):
        return {"devices": [{"device_id": d, "online": True, "manifest_version": 1}
                            for d in ("d1", "d2")]}

    def create_rollout(self, body):
        assert body["config"]["profile_only"] and body["target"]["devices"] == ["d1", "d2"]
        return {"id": 7, "variants": [{"name": "cand", "sha256": self.sha}]}

    def variants(self):
        return [{"name": "cand", "sha256": self.sha, "accuracy": 0.95, "macs": 10}]

    def device_profile(self, d):
        self.polls += 1
        if d == "d1" and self.polls > 4:
            return {"profiles": {"cand": {"sha256": self.sha, "latency_ms_p95": 2.0,
                                          "latency_ms_p50": 1.0}}}
        return {"profiles": {}}

    def rollout(self, rid):
        return {"devices": [{"device_id": "d1", "phase": "installed"},
                            {"device_id": "d2", "phase": "installed"}]}

    def rollout_action(self, rid, action):
        self.actions.append((rid, action))
        return {"rollback": {"restored": ["d1", "d2"], "skipped": []}}


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.t += s


def test_partial_evidence_at_the_deadline_is_reported_as_such_and_the_devices_restored():
    api, clock = FakeApi(), FakeClock()
    doc = run_tune(api, TuneOptions("cls", ("cand",), devices=2, timeout_s=30, poll_s=1),
                   clock=clock, sleep=clock.sleep, wall=clock)
    t = doc["tune"]
    assert clock.t == 30  # it waited for d2 until the deadline, no longer
    assert t["evidence"] == "partial" and t["missing"] == ["d2:cand"]
    assert api.actions == [(7, "rollback")] and t["restored"] == ["d1", "d2"]
    assert doc["variants"] == [api.sha] and t["chosen"] == ["cand"]
    (row,) = t["candidates"]
    assert row["devices_measured"] == 1 and row["devices_expected"] == 2
    json.dumps(doc)  # what --out holds


def test_the_devices_are_restored_even_when_the_wait_fails():
    api, clock = FakeApi(), FakeClock()

    def broken(d):
        raise ApiError("server went away", 503)

    api.device_profile = broken
    with pytest.raises(ApiError):
        run_tune(api, TuneOptions("cls", ("cand",)), clock=clock, sleep=clock.sleep)
    assert api.actions == [(7, "rollback")]


def test_rollout_status_marks_a_profile_only_rollout():
    from prunefleet.server.admin import _rollout_line

    r = {"id": 7, "status": "active", "stage": "canary",
         "target": {"kind": "class", "device_class": "cls"},
         "variants": [{"name": "cand"}], "config": {"profile_only": True},
         "counts": {"succeeded": 0, "total": 2, "failed": 0, "pending": 2, "waiting": 0}}
    assert _rollout_line(r)[4] == "cand (profile only)"
    r["config"] = {}
    assert _rollout_line(r)[4] == "cand"
