"""MQTT transport: the :class:`Transport` seam and its paho-mqtt implementation.

Owners (the agent, the server's fleet, the simulator, benchmarks) see one small interface:
a bounded ``inbound`` queue of :class:`Inbound` items that their own loop drains, a
``connected`` event, and ``publish``/``subscribe``. :class:`MqttTransport` is the real one;
:class:`prunefleet.shared.memtransport.MemoryTransport` is an in-memory double for tests.

paho runs its callbacks on its network thread; here they only put :class:`Inbound` items
on a bounded queue and count what does not fit. Subscriptions are remembered and renewed
in ``on_connect`` so they survive reconnects. paho's ``OSError``s and ``ValueError``s become
:class:`TransportError` at this boundary.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import random
import selectors
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol, cast
from urllib.parse import unquote, urlparse

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from .errors import TransportError

if TYPE_CHECKING:
    from paho.mqtt.client import _OutPacket

__all__ = [
    "BrokerAddress",
    "EpollLoop",
    "EpollMqttTransport",
    "Inbound",
    "MqttTransport",
    "Transport",
    "TransportOptions",
    "backoff_delay",
    "check_filter",
    "check_topic",
    "raise_fd_limit",
    "split_shared",
    "subscribe_retry_delay",
    "topic_matches",
]

log = logging.getLogger(__name__)

_MAX_TOPIC_BYTES = 65535
_SHARE_PREFIX = "$share/"
_PUBACK = struct.Struct("!BBH")  # MQTT 3.1.1 PUBACK: type, remaining length 2, message id
_PUBACK_BYTE = int(mqtt.PUBACK)
_PUBLISH_BYTE = int(mqtt.PUBLISH)  # QoS 0, no DUP; | 1 for retain
_TOPIC_LEN = struct.Struct("!H")


def _remaining_length(n: int) -> bytes:
    """MQTT's variable-length "remaining length" (7 bits a byte, low bits first)."""
    if n > 268_435_455:
        raise TransportError(f"MQTT packet too large ({n} bytes)")
    out = bytearray()
    while True:
        n, digit = n >> 7, n & 0x7F
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def backoff_delay(attempt: int, min_s: float, max_s: float, rng: random.Random) -> float:
    """Exponential backoff with "equal jitter": half fixed, half random.

    A fleet that lost its broker must not reconnect in one burst; the random half spreads
    the retries of N devices over the whole window.
    """
    cap = min(max_s, min_s * (2 ** min(attempt, 30)))
    return cap / 2 + rng.uniform(0, cap / 2)


SUBSCRIBE_RETRY_MIN_S = 2.0
SUBSCRIBE_RETRY_MAX_S = 15.0


def subscribe_retry_delay(refusals: int, rng: random.Random | None = None) -> float:
    """How long to wait before asking again for a subscription refused ``refusals`` times
    in a row: 1-2 s after the first refusal, doubling up to 7.5-15 s."""
    return backoff_delay(max(0, refusals - 1), SUBSCRIBE_RETRY_MIN_S, SUBSCRIBE_RETRY_MAX_S,
                         rng or _RETRY_RNG)


_RETRY_RNG = random.Random()


# -- MQTT 3.1.1 topic rules -------------------------------------------------------------------


def _check_length(value: str, what: str) -> None:
    if not isinstance(value, str) or not value:
        raise TransportError(f"empty or non-text MQTT {what}: {value!r}")
    if "\x00" in value:
        raise TransportError(f"MQTT {what} {value!r} contains NUL")
    if len(value.encode("utf-8")) > _MAX_TOPIC_BYTES:
        raise TransportError(f"MQTT {what} longer than {_MAX_TOPIC_BYTES} bytes")


def check_topic(topic: str) -> str:
    """Return ``topic`` if a message may be published on it (no wildcards)."""
    _check_length(topic, "topic")
    if "+" in topic or "#" in topic:
        raise TransportError(f"cannot publish to {topic!r}: wildcards are for subscriptions")
    return topic


def check_filter(topic_filter: str) -> str:
    """Return ``topic_filter`` if it is a valid subscription (``$share/<group>/…`` included).

    ``#`` only as the whole last level, ``+`` only as a whole level.
    """
    _check_length(topic_filter, "topic filter")
    inner = topic_filter
    if topic_filter.startswith(_SHARE_PREFIX):
        group, sep, inner = topic_filter[len(_SHARE_PREFIX):].partition("/")
        if not group or not sep or not inner or "+" in group or "#" in group:
            raise TransportError(
                f"bad shared subscription {topic_filter!r}: expected $share/<group>/<filter>"
            )
    levels = inner.split("/")
    for i, level in enumerate(levels):
        if ("#" in level and (level != "#" or i != len(levels) - 1)) or (
            "+" in level and level != "+"
        ):
            raise TransportError(
                f"bad topic filter {topic_filter!r}: '#' must be the whole last level "
                "and '+' a whole level"
            )
    return topic_filter


def split_shared(topic_filter: str) -> tuple[str | None, str]:
    """``("g", "a/+")`` for ``$share/g/a/+``; ``(None, f)`` for a plain filter ``f``."""
    if topic_filter.startswith(_SHARE_PREFIX):
        group, _, inner = topic_filter[len(_SHARE_PREFIX):].partition("/")
        return group, inner
    return None, topic_filter


def topic_matches(topic_filter: str, topic: str) -> bool:
    """Whether a (non-shared) subscription ``topic_filter`` receives ``topic``.

    MQTT 3.1.1 §4.7: ``+`` is one level, ``#`` the parent level and everything below it, and
    a filter that starts with a wildcard does not match a topic that starts with ``$``.
    """
    f = topic_filter.split("/")
    t = topic.split("/")
    if topic.startswith("$") and f[0] in ("+", "#"):
        return False
    for i, level in enumerate(f):
        if level == "#":
            return True
        if i >= len(t) or (level != "+" and level != t[i]):
            return False
    return len(f) == len(t)


