"""The paho transport's shortcuts around paho's per-message costs, without a broker: a
group's PUBACKs as one packet, QoS 0 publishes as one packet encoded as paho would, and
messages handed to ``on_message`` without the per-topic callback walk. (Against a real
broker: tests/test_ingest.py.)"""

from __future__ import annotations

import random
import socket
import threading

import paho.mqtt.client as mqtt
import pytest

from prunefleet.shared.errors import TransportError
from prunefleet.shared.transport import (
    BrokerAddress,
    Inbound,
    InboundQueue,
    MqttTransport,
    TransportOptions,
    _remaining_length,
)


def _transport(**options) -> MqttTransport:
    return MqttTransport(BrokerAddress.parse("mqtt://127.0.0.1:1"),
                         TransportOptions(client_id="t", **options))


def test_acks_of_a_group_go_as_one_write_and_skip_other_connections():
    """``ack_many``: the group's PUBACKs as one packet (one send, one wake-up of paho's
    network thread), none for QoS 0 or for a message of an earlier connection."""
    t = _transport(manual_ack=True)
    c = t._client
    t.ack_many([(5, 1, 0)])
    assert not c._out_packet  # not connected: the broker resends them after reconnecting
    t.connected.set()
    t.connection = 3
    t.ack_many([(5, 1, 3), (6, 1, None), (7, 0, 3), (8, 1, 2), (300, 1, 3)])
    assert [p["packet"] for p in c._out_packet] == [
        b"\x40\x02\x00\x05" b"\x40\x02\x00\x06" b"\x40\x02\x01\x2c"]


def test_messages_reach_on_message_and_per_topic_callbacks_still_win():
    t = _transport(manual_ack=True)
    c = t._client
    msg = mqtt.MQTTMessage(mid=7, topic=b"p/devices/d1/telemetry")
    msg.qos, msg.payload = 1, b"{}"
    c._handle_on_message(msg)
    got = t.inbound.get_nowait()
    assert (got.kind, got.topic, got.payload, got.mid, got.qos) == (
        "message", "p/devices/d1/telemetry", b"{}", 7, 1)
    seen: list[str] = []
    c.message_callback_add("p/devices/+/telemetry", lambda cl, u, m: seen.append(m.topic))
    c._handle_on_message(msg)  # paho's own path: the filtered callback, not on_message
    assert seen == ["p/devices/d1/telemetry"] and t.inbound.empty()


def test_published_items_are_reported_unless_turned_off():
    on = _transport()
    assert on._client.on_publish is not None
    on._on_publish(on._client, None, 5, None, None)
    assert on.inbound.get_nowait() == Inbound("published", mid=5)
    off = _transport(report_published=False)
    off._on_publish(off._client, None, 6, None, None)
    off._on_publish(off._client, None, 7, None, None)
    assert off.inbound.empty() and (on.acks, off.acks) == (1, 2)  # counted, not queued


def test_qos0_publishes_go_as_one_packet_paho_would_have_written():
    t = _transport()
    c = t._client
    with pytest.raises(TransportError):
        t.publish_many([("a/b", b"xy", True)])  # QoS 0 is not kept while disconnected
    t.connected.set()
    big = bytes(200)
    assert t.publish_many([("a/b", b"xy", True), ("p/devices/d1/acked", big, False)]) == 2
    assert t.publish_many([]) == 0
    [packet] = c._out_packet
    assert packet["packet"] == (
        b"\x31\x07\x00\x03a/bxy"  # PUBLISH, retained, QoS 0: 7 bytes follow
        + b"\x30\xdc\x01\x00\x12p/devices/d1/acked" + big)  # 220 = 0xdc 0x01
    with pytest.raises(TransportError):
        t.publish_many([("a/+", b"", False)])  # no wildcards in a topic


