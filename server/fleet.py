"""The fleet server: registry of variants, distribution, desired state, telemetry ingest.

Artifacts are published once, as retained chunks per artifact digest; the broker fans
them out, so the server's bytes do not grow with the fleet. Desired state is a signed
manifest, retained per device or group. Ingest subscribes to every device's telemetry,
reported state and events (through a shared subscription when ``share_group`` is set, so
several servers can split the load) and writes them to the store; anything that does not
validate, or comes from a device over its rate limit, is counted (per reason) and dropped.

Ingest acknowledges end to end (docs/ingest.md): telemetry is written a group at a time
(what arrived while the last group committed, up to ``group_max`` messages, one
transaction); only after the commit does the server acknowledge the broker's messages
(``manual_ack``) and publish each device's "stored through" cursor (``TelemetryAck``,
retained on ``<prefix>/devices/<id>/acked``), on which the agent deletes its batches.
"""

from __future__ import annotations

import base64
import logging
import queue
import secrets
import threading
import time
from functools import partial
from pathlib import Path

import paho.mqtt.client as mqtt

from prunefleet.shared.chunks import DEFAULT_CHUNK_BYTES, encode_frame, iter_chunks, plan
from prunefleet.shared.errors import TransportError
from prunefleet.shared.messages import (
    Golden,
    Manifest,
    ShadowSpec,
    TelemetryAck,
    VariantSpec,
)
from prunefleet.shared.policy import PolicyConfig, apply_overrides
from prunefleet.shared.signing import SigningKey, TrustedKeys
from prunefleet.shared.topics import Topics
from prunefleet.shared.transport import BrokerAddress, Inbound, MqttTransport, TransportOptions

from .errors import DistributionError
from .ingestwork import (
    PROBE_MAGIC,
    Admitted,
    CoreOptions,
    GroupOutcome,
    IngestCore,
    IngestCounters,
    IngestWorkers,
    gather_held,
)
from .keys import KeyRing
from .store import Store

log = logging.getLogger(__name__)

# Groups checked ahead of the one being written (thread mode): the checks of the next group
# overlap the write and fsync of this one; more would only hold more messages unacknowledged.
COMMIT_AHEAD = 1

__all__ = ["PROBE_MAGIC", "FleetServer", "IngestCounters", "spec_from_file"]


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


