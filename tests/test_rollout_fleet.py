"""Staged rollouts on real mosquitto: a server with its HTTP API, in-process agents.

Canary then rest; a failing variant halts at the canary; rollback; pause and resume;
an offline device catches up when it returns; a server restart mid-rollout continues.
"""

from __future__ import annotations

import base64

import numpy as np
import pytest
from fleet_helpers import wait_for
from rollout_helpers import Fleet, pg_schema_url


@pytest.fixture
def fleet(tmp_path, mosquitto):
    f = Fleet(tmp_path, mosquitto.url)
    f.start_server()
    yield f
    f.close()


def _stage(r: dict) -> dict[str, str | None]:
    return {d["device_id"]: d["stage"] for d in r["devices"]}


def _installed(agent, name: str) -> bool:
    return name in agent.pool.table


def _ticks(fleet: Fleet, n: int = 3) -> None:
    """Advance every rollout ``n`` times now (the server also ticks on its own, every
    0.2 s): what holds after these ticks is what the controller decided, not a race."""
    assert fleet.svc is not None and fleet.svc.controller is not None
    for _ in range(n):
        fleet.svc.controller.tick()


@pytest.mark.timeout(120)
def test_canary_then_rest_then_a_failing_variant_halts_and_rolls_back(fleet):
    devices = [f"dev-{i}" for i in range(4)]
    for d in devices:
        fleet.start_agent(d)
    fleet.wait_known(devices)
    v1 = fleet.register_mlp("v1", hidden=32)

    r = fleet.api.create_rollout({
        "target": {"kind": "fleet"}, "variants": ["v1"],
        "config": {"canary_percent": 25, "success_threshold": 1.0},
    })
    rid = r["id"]
    # Only the canary is offered at first; nothing else until it reports success.
    assert [d for d, s in _stage(r).items() if s] == ["dev-0"]
    assert r["devices"][0]["offered_version"] >= 1

    done = fleet.wait_rollout(rid, "completed")
    assert done["counts"] == {"total": 4, "waiting": 0, "pending": 0, "succeeded": 4,
                              "failed": 0, "timed_out": 0}
    assert _stage(done) == {"dev-0": "canary", "dev-1": "rest", "dev-2": "rest",
                            "dev-3": "rest"}
    notes = [h["note"] for h in done["history"]]
    assert any(n.startswith("promoted") for n in notes), notes
    # The canary was promoted before the rest were offered.
    canary_at = done["devices"][0]["offered_at"]
    assert all(d["offered_at"] > canary_at for d in done["devices"][1:])
    for d in devices:
        assert _installed(fleet.agent(d), "v1")
        assert fleet.agent(d).predict(np.zeros((1, 1, 8, 8), np.float32)).variant == "v1"

    # A variant whose golden output is wrong: every agent's smoke test refuses it.
    # Registration refuses such a golden pair now, so the registry entry is damaged after
    # registration (as one registered by an older server, or a store restored badly).
    bad_golden = {"input_b64": base64.b64encode(np.ones(64, np.float32).tobytes()).decode(),
                  "output_b64": base64.b64encode(np.full(10, 7, np.float32).tobytes()).decode()}
    with pytest.raises(Exception, match="HTTP 422"):
        fleet.register_mlp("broken", hidden=48, seed=3, golden=bad_golden)
    broken = fleet.register_mlp("broken", hidden=48, seed=3)
    row = fleet.svc.store.variant(broken["sha256"])
    fleet.svc.store.add_variant(row.name, row.sha256, row.path,
                                {**row.spec, "golden": {**row.spec["golden"], **bad_golden}},
                                row.report)
    r2 = fleet.api.create_rollout({
        "target": {"kind": "fleet"}, "variants": ["broken"],
        "config": {"canary_percent": 25},
    })
    halted = fleet.wait_rollout(r2["id"], "halted")
    assert "1 of 1 offered devices failed" in halted["reason"]
    by_id = {d["device_id"]: d for d in halted["devices"]}
    assert by_id["dev-0"]["phase"] == "failed"
    assert "golden" in by_id["dev-0"]["reason"]
    assert [d for d, s in _stage(halted).items() if s] == ["dev-0"], "the rest was spared"
    _ticks(fleet)  # a halted rollout stays halted
    assert fleet.api.rollout(r2["id"])["status"] == "halted"
    for d in devices:  # the last known good variant keeps serving everywhere
        assert _installed(fleet.agent(d), "v1") and not _installed(fleet.agent(d), "broken")

    # Roll back: dev-0 gets v1's manifest again, under a new, higher version.
    failed_version = by_id["dev-0"]["offered_version"]
    rb = fleet.api.rollout_action(r2["id"], "rollback")
    assert rb["status"] == "rolled_back"
    assert rb["rollback"] == {"restored": ["dev-0"], "skipped": []}
    d0 = {d["device_id"]: d for d in rb["devices"]}["dev-0"]
    assert d0["offered_version"] > failed_version

    def dev0_back():
        d = {x["device_id"]: x for x in fleet.api.rollout(r2["id"])["devices"]}["dev-0"]
        return d["phase"] in ("installed", "active")

    wait_for(dev0_back, 20, what="dev-0 to report the rolled-back manifest installed")
    agent0 = fleet.agent("dev-0")
    assert agent0.store.accepted_version() == d0["offered_version"]
    assert [v.name for v in agent0.manifest.variants] == [v1["name"]]
    # A finished rollout cannot be paused or resumed.
    with pytest.raises(Exception, match="HTTP 409"):
        fleet.api.rollout_action(r2["id"], "resume")


