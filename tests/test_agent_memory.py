"""The real Agent on the in-memory broker with a fake clock: distribution, telemetry and
pins, in milliseconds and without sleeping.

The agent is the production class; only its seams are doubles: ``MemoryTransport`` for
MQTT, ``FakeClock`` for time, ``SimulatedEngine`` for ONNX Runtime (the smoke test always
passes), ``MemoryQueue`` for telemetry. Chunks are framed as ``FleetServer.publish_artifact``
frames them and published retained, as it does. The end-to-end paths over mosquitto stay
in ``test_distribution.py`` and ``test_e2e.py``.
"""

from __future__ import annotations

import queue
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from prunefleet.agent.config import AgentConfig, SensorConfig
from prunefleet.agent.service import Agent
from prunefleet.agent.simulated import SimulatedEngine
from prunefleet.agent.telemetry import MemoryQueue
from prunefleet.shared import chunks
from prunefleet.shared.clock import FakeClock
from prunefleet.shared.memtransport import MemoryBroker, MemoryTransport
from prunefleet.shared.messages import (
    Event,
    EventKind,
    Manifest,
    Reason,
    ReportedState,
    RolloutPhase,
    TelemetryAck,
    TelemetryBatch,
    VariantSpec,
    decode,
)
from prunefleet.shared.signing import SigningKey
from prunefleet.shared.topics import Topics
from prunefleet.shared.transport import Inbound, TransportOptions

DEVICE = "dev-1"
CHUNK = 1024
WINDOW = 3
TIMEOUT_S = 5.0
RETRY_S = 2.0  # the downloader's pause before re-requesting a rejected chunk


def artifact(name: str, n_chunks: int, seed: int, macs: int) -> tuple[VariantSpec, bytes]:
    data = np.random.default_rng(seed).bytes(CHUNK * n_chunks - 100)  # last chunk short
    p = chunks.plan(data, CHUNK)
    spec = VariantSpec(name=name, sha256=p.sha256, size=p.size, chunk_bytes=CHUNK,
                       chunk_sha256=list(p.chunk_sha256), input_shape=[1, 1, 8, 8],
                       num_classes=10, params=macs, macs=macs, accuracy=0.9)
    return spec, data


SMALL, SMALL_DATA = artifact("small", 4, 1, 1_000)
LARGE, LARGE_DATA = artifact("large", 10, 2, 16_000)


class Inbox(queue.Queue):
    """The agent's inbound queue, counting the chunks delivered into it; a topic in
    ``lose`` loses its next delivery (the network dropped it)."""

    def __init__(self, maxsize: int) -> None:
        super().__init__(maxsize)
        self.chunks: Counter[str] = Counter()
        self.lose: set[str] = set()

    def put(self, item: Inbound, block: bool = True, timeout: float | None = None) -> None:
        if item.kind == "message" and "/artifacts/" in item.topic:
            if item.topic in self.lose:
                self.lose.discard(item.topic)
                return
            self.chunks[item.topic] += 1
        super().put(item, block, timeout)


