"""The agent: a coordinator of its parts, and the one place that talks to the broker.

The decisions live elsewhere and do no I/O: which desired state to follow and what it
takes (:mod:`.follower`), which variant serves a request (:mod:`.policy`, wrapped for
threads by :mod:`.serving`), the rollout phase (:mod:`.phase`), telemetry batches
(:mod:`.telemetry`). This class feeds them and applies what they say.

Threads: the transport's network thread only enqueues; request threads call
:meth:`Agent.predict`; one loop thread (:meth:`run`, or whoever calls :meth:`step`, as
the simulator's workers do) drains the inbound queue, installs, reads sensors, cuts and
sends telemetry and publishes the reported state. It alone publishes.

Seams: ``transport`` (:class:`~prunefleet.shared.transport.Transport`), ``clock``,
``sensors``, ``engine`` (ONNX Runtime or simulated inference) and ``telemetry_queue``
(on disk, or in memory for a simulated device) are injected; by default they are built
from the configuration.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np

from prunefleet.shared import __version__
from prunefleet.shared.clock import Clock, SystemClock
from prunefleet.shared.errors import ProtocolError, PrunefleetError
from prunefleet.shared.messages import (
    Command,
    CommandKind,
    Event,
    EventKind,
    Manifest,
    ReportedState,
    SignedManifest,
    decode,
)
from prunefleet.shared.policy import PolicyConfig
from prunefleet.shared.topics import Topics
from prunefleet.shared.transport import Inbound, Transport

from .build import device_transport, load_trusted_keys, make_config_sensors, serving_options
from .config import AgentConfig
from .downloader import Downloader
from .follower import ManifestFollower, Source
from .installer import Fetcher, Installer
from .reporting import Reporter
from .runtime import Engine, ModelPool, OnnxEngine, Served
from .sensors import Sensors
from .serving import RequestPath
from .store import VariantStore
from .systemd import Notifier
from .telemetry import Aggregator, DiskQueue, TelemetryQueue, TelemetrySender

log = logging.getLogger(__name__)

__all__ = ["Agent"]


class Agent:
    def __init__(self, config: AgentConfig, *, sensors: Sensors | None = None,
                 notifier: Notifier | None = None, transport: Transport | None = None,
                 clock: Clock | None = None, engine: Engine | None = None,
                 telemetry_queue: TelemetryQueue | None = None,
                 downloader: Fetcher | None = None,
                 agent_version: str = __version__) -> None:
        self.config = config
        self.device_id = config.device_id
        self.clock = clock or SystemClock()
        self.topics = Topics(config.fleet_prefix)
        self.state_dir = Path(config.state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.store = VariantStore(self.state_dir)
        self.engine = engine or OnnxEngine(config.intra_op_threads)
        self.pool = ModelPool(lambda spec: self.installer.load(spec),
                              max_loaded=config.max_loaded_variants, engine=self.engine)
        self.notifier = notifier or Notifier()
        self.follower = ManifestFollower(
            load_trusted_keys(config.trusted_keys), self.device_id, config.group,
            config.policy, {s: self.store.accepted_version(s) for s in ("device", "group")})
        self.sensors = sensors or make_config_sensors(config, self.clock)
        self.battery = getattr(self.sensors, "battery", None)
        self.agg = Aggregator(self.device_id, self.clock.time())
        self.tqueue = telemetry_queue or DiskQueue(self.state_dir / "telemetry",
                                                   config.telemetry_queue_max_batches)
        self.sender = TelemetrySender(self.tqueue, config.telemetry_max_in_flight)
        self.reporter = Reporter(self.device_id, config.group, agent_version)
        self.counters = self.reporter.counters
        self.serving = RequestPath(self.pool, self.agg, self.clock, serving_options(config),
                                   config.policy, self.sensors.read(), battery=self.battery,
                                   on_switch=lambda *_: self.reporter.mark())
        self.transport: Transport = transport or device_transport(config)
        self._desired: dict[str, Source] = {self.topics.desired(self.device_id): "device"}
        if config.group:
            self._desired[self.topics.group_desired(config.group)] = "group"
        self.downloader: Fetcher = downloader or Downloader(
            self.store, self.topics, lambda t: self.transport.subscribe(t, 1),
            self.transport.unsubscribe, window=config.download_window_chunks,
            chunk_timeout_s=config.chunk_timeout_s, max_chunk_failures=config.max_chunk_failures)
        self.installer = Installer(self.follower, self.store, self.pool, self.engine,
                                   self.downloader, self.reporter, self.serving, self._event,
                                   self._verifying)
        self.stopped = threading.Event()
        self._reload_requested = threading.Event()
        self.reload_source: Callable[[], AgentConfig] | None = None
        now = self.clock.monotonic()
        self._next = {"sensors": now, "tick": now, "telemetry": now + config.telemetry_interval_s}
        self._goodbye: int | None = None
        self.installer.load_installed()
        self.installer.restore(self.clock.time(), now)

    # -- request path (any thread) ---------------------------------------------------------
    def predict(self, x: np.ndarray, label: int | None = None) -> Served:
        """Serve one request (N inputs) on the variant the policy picks; thread-safe."""
        return self.serving.predict(x, label)

    @property
    def active_variant(self) -> str | None:
        return self.serving.active

    @property
    def policy(self) -> PolicyConfig:
        return self.serving.policy

    @property
    def manifest(self) -> Manifest | None:
        """The desired state followed now."""
        return self.follower.manifest

    # -- life cycle ------------------------------------------------------------------------
    def start(self) -> None:
        for topic in (*self._desired, self.topics.commands(self.device_id)):
            self.transport.subscribe(topic, 1)
        self.transport.start()

    def stop(self) -> None:
        self.stopped.set()

    def request_reload(self) -> None:
        """Re-read the policy settings and trusted keys (SIGHUP); done on the loop thread."""
        self._reload_requested.set()

    def run(self, until: threading.Event | None = None, on_stop=None) -> None:
        """Serve until :meth:`stop` (or ``until``), then drain (see :func:`.daemon.serve`)."""
        from .daemon import serve

        serve(self, until, on_stop)

    def step(self, wait_s: float = 0.0) -> None:
        """One pass of the loop: act on what arrived (waiting up to ``wait_s`` for it),
        then on every timer that is due."""
        self._drain(wait_s)
        now, due = self.clock.monotonic(), self._next
        if now >= due["sensors"]:
            due["sensors"] = now + self.config.sensor_interval_s
            self.serving.update(readings=self.sensors.read())
            self._memory_pressure()
        if self.pool.wanted:
            self.pool.load_wanted()
        if self._reload_requested.is_set():
            self._reload_requested.clear()
            self._reload()
        if now >= due["tick"]:
            due["tick"] = now + 1.0
            self.installer.tick(now)
        if now >= due["telemetry"]:
            due["telemetry"] = now + self.config.telemetry_interval_s
            self.cut_telemetry()
        connected = self.transport.connected.is_set()
        self.sender.pump(self._publish_telemetry, connected)
        if connected and self.reporter.due(self._problem_count(), now):
            self._publish_reported()

    def begin_shutdown(self) -> None:
        self.notifier.stopping()
        self.cut_telemetry()

    def flush_step(self) -> bool:
        """Send queued telemetry; True while some is left and the broker is reachable."""
        connected = self.transport.connected.is_set()
        self.sender.pump(self._publish_telemetry, connected)
        return connected and bool(self.tqueue.pending())

    def say_goodbye(self) -> None:
        """Publish the reported state ``online=false`` (a clean stop: no Last Will)."""
        if self.transport.connected.is_set():
            self._goodbye = self._publish(self.topics.reported(self.device_id),
                                          self.reported_state(online=False).encode(), retain=True)

    def goodbye_acknowledged(self) -> bool:
        return self._goodbye is None

    def step_inbound(self, wait_s: float = 0.0) -> None:
        """Act on what arrived, waiting up to ``wait_s`` for the first item."""
        self._drain(wait_s)

    def _drain(self, wait_s: float) -> None:
        q = self.transport.inbound
        try:
            item = q.get(timeout=wait_s) if wait_s > 0 else q.get_nowait()
        except queue.Empty:
            return
        while True:
            self._handle(item)
            try:
                item = q.get_nowait()
            except queue.Empty:
                return

    def _handle(self, item: Inbound) -> None:
        if item.kind == "published":
            self.sender.acked(item.mid)
            if item.mid == self._goodbye:
                self._goodbye = None
        elif item.kind == "connected":
            log.info("connected to %s", self.transport.address.url)
            self.reporter.mark()
        elif item.kind == "disconnected":
            log.warning("disconnected from broker %s", self.transport.address.url)
            self.sender.disconnected()
        elif item.kind == "message":
            try:
                self._on_message(item)
            except ProtocolError as e:
                self.counters.invalid_messages += 1
                log.warning("dropped invalid message on %s: %s", item.topic, e)
            except (PrunefleetError, OSError, ValueError, RecursionError, MemoryError) as e:
                # A retained message that trips an error would otherwise crash the agent
                # again at every restart: count it, keep serving.
                self.counters.invalid_messages += 1
                log.exception("message on %s could not be handled: %s", item.topic, e)

    def _on_message(self, item: Inbound) -> None:
        source = self._desired.get(item.topic)
        if source is not None:
            if item.payload:  # an empty retained message clears the state: nothing to do
                self.installer.offer(decode(SignedManifest, item.payload), source,
                                     self.clock.time(), self.clock.monotonic())
        elif item.topic == self.topics.commands(self.device_id):
            cmd = decode(Command, item.payload)
            pin = cmd.variant if cmd.kind is CommandKind.PIN else None
            if cmd.kind in (CommandKind.PIN, CommandKind.UNPIN):
                self.serving.update(pinned=pin)
            self.reporter.mark()
        else:
            self.installer.on_chunk(item.topic, item.payload, self.clock.monotonic())

    # -- local state -----------------------------------------------------------------------
    def _reload(self) -> None:
        if self.reload_source is None:
            return
        try:
            fresh = self.reload_source()
            keys = load_trusted_keys(fresh.trusted_keys)
            policy = self.follower.set_base_policy(fresh.policy)
        except (PrunefleetError, ValueError) as e:
            log.error("reload failed, keeping the current settings: %s", e)
            self.notifier.status(f"reload failed: {e}"[:200])
            return
        self.follower.trusted = keys
        self.config = self.config.model_copy(update={
            "policy": fresh.policy, "energy": fresh.energy, "cascade": fresh.cascade,
            "trusted_keys": fresh.trusted_keys})
        self.serving.set_options(serving_options(self.config))
        self.serving.update(policy=policy)
        msg = f"policy reloaded, {len(keys.keyids)} trusted key(s)"
        log.info(msg)
        self.notifier.status(msg)

    def _memory_pressure(self) -> None:
        """Under memory pressure keep only the active variant's session loaded."""
        free = self.serving.readings.mem_available_percent
        if free is not None and free < self.serving.policy.mem_low_percent:
            active = self.serving.active
            dropped = self.pool.shrink_to(1, keep={active} if active else set())
            if dropped:
                log.warning("memory low (%.0f%% free): unloaded %s", free, ", ".join(dropped))

    # -- outbound (loop thread only) -------------------------------------------------------
    def _publish(self, topic: str, payload: bytes, retain: bool = False) -> int:
        return self.transport.publish(topic, payload, qos=1, retain=retain)

    def _publish_telemetry(self, data: bytes) -> int:
        return self._publish(self.topics.telemetry(self.device_id), data)

    def reported_state(self, online: bool = True) -> ReportedState:
        """What the device reports now (retained on the broker when published)."""
        m = self.follower.manifest
        return self.reporter.build(
            online=online, ts=self.clock.time(), manifest_version=m.version if m else None,
            active=self.serving.active, installed=self.store.installed(),
            downloading=self.downloader.progress(),
            rollout=self.installer.rollout(self.serving.active),
            extra_counters={"rejected_chunks": self.downloader.rejected_chunks,
                            "inbound_dropped": self.transport.dropped_inbound,
                            "telemetry_dropped": self.tqueue.dropped_total})

    def _problem_count(self) -> int:
        c = self.counters
        return (c.invalid_messages + c.rejected_manifests + c.install_failures
                + self.downloader.rejected_chunks + self.transport.dropped_inbound
                + self.tqueue.dropped_total)

    def _verifying(self) -> None:
        if self.transport.connected.is_set():
            self._publish_reported()

    def _publish_reported(self) -> None:
        self._publish(self.topics.reported(self.device_id), self.reported_state().encode(),
                      retain=True)
        self.reporter.sent(self._problem_count(), self.clock.monotonic())

    def _event(self, kind: EventKind, variant: str | None, detail: str) -> None:
        ev = Event(device_id=self.device_id, ts=self.clock.time(), kind=kind,
                   variant=variant, detail=detail[:2048])
        self._publish(self.topics.events(self.device_id), ev.encode())

    def cut_telemetry(self) -> None:
        batch = self.agg.cut(self.tqueue.next_seq(), self.clock.time(),
                             self.serving.readings, self.serving.active,
                             self.tqueue.take_dropped())
        self.tqueue.put(batch)