@pytest.mark.timeout(120)
def test_pause_resume_and_an_offline_device_catches_up(fleet):
    devices = ["a-0", "a-1", "a-2"]
    for d in devices:
        fleet.start_agent(d)
    fleet.wait_known(devices)
    fleet.api.set_groups("a-0", ["lab"])
    fleet.api.set_groups("a-1", ["lab"])
    fleet.api.set_groups("a-2", ["lab", "field"])
    fleet.stop_agent("a-2")  # its Last Will / goodbye marks it offline
    wait_for(lambda: not {d["device_id"]: d for d in fleet.api.devices()}["a-2"]["online"],
             10, what="a-2 offline at the server")
    fleet.register_mlp("v1", hidden=24)

    r = fleet.api.create_rollout({
        "target": {"kind": "group", "group": "lab"}, "variants": ["v1"],
        "config": {"canary_percent": 0, "canary_min_devices": 1},
    })
    rid = r["id"]
    assert _stage(r) == {"a-0": "canary", "a-1": None, "a-2": None}, "online canary first"
    fleet.api.rollout_action(rid, "pause")
    wait_for(lambda: _installed(fleet.agent("a-0"), "v1"), 20, what="canary install")
    _ticks(fleet)  # paused means nothing more is offered
    paused = fleet.api.rollout(rid)
    assert paused["status"] == "paused"
    assert _stage(paused) == {"a-0": "canary", "a-1": None, "a-2": None}
    assert not _installed(fleet.agent("a-1"), "v1")

    fleet.api.rollout_action(rid, "resume")
    wait_for(lambda: _installed(fleet.agent("a-1"), "v1"), 20, what="a-1 install")
    _ticks(fleet)
    r = fleet.api.rollout(rid)
    assert r["status"] == "active", "a-2 is offline: the rollout waits for it"
    assert {d["device_id"]: d["phase"] for d in r["devices"]}["a-2"] is None
    assert r["counts"]["pending"] == 1

    # a-2 comes back: its retained desired state is waiting for it.
    agent2 = fleet.start_agent("a-2")
    wait_for(lambda: _installed(agent2, "v1"), 20, what="a-2 install after reconnecting")
    done = fleet.wait_rollout(rid, "completed")
    assert done["counts"]["succeeded"] == 3


@pytest.fixture(params=["sqlite", "postgresql"])
def fleet_on(request, tmp_path, mosquitto):
    """A fleet whose server keeps its state in SQLite or in PostgreSQL."""
    gen = pg_schema_url() if request.param == "postgresql" else None
    f = Fleet(tmp_path, mosquitto.url, db_url=next(gen) if gen else None)
    f.start_server()
    try:
        yield f
    finally:
        f.close()
        if gen is not None:
            gen.close()


