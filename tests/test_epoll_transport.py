"""``EpollMqttTransport``: many MQTT connections driven by one ``EpollLoop`` thread, against
real mosquitto. What an owner of a ``Transport`` relies on holds as with ``MqttTransport``:
messages both ways, acknowledged publishes, the Last Will on a dropped connection and none
on a clean stop, and after a broker restart a reconnect with the subscriptions renewed and
a QoS 1 publish made meanwhile delivered."""

from __future__ import annotations

import queue
import time
import uuid
from collections.abc import Iterator

import pytest
from conftest import MosquittoProcess, find_mosquitto

from prunefleet.shared.transport import (
    BrokerAddress,
    EpollLoop,
    EpollMqttTransport,
    Inbound,
    MqttTransport,
    TransportOptions,
)


@pytest.fixture
def loop() -> Iterator[EpollLoop]:
    lp = EpollLoop()
    yield lp
    lp.close()


def _transport(url: str, loop: EpollLoop, **kw) -> EpollMqttTransport:
    opts = TransportOptions(client_id=f"ep-{uuid.uuid4().hex[:10]}", reconnect_min_s=0.2,
                            reconnect_max_s=1.0, **kw)
    return EpollMqttTransport(BrokerAddress.parse(url), opts, loop)


def _next(t: MqttTransport, kind: str, timeout_s: float = 10.0,
          topic: str | None = None) -> Inbound:
    deadline = time.monotonic() + timeout_s
    while (left := deadline - time.monotonic()) > 0:
        try:
            item = t.inbound.get(timeout=left)
        except queue.Empty:
            break
        if item.kind == kind and (topic is None or item.topic == topic):
            return item
    raise AssertionError(f"no {kind!r} item{' on ' + topic if topic else ''} "
                         f"within {timeout_s:g} s")


def test_many_connections_on_one_thread_exchange_messages(mosquitto, loop):
    base = f"ep/{uuid.uuid4().hex[:8]}"
    sink = _transport(mosquitto.url, loop, subscriptions={f"{base}/up/+": 1})
    devices = [_transport(mosquitto.url, loop, subscriptions={f"{base}/down/{i}": 1})
               for i in range(50)]
    try:
        for t in (sink, *devices):
            t.start()
        assert all(t.wait_connected(10) for t in (sink, *devices))
        # Its subscription is live once its own message comes back (SUBSCRIBE went first).
        sink.publish(f"{base}/up/probe", b"probe")
        assert _next(sink, "message").topic == f"{base}/up/probe"
        mids = {i: t.publish(f"{base}/up/{i}", f"hello {i}".encode()) for i, t in
                enumerate(devices)}
        got = {_next(sink, "message").topic for _ in devices}
        assert got == {f"{base}/up/{i}" for i in range(len(devices))}
        for i, t in enumerate(devices):
            assert _next(t, "published").mid == mids[i]
        sink.publish(f"{base}/down/7", b"for seven")
        assert _next(devices[7], "message").payload == b"for seven"
    finally:
        for t in (sink, *devices):
            t.stop()


