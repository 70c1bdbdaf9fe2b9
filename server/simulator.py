"""A fleet simulator: many simulated devices against a real broker and server.

For operators who want to try rollouts, dashboards and ingest at scale without devices.
A simulated device runs the agent's own code (:class:`~prunefleet.agent.service.Agent`):
the same manifest follower (signature, expiry, target, rollback floor per source, policy
overrides), installer and rollout phases, the same policy choosing variants with the same
reasons (so a policy threshold changed on the server moves the simulated fleet as it
moves a real one), the same telemetry batching and reported state, over its own MQTT
connection (with the device id as MQTT user name unless the broker URL names one, and a
Last Will that marks it offline). Chunks are fetched and verified into a per-device state
directory by the real downloader.

What is simulated (:mod:`prunefleet.agent.simulated`): no ONNX Runtime session is
created, so a device is light; the smoke test passes, or fails for the ``fail_share`` of
devices chosen by the seed; answers are right with each variant's declared accuracy and
take its declared latency times the device's speed, and each device reports simulated
facts (class ``sim-fast`` or ``sim-slow``) and simulated profiles (that latency, its energy
the latency times a simulated active power). The battery drains by those profiles' energy
per inference and by idling, a charger plugs in when it is nearly empty, CPU, memory
and temperature drift, and an application sends labelled requests at the device's rate,
alternately calm and busy. With ``download=False`` even the chunks are not fetched: the
download is a timed progress bar, then the variant installs as usual.

Threads: the devices' connections are :class:`EpollMqttTransport`s, driven by one
``epoll`` thread per ``DEVICES_PER_LOOP`` connections whose paho callbacks only enqueue (as
in the real agent), one open file each, so one process holds thousands of devices (paho's
own thread per connection waits with ``select()``, which stops at descriptor 1024); a few
worker threads step every device (:meth:`Agent.step`). Each device is stepped by one worker
only, so it publishes from one place.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import os
import random
import shutil
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np

from prunefleet.agent.build import device_transport
from prunefleet.agent.config import AgentConfig
from prunefleet.agent.errors import InferenceError
from prunefleet.agent.sensors import SimulatedBattery, SimulatedSensors
from prunefleet.agent.service import Agent
from prunefleet.agent.simulated import (
    SimulatedDownloader,
    SimulatedEngine,
    encode_label,
    simulated_facts,
)
from prunefleet.agent.telemetry import MemoryQueue
from prunefleet.shared import __version__
from prunefleet.shared.clock import Clock, SystemClock
from prunefleet.shared.errors import PrunefleetError
from prunefleet.shared.gctune import tune_for_throughput
from prunefleet.shared.messages import RolloutPhase
from prunefleet.shared.policy import PolicyConfig
from prunefleet.shared.topics import Topics, check_name
from prunefleet.shared.transport import (
    BrokerAddress,
    EpollLoop,
    EpollMqttTransport,
    Inbound,
    InboundQueue,
    Transport,
    raise_fd_limit,
)

log = logging.getLogger(__name__)

PHASES = ("none", *(p.value for p in RolloutPhase))
MAX_QUEUED_BATCHES = 1000
# Devices per epoll loop thread: each loop owns its connections' sockets (one descriptor
# each); paho's own thread per client would wait with select(), which stops at 1024.
DEVICES_PER_LOOP = 2500
FD_RESERVE = 256  # descriptors beside the devices' sockets (logs, state files, the broker)
# A device is stepped every STEP_PERIOD_S, or less often in a large fleet so that the whole
# fleet takes at most STEPS_PER_S steps a second (measured: ~25 us a step without requests):
# the steps stay within one core, and the other core is left to the broker and the server.
# The application's requests keep their rate (a step serves those due since the last one).
STEP_PERIOD_S = 0.05
STEPS_PER_S = 10_000
BATTERY_CAPACITY_J = 3600.0  # 1 Wh: a simulated battery drains visibly within minutes
IDLE_W = 0.8
CHARGE_W = 6.0
SIM_ACTIVE_W = 2.0  # a busy core's draw above idle: inference energy is latency times this


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
    policy: PolicyConfig | None = None  # the devices' local policy (default: the agent's)
    connect_timeout_s: float = 15.0
    # At stop: how long devices keep sending telemetry the server has not yet confirmed
    # storing (what is still unconfirmed then is counted in ``batches_queued``).
    drain_s: float = 5.0
    telemetry_ack_timeout_s: float = 30.0
    # Each device's telemetry window (the agent's telemetry_max_in_flight): batches sent
    # and not yet confirmed stored. A fleet of N devices has N times this in flight.
    telemetry_max_in_flight: int = 10

    def check(self) -> None:
        """Raise :class:`SimulatorError` with one clear line for a bad option."""
        if self.devices < 1:
            raise SimulatorError(f"--devices must be at least 1, got {self.devices}")
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
        if not 1 <= self.telemetry_max_in_flight <= 100:
            raise SimulatorError("--in-flight must be between 1 and 100 (the agent's "
                                 f"telemetry_max_in_flight), got {self.telemetry_max_in_flight}")
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
class SimDevice:
    """One device: the real :class:`Agent` with simulated sensors, inference and (with
    ``download=False``) downloads, plus the world around it: an application sending
    requests, a charger, load that drifts, and an offline schedule. Stepped by exactly one
    worker thread."""

    def __init__(self, device_id: str, opts: SimOptions, state_dir: Path, *, fails: bool,
                 offline: bool, clock: Clock | None = None,
                 transport: Transport | None = None, loop: EpollLoop | None = None):
        self.id = device_id
        self.opts = opts
        self.rng = random.Random(f"{opts.seed}:{device_id}")
        r = self.rng
        self.clock = clock or SystemClock()
        self.rate_hz = r.uniform(2.0, 20.0)
        self._np = np.random.default_rng(r.getrandbits(32))
        cpu0, mem0, temp0 = r.uniform(5, 40), r.uniform(30, 70), r.uniform(35, 55)
        phase = r.uniform(0, 2 * math.pi)
        battery = SimulatedBattery(BATTERY_CAPACITY_J, r.uniform(30.0, 100.0),
                                   idle_drain_w=IDLE_W, charge_w=CHARGE_W, clock=self.clock)
        sensors = SimulatedSensors(
            battery, clock=self.clock,
            cpu_percent=lambda t: cpu0 + 25 * math.sin(t / 97 + phase) ** 2,
            mem_available_percent=lambda t: 100 - (mem0 + 10 * math.sin(t / 131 + phase)),
            temperature_c=lambda t: temp0 + 8 * math.sin(t / 173 + phase))
        self.battery = battery
        cfg = AgentConfig(
            device_id=device_id, group=opts.group, broker_url=opts.broker_url,
            fleet_prefix=opts.prefix, state_dir=state_dir,
            trusted_keys=[Path(opts.keys) / "public.pem"], keepalive_s=30,
            reconnect_min_s=1.0, reconnect_max_s=30.0,
            telemetry_interval_s=opts.telemetry_interval_s,
            telemetry_ack_timeout_s=opts.telemetry_ack_timeout_s,
            telemetry_queue_max_batches=MAX_QUEUED_BATCHES,
            telemetry_max_in_flight=opts.telemetry_max_in_flight,
            download_window_chunks=8, chunk_timeout_s=5.0,
            policy=opts.policy or PolicyConfig())
        if transport is None:
            addr = BrokerAddress.parse(opts.broker_url)
            if addr.username is None:
                # As in production: the device id is the MQTT user, so `%u` ACLs apply.
                addr = BrokerAddress(addr.host, addr.port, addr.tls, device_id, None)
            tag = hashlib.sha256(opts.prefix.encode()).hexdigest()[:6]
            transport = device_transport(cfg, address=addr, client_id=f"pf-sim-{tag}-{device_id}",
                                         inbound_queue_size=500)
            if loop is not None:
                transport = EpollMqttTransport(transport.address, transport.options, loop)
        speed = r.uniform(0.8, 1.6)
        self.agent = Agent(
            cfg, sensors=sensors, transport=transport, clock=self.clock,
            engine=SimulatedEngine(speed=speed, fails=fails, seed=f"{opts.seed}:{device_id}",
                                   active_power_w=SIM_ACTIVE_W),
            telemetry_queue=MemoryQueue(MAX_QUEUED_BATCHES),
            downloader=None if opts.download else SimulatedDownloader(r.uniform(0.5e6, 4e6)),
            agent_version=f"{__version__}-sim"[:32],
            # Two simulated device classes, by speed: their profiles aggregate per class.
            facts=simulated_facts("sim-fast" if speed < 1.2 else "sim-slow",
                                  active_power_w=SIM_ACTIVE_W))
        self.offline_window: tuple[float, float] | None = None
        if offline:
            cycle = opts.duration_s or opts.offline_cycle_s
            start = r.uniform(0.2, 0.5) * cycle
            self.offline_window = (start, start + r.uniform(0.15, 0.3) * cycle)
        self.online = False
        self.offline_periods = 0
        self.errors = 0
        self._last_step: float | None = None
        self._busy_until = 0.0

    # -- connection --------------------------------------------------------------------
    def connect(self) -> None:
        if self.offline_periods == 0 and not self.online:
            self.agent.start()
        else:
            self.agent.transport.start()
        self.online = True

    def go_offline(self) -> None:
        """Drop the connection without DISCONNECT: the broker publishes the Last Will."""
        self.agent.transport.kill()
        self.online = False
        self.offline_periods += 1

    @property
    def connected(self) -> bool:
        return self.online and self.agent.transport.connected.is_set()

    # -- the step ----------------------------------------------------------------------
    def step(self, elapsed: float) -> None:
        w = self.offline_window
        if w is not None:
            cycle = self.opts.duration_s or self.opts.offline_cycle_s
            t = elapsed % cycle if self.opts.duration_s is None else elapsed
            away = w[0] <= t < w[1]
            if away and self.online:
                self.go_offline()
            elif not away and not self.online:
                self.connect()
        now = self.clock.monotonic()
        dt = 0.0 if self._last_step is None else max(0.0, now - self._last_step)
        self._last_step = now
        self._charger()
        self._requests(dt, now)
        self.agent.step()

    def _charger(self) -> None:
        """Plugged in when nearly empty, unplugged when nearly full."""
        b = self.battery
        pct = b.percent
        if b.charging and pct >= 90:
            b.charging = False
        elif not b.charging and pct <= 5 + self.rng.uniform(0, 5):
            b.charging = True

    def _requests(self, dt: float, now: float) -> None:
        """The application: labelled requests at the device's rate, alternately a calm
        and a busy scene (noisy inputs, which the complexity estimate notices)."""
        specs = self.agent.pool.specs
        if not specs or dt <= 0:
            return
        n = int(self._np.poisson(self.rate_hz * dt))
        if n == 0:
            return
        if now >= self._busy_until:
            self._busy = not getattr(self, "_busy", False)
            self._busy_until = now + self.rng.uniform(5.0, 30.0)
        shape = next(iter(specs.values())).input_shape[1:]
        sigma = 1.0 if self._busy else 0.05
        classes = next(iter(specs.values())).num_classes
        for _ in range(min(n, 50)):
            x = self._np.normal(0.0, sigma, (1, *shape)).astype(np.float32)
            label = int(self._np.integers(classes))
            try:
                self.agent.predict(encode_label(x, np.array([label])), label=label)
            except InferenceError:
                return  # nothing loaded yet

    # -- what the simulator reads --------------------------------------------------------
    def phase(self) -> str:
        r = self.agent.installer.rollout(self.agent.active_variant)
        return "none" if r is None else r.phase.value


# -- the simulator ---------------------------------------------------------------------------
class _Wake:
    """The devices of one worker's shard that received something since it last looked:
    each device's inbound queue notes the device here (``InboundQueue.on_put``, on the
    network thread) and wakes the worker. The broker's acknowledgements of a device's own
    publishes wake nothing: they wait for its next step (a stopping device's goodbye is
    waited for by :meth:`Simulator._finish`)."""

    def __init__(self, shard: list[SimDevice]) -> None:
        self._ready: dict[int, SimDevice] = {}  # by id(): each device once, in arrival order
        self._lock = threading.Lock()
        self._event = threading.Event()
        for d in shard:
            inbound = getattr(d.agent.transport, "inbound", None)
            if isinstance(inbound, InboundQueue):
                inbound.on_put = functools.partial(self._note, d)

    def _note(self, d: SimDevice, item: Inbound) -> None:
        if item.kind == "published":
            return
        with self._lock:
            self._ready[id(d)] = d
        self._event.set()

    def take(self) -> list[SimDevice]:
        """The devices noted so far, forgotten here."""
        with self._lock:
            self._event.clear()
            ready, self._ready = list(self._ready.values()), {}
        return ready

    def wait(self, timeout: float) -> list[SimDevice]:
        """Wait up to ``timeout`` seconds for a device to be noted; the devices noted."""
        self._event.wait(timeout)
        return self.take()

    def interrupt(self) -> None:
        """Wake the worker (to stop)."""
        self._event.set()


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
    def __init__(self, opts: SimOptions, *, clock: Clock | None = None,
                 transports: Callable[[str], Transport] | None = None):
        """``clock`` and ``transports`` (device id → transport) are seams for tests: a
        fake clock and the in-memory broker."""
        opts.check()
        self.opts = opts
        self.clock = clock or SystemClock()
        self._own_state = opts.state_dir is None
        self.state_dir = (Path(tempfile.mkdtemp(prefix="prunefleet-sim-"))
                          if opts.state_dir is None else Path(opts.state_dir))
        ids = device_ids(opts)
        fails, away = failing_devices(opts), offline_devices(opts)
        self._loops: list[EpollLoop] = []
        if transports is None:
            need = opts.devices + FD_RESERVE
            have = raise_fd_limit(need)
            if have < need:
                self._cleanup()
                raise SimulatorError(
                    f"--devices {opts.devices} needs {need} open files, this process may "
                    f"have {have} (RLIMIT_NOFILE hard limit): raise it (`ulimit -Hn`, "
                    "LimitNOFILE= under systemd) or run fewer devices")
            self._loops = [EpollLoop(f"sim-mqtt-{i}")
                           for i in range(math.ceil(opts.devices / DEVICES_PER_LOOP))]
        try:
            self.devices = [
                SimDevice(d, opts, self.state_dir / d, fails=d in fails, offline=d in away,
                          clock=self.clock,
                          transport=transports(d) if transports is not None else None,
                          loop=self._loops[i // DEVICES_PER_LOOP] if self._loops else None)
                for i, d in enumerate(ids)
            ]
        except PrunefleetError as e:
            self._close_loops()
            self._cleanup()
            raise SimulatorError(str(e)) from e
        n = opts.workers or min(4, os.cpu_count() or 1)
        n = max(1, min(n, len(self.devices)))
        self._shards = [self.devices[i::n] for i in range(n)]
        self._wakes = [_Wake(shard) for shard in self._shards]
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._t0 = self.clock.monotonic()  # elapsed time is the devices' clock's
        self._stopped = False

    def start(self, workers: bool = True) -> Simulator:
        """Connect every device (staggered a little) and start the workers; raises
        :class:`SimulatorError` when no device reaches the broker in time. With
        ``workers=False`` the caller steps the fleet itself (:meth:`step_all`)."""
        self._t0 = self.clock.monotonic()
        for i, d in enumerate(self.devices):
            if d.offline_window is None or d.offline_window[0] > 0:
                d.connect()
            if i % 50 == 49 and workers:
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
        if workers:
            for i, (shard, wake) in enumerate(zip(self._shards, self._wakes, strict=True)):
                t = threading.Thread(target=self._work, args=(shard, wake),
                                     name=f"sim-worker-{i}", daemon=True)
                t.start()
                self._threads.append(t)
        return self

    def step_all(self, elapsed: float | None = None) -> None:
        """One step of every device (tests drive the fleet this way with a fake clock)."""
        t = self.clock.monotonic() - self._t0 if elapsed is None else elapsed
        for d in self.devices:
            self._step(d, t)

    @staticmethod
    def _step(d: SimDevice, elapsed: float) -> None:
        try:
            d.step(elapsed)
        except Exception:  # one device's bug must not stop the others: counted, logged
            d.errors += 1
            log.exception("%s: step failed", d.id)

    def _work(self, shard: list[SimDevice], wake: _Wake) -> None:
        """Step every device of the shard each period, and between those passes each
        device that received something, at once: an agent waits on its own inbound queue
        and acts on a message (a "stored through" cursor, a desired state) as it arrives,
        so a simulated one must not add up to a period to its round trips."""
        period = max(STEP_PERIOD_S, self.opts.devices / STEPS_PER_S)
        next_pass = time.monotonic()
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= next_pass:
                next_pass = now + period
                wake.take()  # every device is stepped now: what woke them is handled
                elapsed = self.clock.monotonic() - self._t0
                for d in shard:
                    self._step(d, elapsed)
                continue
            ready = wake.wait(next_pass - now)
            if ready:
                elapsed = self.clock.monotonic() - self._t0
                for d in ready:
                    self._step(d, elapsed)
        self._finish(shard)

    def _finish(self, shard: list[SimDevice]) -> None:
        """What the agent does on SIGTERM, for the whole shard at once: the last batch,
        queued telemetry flushed (up to ``drain_s``), an offline report, DISCONNECT."""
        live = [d for d in shard if d.online]
        for d in live:
            d.agent.begin_shutdown()
        deadline = time.monotonic() + self.opts.drain_s
        while time.monotonic() < deadline:
            busy = False
            for d in live:
                d.agent.step_inbound()
                busy = d.agent.flush_step() or busy
            if not busy:
                break
            time.sleep(0.02)
        for d in live:
            d.agent.say_goodbye()
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline and not all(
                d.agent.goodbye_acknowledged() for d in live):
            for d in live:
                d.agent.step_inbound()
            time.sleep(0.02)
        loops = set()
        for d in shard:
            if d.online:
                t = d.agent.transport
                if isinstance(t, EpollMqttTransport):  # all at once, then wait for them
                    t.stop(wait_s=None)
                    loops.add(t.loop)
                else:
                    t.stop()
                d.online = False
        for loop in loops:
            loop.sync(30.0)

    def _close_all(self) -> None:
        for d in self.devices:
            d.agent.transport.stop(disconnect=False)
            d.online = False
        self._close_loops()
        self._cleanup()

    def _close_loops(self) -> None:
        for loop in self._loops:
            loop.close()
        self._loops = []

    def _cleanup(self) -> None:
        if self._own_state:
            shutil.rmtree(self.state_dir, ignore_errors=True)

    def stop(self) -> Summary:
        """Stop every device cleanly; the summary counts devices online until the stop."""
        online = self.summary().online
        if not self._stopped:
            self._stopped = True
            self._stop.set()
            for wake in self._wakes:
                wake.interrupt()
            for t in self._threads:
                t.join(30)
            if not self._threads:
                for shard in self._shards:
                    self._finish(shard)
            self._close_loops()
            self._cleanup()
        s = self.summary()
        s.online = online
        return s

    def summary(self) -> Summary:
        phases = Counter(d.phase() for d in self.devices)
        counters = [d.agent.counters for d in self.devices]
        return Summary(
            elapsed_s=self.clock.monotonic() - self._t0, devices=len(self.devices),
            online=sum(1 for d in self.devices if d.connected),
            phases={p: phases.get(p, 0) for p in PHASES},
            batches_sent=sum(d.agent.sender.acked_total for d in self.devices),
            batches_queued=sum(len(d.agent.tqueue.pending()) for d in self.devices),
            installs=sum(c.installs for c in counters),
            install_failures=sum(c.install_failures for c in counters),
            rejected_manifests=sum(c.rejected_manifests for c in counters),
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
    tune_for_throughput()  # `prunefleet simulate`'s own process (shared/gctune.py)
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
    print(f"{s.batches_sent} telemetry batches confirmed stored by the server "
          f"({s.batches_queued} still queued), {s.installs} installs, "
          f"{s.install_failures} install failures, {s.rejected_manifests} rejected manifests",
          file=out, flush=True)
    return s
