"""A revoked device counts for nothing at the server, even before the broker's password
file is reloaded: what it still sends is dropped (and counted), and no rollout offers it
anything."""

from __future__ import annotations

import pytest
from fleet_helpers import wait_for
from rollout_helpers import Fleet


@pytest.fixture
def fleet(tmp_path, mosquitto):
    f = Fleet(tmp_path, mosquitto.url)
    f.start_server()
    yield f
    f.close()


@pytest.mark.timeout(90)
def test_a_revoked_device_is_ignored_and_offered_nothing(fleet):
    devices = ["dev-0", "dev-1"]
    for d in devices:
        fleet.start_agent(d)
    fleet.wait_known(devices)
    store = fleet.svc.store
    wait_for(lambda: all(store.telemetry_count(d) > 0 for d in devices), 20,
             what="telemetry from both devices")

    assert fleet.api.revoke_device("dev-1")["device_id"] == "dev-1"
    dropped = fleet.svc.fleet.counters.dropped
    before = dropped["revoked"]
    stored = store.telemetry_count("dev-1")
    # Its agent keeps sending (the broker has not been told yet): every batch is dropped.
    agent = fleet.agent("dev-1")
    agent.cut_telemetry()
    wait_for(lambda: dropped["revoked"] > before, 20, what="a revoked device's batch dropped")
    assert store.telemetry_count("dev-1") == stored

    # Offline from the revocation on (its "online" counts for nothing either, and the broker
    # drops a revoked client without its Last Will), so it can be decommissioned at once.
    online = {d["device_id"]: d["online"] for d in fleet.api.devices()}
    assert online == {"dev-0": True, "dev-1": False}
    agent._publish_reported()  # it says "online" again
    wait_for(lambda: dropped["revoked"] > before + 1, 20, what="its reported state dropped")
    assert {d["device_id"]: d["online"] for d in fleet.api.devices()}["dev-1"] is False

    fleet.register_mlp("v1", hidden=16)
    r = fleet.api.create_rollout({"target": {"kind": "fleet"}, "variants": ["v1"]})
    assert [d["device_id"] for d in r["devices"]] == ["dev-0"]
    done = fleet.wait_rollout(r["id"], "completed")
    assert done["counts"]["total"] == 1 and done["counts"]["succeeded"] == 1
    assert "v1" not in fleet.agent("dev-1").pool.specs
    assert fleet.api.delete_device("dev-1")["deleted"] is True
