"""A device with valid credentials plays the attacker on the shipped production broker
config (deploy/mosquitto/prunefleet.conf + acl, real mosquitto, TLS, password file): one
test per attack that the broker must stop. docs/security.md names each."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from conftest import MosquittoProcess
from prod_broker import SERVER_PASSWORD, connect, start_production_broker

DEVICES = {"dev1": "pw-dev1-" + "a" * 16, "dev2": "pw-dev2-" + "b" * 16}
BASE = "prunefleet/devices"
TELEMETRY = f"{BASE}/+/telemetry"


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoProcess]:
    b = start_production_broker(tmp_path_factory.mktemp("mosquitto-prod"), DEVICES)
    try:
        yield b
    finally:
        b.stop()


def _device(broker, name, **kw):
    return connect(broker, name, DEVICES[name], **kw)


def _server(broker, **kw):
    return connect(broker, "server", SERVER_PASSWORD, **kw)


def test_another_devices_client_id_cannot_disconnect_it(broker) -> None:
    with (
        _server(broker, subscribe=[TELEMETRY]) as server,
        _device(broker, "dev1", client_id="pf-agent-dev1") as dev1,
    ):
        # dev2 connects with dev1's client id, its predictable one and its user name:
        # each CONNACK comes after mosquitto took over any session with that id.
        for stolen in ("pf-agent-dev1", "dev1"):
            with _device(broker, "dev2", client_id=stolen) as dev2:
                assert dev2.publish(f"{BASE}/dev2/telemetry", stolen.encode())
                assert server.get().payload == stolen.encode()
        assert not dev1.dropped.is_set(), "dev1 was disconnected by a client id it owns"
        assert dev1.publish(f"{BASE}/dev1/telemetry", b"still here")
        message = server.get()
        assert (message.topic, message.payload) == (f"{BASE}/dev1/telemetry", b"still here")


def test_the_servers_client_id_cannot_be_taken(broker) -> None:
    with (
        _server(broker, client_id="pf-server-host-1", subscribe=[TELEMETRY],
                clean_session=False) as server,
        _device(broker, "dev1") as dev1,
    ):
        for stolen in ("pf-server-host-1", "server"):
            with _device(broker, "dev2", client_id=stolen, subscribe=["prunefleet/#"]):
                pass
        assert not server.dropped.is_set(), "a device took the server's connection"
        assert dev1.publish(f"{BASE}/dev1/telemetry", b"t")
        assert server.get().payload == b"t"


def _forty_batches(broker, server_filter: str, attacker_filter: str) -> int:
    """How many of 40 telemetry messages of an honest device reach the server while dev2
    subscribes to ``attacker_filter``."""
    probe = "prunefleet/probe"
    with (
        _server(broker, subscribe=[server_filter, probe]) as server,
        _device(broker, "dev2", subscribe=[attacker_filter]) as attacker,
        _device(broker, "dev1") as honest,
    ):
        for i in range(40):
            assert honest.publish(f"{BASE}/dev1/telemetry", str(i).encode())
        # Each PUBACK came after mosquitto queued the message for its receiver, and one
        # connection delivers in order: the server's own probe comes after all of them.
        assert server.publish(probe, b"probe")
        got = []
        while (m := server.get()).topic != probe:
            got.append(m.payload)
        assert attacker.drain(0.2) == [], "the ACL delivered another device's telemetry"
        return len(set(got))


def test_a_device_cannot_take_a_share_of_the_servers_telemetry(broker) -> None:
    """The servers' share group is a secret (`serve --share-group`, 16+ characters): a
    device that subscribes to the groups it can guess takes nothing from it."""
    secret = "ingest-" + "7f3a9c2e5b1d4086"
    guessed = "$share/ingest/" + TELEMETRY
    assert _forty_batches(broker, f"$share/{secret}/{TELEMETRY}", guessed) == 40


def test_mosquitto_2_0_lets_a_device_into_a_share_group_whose_name_it_knows(broker) -> None:
    """Why the name must be secret: mosquitto 2.0 does not check subscriptions against the
    ACL file, and the share it routes to the device is then refused by the ACL and lost.
    Should this ever fail, the broker learned to refuse the subscription: deny `$share/#`
    for devices in the ACL and drop the secret."""
    shared = "$share/ingest/" + TELEMETRY
    assert _forty_batches(broker, shared, shared) < 40


def test_a_device_reads_its_own_desired_state_not_another_devices(broker) -> None:
    with _server(broker) as server:
        assert server.publish(f"{BASE}/dev1/desired", b"for dev1", retain=True)
        assert server.publish(f"{BASE}/dev2/desired", b"for dev2", retain=True)
    with _device(broker, "dev2", subscribe=[f"{BASE}/+/desired", f"{BASE}/+/commands"]) as d:
        message = d.get()
        assert (message.topic, message.payload) == (f"{BASE}/dev2/desired", b"for dev2")
        assert d.drain(0.3) == []


def test_groups_and_artifacts_are_read_only_for_every_device(broker) -> None:
    """The documented model: groups are not tenants. Any device of the fleet reads every
    group's desired state and every artifact chunk (signed, hashed, and acted on only by
    their targets), and none can replace the server's retained copies."""
    group, chunk = "prunefleet/groups/g-other/desired", "prunefleet/artifacts/" + "a" * 64 + "/0"
    with _server(broker) as server:
        assert server.publish(group, b"signed manifest", retain=True)
        assert server.publish(chunk, b"chunk 0", retain=True)
    with _device(broker, "dev1") as dev1:  # forgeries: acknowledged, then dropped by the ACL
        assert dev1.publish(group, b"forged manifest", retain=True)
        assert dev1.publish(chunk, b"forged chunk", retain=True)
        assert dev1.publish(f"{BASE}/dev1/desired", b"forged", retain=True)
    with _device(broker, "dev2", subscribe=[group, chunk]) as dev2:
        got = {m.topic: m.payload for m in [dev2.get(), dev2.get()]}
    assert got == {group: b"signed manifest", chunk: b"chunk 0"}