# -- the seam ---------------------------------------------------------------------------------


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
    qos: int = 0  # of a message: with ``manual_ack``, pass ``mid``, ``qos`` and ``connection``
    connection: int = 0  # to ``ack()``; the number of the connection it arrived on


class InboundQueue(queue.Queue[Inbound]):
    """The inbound queue, with :meth:`get_many` for an owner that takes groups, and
    ``on_put``: called (under the queue's lock, so it must only note and wake) after each
    item is queued, for an owner that waits on several queues at once (the simulator's
    workers, each stepping many devices, act on a device's message as soon as it arrives,
    as an agent waiting on its own queue does)."""

    def __init__(self, maxsize: int = 0) -> None:
        super().__init__(maxsize)
        self.on_put: Callable[[Inbound], None] | None = None

    def _put(self, item: Inbound) -> None:
        super()._put(item)
        if self.on_put is not None:
            self.on_put(item)

    def get_many(self, most: int, timeout: float) -> list[Inbound]:
        """Up to ``most`` items, waiting up to ``timeout`` seconds for the first.

        One hold of the queue's lock for the whole group, and one wake-up of a network
        thread waiting for room: taken one by one, each item woke it, and each wake-up
        made the threads trade the GIL (docs/ingest.md)."""
        with self.not_empty:
            if not self._qsize():
                end = time.monotonic() + timeout
                while not self._qsize():
                    remaining = end - time.monotonic()
                    if remaining <= 0:
                        return []
                    self.not_empty.wait(remaining)
            items = [self._get() for _ in range(min(most, self._qsize()))]
            self.not_full.notify()
            return items


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
    # Acknowledge a received QoS 1 message only when the owner calls ``ack()`` (after it
    # stored the message), not when it is queued: until then the broker keeps it, resends
    # it to a persistent session after a reconnect and, past its in-flight window, holds
    # further messages back (back-pressure instead of loss).
    manual_ack: bool = False
    # Put a ``published`` item on ``inbound`` for each publish the broker acknowledged. An
    # owner that needs no message ids turns it off (the server; the agent, which reads
    # ``acks`` and ``unacknowledged()``): one queue item less for every publish, and on a
    # device the item, its queue's lock and its handling were about a tenth of the CPU a
    # telemetry batch cost.
    report_published: bool = True
    # Packets paho's network thread reads per wake-up while the socket has them (0: paho's
    # own, one per select() unless QoS handshakes are open). A busy subscriber (the server)
    # saves a select() and a keepalive check per message.
    read_batch: int = 0


class Transport(Protocol):
    """One MQTT connection as its owner sees it.

    Everything the broker sends lands on ``inbound``: ``message`` items, ``connected`` and
    ``disconnected`` on each change, and ``published`` with the message id of a publish once
    it is acknowledged (QoS 1: the broker's PUBACK). When the queue is full an item is
    dropped and ``dropped_inbound`` counts it, except a QoS 1 message to a ``manual_ack``
    owner on its own network thread: that thread waits for room and reads nothing
    meanwhile (``inbound_waits`` counts the waits). Subscriptions are renewed on every
    (re)connect. A QoS 1 publish made while disconnected is kept and sent after reconnecting.
    """

    inbound: InboundQueue
    connected: threading.Event
    dropped_inbound: int
    inbound_waits: int
    subscribe_refused: int  # filters the broker refused (each asked for again later)
    address: BrokerAddress
    acks: int  # publishes the broker acknowledged since this transport began

    def unacknowledged(self) -> int:
        """QoS 1 publishes sent or queued and not yet acknowledged by the broker."""
        ...

    def start(self) -> None:
        """Connect in the background and keep reconnecting; again after stop() or kill()."""
        ...

    def stop(self, disconnect: bool = True) -> None:
        """Close the connection: with DISCONNECT (no Last Will), or without (as kill())."""
        ...

    def kill(self) -> None:
        """Drop the connection without DISCONNECT, so the broker sends the Last Will."""
        ...

    def subscribe(self, topic: str, qos: int = 1) -> None: ...

    def unsubscribe(self, topic: str) -> None: ...

    def set_will(self, payload: bytes) -> None:
        """The Last Will's payload from the next connection on (its topic stays)."""
        ...

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> int:
        """Queue a publish; returns its message id, later acknowledged as ``published``."""
        ...

    def ack(self, mid: int, qos: int, connection: int | None = None) -> None:
        """With ``manual_ack``: acknowledge a received message (its ``mid`` and ``qos``).

        Given the message's ``connection``, an acknowledgement for an earlier connection is
        not sent: the broker resent that message on the new one with the same id, and an
        id may meanwhile name another message. A no-op for QoS 0 and without manual_ack.
        """
        ...

    def wait_connected(self, timeout_s: float) -> bool: ...


# -- paho -------------------------------------------------------------------------------------


# Reconnect attempts logged: the first few, then every Nth (at most one a minute or so
# once the backoff reaches its cap), so a fleet without its broker does not flood the logs.
LOG_FIRST_ATTEMPTS = 3
LOG_EVERY_ATTEMPTS = 10


# How much one read of a ``read_batch`` transport's socket takes at most.
READ_AHEAD_BYTES = 65536


def _log_attempt(attempt: int) -> bool:
    return attempt < LOG_FIRST_ATTEMPTS or attempt % LOG_EVERY_ATTEMPTS == 0


# What paho hands on_publish for every MQTT 3.1.1 PUBACK (the version carries neither):
# shared, since nothing here reads or changes them.
_PUBACK_SUCCESS = ReasonCode(PacketTypes.PUBACK)
_NO_PROPERTIES = Properties(PacketTypes.PUBACK)


