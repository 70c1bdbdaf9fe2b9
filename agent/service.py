"""The agent's service loop: the one place that talks to the broker.

Threads:
- paho's network thread only enqueues (see ``transport``);
- callers of :meth:`Agent.predict` (the local API, the simulated app) run inference on
  the sessions the pool holds, and never wait for the loop;
- the loop thread (:meth:`Agent.run`) drains the inbound queue, verifies manifests,
  drives downloads and installs, reads sensors, cuts and sends telemetry, and publishes
  reported state. It alone publishes.
"""

from __future__ import annotations

import collections
import logging
import queue
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from prunefleet.shared import __version__
from prunefleet.shared.errors import ProtocolError, PrunefleetError, TrustError
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
    VariantSpec,
    decode,
)
from prunefleet.shared.signing import TrustedKeys, load_public_pem
from prunefleet.shared.topics import Topics

from .complexity import Ewma, estimate_complexity
from .config import AgentConfig
from .downloader import Completed, Downloader, Failed
from .errors import AgentConfigError, InstallError, NoVariantError
from .policy import PolicyConfig, PolicyState, VariantInfo, decide
from .runtime import ModelPool, Served, load_session
from .sensors import Readings, SimulatedBattery, make_sensors
from .store import VariantStore
from .systemd import Notifier
from .telemetry import Aggregator, DiskQueue, TelemetrySender
from .transport import BrokerAddress, Inbound, MqttTransport, TransportOptions

log = logging.getLogger(__name__)


@dataclass
class Counters:
    invalid_messages: int = 0
    rejected_manifests: int = 0
    installs: int = 0
    install_failures: int = 0