def test_a_groups_acks_and_cursors_go_as_one_write_acks_first():
    """``ack_and_publish``: what the server sends once a group is stored (the broker's
    PUBACKs, then the devices' cursors) is one packet, so one send and one wake-up of the
    network thread; a bad topic or a lost connection queues none of it."""
    t = _transport(manual_ack=True)
    c = t._client
    cursor = ("p/devices/d1/acked", b"{}", True)
    with pytest.raises(TransportError):
        t.ack_and_publish([(5, 1, None)], [cursor])  # QoS 0 is not kept while disconnected
    assert t.ack_and_publish([(5, 1, None)], []) == 0
    assert not c._out_packet
    t.connected.set()
    t.connection = 3
    with pytest.raises(TransportError):
        t.ack_and_publish([(5, 1, 3)], [cursor, ("p/devices/+/acked", b"", True)])
    assert not c._out_packet  # the acks did not go without their cursors
    assert t.ack_and_publish([(5, 1, 3), (6, 0, 3), (7, 1, 2), (8, 1, 3)], [cursor]) == 1
    [packet] = c._out_packet
    assert packet["packet"] == (b"\x40\x02\x00\x05" b"\x40\x02\x00\x08"
                                + b"\x31\x16\x00\x12p/devices/d1/acked{}")


def test_acks_of_a_connection_lost_meanwhile_are_never_sent_on_the_next_one():
    """A commit thread that stalls while paho reconnects: its PUBACKs name message ids of
    the old connection, which on the new one (a broker restarted without persistence)
    may name messages not stored yet. They are checked against the connection as they
    are queued, not as the call began."""
    t = _transport(manual_ack=True)
    c = t._client
    t.connected.set()
    t.connection = 1

    def stalled():  # the reconnect happens while the group's acknowledgements are listed
        t._mark_disconnected()
        c._out_packet.clear()  # what paho's reconnect() does
        t.connection = 2
        t.connected.set()
        yield (1, 1, 1)
        yield (2, 1, 2)

    t.ack_and_publish(stalled(), [])
    assert [p["packet"] for p in c._out_packet] == [b"\x40\x02\x00\x02"]


def test_a_write_that_finds_the_connection_gone_without_a_network_thread_does_not_hang():
    """Without paho's network thread (a transport stopping), paho writes a queued packet
    at once on the calling thread; a connection found broken then calls on_disconnect
    there, which takes the lock the acknowledgements are queued under."""

    class Broken:
        def send(self, data: bytes) -> int:
            raise ConnectionResetError("reset by peer")

        def close(self) -> None:
            pass

        def fileno(self) -> int:
            return -1

    t = _transport(manual_ack=True)
    c = t._client
    t.connected.set()
    t.connection = 1
    c._sock = Broken()
    c._state = mqtt._ConnectionState.MQTT_CS_CONNECTED
    done = threading.Event()

    def ack() -> None:
        t.ack_and_publish([(5, 1, 1)], [])
        done.set()

    worker = threading.Thread(target=ack, daemon=True)
    worker.start()
    assert done.wait(10), "ack_and_publish hung on its own lock"
    assert not t.connected.is_set()  # the lost connection was seen
    assert t.inbound.get_nowait() == Inbound("disconnected")


def _publish_packet(topic: bytes, mid: int, payload: bytes) -> bytes:
    body = len(topic).to_bytes(2, "big") + topic + mid.to_bytes(2, "big") + payload
    return bytes((0x32, len(body))) + body  # PUBLISH, QoS 1; bodies under 128 bytes here


def _reads(read_batch: int) -> int:
    """Messages one loop_read() hands on, with 3 PUBLISH packets waiting on the socket."""
    t = _transport(manual_ack=True, read_batch=read_batch)
    c = t._client
    mine, broker = socket.socketpair()
    mine.setblocking(False)
    try:
        broker.sendall(b"".join(_publish_packet(b"p/devices/d1/telemetry", mid, b"{}")
                                for mid in (1, 2, 3)))
        c._sock = mine
        assert c.loop_read() == mqtt.MQTT_ERR_SUCCESS
        return t.inbound.qsize()
    finally:
        c._sock = None
        mine.close()
        broker.close()


def test_a_busy_subscriber_reads_what_the_socket_holds_per_wake_up():
    assert _reads(0) == 1  # paho's own: one packet per select()
    assert _reads(64) == 3  # up to 64 while the socket has them, then back to select()
    # Past the batch only what one read already took from the socket: here all three.
    assert _reads(2) == 3


