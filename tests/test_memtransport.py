"""The in-memory broker double, its topic rules, and a contract that keeps it honest.

The unit tests drive :class:`MemoryBroker` directly: delivery is synchronous, so each
assertion reads what the inbound queues hold right now. The contract tests at the end run the
same scenarios on the double and on the session mosquitto (through :class:`MqttTransport`),
so the double cannot drift from a real broker.
"""

from __future__ import annotations

import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator

import pytest

from prunefleet.shared.errors import PrunefleetError, TransportError
from prunefleet.shared.memtransport import MemoryBroker, MemoryTransport
from prunefleet.shared.transport import (
    BrokerAddress,
    Inbound,
    MqttTransport,
    Transport,
    TransportOptions,
    check_filter,
    check_topic,
    topic_matches,
)

TIMEOUT = 10.0


# -- topic rules ------------------------------------------------------------------------------

MATCHES = [
    # filter, topic, matches
    ("a/b", "a/b", True),
    ("a/b", "a/c", False),
    ("a/b", "a/b/c", False),
    ("a/+", "a/b", True),
    ("a/+", "a/b/c", False),
    ("a/+", "a", False),
    ("a/+", "a/", True),  # an empty level is a level
    ("+/+", "/x", True),
    ("+", "/x", False),
    ("/+", "/x", True),
    ("a/+/c", "a/b/c", True),
    ("a/+/c", "a/b/d", False),
    ("a/#", "a", True),  # '#' includes the parent level
    ("a/#", "a/b/c", True),
    ("a/#", "ab", False),
    ("a/+/#", "a", False),
    ("a/+/#", "a/b", True),
    ("#", "a/b/c", True),
    ("#", "$SYS/x", False),  # leading wildcards never match $ topics
    ("+/x", "$pf/x", False),
    ("$pf/#", "$pf/x", True),
    ("$pf/+", "$pf/x", True),
    ("a/$x", "a/$x", True),
    ("A/b", "a/b", False),  # case matters
]


@pytest.mark.parametrize(("topic_filter", "topic", "expected"), MATCHES)
def test_topic_matches(topic_filter: str, topic: str, expected: bool) -> None:
    assert topic_matches(topic_filter, topic) is expected


@pytest.mark.parametrize(
    ("topic_filter", "valid"),
    [
        ("a/b", True),
        ("#", True),
        ("a/#", True),
        ("+/b/+", True),
        ("$share/g/a/+", True),
        ("$share/g/#", True),
        ("", False),
        ("a/#/b", False),
        ("a#", False),
        ("a/b#", False),
        ("a+/b", False),
        ("$share/g", False),
        ("$share//a", False),
        ("$share/g+/a", False),
        ("a\x00b", False),
    ],
)
def test_check_filter(topic_filter: str, valid: bool) -> None:
    if valid:
        assert check_filter(topic_filter) == topic_filter
    else:
        with pytest.raises(TransportError):
            check_filter(topic_filter)


@pytest.mark.parametrize("topic", ["", "a/+", "a/#", "#", "a\x00", "x" * 65536])
def test_check_topic_refuses(topic: str) -> None:
    with pytest.raises(TransportError):
        check_topic(topic)


def test_transport_error_is_a_prunefleet_error() -> None:
    assert issubclass(TransportError, PrunefleetError)


# -- the memory double --------------------------------------------------------------------


def drain(t: Transport) -> list[Inbound]:
    """Everything the queue holds now (the double delivers synchronously)."""
    items = []
    while True:
        try:
            items.append(t.inbound.get_nowait())
        except queue.Empty:
            return items


def messages(t: Transport) -> list[tuple[str, bytes, bool]]:
    return [(i.topic, i.payload, i.retain) for i in drain(t) if i.kind == "message"]


def kinds(items: list[Inbound]) -> list[str]:
    return [i.kind for i in items]


@pytest.fixture
def broker() -> MemoryBroker:
    return MemoryBroker()


def client(
    broker: MemoryBroker,
    client_id: str,
    *subs: str,
    start: bool = True,
    **options: object,
) -> MemoryTransport:
    """A started client, its queue emptied of its own ``connected`` and retained items."""
    t = MemoryTransport(
        broker,
        TransportOptions(client_id=client_id, subscriptions=dict.fromkeys(subs, 1), **options),
    )
    if start:
        t.start()
        drain(t)
    return t


