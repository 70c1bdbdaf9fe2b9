"""MQTT transport: paho-mqtt behind a small interface whose callbacks only enqueue.

paho runs its callbacks on its network thread; here they only put :class:`Inbound` items
on a bounded queue that the owner's loop drains. Subscriptions are remembered and renewed
in ``on_connect`` so they survive reconnects. paho's ``OSError``s become
:class:`TransportError` at this boundary.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import random
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import unquote, urlparse

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from .errors import TransportError

log = logging.getLogger(__name__)


def backoff_delay(attempt: int, min_s: float, max_s: float, rng: random.Random) -> float:
    """Exponential backoff with "equal jitter": half fixed, half random.

    A fleet that lost its broker must not reconnect in one burst; the random half spreads
    the retries of N devices over the whole window.
    """
    cap = min(max_s, min_s * (2 ** min(attempt, 30)))
    return cap / 2 + rng.uniform(0, cap / 2)


class _JitterClient(mqtt.Client):
    """paho's client with jittered reconnect backoff (paho's own has no jitter)."""

    def __init__(self, *args, min_s: float, max_s: float, **kwargs):
        super().__init__(*args, **kwargs)
        self._pf_min_s = min_s
        self._pf_max_s = max_s
        self._pf_rng = random.Random()
        self.reconnect_attempts = 0

    def _reconnect_wait(self) -> None:  # overrides paho's private hook
        if self._reconnect_delay is None:
            self.reconnect_attempts = 0
            self._reconnect_delay = max(1, int(self._pf_min_s))  # paho's "not first" flag
        else:
            self.reconnect_attempts += 1
        delay = backoff_delay(self.reconnect_attempts, self._pf_min_s, self._pf_max_s,
                              self._pf_rng)
        end = time.monotonic() + delay
        while not self._thread_terminate and (remaining := end - time.monotonic()) > 0:
            time.sleep(min(remaining, 0.25))


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = None

    @classmethod
    def parse(cls, url: str) -> BrokerAddress:
        """Parse ``mqtt://[user[:pass]@]host[:port]`` or ``mqtts://…`` (TLS)."""
        u = urlparse(url)
        if u.scheme not in ("mqtt", "mqtts", "tcp", "ssl") or not u.hostname:
            raise TransportError(
                f"bad broker URL {url!r}: expected mqtt://host:port or mqtts://host:port"
            )
        tls = u.scheme in ("mqtts", "ssl")
        try:
            port = u.port or (8883 if tls else 1883)
        except ValueError as e:
            raise TransportError(f"bad broker URL {url!r}: {e}") from e
        return cls(
            host=u.hostname,
            port=port,
            tls=tls,
            username=unquote(u.username) if u.username else None,
            password=unquote(u.password) if u.password else None,
        )

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


@dataclass(frozen=True)
class Inbound:
    """Something the network thread observed, for the owner's loop to act on."""

    kind: Literal["message", "connected", "disconnected", "published"]
    topic: str = ""
    payload: bytes = b""
    retain: bool = False
    mid: int = 0


@dataclass
class TransportOptions:
    client_id: str
    keepalive_s: int = 30
    reconnect_min_s: float = 1.0
    reconnect_max_s: float = 60.0
    max_inflight_messages: int = 20
    max_queued_messages: int = 0  # 0: paho's outgoing queue is unbounded; we bound ours
    inbound_queue_size: int = 2000
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    will_topic: str | None = None
    will_payload: bytes | None = None
    clean_session: bool = True
    subscriptions: dict[str, int] = field(default_factory=dict)


