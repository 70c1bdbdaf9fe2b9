"""The fleet simulator runs the agent's own policy: a threshold changed in the signed
desired state moves the simulated fleet exactly as it moves a real one.

A few simulated devices on the in-memory broker with a fake clock (no mosquitto, no
threads, no sleeping); variants arrive with ``download=False``. What is checked is what
the server sees: the switches and their reasons in the devices' telemetry.
"""

from __future__ import annotations

import queue
from collections.abc import Iterator
from pathlib import Path

import pytest

from prunefleet.server.ingest import StoredCursors
from prunefleet.server.simulator import SimDevice, SimOptions, Simulator
from prunefleet.shared import chunks
from prunefleet.shared.clock import FakeClock
from prunefleet.shared.memtransport import MemoryBroker, MemoryTransport
from prunefleet.shared.messages import (
    Manifest,
    Reason,
    ReportedState,
    TelemetryAck,
    TelemetryBatch,
    VariantSpec,
    decode,
)
from prunefleet.shared.policy import PolicyConfig
from prunefleet.shared.signing import SigningKey
from prunefleet.shared.topics import Topics
from prunefleet.shared.transport import TransportOptions

PREFIX = "simtest"
GROUP = "field"


def _spec(name: str, macs: int, latency_ms: float) -> VariantSpec:
    p = chunks.plan(name.encode() * 500, 1024)
    return VariantSpec(name=name, sha256=p.sha256, size=p.size, chunk_bytes=1024,
                       chunk_sha256=list(p.chunk_sha256), input_shape=[1, 1, 8, 8],
                       num_classes=10, params=macs, macs=macs, accuracy=0.9,
                       latency_ms=latency_ms)


VARIANTS = [_spec("small", 1_000, 1.0), _spec("medium", 4_000, 2.0),
            _spec("large", 16_000, 4.0)]


class SimFleet:
    """A simulator of ``n`` devices on one in-memory broker, and the server's view."""

    def __init__(self, tmp: Path, n: int, policy: PolicyConfig | None = None,
                 **options: float) -> None:
        self.broker = MemoryBroker()
        self.clock = FakeClock()
        self.key = SigningKey.generate()
        keys = tmp / "keys"
        keys.mkdir(parents=True)
        (keys / "public.pem").write_bytes(self.key.public_pem())
        self.topics = Topics(PREFIX)
        self.server = MemoryTransport(self.broker, TransportOptions(
            client_id="server", subscriptions={self.topics.all_devices("telemetry"): 1}))
        self.server.start()
        opts = SimOptions(broker_url="mqtt://memory:1883", devices=n, group=GROUP,
                          prefix=PREFIX, keys=keys, state_dir=tmp / "sim", download=False,
                          telemetry_interval_s=1.0, policy=policy,
                          # No flush on stop: nothing here confirms during it, and what
                          # the tests check happened before.
                          **{"drain_s": 0.0, **options})  # type: ignore[arg-type]
        self.sim = Simulator(opts, clock=self.clock, transports=self._transport)
        self.version = 0
        # device id -> [(to_variant, reason)] as telemetry reported them
        self.switches: dict[str, list[tuple[str, Reason]]] = {}
        self.cursors = StoredCursors()

    def _transport(self, device_id: str) -> MemoryTransport:
        """A device's connection, with the Last Will that marks it offline."""
        return MemoryTransport(self.broker, TransportOptions(
            client_id=f"sim-{device_id}", will_topic=self.topics.reported(device_id),
            will_payload=ReportedState(device_id=device_id, online=False).encode()))

    @property
    def devices(self) -> list[SimDevice]:
        return self.sim.devices

    def start(self, battery_percent: float) -> None:
        for d in self.devices:
            d.battery.set_percent(battery_percent)
        self.sim.start(workers=False)

    def deploy(self, policy: dict | None = None) -> None:
        self.version += 1
        now = self.clock.time()
        m = Manifest(target=GROUP, version=self.version, issued_at=now, expires_at=now + 3600,
                     variants=VARIANTS, policy=policy)
        self.server.publish(self.topics.group_desired(GROUP), self.key.sign(m).encode(),
                            retain=True)

    def run(self, seconds: int) -> None:
        """Step every device once per simulated second."""
        for _ in range(seconds):
            self.clock.tick(1.0)
            self.sim.step_all()
            self._collect()

    def _collect(self) -> None:
        while True:
            try:
                item = self.server.inbound.get_nowait()
            except queue.Empty:
                return
            if item.kind == "message":
                b = decode(TelemetryBatch, item.payload)
                self.switches.setdefault(b.device_id, []).extend(
                    (s.to_variant, s.reason) for s in b.switches)
                # As the real server does after commit: the "stored through" cursor, so
                # the devices may delete what they sent and keep sending.
                self.cursors.note(b.device_id, b.incarnation, b.seq, b.unconfirmed_from)
                ack = TelemetryAck(device_id=b.device_id, incarnation=b.incarnation,
                                   stored_through=self.cursors.through(b.device_id,
                                                                       b.incarnation),
                                   ts=self.clock.time())
                self.server.publish(self.topics.acked(b.device_id), ack.encode(), retain=True)

    def battery_low_switches(self) -> dict[str, int]:
        return {d.id: sum(r == Reason.BATTERY_LOW for _, r in self.switches.get(d.id, []))
                for d in self.devices}

    def reported(self, device_id: str) -> ReportedState:
        raw = self.broker.retained(self.topics.reported(device_id))
        assert raw is not None
        return decode(ReportedState, raw)