def test_the_double_is_connected_on_start(broker: MemoryBroker) -> None:
    t = client(broker, "a", start=False)
    assert not t.connected.is_set()
    assert drain(t) == []
    t.start()
    assert t.wait_connected(0)
    assert drain(t) == [Inbound("connected")]
    assert broker.connected_clients() == ["a"]
    assert t.address == broker.address


def test_retained_replace_clear_and_late_subscribers(broker: MemoryBroker) -> None:
    live = client(broker, "live", "r/t")
    pub = client(broker, "pub")
    pub.publish("r/t", b"one", retain=True)
    pub.publish("r/t", b"two", retain=True)
    pub.publish("r/other", b"x", retain=True)
    # established subscribers get retained publishes as live messages
    assert messages(live) == [("r/t", b"one", False), ("r/t", b"two", False)]
    assert broker.retained("r/t") == b"two"

    late = client(broker, "late", start=False)
    late.subscribe("r/#")
    late.start()
    assert drain(late) == [
        Inbound("connected"),
        Inbound("message", "r/t", b"two", True),
        Inbound("message", "r/other", b"x", True),
    ]

    pub.publish("r/t", b"", retain=True)  # clears it; still delivered live
    assert messages(live) == [("r/t", b"", False)]
    assert broker.retained("r/t") is None
    later = client(broker, "later", start=False)
    later.subscribe("r/t")
    later.start()
    assert messages(later) == []


def test_a_repeated_subscription_gets_the_retained_message_again(broker: MemoryBroker) -> None:
    client(broker, "pub").publish("r/t", b"v", retain=True)
    sub = client(broker, "sub", "r/t")
    sub.subscribe("r/t")
    assert messages(sub) == [("r/t", b"v", True)]


def test_acknowledgements_can_be_held_and_released(broker: MemoryBroker) -> None:
    sub = client(broker, "sub", "q/#")
    pub = client(broker, "pub")
    broker.hold_acks = True
    mids = [pub.publish("q/1", b"a"), pub.publish("q/2", b"b")]
    assert len(set(mids)) == 2
    assert messages(sub) == [("q/1", b"a", False), ("q/2", b"b", False)]  # the broker has them
    assert drain(pub) == []
    assert broker.held_acks == 2

    assert broker.release_acks() == 2
    assert drain(pub) == [Inbound("published", mid=m) for m in mids]
    assert broker.held_acks == 0

    broker.hold_acks = False
    mid = pub.publish("q/3", b"c")
    assert drain(pub) == [Inbound("published", mid=mid)]


def test_qos0_is_reported_published_at_once_even_while_acks_are_held(
    broker: MemoryBroker,
) -> None:
    pub = client(broker, "pub")
    broker.hold_acks = True
    mid = pub.publish("q/0", b"x", qos=0)
    assert drain(pub) == [Inbound("published", mid=mid)]


def test_the_inflight_window_holds_publishes_until_acks_arrive(broker: MemoryBroker) -> None:
    sub = client(broker, "sub", "w/+")
    pub = client(broker, "pub", max_inflight_messages=2)
    broker.hold_acks = True
    mids = [pub.publish(f"w/{i}", b"") for i in range(5)]
    assert [m[0] for m in messages(sub)] == ["w/0", "w/1"]
    broker.release_acks()  # two acks free two slots; those two are held again
    assert [m[0] for m in messages(sub)] == ["w/2", "w/3"]
    assert [i.mid for i in drain(pub)] == mids[:2]
    broker.hold_acks = False
    broker.release_acks()
    assert [m[0] for m in messages(sub)] == ["w/4"]
    assert [i.mid for i in drain(pub)] == mids[2:]


def test_an_unacknowledged_publish_is_sent_again_after_reconnecting(
    broker: MemoryBroker,
) -> None:
    sub = client(broker, "sub", "d/t")
    pub = client(broker, "pub")
    broker.hold_acks = True
    mid = pub.publish("d/t", b"once")
    assert messages(sub) == [("d/t", b"once", False)]
    assert broker.drop("pub")
    assert broker.held_acks == 0
    broker.hold_acks = False
    assert broker.reconnect_all() == 1
    assert messages(sub) == [("d/t", b"once", False)]  # at least once: a duplicate
    assert drain(pub) == [Inbound("disconnected"), Inbound("connected"),
                          Inbound("published", mid=mid)]