class Agent:
    def __init__(
        self,
        config: AgentConfig,
        *,
        sensors=None,
        notifier: Notifier | None = None,
    ):
        self.config = config
        self.device_id = config.device_id
        self.topics = Topics(config.fleet_prefix)
        self.state_dir = Path(config.state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.store = VariantStore(self.state_dir)
        self.pool = ModelPool(
            lambda spec: load_session(self.store.path_of(spec.sha256), spec,
                                      config.intra_op_threads),
            max_loaded=config.max_loaded_variants,
        )
        self.counters = Counters()
        self.notifier = notifier or Notifier()
        self.trusted = self._load_keys()
        if sensors is None:
            sensors = make_sensors(config.sensors.kind, **self._sensor_params())
        self.sensors = sensors
        self.battery: SimulatedBattery | None = getattr(sensors, "battery", None)
        self._readings: Readings = sensors.read()

        self._policy_lock = threading.Lock()
        self._policy_state: PolicyState | None = None
        self._active: str | None = None
        self._pinned: str | None = None
        self._ewma = Ewma(config.complexity_ewma_alpha)
        self._policy_cfg: PolicyConfig = config.policy
        self._eval_interval_s = config.policy_eval_interval_s
        self._estimate_interval_s = config.complexity_min_interval_s
        self._last_estimate = -1e9
        self._last_decision: tuple | None = None
        self._reload_requested = threading.Event()
        self._latencies: collections.deque[float] = collections.deque(maxlen=64)
        self._table_infos: tuple[int, list[VariantInfo]] = (0, [])

        now = time.time()
        self.agg = Aggregator(self.device_id, now)
        self.tqueue = DiskQueue(self.state_dir / "telemetry", config.telemetry_queue_max_batches)
        self.sender = TelemetrySender(self.tqueue, config.telemetry_max_in_flight)

        desired = [self.topics.desired(self.device_id)]
        if config.group:
            desired.append(self.topics.group_desired(config.group))
        self._desired_topics = set(desired)
        self.transport = MqttTransport(
            BrokerAddress.parse(config.broker_url),
            TransportOptions(
                client_id=f"pf-agent-{self.device_id}",
                keepalive_s=config.keepalive_s,
                reconnect_min_s=config.reconnect_min_s,
                reconnect_max_s=config.reconnect_max_s,
                ca_file=config.ca_file,
                cert_file=config.cert_file,
                key_file=config.key_file,
                will_topic=self.topics.reported(self.device_id),
                will_payload=ReportedState(device_id=self.device_id, online=False).encode(),
                subscriptions={
                    **{t: 1 for t in desired},
                    self.topics.commands(self.device_id): 1,
                },
            ),
        )
        self.downloader = Downloader(
            self.store,
            self.topics,
            lambda t: self.transport.subscribe(t, 1),
            self.transport.unsubscribe,
            window=config.download_window_chunks,
            chunk_timeout_s=config.chunk_timeout_s,
            max_chunk_failures=config.max_chunk_failures,
        )
        self._manifest: Manifest | None = None
        self._verifying: str | None = None
        self._failed: set[str] = set()
        self._last_error: str | None = None
        self._reported_dirty = True
        self._reported_problems = 0
        self._reported_at = 0.0
        self._stop = threading.Event()
        self.reload_source: Callable[[], AgentConfig] | None = None
        self._load_installed()
        self._restore_manifest()

    # -- setup --------------------------------------------------------------------------
    def _sensor_params(self) -> dict:
        s = self.config.sensors
        if s.kind == "system":
            return {"sysfs_root": s.sysfs_root}
        return {
            "capacity_j": s.battery_capacity_j,
            "initial_percent": s.battery_initial_percent,
            "idle_drain_w": s.idle_drain_w,
            "cpu_percent": s.cpu_percent,
            "mem_available_percent": s.mem_available_percent,
            "temperature_c": s.temperature_c,
            "charging": s.charging,
        }

    def _load_keys(self) -> TrustedKeys:
        keys = []
        for p in self.config.trusted_keys:
            try:
                keys.append(load_public_pem(Path(p).read_bytes()))
            except FileNotFoundError as e:
                raise AgentConfigError(f"trusted key not found: {p}") from e
        if not keys:
            raise AgentConfigError("no trusted_keys configured: the agent would trust nothing")
        return TrustedKeys(keys)

    def _load_installed(self) -> None:
        for name, spec in self.store.installed().items():
            try:
                self.pool.put(
                    load_session(self.store.path_of(spec.sha256), spec,
                                 self.config.intra_op_threads)
                )
            except InstallError as e:
                log.error("installed variant %s no longer loads: %s", name, e)
                self.store.forget(name)

    # -- request path (any thread) -------------------------------------------------------
    def predict(self, x: np.ndarray, label: int | None = None) -> Served:
        """Serve one request (N inputs) on the variant the policy picks; thread-safe."""
        cas = self.config.cascade
        if cas.enabled and len(self.pool.specs) > 1:
            served, used = self._predict_cascade(x, cas.confidence)
        else:
            served = self.pool.run(x, self._choose)
            used = [served.variant]
        self._latencies.append(served.latency_ms)
        correct = None if label is None else bool(served.label == int(label))
        self.agg.record_request(served.variant, served.latency_ms, True, correct)
        e = self.config.energy
        joules = 0.0
        for name in used:
            spec = self.pool.specs.get(name)
            if spec is not None:
                joules += (e.base_j + e.joules_per_mac * spec.macs) * served.logits.shape[0]
        self.agg.record_energy(joules)
        if self.battery is not None:
            self.battery.consume(joules)
        return served

    def _predict_cascade(self, x: np.ndarray, threshold: float) -> tuple[Served, list[str]]:
        """Run the cheapest variant; escalate when it is unsure and the budget allows.

        The budget (the largest variant the policy allows now) is decided as for a hard
        input; the first stage is the cheapest installed variant. A batch escalates when
        any of its inputs has a top-class probability below ``threshold``.
        """
        specs = self.pool.specs
        if not specs or not self.pool.table:
            raise NoVariantError("no variant installed yet")
        x = self.pool.check_input(x, next(iter(specs.values())))
        budget, _ = self._choose(x, specs, complexity=1.0)
        first = self.pool.resolve(self._infos(specs)[0].name)
        y, ms = self.pool.infer(first, x)
        top = self.pool.resolve(budget)
        if top.name == first.name or _min_confidence(y) >= threshold:
            return Served(first.name, Reason.COMPLEXITY_LOW, y, ms), [first.name]
        y2, ms2 = self.pool.infer(top, x)
        return Served(top.name, Reason.CASCADE, y2, ms + ms2), [first.name, top.name]

    def _infos(self, specs: dict[str, VariantSpec]) -> list[VariantInfo]:
        key, infos = self._table_infos
        if key != id(specs):
            infos = sorted(
                (VariantInfo(s.name, s.macs, s.accuracy, s.latency_ms) for s in specs.values()),
                key=lambda v: (v.macs, v.name),
            )
            self._table_infos = (id(specs), infos)
        return infos

    def _choose(
        self, x: np.ndarray, specs: dict[str, VariantSpec], complexity: float | None = None
    ) -> tuple[str, Reason]:
        now = time.monotonic()
        if complexity is None:
            # The smoothed complexity follows the stream, not one input: under heavy load
            # it is sampled (at most one estimate per ``complexity_min_interval_s``).
            if now - self._last_estimate >= self._estimate_interval_s or self._ewma.value is None:
                self._last_estimate = now
                complexity = self._ewma.update(estimate_complexity(x))
            else:
                complexity = self._ewma.value
        # The policy is a pure function of what changes slowly (readings every sensor
        # interval, pins, the table) and of the smoothed complexity: between changes of
        # the first, it is re-evaluated at most every ``policy_eval_interval_s``.
        key = (id(self._readings), self._pinned, id(specs), id(self._policy_cfg))
        last = self._last_decision
        if last is not None and last[0] == key and now - last[1] < self._eval_interval_s:
            return last[2], last[3]
        infos = self._infos(specs)
        # The recent latency matters only to a latency target (SLO).
        lat = None
        if self._policy_cfg.latency_slo_ms is not None and self._latencies:
            lat = statistics.median(self._latencies)
        with self._policy_lock:
            d = decide(
                self._readings, infos, complexity, lat, self._pinned, self._policy_state, now,
                self._policy_cfg,
            )
            self._policy_state = d.state
            if d.variant != self._active:
                self.agg.record_switch(time.time(), self._active, d.variant, d.reason)
                log.info("switch %s → %s (%s)", self._active, d.variant, d.reason.value)
                self._active = d.variant
                self._latencies.clear()  # the SLO check wants the new variant's latency
                self._reported_dirty = True
            self._last_decision = (key, now, d.variant, d.reason)
        return d.variant, d.reason

    @property
    def active_variant(self) -> str | None:
        return self._active

    # -- service loop -------------------------------------------------------------------
    def start(self) -> None:
        self.transport.start()

    def stop(self) -> None:
        self._stop.set()

    def request_reload(self) -> None:
        """Re-read the policy configuration (SIGHUP); done on the loop thread."""
        self._reload_requested.set()

    def _reload(self) -> None:
        if self.reload_source is None:
            return
        try:
            fresh = self.reload_source()
            policy = self._effective_policy(fresh.policy, self._manifest)
            with self._policy_lock:
                self._policy_cfg = policy
        except (PrunefleetError, ValueError) as e:
            log.error("reload failed, keeping the current policy: %s", e)
            self.notifier.status(f"reload failed: {e}"[:200])
            return
        self.config = self.config.model_copy(update={"policy": fresh.policy,
                                                     "energy": fresh.energy,
                                                     "cascade": fresh.cascade})
        log.info("policy reloaded")
        self.notifier.status("policy reloaded")

    @staticmethod
    def _effective_policy(base: PolicyConfig, manifest: Manifest | None) -> PolicyConfig:
        """The local policy config, overridden by the manifest's ``policy``."""
        if manifest is None or not manifest.policy:
            return base
        return PolicyConfig.model_validate({**base.model_dump(), **manifest.policy})

    @property
    def policy(self) -> PolicyConfig:
        return self._policy_cfg

    def _memory_pressure(self) -> None:
        """Under memory pressure keep only the active variant's session loaded."""
        free = self._readings.mem_available_percent
        if free is not None and free < self._policy_cfg.mem_low_percent:
            keep = {self._active} if self._active else set()
            dropped = self.pool.shrink_to(1, keep=keep)
            if dropped:
                log.warning("memory low (%.0f%% free): unloaded %s", free, ", ".join(dropped))

    def run(self, until: threading.Event | None = None, on_stop=None) -> None:
        """Serve until :meth:`stop` (or ``until``) is set; then flush and disconnect.

        ``on_stop`` runs first on the way out (stop request sources), so what they served
        lands in the last telemetry batch.
        """
        cfg = self.config
        api = None
        if cfg.api_socket is not None:
            from .api import ApiServer

            api = ApiServer.for_agent(
                self, cfg.api_socket,
                max_request_bytes=cfg.api_max_request_bytes, max_batch=cfg.api_max_batch,
                max_connections=cfg.api_max_connections,
                idle_timeout_s=cfg.api_idle_timeout_s, io_timeout_s=cfg.api_io_timeout_s,
            )
            api.start()
        self.start()
        self.notifier.ready(f"device {self.device_id}")
        next_sensor = next_telemetry = next_tick = time.monotonic()
        next_telemetry += cfg.telemetry_interval_s
        wd = self.notifier.watchdog_s
        next_wd = time.monotonic()
        while not self._stop.is_set() and not (until is not None and until.is_set()):
            try:
                self._drain(timeout=0.1)
                now = time.monotonic()
                if now >= next_sensor:
                    self._readings = self.sensors.read()
                    next_sensor = now + cfg.sensor_interval_s
                    self._memory_pressure()
                if self.pool.wanted:
                    self.pool.load_wanted()
                if self._reload_requested.is_set():
                    self._reload_requested.clear()
                    self._reload()
                if now >= next_tick:
                    self.downloader.tick(now)
                    if self.downloader.active():
                        self._reported_dirty = True  # progress
                    elif (self._problem_count() != self._reported_problems
                          and now - self._reported_at >= 10.0):
                        self._reported_dirty = True  # new drops or refusals, rate-limited
                    next_tick = now + 1.0
                if now >= next_telemetry:
                    self._cut_telemetry()
                    next_telemetry = now + cfg.telemetry_interval_s
                self.sender.pump(self._publish_telemetry, self.transport.connected.is_set())
                if self._reported_dirty and self.transport.connected.is_set():
                    self._publish_reported()
            except (PrunefleetError, OSError) as e:
                # A broker that vanished mid-publish or a full disk must not stop serving;
                # the next pass retries (telemetry stays queued on disk).
                log.error("service loop: %s", e)
                self._stop.wait(0.5)
            now = time.monotonic()
            if wd and now >= next_wd:
                self.notifier.watchdog()
                next_wd = now + wd / 2
        # Stop the request sources first, so what they served is in the last batch.
        if api is not None:
            api.stop()
        if on_stop is not None:
            on_stop()
        self._shutdown()

    def _shutdown(self, flush_timeout_s: float = 5.0) -> None:
        self.notifier.stopping()
        self._cut_telemetry()
        deadline = time.monotonic() + flush_timeout_s
        while time.monotonic() < deadline and self.transport.connected.is_set():
            self.sender.pump(self._publish_telemetry, True)
            if not self.tqueue.pending():
                break
            self._drain(timeout=0.05)
        if self.transport.connected.is_set():
            self._publish(self.topics.reported(self.device_id),
                          self._reported(online=False).encode(), retain=True)
            self._drain(timeout=0.2)
        self.transport.stop()

    def _drain(self, timeout: float) -> None:
        try:
            item = self.transport.inbound.get(timeout=timeout)
        except queue.Empty:
            return
        while True:
            self._handle(item)
            try:
                item = self.transport.inbound.get_nowait()
            except queue.Empty:
                return

    def _handle(self, item: Inbound) -> None:
        if item.kind == "published":
            self.sender.acked(item.mid)
        elif item.kind == "connected":
            log.info("connected to %s", self.transport.address.url)
            self._reported_dirty = True
        elif item.kind == "disconnected":
            log.warning("disconnected from broker")
            self.sender.disconnected()
        elif item.kind == "message":
            try:
                self._on_message(item)
            except ProtocolError as e:
                self.counters.invalid_messages += 1
                log.warning("dropped invalid message on %s: %s", item.topic, e)
            except (PrunefleetError, OSError, ValueError) as e:
                # A retained message that trips an error would otherwise crash the agent
                # again at every restart: count it, keep serving.
                self.counters.invalid_messages += 1
                log.exception("message on %s could not be handled: %s", item.topic, e)

    def _on_message(self, item: Inbound) -> None:
        now = time.monotonic()
        if item.topic in self._desired_topics:
            if not item.payload:
                return  # retained state cleared
            source = "device" if item.topic == self.topics.desired(self.device_id) else "group"
            self._on_desired(decode(SignedManifest, item.payload), source)
        elif item.topic == self.topics.commands(self.device_id):
            self._on_command(decode(Command, item.payload))
        else:
            for result in self.downloader.handle(item.topic, item.payload, now):
                if isinstance(result, Completed):
                    self._install(result.spec)
                elif isinstance(result, Failed):
                    self._install_failed(result.spec, result.reason)

    # -- desired state ------------------------------------------------------------------
    def _on_desired(self, signed: SignedManifest, source: str = "device") -> None:
        """Verify a desired state from the device's or the group's topic; follow the newest.

        Each source has its own rollback floor, so a group's desired state older than the
        device's own is verified and then simply not followed (no false alarm), while a
        replay of either source's older manifest is refused.
        """
        want_target = self.device_id if source == "device" else self.config.group
        try:
            manifest = self.trusted.verify(
                signed, min_version=self.store.accepted_version(source), target=want_target
            )
            try:
                policy = self._effective_policy(self.config.policy, manifest)
            except ValueError as e:
                raise TrustError(f"manifest policy is invalid: {e}") from e
        except TrustError as e:
            self.counters.rejected_manifests += 1
            self._last_error = f"manifest rejected: {e}"
            self._event(EventKind.REJECTED, None, str(e))
            log.warning("rejected manifest: %s", e)
            return
        self.store.set_accepted_version(manifest.version, source)
        if self._manifest is not None and manifest.version <= self._manifest.version:
            return  # seen already, or older than the one followed (e.g. a group's)
        self._follow(manifest, policy, signed)

    def _follow(self, manifest: Manifest, policy: PolicyConfig, signed: SignedManifest) -> None:
        self.store.save_manifest(signed.encode())
        self._manifest = manifest
        with self._policy_lock:
            self._policy_cfg = policy
        self._failed.clear()
        self._pinned = manifest.pinned_variant
        log.info("following manifest v%d: %s", manifest.version,
                 ", ".join(v.name for v in manifest.variants))
        self._reconcile()

    def _restore_manifest(self) -> None:
        """After a restart, the manifest followed before (its signature checked again;
        an expired one still says which manifest is newest, it just is not reconciled)."""
        raw = self.store.load_manifest()
        if raw is None:
            return
        try:
            signed = decode(SignedManifest, raw)
            manifest = self.trusted.verify(signed, now=0.0)
            policy = self._effective_policy(self.config.policy, manifest)
        except (ProtocolError, TrustError, ValueError) as e:
            log.warning("ignoring the saved manifest: %s", e)
            return
        self._manifest = manifest
        with self._policy_lock:
            self._policy_cfg = policy
        self._pinned = manifest.pinned_variant
        if manifest.expires_at > time.time():
            self._reconcile()  # e.g. resume a download the restart interrupted

    def _reconcile(self) -> None:
        m = self._manifest
        if m is None:
            return
        now = time.monotonic()
        wanted = {v.sha256 for v in m.variants}
        self.downloader.cancel_except(wanted)
        for spec in m.variants:
            if spec.sha256 in self._failed:
                continue
            if self.store.has(spec) and self.pool.serving(spec):
                continue
            if self.store.have_blob(spec.sha256):
                self._install(spec)
            else:
                self._event(EventKind.DOWNLOAD_STARTED, spec.name, f"{spec.size} bytes")
                self.downloader.want(spec, now)
        self._retire()
        self._reported_dirty = True

    def _retire(self) -> None:
        """Drop variants the manifest no longer names, once one of its own serves."""
        m = self._manifest
        if m is None:
            return
        names = {v.name: v.sha256 for v in m.variants}
        serving_new = any(
            n in names and spec.sha256 == names[n] for n, spec in self.pool.specs.items()
        )
        if not serving_new:
            return  # keep the last known good variants serving
        for name, spec in list(self.pool.specs.items()):
            if names.get(name) != spec.sha256:
                self.pool.remove(name)
                self.store.forget(name)

    def _install(self, spec: VariantSpec) -> None:
        path = self.store.path_of(spec.sha256)
        self._verifying = spec.name
        if self.transport.connected.is_set():
            self._publish_reported()
        try:
            lv = load_session(path, spec, self.config.intra_op_threads)
        except InstallError as e:
            path.unlink(missing_ok=True)
            self._install_failed(spec, str(e))
            return
        finally:
            self._verifying = None
        self.store.record(spec)
        self.pool.put(lv)
        self.counters.installs += 1
        self._event(EventKind.INSTALLED, spec.name, spec.sha256)
        log.info("installed %s (%s…)", spec.name, spec.sha256[:12])
        self._retire()
        self._reported_dirty = True

    def _install_failed(self, spec: VariantSpec, why: str) -> None:
        self.counters.install_failures += 1
        self._failed.add(spec.sha256)
        self._last_error = f"{spec.name}: {why}"
        self._event(EventKind.INSTALL_FAILED, spec.name, why)
        log.error("install of %s failed: %s", spec.name, why)
        self._reported_dirty = True

    def _on_command(self, cmd: Command) -> None:
        if cmd.kind is CommandKind.PIN:
            self._pinned = cmd.variant
        elif cmd.kind is CommandKind.UNPIN:
            self._pinned = None
        self._reported_dirty = True

    # -- outbound (loop thread only) ----------------------------------------------------
    def _publish(self, topic: str, payload: bytes, retain: bool = False) -> int:
        return self.transport.publish(topic, payload, qos=1, retain=retain)

    def _publish_telemetry(self, data: bytes) -> int:
        return self._publish(self.topics.telemetry(self.device_id), data)

    def _reported(self, online: bool = True) -> ReportedState:
        installed = [
            InstalledVariant(name=n, sha256=s.sha256, size=s.size)
            for n, s in sorted(self.store.installed().items())
        ]
        return ReportedState(
            device_id=self.device_id,
            online=online,
            ts=time.time(),
            group=self.config.group,
            agent_version=__version__,
            manifest_version=self._manifest.version if self._manifest else None,
            active_variant=self._active,
            installed=installed,
            downloading=self.downloader.progress(),
            last_error=self._last_error,
            rollout=self._rollout_report(),
            counters={
                "invalid_messages": self.counters.invalid_messages,
                "rejected_manifests": self.counters.rejected_manifests,
                "install_failures": self.counters.install_failures,
                "rejected_chunks": self.downloader.rejected_chunks,
                "inbound_dropped": self.transport.dropped_inbound,
                "telemetry_dropped": self.tqueue.dropped_total,
            },
        )

    def _rollout_report(self) -> RolloutReport | None:
        """The phase of the current manifest on this device (what a rollout tracks)."""
        m = self._manifest
        if m is None:
            return None
        failed = [v for v in m.variants if v.sha256 in self._failed]
        if failed:
            return RolloutReport(manifest_version=m.version, phase=RolloutPhase.FAILED,
                                 reason=(self._last_error or "install failed")[:1024])
        ready = [v for v in m.variants if self.pool.serving(v)]
        if self._verifying is not None:
            phase = RolloutPhase.VERIFYING
        elif len(ready) == len(m.variants):
            active = self._active is not None and any(v.name == self._active for v in ready)
            phase = RolloutPhase.ACTIVE if active else RolloutPhase.INSTALLED
        elif self.downloader.active():
            phase = RolloutPhase.DOWNLOADING
        else:
            phase = RolloutPhase.OFFERED
        total = sum(v.size for v in m.variants)
        prog = self.downloader.progress()
        done = sum(v.size * (1.0 if v in ready else prog.get(v.name, 0.0)) for v in m.variants)
        return RolloutReport(manifest_version=m.version, phase=phase,
                             progress=round(min(1.0, done / total), 3))

    def _problem_count(self) -> int:
        c = self.counters
        return (c.invalid_messages + c.rejected_manifests + c.install_failures
                + self.downloader.rejected_chunks + self.transport.dropped_inbound
                + self.tqueue.dropped_total)

    def _publish_reported(self) -> None:
        self._publish(self.topics.reported(self.device_id), self._reported().encode(),
                      retain=True)
        self._reported_dirty = False
        self._reported_problems = self._problem_count()
        self._reported_at = time.monotonic()

    def _event(self, kind: EventKind, variant: str | None, detail: str) -> None:
        ev = Event(device_id=self.device_id, ts=time.time(), kind=kind, variant=variant,
                   detail=detail[:2048])
        self._publish(self.topics.events(self.device_id), ev.encode())

    def _cut_telemetry(self) -> None:
        batch = self.agg.cut(
            self.tqueue.next_seq(), time.time(), self._readings, self._active,
            self.tqueue.take_dropped(),
        )
        self.tqueue.put(batch)


__all__ = ["Agent"]


def _min_confidence(logits: np.ndarray) -> float:
    z = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    return float(p.max(axis=1).min())