class Fleet:
    """A broker, a clock, a signing key, and a server-side client that publishes what
    ``FleetServer`` publishes and collects what agents send."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.broker = MemoryBroker()
        self.clock = FakeClock()
        self.key = SigningKey.generate()
        (tmp / "keys").mkdir()
        self.pem = tmp / "keys" / "public.pem"
        self.pem.write_bytes(self.key.public_pem())
        self.topics = Topics("pf")
        self.server = MemoryTransport(self.broker, TransportOptions(
            client_id="server",
            subscriptions={self.topics.all_devices(c): 1
                           for c in ("telemetry", "reported", "events")}))
        self.server.start()
        self.version = 0
        self.received: dict[str, list[bytes]] = {"telemetry": [], "reported": [], "events": []}

    # -- the agent ---------------------------------------------------------------------
    def agent(self, state: str = "state", **cfg: object) -> Agent:
        config = AgentConfig(
            device_id=DEVICE, fleet_prefix="pf", state_dir=self.tmp / state,
            trusted_keys=[self.pem], download_window_chunks=WINDOW, chunk_timeout_s=TIMEOUT_S,
            telemetry_interval_s=10.0, sensors=SensorConfig(kind="simulated"),
            **cfg)  # type: ignore[arg-type]
        options = TransportOptions(client_id=f"pf-agent-{DEVICE}",
                                   will_topic=self.topics.reported(DEVICE),
                                   will_payload=ReportedState(device_id=DEVICE,
                                                              online=False).encode())
        transport = MemoryTransport(self.broker, options)
        transport.inbound = Inbox(options.inbound_queue_size)
        agent = Agent(config, transport=transport, clock=self.clock, engine=SimulatedEngine(),
                      telemetry_queue=MemoryQueue(100))
        agent.start()
        return agent

    @staticmethod
    def inbox(agent: Agent) -> Inbox:
        assert isinstance(agent.transport.inbound, Inbox)
        return agent.transport.inbound

    def run_until(self, agent: Agent, done: Callable[[], object], steps: int = 20,
                  tick_s: float = 0.0) -> None:
        for _ in range(steps):
            agent.step()
            if done():
                return
            self.clock.tick(tick_s)
        raise AssertionError(f"not done after {steps} steps")

    def chunk_subscriptions(self) -> set[str]:
        subs = self.broker.subscriptions(f"pf-agent-{DEVICE}")
        return {t for t in subs if "/artifacts/" in t}

    # -- what the server publishes -----------------------------------------------------
    def frame(self, spec: VariantSpec, data: bytes, i: int, corrupt: bool = False) -> bytes:
        raw = data[i * spec.chunk_bytes:(i + 1) * spec.chunk_bytes]
        if corrupt:
            raw = bytes([raw[0] ^ 0xFF]) + raw[1:]
        count = len(spec.chunk_sha256)
        return chunks.encode_frame(spec.sha256, i, count, raw, spec.compression)

    def publish_chunks(self, spec: VariantSpec, data: bytes,
                       indexes: range | list[int] | None = None, corrupt: bool = False) -> None:
        for i in indexes if indexes is not None else range(len(spec.chunk_sha256)):
            self.server.publish(self.topics.chunk(spec.sha256, i),
                                self.frame(spec, data, i, corrupt), retain=True)

    def deploy(self, variants: list[VariantSpec], key: SigningKey | None = None,
               group: str | None = None, **kw: object) -> Manifest:
        """Sign and publish (retained) a desired state for the device, or for ``group``;
        versions increase across both, as the server's do."""
        self.version += 1
        now = self.clock.time()
        m = Manifest(target=group or DEVICE, version=self.version, issued_at=now,
                     expires_at=now + 3600, variants=variants, **kw)  # type: ignore[arg-type]
        signed = (key or self.key).sign(m)
        topic = self.topics.group_desired(group) if group else self.topics.desired(DEVICE)
        self.server.publish(topic, signed.encode(), retain=True)
        return m

    def unsigned_command(self, body: bytes) -> None:
        """What the old, unsigned commands topic carried (no agent subscribes to it)."""
        self.server.publish(f"{self.topics.prefix}/devices/{DEVICE}/commands", body)

    # -- what the server sees ----------------------------------------------------------
    def collect(self) -> dict[str, list[bytes]]:
        while True:
            try:
                item = self.server.inbound.get_nowait()
            except queue.Empty:
                return self.received
            if item.kind == "message":
                _, channel = self.topics.parse_device(item.topic)
                self.received[channel].append(item.payload)

    def reported(self) -> ReportedState:
        raw = self.broker.retained(self.topics.reported(DEVICE))
        assert raw is not None
        return decode(ReportedState, raw)

    def events(self) -> list[Event]:
        return [decode(Event, e) for e in self.collect()["events"]]

    def telemetry_batches(self) -> list[TelemetryBatch]:
        """The batches that arrived since the last call."""
        got = [decode(TelemetryBatch, b) for b in self.collect()["telemetry"]]
        self.received["telemetry"] = []
        return got

    def telemetry_seqs(self) -> list[int]:
        return [b.seq for b in self.telemetry_batches()]

    def confirm(self, incarnation: str, stored_through: int) -> None:
        """What the server publishes after a commit: its "stored through" cursor."""
        ack = TelemetryAck(device_id=DEVICE, incarnation=incarnation,
                           stored_through=stored_through, ts=self.clock.time())
        self.server.publish(self.topics.acked(DEVICE), ack.encode(), retain=True)