DELIVERY = [
    # subscriptions of one client, topic published, copies it receives
    (["s/a"], "s/a", 1),
    (["s/+"], "s/a", 1),
    (["s/+"], "s/a/b", 0),
    (["s/#"], "s/a/b", 1),
    (["s/#", "s/a", "s/+"], "s/a", 1),  # overlapping subscriptions: once
    (["#"], "$pf/x", 0),
    (["+/x"], "$pf/x", 0),
    (["$pf/#"], "$pf/x", 1),
    (["$share/g/s/+"], "s/a", 1),
    (["$share/g/s/+", "s/a"], "s/a", 2),  # a group and a plain subscription each deliver
    (["$share/g/s/+", "$share/h/s/#"], "s/a", 2),  # one per group
]


@pytest.mark.parametrize(("subs", "topic", "copies"), DELIVERY)
def test_delivery(broker: MemoryBroker, subs: list[str], topic: str, copies: int) -> None:
    sub = client(broker, "sub", *subs)
    client(broker, "pub").publish(topic, b"m")
    assert messages(sub) == [(topic, b"m", False)] * copies


def test_shared_subscriptions_round_robin_within_each_group(broker: MemoryBroker) -> None:
    g1 = client(broker, "g1", "$share/ingest/t/+")
    g2 = client(broker, "g2", "$share/ingest/t/+")
    other = client(broker, "other", "$share/audit/t/+")
    plain = client(broker, "plain", "t/+")
    pub = client(broker, "pub")
    for i in range(6):
        pub.publish(f"t/{i}", b"")
    assert [m[0] for m in messages(g1)] == ["t/0", "t/2", "t/4"]
    assert [m[0] for m in messages(g2)] == ["t/1", "t/3", "t/5"]
    assert len(messages(other)) == 6
    assert len(messages(plain)) == 6

    g1.stop()  # a clean session leaves its group
    pub.publish("t/6", b"")
    pub.publish("t/7", b"")
    assert [m[0] for m in messages(g2)] == ["t/6", "t/7"]


@pytest.mark.parametrize(
    ("end", "will_sent"),
    [
        ("stop", False),
        ("stop_without_disconnect", True),
        ("kill", True),
        ("broker_drop", True),
        ("broker_outage", False),  # no broker left to publish it
    ],
)
def test_last_will(broker: MemoryBroker, end: str, will_sent: bool) -> None:
    watcher = client(broker, "watcher", "dev/+/reported")
    dev = client(broker, "dev1", will_topic="dev/dev1/reported", will_payload=b"offline")
    ending: dict[str, Callable[[], object]] = {
        "stop": dev.stop,
        "stop_without_disconnect": lambda: dev.stop(disconnect=False),
        "kill": dev.kill,
        "broker_drop": lambda: broker.drop("dev1"),
        "broker_outage": lambda: broker.set_online(False),
    }
    ending[end]()
    assert drain(dev) == [Inbound("disconnected")]
    assert not dev.connected.is_set()
    expected = [("dev/dev1/reported", b"offline", False)] if will_sent else []
    assert messages(watcher) == expected
    assert broker.retained("dev/dev1/reported") == (b"offline" if will_sent else None)


def test_a_second_connection_with_the_same_client_id_takes_over(broker: MemoryBroker) -> None:
    watcher = client(broker, "watcher", "dev/#")
    first = client(broker, "dev1", "dev/dev1/desired", will_topic="dev/dev1/reported",
                   will_payload=b"offline")
    second = client(broker, "dev1", "dev/dev1/desired")
    assert drain(first) == [Inbound("disconnected")]
    assert not first.connected.is_set()
    assert second.connected.is_set()
    assert messages(watcher) == [("dev/dev1/reported", b"offline", False)]  # as mosquitto does
    assert broker.connected_clients() == ["watcher", "dev1"]

    client(broker, "server").publish("dev/dev1/desired", b"d")
    assert messages(second) == [("dev/dev1/desired", b"d", False)]
    assert messages(first) == []


