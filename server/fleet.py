"""The fleet server: registry of variants, distribution, desired state, telemetry ingest.

Artifacts are published once, as retained chunks per artifact digest; the broker fans
them out, so the server's bytes do not grow with the fleet. Desired state is a signed
manifest, retained per device or group. Ingest subscribes to every device's telemetry,
reported state and events (through a shared subscription when ``share_group`` is set, so
several servers can split the load) and writes them to the store; anything that does not
validate is logged, counted and dropped.
"""

from __future__ import annotations

import base64
import logging
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from prunefleet.shared.chunks import DEFAULT_CHUNK_BYTES, encode_frame, iter_chunks, plan
from prunefleet.shared.errors import ProtocolError
from prunefleet.shared.messages import (
    Event,
    Golden,
    Manifest,
    ReportedState,
    TelemetryBatch,
    VariantSpec,
    decode,
)
from prunefleet.shared.policy import PolicyConfig, apply_overrides
from prunefleet.shared.signing import SigningKey
from prunefleet.shared.topics import Topics
from prunefleet.shared.transport import BrokerAddress, Inbound, MqttTransport, TransportOptions

from .errors import DistributionError, StoreError
from .keys import KeyRing
from .store import Store

log = logging.getLogger(__name__)


@dataclass
class IngestCounters:
    telemetry: int = 0
    duplicates: int = 0
    reported: int = 0
    events: int = 0
    invalid: int = 0


def spec_from_file(
    path: Path,
    *,
    name: str,
    input_shape: list[int],
    num_classes: int,
    params: int,
    macs: int,
    accuracy: float | None = None,
    latency_ms: float | None = None,
    technique: str = "none",
    golden: Golden | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    compression: str = "zlib",
) -> VariantSpec:
    data = Path(path).read_bytes()
    p = plan(data, chunk_bytes)
    return VariantSpec(
        name=name, sha256=p.sha256, size=p.size, chunk_bytes=chunk_bytes,
        chunk_sha256=list(p.chunk_sha256), compression=compression,
        input_shape=list(input_shape), num_classes=num_classes, params=params, macs=macs,
        accuracy=accuracy, latency_ms=latency_ms, technique=technique, golden=golden,
    )


