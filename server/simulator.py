"""A fleet simulator: many lightweight simulated devices against a real broker and server.

For operators who want to try rollouts, dashboards and ingest at scale without devices.
What is real, per simulated device: its own MQTT connection (:class:`MqttTransport`, with
the device id as MQTT user name unless the broker URL names one, and a Last Will that
marks it offline), the manifest verification (:class:`TrustedKeys` with the server's
public key: signature, expiry, rollback floor per source, target), the chunk
:class:`Downloader` into a per-device state directory (per-chunk and whole-file SHA-256,
fsync, resume), and every wire message (:class:`ReportedState` with rollout phases,
:class:`TelemetryBatch` with per-device contiguous ``seq``, :class:`Event`).

What is simulated: no ONNX Runtime session is created (that is what makes a device light),
so the smoke test is a short pause that passes, or fails for the ``fail_share`` of devices
chosen by the seed; requests, latencies, accuracy, switches (with real :class:`Reason`
codes), a draining battery, CPU, memory and temperature are synthetic. With
``download=False`` even the chunks are not fetched: the manifest is verified and the
download is a timed progress bar.

Threads: paho runs one network thread per connection, whose callbacks only enqueue (as
in the real agent); a few worker threads step every device (drain its queue, advance its
timers, publish). Each device is stepped by one worker only, so it publishes from one
place.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import queue
import random
import shutil
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from prunefleet.agent.downloader import Completed, Downloader, Failed
from prunefleet.agent.store import VariantStore
from prunefleet.agent.transport import BrokerAddress, Inbound, MqttTransport, TransportOptions
from prunefleet.shared import __version__
from prunefleet.shared.errors import PrunefleetError, TrustError
from prunefleet.shared.messages import (
    Command,
    CommandKind,
    Event,
    EventKind,
    InstalledVariant,
    Manifest,
    Reason,
    ReportedState,
    RolloutPhase,
    RolloutReport,
    SignedManifest,
    SwitchEvent,
    TelemetryBatch,
    VariantSpec,
    VariantStats,
    decode,
)
from prunefleet.shared.signing import TrustedKeys, load_public_pem
from prunefleet.shared.topics import Topics, check_name

log = logging.getLogger(__name__)

PHASES = ("none", *(p.value for p in RolloutPhase))
MAX_QUEUED_BATCHES = 1000
# paho-mqtt waits with select(): file descriptors past 1024 fail, and each connection
# holds three (its socket and a wake-up pair). Measured: about 300 connect in one process.
MAX_DEVICES = 300
BATTERY_CAPACITY_J = 3600.0  # 1 Wh: a simulated battery drains visibly within minutes
IDLE_W = 0.8
CHARGE_W = 6.0


class SimulatorError(PrunefleetError):
    """Bad simulator options, or the broker cannot be reached."""


@dataclass
class SimOptions:
    broker_url: str
    devices: int
    group: str | None = None
    prefix: str = "prunefleet"
    id_prefix: str = "sim"
    keys: Path = Path(".prunefleet/keys")
    duration_s: float | None = None
    fail_share: float = 0.0
    offline_share: float = 0.0
    telemetry_interval_s: float = 10.0
    seed: int = 0
    download: bool = True
    state_dir: Path | None = None  # default: a temporary directory, removed at the end
    workers: int = 0  # 0: one per CPU core, at most 4
    status_interval_s: float = 10.0
    offline_cycle_s: float = 120.0  # without --duration: offline devices drop once per cycle
    verify_s: tuple[float, float] = (0.1, 0.5)  # simulated smoke test
    connect_timeout_s: float = 15.0

    def check(self) -> None:
        """Raise :class:`SimulatorError` with one clear line for a bad option."""
        if self.devices < 1:
            raise SimulatorError(f"--devices must be at least 1, got {self.devices}")
        if self.devices > MAX_DEVICES:
            raise SimulatorError(
                f"--devices {self.devices} is more than {MAX_DEVICES} in one process (paho "
                "waits with select(), which stops at file descriptor 1024): run several "
                "simulators with different --id-prefix")
        for name, v in (("--fail-share", self.fail_share),
                        ("--offline-share", self.offline_share)):
            if not (0.0 <= v <= 1.0) or math.isnan(v):
                raise SimulatorError(f"{name} must be between 0 and 1, got {v}")
        if not self.telemetry_interval_s > 0:
            raise SimulatorError(
                f"--telemetry-interval must be above 0 s, got {self.telemetry_interval_s}")
        if self.duration_s is not None and not self.duration_s > 0:
            raise SimulatorError(f"--duration must be above 0 s, got {self.duration_s}")
        if self.workers < 0:
            raise SimulatorError(f"--workers must be 0 (auto) or more, got {self.workers}")
        try:
            BrokerAddress.parse(self.broker_url)
            Topics(self.prefix)
            if self.group is not None:
                check_name(self.group, "group")
            check_name(f"{self.id_prefix}-0", "device id prefix")
        except PrunefleetError as e:
            raise SimulatorError(str(e)) from e
        pem = Path(self.keys) / "public.pem"
        if not pem.is_file():
            raise SimulatorError(
                f"no public key at {pem}: point --keys at the server's key directory "
                "(`prunefleet keys init` writes it)")


def device_ids(opts: SimOptions) -> list[str]:
    width = max(4, len(str(opts.devices - 1)))
    return [f"{opts.id_prefix}-{i:0{width}d}" for i in range(opts.devices)]


def chosen(ids: list[str], share: float, seed: int, salt: str) -> set[str]:
    """The ``share`` of ``ids`` (rounded) picked deterministically by ``seed``."""
    n = round(share * len(ids))
    return set(random.Random(f"{seed}:{salt}").sample(sorted(ids), n))


def failing_devices(opts: SimOptions) -> set[str]:
    return chosen(device_ids(opts), opts.fail_share, opts.seed, "fail")


def offline_devices(opts: SimOptions) -> set[str]:
    return chosen(device_ids(opts), opts.offline_share, opts.seed, "offline")


# -- one simulated device --------------------------------------------------------------------
@dataclass
class _Var:
    spec: VariantSpec
    status: str = "downloading"  # downloading | verifying | installed | failed
    progress: float = 0.0
    sim_seconds: float = 1.0  # no-download mode: how long the fake download takes
    verify_at: float = 0.0


@dataclass
class _Interval:
    requests: dict[str, int] = field(default_factory=dict)
    switches: list[SwitchEvent] = field(default_factory=list)
    energy_j: float = 0.0


class SimDevice:
    """One device; stepped by exactly one worker thread."""

    def __init__(self, device_id: str, opts: SimOptions, trusted: TrustedKeys,
                 state_dir: Path | None, *, fails: bool, offline: bool):
        self.id = device_id
        self.opts = opts
        self.topics = Topics(opts.prefix)
        self.trusted = trusted
        self.fails = fails
        self.rng = random.Random(f"{opts.seed}:{device_id}")
        r = self.rng
        self.store = VariantStore(state_dir) if state_dir is not None else None
        self.accepted: dict[str, int] = {"device": 0, "group": 0}
        self.manifest: Manifest | None = None
        self.vars: dict[str, _Var] = {}  # sha256 → state of the manifest's variants
        self.installed: dict[str, VariantSpec] = {}  # name → spec
        self.active: str | None = None
        self.pinned: str | None = None
        self.activate_at: float | None = None
        self.last_error: str | None = None
        self.counters: Counter[str] = Counter()
        # synthetic device character
        self.rate_hz = r.uniform(2.0, 20.0)
        self.speed = r.uniform(0.8, 1.6)  # latency factor
        self.battery_j = BATTERY_CAPACITY_J * r.uniform(0.3, 1.0)
        self.charging = False
        self.cpu = r.uniform(5, 40)
        self.mem = r.uniform(30, 70)
        self.temp = r.uniform(35, 55)
        self.bandwidth = r.uniform(0.5e6, 4e6)  # no-download mode, bytes/s
        # offline schedule (seconds since start, per cycle)
        self.offline_window: tuple[float, float] | None = None
        if offline:
            cycle = opts.duration_s or opts.offline_cycle_s
            start = r.uniform(0.2, 0.5) * cycle
            self.offline_window = (start, start + r.uniform(0.15, 0.3) * cycle)
        # telemetry: an in-memory bounded queue, deleted on PUBACK, sent again after a drop
        self.seq = 0
        self.pending: dict[int, bytes] = {}
        self.in_flight: dict[int, int] = {}  # mid → seq
        self.batches_acked = 0
        self.batches_dropped_unreported = 0
        self.interval = _Interval()
        self.interval_start = time.time()
        self.next_telemetry = 0.0
        self.next_tick = 0.0
        self.reported_dirty = True
        self.reported_at = 0.0
        self.online = False
        self.transport: MqttTransport | None = None
        self.downloader: Downloader | None = None

    # -- connection --------------------------------------------------------------------
    def _make_transport(self) -> MqttTransport:
        addr = BrokerAddress.parse(self.opts.broker_url)
        if addr.username is None:
            # As in production: the device id is the MQTT user, so `%u` ACLs apply.
            addr = BrokerAddress(addr.host, addr.port, addr.tls, self.id, None)
        subs = {self.topics.desired(self.id): 1, self.topics.commands(self.id): 1}
        if self.opts.group:
            subs[self.topics.group_desired(self.opts.group)] = 1
        tag = hashlib.sha256(self.opts.prefix.encode()).hexdigest()[:6]
        return MqttTransport(addr, TransportOptions(
            client_id=f"pf-sim-{tag}-{self.id}", keepalive_s=30, reconnect_min_s=1.0,
            reconnect_max_s=30.0,
            will_topic=self.topics.reported(self.id),
            will_payload=ReportedState(device_id=self.id, online=False).encode(),
            subscriptions=subs, inbound_queue_size=500,
        ))

    def connect(self, now: float) -> None:
        t = self.transport = self._make_transport()
        if self.store is not None:
            # A fresh downloader resumes from the chunks already on disk, as after a reboot.
            self.downloader = Downloader(
                self.store, self.topics, lambda topic: t.subscribe(topic, 1), t.unsubscribe,
                window=8, chunk_timeout_s=5.0)
            for v in self.vars.values():
                if v.status == "downloading":
                    self.downloader.want(v.spec, now)
        self.in_flight.clear()
        t.start()
        self.online = True

    def go_offline(self) -> None:
        """Drop the connection without DISCONNECT: the broker publishes the Last Will."""
        if self.transport is not None:
            self.transport.kill()
        self.transport = None
        self.downloader = None
        self.in_flight.clear()
        self.online = False
        self.counters["offline_periods"] += 1

    @property
    def connected(self) -> bool:
        return self.transport is not None and self.transport.connected.is_set()

    # -- the step ----------------------------------------------------------------------
    def step(self, now: float, elapsed: float) -> None:
        w = self.offline_window
        if w is not None:
            cycle = self.opts.duration_s or self.opts.offline_cycle_s
            t = elapsed % cycle if self.opts.duration_s is None else elapsed
            away = w[0] <= t < w[1]
            if away and self.online:
                self.go_offline()
            elif not away and not self.online:
                self.connect(now)
        if self.transport is not None:
            self._drain()
        if now >= self.next_tick:
            self.next_tick = now + 1.0
            self._tick(now)
        for v in list(self.vars.values()):
            if v.status == "verifying" and now >= v.verify_at:
                self._verified(v)
        if self.activate_at is not None and now >= self.activate_at:
            self.activate_at = None
            self._choose(Reason.INSTALLED if self.active else Reason.INITIAL)
        if now >= self.next_telemetry:
            if self.next_telemetry == 0.0:  # spread the fleet over the first interval
                self.next_telemetry = now + self.rng.uniform(0, self.opts.telemetry_interval_s)
            else:
                self.next_telemetry = now + self.opts.telemetry_interval_s
                self.cut_telemetry()
        if self.connected:
            self.pump()
            if self.reported_dirty:
                self.publish_reported()

    def _drain(self) -> None:
        assert self.transport is not None
        q = self.transport.inbound
        while True:
            try:
                item = q.get_nowait()
            except queue.Empty:
                return
            self._handle(item)

    def _handle(self, item: Inbound) -> None:
        if item.kind == "published":
            seq = self.in_flight.pop(item.mid, None)
            if seq is not None and self.pending.pop(seq, None) is not None:
                self.batches_acked += 1
        elif item.kind == "connected":
            self.reported_dirty = True
        elif item.kind == "disconnected":
            self.in_flight.clear()
        elif item.kind == "message":
            try:
                self._on_message(item.topic, item.payload)
            except (PrunefleetError, OSError, ValueError) as e:
                self.counters["invalid_messages"] += 1
                log.warning("%s: dropped message on %s: %s", self.id, item.topic, e)

    def _on_message(self, topic: str, payload: bytes) -> None:
        if topic == self.topics.desired(self.id):
            if payload:
                self._on_desired(decode(SignedManifest, payload), "device")
        elif self.opts.group and topic == self.topics.group_desired(self.opts.group):
            if payload:
                self._on_desired(decode(SignedManifest, payload), "group")
        elif topic == self.topics.commands(self.id):
            cmd = decode(Command, payload)
            if cmd.kind is CommandKind.PIN:
                self.pinned = cmd.variant
                self._choose(Reason.PINNED)
            elif cmd.kind is CommandKind.UNPIN:
                self.pinned = None
                self._choose(Reason.COMPLEXITY_HIGH)
            self.reported_dirty = True
        elif self.downloader is not None:
            for result in self.downloader.handle(topic, payload, time.monotonic()):
                v = self.vars.get(result.spec.sha256)
                if v is None:
                    continue
                if isinstance(result, Completed):
                    self._start_verify(v)
                elif isinstance(result, Failed):
                    self._failed(v, result.reason)

    # -- desired state (the real checks) -------------------------------------------------
    def _on_desired(self, signed: SignedManifest, source: str) -> None:
        want = self.id if source == "device" else self.opts.group
        try:
            m = self.trusted.verify(signed, min_version=self.accepted[source], target=want)
        except TrustError as e:
            self.counters["rejected_manifests"] += 1
            self.last_error = f"manifest rejected: {e}"
            self._event(EventKind.REJECTED, None, str(e))
            self.reported_dirty = True
            return
        self.accepted[source] = max(self.accepted[source], m.version)
        if self.manifest is not None and m.version <= self.manifest.version:
            return
        self.manifest = m
        self.pinned = m.pinned_variant
        self.last_error = None
        now = time.monotonic()
        old = self.vars
        fresh: dict[str, _Var] = {}  # built aside: the status thread reads self.vars
        for spec in m.variants:
            prev = old.get(spec.sha256)
            if self.installed.get(spec.name) == spec:
                fresh[spec.sha256] = _Var(spec, "installed", 1.0)
            elif prev is not None and prev.status in ("downloading", "verifying"):
                fresh[spec.sha256] = prev
            else:
                fresh[spec.sha256] = _Var(spec, sim_seconds=max(0.3, spec.size / self.bandwidth))
                self._event(EventKind.DOWNLOAD_STARTED, spec.name, f"{spec.size} bytes")
                if self.downloader is not None:
                    self.downloader.want(spec, now)
        self.vars = fresh
        if self.downloader is not None:
            self.downloader.cancel_except(set(self.vars))
        if all(v.status == "installed" for v in self.vars.values()):
            self._retire()
            self.activate_at = now + self.rng.uniform(0.1, 0.5)
        self.reported_dirty = True

    def _tick(self, now: float) -> None:
        if self.downloader is not None and self.online:
            self.downloader.tick(now)
            if self.downloader.active():
                for v in self.vars.values():
                    if v.status == "downloading":
                        v.progress = self.downloader.progress().get(v.spec.name, v.progress)
                self.reported_dirty = True
        elif self.store is None and self.online:
            for v in self.vars.values():  # --no-download: a timed progress bar
                if v.status == "downloading":
                    v.progress = min(1.0, v.progress + 1.0 / v.sim_seconds)
                    self.reported_dirty = True
                    if v.progress >= 1.0:
                        self._start_verify(v)

    def _start_verify(self, v: _Var) -> None:
        v.status = "verifying"
        v.progress = 1.0
        lo, hi = self.opts.verify_s
        v.verify_at = time.monotonic() + self.rng.uniform(lo, hi)
        self.reported_dirty = True

    def _verified(self, v: _Var) -> None:
        """The end of the simulated smoke test (no ONNX Runtime session is created)."""
        if self.fails:
            if self.store is not None:
                self.store.path_of(v.spec.sha256).unlink(missing_ok=True)
            self._failed(v, "smoke test failed: output differs from the manifest's golden "
                            "output (simulated failure)")
            return
        v.status = "installed"
        self.installed[v.spec.name] = v.spec
        if self.store is not None:
            self.store.record(v.spec)
        self.counters["installs"] += 1
        self._event(EventKind.INSTALLED, v.spec.name, v.spec.sha256)
        if all(x.status == "installed" for x in self.vars.values()):
            self._retire()
        self.activate_at = time.monotonic() + self.rng.uniform(0.1, 0.5)
        self.reported_dirty = True

    def _failed(self, v: _Var, why: str) -> None:
        v.status = "failed"
        self.counters["install_failures"] += 1
        self.last_error = f"{v.spec.name}: {why}"
        self._event(EventKind.INSTALL_FAILED, v.spec.name, why)
        self.reported_dirty = True

    def _retire(self) -> None:
        names = {v.spec.name: v.spec.sha256 for v in self.vars.values()}
        for name, spec in list(self.installed.items()):
            if names.get(name) != spec.sha256:
                del self.installed[name]
                if self.store is not None:
                    self.store.forget(name)
        if self.active is not None and self.active not in self.installed:
            self._choose(Reason.FALLBACK)

    # -- a policy-like choice, with real reason codes -----------------------------------
    def _ordered(self) -> list[VariantSpec]:
        return sorted(self.installed.values(), key=lambda s: (s.macs, s.name))

    def _choose(self, reason: Reason) -> None:
        table = self._ordered()
        if not table:
            return
        names = [s.name for s in table]
        pct = self.battery_percent
        pick: str
        if self.pinned is not None and self.pinned in names:
            pick, reason = self.pinned, Reason.PINNED
        elif pct < 10 and not self.charging:
            pick, reason = names[0], Reason.BATTERY_CRITICAL
        elif pct < 30 and not self.charging:
            pick, reason = names[(len(names) - 1) // 2], Reason.BATTERY_LOW
        else:
            pick = names[-1]
        self._switch(pick, reason)

    def _switch(self, to: str, reason: Reason) -> None:
        if to == self.active:
            return
        self.interval.switches.append(SwitchEvent(ts=time.time(), from_variant=self.active,
                                                  to_variant=to, reason=reason))
        self.active = to
        self.reported_dirty = True

    def _wander(self, dt: float) -> None:
        """Sensors and input complexity drift; the choice follows with reason codes."""
        r = self.rng
        self.cpu = min(100.0, max(1.0, self.cpu + r.gauss(0, 5)))
        self.mem = min(95.0, max(10.0, self.mem + r.gauss(0, 2)))
        self.temp = min(90.0, max(25.0, self.temp + r.gauss(0, 1.5)))
        pct = self.battery_percent
        if self.charging and pct >= 90:
            self.charging = False
        elif not self.charging and pct <= 5 + r.uniform(0, 5):
            self.charging = True
            self._switch_reason_after_battery(Reason.CHARGING)
            return
        table = [s.name for s in self._ordered()]
        if len(table) < 2 or self.active is None or self.pinned:
            return
        if pct < 10 and not self.charging:
            self._switch(table[0], Reason.BATTERY_CRITICAL)
        elif pct < 30 and not self.charging:
            cap = table[(len(table) - 1) // 2]
            if table.index(self.active) > table.index(cap):
                self._switch(cap, Reason.BATTERY_LOW)
        elif self.temp > 75:
            i = table.index(self.active)
            if i > 0:
                self._switch(table[i - 1], Reason.THERMAL)
        elif self.cpu > 85:
            i = table.index(self.active)
            if i > 0:
                self._switch(table[i - 1], Reason.CPU_HIGH)
        elif r.random() < min(0.5, 0.05 * dt):
            # input complexity: busy scenes get the largest, simple ones one step cheaper
            if self.active == table[-1]:
                self._switch(table[-2], Reason.COMPLEXITY_LOW)
            else:
                self._switch(table[-1], Reason.COMPLEXITY_HIGH)

    def _switch_reason_after_battery(self, reason: Reason) -> None:
        table = [s.name for s in self._ordered()]
        if table and not self.pinned:
            self._switch(table[-1], reason)

    @property
    def battery_percent(self) -> float:
        return max(0.0, min(100.0, 100.0 * self.battery_j / BATTERY_CAPACITY_J))

    # -- telemetry ------------------------------------------------------------------------
    def cut_telemetry(self) -> None:
        end = time.time()
        start = self.interval_start
        dt = max(0.0, end - start)
        r = self.rng
        self._wander(dt)
        stats: dict[str, VariantStats] = {}
        energy = IDLE_W * dt
        if self.active is not None and self.active in self.installed:
            n = max(0, round(self.rate_hz * dt * r.uniform(0.7, 1.3)))
            spec = self.installed[self.active]
            p50 = (spec.latency_ms or 0.2 + spec.macs / 5e6) * self.speed * r.uniform(0.9, 1.1)
            p95 = p50 * r.uniform(1.3, 1.8)
            labeled = correct = 0
            if spec.accuracy is not None and n:
                labeled = n
                correct = min(n, max(0, round(n * spec.accuracy * r.uniform(0.97, 1.01))))
            stats[self.active] = VariantStats(
                requests=n, errors=1 if n and r.random() < 0.02 else 0,
                latency_ms_p50=round(p50, 4), latency_ms_p95=round(p95, 4),
                latency_ms_p99=round(p95 * r.uniform(1.1, 1.5), 4),
                labeled=labeled, correct=correct)
            energy += n * (0.01 + 2e-8 * spec.macs)
        if self.charging:
            self.battery_j = min(BATTERY_CAPACITY_J, self.battery_j + CHARGE_W * dt - energy)
        else:
            self.battery_j = max(0.0, self.battery_j - energy)
        switches = self.interval.switches[:256]
        self.interval = _Interval()
        self.interval_start = end
        dropped = self.batches_dropped_unreported
        self.batches_dropped_unreported = 0
        batch = TelemetryBatch(
            device_id=self.id, seq=self.seq, interval_start=start,
            interval_end=max(start, end), variants=stats, switches=switches,
            active_variant=self.active, battery_percent=round(self.battery_percent, 2),
            charging=self.charging, cpu_percent=round(self.cpu, 1),
            mem_percent=round(self.mem, 1), temperature_c=round(self.temp, 1),
            energy_j=round(energy, 4), batches_dropped=dropped)
        self.seq += 1
        self.pending[batch.seq] = batch.encode()
        while len(self.pending) > MAX_QUEUED_BATCHES:
            oldest = min(self.pending)
            del self.pending[oldest]
            self.batches_dropped_unreported += 1
            self.counters["telemetry_dropped"] += 1

    def pump(self, max_in_flight: int = 10) -> None:
        if self.transport is None:
            return
        flying = set(self.in_flight.values())
        for seq in sorted(self.pending):
            if len(self.in_flight) >= max_in_flight:
                return
            if seq in flying:
                continue
            try:
                mid = self.transport.publish(self.topics.telemetry(self.id), self.pending[seq])
            except PrunefleetError as e:
                log.debug("%s: telemetry publish failed: %s", self.id, e)
                return
            self.in_flight[mid] = seq

    # -- reported state and events -------------------------------------------------------
    def rollout_report(self) -> RolloutReport | None:
        m = self.manifest
        if m is None:
            return None
        vs = list(self.vars.values())
        if any(v.status == "failed" for v in vs):
            return RolloutReport(manifest_version=m.version, phase=RolloutPhase.FAILED,
                                 reason=(self.last_error or "install failed")[:1024])
        if any(v.status == "verifying" for v in vs):
            phase = RolloutPhase.VERIFYING
        elif all(v.status == "installed" for v in vs):
            phase = (RolloutPhase.ACTIVE if self.active in {v.spec.name for v in vs}
                     else RolloutPhase.INSTALLED)
        elif any(v.status == "downloading" and v.progress > 0 for v in vs) or (
                self.downloader is not None and self.downloader.active()):
            phase = RolloutPhase.DOWNLOADING
        else:
            phase = RolloutPhase.OFFERED
        total = sum(v.spec.size for v in vs)
        done = sum(v.spec.size * (1.0 if v.status == "installed" else v.progress) for v in vs)
        return RolloutReport(manifest_version=m.version, phase=phase,
                             progress=round(min(1.0, done / total), 3))

    def phase(self) -> str:
        r = self.rollout_report()
        return "none" if r is None else r.phase.value

    def reported(self, online: bool = True) -> ReportedState:
        return ReportedState(
            device_id=self.id, online=online, ts=time.time(), group=self.opts.group,
            agent_version=f"{__version__}-sim"[:32],
            manifest_version=self.manifest.version if self.manifest else None,
            active_variant=self.active,
            installed=[InstalledVariant(name=n, sha256=s.sha256, size=s.size)
                       for n, s in sorted(self.installed.items())],
            downloading={v.spec.name: round(v.progress, 3) for v in self.vars.values()
                         if v.status == "downloading"},
            last_error=self.last_error, rollout=self.rollout_report(),
            counters={k: int(v) for k, v in sorted(self.counters.items())
                      if k in ("invalid_messages", "rejected_manifests", "install_failures",
                               "telemetry_dropped")},
        )

    def publish_reported(self, online: bool = True) -> int | None:
        if self.transport is None:
            return None
        try:
            mid = self.transport.publish(self.topics.reported(self.id),
                                         self.reported(online).encode(), retain=True)
        except PrunefleetError as e:
            log.debug("%s: reported state not published: %s", self.id, e)
            return None
        self.reported_dirty = False
        self.reported_at = time.monotonic()
        return mid

    def _event(self, kind: EventKind, variant: str | None, detail: str) -> None:
        if not self.connected or self.transport is None:
            return  # events are best effort, as on a device whose broker is away
        ev = Event(device_id=self.id, ts=time.time(), kind=kind, variant=variant,
                   detail=detail[:2048])
        try:
            self.transport.publish(self.topics.events(self.id), ev.encode())
        except PrunefleetError as e:
            log.debug("%s: event not published: %s", self.id, e)

    def shutdown_stop(self) -> None:
        if self.transport is not None:
            self.transport.stop()
            self.transport = None
        self.online = False


# -- the simulator ---------------------------------------------------------------------------
@dataclass
class Summary:
    elapsed_s: float
    devices: int
    online: int
    phases: dict[str, int]
    batches_sent: int
    batches_queued: int
    installs: int
    install_failures: int
    rejected_manifests: int


class Simulator:
    def __init__(self, opts: SimOptions):
        opts.check()
        self.opts = opts
        self.trusted = TrustedKeys([load_public_pem((Path(opts.keys) / "public.pem")
                                                    .read_bytes())])
        self._own_state = opts.state_dir is None and opts.download
        self.state_dir: Path | None = None
        if opts.download:
            self.state_dir = (Path(tempfile.mkdtemp(prefix="prunefleet-sim-"))
                              if opts.state_dir is None else Path(opts.state_dir))
        ids = device_ids(opts)
        fails, away = failing_devices(opts), offline_devices(opts)
        self.devices = [
            SimDevice(d, opts, self.trusted,
                      self.state_dir / d if self.state_dir is not None else None,
                      fails=d in fails, offline=d in away)
            for d in ids
        ]
        n = opts.workers or min(4, os.cpu_count() or 1)
        n = max(1, min(n, len(self.devices)))
        self._shards = [self.devices[i::n] for i in range(n)]
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._t0 = time.monotonic()
        self._stopped = False

    def start(self) -> Simulator:
        """Connect every device (staggered a little) and start the workers; raises
        :class:`SimulatorError` when no device reaches the broker in time."""
        self._t0 = time.monotonic()
        for i, d in enumerate(self.devices):
            if d.offline_window is None or d.offline_window[0] > 0:
                d.connect(time.monotonic())
            if i % 50 == 49:
                time.sleep(0.02)  # a connection burst of thousands is not a fleet
        deadline = time.monotonic() + self.opts.connect_timeout_s
        while not any(d.connected for d in self.devices):
            if time.monotonic() > deadline:
                self._close_all()
                raise SimulatorError(
                    f"no simulated device could connect to "
                    f"{BrokerAddress.parse(self.opts.broker_url).url} within "
                    f"{self.opts.connect_timeout_s:.0f} s")
            time.sleep(0.05)
        for i, shard in enumerate(self._shards):
            t = threading.Thread(target=self._work, args=(shard,), name=f"sim-worker-{i}",
                                 daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def _work(self, shard: list[SimDevice]) -> None:
        period = 0.05
        while not self._stop.is_set():
            t = time.monotonic()
            for d in shard:
                try:
                    d.step(t, t - self._t0)
                except Exception:  # one device's bug must not stop the others
                    d.counters["errors"] += 1
                    log.exception("%s: step failed", d.id)
            self._stop.wait(max(0.0, period - (time.monotonic() - t)))
        self._finish(shard)

    def _finish(self, shard: list[SimDevice], flush_s: float = 5.0) -> None:
        """The last batch, queued telemetry flushed, an offline report, DISCONNECT."""
        for d in shard:
            if d.online:
                d.cut_telemetry()
        deadline = time.monotonic() + flush_s
        while time.monotonic() < deadline:
            busy = False
            for d in shard:
                if d.connected:
                    d._drain()
                    d.pump()
                    busy = busy or bool(d.pending)
            if not busy:
                break
            time.sleep(0.02)
        goodbye: dict[SimDevice, int] = {}
        for d in shard:
            if d.connected:
                mid = d.publish_reported(online=False)
                if mid is not None:
                    goodbye[d] = mid
        deadline = time.monotonic() + 1.0
        while goodbye and time.monotonic() < deadline:
            for d in list(goodbye):
                if d.transport is None:
                    del goodbye[d]
                    continue
                while True:
                    try:
                        item = d.transport.inbound.get_nowait()
                    except queue.Empty:
                        break
                    if item.kind == "published" and item.mid == goodbye.get(d):
                        goodbye.pop(d, None)
                    else:
                        d._handle(item)
            time.sleep(0.02)
        for d in shard:
            d.shutdown_stop()

    def _close_all(self) -> None:
        for d in self.devices:
            if d.transport is not None:
                d.transport.stop(disconnect=False)
                d.transport = None
        self._cleanup()

    def _cleanup(self) -> None:
        if self._own_state and self.state_dir is not None:
            shutil.rmtree(self.state_dir, ignore_errors=True)

    def stop(self) -> Summary:
        """Stop every device cleanly; the summary counts devices online until the stop."""
        online = self.summary().online
        if not self._stopped:
            self._stopped = True
            self._stop.set()
            for t in self._threads:
                t.join(30)
            self._cleanup()
        s = self.summary()
        s.online = online
        return s

    def summary(self) -> Summary:
        phases = Counter(d.phase() for d in self.devices)
        return Summary(
            elapsed_s=time.monotonic() - self._t0, devices=len(self.devices),
            online=sum(1 for d in self.devices if d.connected),
            phases={p: phases.get(p, 0) for p in PHASES},
            batches_sent=sum(d.batches_acked for d in self.devices),
            batches_queued=sum(len(d.pending) for d in self.devices),
            installs=sum(d.counters["installs"] for d in self.devices),
            install_failures=sum(d.counters["install_failures"] for d in self.devices),
            rejected_manifests=sum(d.counters["rejected_manifests"] for d in self.devices),
        )


HEADER = ["TIME", "DEVICES", "ONLINE", *(p.upper() for p in PHASES), "BATCHES"]


def summary_row(s: Summary, label: str | None = None) -> list[str]:
    return [label or f"{s.elapsed_s:.0f}s", str(s.devices), str(s.online),
            *(str(s.phases[p]) for p in PHASES), str(s.batches_sent)]


def format_row(cells: list[str]) -> str:
    widths = [max(len(h), 8) for h in HEADER]
    return "  ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True))


def run(opts: SimOptions, stop: threading.Event, out: TextIO,
        on_started: Callable[[Simulator], None] | None = None) -> Summary:
    """Run until ``stop`` is set or ``opts.duration_s`` has passed; print status rows."""
    sim = Simulator(opts)
    mode = "chunks downloaded and verified" if opts.download else "no downloads (--no-download)"
    print(f"simulating {opts.devices} devices on {BrokerAddress.parse(opts.broker_url).url}, "
          f"prefix {opts.prefix!r}, {len(sim._shards)} worker threads, {mode}; "
          f"failing {len(failing_devices(opts))}, going offline "
          f"{len(offline_devices(opts))}", file=out, flush=True)
    sim.start()
    if on_started is not None:
        on_started(sim)
    print(format_row(HEADER), file=out, flush=True)
    end = None if opts.duration_s is None else time.monotonic() + opts.duration_s
    try:
        while True:
            wait = opts.status_interval_s
            if end is not None:
                wait = min(wait, end - time.monotonic())
            if wait <= 0 or stop.wait(wait):
                break
            print(format_row(summary_row(sim.summary())), file=out, flush=True)
    finally:
        s = sim.stop()
    print(format_row(summary_row(s, "end")), file=out, flush=True)
    print(f"{s.batches_sent} telemetry batches acknowledged by the broker "
          f"({s.batches_queued} still queued), {s.installs} installs, "
          f"{s.install_failures} install failures, {s.rejected_manifests} rejected manifests",
          file=out, flush=True)
    return s