def test_an_outage_keeps_qos1_publishes_and_renews_subscriptions(broker: MemoryBroker) -> None:
    dev = client(broker, "dev", "cmd/dev")
    server = client(broker, "server", "tele/+")
    broker.set_online(False)
    assert not broker.online
    assert drain(dev) == [Inbound("disconnected")]
    assert drain(server) == [Inbound("disconnected")]

    mids = [dev.publish("tele/dev", b"1"), dev.publish("tele/dev", b"2")]
    with pytest.raises(TransportError):
        dev.publish("tele/dev", b"qos0 is lost", qos=0)
    assert not dev.wait_connected(0)

    broker.set_online(True)
    assert dev.connected.is_set() and server.connected.is_set()
    assert drain(dev) == [Inbound("connected")] + [Inbound("published", mid=m) for m in mids]
    assert messages(server) == [("tele/dev", b"1", False), ("tele/dev", b"2", False)]
    server.publish("cmd/dev", b"c")
    assert messages(dev) == [("cmd/dev", b"c", False)]


def test_an_outage_without_persistence_loses_retained_messages(broker: MemoryBroker) -> None:
    client(broker, "pub").publish("r/t", b"v", retain=True)
    broker.set_online(False, keep_state=False)
    broker.set_online(True)
    assert broker.retained("r/t") is None


def test_a_client_started_during_an_outage_connects_when_the_broker_is_back(
    broker: MemoryBroker,
) -> None:
    broker.set_online(False)
    dev = client(broker, "dev", "a/b")
    assert drain(dev) == []
    assert not dev.connected.is_set()
    broker.set_online(True)
    assert drain(dev) == [Inbound("connected")]


@pytest.mark.parametrize("end", ["stop", "kill"])
def test_a_transport_starts_again_after_it_ended(broker: MemoryBroker, end: str) -> None:
    dev = client(broker, "dev", "in/dev")
    server = client(broker, "server", "out/#")
    server.publish("in/dev", b"retained", retain=True)
    assert messages(dev) == [("in/dev", b"retained", False)]
    getattr(dev, end)()
    assert drain(dev) == [Inbound("disconnected")]
    mid = dev.publish("out/dev", b"kept")  # QoS 1 while down: kept for the next connection
    messages(server)

    dev.start()
    dev.start()  # a no-op while started
    assert drain(dev) == [
        Inbound("connected"),
        Inbound("message", "in/dev", b"retained", True),  # its subscription is back
        Inbound("published", mid=mid),
    ]
    assert messages(server) == [("out/dev", b"kept", False)]
    dev.unsubscribe("in/dev")
    server.publish("in/dev", b"after unsubscribe")
    assert messages(dev) == []


def test_a_persistent_session_queues_qos1_messages_while_away() -> None:
    broker = MemoryBroker(max_queued_messages=2)
    dev = client(broker, "dev", "cmd/dev", clean_session=False)
    server = client(broker, "server")
    dev.kill()
    drain(dev)
    for i in range(3):
        server.publish("cmd/dev", str(i).encode())
    server.publish("cmd/dev", b"qos0 is not queued", qos=0)
    assert broker.dropped_queued == 1
    assert broker.subscriptions("dev") == {"cmd/dev": 1}

    dev.start()
    assert drain(dev) == [
        Inbound("connected"),
        Inbound("message", "cmd/dev", b"0", qos=1, connection=2),
        Inbound("message", "cmd/dev", b"1", qos=1, connection=2),
    ]


def test_a_clean_session_ends_with_its_connection(broker: MemoryBroker) -> None:
    dev = client(broker, "dev", "cmd/dev")
    dev.kill()
    assert broker.subscriptions("dev") == {}
    client(broker, "server").publish("cmd/dev", b"lost")
    dev.start()
    assert drain(dev) == [Inbound("disconnected"), Inbound("connected")]


def test_a_full_inbound_queue_drops_and_counts(broker: MemoryBroker) -> None:
    sub = client(broker, "sub", "f/t", inbound_queue_size=3)
    pub = client(broker, "pub")
    for i in range(5):
        pub.publish("f/t", str(i).encode())
    assert sub.dropped_inbound == 2
    assert messages(sub) == [("f/t", b"0", False), ("f/t", b"1", False), ("f/t", b"2", False)]
    pub.publish("f/t", b"5")
    assert messages(sub) == [("f/t", b"5", False)]