@pytest.fixture
def make_fleet(tmp_path: Path) -> Iterator:
    fleets: list[SimFleet] = []

    def make(n: int = 3, policy: PolicyConfig | None = None) -> SimFleet:
        f = SimFleet(tmp_path / f"f{len(fleets)}", n, policy)
        fleets.append(f)
        return f

    yield make
    for f in fleets:
        f.sim.stop()


def _ready(f: SimFleet, policy: dict | None = None) -> None:
    """Devices at 70 % battery, the variants installed and served for a while."""
    f.start(battery_percent=70.0)
    f.deploy(policy)
    f.run(5)
    for d in f.devices:
        assert set(d.agent.pool.specs) == {"small", "medium", "large"}, d.id
        assert d.agent.active_variant is not None, d.id
    assert f.sim.summary().phases["active"] == len(f.devices)
    assert sum(f.battery_low_switches().values()) == 0


def test_devices_switch_for_the_battery_at_the_threshold_in_the_signed_manifest(
    make_fleet,
) -> None:
    f = make_fleet(3)
    _ready(f)
    levels = {"sim-0000": 45.0, "sim-0001": 35.0, "sim-0002": 25.0}
    for d in f.devices:
        d.battery.set_percent(levels[d.id])
    f.run(5)
    # The agent's own threshold (30 %): only the device below it.
    assert f.battery_low_switches() == {"sim-0000": 0, "sim-0001": 0, "sim-0002": 1}

    f.deploy({"battery_low_percent": 40.0})
    f.run(5)
    assert f.battery_low_switches() == {"sim-0000": 0, "sim-0001": 1, "sim-0002": 1}
    for d in f.devices:
        assert f.reported(d.id).manifest_version == 2, d.id
        assert d.agent.policy.battery_low_percent == 40.0

    f.deploy({"battery_low_percent": 50.0})
    f.run(5)
    assert f.battery_low_switches() == {"sim-0000": 1, "sim-0001": 1, "sim-0002": 1}
    # No device ever served a variant above the middle of the table once it was low.
    for d in f.devices:
        assert d.agent.active_variant in {"small", "medium"}, d.id


def test_without_a_change_of_threshold_nothing_switches_for_the_battery(make_fleet) -> None:
    f = make_fleet(2)
    _ready(f)
    for d in f.devices:
        d.battery.set_percent(40.0)
    f.run(10)
    assert f.battery_low_switches() == {"sim-0000": 0, "sim-0001": 0}
    assert all(d.agent.active_variant is not None for d in f.devices)


def test_the_devices_local_policy_sets_the_threshold_too(make_fleet) -> None:
    f = make_fleet(2, policy=PolicyConfig(battery_low_percent=50.0))
    _ready(f)
    for d in f.devices:
        d.battery.set_percent(40.0)
    f.run(5)
    assert f.battery_low_switches() == {"sim-0000": 1, "sim-0001": 1}