class MqttTransport:
    """One MQTT connection; inbound traffic lands on ``self.inbound``."""

    def __init__(self, address: BrokerAddress, options: TransportOptions):
        self.address = address
        self.options = options
        self.inbound: queue.Queue[Inbound] = queue.Queue(maxsize=options.inbound_queue_size)
        self.dropped_inbound = 0
        self.connected = threading.Event()
        self._subs: dict[str, int] = dict(options.subscriptions)
        self._lock = threading.Lock()
        self._client = _JitterClient(
            CallbackAPIVersion.VERSION2,
            client_id=options.client_id,
            clean_session=options.clean_session,
            protocol=mqtt.MQTTv311,
            min_s=options.reconnect_min_s,
            max_s=options.reconnect_max_s,
        )
        c = self._client
        # paho raises if these are set after connect().
        c.max_inflight_messages_set(options.max_inflight_messages)
        c.max_queued_messages_set(options.max_queued_messages)
        if address.username:
            c.username_pw_set(address.username, address.password)
        if address.tls:
            c.tls_set(
                ca_certs=options.ca_file,
                certfile=options.cert_file,
                keyfile=options.key_file,
                cert_reqs=ssl.CERT_REQUIRED,
            )
        if options.will_topic and options.will_payload is not None:
            c.will_set(options.will_topic, options.will_payload, qos=1, retain=True)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.on_publish = self._on_publish
        self._started = False

    # -- network-thread callbacks: enqueue only ---------------------------------------
    def _put(self, item: Inbound) -> None:
        try:
            self.inbound.put_nowait(item)
        except queue.Full:
            self.dropped_inbound += 1
            if self.dropped_inbound in (1, 10, 100) or self.dropped_inbound % 1000 == 0:
                log.warning("inbound queue full: %d messages dropped", self.dropped_inbound)

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.warning("broker refused connection: %s", reason_code)
            return
        # paho leaves Nagle on: an UNSUBSCRIBE followed by a SUBSCRIBE (the chunk window)
        # would then wait for the broker's delayed ACK, ~40 ms per chunk.
        sock = client.socket()
        if sock is not None:
            with contextlib.suppress(OSError, AttributeError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            subs = list(self._subs.items())
        if subs:
            client.subscribe(subs)
        self.connected.set()
        self._put(Inbound("connected"))

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        was = self.connected.is_set()
        self.connected.clear()
        if was:
            self._put(Inbound("disconnected"))

    def _on_message(self, client, userdata, msg) -> None:
        self._put(Inbound("message", msg.topic, msg.payload, bool(msg.retain)))

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        self._put(Inbound("published", mid=mid))

    # -- owner API --------------------------------------------------------------------
    def start(self) -> None:
        """Connect in the background; paho keeps reconnecting with backoff."""
        try:
            self._client.connect_async(
                self.address.host, self.address.port, keepalive=self.options.keepalive_s
            )
        except (OSError, ValueError) as e:
            raise TransportError(f"cannot connect to {self.address.url}: {e}") from e
        self._client.loop_start()
        self._started = True

    def wait_connected(self, timeout_s: float) -> bool:
        return self.connected.wait(timeout_s)

    def stop(self, disconnect: bool = True) -> None:
        if not self._started:
            return
        if disconnect:
            with contextlib.suppress(OSError):
                self._client.disconnect()
        self._client.loop_stop()
        self._started = False

    def kill(self) -> None:
        """Drop the connection without DISCONNECT, so the broker sends the Last Will."""
        sock = self._client.socket()
        self._client.loop_stop()
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()
        self._started = False

    def subscribe(self, topic: str, qos: int = 1) -> None:
        with self._lock:
            self._subs[topic] = qos
        if self.connected.is_set():
            self._client.subscribe(topic, qos)

    def unsubscribe(self, topic: str) -> None:
        with self._lock:
            known = self._subs.pop(topic, None) is not None
        if known and self.connected.is_set():
            self._client.unsubscribe(topic)

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> int:
        """Queue a publish; returns its message id (acknowledged later as ``published``)."""
        return int(self.publish_info(topic, payload, qos, retain).mid)

    def publish_info(
        self, topic: str, payload: bytes, qos: int = 1, retain: bool = False
    ) -> mqtt.MQTTMessageInfo:
        """Queue a publish; the returned info can ``wait_for_publish()``."""
        try:
            info = self._client.publish(topic, payload, qos=qos, retain=retain)
        except (OSError, ValueError) as e:
            raise TransportError(f"publish to {topic} failed: {e}") from e
        # While disconnected paho keeps QoS 1 messages and sends them after reconnecting.
        queued = (mqtt.MQTT_ERR_NO_CONN, mqtt.MQTT_ERR_CONN_LOST) if qos > 0 else ()
        if info.rc != mqtt.MQTT_ERR_SUCCESS and info.rc not in queued:
            raise TransportError(f"publish to {topic} failed: {mqtt.error_string(info.rc)}")
        return info