def test_the_outgoing_queue_is_bounded_like_pahos(broker: MemoryBroker) -> None:
    dev = client(broker, "dev", start=False, max_queued_messages=2)
    dev.publish("o/t", b"1")
    dev.publish("o/t", b"2")
    with pytest.raises(TransportError, match="queue full"):
        dev.publish("o/t", b"3")


@pytest.mark.parametrize(
    ("call", "args"),
    [
        ("publish", ("a/+", b"")),
        ("publish", ("", b"")),
        ("publish", ("a/b", b"", 3)),
        ("subscribe", ("a/#/b",)),
        ("subscribe", ("$share/g",)),
    ],
)
def test_bad_topics_and_qos_are_refused(broker: MemoryBroker, call: str, args: tuple) -> None:
    dev = client(broker, "dev")
    with pytest.raises(TransportError):
        getattr(dev, call)(*args)
    assert drain(dev) == []


def test_publishers_on_several_threads(broker: MemoryBroker) -> None:
    sub = client(broker, "sub", "th/+", inbound_queue_size=10_000)
    pubs = [client(broker, f"pub{i}") for i in range(4)]

    def run(t: MemoryTransport, n: int) -> None:
        for j in range(500):
            t.publish(f"th/{n}", str(j).encode())

    threads = [threading.Thread(target=run, args=(t, n)) for n, t in enumerate(pubs)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    got = messages(sub)
    assert len(got) == 2000
    for n in range(4):  # each publisher's messages arrive in order
        assert [int(p) for topic, p, _ in got if topic == f"th/{n}"] == list(range(500))
    assert all(len([i for i in drain(t) if i.kind == "published"]) == 500 for t in pubs)


# -- contract: the same scenarios on the double and on mosquitto ------------------------------


class Peer:
    """A transport under test with helpers that wait for specific items (never sleep)."""

    def __init__(self, transport: Transport, sync_topic: str) -> None:
        self.t = transport
        self.sync_topic = sync_topic
        self._ignore: set[int] = set()

    def get(self, timeout: float = TIMEOUT) -> Inbound:
        deadline = time.monotonic() + timeout
        while True:
            try:
                item = self.t.inbound.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"nothing arrived within {timeout:g} s") from None
            if item.kind == "published" and item.mid in self._ignore:
                self._ignore.discard(item.mid)
                continue
            return item

    def until(self, match: Callable[[Inbound], bool]) -> list[Inbound]:
        """Items up to and including the first that ``match``es."""
        items = []
        while True:
            items.append(self.get())
            if match(items[-1]):
                return items

    def sync(self) -> list[Inbound]:
        """Everything the broker queued for us before a message we send ourselves now.

        The broker handles one connection's packets in order and queues deliveries to a
        client in order, so whatever it did before it saw our probe has arrived when the
        probe comes back (our subscriptions included).
        """
        token = uuid.uuid4().bytes
        self._ignore.add(self.t.publish(self.sync_topic, token, qos=0))
        items = self.until(lambda i: i.kind == "message" and i.payload == token)
        return items[:-1]

    def publish_acked(self, topic: str, payload: bytes, retain: bool = False) -> None:
        """Publish at QoS 1 and wait for the broker's acknowledgement."""
        mid = self.t.publish(topic, payload, qos=1, retain=retain)
        self.until(lambda i: i.kind == "published" and i.mid == mid)


class Net:
    """Makes connected peers on one broker, real or in memory, under a unique topic prefix."""

    def __init__(self, make: Callable[[TransportOptions], Transport]) -> None:
        self.make = make
        self.run = uuid.uuid4().hex[:10]
        self.prefix = f"pf-contract/{self.run}"
        self.peers: list[Peer] = []

    def peer(
        self,
        name: str,
        *subs: str,
        start: bool = True,
        client_id: str | None = None,
        **options: object,
    ) -> Peer:
        sync = f"{self.prefix}/sync/{name}"
        opts = TransportOptions(
            client_id=client_id or f"{name}-{self.run}",
            subscriptions={**dict.fromkeys(subs, 1), sync: 1},
            reconnect_min_s=30.0,  # a taken-over client must not come back during a test
            reconnect_max_s=60.0,
            **options,
        )
        p = Peer(self.make(opts), sync)
        self.peers.append(p)
        if start:
            self.connect(p)
        return p

    def connect(self, p: Peer) -> list[Inbound]:
        p.t.start()
        assert p.t.wait_connected(TIMEOUT), "not connected"
        return p.sync()

    def close(self) -> None:
        for p in self.peers:
            p.t.stop()


