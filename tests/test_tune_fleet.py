"""``prunefleet tune --class`` and rollouts to a class, end to end: a real server, real
agents (ONNX Runtime) with configured device classes, real mosquitto.

The candidates go to the class's devices profile-only while they serve live requests: the
devices install and profile them and never serve them (not in any answer, not in
telemetry), and get their own desired state back after. The chosen set then rolls out to
the class from the file tune wrote, and reaches that class's devices only.
"""

from __future__ import annotations

import collections
import json
import threading

import numpy as np
import pytest
from fleet_helpers import wait_for
from rollout_helpers import Fleet

from prunefleet.server import cli
from prunefleet.server.adminclient import ApiError

CLASSES = {"a-0": "edge-a", "a-1": "edge-a", "b-0": "edge-b"}
CANDIDATES = ("cand-small", "cand-big")


@pytest.fixture
def fleet(tmp_path, mosquitto):
    f = Fleet(tmp_path, mosquitto.url)
    f.start_server()
    yield f
    f.close()


@pytest.mark.timeout(240)
def test_tune_measures_candidates_it_never_serves_and_the_class_gets_the_choice(
        fleet, tmp_path, monkeypatch, capsys):
    for d, c in CLASSES.items():
        fleet.start_agent(d, device_class=c)
    fleet.wait_known(list(CLASSES))
    fleet.register_mlp("base", hidden=8, accuracy=0.90)
    r = fleet.api.create_rollout({"target": {"kind": "devices", "devices": list(CLASSES)},
                                  "variants": ["base"]})
    fleet.wait_rollout(r["id"], "completed")
    wait_for(lambda: {d["device_id"] for d in fleet.api.class_devices("edge-a")["devices"]
                      if d["online"] and d["manifest_version"]} == {"a-0", "a-1"},
             20, what="edge-a's devices reporting their class and desired state")
    b_version = fleet.agent("b-0").manifest.version
    fleet.register_mlp("cand-small", hidden=4, seed=2, accuracy=0.93)
    fleet.register_mlp("cand-big", hidden=64, seed=3, accuracy=0.97)

    # Live requests on the class's devices all through the tune.
    served: collections.Counter[str] = collections.Counter()
    installed_seen: set[str] = set()
    stop = threading.Event()

    def requests() -> None:
        x = np.zeros((1, 1, 8, 8), np.float32)
        while not stop.is_set():
            for d in ("a-0", "a-1"):
                agent = fleet.agent(d)
                served[agent.predict(x).variant] += 1
                installed_seen.update(agent.pool.specs)
            stop.wait(0.005)

    load = threading.Thread(target=requests, daemon=True)
    load.start()
    monkeypatch.setenv("PRUNEFLEET_SERVER", fleet.svc.url)
    monkeypatch.setenv("PRUNEFLEET_TOKEN", fleet.svc.token)
    out = tmp_path / "tuned.json"
    try:
        rc = cli.main(["tune", "--class", "edge-a", "--variant", "cand-small", "--variant",
                       "cand-big", "--devices", "5", "--budget-ms", "1000",
                       "--timeout", "90s", "--out", str(out)])
        printed = capsys.readouterr().out
        assert rc == 0, printed
        # Back to their own desired state: the candidates are retired.
        for d in ("a-0", "a-1"):
            wait_for(lambda d=d: set(fleet.agent(d).pool.specs) == {"base"}, 20,
                     what=f"{d} back to its own variants")
    finally:
        stop.set()
        load.join(10)

    doc = json.loads(out.read_text())
    t = doc["tune"]
    assert t["devices"] == ["a-0", "a-1"]  # the class's devices, not b-0
    assert t["evidence"] == "complete" and t["missing"] == []
    assert sorted(t["restored"]) == ["a-0", "a-1"]
    rows = {row["name"]: row for row in t["candidates"]}
    assert set(rows) == set(CANDIDATES)
    for row in rows.values():
        assert row["devices_measured"] == 2 and row["p95_ms"] > 0 and row["meets_budget"]
    assert t["chosen"][0] == "cand-big"  # the most accurate, within budget
    assert doc["class"] == "edge-a" and doc["variants"][0] == rows["cand-big"]["sha256"]
    assert "cand-big" in printed and f"wrote {out}" in printed

    # Installed and profiled on the devices, never served: not in one answer, nor in the
    # telemetry the server stored, nor as the active variant.
    assert set(CANDIDATES) <= installed_seen
    assert set(served) == {"base"} and served["base"] > 0
    total = served["base"]

    def stored() -> dict | None:
        s = fleet.api.telemetry_summary()
        base = s["variants"].get("base")
        return s if base and base["requests"] >= total else None

    summary = wait_for(stored, 30, what="the requests' telemetry stored")
    assert set(summary["variants"]) == {"base"}
    active = {d["device_id"]: d["active_variant"] for d in fleet.api.devices()}
    for d in ("a-0", "a-1"):
        assert active[d] == "base"
        # The server kept no profile of a variant the device no longer has.
        wait_for(lambda d=d: set(fleet.api.device_profile(d)["profiles"]) == {"base"}, 20,
                 what=f"{d}'s profiles back to its own variants")
    # The other class was never offered anything.
    assert fleet.agent("b-0").manifest.version == b_version

    # The chosen set rolls out to the class from the file tune wrote.
    assert cli.main(["rollout", "create", "--file", str(out), "--json"]) == 0
    created = json.loads(capsys.readouterr().out)
    assert created["target"] == {"kind": "class", "device_class": "edge-a", "devices": [],
                                 "group": None}
    assert {d["device_id"] for d in created["devices"]} == {"a-0", "a-1"}
    fleet.wait_rollout(created["id"], "completed")
    for d in ("a-0", "a-1"):
        wait_for(lambda d=d: "cand-big" in fleet.agent(d).pool.servable, 20,
                 what=f"{d} serving the chosen set")
    assert set(fleet.agent("b-0").pool.specs) == {"base"}
    assert fleet.agent("b-0").manifest.version == b_version


