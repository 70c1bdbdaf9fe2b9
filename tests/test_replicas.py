"""Several servers on one PostgreSQL and the test mosquitto: one rollout controller at a
time (a lease in the store), taken over when its holder dies; ingest through a shared
subscription with one replica killed mid-stream, every batch stored once; the ingest probe
that refuses a broker which accepts a subscription and delivers nothing (NATS's MQTT
gateway with ``$share/…``)."""

from __future__ import annotations

import shutil
import subprocess
import textwrap
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import free_port, wait_for_port
from fleet_helpers import wait_for
from rollout_helpers import Fleet, pg_schema_url
from test_ingest import start_agent, stop_agent

from prunefleet.server.adminclient import AdminClient
from prunefleet.server.controller import LEASE
from prunefleet.server.errors import DistributionError, LeaseLostError
from prunefleet.server.serve import FleetService, ServeOptions
from prunefleet.server.store import ManifestRow, Store, sqlite_url

SHARE_GROUP = "replicas0123456789abcdef0123456789"


@pytest.fixture
def pg_url() -> Iterator[str]:
    gen = pg_schema_url()
    yield next(gen)
    gen.close()  # drops the schema


def replica(f: Fleet, name: str, **opts) -> FleetService:
    """A server of fleet ``f`` with its own state directory and client id, sharing the
    fleet's signing keys, store and topic prefix."""
    return FleetService(ServeOptions(
        state_dir=f.tmp / name, key_dir=f.state_dir / "keys", broker_url=f.broker_url,
        db_url=f.db_url, listen="127.0.0.1:0", prefix=f.prefix, tick_s=0.2,
        client_id=f"pf-{name}-{f.prefix}", lease_ttl_s=2.0, **opts)).start()


# -- the lease ---------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_lease_has_one_holder_until_it_expires_or_is_released(tmp_path, backend):
    schema = pg_schema_url() if backend == "postgresql" else None
    store = Store(next(schema) if schema else sqlite_url(tmp_path / "s.db"))
    try:
        assert store.take_lease("job", "a", 10, now=100) == 110
        assert store.take_lease("job", "b", 10, now=105) is None  # a holds it
        assert store.take_lease("job", "a", 10, now=108) == 118  # renewed
        assert store.take_lease("job", "b", 10, now=117) is None
        assert store.take_lease("job", "b", 10, now=119) == 129  # a's lapsed
        assert store.take_lease("job", "a", 10, now=120) is None
        store.release_lease("job", "a")  # not a's: nothing changes
        assert store.take_lease("job", "a", 10, now=121) is None
        store.release_lease("job", "b")
        assert store.take_lease("job", "a", 10, now=122) == 132
    finally:
        store.close()
        if schema is not None:
            schema.close()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_write_fenced_by_a_lost_lease_is_refused_and_writes_nothing(tmp_path, backend):
    """Under ``Store.fenced``, a write succeeds while its thread holds the lease, and is
    refused once the lease lapsed or another holder took it, with nothing of its
    transaction written; reads, and other threads' writes, are not fenced."""
    schema = pg_schema_url() if backend == "postgresql" else None
    store = Store(next(schema) if schema else sqlite_url(tmp_path / "s.db"))
    now = [100.0]
    try:
        assert store.take_lease("job", "a", 10, now=100) == 110
        with store.fenced("job", "a", lambda: now[0], margin_s=1.0):
            store.save_manifest(1, "dev-1", "{}")  # held until 110 > 100 + 1
            now[0] = 109.5  # within the margin of the expiry: refused already
            with pytest.raises(LeaseLostError):
                store.save_manifest(2, "dev-1", "{}")
            assert store.lease("job").holder == "a"  # reads go on
            taken: list[float | None] = []  # b, another replica: its own thread
            other = threading.Thread(target=lambda: taken.append(
                store.take_lease("job", "b", 10, now=111)))
            other.start()
            other.join()
            assert taken == [121]
            now[0] = 105.0  # a's clock says its lease runs, the store says b holds it
            with pytest.raises(LeaseLostError):
                store.save_manifest(3, "dev-1", "{}")
            other = threading.Thread(target=store.save_manifest, args=(4, "dev-2", "{}"))
            other.start()
            other.join()
        store.save_manifest(5, "dev-1", "{}")  # outside the fence
        with store.session() as s:
            assert sorted(v for (v,) in s.query(ManifestRow.version)) == [1, 4, 5]
        assert store.lease("job").holder == "b"
    finally:
        store.close()
        if schema is not None:
            schema.close()