@pytest.fixture
def fleet(tmp_path: Path) -> Fleet:
    return Fleet(tmp_path)


def _installed(agent: Agent, *names: str) -> bool:
    return set(agent.pool.specs) == set(names)


# -- distribution ------------------------------------------------------------------------------


def test_a_switch_made_while_a_report_is_built_is_reported_next(fleet: Fleet) -> None:
    """A request thread's first request switches the active variant (the rollout goes
    from installed to active) while the loop thread builds a report: the report sent then
    says installed, and the next one must say active, not be skipped as up to date."""
    fleet.publish_chunks(SMALL, SMALL_DATA)
    agent = fleet.agent()
    fleet.deploy([SMALL])
    fleet.run_until(agent, lambda: _installed(agent, "small"))
    agent.step()
    assert fleet.reported().rollout.phase == RolloutPhase.INSTALLED
    build = agent.reporter.build

    def racing(**kw: object):  # the request lands between building and publishing
        state = build(**kw)
        assert agent.predict(np.zeros((1, 1, 8, 8), np.float32)).variant == "small"
        return state
    agent.reporter.build = racing
    agent.reporter.mark()
    agent.step()
    agent.reporter.build = build
    assert fleet.reported().rollout.phase == RolloutPhase.INSTALLED
    agent.step()
    r = fleet.reported()
    assert (r.active_variant, r.rollout and r.rollout.phase) == ("small", RolloutPhase.ACTIVE)


@pytest.mark.timeout(10)
def test_a_signed_manifest_and_retained_chunks_are_installed(fleet: Fleet) -> None:
    fleet.publish_chunks(SMALL, SMALL_DATA)
    fleet.publish_chunks(LARGE, LARGE_DATA)
    agent = fleet.agent()
    fleet.deploy([SMALL, LARGE])
    fleet.run_until(agent, lambda: _installed(agent, "small", "large"))
    assert agent.store.path_of(LARGE.sha256).read_bytes() == LARGE_DATA
    assert fleet.chunk_subscriptions() == set()  # every chunk topic let go
    agent.step()
    r = fleet.reported()
    assert (r.manifest_version, r.rollout and r.rollout.phase) == (1, RolloutPhase.INSTALLED)
    assert {v.name for v in r.installed} == {"small", "large"}
    kinds = Counter(e.kind for e in fleet.events())
    assert (kinds[EventKind.DOWNLOAD_STARTED], kinds[EventKind.INSTALLED]) == (2, 2)
    served = agent.predict(np.zeros((1, 1, 8, 8), np.float32))
    assert served.variant in {"small", "large"}


def test_a_damaged_download_record_is_fetched_again_not_a_crash_at_start(fleet: Fleet) -> None:
    """An interrupted download's record of finished chunks, damaged (not even UTF-8): the
    agent starts (it raised at start, so systemd restarted it forever) and fetches the
    variant again."""
    agent = fleet.agent()
    fleet.deploy([SMALL])
    fleet.run_until(agent, lambda: agent.store.done_path(SMALL.sha256).exists()
                    or agent.downloader.progress())
    agent.transport.stop()
    agent.store.done_path(SMALL.sha256).write_bytes(b"\xff\xfe\x00 1 2")
    again = fleet.agent()
    fleet.publish_chunks(SMALL, SMALL_DATA)
    fleet.run_until(again, lambda: _installed(again, "small"), steps=40)
    assert again.store.path_of(SMALL.sha256).read_bytes() == SMALL_DATA