def test_read_ahead_hands_over_every_packet_however_the_bytes_arrive():
    """A busy subscriber reads up to 64 KiB at once and serves paho's byte-sized reads from
    it: packets split across reads arrive whole, and what was read ahead past the batch is
    handed over in the same wake-up (select() cannot see it, so it would wait there)."""
    t = _transport(manual_ack=True, read_batch=4)
    c = t._client
    mine, broker = socket.socketpair()
    mine.setblocking(False)
    stream = b"".join(_publish_packet(b"p/devices/d1/telemetry", mid, bytes([mid]) * 20)
                      for mid in range(1, 11))
    try:
        c._sock = mine
        broker.sendall(stream[:7])  # part of the first packet's header
        assert c.loop_read() == mqtt.MQTT_ERR_SUCCESS
        assert t.inbound.qsize() == 0
        broker.sendall(stream[7:])  # the rest: more than read_batch packets at once
        assert c.loop_read() == mqtt.MQTT_ERR_SUCCESS
        got = [t.inbound.get_nowait() for _ in range(t.inbound.qsize())]
        assert [(m.mid, m.payload) for m in got] == [(k, bytes([k]) * 20) for k in range(1, 11)]
        assert c._pf_rpos >= len(c._pf_rdata)  # nothing left behind the socket's back
        broker.close()  # the broker goes away: paho sees the connection lost
        assert c.loop_read() != mqtt.MQTT_ERR_SUCCESS
    finally:
        c._sock = None
        mine.close()


class _TakingSocket:
    """A socket whose send() takes the next scripted number of bytes (None: would block)."""

    def __init__(self, takes: list[int | None]) -> None:
        self.takes = takes
        self.sent: list[bytes] = []
        self.closed = False

    def send(self, data: bytes) -> int:
        take = self.takes.pop(0) if self.takes else len(data)
        if take is None:
            raise BlockingIOError
        self.sent.append(bytes(data[:take]))
        return min(take, len(data))

    def close(self) -> None:
        self.closed = True


def test_queued_packets_go_whole_and_in_order_in_few_writes_however_the_socket_takes_them():
    """A device sending its backlog queues several publishes at once: they leave in one
    write (paho: one system call per packet), split wherever the socket stops taking
    bytes, in order, and a QoS 0 publish counts as published only once it is all out."""
    t = _transport(report_published=False)
    c = t._client
    c.on_socket_register_write = lambda *_: None  # written when this test says
    published: list[int] = []
    c.on_publish = lambda _c, _u, mid, _rc, _p: published.append(mid)
    sock = _TakingSocket([0, 7, None, 60, None])
    c._sock = sock
    packets = [_publish_packet(b"p/devices/d1/telemetry", mid, bytes([mid]) * 20)
               for mid in (1, 2, 3, 4)]
    qos0 = bytes((0x30, 5)) + b"\x00\x01a" + b"xy"
    info = mqtt.MQTTMessageInfo(9)
    for mid, packet in enumerate(packets, 1):
        c._packet_queue(mqtt.PUBLISH, packet, mid, 1)
    c._packet_queue(mqtt.PUBLISH, qos0, 9, 0, info)
    try:
        assert c.loop_write() == mqtt.MQTT_ERR_SUCCESS  # nothing taken: next time
        assert c.loop_write() == mqtt.MQTT_ERR_SUCCESS  # 7 bytes, then it would block
        assert c.loop_write() == mqtt.MQTT_ERR_SUCCESS  # 60 more, then it would block
        assert not info.is_published() and not published
        assert c.loop_write() == mqtt.MQTT_ERR_SUCCESS  # the rest
        assert b"".join(sock.sent) == b"".join(packets) + qos0
        assert len(sock.sent) == 4  # paho's own writes: 5 (one per packet) and more
        assert info.is_published() and published == [9]
        assert not c._out_packet and not c.want_write()
        # A DISCONNECT is paho's own: what comes before it is joined, then it goes alone.
        c._packet_queue(mqtt.PUBLISH, packets[0], 1, 1)
        c._packet_queue(mqtt.PUBLISH, packets[1], 2, 1)
        c._packet_queue(mqtt.DISCONNECT, b"\xe0\x00", 0, 0)
        sock.sent.clear()
        c.loop_write()
        assert sock.sent == [packets[0] + packets[1], b"\xe0\x00"] and sock.closed
    finally:
        c._sock = None