class FleetServer:
    def __init__(
        self,
        broker_url: str,
        store: Store,
        key: SigningKey | KeyRing,
        *,
        prefix: str = "prunefleet",
        client_id: str = "pf-server",
        share_group: str | None = None,
        manifest_ttl_s: float = 7 * 24 * 3600,
        persistent_session: bool = True,
    ):
        """``persistent_session`` keeps the ingest subscription at the broker while this
        server is away (MQTT clean session off, stable ``client_id``), so telemetry that
        agents publish meanwhile is queued, not lost. Give each server its own id."""
        self.store = store
        # A KeyRing signs with the previous key too while a rotation is in progress.
        self.key = key
        self.topics = Topics(prefix)
        self.manifest_ttl_s = manifest_ttl_s
        self.counters = IngestCounters()
        self.bytes_published = 0
        subs = {}
        for ch in ("telemetry", "reported", "events"):
            f = self.topics.all_devices(ch)
            subs[self.topics.shared(share_group, f) if share_group else f] = 1
        self.transport = MqttTransport(
            BrokerAddress.parse(broker_url),
            TransportOptions(client_id=client_id, subscriptions=subs, inbound_queue_size=10000,
                             max_inflight_messages=100,
                             clean_session=not persistent_session),
        )
        self._publish_lock = threading.Lock()
        self._deploy_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._published_artifacts: set[str] = set()

    # -- lifecycle ----------------------------------------------------------------------
    def start(self, timeout_s: float = 15.0) -> None:
        self.transport.start()
        if not self.transport.wait_connected(timeout_s):
            self.transport.stop(disconnect=False)
            raise DistributionError(
                f"cannot reach the broker at {self.transport.address.url} in {timeout_s:.0f} s"
            )
        self._thread = threading.Thread(target=self._ingest_loop, name="ingest", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.transport.stop()

    # -- distribution ---------------------------------------------------------------------
    def publish_artifact(self, spec: VariantSpec, data: bytes, timeout_s: float = 120.0) -> int:
        """Publish the artifact's chunks, retained; returns the bytes sent."""
        p = plan(data, spec.chunk_bytes)
        if p.sha256 != spec.sha256 or p.chunk_sha256 != tuple(spec.chunk_sha256):
            raise DistributionError(f"{spec.name}: data does not match its spec")
        sent = 0
        infos = []
        with self._publish_lock:
            for i, raw in iter_chunks(data, spec.chunk_bytes):
                frame = encode_frame(spec.sha256, i, p.count, raw, spec.compression)
                infos.append(self.transport.publish_info(
                    self.topics.chunk(spec.sha256, i), frame, qos=1, retain=True
                ))
                sent += len(frame)
        deadline = time.monotonic() + timeout_s
        for info in infos:
            info.wait_for_publish(max(0.1, deadline - time.monotonic()))
            if not info.is_published():
                raise DistributionError(f"{spec.name}: broker did not acknowledge all chunks")
        self.bytes_published += sent
        self._published_artifacts.add(spec.sha256)
        return sent

    def deploy(
        self,
        target: str,
        variants: list[VariantSpec],
        *,
        group: bool = False,
        pinned: str | None = None,
        policy: dict[str, float | int | bool | None] | None = None,
        timeout_s: float = 30.0,
    ) -> Manifest:
        """Sign a manifest naming ``variants`` and publish it as the target's desired state.

        ``policy`` overrides the agents' policy settings (see ``PolicyConfig``); it is
        checked here first, so a bad value is refused before anything is published.
        """
        if policy:
            try:
                apply_overrides(PolicyConfig(), policy)
            except ValueError as e:
                raise DistributionError(f"invalid policy override: {e}") from e
        with self._deploy_lock:  # versions only increase, one manifest at a time
            now = time.time()
            version = self.store.next_manifest_version()
            manifest = Manifest(
                target=target, version=version, issued_at=now,
                expires_at=now + self.manifest_ttl_s, variants=variants,
                pinned_variant=pinned, policy=policy,
            )
            signed = self.key.sign(manifest)
            data = signed.encode()
            self.store.save_manifest(version, target, data.decode())
        topic = self.topics.group_desired(target) if group else self.topics.desired(target)
        with self._publish_lock:
            info = self.transport.publish_info(topic, data, qos=1, retain=True)
        info.wait_for_publish(timeout_s)
        if not info.is_published():
            raise DistributionError(f"broker did not acknowledge the manifest for {target}")
        self.bytes_published += len(data)
        return manifest

    def publish_raw(self, topic: str, payload: bytes, retain: bool = False) -> None:
        """Publish exact bytes (tests use it to play a hostile network)."""
        with self._publish_lock:
            info = self.transport.publish_info(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(10)

    # -- ingest ---------------------------------------------------------------------------
    def _ingest_loop(self) -> None:
        while not self._stop.is_set():
            try:
                item = self.transport.inbound.get(timeout=0.2)
            except queue.Empty:
                continue
            if item.kind == "message":
                try:
                    self._ingest(item)
                except Exception:
                    # A bug or an unexpected store error costs this one message, never
                    # the ingest thread (nothing else would notice it had died).
                    self.counters.invalid += 1
                    log.exception("ingest failed on %s", item.topic)

    def _ingest(self, item: Inbound) -> None:
        try:
            device_id, channel = self.topics.parse_device(item.topic)
            if channel == "telemetry":
                b = decode(TelemetryBatch, item.payload)
                self._same_device(device_id, b.device_id)
                if self.store.add_telemetry(b):
                    self.counters.telemetry += 1
                else:
                    self.counters.duplicates += 1
            elif channel == "reported":
                if not item.payload:
                    return
                r = decode(ReportedState, item.payload)
                self._same_device(device_id, r.device_id)
                self.store.set_reported(r)
                if r.rollout is not None:
                    self.store.record_rollout_report(r.device_id, r.rollout, r.ts or time.time())
                self.counters.reported += 1
            elif channel == "events":
                e = decode(Event, item.payload)
                self._same_device(device_id, e.device_id)
                self.store.add_event(e)
                self.counters.events += 1
        except ProtocolError as e:
            self.counters.invalid += 1
            log.warning("dropped invalid message on %s: %s", item.topic, e)
        except StoreError as e:
            # The broker redelivers nothing once acknowledged; the agent's sequence numbers
            # show the gap. Keep ingesting rather than die on one bad write.
            log.error("store refused a message from %s: %s", item.topic, e)

    @staticmethod
    def _same_device(topic_id: str, body_id: str) -> None:
        if topic_id != body_id:
            raise ProtocolError(f"message for {body_id!r} on the topic of {topic_id!r}")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