@pytest.fixture(params=["memory", "mosquitto"])
def net(request: pytest.FixtureRequest) -> Iterator[Net]:
    if request.param == "memory":
        broker = MemoryBroker()

        def make(opts: TransportOptions) -> Transport:
            return MemoryTransport(broker, opts)
    else:
        address = BrokerAddress.parse(request.getfixturevalue("mosquitto").url)

        def make(opts: TransportOptions) -> Transport:
            return MqttTransport(address, opts)

    n = Net(make)
    yield n
    n.close()


def _messages(items: list[Inbound]) -> list[tuple[str, bytes, bool]]:
    return [(i.topic, i.payload, i.retain) for i in items if i.kind == "message"]


def test_contract_retained(net: Net) -> None:
    topic = f"{net.prefix}/r/t"
    live = net.peer("live", topic)
    pub = net.peer("pub")
    try:
        pub.publish_acked(topic, b"one", retain=True)
        pub.publish_acked(topic, b"two", retain=True)
        assert _messages(live.sync()) == [(topic, b"one", False), (topic, b"two", False)]
        late = net.peer("late", start=False)
        late.t.subscribe(f"{net.prefix}/r/#")
        assert _messages(net.connect(late)) == [(topic, b"two", True)]

        pub.publish_acked(topic, b"", retain=True)
        assert _messages(live.sync()) == [(topic, b"", False)]
        later = net.peer("later", topic, start=False)
        assert _messages(net.connect(later)) == []
    finally:
        pub.publish_acked(topic, b"", retain=True)


def test_contract_message_ids_are_acknowledged(net: Net) -> None:
    pub = net.peer("pub")
    mids = [pub.t.publish(f"{net.prefix}/a/{i}", b"x", qos=i % 2) for i in range(4)]
    assert len(set(mids)) == 4
    acked = {pub.get().mid for _ in mids}
    assert acked == set(mids)
    idle = net.peer("idle", start=False)
    with pytest.raises(TransportError):
        idle.t.publish(f"{net.prefix}/a/x", b"qos 0 needs a connection", qos=0)


def test_contract_wildcards_overlaps_and_dollar_topics(net: Net) -> None:
    p = net.prefix
    dollar = f"$pf-{net.run}"
    sub = net.peer("sub", f"{p}/+/x", f"{p}/a/#", f"{p}/a/x", "+/x", f"{dollar}/#")
    pub = net.peer("pub")
    topics = [f"{p}/a/x", f"{p}/b/x", f"{p}/b/y", f"{p}/a", f"{p}/a/b/c", f"{dollar}/x"]
    for topic in topics:
        pub.publish_acked(topic, b"m")
    # (mosquitto may hold other tests' retained messages that match ``+/x``)
    got = [topic for topic, _, retain in _messages(sub.sync()) if not retain]
    assert got == [f"{p}/a/x", f"{p}/b/x", f"{p}/a", f"{p}/a/b/c", f"{dollar}/x"]


def test_contract_shared_subscription_round_robin(net: Net) -> None:
    f = f"{net.prefix}/t/+"
    g1 = net.peer("g1", f"$share/g-{net.run}/{f}")
    g2 = net.peer("g2", f"$share/g-{net.run}/{f}")
    plain = net.peer("plain", f)
    pub = net.peer("pub")
    for i in range(6):
        pub.publish_acked(f"{net.prefix}/t/{i}", str(i).encode())
    one, two = _messages(g1.sync()), _messages(g2.sync())
    assert [p for _, p, _ in one] == [b"0", b"2", b"4"]
    assert [p for _, p, _ in two] == [b"1", b"3", b"5"]
    assert len(_messages(plain.sync())) == 6


def test_contract_last_will_on_kill_not_on_stop(net: Net) -> None:
    will = f"{net.prefix}/dev/reported"
    watcher = net.peer("watcher", will)
    dev = net.peer("dev", will_topic=will, will_payload=b"offline")
    try:
        dev.t.stop()
        assert dev.until(lambda i: i.kind == "disconnected")
        net.connect(dev)  # and it starts again
        assert watcher.sync() == []

        dev.t.kill()
        assert not dev.t.connected.is_set()
        assert dev.until(lambda i: i.kind == "disconnected")
        got = watcher.until(lambda i: i.kind == "message")
        assert _messages(got) == [(will, b"offline", False)]
        late = net.peer("late", will, start=False)
        assert _messages(net.connect(late)) == [(will, b"offline", True)]  # it is retained
    finally:
        watcher.publish_acked(will, b"", retain=True)