class _JitterClient(mqtt.Client):
    """paho's client with jittered reconnect backoff (paho's own has no jitter), which
    logs why it waits and for how long."""

    def __init__(self, *args, min_s: float, max_s: float, url: str = "", **kwargs):
        super().__init__(*args, **kwargs)
        self._pf_min_s = min_s
        self._pf_max_s = max_s
        self._pf_rng = random.Random()
        self._pf_url = url
        self.reconnect_attempts = 0
        self.ever_connected = False
        self.last_error: str | None = None

    def reconnect(self) -> mqtt.MQTTErrorCode:
        """paho's, remembering why a connection attempt failed (for the log)."""
        try:
            return super().reconnect()
        except OSError as e:
            self.last_error = e.strerror or str(e) or type(e).__name__
            raise

    def _reconnect_wait(self) -> None:  # overrides paho's private hook
        if self._reconnect_delay is None:
            self.reconnect_attempts = 0
            self._reconnect_delay = max(1, int(self._pf_min_s))  # paho's "not first" flag
        else:
            self.reconnect_attempts += 1
        delay = backoff_delay(self.reconnect_attempts, self._pf_min_s, self._pf_max_s,
                              self._pf_rng)
        n = self.reconnect_attempts
        if _log_attempt(n):
            why = f" ({self.last_error})" if self.last_error else ""
            what = "cannot reach" if n or not self.ever_connected else "lost"
            later = (f"; further attempts logged every {LOG_EVERY_ATTEMPTS}th"
                     if n == LOG_FIRST_ATTEMPTS - 1 else "")
            log.warning("%s the broker %s%s; reconnecting in %.1f s (attempt %d)%s",
                        what, self._pf_url, why, delay, n + 1, later)
        end = time.monotonic() + delay
        while not self._thread_terminate and (remaining := end - time.monotonic()) > 0:
            time.sleep(min(remaining, 0.25))

    def stop_loop(self) -> None:
        """paho's ``loop_stop``, without waiting up to a second for ``select`` to time out."""
        self._thread_terminate = True
        wake = getattr(self, "_sockpairW", None)
        if wake is not None:
            with contextlib.suppress(OSError):
                wake.send(b"0")
        self.loop_stop()

    # Packets read per wake-up of the network thread; 0: paho's own count (one, or as many
    # as it has QoS 1/2 handshakes open), which costs a select() and a keepalive check per
    # message received.
    read_batch = 0

    # With ``read_batch``: bytes read from the socket and not yet handed to paho, and where
    # the next read starts in them.
    _pf_rdata = b""
    _pf_rpos = 0

    def loop_read(self, max_packets: int = 1) -> mqtt.MQTTErrorCode:  # overrides paho's
        """paho's, reading up to ``read_batch`` packets while the socket has them (it
        stops at the first read that would block, as paho's does), and then on until
        nothing read ahead is left (select() cannot see those bytes)."""
        if not self.read_batch:
            return super().loop_read(max_packets)
        n = 0
        while n < self.read_batch or self._pf_rpos < len(self._pf_rdata):
            if self._sock is None:
                return mqtt.MQTT_ERR_NO_CONN
            if (self.on_publish_read is not None and self._in_packet["command"] == 0
                    and self._pf_rpos < len(self._pf_rdata)):
                k = self._publishes_read_ahead()
                if k:
                    n += k
                    continue
            rc = self._packet_read()
            if rc > 0:
                return self._loop_rc_handle(rc)
            if rc == mqtt.MQTT_ERR_AGAIN:
                break
            n += 1
        return mqtt.MQTT_ERR_SUCCESS

    # With ``read_batch``: called with ``(topic, payload, retain, mid, qos)`` for each
    # whole PUBLISH read ahead, in place of paho's parsing and ``on_message`` (MQTT 3.1.1;
    # QoS 0, and QoS 1 with ``manual_ack``; none while per-topic callbacks are registered).
    on_publish_read: Callable[[str, bytes, bool, int, int], None] | None = None

    def _publishes_read_ahead(self) -> int:
        """Hand over the whole PUBLISH packets at the head of what was read ahead, up to
        the first other packet, partial packet or one paho should judge (QoS 2, an empty
        topic or one that is not UTF-8, a QoS 1 paho acknowledges itself): paho's own
        reading goes on from there. One message costs a fifth of paho's path (an
        ``MQTTMessage``, its decoding by ``struct`` formats built per packet, a log call
        and the callback dispatch)."""
        handler = self.on_publish_read
        if handler is None or self._protocol == mqtt.MQTTv5 or not self._plain_on_message():
            return 0
        data, pos = self._pf_rdata, self._pf_rpos
        size, n = len(data), 0
        qos1_ok = self._manual_ack
        with self._in_callback_mutex:
            while pos < size:
                head = data[pos]
                qos = (head >> 1) & 3
                if head & 0xF0 != 0x30 or qos > 1 or (qos and not qos1_ok):
                    break
                # the remaining length: at most 4 bytes of 7 bits
                i, length, shift = pos + 1, 0, 0
                while i < size and shift <= 21:
                    byte = data[i]
                    i += 1
                    length |= (byte & 0x7F) << shift
                    if not byte & 0x80:
                        break
                    shift += 7
                else:
                    break  # incomplete, or malformed: paho's
                end = i + length
                if end > size or length < 2:
                    break
                topic_length = (data[i] << 8) | data[i + 1]
                topic_end = i + 2 + topic_length
                body = topic_end + 2 * qos
                if not topic_length or body > end:
                    break
                try:
                    topic = data[i + 2:topic_end].decode()
                except UnicodeDecodeError:
                    break
                mid = (data[topic_end] << 8) | data[topic_end + 1] if qos else 0
                pos = end
                n += 1
                handler(topic, data[body:end], bool(head & 1), mid, qos)
                if self._pf_rdata is not data:  # the connection closed meanwhile
                    return n
        if n:
            self._pf_rpos = pos
            with self._msgtime_mutex:
                self._last_bytes_received = mqtt.time_func()
        return n

    def _plain_on_message(self) -> bool:
        """No per-topic callbacks are registered (the transport registers none)."""
        root = getattr(self._on_message_filtered, "_root", None)
        return not (getattr(root, "_children", True)
                    or getattr(root, "_content", True) is not None)

    def _sock_recv(self, bufsize: int) -> bytes:  # overrides paho's
        """With ``read_batch``: paho's reads (one byte of packet type, the length a byte at
        a time, then the rest: three or more system calls per message) served from one
        read of up to 64 KiB."""
        if not self.read_batch:
            return super()._sock_recv(bufsize)
        data, pos = self._pf_rdata, self._pf_rpos
        if pos >= len(data):
            data = super()._sock_recv(max(bufsize, READ_AHEAD_BYTES))
            if len(data) <= bufsize:  # EOF (b""), or no more than was asked for
                self._pf_rdata, self._pf_rpos = b"", 0
                return data
            self._pf_rdata, pos = data, 0
        end = pos + bufsize
        self._pf_rpos = end
        return data[pos:end]

    # Packets joined into one socket write, at most this many bytes: paho writes each
    # packet with its own system call, which on a loopback or LAN socket costs the whole
    # TCP path per packet (a device sending its backlog ten batches at a time, a server's
    # acknowledgements and cursors).
    write_ahead_bytes = 65536

    def _packet_write(self) -> mqtt.MQTTErrorCode:  # overrides paho's
        """paho's, writing the packets queued so far in one system call where there are
        several. Only this thread takes packets off the queue (others only append), so
        those not written whole go back to its head in order. A DISCONNECT, and a client
        of paho's first callback API, are paho's own."""
        out = self._out_packet
        if self._callback_api_version != CallbackAPIVersion.VERSION2:
            return super()._packet_write()
        while len(out) > 1:
            taken: list[_OutPacket] = []
            size = 0
            while out and size < self.write_ahead_bytes:
                packet = out.popleft()
                if packet["command"] & 0xF0 == mqtt.DISCONNECT:
                    out.appendleft(packet)
                    break
                taken.append(packet)
                size += packet["to_process"]
            if len(taken) < 2:
                out.extendleft(reversed(taken))
                break
            try:
                written = self._sock_send(b"".join(
                    p["packet"][p["pos"]:] if p["pos"] else p["packet"] for p in taken))
            except (AttributeError, ValueError):
                out.extendleft(reversed(taken))
                return mqtt.MQTT_ERR_SUCCESS
            except BlockingIOError:
                out.extendleft(reversed(taken))
                return mqtt.MQTT_ERR_AGAIN
            except OSError as err:
                out.extendleft(reversed(taken))
                self._easy_log(mqtt.MQTT_LOG_ERR, "failed to send on socket: %s", err)
                return mqtt.MQTT_ERR_CONN_LOST
            if written <= 0:  # nothing taken (a websocket's frame half sent): as paho
                out.extendleft(reversed(taken))
                return mqtt.MQTT_ERR_SUCCESS
            whole = 0
            for packet in taken:
                part = min(written, packet["to_process"])
                written -= part
                packet["to_process"] -= part
                packet["pos"] += part
                if packet["to_process"]:
                    break
                whole += 1
            out.extendleft(reversed(taken[whole:]))  # the queue is right before callbacks
            with self._msgtime_mutex:
                self._last_msg_out = mqtt.time_func()
            error: Exception | None = None
            for packet in taken[:whole]:  # each written one published, whatever raises
                try:
                    self._packet_written(packet)
                except Exception as e:
                    error = error or e
            if error is not None:
                raise error
        return super()._packet_write()

    def _packet_written(self, packet: _OutPacket) -> None:
        """What paho does once a packet other than DISCONNECT is written whole: a QoS 0
        publish is published (its callback, its info: the info even when the callback
        raises, since the message went)."""
        if packet["command"] & 0xF0 != mqtt.PUBLISH or packet["qos"] != 0:
            return
        with self._callback_mutex:
            on_publish = self.on_publish
        try:
            if on_publish:
                with self._in_callback_mutex:
                    try:
                        cast("mqtt.CallbackOnPublish_v2", on_publish)(
                            self, self._userdata, packet["mid"], _PUBACK_SUCCESS,
                            _NO_PROPERTIES)
                    except Exception as err:
                        self._easy_log(mqtt.MQTT_LOG_ERR,
                                       "Caught exception in on_publish: %s", err)
                        if not self.suppress_exceptions:
                            raise
        finally:
            if packet["info"] is not None:
                packet["info"]._set_as_published()

    def _handle_pubackcomp(  # overrides paho's
            self, cmd: Literal["PUBACK", "PUBCOMP"]) -> mqtt.MQTTErrorCode:
        """paho's, for an MQTT 3.1.1 PUBACK without decoding what that version does not
        carry: paho builds a reason code and a properties object for every
        acknowledgement, about a tenth of a simulated fleet's CPU while it drains a
        backlog. Anything else (PUBCOMP, MQTT 5, a malformed packet) is paho's."""
        packet = self._in_packet["packet"]
        if cmd != "PUBACK" or self._protocol == mqtt.MQTTv5 or len(packet) != 2:
            return super()._handle_pubackcomp(cmd)
        mid = (packet[0] << 8) | packet[1]
        self._easy_log(mqtt.MQTT_LOG_DEBUG, "Received PUBACK (Mid: %d)", mid)
        with self._out_message_mutex:
            if mid in self._out_messages:
                return self._do_on_publish(mid, _PUBACK_SUCCESS, _NO_PROPERTIES)
        return mqtt.MQTT_ERR_SUCCESS

    def _sock_close(self) -> None:  # overrides paho's
        """paho's; what was read ahead belongs to the closed connection."""
        self._pf_rdata, self._pf_rpos = b"", 0
        super()._sock_close()

    def _handle_on_message(self, message: mqtt.MQTTMessage) -> None:  # overrides paho's
        """paho's, without matching the topic against per-topic callbacks (a tree walk
        per message) while none is registered: the transport registers none."""
        if not self._plain_on_message():
            super()._handle_on_message(message)
            return
        on_message = self.on_message
        if on_message is None:
            return
        with self._in_callback_mutex:
            try:
                on_message(self, self._userdata, message)
            except Exception as err:
                self._easy_log(mqtt.MQTT_LOG_ERR, "Caught exception in on_message: %s", err)
                if not self.suppress_exceptions:
                    raise

    def drop_socket(self) -> None:
        """Close the socket without DISCONNECT (the loop must be stopped).

        paho then sees no connection: QoS 1 publishes are kept for the next connect
        instead of being written to a closed socket.
        """
        self._sock_close()


