"""The shipped production broker (deploy/mosquitto/prunefleet.conf + acl) on loopback, with
its TLS certificate and password file made by prunefleet's own provisioning code, and a
paho client that records what happened to its connection."""

from __future__ import annotations

import os
import pwd
import queue
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from conftest import REPO, MosquittoProcess, find_mosquitto, free_port
from paho.mqtt.enums import CallbackAPIVersion

from prunefleet.server.provision import PasswordFile, init_ca, issue_server_cert

TIMEOUT = 10.0
SERVER_PASSWORD = "pw-server-" + "s" * 16


def start_production_broker(work: Path, users: dict[str, str] | None = None) -> MosquittoProcess:
    """prunefleet.conf and acl from deploy/, their /etc and /var paths moved under ``work``.

    ``work/ca`` holds the CA (``prunefleet ca init``), ``work/certs`` the broker's
    certificate for 127.0.0.1, ``work/passwd`` the password file: the user ``server``
    (password :data:`SERVER_PASSWORD`) and ``users``.
    """
    certs = work / "certs"
    (work / "data").mkdir(parents=True, exist_ok=True)
    ca_cert, _ = init_ca(work / "ca")
    issue_server_cert(work / "ca", ["127.0.0.1"], certs)
    (certs / "ca.crt").write_bytes(ca_cert.read_bytes())
    passwd = PasswordFile(work / "passwd")
    for user, password in {"server": SERVER_PASSWORD, **(users or {})}.items():
        passwd.set(user, password)
    (work / "acl").write_text((REPO / "deploy/mosquitto/acl").read_text())
    port = free_port()
    config = (REPO / "deploy/mosquitto/prunefleet.conf").read_text()
    config = config.replace("/etc/mosquitto/", f"{work}/").replace(
        "/var/lib/mosquitto/", f"{work}/data/")
    # As root mosquitto would become `mosquitto`, which cannot read a pytest tmp dir.
    me = pwd.getpwuid(os.geteuid()).pw_name
    config, n = re.subn(r"^user .*$", f"user {me}", config, flags=re.MULTILINE)
    assert n == 1
    config, n = re.subn(r"^listener 8883$", f"listener {port} 127.0.0.1", config, flags=re.M)
    assert n == 1, "prunefleet.conf should have one `listener 8883` line"
    (work / "template.conf").write_text(config)
    broker = MosquittoProcess(find_mosquitto(), work, template=work / "template.conf", port=port)
    broker.start()
    return broker


class Client:
    """A connected paho client: its messages, and whether the broker dropped it."""

    def __init__(self, client: mqtt.Client) -> None:
        self.paho = client
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.dropped = threading.Event()

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> bool:
        """QoS 1; True once the broker acknowledged it."""
        info = self.paho.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(TIMEOUT)
        return info.is_published()

    def get(self, timeout: float = TIMEOUT) -> mqtt.MQTTMessage:
        try:
            return self.messages.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no message within {timeout:g} s") from None

    def drain(self, quiet_s: float = 0.5) -> list[mqtt.MQTTMessage]:
        """Every message until none came for ``quiet_s``."""
        out = []
        while True:
            try:
                out.append(self.messages.get(timeout=quiet_s))
            except queue.Empty:
                return out


class Refused(Exception):
    """The broker refused the CONNECT."""


@contextmanager
def connect(
    broker: MosquittoProcess,
    username: str,
    password: str,
    *,
    client_id: str = "",
    subscribe: list[str] | None = None,
    clean_session: bool = True,
) -> Iterator[Client]:
    """A TLS client of the production broker, connected (and subscribed, QoS 1) before the
    block runs; :class:`Refused` when the broker says no."""
    paho = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                       protocol=mqtt.MQTTv311, clean_session=clean_session)
    paho.username_pw_set(username, password)
    paho.tls_set(ca_certs=str(broker.workdir / "certs" / "ca.crt"))
    client = Client(paho)
    ready = threading.Event()
    failure: list[str] = []

    def on_connect(c: mqtt.Client, u: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            failure.append(str(reason))
            ready.set()
        elif subscribe:
            c.subscribe([(t, 1) for t in subscribe])
        else:
            ready.set()

    def on_disconnect(c: mqtt.Client, u: Any, flags: Any, reason: Any, props: Any) -> None:
        if ready.is_set():
            client.dropped.set()

    paho.on_connect = on_connect
    paho.on_subscribe = lambda c, u, mid, codes, props: ready.set()
    paho.on_message = lambda c, u, m: client.messages.put(m)
    paho.on_disconnect = on_disconnect
    paho.connect(broker.host, broker.port, keepalive=30)
    paho.loop_start()
    try:
        if not ready.wait(TIMEOUT):
            raise AssertionError(f"no CONNACK/SUBACK from {broker.url}")
        if failure:
            raise Refused(failure[0])
        yield client
    finally:
        paho.disconnect()
        paho.loop_stop()