@pytest.mark.timeout(120)
def test_server_restart_mid_rollout_continues(fleet_on):
    fleet = fleet_on
    devices = ["r-0", "r-1", "r-2"]
    for d in devices:
        fleet.start_agent(d)
    fleet.wait_known(devices)
    fleet.register_mlp("v1", hidden=40)
    # Success is "active" (serving): the canary installs, then waits for its first request.
    r = fleet.api.create_rollout({
        "target": {"kind": "devices", "devices": devices}, "variants": ["v1"],
        "config": {"canary_percent": 30, "success_phase": "active"},
    })
    rid = r["id"]
    wait_for(lambda: _installed(fleet.agent("r-0"), "v1"), 20, what="canary install")

    def phase(device: str) -> str | None:
        return {d["device_id"]: d["phase"] for d in fleet.api.rollout(rid)["devices"]}[device]

    wait_for(lambda: phase("r-0") == "installed", 20, what="the server to see r-0 installed")
    _ticks(fleet)
    assert fleet.api.rollout(rid)["stage"] == "canary", "installed is not active yet"
    fleet.stop_server()

    x = np.zeros((1, 1, 8, 8), np.float32)
    assert fleet.agent("r-0").predict(x).variant == "v1"  # active while no server runs
    # Still the canary stage when the server stopped: r-1 was never offered anything.
    assert fleet.agent("r-1").manifest is None and not _installed(fleet.agent("r-1"), "v1")

    fleet.start_server()  # same store and keys; learns the canary's retained report
    wait_for(lambda: all(_installed(fleet.agent(d), "v1") for d in devices), 20,
             what="the rest offered after the restart")
    for d in devices[1:]:
        fleet.agent(d).predict(x)
    done = fleet.wait_rollout(rid, "completed")
    assert done["counts"]["succeeded"] == 3
    notes = [h["note"] for h in done["history"]]
    assert sum(n.startswith("offered") for n in notes) == 2, notes


class _Killed(Exception):
    """The server process dying at that point (its store stays)."""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("where", ["after_signing", "after_publishing"])
def test_a_server_killed_between_offering_and_recording_it_can_still_roll_back(fleet, where):
    """The server signs a canary's new desired state, then dies before it records the
    offer. Restarted, it offers again; the manifest it had signed is not what the device
    ran before, so a rollback gives the device its earlier variant back (it answered
    "changes nothing" and left the device on the new variant)."""
    fleet.start_agent("dev-0")
    fleet.wait_known(["dev-0"])
    fleet.register_mlp("v1", hidden=8)
    fleet.register_mlp("v2", hidden=32, seed=1)
    r1 = fleet.api.create_rollout({"target": {"kind": "devices", "devices": ["dev-0"]},
                                   "variants": ["v1"]})
    fleet.wait_rollout(r1["id"], "completed")
    x = np.zeros((1, 1, 8, 8), np.float32)
    assert fleet.agent("dev-0").predict(x).variant == "v1"

    svc = fleet.svc
    if where == "after_signing":
        real_save = svc.store.save_manifest

        def save_then_die(*a, **kw):
            real_save(*a, **kw)
            raise _Killed

        svc.store.save_manifest = save_then_die  # type: ignore[method-assign]
    else:
        real_deploy = svc.controller.fleet.deploy

        def deploy_then_die(*a, **kw):
            real_deploy(*a, **kw)
            raise _Killed

        svc.controller.fleet.deploy = deploy_then_die  # type: ignore[method-assign]
    with pytest.raises(Exception):  # noqa: B017 - whatever the API makes of the death
        fleet.api.create_rollout({"target": {"kind": "devices", "devices": ["dev-0"]},
                                  "variants": ["v2"]})
    fleet.stop_server()
    fleet.start_server()  # the same store
    rid = max(r["id"] for r in fleet.api.rollouts())
    fleet.wait_rollout(rid, "completed", 60)
    wait_for(lambda: fleet.agent("dev-0").predict(x).variant == "v2", 20, what="v2 serving")
    rb = fleet.api.rollout_action(rid, "rollback")
    assert rb["rollback"]["restored"] == ["dev-0"], rb
    wait_for(lambda: fleet.agent("dev-0").predict(x).variant == "v1", 20, what="v1 again")