# How a claimed version without a certificate counts (Store.next_manifest_version).
VERSION_CLAIMS = ("majority", "certified")


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
        device_rate_per_s: float = 20.0,
        device_burst: float = 200.0,
        group_max: int = 1000,
        ingest_processes: int = 0,
        held_dir: Path | None = None,
        version_claims: str = "majority",
    ):
        """``persistent_session`` keeps the ingest subscription at the broker while this
        server is away (MQTT clean session off, stable ``client_id``), so telemetry that
        agents publish meanwhile is queued, not lost. Give each server its own id.

        ``device_rate_per_s``/``device_burst``: each device's token bucket for the messages
        it sends (0: no limit); what is over it is dropped before parsing and counted.
        ``group_max``: messages written per telemetry transaction at most.
        ``ingest_processes``: 0 checks and stores on this process's ingest thread; N moves
        that work to N worker processes (``server/ingestwork.py``), this process keeping
        the MQTT connection, the acknowledgements and the cursors' publishing.
        ``held_dir``: where reported states and events the store refused are kept until
        it takes them (``ingest-held*.json``; None: in memory only).
        ``version_claims``: how a device's claimed version counts without a certificate
        ("majority": within the fleet's median; "certified": not at all)."""
        self.store = store
        if version_claims not in VERSION_CLAIMS:
            raise ValueError(f"version_claims must be one of {', '.join(VERSION_CLAIMS)}")
        self.version_claims = version_claims
        # A KeyRing signs with the previous key too while a rotation is in progress.
        self.key = key
        self.topics = Topics(prefix)
        self.manifest_ttl_s = manifest_ttl_s
        self.bytes_published = 0
        self.share_group = share_group
        self._probe_token = secrets.token_hex(8).encode()
        if held_dir is not None:  # what every process of an earlier run held, to one file
            gather_held(held_dir, "ingest-held.json" if ingest_processes <= 0
                        else "ingest-held-0.json")
        self.core = IngestCore(store, self.topics, share_group=share_group,
                               device_rate_per_s=device_rate_per_s,
                               device_burst=device_burst,
                               # with workers this core writes nothing: theirs hold
                               held_path=None if held_dir is None or ingest_processes > 0
                               else held_dir / "ingest-held.json")
        # What this process counts itself (the queue, acknowledgements, drops before any
        # core saw the message); the cores count the rest.
        self._own = IngestCounters()
        self.workers: IngestWorkers | None = None
        if ingest_processes > 0:
            self.workers = IngestWorkers(ingest_processes, CoreOptions(
                store_url=store.url, prefix=prefix, share_group=share_group,
                device_rate_per_s=device_rate_per_s, device_burst=device_burst,
                log_level=logging.getLogger().getEffectiveLevel(),
                held_dir=None if held_dir is None else str(held_dir)))
        self.group_max = max(1, group_max)
        subs = {}
        for ch in ("telemetry", "reported", "events"):
            f = self.topics.all_devices(ch)
            subs[self.topics.shared(share_group, f) if share_group else f] = 1
        self.transport = MqttTransport(
            BrokerAddress.parse(broker_url),
            TransportOptions(client_id=client_id, subscriptions=subs, inbound_queue_size=10000,
                             max_inflight_messages=100,
                             clean_session=not persistent_session, manual_ack=True,
                             report_published=False, read_batch=64),
        )
        self._publish_lock = threading.Lock()
        self._deploy_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._commit_thread: threading.Thread | None = None
        # Admitted groups waiting for the commit thread (thread mode): one being written,
        # up to COMMIT_AHEAD more checked meanwhile.
        self._admitted: queue.Queue[tuple[list[Inbound], Admitted | None]] = queue.Queue(
            maxsize=COMMIT_AHEAD)
        self._published_artifacts: set[str] = set()
        self.client_id = client_id
        self._probe_seen = threading.Event()

    @property
    def counters(self) -> IngestCounters:
        """Everything ingest counted: this process's core (live) when it does the work,
        else the sum of the workers' and this process's own at this moment."""
        if self.workers is None:
            c = self.core.counters
            c.acks_published = self._own.acks_published
            c.queue_depth = self._own.queue_depth
            c.dropped["inbound_full"] = self._own.dropped["inbound_full"]
            c.inbound_waits = self.transport.inbound_waits
            return c
        self._own.inbound_waits = self.transport.inbound_waits
        return IngestCounters.merged([self.workers.counters, self._own])

    # -- lifecycle ----------------------------------------------------------------------
    def start(self, timeout_s: float = 15.0) -> None:
        if self.workers is not None:
            self.workers.start()
        self.transport.start()
        if not self.transport.wait_connected(timeout_s):
            self.transport.stop(disconnect=False)
            if self.workers is not None:
                self.workers.stop()
            raise DistributionError(
                f"cannot reach the broker at {self.transport.address.url} in {timeout_s:.0f} s"
            )
        self._thread = threading.Thread(target=self._ingest_loop, name="ingest", daemon=True)
        if self.workers is None:  # first: the ingest thread hands its groups over to it
            self._commit_thread = threading.Thread(target=self._commit_loop,
                                                   name="ingest-commit", daemon=True)
            self._commit_thread.start()
        self._thread.start()

    def probe_ingest(self, timeout_s: float = 5.0) -> None:
        """Prove that the ingest subscription delivers: publish a probe on a topic it
        matches (this server's own device-like events topic) until one comes back, else
        raise. A broker may accept a subscription and deliver nothing to it (NATS's MQTT
        gateway does so with ``$share/…``); a server there would be silently deaf. With a
        shared subscription the broker may hand a probe to another replica, so it is sent
        again every half second. Any other message the subscription delivers proves it as
        well: a persistent session's backlog arrives before the probe."""
        topic = self.topics.events(self.client_id)
        deadline = time.monotonic() + timeout_s
        while True:
            with self._publish_lock:
                self.transport.publish(topic, PROBE_MAGIC + self._probe_token, qos=1)
            if self._probe_seen.wait(min(0.5, max(0.0, deadline - time.monotonic()))):
                return
            if time.monotonic() >= deadline:
                break
        sub = self.topics.all_devices("events")
        if self.share_group:
            sub = self.topics.shared(self.share_group, sub)
            why = ("it takes the shared subscription but does not deliver to it (NATS's "
                   "MQTT gateway and amqtt do so); run without --share-group, or on a broker "
                   "that supports shared subscriptions (mosquitto, EMQX, HiveMQ)")
        else:
            why = "check the broker's ACL for this server's user"
        raise DistributionError(
            f"ingest probe failed: {self.transport.address.url} delivered nothing on "
            f"{sub} within {timeout_s:g} s; {why}")

    def stop(self) -> None:
        self._stop.set()
        for thread in (self._thread, self._commit_thread):
            if thread is not None:
                thread.join(timeout=10)
        if self.workers is not None:
            self.workers.stop()
        self.transport.stop()

    # -- distribution ---------------------------------------------------------------------
    def trusted(self) -> TrustedKeys:
        """This server's current keys, the revoked excluded: whose version certificates it
        believes (``Store.next_manifest_version``)."""
        key = self.key
        return key.trusted() if isinstance(key, KeyRing) else TrustedKeys([key.public])

    def next_manifest_version(self) -> int:
        """The version the next desired state takes (``Store.next_manifest_version``,
        with this server's certificates and its ``version_claims`` rule)."""
        trusted = self.trusted()
        return self.store.next_manifest_version(
            trusted.certifies, unproven=self.version_claims == "majority",
            keyset=tuple(sorted(trusted.keyids)))

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
        shadow: ShadowSpec | None = None,
        sent: list[mqtt.MQTTMessageInfo] | None = None,
        reprofile: int = 0,
    ) -> Manifest:
        """Sign a manifest naming ``variants`` and publish it as the target's desired state.

        ``policy`` overrides the agents' policy settings (see ``PolicyConfig``); it is
        checked here first, so a bad value is refused before anything is published.
        ``sent``: do not wait for the broker; refuse at once while it is not connected,
        else append the publish to ``sent`` for the caller to wait on (outside its locks).
        ``reprofile``: the re-profile epoch (``Manifest.reprofile``) the state carries.
        """
        if sent is not None and not self.transport.connected.is_set():
            raise DistributionError(f"not connected to the broker {self.transport.address.url}")
        if policy:
            try:
                apply_overrides(PolicyConfig(), policy)
            except ValueError as e:
                raise DistributionError(f"invalid policy override: {e}") from e
        with self._deploy_lock:  # versions only increase, one manifest at a time
            now = time.time()
            version = self.next_manifest_version()
            manifest = Manifest(
                target=target, version=version, issued_at=now,
                expires_at=now + self.manifest_ttl_s, variants=variants,
                pinned_variant=pinned, policy=policy,
                revoked_keyids=list(getattr(self.key, "revoked", ())), shadow=shadow,
                reprofile=reprofile,
            )
            signed = self.key.sign(manifest)
            data = signed.encode()
            self.store.save_manifest(version, target, data.decode())
        topic = self.topics.group_desired(target) if group else self.topics.desired(target)
        with self._publish_lock:
            info = self.transport.publish_info(topic, data, qos=1, retain=True)
        self.bytes_published += len(data)
        if sent is not None:
            sent.append(info)
            return manifest
        info.wait_for_publish(timeout_s)
        if not info.is_published():
            raise DistributionError(f"broker did not acknowledge the manifest for {target}")
        return manifest

    def republish_newest(self, target: str, version: int, group: bool,
                         sent: list | None = None) -> bool:
        """Publish again, retained and as stored, ``target``'s desired state of ``version``
        if it is still the newest the store holds for it and, for a device, the device is
        online (False, and nothing sent, otherwise). Checked and sent under the lock
        that orders a deploy's save, so a deploy of this process saving a newer one
        meanwhile publishes after this, never before."""
        with self._deploy_lock:
            row = self.store.latest_manifest(target)
            if row is None or row.version != version:
                return False
            if not group and not getattr(self.store.device(target), "online", False):
                # Gone or going: a decommission (refused while a device is online) may be
                # clearing its topics for good; sent after that, this would undo it.
                return False
            topic = self.topics.group_desired(target) if group else self.topics.desired(target)
            data = row.signed.encode()
            with self._publish_lock:
                if not self.transport.connected.is_set():
                    # Paho would queue it and send it after a reconnect, blind, after what
                    # another replica published meanwhile.
                    raise DistributionError("not connected to the broker")
                info = self.transport.publish_info(topic, data, qos=1, retain=True)
        self.bytes_published += len(data)
        if sent is not None:
            sent.append(info)
        return True

    def clear_device_topics(self, device_id: str, timeout_s: float = 30.0) -> None:
        """Remove a decommissioned device's retained messages from the broker (its desired
        state, reported state and telemetry cursor): an empty retained message clears one."""
        topics = (self.topics.desired(device_id), self.topics.reported(device_id),
                  self.topics.acked(device_id))
        # Under the deploy lock too: a repair that found the device online publishes
        # before this clear, never after it (republish_newest).
        with self._deploy_lock, self._publish_lock:
            infos = [self.transport.publish_info(t, b"", qos=1, retain=True) for t in topics]
        for info in infos:
            info.wait_for_publish(timeout_s)
            if not info.is_published():
                raise DistributionError(f"broker did not acknowledge clearing {device_id}")

    def publish_raw(self, topic: str, payload: bytes, retain: bool = False) -> None:
        """Publish exact bytes (tests use it to play a hostile network)."""
        with self._publish_lock:
            info = self.transport.publish_info(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(10)

    # -- ingest ---------------------------------------------------------------------------
    def _ingest_loop(self) -> None:
        """Receive groups and check them; on this process, a second thread writes them
        (:meth:`_commit_loop`), so that one group's checks (Python, holding the GIL)
        overlap the write and fsync of the one before (SQLite, which releases it)."""
        while not self._stop.is_set():
            items = self._next_group()
            if not items:
                continue
            messages = [(i.topic, i.payload) for i in items]
            if self.workers is not None:
                if not self.workers.submit(messages, partial(self._done, items),
                                           self._stop):
                    return
                continue
            try:
                admitted: Admitted | None = self.core.admit(messages)
            except Exception:
                self._group_failed(items)
                admitted = None
            self._hand_over(items, admitted)

    def _group_failed(self, items: list[Inbound]) -> None:
        """A bug costs this group, never an ingest thread (nothing else would notice it had
        died): counted, logged, and acknowledged; the agents send unconfirmed batches
        again."""
        self.core.drop("error", f"a group of {len(items)} messages", len(items))
        log.exception("ingest failed on a group of %d messages", len(items))

    def _hand_over(self, items: list[Inbound], admitted: Admitted | None) -> None:
        """Give a checked group to the commit thread; at most COMMIT_AHEAD wait, then the
        checks wait too. On stop as well: what was taken is written before the end."""
        while True:
            try:
                self._admitted.put((items, admitted), timeout=0.2)
                return
            except queue.Full:
                committer = self._commit_thread
                if committer is None or not committer.is_alive():
                    return  # never acknowledged: the broker sends it again

    def _commit_loop(self) -> None:
        """Write admitted groups in order, then acknowledge them and publish the cursors.
        On stop it ends once the ingest thread has ended and every group it handed over
        is written, as a single thread finished the group in hand."""
        while True:
            try:
                items, admitted = self._admitted.get(timeout=0.2)
            except queue.Empty:
                ingest = self._thread
                if self._stop.is_set() and (ingest is None or not ingest.is_alive()):
                    return
                if self.core.has_unwritten:  # a quiet fleet: try the held states again
                    items, admitted = [], Admitted()
                else:
                    continue
            try:
                out = self.core.commit(admitted) if admitted is not None else GroupOutcome()
            except Exception:
                self._group_failed(items)
                out = GroupOutcome()
            self._done(items, out)

    def _next_group(self) -> list[Inbound]:
        """The messages of one transaction: what arrived while the last group was being
        written, up to ``group_max``. Only the first is waited for, so a quiet fleet adds
        no delay and a busy one gets larger transactions."""
        q = self.transport.inbound
        items: list[Inbound] = []
        for item in q.get_many(self.group_max, 0.2):
            if item.kind == "message":
                items.append(item)
            elif item.kind == "connected":
                log.info("connected to the broker %s", self.transport.address.url)
            elif item.kind == "disconnected":
                log.warning("lost the broker %s: ingest and publishing wait for it",
                            self.transport.address.url)
        self._own.queue_depth = q.qsize()
        return items

    def _done(self, items: list[Inbound], out: GroupOutcome) -> None:
        """A group's outcome is known: the broker's acknowledgements, which let it hand
        this server its next messages, then the devices' cursors (docs/ingest.md: retained
        at QoS 0; a lost one costs a re-send, which the next cursor confirms), all in one
        write and one wake-up of the network thread."""
        if out.probe_seen:
            # Any message on the ingest subscription proves that it delivers; after an
            # outage the session's backlog comes before the probe, however long it takes.
            self._probe_seen.set()
        if items or out.cursors:
            ts = time.time()
            with self._publish_lock:
                cursors = [(self.topics.acked(device_id),
                            TelemetryAck(device_id=device_id, incarnation=incarnation,
                                         stored_through=through, ts=ts).encode(), True)
                           for device_id, incarnation, through in out.cursors]
                acks = [(i.mid, i.qos, i.connection) for i in items]
                try:
                    self._own.acks_published += self.transport.ack_and_publish(acks, cursors)
                except TransportError as e:
                    # The agents send the batches again whose cursor was lost. The
                    # acknowledgements never wait on the cursors: without them the broker
                    # would stop handing this server messages (its in-flight window).
                    log.warning("telemetry cursors not published: %s", e)
                    try:
                        self.transport.ack_many(acks)
                    except TransportError as e2:
                        log.warning("%s", e2)  # resent after the reconnect; dedupe drops it
        self._own.dropped["inbound_full"] = self.transport.dropped_inbound
        if out.store_failed:
            self._stop.wait(0.5)  # a store that is down is not hammered

    def revoked(self, now: float | None = None) -> frozenset[str]:
        """The revoked devices (from the store, cached for a few seconds)."""
        return self.core.revoked(now)

    def forget_revocations(self) -> None:
        """Read the revocations again at the next message (after a revoke)."""
        self.core.forget_revocations()
        if self.workers is not None:
            self.workers.forget_revocations()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
