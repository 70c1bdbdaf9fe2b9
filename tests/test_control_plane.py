"""The control plane trusts no device: on real mosquitto, a real server and real agents.

* Membership is the server's: a device whose configuration names a group asks to join it;
  until the operator approves, it is offered none of that group's rollouts.
* A device's rollout reports count only for the manifest it was offered: a hostile device
  (valid credentials, its own topics) that reports "installed" for another device's or a
  future version changes no rollout.
* Pins travel only in the signed desired state (``prunefleet pin`` / ``unpin``); the old,
  unsigned commands topic is read by no agent.
* Key retirement is a signed revocation the agents keep, and a runaway version is refused.
"""

from __future__ import annotations

import json
import uuid

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from fleet_helpers import wait_for
from rollout_helpers import Fleet

from prunefleet.server import cli
from prunefleet.shared.messages import (
    InstalledVariant,
    Manifest,
    Reason,
    ReportedState,
    RolloutPhase,
    RolloutReport,
    SignedManifest,
    VariantSpec,
    decode,
)
from prunefleet.shared.signing import SigningKey, keyid_of, load_public_pem


@pytest.fixture
def fleet(tmp_path, mosquitto):
    f = Fleet(tmp_path, mosquitto.url)
    f.start_server()
    yield f
    f.close()


class Device:
    """A hostile device: its own MQTT identity, publishing whatever it likes on its own
    topics (the shipped ACL lets a device write there and nowhere else)."""

    def __init__(self, fleet: Fleet, device_id: str):
        self.id = device_id
        self.fleet = fleet
        host, port = fleet.broker_url.removeprefix("mqtt://").split(":")
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2,
                                  client_id=f"{device_id}-{uuid.uuid4().hex[:6]}")
        self.client.connect(host, int(port))
        self.client.loop_start()

    def publish(self, channel: str, payload: bytes, retain: bool = False) -> None:
        topic = f"{self.fleet.prefix}/devices/{self.id}/{channel}"
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(10)

    def report(self, version: int, phase: RolloutPhase = RolloutPhase.INSTALLED,
               group: str | None = None) -> None:
        self.publish("reported", ReportedState(
            device_id=self.id, online=True, ts=1.0, group=group, manifest_version=version,
            installed=[InstalledVariant(name="v1", sha256="a" * 64, size=1)],
            rollout=RolloutReport(manifest_version=version, phase=phase)).encode(),
            retain=True)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def _ticks(fleet: Fleet, n: int = 3) -> None:
    assert fleet.svc is not None and fleet.svc.controller is not None
    for _ in range(n):
        fleet.svc.controller.tick()


def _cli(fleet: Fleet, *argv: str) -> int:
    assert fleet.svc is not None
    return cli.main([*argv, "--server", fleet.svc.url, f"--token={fleet.svc.token}"])


def _unoffered(fleet: Fleet) -> int:
    assert fleet.svc is not None and fleet.svc.fleet is not None
    return fleet.svc.fleet.counters.unoffered_reports


# -- membership --------------------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_a_device_reporting_a_group_is_offered_none_of_its_rollouts_until_approved(fleet,
                                                                                  capsys):
    fleet.api.set_groups("dev-b", ["field"])
    fleet.api.set_groups("dev-c", ["field"])
    for d in ("dev-b", "dev-c"):
        fleet.start_agent(d, group="field")
    # Valid credentials, a configuration that names the group, and an id that sorts first:
    # before, it joined the group and was picked as the only canary.
    intruder = fleet.start_agent("aaa-intruder", group="field")
    fleet.wait_known(["dev-b", "dev-c", "aaa-intruder"])
    wait_for(lambda: fleet.api.request("GET", "/v1/devices/aaa-intruder")["requested_group"]
             == "field", 10, what="the intruder's request stored")
    shown = fleet.api.request("GET", "/v1/devices/aaa-intruder")
    assert shown["groups"] == []
    assert _cli(fleet, "devices") == 0
    assert "(asks field)" in capsys.readouterr().out

    fleet.register_mlp("v1", hidden=16)
    r = fleet.api.create_rollout({"target": {"kind": "group", "group": "field"},
                                  "variants": ["v1"], "config": {"canary_percent": 10}})
    assert [d["device_id"] for d in r["devices"] if d["stage"] == "canary"] == ["dev-b"]
    done = fleet.wait_rollout(r["id"], "completed")
    assert {d["device_id"] for d in done["devices"]} == {"dev-b", "dev-c"}
    assert intruder.manifest is None and intruder.store.accepted_version() == 0
    assert fleet.svc is not None and fleet.svc.store.latest_manifest("aaa-intruder") is None

    # The operator approves: from now on it is a member like the others.
    assert _cli(fleet, "devices", "approve", "aaa-intruder") == 0
    assert "aaa-intruder: joined field" in capsys.readouterr().out
    assert fleet.api.request("GET", "/v1/devices/aaa-intruder")["groups"] == ["field"]
    r = fleet.api.create_rollout({"target": {"kind": "group", "group": "field"},
                                  "variants": ["v1"]})
    done = fleet.wait_rollout(r["id"], "completed")
    assert "aaa-intruder" in {d["device_id"] for d in done["devices"]}
    assert "v1" in intruder.pool.table
    assert _cli(fleet, "devices", "approve", "aaa-intruder") == 1  # nothing asked now
    assert "asks for no group (HTTP 409)" in capsys.readouterr().err


