"""What prunefleet relies on from a broker, checked on mosquitto and the embedded amqtt one.

Also: the production mosquitto config (TLS, password file, ACL) from deploy/ starts, and the
ACL keeps devices apart.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ipaddress
import os
import queue
import re
import socket
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from conftest import REPO, MosquittoProcess, find_mosquitto, free_port, wait_for_port
from paho.mqtt.enums import CallbackAPIVersion

TIMEOUT = 10.0


class Received:
    """Messages a client received, handed over from paho's network thread."""

    def __init__(self) -> None:
        self.queue: queue.Queue[mqtt.MQTTMessage] = queue.Queue()

    def __call__(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        self.queue.put(message)

    def get(self, timeout: float = TIMEOUT) -> mqtt.MQTTMessage:
        try:
            return self.queue.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no message within {timeout:g} s") from None

    def empty_after(self, seconds: float) -> bool:
        try:
            message = self.queue.get(timeout=seconds)
        except queue.Empty:
            return True
        raise AssertionError(f"unexpected message on {message.topic!r}")


def _client(client_id: str = "") -> mqtt.Client:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311)
    client.reconnect_delay_set(min_delay=0.05, max_delay=1)  # paho's default waits 1 s
    return client


@contextmanager
def connected(
    broker: Any,
    *,
    subscribe: list[str] | None = None,
    client_id: str = "",
    username: str | None = None,
    password: str | None = None,
    ca_file: Path | None = None,
) -> Iterator[tuple[mqtt.Client, Received]]:
    """A paho client, connected (and subscribed at QoS 1) before the block runs."""
    client = _client(client_id)
    received = Received()
    client.on_message = received
    if username is not None:
        client.username_pw_set(username, password)
    if ca_file is not None:
        client.tls_set(ca_certs=str(ca_file))
    ready = threading.Event()
    failure: list[str] = []

    def on_connect(c: mqtt.Client, u: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            failure.append(str(reason))
            ready.set()
        elif subscribe:
            c.subscribe([(topic, 1) for topic in subscribe])
        else:
            ready.set()

    client.on_connect = on_connect
    client.on_subscribe = lambda c, u, mid, codes, props: ready.set()
    client.connect(broker.host, broker.port, keepalive=30)
    client.loop_start()
    try:
        assert ready.wait(TIMEOUT), f"no CONNACK/SUBACK from {broker.url}"
        assert not failure, f"connection refused: {failure}"
        yield client, received
    finally:
        client.disconnect()
        client.loop_stop()


def _topic(name: str) -> str:
    return f"prunefleet-test/{name}/{uuid.uuid4().hex[:12]}"


# -- both brokers -------------------------------------------------------------------------


def test_retained_2mb_qos1_reaches_a_later_subscriber(any_broker: Any) -> None:
    topic = _topic("retained")
    payload = os.urandom(2 * 1024 * 1024)
    with connected(any_broker) as (publisher, _):
        info = publisher.publish(topic, payload, qos=1, retain=True)
        info.wait_for_publish(TIMEOUT)
        assert info.is_published(), "no PUBACK for the 2 MB message"
    try:
        with connected(any_broker, subscribe=[topic]) as (_, received):
            message = received.get()
            assert message.topic == topic
            assert message.retain
            assert message.qos == 1
            assert len(message.payload) == len(payload)
            assert message.payload == payload
    finally:
        with connected(any_broker) as (publisher, _):  # clear it: an empty retained message
            publisher.publish(topic, b"", qos=1, retain=True).wait_for_publish(TIMEOUT)


def test_last_will_on_unclean_disconnect(any_broker: Any) -> None:
    topic = _topic("will")
    with connected(any_broker, subscribe=[topic]) as (_, received):
        doomed = _client(f"doomed-{uuid.uuid4().hex[:8]}")
        doomed.will_set(topic, b'{"online": false}', qos=1, retain=False)
        acked = threading.Event()
        doomed.on_connect = lambda c, u, f, reason, p: acked.set()
        doomed.connect(any_broker.host, any_broker.port, keepalive=30)
        while not acked.is_set():  # drive paho by hand: no thread to race the socket close
            assert doomed.loop(timeout=0.1) == mqtt.MQTT_ERR_SUCCESS
        sock = doomed.socket()
        assert isinstance(sock, socket.socket)
        sock.shutdown(socket.SHUT_RDWR)  # TCP gone, no DISCONNECT packet: unclean
        sock.close()
        message = received.get()
        assert message.topic == topic
        assert message.payload == b'{"online": false}'


def test_1000_qos1_messages_arrive_in_order(any_broker: Any) -> None:
    topic = _topic("order")
    count = 1000
    with (
        connected(any_broker, subscribe=[topic]) as (_, received),
        connected(any_broker) as (publisher, _),
    ):
        infos = [publisher.publish(topic, str(i).encode(), qos=1) for i in range(count)]
        for info in infos:
            info.wait_for_publish(TIMEOUT)
        got = [int(received.get().payload) for _ in range(count)]
        assert got == list(range(count))
        assert received.empty_after(0.1)


def test_restart_keeps_the_port_and_drops_clients(any_broker: Any) -> None:
    port = any_broker.port
    dropped = threading.Event()
    with connected(any_broker) as (client, _):
        client.on_disconnect = lambda c, u, f, reason, p: dropped.set()
        any_broker.restart()
        assert any_broker.port == port
        assert dropped.wait(TIMEOUT), "client did not notice the outage"
    assert wait_for_port(any_broker.host, port)
    with connected(any_broker):
        pass


# -- the production mosquitto config ------------------------------------------------------


def _password_line(user: str, password: str) -> str:
    """A mosquitto 2.0 password file line ($7$: PBKDF2-SHA512, as mosquitto_passwd writes)."""
    salt = os.urandom(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, 101)
    return f"{user}:$7$101${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def _write_certs(directory: Path) -> None:
    """A throw-away CA and a server certificate for 127.0.0.1, as prunefleet.conf expects."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.UTC)

    def build(subject: str, issuer: x509.Name | None, key: Any, signer: Any, ca: bool) -> Any:
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
        builder = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(issuer or name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            san = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
            builder = builder.add_extension(san, critical=False)
        return builder.sign(signer, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = build("prunefleet test CA", None, ca_key, ca_key, ca=True)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = build("127.0.0.1", ca_cert.subject, key, ca_key, ca=False)
    pem = serialization.Encoding.PEM
    (directory / "ca.crt").write_bytes(ca_cert.public_bytes(pem))
    (directory / "server.crt").write_bytes(cert.public_bytes(pem))
    (directory / "server.key").write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )


@pytest.fixture(scope="module")
def production_mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoProcess]:
    """deploy/mosquitto/prunefleet.conf + acl, with its /etc and /var paths moved to a tmp dir."""
    work = tmp_path_factory.mktemp("mosquitto-prod")
    (work / "certs").mkdir()
    (work / "data").mkdir()
    _write_certs(work / "certs")
    users = {"dev1": "pw-dev1", "dev2": "pw-dev2", "server": "pw-server"}
    (work / "passwd").write_text("".join(_password_line(u, p) + "\n" for u, p in users.items()))
    (work / "acl").write_text((REPO / "deploy/mosquitto/acl").read_text())
    port = free_port()
    config = (REPO / "deploy/mosquitto/prunefleet.conf").read_text()
    config = config.replace("/etc/mosquitto/", f"{work}/").replace(
        "/var/lib/mosquitto/", f"{work}/data/"
    )
    # Running as root, mosquitto would become `mosquitto`, which cannot read a pytest tmp dir.
    config, n = re.subn(r"^user .*$", f"user {_current_user()}", config, flags=re.MULTILINE)
    assert n == 1
    config, n = re.subn(r"^listener 8883$", f"listener {port} 127.0.0.1", config, flags=re.M)
    assert n == 1, "prunefleet.conf should have one `listener 8883` line"
    (work / "template.conf").write_text(config)
    broker = MosquittoProcess(find_mosquitto(), work, template=work / "template.conf", port=port)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


def _current_user() -> str:
    import pwd

    return pwd.getpwuid(os.geteuid()).pw_name


def test_production_config_tls_and_acl_isolate_devices(
    production_mosquitto: MosquittoProcess,
) -> None:
    broker = production_mosquitto
    ca = broker.workdir / "certs" / "ca.crt"
    base = "prunefleet/devices"
    everything = ["prunefleet/#"]
    with (
        connected(
            broker, username="server", password="pw-server", ca_file=ca, subscribe=everything
        ) as (server, server_rx),
        connected(
            broker, username="dev1", password="pw-dev1", ca_file=ca, subscribe=everything
        ) as (dev1, dev1_rx),
    ):
        # the server writes desired states; dev1 gets its own, not dev2's
        server.publish(f"{base}/dev2/desired", b"for dev2", qos=1).wait_for_publish(TIMEOUT)
        server.publish(f"{base}/dev1/desired", b"for dev1", qos=1).wait_for_publish(TIMEOUT)
        server.publish("prunefleet/groups/g1/desired", b"group", qos=1).wait_for_publish(TIMEOUT)
        got = [dev1_rx.get() for _ in range(2)]
        assert [(m.topic, m.payload) for m in got] == [
            (f"{base}/dev1/desired", b"for dev1"),
            ("prunefleet/groups/g1/desired", b"group"),
        ]
        for _ in range(3):  # the server read its own three
            server_rx.get()

        # dev1 may report about itself, not forge its desired state or speak for dev2
        dev1.publish(f"{base}/dev1/desired", b"forged", qos=1).wait_for_publish(TIMEOUT)
        dev1.publish(f"{base}/dev2/reported", b"spoof", qos=1).wait_for_publish(TIMEOUT)
        dev1.publish("prunefleet/artifacts/x/0", b"bad chunk", qos=1).wait_for_publish(TIMEOUT)
        dev1.publish(f"{base}/dev1/telemetry", b"t", qos=1).wait_for_publish(TIMEOUT)
        message = server_rx.get()
        assert (message.topic, message.payload) == (f"{base}/dev1/telemetry", b"t")
        assert server_rx.empty_after(0.2)

    # wrong password: refused
    with (
        pytest.raises(AssertionError, match="refused"),
        connected(broker, username="dev1", password="nope", ca_file=ca),
    ):
        pass


def test_production_config_server_shared_subscription(
    production_mosquitto: MosquittoProcess,
) -> None:
    broker = production_mosquitto
    ca = broker.workdir / "certs" / "ca.crt"
    shared = "$share/ingest/prunefleet/devices/+/telemetry"
    with (
        connected(
            broker, username="server", password="pw-server", ca_file=ca, subscribe=[shared]
        ) as (_, server_rx),
        connected(broker, username="dev2", password="pw-dev2", ca_file=ca) as (dev2, _),
    ):
        dev2.publish("prunefleet/devices/dev2/telemetry", b"x", qos=1).wait_for_publish(TIMEOUT)
        assert server_rx.get().payload == b"x"