def test_a_variant_that_no_longer_loads_is_tried_once_a_minute_and_reported(
        fleet: Fleet, monkeypatch: pytest.MonkeyPatch) -> None:
    """With one session loaded at a time, the other installed variant's file is deleted
    underneath. Requests pinned to it get the loaded one; the agent tries to load it again
    once a minute, not on every loop pass (10 a second, each re-reading a whole model
    with ONNX Runtime), and reports the failures."""
    from prunefleet.agent import runtime
    from prunefleet.agent.errors import InstallError

    fleet.publish_chunks(SMALL, SMALL_DATA)
    fleet.publish_chunks(LARGE, LARGE_DATA)
    agent = fleet.agent(max_loaded_variants=1)
    fleet.deploy([SMALL, LARGE])
    fleet.run_until(agent, lambda: _installed(agent, "small", "large"))
    unloaded = ({"small", "large"} - set(agent.pool.table)).pop()
    agent.store.path_of(agent.pool.specs[unloaded].sha256).unlink()
    tries = []
    real = agent.pool.loader
    assert real is not None

    def loader(spec: VariantSpec):
        tries.append(spec.name)
        if not agent.store.path_of(spec.sha256).exists():
            raise InstallError(f"{spec.name}: no such file")
        return real(spec)

    agent.pool.loader = loader
    fleet.deploy([SMALL, LARGE], pinned_variant=unloaded)
    x = np.zeros((1, 1, 8, 8), np.float32)
    now = [1000.0]
    monkeypatch.setattr(runtime.time, "monotonic", lambda: now[0])
    for _ in range(50):  # 5 s of loop passes
        served = agent.predict(x)
        agent.step()
        now[0] += 0.1
    assert served.variant != unloaded and tries == [unloaded]
    now[0] += runtime.LOAD_RETRY_S
    agent.predict(x)
    agent.step()
    assert tries == [unloaded] * 2
    fleet.run_until(agent, lambda: fleet.reported().counters.get("load_failures") == 2,
                    tick_s=11.0)


def test_a_full_disk_neither_strands_a_desired_state_nor_stops_the_start(
        fleet: Fleet, monkeypatch: pytest.MonkeyPatch) -> None:
    """The agent's state files cannot be written (a full disk). A desired state arriving
    then is followed, fetched and installed from memory (it was followed but never fetched,
    and its copy seen again later counted as already followed), and a restart with a
    variant that no longer loads still starts and serves the other (it crash-looped)."""
    import errno

    import prunefleet.agent.store as agent_store
    from prunefleet.agent.errors import InstallError
    from prunefleet.agent.simulated import SimulatedEngine

    def full(path, data, **kw):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    fleet.publish_chunks(SMALL, SMALL_DATA)
    fleet.publish_chunks(LARGE, LARGE_DATA)
    agent = fleet.agent()
    real = agent_store.atomic_write
    monkeypatch.setattr(agent_store, "atomic_write", full)
    fleet.deploy([SMALL])
    fleet.run_until(agent, lambda: _installed(agent, "small"), tick_s=1.0)
    assert agent.counters.invalid_messages == 0
    monkeypatch.setattr(agent_store, "atomic_write", real)
    fleet.deploy([SMALL, LARGE])
    fleet.run_until(agent, lambda: _installed(agent, "small", "large"), tick_s=1.0)
    agent.transport.stop()

    real_load = SimulatedEngine.load

    def damaged(self, path, spec):
        if spec.name == "large":
            raise InstallError("large: damaged")
        return real_load(self, path, spec)

    monkeypatch.setattr(SimulatedEngine, "load", damaged)
    monkeypatch.setattr(agent_store, "atomic_write", full)
    again = fleet.agent()
    assert set(again.pool.table) == {"small"}