@pytest.mark.timeout(90)
def test_forged_installed_reports_promote_nothing(fleet):
    # Two members that are offline: the canary can only succeed if a report is believed.
    fleet.api.set_groups("dev-b", ["field"])
    fleet.api.set_groups("dev-c", ["field"])
    fleet.register_mlp("v1", hidden=16)
    r = fleet.api.create_rollout({"target": {"kind": "group", "group": "field"},
                                  "variants": ["v1"], "config": {"canary_percent": 10}})
    canary = {d["device_id"]: d["offered_version"] for d in r["devices"] if d["stage"]}
    assert list(canary) == ["dev-b"]
    offered = canary["dev-b"]

    evil = Device(fleet, "aaa-evil")
    try:
        # Not in the group, it claims the canary's manifest and the next versions.
        for version in (offered, offered + 1, offered + 2):
            evil.report(version, group="field")
        wait_for(lambda: _unoffered(fleet) >= 3, 10, what="the forged reports ingested")
        _ticks(fleet)
        now = fleet.api.rollout(r["id"])
        assert (now["status"], now["stage"], now["counts"]["succeeded"]) == (
            "active", "canary", 0)
        assert "aaa-evil" not in {d["device_id"] for d in now["devices"]}
        assert fleet.svc is not None and fleet.svc.store.rollout_report("aaa-evil") is None
    finally:
        evil.close()

    # The canary itself, hostile now: "installed" for versions it was never offered
    # (the next one, and one issued to no one yet) changes nothing either,
    dev_b = Device(fleet, "dev-b")
    try:
        before = _unoffered(fleet)
        for version in (offered + 1, offered + 50):
            dev_b.report(version)
        wait_for(lambda: _unoffered(fleet) >= before + 2, 10, what="the reports ingested")
        _ticks(fleet)
        now = fleet.api.rollout(r["id"])
        assert (now["stage"], now["counts"]["succeeded"]) == ("canary", 0)
        # while its report on the version it was offered counts, at once.
        dev_b.report(offered)
        wait_for(lambda: fleet.api.rollout(r["id"])["stage"] == "rest", 10,
                 what="the canary promoted")
    finally:
        dev_b.close()


@pytest.mark.timeout(90)
def test_a_rejected_manifest_fails_the_device_at_once_with_its_reason(fleet):
    """An agent that refuses its desired state (here: it pins a key the server does not
    sign with) reports that version failed; the rollout halts without waiting for the
    device timeout."""
    other = fleet.tmp / "other.pem"
    other.write_bytes(SigningKey.generate().public_pem())
    fleet.start_agent("dev-x", trusted=[other])
    fleet.wait_known(["dev-x"])
    fleet.register_mlp("v1", hidden=16)
    r = fleet.api.create_rollout({"target": {"kind": "devices", "devices": ["dev-x"]},
                                  "variants": ["v1"],
                                  "config": {"device_timeout_s": 3600,
                                             "canary_timeout_s": 3600}})
    halted = fleet.wait_rollout(r["id"], "halted")
    (dev,) = halted["devices"]
    assert dev["phase"] == "failed"
    assert dev["reason"] == "manifest rejected: manifest is signed by no trusted key"


# -- pins through the signed desired state -----------------------------------------------------


@pytest.mark.timeout(120)
def test_pin_and_unpin_a_group_and_a_device_from_the_cli(fleet, capsys):
    devices = ["dev-p1", "dev-p2"]
    for d in devices:
        fleet.api.set_groups(d, ["lab"])
        fleet.start_agent(d)
    fleet.wait_known(devices)
    fleet.register_mlp("small", hidden=8)
    fleet.register_mlp("big", hidden=32, seed=1)
    r = fleet.api.create_rollout({"target": {"kind": "group", "group": "lab"},
                                  "variants": ["small", "big"],
                                  "policy": {"battery_low_percent": 45.0}})
    fleet.wait_rollout(r["id"], "completed")
    x = np.zeros((1, 1, 8, 8), np.float32)
    assert all(fleet.agent(d).predict(x).reason != Reason.PINNED for d in devices)
    assert fleet.svc is not None
    before = {d: fleet.svc.store.latest_manifest(d).version for d in devices}

    assert _cli(fleet, "pin", "lab", "small") == 0
    out = capsys.readouterr().out
    assert "dev-p1: pinned to small" in out and "dev-p2: pinned to small" in out
    for d in devices:
        wait_for(lambda d=d: fleet.agent(d).predict(x).reason == Reason.PINNED, 20,
                 what=f"{d} pinned")
        assert fleet.agent(d).predict(x).variant == "small"
        m = fleet.agent(d).manifest
        assert m is not None and m.version > before[d]
        # Same variants and policy as before: only the pin changed.
        assert [v.name for v in m.variants] == ["small", "big"]
        assert m.policy == {"battery_low_percent": 45.0}

    # The old, unsigned commands topic: an "unpin" there changes nothing.
    rogue = Device(fleet, "dev-p1")
    try:
        rogue.publish("commands", json.dumps({"schema": 1, "command_id": "c1",
                                              "kind": "unpin"}).encode())
    finally:
        rogue.close()
    assert _cli(fleet, "unpin", "dev-p1") == 0  # a device id: that device only
    assert "dev-p1: unpinned" in capsys.readouterr().out
    wait_for(lambda: fleet.agent("dev-p1").predict(x).reason != Reason.PINNED, 20,
             what="dev-p1 unpinned")
    served = fleet.agent("dev-p2").predict(x)
    assert (served.variant, served.reason) == ("small", Reason.PINNED)
    assert fleet.agent("dev-p1").counters.invalid_messages == 0, "the command was not read"

    assert _cli(fleet, "pin", "dev-p1", "nope") == 1
    assert "'nope' is not in its desired state" in capsys.readouterr().err
    assert _cli(fleet, "pin", "no-such-thing", "small") == 1
    assert "HTTP 404" in capsys.readouterr().err


