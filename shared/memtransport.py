"""An in-memory MQTT broker and a :class:`~prunefleet.shared.transport.Transport` on it, for tests.

:class:`MemoryBroker` behaves like mosquitto 2.0 with MQTT 3.1.1 clients where prunefleet
relies on it (``tests/test_memtransport.py`` runs the same scenarios against both):

- retained messages: a retained publish replaces the topic's message, an empty one clears
  it; a new subscription (shared ones too, as mosquitto does) gets the matching retained
  messages with ``retain=True``; live deliveries carry ``retain=False``;
- wildcards ``+`` and ``#``; a filter starting with a wildcard does not match ``$`` topics;
  a client whose subscriptions overlap receives a message once;
- shared subscriptions ``$share/<group>/<filter>``: each message goes to one member of each
  group, round robin in the order the members subscribed;
- QoS 1 acknowledgements: a ``published`` item with the message id. Set ``hold_acks`` to
  keep them back (``release_acks()`` lets them through); paho's in-flight window
  (``max_inflight_messages``) then holds further publishes in the client, and a message
  whose acknowledgement had not arrived when the connection dropped is sent again after
  reconnecting, so subscribers see it twice (at least once, as with a real broker);
- the Last Will, published (retained, QoS 1) when a client is killed, dropped by the broker
  (``drop``), stopped without DISCONNECT, or taken over by a second connection with its
  client id; never on ``stop()``;
- sessions: a clean session ends with its connection; a persistent one
  (``clean_session=False``) keeps its subscriptions, and QoS 1 messages for it queue while it
  is away, up to ``max_queued_messages`` (then dropped and counted, like mosquitto);
- manual acknowledgement (``manual_ack``): a QoS 1 message stays in flight until the client
  calls ``ack()``; at most ``max_inflight_messages`` are in flight per client, the rest queue
  (up to ``max_queued_messages``, then dropped and counted); what is still unacknowledged
  when a persistent session reconnects is delivered again with the same message ids;
- an outage (``set_online(False)``): clients see ``disconnected``; their QoS 1 publishes are
  kept and sent when the broker is back (``set_online(True)``), as paho does.

Delivery is synchronous and there are no threads: when ``publish()`` returns, every
subscriber's ``inbound`` queue holds the message and (unless acknowledgements are held) the
publisher's queue holds its ``published`` item. Reconnecting is explicit: a started client
that lost its connection connects again at ``reconnect_all()`` or ``set_online(True)``, the
moment paho's backoff would have elapsed; all of them reconnect and renew their
subscriptions before any of them sends the publishes it kept. One lock guards the broker
and all its clients, so several threads may publish at once.

Not modelled: QoS 2 (treated as QoS 1), keepalive, ACLs, credentials, MQTT 5.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .errors import TransportError
from .transport import (
    BrokerAddress,
    Inbound,
    InboundQueue,
    TransportOptions,
    check_filter,
    check_topic,
    split_shared,
    topic_matches,
)

if TYPE_CHECKING:
    from .transport import Transport

__all__ = ["MemoryBroker", "MemoryTransport"]

log = logging.getLogger(__name__)

_WILDCARDS = ("+", "#")


@dataclass
class _Out:
    """A QoS 1 publish the client keeps until the broker acknowledges it."""

    mid: int
    topic: str
    payload: bytes
    qos: int
    retain: bool
    sent: bool = False


@dataclass
class _Session:
    client_id: str
    clean: bool
    subs: dict[str, int] = field(default_factory=dict)  # filter (with $share/…) -> QoS
    queued: deque[tuple[str, bytes]] = field(default_factory=deque)  # while offline
    # manual_ack: delivered, not yet acknowledged (message id -> message)
    unacked: dict[int, tuple[str, bytes]] = field(default_factory=dict)
    mid: int = 0

    def next_mid(self) -> int:
        while True:
            self.mid = self.mid % 65535 + 1
            if self.mid not in self.unacked:
                return self.mid


class MemoryBroker:
    """A deterministic in-memory MQTT broker; see the module docstring for what it honours.

    ``hold_acks``: while true, QoS 1 acknowledgements wait for :meth:`release_acks`.
    ``dropped_queued``: QoS 1 messages dropped for offline persistent sessions whose queue
    was full.
    """

    def __init__(self, name: str = "memory", *, max_queued_messages: int = 1000,
                 max_inflight_messages: int = 20) -> None:
        self.address = BrokerAddress(name, 1883)
        self.max_queued_messages = max_queued_messages
        self.max_inflight_messages = max_inflight_messages  # to manual_ack clients
        self.hold_acks = False
        self.dropped_queued = 0
        self._lock = threading.Lock()
        self._online = True
        self._retained: dict[str, tuple[bytes, int]] = {}
        self._clients: list[MemoryTransport] = []  # every transport made on this broker
        self._conns: dict[str, MemoryTransport] = {}  # client id -> connected transport
        self._sessions: dict[str, _Session] = {}
        # subscription indexes: exact topic or wildcard filter -> {client id: QoS};
        # (group, filter) -> member client ids in round-robin order
        self._exact: dict[str, dict[str, int]] = {}
        self._wild: dict[str, dict[str, int]] = {}
        self._shared: dict[tuple[str, str], deque[str]] = {}
        self._held: list[tuple[MemoryTransport, int]] = []

    # -- test controls ------------------------------------------------------------------
    @property
    def online(self) -> bool:
        return self._online

    def set_online(self, online: bool, *, keep_state: bool = True) -> None:
        """Take the broker away (every client sees ``disconnected``) or bring it back.

        Going away publishes no Last Will: there is no broker to publish it. With
        ``keep_state=False`` the outage also loses retained messages and persistent sessions,
        as a mosquitto without persistence does. Coming back reconnects every started client.
        """
        with self._lock:
            if not online and self._online:
                self._online = False
                for t in list(self._conns.values()):
                    self._disconnect(t, will=False)
                if not keep_state:
                    self._retained.clear()
                    for session in list(self._sessions.values()):
                        self._end_session(session)
            elif online and not self._online:
                self._online = True
                self._reconnect_all()

    def drop(self, client_id: str) -> bool:
        """Close ``client_id``'s connection as a network failure would: its Last Will goes out.

        The client stays started and connects again at :meth:`reconnect_all`. False if no
        client with that id is connected.
        """
        with self._lock:
            t = self._conns.get(client_id)
            if t is None:
                return False
            self._disconnect(t, will=True)
            return True

    def reconnect_all(self) -> int:
        """Connect every started client that is not connected (paho's backoff has elapsed)."""
        with self._lock:
            return self._reconnect_all()

    def release_acks(self) -> int:
        """Deliver the held QoS 1 acknowledgements; returns how many were delivered."""
        with self._lock:
            held, self._held = self._held, []
            released = 0
            for t, mid in held:
                out = t._outbox.get(mid)
                if out is not None and out.sent and t.connected.is_set():
                    self._ack(t, mid)
                    released += 1
            for t in {id(t): t for t, _ in held}.values():
                if t.connected.is_set():
                    self._flush(t)
            return released

    # -- inspection ---------------------------------------------------------------------
    @property
    def held_acks(self) -> int:
        with self._lock:
            return len(self._held)

    def retained(self, topic: str) -> bytes | None:
        with self._lock:
            entry = self._retained.get(topic)
            return None if entry is None else entry[0]

    def connected_clients(self) -> list[str]:
        with self._lock:
            return list(self._conns)

    def subscriptions(self, client_id: str) -> dict[str, int]:
        """The broker's view of a session's subscriptions (empty if it has no session)."""
        with self._lock:
            session = self._sessions.get(client_id)
            return dict(session.subs) if session else {}

    # -- internals; the caller holds self._lock ------------------------------------------
    def _register(self, t: MemoryTransport) -> None:
        with self._lock:
            self._clients.append(t)

    def _reconnect_all(self) -> int:
        if not self._online:
            return 0
        waiting = [t for t in self._clients if t._started and not t.connected.is_set()]
        for t in waiting:
            self._connect(t, flush=False)
        for t in waiting:  # everyone is back and subscribed before the kept publishes go out
            if t.connected.is_set():
                self._flush(t)
        return len(waiting)

    def _connect(self, t: MemoryTransport, *, flush: bool = True) -> None:
        cid = t.options.client_id
        clean = t.options.clean_session
        old = self._conns.get(cid)
        if old is not None:  # takeover, as mosquitto 2.0 does it (the will goes out too)
            self._disconnect(old, will=old.options.clean_session or clean)
        session = self._sessions.get(cid)
        if session is not None and (clean or session.clean):
            self._end_session(session)
            session = None
        if session is None:
            session = self._sessions[cid] = _Session(cid, clean)
        self._conns[cid] = t
        t.connection += 1
        t.connected.set()
        t._put(Inbound("connected"))
        if t.options.manual_ack:
            for mid, (topic, payload) in list(session.unacked.items()):
                self._deliver(t, session, topic, payload, mid)  # again, same id
            self._fill(t, session)
        else:
            while session.queued:
                topic, payload = session.queued.popleft()
                t._put(Inbound("message", topic, payload, False, qos=1,
                               connection=t.connection))
        for topic_filter, qos in t._subs.items():  # paho renews them in on_connect
            self._subscribe(t, topic_filter, qos)
        for out in t._outbox.values():
            out.sent = False
        t._inflight = 0
        t._unsent = deque(t._outbox)
        if flush:
            self._flush(t)

    def _disconnect(self, t: MemoryTransport, *, will: bool) -> None:
        cid = t.options.client_id
        if self._conns.get(cid) is not t:
            return
        del self._conns[cid]
        t.connected.clear()
        t._put(Inbound("disconnected"))
        self._held = [h for h in self._held if h[0] is not t]
        session = self._sessions.get(cid)
        if session is not None and session.clean:
            self._end_session(session)
        topic, payload = t.options.will_topic, t.options.will_payload
        if will and topic and payload is not None:
            self._route(topic, payload, 1, True)

    def _end_session(self, session: _Session) -> None:
        for topic_filter in list(session.subs):
            self._unindex(session.client_id, topic_filter)
        self._sessions.pop(session.client_id, None)

    def _index(self, cid: str, topic_filter: str, qos: int) -> None:
        group, inner = split_shared(topic_filter)
        if group is not None:
            members = self._shared.setdefault((group, inner), deque())
            if cid not in members:
                members.append(cid)
        elif any(w in inner for w in _WILDCARDS):
            self._wild.setdefault(inner, {})[cid] = qos
        else:
            self._exact.setdefault(inner, {})[cid] = qos

    def _unindex(self, cid: str, topic_filter: str) -> None:
        group, inner = split_shared(topic_filter)
        if group is not None:
            members = self._shared.get((group, inner))
            if members is not None and cid in members:
                members.remove(cid)
                if not members:
                    del self._shared[(group, inner)]
            return
        table = self._wild if any(w in inner for w in _WILDCARDS) else self._exact
        subscribers = table.get(inner)
        if subscribers is not None:
            subscribers.pop(cid, None)
            if not subscribers:
                del table[inner]

    def _subscribe(self, t: MemoryTransport, topic_filter: str, qos: int) -> None:
        session = self._sessions[t.options.client_id]
        session.subs[topic_filter] = qos
        self._index(t.options.client_id, topic_filter, qos)
        _, inner = split_shared(topic_filter)
        if any(w in inner for w in _WILDCARDS):
            matching = [topic for topic in self._retained if topic_matches(inner, topic)]
        else:
            matching = [inner] if inner in self._retained else []
        for topic in matching:
            t._put(Inbound("message", topic, self._retained[topic][0], True))

    def _unsubscribe(self, t: MemoryTransport, topic_filter: str) -> None:
        session = self._sessions.get(t.options.client_id)
        if session is not None and session.subs.pop(topic_filter, None) is not None:
            self._unindex(t.options.client_id, topic_filter)

    def _route(self, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        """What the broker does with one PUBLISH: retain it and hand it to each subscriber."""
        if retain:
            if payload:
                self._retained[topic] = (payload, qos)
            else:
                self._retained.pop(topic, None)
        receivers: dict[str, int] = dict(self._exact.get(topic, {}))
        for topic_filter, subscribers in self._wild.items():
            if topic_matches(topic_filter, topic):
                for cid, sub_qos in subscribers.items():
                    receivers[cid] = max(sub_qos, receivers.get(cid, 0))
        for cid, sub_qos in receivers.items():
            self._send(cid, topic, payload, min(qos, sub_qos))
        for (group, topic_filter), members in self._shared.items():
            if topic_matches(topic_filter, topic):
                cid = members[0]
                members.rotate(-1)
                sub_qos = self._sessions[cid].subs.get(f"$share/{group}/{topic_filter}", 0)
                self._send(cid, topic, payload, min(qos, sub_qos))

    def _send(self, cid: str, topic: str, payload: bytes, qos: int) -> None:
        t = self._conns.get(cid)
        session = self._sessions.get(cid)
        if t is not None and session is not None and qos > 0 and t.options.manual_ack:
            if session.queued or len(session.unacked) >= self.max_inflight_messages:
                self._enqueue(session, topic, payload)  # the in-flight window is full
            else:
                self._deliver(t, session, topic, payload)
            return
        if t is not None:
            t._put(Inbound("message", topic, payload, False, qos=qos, connection=t.connection))
            return
        if session is None or qos == 0:
            return  # QoS 0 is not queued for an absent client (mosquitto's default)
        self._enqueue(session, topic, payload)

    def _enqueue(self, session: _Session, topic: str, payload: bytes) -> None:
        if len(session.queued) >= self.max_queued_messages:
            self.dropped_queued += 1
            return
        session.queued.append((topic, payload))

    def _deliver(self, t: MemoryTransport, session: _Session, topic: str, payload: bytes,
                 mid: int | None = None) -> None:
        """Hand a QoS 1 message to a manual_ack client; it stays in flight until acked."""
        mid = session.next_mid() if mid is None else mid
        session.unacked[mid] = (topic, payload)
        item = Inbound("message", topic, payload, False, mid=mid, qos=1,
                       connection=t.connection)
        try:
            t.inbound.put_nowait(item)
        except queue.Full:
            t._put(item)  # counts the drop; acknowledged at once, as MqttTransport does
            session.unacked.pop(mid, None)

    def _fill(self, t: MemoryTransport, session: _Session) -> None:
        """Deliver queued messages into the free part of the in-flight window."""
        while session.queued and len(session.unacked) < self.max_inflight_messages:
            topic, payload = session.queued.popleft()
            self._deliver(t, session, topic, payload)

    def _ack_received(self, t: MemoryTransport, mid: int, connection: int | None) -> None:
        if connection is not None and connection != t.connection:
            return
        session = self._sessions.get(t.options.client_id)
        if self._conns.get(t.options.client_id) is not t or session is None:
            return
        if session.unacked.pop(mid, None) is not None:
            self._fill(t, session)

    def _publish_from(
        self, t: MemoryTransport, topic: str, payload: bytes, qos: int, retain: bool
    ) -> int:
        connected = t.connected.is_set()
        if qos == 0:
            if not connected:
                raise TransportError(f"publish to {topic} failed: not connected")
            mid = t._next_mid()
            self._route(topic, payload, 0, retain)
            t._acked(mid)
            return mid
        limit = t.options.max_queued_messages
        if limit > 0 and len(t._outbox) >= limit:
            raise TransportError(f"publish to {topic} failed: outgoing queue full ({limit})")
        mid = t._next_mid()
        t._outbox[mid] = _Out(mid, topic, payload, min(qos, 1), retain)
        t._unsent.append(mid)
        if connected:
            self._flush(t)
        return mid

    def _flush(self, t: MemoryTransport) -> None:
        """Send what paho's in-flight window allows; acknowledge unless acks are held."""
        limit = t.options.max_inflight_messages
        while t._unsent and (limit <= 0 or t._inflight < limit):
            out = t._outbox.get(t._unsent.popleft())
            if out is None:
                continue
            out.sent = True
            t._inflight += 1
            self._route(out.topic, out.payload, out.qos, out.retain)
            if self.hold_acks:
                self._held.append((t, out.mid))
            else:
                self._ack(t, out.mid)

    def _ack(self, t: MemoryTransport, mid: int) -> None:
        del t._outbox[mid]
        t._inflight -= 1
        t._acked(mid)


class MemoryTransport:
    """A :class:`~prunefleet.shared.transport.Transport` on a :class:`MemoryBroker`.

    Uses the same :class:`TransportOptions` as the paho one: client id, clean session, Last
    Will, initial subscriptions, the inbound queue size, paho's in-flight window
    (``max_inflight_messages``) and outgoing queue bound (``max_queued_messages``).
    """

    def __init__(
        self,
        broker: MemoryBroker,
        options: TransportOptions,
        address: BrokerAddress | None = None,
    ) -> None:
        self.broker = broker
        self.options = options
        self.address = address or broker.address
        self.inbound = InboundQueue(maxsize=options.inbound_queue_size)
        self.dropped_inbound = 0
        self.acks = 0  # publishes the broker acknowledged
        self.subscribe_refused = 0  # this broker grants every valid filter
        self.inbound_waits = 0  # the broker keeps to the in-flight window: never waits
        self.connected = threading.Event()
        self._subs: dict[str, int] = {}
        for topic_filter, qos in options.subscriptions.items():
            self._subs[check_filter(topic_filter)] = qos
        self._started = False
        self._mid = 0
        self._outbox: dict[int, _Out] = {}  # QoS 1 publishes not yet acknowledged
        self._unsent: deque[int] = deque()
        self._inflight = 0
        self.connection = 0  # counts connections; messages carry the one they came on
        broker._register(self)

    def _put(self, item: Inbound) -> None:
        try:
            self.inbound.put_nowait(item)
        except queue.Full:
            self.dropped_inbound += 1
            if self.dropped_inbound in (1, 10, 100) or self.dropped_inbound % 1000 == 0:
                log.warning("inbound queue full: %d messages dropped", self.dropped_inbound)

    def _next_mid(self) -> int:
        self._mid = self._mid % 65535 + 1
        return self._mid

    def start(self) -> None:
        """Connect now if the broker is online, else as soon as it is back."""
        with self.broker._lock:
            if self._started:
                return
            self._started = True
            if self.broker._online:
                self.broker._connect(self)

    def stop(self, disconnect: bool = True) -> None:
        """Disconnect cleanly (no Last Will); ``disconnect=False`` is :meth:`kill`."""
        with self.broker._lock:
            if not self._started:
                return
            self._started = False
            self.broker._disconnect(self, will=not disconnect)

    def kill(self) -> None:
        """Drop the connection without DISCONNECT: the broker publishes the Last Will."""
        self.stop(disconnect=False)

    def wait_connected(self, timeout_s: float) -> bool:
        return self.connected.wait(timeout_s)

    def subscribe(self, topic: str, qos: int = 1) -> None:
        check_filter(topic)
        with self.broker._lock:
            self._subs[topic] = qos
            if self.connected.is_set():
                self.broker._subscribe(self, topic, qos)

    def set_will(self, payload: bytes) -> None:
        if self.options.will_topic:
            self.options.will_payload = payload

    def unsubscribe(self, topic: str) -> None:
        with self.broker._lock:
            known = self._subs.pop(topic, None) is not None
            if known and self.connected.is_set():
                self.broker._unsubscribe(self, topic)

    def ack(self, mid: int, qos: int, connection: int | None = None) -> None:
        """Acknowledge a received message (``manual_ack``); frees its in-flight slot."""
        if not self.options.manual_ack or qos == 0:
            return
        with self.broker._lock:
            self.broker._ack_received(self, mid, connection)

    def _acked(self, mid: int) -> None:
        """The broker acknowledged a publish (its lock held)."""
        self.acks += 1
        if self.options.report_published:
            self._put(Inbound("published", mid=mid))

    def unacknowledged(self) -> int:
        """QoS 1 publishes sent or queued and not yet acknowledged by the broker."""
        with self.broker._lock:
            return len(self._outbox)

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> int:
        """Publish; returns the message id that a ``published`` item acknowledges."""
        check_topic(topic)
        if qos not in (0, 1, 2):
            raise TransportError(f"publish to {topic} failed: QoS {qos} does not exist")
        with self.broker._lock:
            return self.broker._publish_from(self, topic, bytes(payload), qos, retain)


if TYPE_CHECKING:

    def _is_a_transport(t: MemoryTransport) -> Transport:  # mypy checks the protocol here
        return t