def test_a_publish_larger_than_the_socket_takes_at_once_arrives_whole(mosquitto, loop):
    """The loop writes a connection's queued packets as soon as they are queued; what the
    socket does not take then (8 MB is more than its buffer) must wait for room and go on
    from where it stopped, while the other connections are served."""
    base = f"ep/{uuid.uuid4().hex[:8]}"
    sink = _transport(mosquitto.url, loop, subscriptions={f"{base}/up/+": 1})
    big, small = _transport(mosquitto.url, loop), _transport(mosquitto.url, loop)
    payload = bytes(range(256)) * (8 * 1024 * 1024 // 256)
    try:
        for t in (sink, big, small):
            t.start()
        assert all(t.wait_connected(10) for t in (sink, big, small))
        sink.publish(f"{base}/up/probe", b"probe")
        assert _next(sink, "message").topic == f"{base}/up/probe"
        mid = big.publish(f"{base}/up/big", payload)
        small.publish(f"{base}/up/small", b"meanwhile")
        got = {m.topic: m.payload for m in (_next(sink, "message", 30),
                                              _next(sink, "message", 30))}
        assert got == {f"{base}/up/big": payload, f"{base}/up/small": b"meanwhile"}
        assert _next(big, "published").mid == mid
    finally:
        for t in (sink, big, small):
            t.stop()


def test_a_publish_always_wakes_the_loop_even_after_a_racing_one_left_paho_flagged(
        mosquitto, loop):
    """paho's "write registered" flag, checked and set without a lock by a publishing
    thread, can end up set over an empty queue (the loop wrote the packet and cleared the
    flag in between). The next publish then asked nobody to write it, and waited for the
    loop's keepalive pass. The loop clears the flag whenever it serves the connection."""
    base = f"ep/{uuid.uuid4().hex[:8]}"
    t = _transport(mosquitto.url, loop)
    asked: list[object] = []
    ask = loop.want_write

    def counting(tr):
        asked.append(tr)
        ask(tr)

    loop.want_write = counting  # type: ignore[method-assign]
    try:
        t.start()
        assert t.wait_connected(10)
        c = t._client
        assert not c.want_write()
        c._registered_write = True  # where the race leaves it, the queue empty
        c.on_socket_register_write(c, None, c.socket())  # the racing publish's wake-up
        assert loop.sync(5) and loop.sync(5)  # a pass with that connection among writers
        asked.clear()
        t.publish(f"{base}/x", b"next")
        assert asked == [t]
        assert _next(t, "published").kind == "published"
    finally:
        loop.want_write = ask  # type: ignore[method-assign]
        t.stop()


def test_a_dropped_connection_sends_the_last_will_and_a_clean_stop_does_not(mosquitto, loop):
    base = f"ep/{uuid.uuid4().hex[:8]}"
    watcher = _transport(mosquitto.url, loop, subscriptions={f"{base}/will/+": 1})
    killed = _transport(mosquitto.url, loop, will_topic=f"{base}/will/killed",
                        will_payload=b"gone")
    stopped = _transport(mosquitto.url, loop, will_topic=f"{base}/will/stopped",
                         will_payload=b"gone")
    try:
        for t in (watcher, killed, stopped):
            t.start()
            assert t.wait_connected(10)
        watcher.publish(f"{base}/will/probe", b"probe")  # its subscription is live
        assert _next(watcher, "message").topic == f"{base}/will/probe"
        stopped.stop()
        assert not stopped.connected.is_set()
        killed.kill()
        assert not killed.connected.is_set()
        will = _next(watcher, "message")
        assert (will.topic, will.payload) == (f"{base}/will/killed", b"gone")
        with pytest.raises(AssertionError):
            _next(watcher, "message", timeout_s=1.0)  # nothing from the clean stop
    finally:
        for t in (watcher, killed, stopped):
            t.stop()


def test_a_new_will_goes_with_the_next_connection(mosquitto, loop):
    """``set_will``: the broker keeps the will a connection began with, so a new one (the
    agent's, naming the version it accepted since) is the will from the next connection."""
    base = f"ep/{uuid.uuid4().hex[:8]}"
    watcher = _transport(mosquitto.url, loop, subscriptions={f"{base}/will": 1})
    dev = _transport(mosquitto.url, loop, will_topic=f"{base}/will", will_payload=b"v1")
    try:
        for t in (watcher, dev):
            t.start()
            assert t.wait_connected(10)
        watcher.publish(f"{base}/will", b"probe")  # its subscription is live
        assert _next(watcher, "message").payload == b"probe"
        dev.set_will(b"v2")
        dev.kill()
        assert _next(watcher, "message").payload == b"v1"  # what this connection began with
        dev.start()
        assert dev.wait_connected(10)
        dev.kill()
        assert _next(watcher, "message").payload == b"v2"
    finally:
        for t in (watcher, dev):
            t.stop()


def test_reconnects_after_a_broker_restart_renewing_subscriptions(tmp_path, loop):
    """One client subscribed to the topic it publishes on: paho renews the subscription
    (in ``on_connect``) before it resends the QoS 1 publish it kept while disconnected."""
    broker = MosquittoProcess(find_mosquitto(), tmp_path)
    broker.start()
    topic = f"ep/{uuid.uuid4().hex[:8]}/x"
    t = _transport(broker.url, loop, subscriptions={topic: 1})
    try:
        t.start()
        assert t.wait_connected(10)
        broker.stop()
        _next(t, "disconnected")
        t.publish(topic, b"sent while the broker was down")
        broker.start()
        _next(t, "connected", timeout_s=20)
        msg = _next(t, "message", timeout_s=20)
        assert msg.payload == b"sent while the broker was down"
    finally:
        t.stop()
        broker.stop()
