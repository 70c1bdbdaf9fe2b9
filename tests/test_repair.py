"""The lease holder's repair of stale or missing retained desired states
(``RolloutController.repair_desired``, ``FleetServer.republish_newest``): what it must
not do. The broker is a recording stand-in, so each publish and its order is seen; the
store is a real SQLite store; the whole loop through mosquitto and an agent is
``tests/test_replicas.py::test_a_stale_or_missing_retained_desired_state_is_put_right_by_the_holder``."""

from __future__ import annotations

import threading
import time

from prunefleet.server.controller import RolloutController
from prunefleet.server.fleet import FleetServer
from prunefleet.server.store import ManifestRow, Store, sqlite_url
from prunefleet.shared import chunks
from prunefleet.shared.messages import Manifest, ReportedState, VariantSpec
from prunefleet.shared.signing import SigningKey

KEY = SigningKey.generate()
_P = chunks.plan(b"w" * 3000, 1024)
SPEC = VariantSpec(name="v1", sha256=_P.sha256, size=_P.size, chunk_bytes=1024,
                   chunk_sha256=list(_P.chunk_sha256), input_shape=[1, 8], num_classes=10,
                   params=1, macs=1)


class _Info:
    def __init__(self, published: bool, rc: int = 0) -> None:
        self.published = published
        self.rc = rc

    def wait_for_publish(self, timeout: float | None = None) -> None:
        pass

    def is_published(self) -> bool:
        return self.published


class RecordingBroker:
    """Stands for the broker connection: every publish, in order; ``acknowledge``
    decides whether the broker acknowledges the next ones."""

    def __init__(self) -> None:
        self.log: list[tuple[str, bytes]] = []
        self.infos: list[_Info] = []
        self.connected = threading.Event()
        self.connected.set()
        self.acknowledge = True
        self.rc = 0

    def publish_info(self, topic: str, data: bytes, qos: int = 1, retain: bool = False):
        self.log.append((topic, data))
        self.infos.append(_Info(self.acknowledge, self.rc))
        return self.infos[-1]


def _setup(tmp_path) -> tuple[Store, FleetServer, RecordingBroker, RolloutController]:
    store = Store(sqlite_url(tmp_path / "s.db"))
    fleet = FleetServer("mqtt://127.0.0.1:1", store, KEY, prefix="t")  # never started
    broker = RecordingBroker()
    fleet.transport = broker  # type: ignore[assignment]
    return store, fleet, broker, RolloutController(fleet, store)


def _save(store: Store, device: str, age_s: float = 120.0) -> int:
    """A desired state saved (not published), signed ``age_s`` ago."""
    v = store.next_manifest_version()
    now = time.time()
    signed = KEY.sign(Manifest(target=device, version=v, issued_at=now, expires_at=now + 3600,
                               variants=[SPEC]))
    store.save_manifest(v, device, signed.encode().decode())
    with store.session() as s:
        s.get(ManifestRow, v).created_at = now - age_s
    return v


def _behind(store: Store, device: str) -> int:
    """A device online on the state before its newest; the newest's version."""
    _save(store, device)
    newest = _save(store, device)
    store.set_reported(ReportedState(device_id=device, online=True,
                                     manifest_version=newest - 1))
    return newest


def test_nothing_is_sent_while_the_broker_is_away_and_it_is_sent_after(tmp_path):
    """Sent blind while the broker is away, paho would queue the state and send it on
    reconnecting, after whatever another replica published meanwhile: so nothing is sent
    then, and the next pass with the broker back sends it."""
    store, fleet, broker, ctl = _setup(tmp_path)
    try:
        newest = _behind(store, "d1")
        broker.connected.clear()
        assert ctl.repair_desired(settle_s=30) == 0 and broker.log == []
        broker.connected.set()
        assert ctl.repair_desired(settle_s=30) == 1
        assert [t for t, _ in broker.log] == [fleet.topics.desired("d1")]
        assert broker.log[0][1].decode() == store.manifest(newest).signed
        assert ctl.repair_desired(settle_s=30) == 0, "once per state"
    finally:
        store.close()