def test_a_raising_publish_callback_loses_no_packet_and_no_other_completion():
    """An ``on_publish`` that raises (paho passes it on) while a joined write is being
    accounted for: the bytes not yet written stay queued in order and go next time, and
    every QoS 0 publish that was written is still published (found by a review)."""
    t = _transport(report_published=False)
    c = t._client
    c.on_socket_register_write = lambda *_: None

    def on_publish(_c, _u, mid, _rc, _p):
        if mid == 1:
            raise RuntimeError("a callback's bug")

    c.on_publish = on_publish
    sock = _TakingSocket([20])  # the first call takes 20 bytes: two packets and a part
    c._sock = sock
    packets = [bytes((0x30, 5)) + b"\x00\x01a" + bytes([k]) * 2 for k in (1, 2, 3)]
    infos = [mqtt.MQTTMessageInfo(k) for k in (1, 2, 3)]
    for k, (packet, info) in enumerate(zip(packets, infos, strict=True), 1):
        c._packet_queue(mqtt.PUBLISH, packet, k, 0, info)
    try:
        with pytest.raises(RuntimeError):
            c.loop_write()
        assert [i.is_published() for i in infos] == [True, True, False]
        c.loop_write()
        assert b"".join(sock.sent) == b"".join(packets)  # whole and in order
        assert infos[2].is_published() and not c._out_packet
    finally:
        c._sock = None


def test_a_group_taken_at_once_wakes_a_network_thread_waiting_for_room_once():
    """The ingest loop takes a group in one call: in order, up to the most asked for, and
    the network thread blocked on the full queue is woken once, not once per item."""
    q = InboundQueue(maxsize=5)
    for k in range(5):
        q.put_nowait(Inbound("message", f"t/{k}"))
    wakes = []
    notify = q.not_full.notify
    q.not_full.notify = lambda n=1: (wakes.append(n), notify(n))[1]
    producer = threading.Thread(target=q.put, args=(Inbound("message", "t/5"),))
    producer.start()
    group = q.get_many(4, timeout=5)
    producer.join(5)
    assert not producer.is_alive()  # it found room
    assert [i.topic for i in group] == ["t/0", "t/1", "t/2", "t/3"]
    assert len(wakes) == 1
    assert [i.topic for i in q.get_many(10, timeout=5)] == ["t/4", "t/5"]
    assert q.get_many(10, timeout=0.01) == []  # nothing came: empty, not an error


def _packet(head: int, body: bytes) -> bytes:
    return bytes((head,)) + _remaining_length(len(body)) + body


def _publish(topic: bytes, payload: bytes, qos: int, mid: int = 0, retain: bool = False,
             dup: bool = False) -> bytes:
    body = len(topic).to_bytes(2, "big") + topic
    body += mid.to_bytes(2, "big") if qos else b""
    return _packet(0x30 | (dup << 3) | (qos << 1) | retain, body + payload)


def _received(stream: bytes, read_batch: int, chunks: list[int], expect: int,
              per_topic: bool = False) -> tuple[list[tuple], int]:
    """What a manual-ack transport hands over for ``stream``, sent in ``chunks``, and how
    many it handed over without paho's own parsing."""
    t = _transport(manual_ack=True, read_batch=read_batch)
    c = t._client
    if per_topic:
        c.message_callback_add("x/#", lambda *_: None)
    fast = 0
    handler = c.on_publish_read

    def counted(*args) -> None:
        nonlocal fast
        fast += 1
        assert handler is not None
        handler(*args)
    c.on_publish_read = counted
    mine, broker = socket.socketpair()
    mine.setblocking(False)
    c._sock = mine
    try:
        k = 0
        for size in chunks:
            broker.sendall(stream[k:k + size])
            k += size
            for _ in range(200):  # paho's own path: one packet per call
                if c.loop_read() != mqtt.MQTT_ERR_SUCCESS:
                    break
        assert k >= len(stream)
        got = [t.inbound.get_nowait() for _ in range(t.inbound.qsize())]
        assert len(got) == expect
        return [(m.topic, m.payload, m.retain, m.mid, m.qos) for m in got], fast
    finally:
        c._sock = None
        mine.close()
        broker.close()