class MqttTransport:
    """One MQTT connection through paho; inbound traffic lands on ``self.inbound``."""

    def __init__(self, address: BrokerAddress, options: TransportOptions):
        self.address = address
        self.options = options
        self.inbound = InboundQueue(maxsize=options.inbound_queue_size)
        self.dropped_inbound = 0
        self.acks = 0  # publishes the broker acknowledged
        # Times the network thread waited for room in ``inbound`` (``manual_ack``: the
        # owner's back-pressure on the broker, nothing dropped).
        self.inbound_waits = 0
        self._closing = False
        self.connected = threading.Event()
        self._subs: dict[str, int] = {}
        for topic_filter, qos in options.subscriptions.items():
            self._subs[check_filter(topic_filter)] = qos
        # Re-entrant: paho may call on_disconnect (which takes it) from within a write
        # queued under it, when no network thread runs (a stopping transport).
        self._lock = threading.RLock()
        self._client = _JitterClient(
            CallbackAPIVersion.VERSION2,
            client_id=options.client_id,
            clean_session=options.clean_session,
            protocol=mqtt.MQTTv311,
            min_s=options.reconnect_min_s,
            max_s=options.reconnect_max_s,
            url=address.url,
            manual_ack=options.manual_ack,
        )
        self.connection = 0  # counts connections; messages carry the one they came on
        c = self._client
        c.read_batch = max(0, options.read_batch)
        c.on_publish_read = self._on_publish_read
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
        c.on_subscribe = self._on_subscribe
        # SUBSCRIBEs awaiting their SUBACK, by message id: a refused one is sent again.
        self._subscribing: dict[int, list[tuple[str, int]]] = {}
        self._refusals: dict[str, int] = {}  # filter -> refusals in a row on this connection
        self.subscribe_refused = 0  # SUBACKs refusing a filter, since this transport began
        self._timer = threading.Timer  # a test's fake clock replaces it
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
            log.warning("broker %s refused the connection: %s", self.address.url, reason_code)
            client.last_error = f"refused: {reason_code}"
            return
        client.ever_connected = True
        client.last_error = None
        with self._lock:
            self.connection += 1
            self._refusals.clear()
        # paho leaves Nagle on: an UNSUBSCRIBE followed by a SUBSCRIBE (the chunk window)
        # would then wait for the broker's delayed ACK, ~40 ms per chunk.
        sock = client.socket()
        if sock is not None:
            with contextlib.suppress(OSError, AttributeError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            subs = list(self._subs.items())
        if subs:
            self._send_subscribe(subs)
        self.connected.set()
        self._put(Inbound("connected"))

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self._mark_disconnected()

    def _mark_disconnected(self) -> None:
        """Clear ``connected`` and report ``disconnected`` once per connection."""
        with self._lock:
            was = self.connected.is_set()
            self.connected.clear()
        if was:
            self._put(Inbound("disconnected"))

    def _on_message(self, client, userdata, msg) -> None:
        self._on_publish_read(msg.topic, msg.payload, bool(msg.retain), msg.mid, msg.qos)

    def _on_publish_read(self, topic: str, payload: bytes, retain: bool, mid: int,
                         qos: int) -> None:
        item = Inbound("message", topic, payload, retain, mid=mid, qos=qos,
                       connection=self.connection)
        try:
            self.inbound.put_nowait(item)
        except queue.Full:
            if self.options.manual_ack and qos:
                self._wait_for_room(item)
            else:
                self._put(item)  # counts and logs the drop

    def _wait_for_room(self, item: Inbound) -> None:
        """A full inbound queue with ``manual_ack``: the network thread waits for the owner
        to take messages, reading nothing meanwhile, so TCP holds the broker back. A broker
        need not keep to the in-flight window (mosquitto hands a resumed session's whole
        backlog over at once); dropping would lose what it sent, and acknowledging a
        dropped message would lose it for good. Stopping gives up the wait without an
        acknowledgement: the broker sends the message again on the next connection."""
        self.inbound_waits += 1
        if self.inbound_waits in (1, 10, 100) or self.inbound_waits % 1000 == 0:
            log.info("inbound queue full: reading from the broker paused (%d times)",
                     self.inbound_waits)
        while not self._closing:
            try:
                self.inbound.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        self.acks += 1  # this network thread alone writes it
        if self.options.report_published:
            self._put(Inbound("published", mid=mid))

    def unacknowledged(self) -> int:
        """QoS 1 publishes sent or queued and not yet acknowledged by the broker."""
        c = self._client
        with c._out_message_mutex:
            return sum(1 for m in c._out_messages.values() if m.qos > 0)

    def _send_subscribe(self, subs: list[tuple[str, int]]) -> None:
        with self._lock:  # the SUBACK may come before subscribe() returns: hold it back
            rc, mid = self._client.subscribe(subs)
            if rc == mqtt.MQTT_ERR_SUCCESS and mid is not None:
                self._subscribing[mid] = subs

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        """A broker may refuse a subscription for a while (NATS's MQTT gateway does while
        its JetStream elects a leader after a node died); ask again later, or a device would
        stay connected and never hear its desired state nor its telemetry cursor.

        The wait doubles with each refusal in a row (:func:`subscribe_retry_delay`): NATS
        holds the client's connection for its request timeout (4 s) on each refused
        SUBSCRIBE, and every attempt is a request to the cluster still electing leaders."""
        with self._lock:
            subs = self._subscribing.pop(mid, [])
            refused: list[tuple[str, int]] = []
            granted: list[tuple[str, int]] = []
            for (f, q), rc in zip(subs, reason_codes, strict=False):
                if f in self._subs:
                    (refused if rc.is_failure else granted).append((f, q))
            for f, _ in granted:
                self._refusals.pop(f, None)
            for f, _ in refused:
                self._refusals[f] = self._refusals.get(f, 0) + 1
            self.subscribe_refused += len(refused)
            n = max((self._refusals[f] for f, _ in refused), default=0)
        if refused:
            delay = subscribe_retry_delay(n)
            log.warning("the broker refused the subscription to %s (%d in a row); asking "
                        "again in %.1f s", ", ".join(f for f, _ in refused), n, delay)
            t = self._timer(delay, self._resubscribe, args=(refused, self.connection))
            t.daemon = True
            t.start()

    def _resubscribe(self, subs: list[tuple[str, int]], connection: int) -> None:
        with self._lock:
            subs = [(f, q) for f, q in subs if f in self._subs]
        if subs and connection == self.connection and self.connected.is_set():
            self._send_subscribe(subs)  # on a new connection _on_connect has sent them all

    # -- owner API --------------------------------------------------------------------
    def start(self) -> None:
        """Connect in the background; paho keeps reconnecting with backoff.

        A no-op while started; after :meth:`stop` or :meth:`kill` it connects again with the
        same client id, subscriptions and unacknowledged QoS 1 publishes.
        """
        if self._started:
            return
        try:
            self._client.connect_async(
                self.address.host, self.address.port, keepalive=self.options.keepalive_s
            )
        except (OSError, ValueError) as e:
            raise TransportError(f"cannot connect to {self.address.url}: {e}") from e
        self._closing = False
        self._client.loop_start()
        self._started = True

    def wait_connected(self, timeout_s: float) -> bool:
        return self.connected.wait(timeout_s)

    def stop(self, disconnect: bool = True) -> None:
        """Stop the network thread: after a DISCONNECT (no Last Will), or as :meth:`kill`."""
        if not self._started:
            return
        if not disconnect:
            self.kill()
            return
        self._closing = True  # a network thread waiting for room in ``inbound`` gives up
        with contextlib.suppress(OSError):
            self._client.disconnect()
        self._client.loop_stop()
        self._started = False
        self._mark_disconnected()

    def kill(self) -> None:
        """Drop the connection without DISCONNECT, so the broker sends the Last Will."""
        if not self._started:
            return
        self._closing = True
        self._client.stop_loop()
        with contextlib.suppress(OSError):
            self._client.drop_socket()
        self._started = False
        self._mark_disconnected()

    def subscribe(self, topic: str, qos: int = 1) -> None:
        check_filter(topic)
        with self._lock:
            self._subs[topic] = qos
        if self.connected.is_set():
            self._send_subscribe([(topic, qos)])

    def set_will(self, payload: bytes) -> None:
        """The Last Will's payload from the next CONNECT on (the broker keeps the one it
        got with the current connection); without a will topic, nothing to do."""
        if not self.options.will_topic:
            return
        self.options.will_payload = payload
        self._client.will_set(self.options.will_topic, payload, qos=1, retain=True)

    def unsubscribe(self, topic: str) -> None:
        with self._lock:
            known = self._subs.pop(topic, None) is not None
        if known and self.connected.is_set():
            self._client.unsubscribe(topic)

    def ack(self, mid: int, qos: int, connection: int | None = None) -> None:
        """Acknowledge a received message (``manual_ack``); see :meth:`Transport.ack`.
        Checked against the connection as :meth:`ack_and_publish` does."""
        self.ack_and_publish([(mid, qos, connection)], ())

    def ack_many(self, acks: Iterable[tuple[int, int, int | None]]) -> None:
        """:meth:`ack` for many ``(mid, qos, connection)``: the QoS 1 ones go as one packet
        of their PUBACKs together (one write, one wake-up of the network thread), not one
        packet and one wake-up each. Nothing while disconnected: the broker resends them
        on the next connection, as it does those of an earlier connection."""
        self.ack_and_publish(acks, ())

    def publish_many(self, messages: Iterable[tuple[str, bytes, bool]]) -> int:
        """QoS 0 publishes, ``(topic, payload, retain)`` each, written as one packet with
        one wake-up of the network thread, for messages nobody waits on (the server's
        cursors); paho's ``publish()`` would build a message info with its own lock for
        each. Returns how many were queued. Raises while disconnected (QoS 0 is not kept).
        With ``report_published`` the block is reported as one ``published`` item, mid 0.
        """
        return self.ack_and_publish((), messages)

    def ack_and_publish(self, acks: Iterable[tuple[int, int, int | None]],
                        messages: Iterable[tuple[str, bytes, bool]]) -> int:
        """:meth:`ack_many` and then :meth:`publish_many` as one packet: a group's
        acknowledgements and the cursors it moved cost one write and one wake-up of the
        network thread, not two (each wake-up a system call, and the interpreter lock to
        take back after it). The PUBACKs go first. Returns how many publishes were
        queued; raises, queueing nothing, while disconnected if there are any, or if a
        topic is not one to publish to."""
        parts: list[bytes] = []
        for topic, payload, retain in messages:
            name = check_topic(topic).encode("utf-8")
            parts.append(bytes((_PUBLISH_BYTE | (1 if retain else 0),))
                         + _remaining_length(2 + len(name) + len(payload))
                         + _TOPIC_LEN.pack(len(name)) + name + payload)
        acks = [a for a in acks if a[1]] if self.options.manual_ack else []
        pubacks: list[bytes] = []
        others: list[tuple[int, int]] = []
        c = self._client
        # Checked and queued under the lock that a lost connection takes before paho
        # reconnects (``_mark_disconnected``): the packet goes on the connection its
        # acknowledgements came on, or is dropped with it, never sent on the next one,
        # where the same message id may name a message not stored yet.
        with self._lock:
            if not self.connected.is_set():
                if parts:
                    raise TransportError(f"not connected to {self.address.url}")
                return 0  # the broker resends the messages on the next connection
            current = self.connection
            for mid, qos, connection in acks:
                if connection is not None and connection != current:
                    continue
                if qos == 1:
                    pubacks.append(_PUBACK.pack(_PUBACK_BYTE, 2, mid))
                else:
                    others.append((mid, qos))
            try:
                if parts:  # completed as a QoS 0 PUBLISH: one ``published`` item, mid 0
                    c._packet_queue(mqtt.PUBLISH, b"".join(pubacks + parts), 0, 0,
                                    mqtt.MQTTMessageInfo(0))
                elif pubacks:  # paho's ack() queues a packet and wakes its thread per message
                    c._packet_queue(mqtt.PUBACK, b"".join(pubacks), 0, 0)
                for mid, qos in others:
                    c.ack(mid, qos)
            except (OSError, ValueError) as e:
                raise TransportError(
                    f"acknowledging {len(pubacks) + len(others)} messages and publishing "
                    f"{len(parts)} failed: {e}") from e
        return len(parts)

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


# -- many connections, one thread -------------------------------------------------------------


class EpollLoop:
    """One thread that drives many paho clients through one ``epoll`` set.

    For the fleet simulator: paho's own network thread waits with ``select()``, which cannot
    watch descriptors past 1024, and costs a thread and a socket pair per connection. Here a
    connection costs its socket only. paho's external-loop API does the MQTT work
    (``loop_read``, ``loop_write``, ``loop_misc``); this thread owns every socket operation
    (connect, reconnect with jittered backoff, close), owners only publish and subscribe, and
    paho's ``on_socket_register_write`` wakes the thread when they queued something.
    A blocking TCP connect (paho's) stalls every connection of the loop while it lasts: meant
    for brokers on a near network, not for devices.
    """

    # paho's connect blocks (a TCP handshake): at most this many per pass, then the
    # connected ones are served again before the next.
    CONNECTS_PER_PASS = 100

    def __init__(self, name: str = "mqtt-epoll") -> None:
        self._sel = selectors.EpollSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._wake_pending = False
        self._lock = threading.Lock()
        self._commands: list[tuple[str, EpollMqttTransport | None, threading.Event | None]] = []
        self._want_write: set[EpollMqttTransport] = set()
        self._started: set[EpollMqttTransport] = set()
        self._stopping = False
        self._next_misc = 0.0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _wake(self) -> None:
        # One byte per wake-up, not per request: a device's publish (thousands a second
        # in a simulated fleet) costs a send only when the loop has none pending. The loop
        # clears the flag once it has read the bytes, and only then takes the requests
        # queued so far: one queued after that finds the flag clear and sends a byte.
        if self._wake_pending:
            return
        self._wake_pending = True
        with contextlib.suppress(BlockingIOError, OSError):
            self._wake_w.send(b"x")

    def command(self, what: str, t: EpollMqttTransport, wait_s: float | None = None) -> None:
        done = threading.Event() if wait_s is not None else None
        with self._lock:
            self._commands.append((what, t, done))
        self._wake()
        if done is not None and threading.current_thread() is not self._thread:
            done.wait(wait_s)

    def want_write(self, t: EpollMqttTransport) -> None:
        with self._lock:
            self._want_write.add(t)
        if threading.current_thread() is not self._thread:
            self._wake()

    def sync(self, timeout_s: float) -> bool:
        """Wait until the loop has applied every start, stop and kill asked for so far."""
        done = threading.Event()
        with self._lock:
            self._commands.append(("sync", None, done))
        self._wake()
        return done.wait(timeout_s)

    def close(self) -> None:
        """Drop every connection (no DISCONNECT) and end the thread."""
        self._stopping = True
        self._wake()
        self._thread.join(10)

    # -- the loop thread --------------------------------------------------------------
    def _mask(self, t: EpollMqttTransport, sock: socket.socket) -> None:
        events = selectors.EVENT_READ
        if t._client.want_write():
            events |= selectors.EVENT_WRITE
        if t._registered is sock and t._events == events:
            return  # unchanged: the selector's own check cost a tenth of this thread
        try:
            if t._registered is sock:
                self._sel.modify(sock, events, t)
            else:
                self._sel.register(sock, events, t)
                t._registered = sock
            t._events = events
        except (OSError, ValueError, KeyError):
            t._registered = None

    def _drive(self, t: EpollMqttTransport, read: bool) -> None:
        """Read what is ready (``read``), then write what is queued at once: the socket
        almost always takes it, and waiting for ``epoll`` to say so cost two changes of
        the connection's mask and a pass of the loop for every burst of publishes. What
        the socket does not take waits for it to be writable."""
        c = t._client
        try:
            if read:
                c.loop_read()
            # paho's "write registered" flag, set by a publishing thread after this thread
            # had written its packet and cleared it, would stay set over an empty queue,
            # and the next publish would then not wake this thread: it would wait for the
            # keepalive pass. Cleared here, the next publish wakes the loop again.
            c._registered_write = False
            if c.want_write() and c.socket() is not None:
                c.loop_write()
        except Exception:  # counted as a lost connection; the others go on
            log.exception("MQTT connection %s: unexpected error", t.options.client_id)
            with contextlib.suppress(OSError):
                c.drop_socket()
            t._mark_disconnected()
        sock = c.socket()
        if sock is None:
            self.unregister(t)
        elif isinstance(sock, socket.socket):
            self._mask(t, sock)

    def unregister(self, t: EpollMqttTransport) -> None:
        if t._registered is not None:
            with contextlib.suppress(OSError, ValueError, KeyError):
                self._sel.unregister(t._registered)
            t._registered = None

    def _connect(self, t: EpollMqttTransport, now: float) -> None:
        c = t._client
        try:
            c.reconnect()
        except (OSError, ValueError) as e:
            c.last_error = str(getattr(e, "strerror", None) or e or type(e).__name__)
            c.reconnect_attempts += 1
            delay = backoff_delay(c.reconnect_attempts, t.options.reconnect_min_s,
                                  t.options.reconnect_max_s, c._pf_rng)
            if _log_attempt(c.reconnect_attempts - 1):
                log.warning("cannot reach the broker %s (%s); reconnecting in %.1f s",
                            t.address.url, c.last_error, delay)
            t._next_try = now + delay
            return
        sock = c.socket()
        if isinstance(sock, socket.socket):
            self._mask(t, sock)

    def _apply(self, what: str, t: EpollMqttTransport, now: float) -> None:
        c = t._client
        if what == "start":
            self._started.add(t)
            c.reconnect_attempts = 0
            t._next_try = now
        elif what == "disconnect":
            self._started.discard(t)
            if c.socket() is not None:
                with contextlib.suppress(OSError, ValueError):
                    c.disconnect()
                    c.loop_write()  # paho closes the socket once DISCONNECT is written
        if what in ("disconnect", "drop"):
            self._started.discard(t)
            self.unregister(t)
            with contextlib.suppress(OSError):
                c.drop_socket()
            t._mark_disconnected()

    def _run(self) -> None:
        while not self._stopping:
            try:
                self._serve()
            except Exception:  # one client's bug must not end every connection
                log.exception("MQTT epoll loop: unexpected error; continuing")
        for t in list(self._started):
            self.unregister(t)
            with contextlib.suppress(OSError):
                t._client.drop_socket()
            t._mark_disconnected()
        self._sel.close()
        self._wake_r.close()
        self._wake_w.close()

    def _serve(self) -> None:
        """One pass: sockets that are ready, then commands and writes asked for, then
        (every 0.5 s) keepalives and reconnects."""
        now = time.monotonic()
        timeout = max(0.0, min(self._next_misc, now + 0.2) - now)
        for key, events in self._sel.select(timeout):
            t = key.data
            if t is None:
                with contextlib.suppress(BlockingIOError, OSError):
                    while self._wake_r.recv(4096):
                        pass
                # After the reads: a byte sent since is left for the next select, and
                # whoever finds the flag clear from now on sends one.
                self._wake_pending = False
                continue
            self._drive(t, bool(events & selectors.EVENT_READ))
        with self._lock:
            commands, self._commands = self._commands, []
            writers, self._want_write = self._want_write, set()
        now = time.monotonic()
        for what, t, done in commands:
            try:
                if t is not None:
                    self._apply(what, t, now)
            except Exception:
                log.exception("MQTT epoll loop: %s failed", what)
            finally:
                if done is not None:
                    done.set()
        for t in writers:
            if isinstance(t._client.socket(), socket.socket):
                self._drive(t, read=False)
        if now >= self._next_misc:
            self._next_misc = now + 0.5
            connects = 0
            for t in list(self._started):
                c = t._client
                if c.socket() is None:
                    if now >= t._next_try and connects < self.CONNECTS_PER_PASS:
                        connects += 1
                        self._connect(t, now)
                    elif now >= t._next_try:
                        self._next_misc = now  # the rest after serving the connected ones
                    continue
                c.loop_misc()  # keepalive; closes a connection whose PINGRESP is late
                sock = c.socket()
                if sock is None:
                    self.unregister(t)
                    t._next_try = now + backoff_delay(
                        0, t.options.reconnect_min_s, t.options.reconnect_max_s,
                        c._pf_rng)
                elif c.want_write() and isinstance(sock, socket.socket):
                    # A publish queued while this thread finished a write may have
                    # found paho's "write registered" flag still set: not left waiting.
                    self._drive(t, read=False)


class EpollMqttTransport(MqttTransport):
    """:class:`MqttTransport` driven by a shared :class:`EpollLoop` instead of a thread of
    its own: the same callbacks, queue and API, one descriptor per connection."""

    def __init__(self, address: BrokerAddress, options: TransportOptions, loop: EpollLoop):
        super().__init__(address, options)
        self.loop = loop  # the EpollLoop that drives this connection
        self._registered: socket.socket | None = None
        self._events = 0  # the mask ``_registered`` has in the loop's epoll set
        self._next_try = 0.0
        c = self._client
        c.on_socket_register_write = lambda client, userdata, sock: loop.want_write(self)
        c.on_disconnect = self._on_lost

    def _wait_for_room(self, item: Inbound) -> None:
        """One loop serves every connection: it never waits for one owner. The message is
        dropped unacknowledged (counted), and the broker sends it again on the next
        connection."""
        self._put(item)

    def _on_lost(self, client, userdata, flags, reason_code, properties) -> None:
        # Backoff grows while connections fail before a CONNACK (a refusal), and starts
        # again after one that was up.
        client.reconnect_attempts = (0 if self.connected.is_set()
                                     else client.reconnect_attempts + 1)
        self._mark_disconnected()
        self._next_try = time.monotonic() + backoff_delay(
            client.reconnect_attempts, self.options.reconnect_min_s,
            self.options.reconnect_max_s, client._pf_rng)

    def start(self) -> None:
        if self._started:
            return
        try:
            self._client.connect_async(
                self.address.host, self.address.port, keepalive=self.options.keepalive_s)
        except (OSError, ValueError) as e:
            raise TransportError(f"cannot connect to {self.address.url}: {e}") from e
        self._started = True
        self.loop.command("start", self)

    def stop(self, disconnect: bool = True, wait_s: float | None = 5.0) -> None:
        """As :meth:`MqttTransport.stop`; with ``wait_s`` None it returns at once (stop
        many, then :meth:`EpollLoop.sync`)."""
        if not self._started:
            return
        self._started = False
        self.loop.command("disconnect" if disconnect else "drop", self, wait_s=wait_s)

    def kill(self) -> None:
        if not self._started:
            return
        self._started = False
        self.loop.command("drop", self, wait_s=5.0)


def raise_fd_limit(wanted: int) -> int:
    """Raise this process's RLIMIT_NOFILE soft limit towards ``wanted`` (at most the hard
    limit); returns the soft limit now in force."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    return soft


if TYPE_CHECKING:

    def _is_a_transport(t: MqttTransport) -> Transport:  # mypy checks the protocol here
        return t

    def _is_a_transport_too(t: EpollMqttTransport) -> Transport:
        return t