def _metrics(svc: FleetService) -> str:
    req = urllib.request.Request(svc.url + "/metrics",
                                 headers={"Authorization": f"Bearer {svc.token}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.read().decode()


def test_a_holder_that_stalls_mid_step_writes_nothing_after_the_takeover(
        tmp_path, mosquitto, pg_url):
    """The holder checks its lease and then stalls before its step's first write (as a
    frozen VM or SIGSTOP would make it); the other replica takes the lease over and runs
    the rollout to the end. When the stalled one wakes, the store refuses its step: it
    signs, saves and publishes no desired state, and the rollout stays as the new holder
    left it."""
    f = Fleet(tmp_path, mosquitto.url, db_url=pg_url)
    f.start_server()
    f.stop_server()
    a = replica(f, "a")
    b = replica(f, "b")
    stalled, wake = threading.Event(), threading.Event()
    outcomes: list[object] = []
    deploy = a.fleet.deploy

    def stalling(target, *args, **kw):
        if not stalled.is_set():
            stalled.set()
            wake.wait(60)  # frozen: a's tick thread is here, so a renews nothing
        try:
            outcomes.append(deploy(target, *args, **kw))
        except LeaseLostError as e:
            outcomes.append(e)
            raise
        return outcomes[-1]

    a.fleet.deploy = stalling  # type: ignore[method-assign]
    try:
        f.svc = b
        f.start_agent("rep-1")
        f.wait_known(["rep-1"])
        f.register_mlp("small", hidden=8)
        assert a.controller.holds_lease
        rid = f.api.create_rollout({"target": {"kind": "devices", "devices": ["rep-1"]},
                                    "variants": ["small"]})["id"]
        wait_for(stalled.is_set, 20, what="the holder starting the offer")
        wait_for(lambda: b.controller.holds_lease, 20, what="b taking the lease over")
        f.wait_rollout(rid, "completed", timeout_s=60)
        with b.store.session() as s:
            manifests = s.query(ManifestRow).count()
        offered = f.api.rollout(rid)["devices"][0]["offered_version"]
        wake.set()
        wait_for(lambda: outcomes, 20, what="the stalled holder waking")
        assert isinstance(outcomes[0], LeaseLostError), outcomes
        assert a.controller.lease_lost >= 1 and not a.controller.holds_lease
        for svc, held in ((a, 0.0), (b, 1.0)):  # what an operator's dashboard shows
            text = _metrics(svc)
            assert f"prunefleet_rollout_controller_lease_held {held}" in text
        assert "prunefleet_rollout_steps_fenced_total 1.0" in _metrics(a)
        with b.store.session() as s:
            assert s.query(ManifestRow).count() == manifests  # nothing signed by a
        view = f.api.rollout(rid)
        assert view["status"] == "completed"
        assert view["devices"][0]["offered_version"] == offered
        assert view["devices"][0]["phase"] == "installed"
    finally:
        wake.set()
        f.close()
        a.stop(release=False)


def _saved_not_published(svc: FleetService, device_id: str, variant) -> tuple[int, bytes]:
    """A desired state saved and signed as a rollout step does, never published: what a
    replica leaves behind when it dies, or stalls past its lease, between the two."""
    from prunefleet.shared.messages import Manifest

    fleet = svc.fleet
    with fleet._deploy_lock:
        version = fleet.next_manifest_version()
        now = time.time()
        data = fleet.key.sign(Manifest(target=device_id, version=version, issued_at=now,
                                       expires_at=now + 3600, variants=[variant])).encode()
        svc.store.save_manifest(version, device_id, data.decode())
    return version, data


def test_a_stale_or_missing_retained_desired_state_is_put_right_by_the_holder(
        tmp_path, mosquitto):
    """What the lease's fence cannot reach is the broker. A replica that dies between
    saving a desired state and publishing it leaves the newest one unpublished; one that
    stalls there past its lease publishes it when it wakes, over the newer state the next
    holder published. A device then keeps its older state, or follows the stale one when
    it comes back, and reports that version: the holder publishes the newest again, as
    stored, and the device follows it."""
    from prunefleet.shared.messages import VariantSpec
    from prunefleet.shared.topics import Topics

    f = Fleet(tmp_path, mosquitto.url)
    f.start_server()
    f.stop_server()
    svc = f.svc = replica(f, "a", repair_check_s=0.2, repair_settle_s=1.0)
    try:
        agent = f.start_agent("gap-1")
        f.wait_known(["gap-1"])
        spec = f.register_mlp("small", hidden=8)
        variant = VariantSpec.model_validate(svc.store.variant(spec["sha256"]).spec)
        first = svc.fleet.deploy("gap-1", [variant]).version
        wait_for(lambda: agent.manifest is not None and agent.manifest.version == first, 30,
                 what="the first desired state followed")

        # 1. Saved and never published: the device reports the one before.
        unpublished, _ = _saved_not_published(svc, "gap-1", variant)
        wait_for(lambda: agent.manifest.version == unpublished, 20,
                 what="the saved desired state published again and followed")

        # 2. While the device is away: a stalled replica's state is saved, the next
        # holder publishes a newer one, and the stalled one wakes and publishes its own
        # over it. The device comes back to the stale state, follows it, and reports it.
        f.stop_agent("gap-1")
        wait_for(lambda: not svc.store.device("gap-1").online, 20, what="the device away")
        stale, stale_data = _saved_not_published(svc, "gap-1", variant)
        newest = svc.fleet.deploy("gap-1", [variant]).version
        assert stale < newest
        svc.fleet.publish_raw(Topics(f.prefix).desired("gap-1"), stale_data, retain=True)
        agent = f.start_agent("gap-1")
        wait_for(lambda: agent.manifest is not None and agent.manifest.version == newest, 20,
                 what="the newest desired state published again and followed")
        assert agent.counters.rejected_manifests == 0
        wait_for(lambda: "prunefleet_desired_states_republished_total 2.0" in _metrics(svc),
                 10, what="both repairs acknowledged and counted")
    finally:
        f.close()


def test_one_controller_applies_steps_and_another_takes_over_when_it_dies(
        tmp_path, mosquitto, pg_url):
    """Two replicas on one PostgreSQL: only the lease holder offers; a rollout created
    through the other is run by the holder; the holder dies mid-rollout without releasing
    its lease, and the rollout completes under the other after the lease's TTL."""
    f = Fleet(tmp_path, mosquitto.url, db_url=pg_url)
    f.start_server()  # creates the keys; replicas a and b share them
    f.stop_server()
    a = replica(f, "a")
    b = replica(f, "b")
    offered_by_b: list[str] = []
    deploy = b.fleet.deploy

    def recording(target, *args, **kw):
        offered_by_b.append(target)
        return deploy(target, *args, **kw)

    b.fleet.deploy = recording  # type: ignore[method-assign]
    try:
        f.svc = b  # the API of the replica that does not hold the lease
        for d in ("rep-1", "rep-2"):
            f.start_agent(d)
        f.wait_known(["rep-1", "rep-2"])
        f.stop_agent("rep-2")  # offline: the rollout waits for it
        f.register_mlp("small", hidden=8)
        assert a.store.lease(LEASE).holder == a.fleet.client_id
        assert a.controller.holds_lease and not b.controller.holds_lease
        rid = f.api.create_rollout({"target": {"kind": "devices",
                                               "devices": ["rep-1", "rep-2"]},
                                    "variants": ["small"],
                                    "config": {"canary_percent": 50}})["id"]
        wait_for(lambda: any(d["offered_version"] for d in f.api.rollout(rid)["devices"]),
                 20, what="the lease holder offering the rollout")
        wait_for(lambda: any(d["phase"] == "installed"
                             for d in f.api.rollout(rid)["devices"]),
                 30, what="a device installing it")
        assert f.api.rollout(rid)["status"] == "active"
        assert offered_by_b == []  # b applied nothing while a held the lease
        a.stop(release=False)  # dies holding the lease
        f.start_agent("rep-2")
        f.wait_rollout(rid, "completed", timeout_s=60)
        assert b.controller.holds_lease
        assert b.store.lease(LEASE).holder == b.fleet.client_id
        assert {d["phase"] for d in f.api.rollout(rid)["devices"]} == {"installed"}
    finally:
        f.close()
        a.stop(release=False)


def test_the_api_answers_while_the_broker_is_down_and_the_rollout_goes_on_after(
        tmp_path, durable_mosquitto):
    """The controller never waits on the broker under its lock: with the broker down a
    rollout is created and paused at once (its offers wait), and it completes once the
    broker is back. It used to hold the lock up to 30 s per device waiting for a PUBACK."""
    f = Fleet(tmp_path, durable_mosquitto.url)
    f.start_server()
    try:
        f.start_agent("calm-1")
        f.wait_known(["calm-1"])
        f.register_mlp("small", hidden=8)
        durable_mosquitto.stop()
        wait_for(lambda: not f.svc.fleet.transport.connected.is_set(), 10,
                 what="the server noticing the broker is gone")
        api = AdminClient(f.svc.url, f.svc.token, timeout_s=10)
        rid = api.create_rollout({"target": {"kind": "devices", "devices": ["calm-1"]},
                                  "variants": ["small"]})["id"]
        r = api.rollout(rid)
        assert r["status"] == "active"
        assert [d["offered_version"] for d in r["devices"]] == [None]  # waits for the broker
        api.rollout_action(rid, "pause")
        assert api.rollout(rid)["status"] == "paused"
        durable_mosquitto.start()
        api.rollout_action(rid, "resume")
        f.wait_rollout(rid, "completed", timeout_s=60)
    finally:
        f.close()


def test_replicas_on_a_shared_subscription_store_every_batch_once_when_one_dies(
        tmp_path, mosquitto, pg_url):
    """Ingest split over two replicas (``--share-group``); one is killed mid-stream (no
    DISCONNECT, nothing it held acknowledged): what the broker had handed it is sent
    again by the agents and stored by the other, once."""
    f = Fleet(tmp_path, mosquitto.url, db_url=pg_url)
    f.start_server()
    f.stop_server()
    a = replica(f, "a", share_group=SHARE_GROUP)
    b = replica(f, "b", share_group=SHARE_GROUP)
    f.svc = b
    devices = [f"share-{i}" for i in range(4)]
    agents = [start_agent(f, d, telemetry_ack_timeout_s=2.0) for d in devices]
    try:
        wait_for(lambda: a.fleet.counters.telemetry >= 10 and b.fleet.counters.telemetry >= 10,
                 30, what="both replicas storing their share")
        a.fleet.transport.kill()  # a crash: its in-flight messages are never acknowledged
        a.stop(release=False)
        stored = b.store.telemetry_count()
        wait_for(lambda: b.store.telemetry_count() >= stored + 40, 30,
                 what="ingest going on at the other replica")
        for _, stop, t in agents:
            stop_agent(stop, t)  # flushes until the server confirmed every batch
        for d, (agent, _, _) in zip(devices, agents, strict=True):
            assert b.store.telemetry_seqs(d) == list(range(agent.tqueue.issued)), d
    finally:
        for _, stop, _ in agents:
            stop.set()
        f.close()
        a.stop(release=False)


# -- the ingest probe --------------------------------------------------------------------------
def test_the_ingest_probe_passes_on_mosquitto_with_a_shared_subscription(tmp_path, mosquitto):
    f = Fleet(tmp_path, mosquitto.url)
    f.start_server()
    f.stop_server()
    svc = replica(f, "a", share_group=SHARE_GROUP)
    try:
        assert svc.fleet._probe_seen.is_set()
        assert svc.store.devices() == []  # the probe is no device and no event
        assert svc.store.events() == []
    finally:
        svc.stop()


@pytest.fixture
def nats_mqtt(tmp_path) -> Iterator[str]:
    """Debian's nats-server with its MQTT gateway (which needs JetStream) on free ports."""
    exe = shutil.which("nats-server")
    if exe is None:
        pytest.fail("nats-server is not installed: `make deps` installs it "
                    "(Debian package nats-server)", pytrace=False)
    port, mqtt_port = free_port(), free_port()
    conf = tmp_path / "nats.conf"
    conf.write_text(textwrap.dedent(f"""\
        listen: 127.0.0.1:{port}
        server_name: pf-test
        jetstream {{ store_dir: "{tmp_path / 'js'}" }}
        mqtt {{ listen: 127.0.0.1:{mqtt_port} }}
        """))
    log = (tmp_path / "nats.log").open("wb")
    proc = subprocess.Popen([exe, "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT)
    try:
        if not wait_for_port("127.0.0.1", mqtt_port, 15):
            pytest.fail(f"nats-server did not open its MQTT port: "
                        f"{Path(log.name).read_text()[-2000:]}")
        yield f"mqtt://127.0.0.1:{mqtt_port}"
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


def test_a_server_on_a_broker_that_does_not_deliver_shared_subscriptions_refuses_to_start(
        tmp_path, nats_mqtt):
    """NATS's MQTT gateway takes ``$share/…`` and delivers nothing to it: the server says
    so in one line instead of running deaf; without the share group it starts."""
    f = Fleet(tmp_path, nats_mqtt)
    f.start_server()  # a plain subscription: the probe comes back
    f.stop_server()
    with pytest.raises(DistributionError) as e:
        replica(f, "shared", share_group=SHARE_GROUP, probe_s=2.0)
    msg = str(e.value)
    assert "\n" not in msg
    assert "ingest probe failed" in msg and "--share-group" in msg