def test_a_repair_counts_once_acknowledged_and_one_that_failed_is_sent_again(tmp_path):
    """The pass never waits for the broker (it runs on the thread that renews the lease):
    a state the broker has not acknowledged yet stays pending, is not sent again, and is
    counted when the acknowledgement comes; one whose publish failed is sent again."""
    store, _, broker, ctl = _setup(tmp_path)
    try:
        _behind(store, "d1")
        broker.acknowledge = False
        assert ctl.repair_desired(settle_s=30) == 1 and ctl.republished == 0
        assert ctl.repair_desired(settle_s=30) == 0 and len(broker.log) == 1
        broker.infos[0].published = True  # the PUBACK comes
        assert ctl.repair_desired(settle_s=30) == 0 and ctl.republished == 1
        _behind(store, "d2")
        broker.rc = 4  # the connection dropped under this publish
        assert ctl.repair_desired(settle_s=30) == 1 and ctl.republished == 1
        broker.acknowledge, broker.rc = True, 0
        assert ctl.repair_desired(settle_s=30) == 1 and ctl.republished == 2
        assert [t for t, _ in broker.log].count(ctl.fleet.topics.desired("d2")) == 2
    finally:
        store.close()


def test_a_recent_state_or_one_the_device_answered_is_left_alone(tmp_path):
    """A state signed less than ``settle_s`` ago may still be on its way; a device whose
    rollout report names the newest version (it refused it) is not sent it again."""
    from prunefleet.shared.messages import RolloutPhase, RolloutReport

    store, _, broker, ctl = _setup(tmp_path)
    try:
        _save(store, "fresh")
        store.set_reported(ReportedState(device_id="fresh", online=True, manifest_version=1))
        _save(store, "fresh", age_s=1.0)
        newest = _behind(store, "refuser")
        assert store.record_rollout_report(
            "refuser", RolloutReport(manifest_version=newest, phase=RolloutPhase.FAILED,
                                     reason="manifest policy is invalid"), time.time())
        assert ctl.repair_desired(settle_s=30) == 0 and broker.log == []
    finally:
        store.close()


def test_a_device_decommissioned_during_a_pass_keeps_its_topics_cleared(tmp_path):
    """The pass reads the online devices, then works on each. A device that goes away
    and is decommissioned meanwhile (its retained topics cleared, its row deleted) must
    not get its desired state back, retained, after the clear."""
    store, fleet, broker, ctl = _setup(tmp_path)
    try:
        _behind(store, "gone")
        read = store.rollout_report

        def decommissioned_meanwhile(device_id: str):
            store.set_reported(ReportedState(device_id=device_id, online=False))
            fleet.clear_device_topics(device_id)  # what DELETE /v1/devices/{id} does
            store.delete_device(device_id)
            return read(device_id)

        store.rollout_report = decommissioned_meanwhile  # type: ignore[method-assign]
        assert ctl.repair_desired(settle_s=30) == 0
        assert [d for t, d in broker.log if t == fleet.topics.desired("gone")] == [b""]
    finally:
        store.close()


def test_re_signing_leaves_a_device_behind_its_groups_newer_state_to_that_state(tmp_path):
    """A device in a group whose newer state, published moments ago, it has not taken
    yet: re-signing its own, older state (after a key change) under a new version would
    put that above the group's and override it, and the repair would then send it. A
    group state it has not taken for long it does not follow (a group its agent does not
    ask for): its own state is still re-signed, or it would expire."""
    store, fleet, broker, ctl = _setup(tmp_path)
    try:
        store.set_device_groups("m1", ["g"])
        own = _save(store, "m1")
        group = _save(store, "g")
        store.set_reported(ReportedState(device_id="m1", online=True, manifest_version=own))
        ctl.refresh_desired()  # what a key change runs
        assert store.latest_manifest("m1").version == own, "not re-signed over the group's"
        assert ctl.repair_desired(settle_s=30) == 1
        assert broker.log[-1] == (fleet.topics.group_desired("g"),
                                  store.manifest(group).signed.encode())
        with store.session() as s:  # an hour later, still not taken
            s.get(ManifestRow, group).created_at -= 3600
        ctl.refresh_desired()
        assert store.latest_manifest("m1").version > group
    finally:
        store.close()
