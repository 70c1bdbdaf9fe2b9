"""The agent: a coordinator of its parts, and the one place that talks to the broker.

The decisions live elsewhere and do no I/O: which desired state to follow and what it
takes (:mod:`.follower`), which variant serves a request (:mod:`.policy`, wrapped for
threads by :mod:`.serving`), the rollout phase (:mod:`.phase`), telemetry batches
(:mod:`.telemetry`). This class feeds them and applies what they say.

Threads: the transport's network thread only enqueues; request threads call
:meth:`Agent.predict`; one loop thread (:meth:`run`, or whoever calls :meth:`step`, as
the simulator's workers do) drains the inbound queue, installs, reads sensors, cuts and
sends telemetry and publishes the reported state. It alone publishes. The profiler
(:mod:`.profile`) measures installed variants in a thread of its own, at low priority and
out of the way of requests; the loop thread collects its results.

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
    DeviceFacts,
    Event,
    EventKind,
    Manifest,
    ReportedState,
    SignedManifest,
    TelemetryAck,
    VariantProfile,
    decode,
)
from prunefleet.shared.policy import PolicyConfig
from prunefleet.shared.topics import Topics
from prunefleet.shared.transport import Inbound, Transport

from .build import (
    device_facts,
    device_transport,
    energy_meter,
    load_trusted_keys,
    make_config_sensors,
    serving_options,
)
from .config import AgentConfig
from .devicefacts import active_power_w
from .downloader import Downloader
from .follower import ManifestFollower, Source
from .installer import Fetcher, Installer
from .profile import Profiler, ProfileStore, profile_key
from .reporting import Reporter
from .runtime import Engine, LoadedVariant, ModelPool, OnnxEngine, Served
from .sensors import Sensors
from .serving import RequestPath
from .shadow import ShadowEvaluator, ShadowOptions
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
                 agent_version: str = __version__, facts: DeviceFacts | None = None) -> None:
        """``facts``: what the device is (default: read from this machine, see
        :mod:`.devicefacts`); the simulator passes simulated ones."""
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
            config.policy, {s: self.store.accepted_version(s) for s in ("device", "group")},
            revoked=self.store.revoked_keyids(), max_version_jump=config.max_version_jump)
        self.sensors = sensors or make_config_sensors(config, self.clock)
        self.battery = getattr(self.sensors, "battery", None)
        self.agg = Aggregator(self.device_id, self.clock.time())
        self.tqueue = telemetry_queue or DiskQueue(self.state_dir / "telemetry",
                                                   config.telemetry_queue_max_batches)
        self.sender = TelemetrySender(self.tqueue, config.telemetry_max_in_flight,
                                      config.telemetry_ack_timeout_s)
        self.reporter = Reporter(self.device_id, config.group, agent_version)
        self.counters = self.reporter.counters
        self.facts = facts or device_facts(config)
        self._facts_due = True  # in the first reported state after each connection
        self._will_version: int | None = None  # the manifest version the Last Will names
        power = self._active_power_w(config)
        self.serving = RequestPath(self.pool, self.agg, self.clock,
                                   serving_options(config, power),
                                   config.policy, self.sensors.read(), battery=self.battery,
                                   on_switch=lambda *_: self.reporter.mark())
        sc = config.shadow
        self.shadow = ShadowEvaluator(self.pool, ShadowOptions(
            queue_max=sc.queue_max, cpu_share=sc.cpu_budget_percent / 100, nice=sc.nice),
            activity=self.serving.activity)
        if sc.enabled:
            self.serving.shadow = self.shadow
        self._shadow_seen: tuple[int, object] | None = None  # (manifest version, its shadow)
        self._served_before: str | None = None  # the variant served before evaluation began
        meter = energy_meter(config)
        self.profiles: dict[str, VariantProfile] = {}
        self.profiler = Profiler(
            self.engine, self.engine.infer, config.profile, ProfileStore(self.state_dir),
            key=profile_key(threads=config.intra_op_threads,
                            ort_version=self.facts.ort_version,
                            device_class=self.facts.device_class,
                            energy=meter.source if meter else "cpu_time_estimate",
                            active_power_w=power),
            threads=config.intra_op_threads, active_power_w=power, meter=meter,
            activity=self.serving.activity, wall=self.clock.time)
        self._profile_requests: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._profiled_pool_version = -1
        # The highest re-profile request of a desired state acted on (kept across restarts).
        self._reprofiled = self.store.reprofile_epoch()
        self._reprofile_unsaved = 0  # asked for, not yet measured: saved once measured
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
                                   self._verifying, on_loaded=self._profile_loaded)
        self.stopped = threading.Event()
        self._reload_requested = threading.Event()
        self.reload_source: Callable[[], AgentConfig] | None = None
        now = self.clock.monotonic()
        self._next = {"sensors": now, "tick": now, "telemetry": now + config.telemetry_interval_s}
        self._goodbye = False  # the offline report is published: wait for its PUBACK
        self._acks_heard = 0  # the transport's acks when the broker was last heard from
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
        # Desired states only: no unsigned command can change what the agent does. The
        # server's telemetry cursor only lets it delete batches the server stored.
        for topic in self._desired:
            self.transport.subscribe(topic, 1)
        self.transport.subscribe(self.topics.acked(self.device_id), 1)
        log.info("device %s: connecting to the broker %s", self.device_id,
                 self.transport.address.url)
        self.transport.start()

    def stop(self) -> None:
        self.stopped.set()

    def request_reload(self) -> None:
        """Re-read the policy, cascade and energy settings and the trusted keys (SIGHUP);
        done on the loop thread. Everything else in the configuration needs a restart."""
        self._reload_requested.set()

    def run(self, until: threading.Event | None = None, on_stop=None) -> None:
        """Serve until :meth:`stop` (or ``until``), then drain (see :func:`.daemon.serve`)."""
        from .daemon import serve

        serve(self, until, on_stop)

    def step(self, wait_s: float = 0.0) -> None:
        """One pass of the loop: act on what arrived (waiting up to ``wait_s`` for it),
        then on every timer that is due."""
        self._drain(wait_s)
        self._follow_shadow()
        self._follow_reprofile()
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
        self._collect_profiles()
        self._save_reprofile()
        if now >= due["telemetry"]:
            due["telemetry"] = now + self.config.telemetry_interval_s
            self.cut_telemetry()
        connected = self.transport.connected.is_set()
        self.sender.pump(self._publish_telemetry, connected, now)
        if connected and self.reporter.due(self._problem_count(), now):
            self._publish_reported()

    def begin_shutdown(self) -> None:
        self.notifier.stopping()
        self.profiler.close()
        self.shadow.close()
        self.cut_telemetry()

    def flush_step(self) -> bool:
        """Send queued telemetry; True while some is not yet confirmed stored and the broker
        is reachable."""
        connected = self.transport.connected.is_set()
        self.sender.pump(self._publish_telemetry, connected, self.clock.monotonic())
        return connected and bool(self.tqueue.pending())

    def say_goodbye(self) -> None:
        """Publish the reported state ``online=false`` (a clean stop: no Last Will)."""
        if self.transport.connected.is_set():
            self._publish(self.topics.reported(self.device_id),
                          self.reported_state(online=False).encode(), retain=True)
            self._goodbye = True

    def goodbye_acknowledged(self) -> bool:
        """The offline report, if one was published, is acknowledged: nothing this agent
        published waits for the broker any more (the goodbye is its last publish)."""
        return not self._goodbye or not self.transport.unacknowledged()

    def step_inbound(self, wait_s: float = 0.0) -> None:
        """Act on what arrived, waiting up to ``wait_s`` for the first item."""
        self._drain(wait_s)

    def _drain(self, wait_s: float) -> None:
        q = self.transport.inbound
        try:
            item = q.get(timeout=wait_s) if wait_s > 0 else q.get_nowait()
        except queue.Empty:
            item = None
        while item is not None:
            self._handle(item)
            try:
                item = q.get_nowait()
            except queue.Empty:
                item = None
        acks = self.transport.acks
        if acks != self._acks_heard:  # PUBACKs came: the broker answers, the link is alive
            self._acks_heard = acks
            self.downloader.heard(self.clock.monotonic())

    def _handle(self, item: Inbound) -> None:
        if item.kind != "disconnected":
            self.downloader.heard(self.clock.monotonic())  # the broker answers: link alive
        if item.kind == "connected":
            log.info("connected to %s", self.transport.address.url)
            self._facts_due = True
            self.reporter.mark()
        elif item.kind == "disconnected":
            log.warning("disconnected from broker %s", self.transport.address.url)
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
        elif item.topic == self.topics.acked(self.device_id):
            if item.payload:
                ack = decode(TelemetryAck, item.payload)
                if ack.device_id == self.device_id:
                    self.sender.confirmed(ack.incarnation, ack.stored_through)
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
        keys_changed = set(keys.keyids) != set(self.follower.trusted.keyids)
        self.follower.set_trusted(keys)
        if keys_changed:
            # Subscribing again makes the broker resend the retained desired states: one
            # refused for a key pinned only now is taken without waiting for the next.
            for topic in self._desired:
                self.transport.subscribe(topic, 1)
        self.config = self.config.model_copy(update={
            "policy": fresh.policy, "energy": fresh.energy, "cascade": fresh.cascade,
            "trusted_keys": fresh.trusted_keys})
        self.serving.set_options(serving_options(self.config, self._active_power_w(self.config)))
        self.serving.update(policy=policy)
        msg = f"policy reloaded, {len(self.follower.trusted.keyids)} trusted key(s)"
        log.info(msg)
        self.notifier.status(msg)

    # -- on-device profiles ----------------------------------------------------------------
    def request_profile(self, variant: str | None = None) -> None:
        """Measure ``variant`` (every installed one when None) again; any thread."""
        self._profile_requests.put(variant)

    def _follow_reprofile(self) -> None:
        """Profile every installed variant again when the followed desired state asks: its
        ``reprofile`` epoch is above the highest acted on. That one is kept in the state
        directory once every variant is measured, so a restart does not measure again (and
        a restart mid-way measures again). Loop thread."""
        m = self.follower.manifest
        epoch = m.reprofile if m is not None else 0
        if epoch <= self._reprofiled:
            return
        self._reprofiled = self._reprofile_unsaved = epoch
        log.info("desired state v%d asks for new profiles (re-profile %d): measuring "
                 "every installed variant again", m.version if m else 0, epoch)
        self.request_profile()

    def _save_reprofile(self) -> None:
        """Keep the re-profile epoch once its measurements are done. Loop thread."""
        if (self._reprofile_unsaved and self._profile_requests.empty()
                and not self.profiler.busy):
            self.store.set_reprofile_epoch(self._reprofile_unsaved)
            self._reprofile_unsaved = 0

    def _active_power_w(self, config: AgentConfig) -> float:
        """Watts a busy core adds: configured, else per class, else the facts' figure."""
        e, f = config.energy, self.facts
        if e.active_power_w is None and f.device_class not in e.class_active_power_w \
                and f.active_power_w is not None:
            return f.active_power_w
        return active_power_w(f.arch, f.device_class, e.active_power_w, e.class_active_power_w)

    def _profile_loaded(self, lv: LoadedVariant, memory_mb: float | None) -> None:
        self.profiler.want(lv, memory_mb)

    def _collect_profiles(self) -> None:
        """Take finished profiles (and requests for new ones); drop those of variants no
        longer installed. Loop thread."""
        while True:
            try:
                name = self._profile_requests.get_nowait()
            except queue.Empty:
                break
            table = self.pool.table
            for n, spec in list(self.pool.specs.items()):
                if name is not None and n != name:
                    continue
                lv = table.get(n)
                if lv is None:  # unloaded (max_loaded_variants): a session for the profiler
                    try:
                        lv = self.installer.load(spec)
                    except Exception as e:  # it serves as before; the next start loads it
                        log.error("cannot load %s to profile it: %s", n, e)
                        continue
                old = self.profiles.get(n)
                self.profiler.want(lv, old.memory_mb if old else None, force=True)
        changed = False
        for name, prof in self.profiler.take():
            spec = self.pool.specs.get(name)
            if spec is None or spec.sha256 != prof.sha256 or self.profiles.get(name) == prof:
                continue
            self.profiles[name] = prof
            if self.profiler.stored(spec) != prof:
                self.profiler.store.put(prof, self.profiler.key)
            changed = True
        if self._profiled_pool_version != self.pool.version:
            self._profiled_pool_version = self.pool.version
            specs = self.pool.specs
            gone = [n for n, p in self.profiles.items()
                    if n not in specs or specs[n].sha256 != p.sha256]
            for n in gone:
                del self.profiles[n]
            changed = changed or bool(gone)
            self.profiler.store.retain({s.sha256 for s in self.store.installed().values()})
        if changed:
            self.serving.set_profiles(self.profiles)
            self.shadow.set_profiles(self.profiles)
            self.reporter.mark()

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

    def reported_state(self, online: bool = True, with_facts: bool = False) -> ReportedState:
        """What the device reports now (retained on the broker when published); its facts
        too with ``with_facts``."""
        m = self.follower.manifest
        return self.reporter.build(
            online=online, ts=self.clock.time(), manifest_version=m.version if m else None,
            active=self.serving.active, installed=self.store.installed(),
            downloading=self.downloader.progress(),
            rollout=self.installer.rollout(self.serving.active),
            extra_counters={"rejected_chunks": self.downloader.rejected_chunks,
                            "repeated_chunks": self.downloader.repeated_chunks,
                            "inbound_dropped": self.transport.dropped_inbound,
                            "subscribe_refused": self.transport.subscribe_refused,
                            "load_failures": self.pool.load_failures,
                            "telemetry_dropped": self.tqueue.dropped_total,
                            **self._telemetry_counters()},
            facts=self.facts if with_facts else None, profiles=self.profiles,
            version_proof=self.follower.proof if m else ())

    def _problem_count(self) -> int:
        c = self.counters
        return (c.invalid_messages + c.rejected_manifests + c.install_failures
                + self.downloader.rejected_chunks + self.transport.dropped_inbound
                + self.transport.subscribe_refused + self.pool.load_failures
                + self.tqueue.dropped_total + self.sender.resent_total)

    def _verifying(self) -> None:
        if self.transport.connected.is_set():
            self._publish_reported()

    def _publish_reported(self) -> None:
        # Read before building: what changes meanwhile (a request thread's switch) is
        # reported by the next one.
        marks, problems = self.reporter.marks, self._problem_count()
        state = self.reported_state(with_facts=self._facts_due)
        self._publish(self.topics.reported(self.device_id), state.encode(), retain=True)
        self._facts_due = False
        self.reporter.sent(problems, self.clock.monotonic(), marks)
        if state.manifest_version != self._will_version:
            # The Last Will says which version the device accepted too: a server on a
            # restored store then signs above it while the device is away.
            self._will_version = state.manifest_version
            self.transport.set_will(ReportedState(
                device_id=self.device_id, online=False,
                manifest_version=state.manifest_version,
                version_proof=state.version_proof).encode())

    def _event(self, kind: EventKind, variant: str | None, detail: str) -> None:
        ev = Event(device_id=self.device_id, ts=self.clock.time(), kind=kind,
                   variant=variant, detail=detail[:2048])
        self._publish(self.topics.events(self.device_id), ev.encode())

    def _telemetry_counters(self) -> dict[str, int]:
        """The telemetry queue as the reported state shows it (the server sums them)."""
        return {"telemetry_queued": len(self.tqueue.pending()),
                "telemetry_unconfirmed": self.sender.in_flight,
                "telemetry_resent": self.sender.resent_total,
                "telemetry_lag_s": int(self.sender.lag_s(self.clock.time()))}

    def cut_telemetry(self) -> None:
        seq = self.tqueue.next_seq()
        pending = self.tqueue.pending()
        batch = self.agg.cut(seq, self.clock.time(), self.serving.readings,
                             self.serving.active, self.tqueue.take_dropped(),
                             incarnation=self.tqueue.incarnation,
                             unconfirmed_from=pending[0] if pending else seq)
        report = self.shadow.cut()
        if report is not None:
            batch = batch.model_copy(update={"shadow": report})
        self.tqueue.put(batch)

    def _follow_shadow(self) -> None:
        """Evaluate what the followed manifest's ``shadow`` section names (loop thread)."""
        m = self.follower.manifest
        spec = m.shadow if m is not None and self.config.shadow.enabled else None
        if spec is not None and spec.until is not None and self.clock.time() > spec.until:
            spec = None  # the wave's observe window is over
        if not self.shadow.active:
            self._served_before = self.serving.active
        key = (m.version if m else 0, spec)
        if key == self._shadow_seen:
            return
        self._shadow_seen = key
        self.shadow.configure(spec, self._served_before)
        self.serving.set_evaluating(spec.variants if spec is not None else ())
        if spec is not None:
            self.shadow.start()