def test_a_desired_state_below_what_the_device_accepted_is_reported_failed(
        fleet: Fleet) -> None:
    """A server on a restored store signs a desired state below the version the device
    accepted: the device refuses it and reports that version failed, saying why, so the
    rollout that offered it learns at once (it waited out its device timeout, unaware)."""
    fleet.publish_chunks(SMALL, SMALL_DATA)
    agent = fleet.agent()
    for _ in range(3):
        fleet.deploy([SMALL])
    fleet.run_until(agent, lambda: _installed(agent, "small"))
    fleet.run_until(agent, lambda: fleet.reported().manifest_version == 3)
    fleet.version = 1  # the restored store's counter
    fleet.deploy([SMALL])  # version 2
    fleet.run_until(agent, lambda: (r := fleet.reported().rollout) is not None
                    and r.manifest_version == 2)
    r = fleet.reported()
    assert r.manifest_version == 3 and r.rollout is not None
    assert r.rollout.phase == RolloutPhase.FAILED and "older than accepted" in (
        r.rollout.reason or "")
    assert agent.predict(np.zeros((1, 1, 8, 8), np.float32)).variant == "small"


def test_the_last_will_names_the_version_the_device_accepted(fleet: Fleet) -> None:
    """A device that dies leaves its Last Will as its retained reported state: it names
    the desired-state version the device accepted, so a server on a restored store signs
    above it while the device is away."""
    fleet.publish_chunks(SMALL, SMALL_DATA)
    agent = fleet.agent()
    fleet.deploy([SMALL])
    fleet.run_until(agent, lambda: _installed(agent, "small"))
    fleet.deploy([SMALL])
    fleet.run_until(agent, lambda: fleet.reported().manifest_version == 2)
    agent.transport.kill()  # power cut: the broker publishes the will
    r = fleet.reported()
    assert (r.online, r.manifest_version) == (False, 2)


@pytest.mark.timeout(10)
def test_never_more_than_the_window_of_chunk_topics_is_subscribed(fleet: Fleet) -> None:
    agent = fleet.agent()
    fleet.deploy([LARGE])
    agent.step()
    count = len(LARGE.chunk_sha256)
    assert fleet.chunk_subscriptions() == {fleet.topics.chunk(LARGE.sha256, i)
                                           for i in range(WINDOW)}
    # The server publishes one chunk at a time; the window slides over them.
    for i in range(count):
        fleet.publish_chunks(LARGE, LARGE_DATA, [i])
        agent.step()
        subscribed = fleet.chunk_subscriptions()
        assert len(subscribed) == min(WINDOW, count - i - 1), i
        assert fleet.topics.chunk(LARGE.sha256, i) not in subscribed
    assert _installed(agent, "large")
    assert fleet.inbox(agent).chunks.total() == count  # each chunk delivered once


@pytest.mark.timeout(10)
def test_a_chunk_that_never_arrives_is_requested_again_after_the_timeout(fleet: Fleet) -> None:
    fleet.publish_chunks(SMALL, SMALL_DATA)
    agent = fleet.agent()
    lost = fleet.topics.chunk(SMALL.sha256, 1)
    fleet.inbox(agent).lose.add(lost)
    fleet.deploy([SMALL])
    agent.step()
    assert fleet.chunk_subscriptions() == {lost}  # the others arrived and were let go
    assert agent.downloader.progress() == {"small": 0.75}
    fleet.clock.tick(TIMEOUT_S - 0.1)
    agent.step()  # the downloader's once-a-second tick: not timed out yet
    agent.step()
    assert fleet.inbox(agent).chunks[lost] == 0 and not _installed(agent, "small")
    fleet.clock.tick(1.0)
    agent.step()  # timed out: unsubscribed and subscribed again; the retained chunk comes
    assert fleet.inbox(agent).chunks[lost] == 1
    agent.step()
    assert _installed(agent, "small")
    assert agent.downloader.rejected_chunks == 0