# -- key retirement and version jumps ----------------------------------------------------------


def _sign_for(key, device: str, version: int, variants: list[VariantSpec]) -> bytes:
    import time

    now = time.time()
    m = Manifest(target=device, version=version, issued_at=now, expires_at=now + 3600,
                 variants=variants)
    return key.sign(m).encode()


@pytest.mark.timeout(120)
def test_a_retired_key_is_revoked_on_the_agents_for_good(fleet, capsys):
    keys = fleet.state_dir / "keys"
    old_pub = fleet.tmp / "old-public.pem"
    old_pub.write_bytes((keys / "public.pem").read_bytes())
    old_private = SigningKey.from_pem((keys / "signing.pem").read_bytes())
    assert cli.main(["keys", "rotate", "--keys", str(keys)]) == 0
    trusted = [old_pub, keys / "public.pem"]  # an agent installed mid-rotation pins both
    agent = fleet.start_agent("dev-r", trusted=trusted)
    fleet.wait_known(["dev-r"])
    fleet.register_mlp("v1", hidden=16)
    r = fleet.api.create_rollout({"target": {"kind": "devices", "devices": ["dev-r"]},
                                  "variants": ["v1"]})
    fleet.wait_rollout(r["id"], "completed")
    old_id = keyid_of(load_public_pem(old_pub.read_bytes()))
    assert agent.follower.revoked == frozenset()

    assert cli.main(["keys", "retire", "--keys", str(keys)]) == 0
    assert "revoked" in capsys.readouterr().out
    # The running server re-signs every desired state, naming the retired key.
    wait_for(lambda: agent.follower.revoked == {old_id}, 20,
             what="the agent to take the revocation")
    # ...and keeps it on disk (written in the same loop step, just after).
    saved = agent.state_dir / "revoked-keys.json"
    wait_for(saved.exists, 10, what="the revocation kept on disk")
    assert json.loads(saved.read_text()) == [old_id]
    following = agent.manifest
    assert following is not None

    # Whoever still holds the old private key signs a newer desired state: refused.
    topic = f"{fleet.prefix}/devices/dev-r/desired"
    spec = following.variants[0]
    assert fleet.svc is not None and fleet.svc.fleet is not None
    fleet.svc.fleet.publish_raw(topic, _sign_for(old_private, "dev-r", following.version + 5,
                                                 [spec]), retain=True)
    wait_for(lambda: agent.counters.rejected_manifests >= 1, 10, what="the forgery refused")
    assert agent.reporter.last_error == "manifest rejected: manifest is signed by a revoked key"
    assert agent.manifest == following and "v1" in agent.pool.table

    # After a restart (the forgery is still the retained state) the key stays revoked.
    fleet.stop_agent("dev-r")
    agent = fleet.start_agent("dev-r", trusted=trusted)
    assert agent.follower.revoked == {old_id}
    wait_for(lambda: agent.counters.rejected_manifests >= 1, 10,
             what="the retained forgery refused again")
    assert agent.manifest is not None and agent.manifest.version == following.version

    # A runaway version, even signed by the current key, is refused; the next real one is
    # still followed.
    ring = fleet.svc.fleet.key
    jump = following.version + 10**8 + 1  # past the agent's default max_version_jump
    fleet.svc.fleet.publish_raw(topic, _sign_for(ring, "dev-r", jump, [spec]), retain=True)
    wait_for(lambda: agent.counters.rejected_manifests >= 2, 10, what="the jump refused")
    assert "jumps more than" in (agent.reporter.last_error or "")
    assert _cli(fleet, "pin", "dev-r", "v1") == 0
    wait_for(lambda: agent.manifest is not None and agent.manifest.pinned_variant == "v1", 20,
             what="the next real desired state followed")
    signed = decode(SignedManifest, fleet.svc.store.latest_manifest("dev-r").signed)
    assert json.loads(signed.payload)["revoked_keyids"] == [old_id]