def test_publishes_read_ahead_are_handed_over_as_paho_would_however_they_arrive():
    """The busy subscriber's own parsing of PUBLISH packets read ahead gives exactly what
    paho's parsing gives: topics, payloads of every length encoding, retain, message ids
    and QoS, in order, with other packets (QoS 2, PUBACK, PINGRESP) left to paho between
    them, and whatever the reads cut."""
    rng = random.Random(7)
    stream, expect = b"", 0
    for k in range(300):
        size = rng.choice((0, 1, 50, 126, 127, 128, 300, 16383, 16384, 20000))
        payload = bytes(rng.randrange(256) for _ in range(min(size, 64))) * (size // 64 + 1)
        payload = payload[:size]
        topic = f"p/devices/d{k % 7}/telemetry".encode() if k % 5 else "p/é/ü".encode()
        kind = rng.random()
        if kind < 0.05:  # QoS 2: PUBREC from paho, the message once PUBREL comes
            stream += _publish(topic, payload, 2, mid=60000 + k)
            stream += _packet(0x62, (60000 + k).to_bytes(2, "big"))  # PUBREL
        elif kind < 0.08:
            stream += _packet(0x40, (1000 + k).to_bytes(2, "big"))  # PUBACK of nothing sent
            stream += _packet(0xD0, b"")  # PINGRESP
            continue
        else:
            stream += _publish(topic, payload, 1 if kind < 0.8 else 0, mid=k + 1,
                               retain=kind > 0.9, dup=kind > 0.95)
        expect += 1
    cuts = [1, 2, 3, 7, 100, 5000] + [rng.randrange(1, 70000) for _ in range(200)]
    paho, none_fast = _received(stream, 0, cuts, expect)
    assert none_fast == 0
    for read_batch in (1, 64):
        ours, fast = _received(stream, read_batch, cuts, expect)
        assert ours == paho
        assert fast > expect // 2  # most of them did not go through paho's parsing
    # per-topic callbacks registered: paho's path, which honours them
    assert _received(stream, 64, cuts, expect, per_topic=True) == (paho, 0)


class _RefusingBroker:
    """Just enough of an MQTT 3.1.1 broker for one client: CONNACK, PINGRESP, and a SUBACK
    that refuses (0x80) the first ``refuse`` SUBSCRIBEs, as NATS's MQTT gateway does while
    its JetStream elects leaders. Once a filter is granted it sends one message on it."""

    def __init__(self, refuse: int):
        self.refuse = refuse
        self.subscribes = 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        conn, _ = self.sock.accept()
        with conn:
            f = conn.makefile("rb")
            while head := f.read(1):
                n, shift = 0, 0
                while True:
                    b = f.read(1)[0]
                    n |= (b & 0x7F) << shift
                    shift += 7
                    if not b & 0x80:
                        break
                body = f.read(n)
                kind = head[0] & 0xF0
                if kind == 0x10:
                    conn.sendall(b"\x20\x02\x00\x00")
                elif kind == 0xC0:
                    conn.sendall(b"\xd0\x00")
                elif kind == 0x80:
                    self.subscribes += 1
                    mid, topic_len = body[:2], int.from_bytes(body[2:4], "big")
                    topic = body[4:4 + topic_len]
                    granted = self.subscribes > self.refuse
                    conn.sendall(b"\x90\x03" + mid + (b"\x01" if granted else b"\x80"))
                    if granted:
                        conn.sendall(_publish(topic, b"cursor", 0))


def test_a_refused_subscription_is_asked_for_again_less_often_each_time():
    """A broker that refuses a subscription for a while must not leave the device deaf
    (its desired state, its telemetry cursor), and must not be asked every second either:
    each refused SUBSCRIBE holds NATS's connection for its 4 s request timeout and is one
    more request to a cluster electing leaders. The waits double; the refusals are counted;
    once granted, messages arrive."""
    broker = _RefusingBroker(refuse=4)
    t = MqttTransport(BrokerAddress.parse(f"mqtt://127.0.0.1:{broker.port}"),
                      TransportOptions(client_id="dev"))
    waits: list[float] = []

    class NoWait(threading.Thread):  # the timer, minus the wait: records it, runs at once
        def __init__(self, delay, fn, args):
            waits.append(delay)
            super().__init__(target=fn, args=args)

    t._timer = NoWait
    t.subscribe("fleet/devices/dev/acked", 1)
    t.start()
    try:
        item = t.inbound.get(timeout=10)
        while item.kind != "message":
            item = t.inbound.get(timeout=10)
    finally:
        t.stop()
    assert (item.topic, item.payload) == ("fleet/devices/dev/acked", b"cursor")
    assert broker.subscribes == 5 and t.subscribe_refused == 4
    # 1-2 s, then 2-4, 4-8, 7.5-15 (equal jitter: half fixed, half random)
    assert [lo <= w <= hi for w, (lo, hi) in zip(waits, [(1, 2), (2, 4), (4, 8), (7.5, 15)],
                                                  strict=True)] == [True] * 4
