"""Gated waves end to end: real agents (ONNX Runtime, their request path, shadow
evaluation) on real mosquitto, and the server judging each wave on its own devices.

A variant that answers like the one it replaces passes every wave; one that disagrees halts
in wave 1, its devices get back what they ran before, and no device outside wave 1 ever
serves it.
"""

from __future__ import annotations

import json
import threading
from collections import defaultdict

import numpy as np
import pytest
from fleet_helpers import wait_for
from onnx_models import make_mlp, scaled_copy
from rollout_helpers import Fleet

from prunefleet.agent.errors import NoVariantError
from prunefleet.server.cli import main

DEVICES = [f"dev-{i}" for i in range(4)]
# Latency is not what these tests judge: a loaded test machine makes shadow runs slow.
GATE = {"min_agreement": 0.97, "max_error_rate": 0.01, "max_p95_ratio": None,
        "min_requests": 30, "observe_s": 90, "sample_share": 0.5}


class Traffic:
    """Live requests on every agent until stopped; remembers which variant served each
    device."""

    def __init__(self, fleet: Fleet, devices: list[str] = DEVICES) -> None:
        self.fleet, self.devices = fleet, devices
        self.served: dict[str, set[str]] = defaultdict(set)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        rng = np.random.default_rng(0)
        while not self.stop.wait(0.005):
            for d in self.devices:
                x = rng.normal(0, 1, (1, 1, 8, 8)).astype(np.float32)
                try:
                    self.served[d].add(self.fleet.agent(d).predict(x).variant)
                except NoVariantError:  # nothing installed yet: not served
                    continue

    def __enter__(self) -> Traffic:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(10)


@pytest.fixture
def fleet(tmp_path, mosquitto):
    f = Fleet(tmp_path, mosquitto.url)
    f.start_server()
    for d in DEVICES:
        f.start_agent(d)
    f.wait_known(DEVICES)
    yield f
    f.close()


@pytest.mark.timeout(300)
def test_a_good_variant_passes_its_waves_and_a_bad_one_halts_in_wave_1(fleet, tmp_path,
                                                                        capsys):
    api = fleet.api
    cli = ["--server", fleet.svc.url, "--token", fleet.svc.token]
    base = make_mlp(tmp_path / "base.onnx", 32, seed=0)
    api.register_variant(base, name="base", macs=64 * 32 + 320, chunk_bytes=4096)
    good = scaled_copy(base, tmp_path / "good.onnx")
    api.register_variant(good, name="good", macs=64 * 32 + 319, chunk_bytes=4096)
    bad = make_mlp(tmp_path / "bad.onnx", 16, seed=7)
    api.register_variant(bad, name="bad", macs=64 * 16 + 160, chunk_bytes=4096)
    r0 = api.create_rollout({"target": {"kind": "fleet"}, "variants": ["base"]})
    fleet.wait_rollout(r0["id"], "completed", timeout_s=60)

    with Traffic(fleet) as traffic:
        r1 = api.create_rollout({"target": {"kind": "fleet"}, "variants": ["good"],
                                 "config": {"waves": [25, 50, 100], "gate": GATE}})
        done = fleet.wait_rollout(r1["id"], "completed", timeout_s=150)
        assert [w["verdict"] for w in done["waves"]] == ["pass", "pass", "pass"]
        assert [w["devices"] for w in done["waves"]] == [1, 1, 2]
        for w in done["waves"]:
            assert w["variants"]["good"]["agreement"] >= 0.97
            assert w["variants"]["good"]["samples"] >= 30
        counts = done["counts"]

        # The same gate from a rollout file, through the command line.
        rollout_toml = tmp_path / "rollout.toml"
        rollout_toml.write_text(
            'variants = ["bad"]\nfleet = true\nwaves = [25, 100]\n\n[gate]\n'
            'min_agreement = 0.97\nmax_error_rate = 0.01\nmin_requests = 30\n'
            'observe = "90s"\nsample_share = 0.5\n')
        capsys.readouterr()
        assert main(["rollout", "create", "--file", str(rollout_toml), "--max-p95-ratio",
                     "1000", *cli, "--json"]) == 0
        r2 = json.loads(capsys.readouterr().out)
        assert r2["config"]["gate"]["observe_s"] == 90 and r2["config"]["waves"] == [25, 100]
        halted = fleet.wait_rollout(r2["id"], "halted", timeout_s=150)
        wave1 = {d["device_id"] for d in halted["devices"] if d["stage"] == "wave1"}
        assert len(wave1) == 1
        assert "wave 1 failed its gate" in halted["reason"]
        assert "rolled back its 1 device(s)" in halted["reason"]
        (w1,) = halted["waves"]
        assert w1["verdict"] == "fail" and w1["variants"]["bad"]["agreement"] < 0.97
        assert all(d["stage"] is None for d in halted["devices"] if d["device_id"] not in wave1)
        # The wave's device runs what it ran before again.
        (d1,) = wave1
        wait_for(lambda: "bad" not in fleet.agent(d1).pool.specs, 30,
                 what=f"{d1} without the bad variant")

    for d in DEVICES:
        if d not in wave1:
            assert "bad" not in traffic.served[d], f"{d} served the bad variant"
            assert "bad" not in fleet.agent(d).pool.specs
    # A finished rollout's counts stay as they were when it finished.
    assert api.rollout(r1["id"])["counts"] == counts

    capsys.readouterr()
    assert main(["rollout", "status", str(r2["id"]), *cli]) == 0
    out = capsys.readouterr().out
    assert "AGREEMENT (MIN)" in out and "fail" in out and "(0.97)" in out
    # Its one offered device already runs what it ran before: a rollback changes nothing.
    assert main(["rollout", "rollback", str(r2["id"]), *cli]) == 1
    assert "changes nothing" in capsys.readouterr().err


@pytest.mark.timeout(180)
def test_a_device_offline_for_the_whole_wave_is_missing_evidence(fleet, tmp_path):
    api = fleet.api
    base = make_mlp(tmp_path / "base.onnx", 32, seed=0)
    api.register_variant(base, name="base", macs=64 * 32 + 320, chunk_bytes=4096)
    good = scaled_copy(base, tmp_path / "good.onnx")
    api.register_variant(good, name="good", macs=64 * 32 + 319, chunk_bytes=4096)
    pair = {"kind": "devices", "devices": ["dev-2", "dev-3"]}
    r0 = api.create_rollout({"target": pair, "variants": ["base"]})
    fleet.wait_rollout(r0["id"], "completed", timeout_s=60)
    fleet.stop_agent("dev-3")
    wait_for(lambda: not {d["device_id"]: d["online"] for d in api.devices()}["dev-3"], 20,
             what="dev-3 offline at the server")

    with Traffic(fleet, ["dev-2"]):
        r = api.create_rollout({"target": pair, "variants": ["good"], "config": {
            "waves": [100], "gate": {**GATE, "min_requests": 10, "observe_s": 6}}})
        halted = fleet.wait_rollout(r["id"], "halted", timeout_s=60)
    assert "insufficient evidence" in halted["reason"]
    assert "1 of 2 devices reported" in halted["reason"]
    (w1,) = halted["waves"]
    assert (w1["verdict"], w1["devices"], w1["reporting"]) == ("insufficient", 2, 1)
    assert w1["variants"]["good"]["agreement"] >= 0.97  # what dev-2 showed did not pass it

    # Resuming gives the wave a new window, and its devices evaluate again.
    resumed = api.rollout_action(r["id"], "resume")
    assert "shadow evaluation renewed on 2 device(s)" in resumed["reason"]