@pytest.mark.timeout(10)
def test_a_corrupted_chunk_is_rejected_and_fetched_again(fleet: Fleet) -> None:
    fleet.publish_chunks(SMALL, SMALL_DATA)
    fleet.publish_chunks(SMALL, SMALL_DATA, [2], corrupt=True)
    agent = fleet.agent()
    fleet.deploy([SMALL])
    agent.step()
    assert agent.downloader.rejected_chunks == 1
    assert fleet.chunk_subscriptions() == set()  # not subscribed until the retry is due
    fleet.publish_chunks(SMALL, SMALL_DATA, [2])  # the server repairs it (retained)
    fleet.run_until(agent, lambda: _installed(agent, "small"), tick_s=0.5)
    assert fleet.clock.monotonic() >= 1000.0 + RETRY_S
    assert agent.store.path_of(SMALL.sha256).read_bytes() == SMALL_DATA
    agent.step()
    assert fleet.reported().counters["rejected_chunks"] == 1


@pytest.mark.timeout(10)
def test_a_chunk_corrupted_at_every_try_fails_the_install(fleet: Fleet) -> None:
    fleet.publish_chunks(SMALL, SMALL_DATA)
    fleet.publish_chunks(SMALL, SMALL_DATA, [0], corrupt=True)
    agent = fleet.agent()
    fleet.deploy([SMALL])
    fleet.run_until(agent, lambda: agent.counters.install_failures, tick_s=1.0)
    agent.step()
    r = fleet.reported()
    assert r.rollout is not None and r.rollout.phase == RolloutPhase.FAILED
    assert "chunk 0 rejected 3 times" in (r.rollout.reason or "")
    assert agent.downloader.rejected_chunks == 3 and not agent.pool.specs


@pytest.mark.timeout(10)
def test_a_restarted_agent_fetches_only_the_chunks_it_lacks(fleet: Fleet) -> None:
    count = len(LARGE.chunk_sha256)
    half = count // 2
    fleet.publish_chunks(LARGE, LARGE_DATA, range(half))
    first = fleet.agent()
    fleet.deploy([LARGE])
    first.step()
    assert first.downloader.progress() == {"large": 0.5}
    first.transport.stop()  # the device restarts here

    fleet.publish_chunks(LARGE, LARGE_DATA, range(half, count))
    second = fleet.agent()
    fleet.run_until(second, lambda: _installed(second, "large"))
    delivered = fleet.inbox(second).chunks
    assert set(delivered) == {fleet.topics.chunk(LARGE.sha256, i) for i in range(half, count)}
    assert delivered.total() == count - half
    assert second.store.path_of(LARGE.sha256).read_bytes() == LARGE_DATA
    # The retained manifest seen again after the restart is not news.
    assert second.counters.rejected_manifests == 0 and second.manifest is not None


# -- manifests and pins --------------------------------------------------------------------------


@pytest.mark.timeout(10)
def test_an_older_group_state_beside_a_newer_device_state_after_a_restart(fleet: Fleet) -> None:
    """Each source has its own floor and the newest is followed, across a restart too:
    both retained states arrive again, nothing is fetched again, nothing is refused."""
    fleet.publish_chunks(SMALL, SMALL_DATA)
    fleet.publish_chunks(LARGE, LARGE_DATA)
    first = fleet.agent(group="lab")
    fleet.deploy([SMALL], group="lab")  # v1, for the group
    fleet.run_until(first, lambda: _installed(first, "small"))
    fleet.deploy([LARGE])  # v2, for this device
    fleet.run_until(first, lambda: _installed(first, "large"))
    first.transport.stop()

    again = fleet.agent(group="lab")
    assert _installed(again, "large")
    again.step()  # both retained desired states are delivered on subscribing, and handled
    assert _installed(again, "large") and again.manifest is not None
    assert again.manifest.version == 2
    assert again.counters.rejected_manifests == 0
    assert again.downloader.active() == [] and fleet.inbox(again).chunks.total() == 0
    assert (again.store.accepted_version("group"), again.store.accepted_version("device")) == (
        1, 2)
    fleet.deploy([SMALL], group="lab")  # v3: the group's state is now the newest
    fleet.run_until(again, lambda: _installed(again, "small"))
    assert not any(e.kind == EventKind.REJECTED for e in fleet.events())


