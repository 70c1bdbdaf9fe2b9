"""A re-profile requested from outside the agent: ``prunefleet devices profile ID --refresh``
(or ``--group G --refresh``) travels in the signed desired state (``Manifest.reprofile``),
and the agent measures every installed variant again, once per request.

End to end on real mosquitto: a real agent (ONNX Runtime) installs a variant through a
rollout, profiles it, gets a refresh request, reports a newer profile; after a restart it
keeps the epoch it acted on and does not measure again.
"""

from __future__ import annotations

import json
import time

import pytest
from fleet_helpers import wait_for
from rollout_helpers import Fleet

from prunefleet.agent.service import Agent
from prunefleet.server import cli
from prunefleet.shared.messages import Manifest, VariantSpec, decode
from prunefleet.shared.signing import SigningKey

KEY = SigningKey.generate()


def _manifest(reprofile: int = 0) -> Manifest:
    spec = VariantSpec(name="a", sha256="a" * 64, size=10, chunk_bytes=1024,
                       chunk_sha256=["b" * 64], input_shape=[1, 4], num_classes=2, params=1,
                       macs=1)
    now = time.time()
    return Manifest(target="dev-1", version=7, issued_at=now, expires_at=now + 60,
                    variants=[spec], reprofile=reprofile)


def test_the_epoch_is_left_out_of_the_signed_bytes_until_one_is_requested():
    plain = KEY.sign(_manifest())
    assert "reprofile" not in plain.payload  # agents of the last release accept it
    asked = KEY.sign(_manifest(reprofile=5))
    assert decode(Manifest, asked.payload).reprofile == 5
    # A manifest from before the field is valid and asks for nothing.
    old = json.loads(plain.payload)
    assert decode(Manifest, json.dumps(old)).reprofile == 0


@pytest.fixture
def fleet(tmp_path, mosquitto, monkeypatch):
    f = Fleet(tmp_path, mosquitto.url)
    f.start_server()
    monkeypatch.setenv("PRUNEFLEET_SERVER", f.svc.url)
    monkeypatch.setenv("PRUNEFLEET_TOKEN", f.svc.token)
    yield f
    f.close()


def _measured_at(fleet: Fleet, device: str) -> float | None:
    """When the device measured its profile of "small", as the server shows it."""
    p = fleet.api.device_profile(device)["profiles"].get("small")
    return p["ts"] if p else None


@pytest.mark.timeout(120)
def test_a_refresh_request_measures_again_once_and_a_restart_does_not(fleet, capsys):
    dev = "rep-0"
    fleet.start_agent(dev)
    fleet.wait_known([dev])
    fleet.register_mlp("small", hidden=8)
    r = fleet.api.create_rollout({"target": {"kind": "devices", "devices": [dev]},
                                  "variants": ["small"]})
    fleet.wait_rollout(r["id"], "completed")
    first = wait_for(lambda: _measured_at(fleet, dev), 60, what="the first profile")

    assert cli.main(["devices", "profile", dev, "--refresh"]) == 0
    assert f"{dev}: asked to profile its variants again" in capsys.readouterr().out
    second = wait_for(lambda: (t := _measured_at(fleet, dev)) and t > first and t, 60,
                      what="a newer profile at the server")
    agent = fleet.agent(dev)
    epoch = agent.follower.manifest.reprofile
    assert epoch > 0 and agent.store.reprofile_epoch() == epoch
    assert cli.main(["devices", "profile", dev]) == 0
    out = capsys.readouterr().out
    assert "MEASURED" in out and time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(second)) in out

    # A group's request reaches its members the same way, with a higher epoch.
    fleet.api.set_groups(dev, ["lab"])
    assert cli.main(["devices", "profile", "--group", "lab", "--refresh", "--json"]) == 0
    [asked] = json.loads(capsys.readouterr().out)["devices"]
    assert asked["device_id"] == dev and asked["reprofile"] > epoch
    third = wait_for(lambda: (t := _measured_at(fleet, dev)) and t > second and t, 60,
                     what="a newer profile after the group's request")
    wait_for(lambda: agent.store.reprofile_epoch() == asked["reprofile"], 10,
             what="the epoch kept")
    # Later desired states carry the request on (a device offline meanwhile still gets it).
    pinned = fleet.api.pin(dev, "small")["devices"][0]["manifest_version"]
    wait_for(lambda: agent.follower.manifest.version == pinned, 20, what="the pin followed")
    assert agent.follower.manifest.reprofile == asked["reprofile"]

    # A restart follows the same desired state: the epoch was acted on, nothing is measured.
    # The restarted agent is driven step by step here, so "nothing" is checked after steps
    # that would have asked the profiler (and with nothing it could still be waiting for).
    config = agent.config
    fleet.stop_agent(dev)
    again = Agent(config)
    try:
        again.start()
        wait_for(lambda: (again.step(0.05), again.transport.connected.is_set()
                          and again.follower.manifest is not None
                          and again.profiles.get("small"))[1], 30,
                 what="the restarted agent following its state")
        assert again.follower.manifest.reprofile == asked["reprofile"]
        for _ in range(3):
            again.step(0.05)
        assert not again.profiler.busy and again.profiler.take() == []
        assert again.profiles["small"].ts == third
    finally:
        again.begin_shutdown()
        again.transport.stop()


def test_refresh_needs_a_device_or_a_group(fleet, capsys):
    assert cli.main(["devices", "profile", "--refresh"]) == 2
    assert cli.main(["devices", "profile", "nobody", "--refresh"]) == 1  # unknown: 404
    assert "no device 'nobody'" in capsys.readouterr().err