def test_an_invalid_override_is_refused_by_every_simulated_device(make_fleet) -> None:
    f = make_fleet(2)
    _ready(f)
    f.deploy({"battery_low_percent": 10.0})  # below the critical level: no agent takes it
    f.run(2)
    for d in f.devices:
        r = f.reported(d.id)
        assert (r.manifest_version, r.counters["rejected_manifests"]) == (1, 1), d.id
        assert "battery_critical_percent must be below" in (r.last_error or "")
    assert f.sim.summary().rejected_manifests == 2


def test_the_offline_share_goes_offline_on_the_simulators_clock(tmp_path: Path) -> None:
    f = SimFleet(tmp_path, 2, offline_share=0.5, offline_cycle_s=20.0)
    f.start(battery_percent=70.0)
    away = [d for d in f.devices if d.offline_window is not None]
    assert len(away) == 1
    start, end = away[0].offline_window  # type: ignore[misc]
    try:
        seen_offline = False
        for _ in range(20):
            f.run(1)
            elapsed = f.clock.monotonic() - 1000.0
            if start + 1 <= elapsed < end:  # well inside the window: gone, Last Will out
                assert not away[0].connected
                assert not f.reported(away[0].id).online
                seen_offline = True
        assert seen_offline
        assert away[0].connected and away[0].offline_periods == 1
        assert all(d.offline_periods == 0 for d in f.devices if d is not away[0])
    finally:
        f.sim.stop()


@pytest.mark.parametrize("window", [3, 10])
def test_a_device_sends_at_most_its_window_until_the_server_confirms(tmp_path: Path,
                                                                     window: int) -> None:
    """``simulate --in-flight N`` is the agent's window: with no cursor from the server, a
    device sends N batches and holds the rest (the fleet's in-flight total bounds how fast
    it drains a backlog, which is what ``bench/ingest.py --in-flight`` varies)."""
    f = SimFleet(tmp_path, 2, telemetry_max_in_flight=window)
    f.start(battery_percent=70.0)
    try:
        for _ in range(15):  # 15 batches cut per device, none confirmed
            f.clock.tick(1.0)
            f.sim.step_all()
        sent: dict[str, int] = {}
        while not f.server.inbound.empty():
            item = f.server.inbound.get_nowait()
            if item.kind == "message":
                b = decode(TelemetryBatch, item.payload)
                sent[b.device_id] = sent.get(b.device_id, 0) + 1
        assert sent == {d.id: window for d in f.devices}
        assert all(len(d.agent.tqueue.pending()) >= 14 for d in f.devices)
    finally:
        f.sim.stop()


def test_a_device_acts_on_a_cursor_as_it_arrives_not_at_its_workers_next_pass(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An agent waits on its own inbound queue and acts on what arrives at once; a
    simulated device is stepped by a worker with many others, and must too: a cursor that
    waited for the worker's next pass added up to a period to every round trip, so a
    simulated fleet drained a backlog slower than the agents it stands for."""
    from prunefleet.server import simulator

    monkeypatch.setattr(simulator, "STEP_PERIOD_S", 3600.0)  # one pass, at the start
    f = SimFleet(tmp_path, 2)
    f.clock.tick(5.0)  # a batch is due at the first pass
    f.sim.start(workers=True)
    try:
        first = {}
        while len(first) < 2:
            item = f.server.inbound.get(timeout=10)
            if item.kind == "message":
                b = decode(TelemetryBatch, item.payload)
                first[b.device_id] = b
        f.clock.tick(5.0)  # the next batch is due; no pass comes for an hour
        d0 = f.devices[0].id
        ack = TelemetryAck(device_id=d0, incarnation=first[d0].incarnation,
                           stored_through=first[d0].seq, ts=f.clock.time())
        f.server.publish(f.topics.acked(d0), ack.encode(), retain=True)
        item = f.server.inbound.get(timeout=10)  # the device stepped on the cursor: its next batch
        while item.kind != "message":
            item = f.server.inbound.get(timeout=10)
        b = decode(TelemetryBatch, item.payload)
        assert (b.device_id, b.seq) == (d0, first[d0].seq + 1)
        assert f.devices[0].agent.tqueue.pending() == [b.seq]  # the confirmed one deleted
    finally:
        f.sim.stop()