@pytest.mark.timeout(10)
def test_a_rejected_manifest_is_counted_and_reported(fleet: Fleet) -> None:
    agent = fleet.agent()
    fleet.deploy([SMALL], key=SigningKey.generate())
    agent.step()
    assert agent.manifest is None and agent.counters.rejected_manifests == 1
    r = fleet.reported()
    assert r.counters["rejected_manifests"] == 1
    assert r.last_error == "manifest rejected: manifest is signed by no trusted key"
    # Reported as that version's failure, so a rollout counts it without waiting.
    assert r.rollout is not None and (r.rollout.manifest_version, r.rollout.phase,
                                      r.rollout.reason) == (1, RolloutPhase.FAILED,
                                                            r.last_error)
    assert [e.kind for e in fleet.events()] == [EventKind.REJECTED]
    # A good one afterwards is followed as usual.
    fleet.publish_chunks(SMALL, SMALL_DATA)
    fleet.deploy([SMALL])
    fleet.run_until(agent, lambda: _installed(agent, "small"))
    assert agent.counters.rejected_manifests == 1


@pytest.mark.timeout(10)
def test_a_pin_comes_only_with_the_signed_desired_state(fleet: Fleet) -> None:
    fleet.publish_chunks(SMALL, SMALL_DATA)
    fleet.publish_chunks(LARGE, LARGE_DATA)
    # Without the cascade one variant answers each request: the policy's choice, or the pin.
    agent = fleet.agent(cascade={"enabled": False})
    fleet.deploy([SMALL, LARGE])
    fleet.run_until(agent, lambda: _installed(agent, "small", "large"))
    x = np.random.default_rng(0).normal(0, 1, (1, 1, 8, 8)).astype(np.float32)
    assert agent.predict(x).variant == "large"
    fleet.deploy([SMALL, LARGE], pinned_variant="small")
    agent.step()
    served = agent.predict(x)
    assert (served.variant, served.reason) == ("small", Reason.PINNED)
    agent.step()
    assert fleet.reported().active_variant == "small"
    # An unsigned command, as the old commands topic carried, changes nothing.
    for body in (b'{"schema":1,"command_id":"c1","kind":"unpin"}',
                 b'{"schema":1,"command_id":"c2","kind":"pin","variant":"large"}'):
        fleet.unsigned_command(body)
    agent.step()
    assert agent.predict(x).variant == "small"
    assert agent.counters.invalid_messages == 0, "not even read"
    fleet.deploy([SMALL, LARGE])  # unpinned by a newer signed desired state
    agent.step()
    assert agent.predict(x).variant == "large"


# -- telemetry ----------------------------------------------------------------------------------


@pytest.mark.timeout(10)
def test_telemetry_leaves_the_queue_only_when_the_server_confirmed_storing_it(
        fleet: Fleet) -> None:
    agent = fleet.agent()
    agent.step()
    fleet.clock.tick(10.0)
    agent.step()  # a batch is cut and published; the broker acknowledges it at once
    [batch] = fleet.telemetry_batches()
    for _ in range(3):
        agent.step()
    # The broker's PUBACK is not the server's word: the batch stays until confirmed.
    assert agent.tqueue.pending() == [0] and agent.sender.in_flight == 1
    assert batch.incarnation == agent.tqueue.incarnation and batch.unconfirmed_from == 0
    fleet.confirm(batch.incarnation, 0)
    agent.step()
    assert agent.tqueue.pending() == [] and agent.sender.acked_total == 1
    assert fleet.telemetry_seqs() == []  # sent once