def test_contract_client_id_takeover(net: Net) -> None:
    will = f"{net.prefix}/dev/reported"
    cmd = f"{net.prefix}/dev/cmd"
    watcher = net.peer("watcher", will)
    first = net.peer("first", cmd, client_id=f"dev-{net.run}", will_topic=will,
                     will_payload=b"offline")
    try:
        second = net.peer("second", cmd, client_id=f"dev-{net.run}")
        assert first.until(lambda i: i.kind == "disconnected")
        assert not first.t.connected.is_set()
        assert _messages(watcher.until(lambda i: i.kind == "message")) == [
            (will, b"offline", False)
        ]
        watcher.publish_acked(cmd, b"c")
        assert _messages(second.sync()) == [(cmd, b"c", False)]
    finally:
        watcher.publish_acked(will, b"", retain=True)


@pytest.mark.parametrize("end", ["kill", "stop"])
def test_contract_restart_renews_subscriptions_and_sends_kept_publishes(
    net: Net, end: str
) -> None:
    inbox, outbox = f"{net.prefix}/dev/in", f"{net.prefix}/dev/out"
    dev = net.peer("dev", inbox)
    server = net.peer("server", outbox)
    getattr(dev.t, end)()
    assert dev.until(lambda i: i.kind == "disconnected")
    mid = dev.t.publish(outbox, b"kept", qos=1)
    with pytest.raises(TransportError):
        dev.t.publish(outbox, b"lost", qos=0)

    dev.t.start()
    assert dev.t.wait_connected(TIMEOUT)
    assert dev.until(lambda i: i.kind == "published" and i.mid == mid)
    assert _messages(server.until(lambda i: i.kind == "message")) == [(outbox, b"kept", False)]
    server.publish_acked(inbox, b"hello again")
    assert _messages(dev.sync()) == [(inbox, b"hello again", False)]


def test_contract_manual_ack_keeps_a_message_until_acknowledged(net: Net) -> None:
    """A subscriber that stores before it acknowledges (the server's ingest): what it had
    not acknowledged when its connection ended comes again on the next one."""
    topic = f"{net.prefix}/ingest/t"
    srv = net.peer("srv", topic, clean_session=False, manual_ack=True)
    pub = net.peer("pub")
    pub.publish_acked(topic, b"batch")

    def received() -> list[Inbound]:
        return [i for i in srv.sync() if i.kind == "message"]

    [first] = received()
    assert (first.payload, first.qos) == (b"batch", 1)
    for _ in range(2):  # an acknowledgement for an earlier connection is not sent
        srv.t.stop()
        assert srv.until(lambda i: i.kind == "disconnected")
        again = [i for i in net.connect(srv) if i.kind == "message"]
        assert [i.payload for i in again] == [b"batch"]
        srv.t.ack(first.mid, first.qos, first.connection)
    srv.t.ack(again[0].mid, again[0].qos, again[0].connection)
    assert received() == []  # the probe's round trip: the broker has the acknowledgement
    srv.t.stop()
    assert srv.until(lambda i: i.kind == "disconnected")
    assert [i for i in net.connect(srv) if i.kind == "message"] == []


def test_manual_ack_holds_further_messages_back_past_the_window() -> None:
    broker = MemoryBroker(max_inflight_messages=2, max_queued_messages=3)
    srv = client(broker, "srv", "t", clean_session=False, manual_ack=True)
    pub = client(broker, "pub")
    for i in range(6):
        pub.publish("t", str(i).encode())
    got = [i for i in drain(srv) if i.kind == "message"]
    assert [i.payload for i in got] == [b"0", b"1"]  # two in flight, three queued
    assert broker.dropped_queued == 1  # past the queue: dropped, as mosquitto does
    srv.ack(got[0].mid, got[0].qos, got[0].connection)
    assert [i.payload for i in drain(srv) if i.kind == "message"] == [b"2"]