@pytest.mark.timeout(60)
def test_a_class_target_and_a_profile_only_offer_refuse_what_cannot_work(fleet, monkeypatch,
                                                                         capsys):
    fleet.start_agent("c-0", device_class="edge-c")
    fleet.wait_known(["c-0"])
    fleet.register_mlp("base", hidden=8)
    monkeypatch.setenv("PRUNEFLEET_SERVER", fleet.svc.url)
    monkeypatch.setenv("PRUNEFLEET_TOKEN", fleet.svc.token)
    capsys.readouterr()
    assert cli.main(["rollout", "create", "--class", "nobody", "--variant", "base"]) == 2
    assert "no device has reported the class 'nobody'" in capsys.readouterr().err
    # c-0 follows no desired state from this server yet: nothing would serve beside.
    wait_for(lambda: fleet.api.class_devices("edge-c")["devices"], 20, what="c-0's class")
    assert cli.main(["tune", "--class", "edge-c", "--variant", "base"]) == 1
    assert "no online device of class 'edge-c' follows a desired state" in \
        capsys.readouterr().err
    assert cli.main(["tune", "--class", "edge-c"]) == 2
    assert "name the candidates" in capsys.readouterr().err
    with pytest.raises(ApiError, match="no desired state from this server yet on c-0"):
        fleet.api.create_rollout({"target": {"kind": "devices", "devices": ["c-0"]},
                                  "variants": ["base"], "config": {"profile_only": True}})
    with pytest.raises(ApiError, match="a profile-only rollout has no waves"):
        fleet.api.create_rollout({"target": {"kind": "devices", "devices": ["c-0"]},
                                  "variants": ["base"],
                                  "config": {"profile_only": True, "waves": [100]}})