def test_the_brokers_acknowledgements_reach_the_agent_as_counts_not_as_a_queue_item_each(
        fleet: Fleet) -> None:
    """As built for a device (``report_published`` off), a PUBACK, one per telemetry
    batch, is no item on the agent's inbound queue: the item, its queue's lock and its
    handling were about a tenth of what a batch cost a simulated device's CPU. The agent reads
    the transport's counts instead: a PUBACK after a silence still tells the downloader
    that the link works, and the goodbye still waits for its acknowledgement."""
    agent = fleet.agent()
    agent.transport.options.report_published = False
    inbox = fleet.inbox(agent)
    agent.step()
    fleet.broker.hold_acks = True
    fleet.clock.tick(10.0 + TIMEOUT_S)  # a silence longer than the chunk timeout
    agent.step()  # a batch is cut and published; its PUBACK held back
    assert agent.transport.unacknowledged() == 1
    fleet.clock.tick(1.0)
    agent.step()  # nothing came meanwhile
    heard_before = agent.downloader._heard
    assert heard_before is not None and heard_before < fleet.clock.monotonic()
    assert fleet.broker.release_acks() == 1
    assert inbox.qsize() == 0  # the acknowledgement queued nothing
    agent.step()
    assert agent.downloader._heard == fleet.clock.monotonic()
    agent.begin_shutdown()
    agent.say_goodbye()
    assert not agent.goodbye_acknowledged()  # held by the broker
    assert fleet.broker.release_acks() >= 1
    assert agent.goodbye_acknowledged() and inbox.qsize() == 0


@pytest.mark.timeout(10)
def test_unconfirmed_telemetry_is_sent_again_after_the_timeout_and_counted(
        fleet: Fleet) -> None:
    agent = fleet.agent(telemetry_ack_timeout_s=30.0)
    agent.step()
    fleet.clock.tick(10.0)
    agent.step()
    assert fleet.telemetry_seqs() == [0]  # lost on its way to the server, say
    fleet.clock.tick(29.0)
    agent.step()
    assert fleet.telemetry_seqs() == [1]  # the next interval's; 0 is not yet due again
    fleet.clock.tick(1.0)
    agent.step()
    assert fleet.telemetry_seqs() == [0]  # again, with the same seq (the server dedups)
    assert agent.sender.resent_total == 1
    fleet.confirm(agent.tqueue.incarnation, 1)
    agent.step()
    assert agent.tqueue.pending() == []
    counters = agent.reported_state().counters
    assert counters["telemetry_resent"] == 1 and counters["telemetry_queued"] == 0


@pytest.mark.timeout(10)
def test_a_cursor_of_another_incarnation_deletes_nothing(fleet: Fleet) -> None:
    agent = fleet.agent()
    agent.step()
    for _ in range(3):
        fleet.clock.tick(10.0)
        agent.step()
    assert agent.tqueue.pending() == [0, 1, 2] and agent.sender.in_flight == 3
    fleet.confirm("0123456789abcdef", 5)  # the retained cursor of an earlier install
    agent.step()
    assert agent.tqueue.pending() == [0, 1, 2]
    fleet.confirm(agent.tqueue.incarnation, 1)  # cumulative: one cursor settles two
    agent.step()
    assert agent.tqueue.pending() == [2] and agent.sender.in_flight == 1
    assert agent.reported_state().counters["telemetry_unconfirmed"] == 1


@pytest.mark.timeout(10)
def test_in_flight_is_bounded_so_a_slow_server_paces_the_device(fleet: Fleet) -> None:
    agent = fleet.agent(telemetry_max_in_flight=2, telemetry_ack_timeout_s=1000.0)
    agent.step()
    for _ in range(5):
        fleet.clock.tick(10.0)
        agent.step()
    assert fleet.telemetry_seqs() == [0, 1]  # the rest waits on disk for the server
    assert agent.tqueue.pending() == [0, 1, 2, 3, 4]
    fleet.confirm(agent.tqueue.incarnation, 1)
    agent.step()
    agent.step()
    assert fleet.telemetry_seqs() == [2, 3]
