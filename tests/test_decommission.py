"""Retention and decommissioning on real mosquitto: old telemetry goes, a deleted device
is gone from the store and from the broker's retained topics (a restarted server does not
find it again)."""

from __future__ import annotations

import pytest
from fleet_helpers import wait_for
from rollout_helpers import Fleet
from sqlalchemy import func, select

from prunefleet.server.cli import main
from prunefleet.server.store import Telemetry


@pytest.fixture
def fleet(tmp_path, mosquitto):
    f = Fleet(tmp_path, mosquitto.url)
    f.start_server()
    yield f
    f.close()


def _cli(fleet: Fleet) -> list[str]:
    assert fleet.svc is not None
    return ["--server", fleet.svc.url, "--token", fleet.svc.token]


@pytest.mark.timeout(120)
def test_prune_deletes_only_telemetry_older_than_asked(fleet, capsys):
    fleet.start_agent("dev-0")
    fleet.wait_known(["dev-0"])
    store = fleet.svc.store
    wait_for(lambda: store.telemetry_count("dev-0") >= 2, 30, what="telemetry stored")

    assert main(["telemetry", "prune", "--older-than", "1h", *_cli(fleet)]) == 0
    assert "deleted 0 telemetry batches" in capsys.readouterr().out
    assert store.telemetry_count("dev-0") >= 2

    out = fleet.api.prune_telemetry(0.001)
    assert out["deleted"]["telemetry"] >= 2
    with store.session() as s:
        oldest = s.scalar(select(func.min(Telemetry.interval_end)))
    assert oldest is None or oldest >= out["before"]
    assert main(["telemetry", "prune", "--older-than", "soon", *_cli(fleet)]) == 2


@pytest.mark.timeout(120)
def test_a_deleted_device_is_gone_from_the_store_and_the_broker(fleet, capsys):
    fleet.start_agent("dev-0")
    fleet.start_agent("dev-1")
    fleet.wait_known(["dev-0", "dev-1"])
    store = fleet.svc.store
    wait_for(lambda: store.telemetry_count("dev-0") >= 1, 30, what="telemetry stored")

    assert main(["devices", "delete", "dev-0", *_cli(fleet)]) == 1
    assert "is online" in capsys.readouterr().err
    fleet.stop_agent("dev-0")  # a clean stop: it says offline
    wait_for(lambda: not store.device("dev-0").online, 20, what="dev-0 offline")

    assert main(["devices", "delete", "dev-0", *_cli(fleet)]) == 0
    assert store.device("dev-0") is None and store.telemetry_count("dev-0") == 0
    assert {d["device_id"] for d in fleet.api.devices()} == {"dev-1"}
    assert main(["devices", "delete", "dev-0", *_cli(fleet)]) == 1  # nothing left to delete

    # Its retained reported state is gone from the broker: a restarted server, which reads
    # every retained reported state, does not bring it back.
    fleet.stop_server()
    fleet.start_server()
    fleet.wait_known(["dev-1"])
    assert {d["device_id"] for d in fleet.api.devices()} == {"dev-1"}
