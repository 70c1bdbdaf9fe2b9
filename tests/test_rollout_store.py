"""Rollout state in the store, on SQLite and on PostgreSQL (its own schema per test)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from rollout_helpers import pg_schema_url

from prunefleet.server.errors import StoreConflictError, StoreError
from prunefleet.server.store import Store, sqlite_url
from prunefleet.shared.messages import (
    InstalledVariant,
    ReportedState,
    RolloutPhase,
    RolloutReport,
    ShadowReport,
    ShadowStats,
    SwitchEvent,
    TelemetryBatch,
    VariantStats,
)


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path) -> Iterator[Store]:
    if request.param == "sqlite":
        s = Store(sqlite_url(tmp_path / "fleet.db"))
        yield s
        s.close()
        return
    gen = pg_schema_url()
    url = next(gen)
    s = Store(url)
    try:
        assert s.engine.dialect.name == "postgresql"
        yield s
    finally:
        s.close()
        gen.close()


def _report(device: str, version: int, phase: RolloutPhase, **kw) -> ReportedState:
    return ReportedState(
        device_id=device, online=True, ts=100.0, manifest_version=version,
        installed=[InstalledVariant(name="v", sha256="a" * 64, size=1)],
        rollout=RolloutReport(manifest_version=version, phase=phase, **kw),
    )


def test_rollout_rows_follow_reports_in_either_order(store):
    for d in ("d1", "d2", "d3"):
        store.set_reported(ReportedState(device_id=d, online=True, ts=1.0))
    store.set_device_groups("d1", ["lab", "all"])
    store.set_device_groups("d2", ["lab"])
    store.set_device_groups("new", ["field"])  # registers an unseen device, offline
    assert store.group_members("lab") == ["d1", "d2"]
    assert store.device_groups()["d1"] == ["all", "lab"]
    assert store.device("new") is not None and not store.device("new").online

    rid = store.create_rollout(
        target_kind="group", target={"kind": "group", "group": "lab"}, variants=[],
        pinned_variant=None, config={}, status="active", stage="canary",
        devices=["d1", "d2"], now=50.0,
    )
    for version, device in ((6, "d1"), (7, "d1"), (8, "d2")):
        store.save_manifest(version, device, "{}")  # what deploy() saves before publishing
    # d1: offered first, then reports. d2: reports before its offer is recorded.
    store.mark_offered(rid, "d1", stage="canary", version=7, previous_version=3, now=60.0)
    for r in (_report("d1", 7, RolloutPhase.DOWNLOADING, progress=0.5),
              _report("d2", 8, RolloutPhase.FAILED, reason="golden mismatch"),
              _report("d1", 6, RolloutPhase.ACTIVE)):  # an older manifest: not this rollout
        store.set_reported(r)
        store.record_rollout_report(r.device_id, r.rollout, r.ts)
    store.mark_offered(rid, "d2", stage="rest", version=8, previous_version=None, now=61.0)
    rows = {rd.device_id: rd for rd in store.rollout_devices(rid)}
    assert (rows["d1"].phase, rows["d1"].progress) == ("downloading", 0.5)
    assert (rows["d2"].phase, rows["d2"].reason, rows["d2"].stage) == (
        "failed", "golden mismatch", "rest")
    assert rows["d1"].previous_version == 3

    store.record_rollout_report("d1", RolloutReport(manifest_version=7,
                                                    phase=RolloutPhase.INSTALLED), 101.0)
    assert {rd.device_id: rd.phase for rd in store.rollout_devices(rid)}["d1"] == "installed"
    assert store.acknowledge_failures(rid) == 1
    assert store.acknowledge_failures(rid) == 0
    assert store.rollout_report("d2").phase == "failed"

    store.update_rollout(rid, status="halted", reason="x", note="halted: x")
    row = store.rollout(rid)
    assert row.status == "halted" and row.history[-1]["note"] == "halted: x"
    assert [r.id for r in store.rollouts(["halted"])] == [rid]
    assert store.rollouts(["active"]) == []
    store.add_rollout_devices(rid, ["d2", "d3"])
    assert [rd.device_id for rd in store.rollout_devices(rid)] == ["d1", "d2", "d3"]


def test_a_reported_group_is_a_request_the_operator_grants(store):
    store.set_reported(ReportedState(device_id="d1", online=True, group="field"))
    store.set_reported(ReportedState(device_id="d2", online=True, group="lab"))
    assert store.group_members("field") == [] and store.device_groups() == {}
    assert store.group_requests() == {"d1": "field", "d2": "lab"}
    assert store.approve_group_request("d1") == "field"
    assert store.approve_group_request("d3") is None
    store.set_device_groups("d2", ["lab", "other"])  # set-groups grants it too
    assert store.group_members("field") == ["d1"] and store.group_members("lab") == ["d2"]
    assert store.group_requests() == {}
    # Reporting another group later asks again; it never changes membership by itself.
    store.set_reported(ReportedState(device_id="d1", online=True, group="lab"))
    assert store.group_requests() == {"d1": "lab"}
    assert store.device_groups()["d1"] == ["field"] and store.group_members("lab") == ["d2"]


def test_a_report_counts_only_for_a_manifest_issued_to_the_device(store):
    store.set_device_groups("d1", ["lab"])
    store.set_device_groups("d2", [])
    rid = store.create_rollout(
        target_kind="devices", target={"kind": "devices", "devices": ["d1"]}, variants=[],
        pinned_variant=None, config={}, status="active", stage="canary", devices=["d1"])
    store.save_manifest(5, "d1", "{}")
    store.save_manifest(6, "d2", "{}")
    store.save_manifest(7, "lab", "{}")
    store.mark_offered(rid, "d1", stage="canary", version=5, previous_version=None)

    def report(device: str, version: int) -> bool:
        return store.record_rollout_report(
            device, RolloutReport(manifest_version=version, phase=RolloutPhase.INSTALLED), 1.0)

    assert not report("d1", 6), "another device's manifest"
    assert not report("d1", 9), "a version not issued yet"
    assert not report("d2", 5), "d1's manifest, claimed by d2"
    assert store.rollout_report("d1") is None and store.rollout_report("d2") is None
    assert store.rollout_devices(rid)[0].phase is None
    assert report("d1", 7), "its group's manifest is its own business"
    assert store.rollout_devices(rid)[0].phase is None
    # The version claimed early is offered now: the early claim was never kept.
    store.save_manifest(9, "d1", "{}")
    store.mark_offered(rid, "d1", stage=None, version=9, previous_version=5)
    assert store.rollout_devices(rid)[0].phase is None
    assert report("d1", 9)
    assert store.rollout_devices(rid)[0].phase == "installed"


def test_manifests_and_variant_lookup(store):
    store.save_manifest(1, "d1", "{}")
    store.save_manifest(2, "grp", "{}")
    store.save_manifest(3, "d1", '{"x": 1}')
    assert store.latest_manifest("d1").version == 3
    assert store.manifest(2).target == "grp"
    assert store.latest_manifest("nobody") is None
    store.add_variant("v", "b" * 64, "/p1", {"name": "v"}, {})
    store.add_variant("v", "c" * 64, "/p2", {"name": "v"}, {})
    assert store.variant("v").sha256 == "c" * 64, "a name means the newest registered"
    assert store.variant("b" * 64).path == "/p1"
    assert store.variant("w") is None


def test_telemetry_summary(store):
    store.set_reported(ReportedState(device_id="d1", online=True))
    for seq, dev in ((0, "d1"), (1, "d1"), (0, "d2")):
        store.add_telemetry(TelemetryBatch(
            device_id=dev, seq=seq, interval_start=10.0 * seq, interval_end=10.0 * seq + 5,
            variants={"small": VariantStats(requests=10, labeled=10, correct=9,
                                            latency_ms_p50=1.0)},
            switches=[SwitchEvent(ts=10.0 * seq + 1, from_variant=None, to_variant="small",
                                  reason="initial")],
        ))
    s = store.telemetry_summary()
    assert s["devices"] == 2 and s["batches"] == 3
    assert s["variants"]["small"]["requests"] == 30
    assert s["variants"]["small"]["devices"] == 2
    assert s["variants"]["small"]["accuracy"] == pytest.approx(0.9)
    assert s["switches"] == {"initial": 3}
    assert store.telemetry_summary(since=12.0)["batches"] == 1


def test_telemetry_is_stored_once_per_sequence_number(store):
    def batch(seq: int) -> TelemetryBatch:
        return TelemetryBatch(
            device_id="d1", seq=seq, interval_start=float(seq), interval_end=seq + 1.0,
            variants={"v": VariantStats(requests=10, labeled=10, correct=9)},
            switches=[SwitchEvent(ts=seq + 0.5, from_variant=None, to_variant="v",
                                  reason="initial")],
        )

    assert store.add_telemetry(batch(0)) and store.add_telemetry(batch(1))
    assert not store.add_telemetry(batch(1)), "a redelivered batch is ignored"
    assert store.telemetry_seqs("d1") == [0, 1]
    assert store.usage("d1") == {"v": {"requests": 20, "labeled": 20, "correct": 18,
                                       "errors": 0}}
    assert len(store.switches("d1")) == 2


def test_database_errors_leave_the_store_as_store_errors(store):
    """SQLAlchemy's exceptions stop at the store: a caller sees StoreError only."""
    import sqlalchemy

    store.save_manifest(7, "d1", "{}")
    with pytest.raises(StoreConflictError) as e:
        store.save_manifest(7, "d2", "{}")  # another server replica signed version 7 first
    assert isinstance(e.value.__cause__, sqlalchemy.exc.IntegrityError)
    assert store.manifest(7).target == "d1"
    with store.engine.begin() as conn:
        conn.execute(sqlalchemy.text("DROP TABLE events"))
    with pytest.raises(StoreError) as e:
        store.events()
    assert isinstance(e.value.__cause__, sqlalchemy.exc.SQLAlchemyError)
    # Telemetry's child rows go past SQLAlchemy on SQLite: its errors are the store's too,
    # and the group's transaction writes nothing.
    with store.engine.begin() as conn:
        conn.execute(sqlalchemy.text("DROP TABLE switches"))
    batch = TelemetryBatch(device_id="d9", seq=0, interval_start=1, interval_end=2,
                           switches=[SwitchEvent(ts=1.5, from_variant=None, to_variant="v",
                                                 reason="initial")])
    before = store.telemetry_count()
    with pytest.raises(StoreError, match="switches"):
        store.add_telemetry_batches([batch])
    assert store.telemetry_count() == before
    assert store.device("d9") is None


def test_an_unreachable_database_is_a_store_error(tmp_path):
    with pytest.raises(StoreError, match="cannot initialise store") as e:
        Store("postgresql+psycopg://nobody:s3cret@127.0.0.1:1/none?connect_timeout=2")
    assert "s3cret" not in str(e.value)
    with pytest.raises(StoreError, match="cannot open store"):
        Store("nosuchdialect://x")


def test_shadow_figures_sent_before_the_offer_do_not_count_however_they_are_dated(store):
    """A device may date a batch ahead (its own clock) and send it before the rollout it
    names exists: only figures the server received after the offer count."""
    def batch(seq: int, end: float) -> TelemetryBatch:
        stats = ShadowStats(reference="base", samples=10**6, agreed=10**6, divergence_sum=0.0)
        return TelemetryBatch(device_id="d1", seq=seq, interval_start=end - 5,
                              interval_end=end,
                              shadow=ShadowReport(rollout_id=1, variants={"v2": stats},
                                                  sampled=10))

    store.set_reported(ReportedState(device_id="d1", online=True))
    store.add_telemetry_batches([batch(0, 2.0**33)], received_at=50.0)  # sent ahead
    rid = store.create_rollout(target_kind="fleet", target={"kind": "fleet"}, variants=[],
                               pinned_variant=None, config={}, status="active",
                               stage="wave1", devices=["d1"], now=60.0)
    assert rid == 1
    store.mark_offered(rid, "d1", stage="wave1", version=1, previous_version=None, now=100.0)
    assert store.rollout_shadow_rows(rid, "wave1") == []
    store.add_telemetry_batches([batch(1, 130.0)], received_at=131.0)
    assert [r.interval_end for r in store.rollout_shadow_rows(rid, "wave1")] == [130.0]


def test_retention_takes_batches_dated_ahead_by_when_they_arrived(store):
    """A device's clock (or a lying device) may date batches centuries ahead: by its date
    such a batch would outlive every retention; it goes once it was received before the
    cut-off. Honest batches go by their interval, as before."""
    def batch(dev: str, seq: int, end: float) -> TelemetryBatch:
        return TelemetryBatch(device_id=dev, seq=seq, interval_start=end - 10,
                              interval_end=end)

    now = time.time()
    store.add_telemetry_batches([batch("liar", 0, 2.0**33)], received_at=now - 100 * 86_400)
    store.add_telemetry_batches([batch("liar", 1, 2.0**33 - 10)], received_at=now)
    store.add_telemetry_batches([batch("honest", 0, now - 40 * 86_400),
                                 batch("honest", 1, now - 86_400)])
    assert store.prune_telemetry(before=now - 30 * 86_400)["telemetry"] == 2
    assert (store.telemetry_seqs("liar"), store.telemetry_seqs("honest")) == ([1], [1])


def test_an_event_dated_far_ahead_is_dated_when_it_arrived_so_retention_takes_it(store):
    """Events dated years ahead (within the wire's bound) outlived every retention by
    their date: a device could fill the table for good. One dated more than a day ahead
    is stored as of its arrival; one within a day keeps its own date."""
    from prunefleet.shared.messages import Event, EventKind

    now = time.time()
    store.add_event(Event(device_id="liar", ts=2.0**33, kind=EventKind.INSTALLED, variant="v"))
    store.add_event(Event(device_id="skewed", ts=now + 3600, kind=EventKind.INSTALLED,
                          variant="v"))
    liar, = store.events("liar")
    assert now - 5 <= liar.ts <= time.time()
    assert store.events("skewed")[0].ts == now + 3600
    assert store.prune_telemetry(before=time.time() + 1)["events"] == 1
    assert store.events("liar") == []


def test_an_event_delivered_twice_is_one_row_and_a_different_one_is_another(store):
    """QoS 1 delivers at least once, and events carry no sequence number: a second
    delivery of the same event is not stored again (and says so); an event that differs
    in any field, or a device's same event at another time, is an event of its own."""
    from prunefleet.shared.messages import Event, EventKind, decode

    now = time.time()
    e = Event(device_id="d1", ts=now, kind=EventKind.INSTALL_FAILED, variant="v",
              detail="sha256 mismatch \u00e9\U0001f600")
    assert store.add_event(e) is True
    assert store.add_event(decode(Event, e.encode())) is False  # the same, off the wire
    assert store.write_reports([e]) == [False]  # in a group's one transaction too
    others = [e.model_copy(update={"detail": "other"}), e.model_copy(update={"ts": now + 1}),
              e.model_copy(update={"variant": None}),
              e.model_copy(update={"kind": EventKind.INSTALLED}),
              e.model_copy(update={"device_id": "d2"})]
    assert store.write_reports(others) == [True] * 5
    assert len(store.events("d1")) == 5 and len(store.events("d2")) == 1
    # A group's events: on PostgreSQL one statement for them all (a round trip each
    # otherwise), duplicates within the group told apart from the first.
    from sqlalchemy import event as sa_event

    statements: list[str] = []
    sa_event.listen(store.engine, "before_cursor_execute",
                    lambda conn, cur, stmt, *a: statements.append(stmt))
    many = [Event(device_id="d9", ts=now + i, kind=EventKind.ERROR, detail=f"e{i}")
            for i in range(50)]
    assert store.write_reports([*many, many[7], *many[:3]]) == [True] * 50 + [False] * 4
    assert len(store.events("d9")) == 50
    if store.engine.dialect.name == "postgresql":
        assert len([st for st in statements if "INSERT INTO events" in st]) == 1
    # Dated far ahead, it is stored as of its arrival, and still known again by its key.
    liar = Event(device_id="d3", ts=2.0**33, kind=EventKind.ERROR, detail="x")
    assert store.add_event(liar) is True and store.add_event(liar) is False
    assert len(store.events("d3")) == 1


def test_a_store_from_before_event_keys_takes_them_and_keeps_its_events(store):
    """An events table without the key column (a store written by an earlier version):
    opening it adds the column and its unique index; the old rows stay, and events from
    then on are stored once."""
    from prunefleet.shared.messages import Event, EventKind

    with store.engine.begin() as conn:
        conn.exec_driver_sql("DROP INDEX uq_events_dedupe_key")
        conn.exec_driver_sql("ALTER TABLE events DROP COLUMN dedupe_key")
        conn.exec_driver_sql("INSERT INTO events (device_id, ts, kind, variant, detail) VALUES"
                             " ('d1', 1.0, 'installed', 'v', ''),"
                             " ('d1', 1.0, 'installed', 'v', '')")
    s = Store(store.engine.url.render_as_string(hide_password=False))
    try:
        assert len(s.events("d1")) == 2  # kept as they were, never compared
        e = Event(device_id="d1", ts=2.0, kind=EventKind.INSTALLED, variant="v")
        assert s.add_event(e) is True and s.add_event(e) is False
        assert len(s.events("d1")) == 3
    finally:
        s.close()


def test_a_store_drops_the_per_device_index_of_variant_rows_and_reads_them_per_device(store):
    """An index on telemetry_variants.device_id cost each telemetry write a leaf of its own
    per device (a fifth of a transaction's time at 150 devices, docs/ingest.md): a store
    from before keeps it until opened by this version, which drops it; each device's
    figures still come from its own rows only."""
    from sqlalchemy import inspect

    with store.engine.begin() as conn:  # as an earlier version made it
        conn.exec_driver_sql("CREATE INDEX IF NOT EXISTS ix_telemetry_variants_device_id"
                             " ON telemetry_variants (device_id)")
    for seq, (dev, n) in enumerate((("d1", 10), ("d2", 7), ("d1", 5))):
        store.add_telemetry(TelemetryBatch(
            device_id=dev, seq=seq, interval_start=10.0 * seq, interval_end=10.0 * seq + 5,
            variants={"small": VariantStats(requests=n, labeled=n, correct=n - 1),
                      "dense": VariantStats(requests=1, errors=1)}))
    url = store.engine.url.render_as_string(hide_password=False)
    reopened = Store(url)
    try:
        with reopened.engine.connect() as conn:
            names = {i["name"] for i in inspect(conn).get_indexes("telemetry_variants")}
        assert "ix_telemetry_variants_device_id" not in names
        assert "ix_telemetry_variants_telemetry" in names
        assert reopened.usage("d1") == {
            "small": {"requests": 15, "labeled": 15, "correct": 13, "errors": 0},
            "dense": {"requests": 2, "labeled": 0, "correct": 0, "errors": 2}}
        assert reopened.usage("d2")["small"]["requests"] == 7
        assert reopened.usage("d3") == {}
    finally:
        reopened.close()


def test_a_replica_dropping_an_old_index_behind_a_long_read_never_stalls_ingest(
        monkeypatch, caplog):
    """PostgreSQL: a replica of this version opens a store that still has the old index
    while a long read (a pg_dump, say) holds the variant rows. A plain DROP INDEX waited
    for that read, and every replica's ingest queued behind the drop (found by a
    review). Now the drop does not block writes, gives up after its timeout, and the
    index goes at a later start."""
    import threading

    from sqlalchemy import inspect

    from prunefleet.server import store as store_module

    monkeypatch.setattr(store_module, "DROP_INDEX_LOCK_TIMEOUT", "1s")
    gen = pg_schema_url()
    url = next(gen)
    ingest = Store(url)
    try:
        with ingest.engine.begin() as conn:  # as an earlier version made it
            conn.exec_driver_sql("CREATE INDEX IF NOT EXISTS ix_telemetry_variants_device_id"
                                 " ON telemetry_variants (device_id)")

        def batch(seq: int) -> TelemetryBatch:
            return TelemetryBatch(device_id="d1", seq=seq, interval_start=float(seq),
                                  interval_end=seq + 1.0,
                                  variants={"v": VariantStats(requests=1)})

        ingest.add_telemetry(batch(0))
        reader = ingest.engine.connect()  # the long read: open until this test ends it
        reader.begin()
        reader.exec_driver_sql("SELECT count(*) FROM telemetry_variants").one()
        opened: list[Store] = []
        replica = threading.Thread(target=lambda: opened.append(Store(url)), daemon=True)
        stored = threading.Event()
        writer = threading.Thread(
            target=lambda: (ingest.add_telemetry(batch(1)), stored.set()), daemon=True)
        try:
            replica.start()
            deadline = time.monotonic() + 20
            with ingest.engine.connect() as watch:  # until its drop waits for the read
                while not watch.exec_driver_sql(
                        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                        " AND query LIKE 'DROP INDEX%%'").scalar():
                    assert time.monotonic() < deadline, "the replica never tried the drop"
                    watch.rollback()
                    time.sleep(0.01)
            writer.start()
            # The other replica's ingest is stored while the read still runs.
            assert stored.wait(30), "ingest waited behind the index drop"
            replica.join(30)
            assert opened, "the replica did not start"
        finally:
            reader.rollback()
            reader.close()
        with opened[0].engine.connect() as conn:
            names = {i["name"] for i in inspect(conn).get_indexes("telemetry_variants")}
        assert "ix_telemetry_variants_device_id" in names  # left for the next start
        assert "stays until the next start" in caplog.text
        opened[0].close()
        later = Store(url)  # no read in the way now
        with later.engine.connect() as conn:
            names = {i["name"] for i in inspect(conn).get_indexes("telemetry_variants")}
        later.close()
        assert "ix_telemetry_variants_device_id" not in names
        assert ingest.usage("d1")["v"]["requests"] == 2
    finally:
        ingest.close()
        gen.close()


def test_an_sqlite_too_old_for_the_store_is_refused_saying_so_and_nothing_is_made(
        tmp_path, monkeypatch):
    from prunefleet.server import store as store_module

    monkeypatch.setattr(store_module.sqlite3, "sqlite_version_info", (3, 22, 0))
    monkeypatch.setattr(store_module.sqlite3, "sqlite_version", "3.22.0")
    with pytest.raises(StoreError, match=r"SQLite 3\.22\.0 is too old.*3\.25\.0 or newer"):
        Store(sqlite_url(tmp_path / "fleet.db"))
    assert not (tmp_path / "fleet.db").exists()


def test_the_wal_is_copied_back_in_larger_steps_than_sqlites_default(tmp_path):
    """Each telemetry transaction rewrites the same leaves (one per device and index by
    device): copied back into the database every 1,000 WAL pages (SQLite's default), each
    was copied after nearly every commit. A transaction of about 1,500 pages is still in
    the WAL after the next one."""
    store = Store(sqlite_url(tmp_path / "fleet.db"))
    try:
        with store.engine.begin() as conn:
            conn.exec_driver_sql("CREATE TABLE bulk (x BLOB)")
        with store.engine.begin() as conn:  # about 1,500 pages of 4 KiB
            conn.exec_driver_sql(
                "WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM c"
                " WHERE n < 1500) INSERT INTO bulk SELECT randomblob(3500) FROM c")
        with store.engine.begin() as conn:
            conn.exec_driver_sql("INSERT INTO bulk VALUES (x'00')")
        with store.engine.connect() as conn:
            _busy, in_wal, _copied = conn.exec_driver_sql(
                "PRAGMA wal_checkpoint(PASSIVE)").one()
        # SQLite's default would have copied the first back and begun the WAL again.
        assert in_wal > 1500
    finally:
        store.close()


def test_a_wal_grown_behind_a_long_read_is_cut_back_once_copied(tmp_path, monkeypatch):
    """A reader holding its snapshot keeps the WAL from being copied back, so it grows
    past the checkpoint size; once copied, the file is cut back to the store's limit
    rather than kept at its largest for the life of the process (found by a review).
    Sizes scaled down: checkpoints every 200 pages, 256 KiB kept."""
    import sqlite3

    from prunefleet.server import store as store_module

    monkeypatch.setattr(store_module, "SQLITE_WAL_CHECKPOINT_PAGES", 200)
    monkeypatch.setattr(store_module, "SQLITE_WAL_KEEP_BYTES", 256 * 1024)
    store = Store(sqlite_url(tmp_path / "fleet.db"))
    wal = tmp_path / "fleet.db-wal"
    try:
        with store.engine.begin() as conn:
            conn.exec_driver_sql("CREATE TABLE bulk (x BLOB)")
        reader = sqlite3.connect(tmp_path / "fleet.db", isolation_level=None)
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM bulk").fetchone()  # its snapshot, held
        try:
            for _ in range(3):  # about 1,500 pages the checkpoints cannot copy past it
                with store.engine.begin() as conn:
                    conn.exec_driver_sql(
                        "WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM c"
                        " WHERE n < 500) INSERT INTO bulk SELECT randomblob(3500) FROM c")
            assert wal.stat().st_size > 4_000_000
        finally:
            reader.execute("COMMIT")
            reader.close()
        for _ in range(2):  # a checkpoint copies it all back; the next write begins again
            with store.engine.begin() as conn:
                conn.exec_driver_sql("INSERT INTO bulk SELECT randomblob(3500) FROM"
                                     " (SELECT 1 UNION ALL SELECT 2)")
        with store.engine.connect() as conn:
            conn.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)").one()
        assert wal.stat().st_size <= 256 * 1024 + 2 * 4120
    finally:
        store.close()


def test_replicas_upgrading_an_older_store_at_once_both_start(store, monkeypatch):
    """Two replicas starting at once on a store from before a column both find it
    missing, and both add it: the second's ALTER then meets the first's column, which
    must not stop it ("column already exists"). The race is forced: the second's check
    is made to answer "missing" after the first replica added the column."""
    from prunefleet.server import store as store_module
    from prunefleet.shared.signing import SigningKey

    with store.engine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE devices DROP COLUMN version_proof")
    url = store.engine.url.render_as_string(hide_password=False)
    Store(url).close()  # the first replica adds it
    real = store_module.inspect

    class Stale:
        """The second replica's view, taken before the first replica's ALTER."""

        def __init__(self, target: object) -> None:
            self._target = real(target)

        def __getattr__(self, name: str) -> object:
            return getattr(self._target, name)

        def get_columns(self, table: str) -> list:
            return [c for c in self._target.get_columns(table) if c["name"] != "version_proof"]

    with monkeypatch.context() as m:
        m.setattr(store_module, "inspect", Stale)
        second = Store(url)
    try:
        key = SigningKey.generate()
        second.set_reported(ReportedState(device_id="d1", online=True, manifest_version=4,
                                          version_proof=[key.certify(4)]))
        d = second.device("d1")
        assert d is not None and d.version_proof and d.version_proof[0]["keyid"]
    finally:
        second.close()


@pytest.mark.parametrize("operation", ["decommission", "approve"])
def test_an_operator_change_while_a_group_of_states_is_written_waits_its_turn(operation):
    """Ingest takes a device's row (its upsert) before the rows about it. A decommission
    deleted those first and the device's row last, so the two, on PostgreSQL, each held
    what the other wanted and one failed as a deadlock after a second; approving a group
    request deleted the request under the group's feet, and the group's write failed as
    stale (found by a review). Now both take the device's row first and wait their
    turn."""
    import threading

    from prunefleet.server import store as store_module
    from prunefleet.shared.messages import DeviceFacts

    gen = pg_schema_url()
    url = next(gen)
    ingest, operator = Store(url), Store(url)
    preload = store_module._Rows.preload
    try:
        facts = DeviceFacts(arch="x86_64", cores=2, device_class="c")
        r = ReportedState(device_id="d1", online=True, group="g", facts=facts)
        ingest.set_reported(r)
        ingest.set_measurements(r)
        preloaded, go = threading.Event(), threading.Event()

        def paused(self, *args):  # the group's rows are read; the decommission comes now
            preload(self, *args)
            preloaded.set()
            go.wait(10)

        store_module._Rows.preload = paused  # type: ignore[method-assign]
        out: dict[str, object] = {}

        def run(name: str, call) -> None:
            try:
                out[name] = call()
            except Exception as e:  # the outcome is what the test reads
                out[name] = e

        w = threading.Thread(target=run, args=("write", lambda: ingest.write_reports(
            [r.model_copy(update={"group": "h"})])))
        w.start()
        assert preloaded.wait(10)
        call = (lambda: operator.delete_device("d1")) if operation == "decommission" else (
            lambda: operator.approve_group_request("d1"))
        d = threading.Thread(target=run, args=("operator", call))
        d.start()
        d.join(0.5)
        assert d.is_alive()  # waiting for the device's row, holding nothing ingest needs
        go.set()
        w.join(10)
        d.join(10)
        if operation == "decommission":
            assert out == {"write": [True], "operator": True}
            assert ingest.device("d1") is None and ingest.device_measurements("d1") == (None, {})
        else:  # the group asked for in the state written first is the one approved
            assert out == {"write": [True], "operator": "h"}
            assert ingest.device_groups() == {"d1": ["h"]} and ingest.group_requests() == {}
    finally:
        store_module._Rows.preload = preload  # type: ignore[method-assign]
        ingest.close()
        operator.close()
        gen.close()


def test_shadow_figures_count_for_a_wave_only_after_the_offer_and_go_with_retention(store):
    def batch(dev: str, seq: int, end: float, rollout_id: int = 1) -> TelemetryBatch:
        stats = ShadowStats(reference="base", samples=10, agreed=9, divergence_sum=0.5)
        return TelemetryBatch(device_id=dev, seq=seq, interval_start=end - 5,
                              interval_end=end,
                              shadow=ShadowReport(rollout_id=rollout_id,
                                                  variants={"v2": stats}, sampled=10))

    for dev in ("d1", "d2"):
        store.set_reported(ReportedState(device_id=dev, online=True))
    rid = store.create_rollout(target_kind="fleet", target={"kind": "fleet"}, variants=[],
                               pinned_variant=None, config={}, status="active",
                               stage="wave1", devices=["d1", "d2"], now=0.0)
    store.mark_offered(rid, "d1", stage="wave1", version=1, previous_version=None, now=100.0)
    store.add_telemetry_batches([batch("d1", 0, 90.0), batch("d1", 1, 110.0),
                                 batch("d1", 2, 120.0, rollout_id=rid + 1),
                                 batch("d2", 0, 115.0)])
    rows = store.rollout_shadow_rows(rid, "wave1")
    assert [(r.device_id, r.interval_end, r.agreed) for r in rows] == [("d1", 110.0, 9)]

    assert store.prune_telemetry(before=112.0) == {"telemetry": 2, "events": 0}
    assert store.rollout_shadow_rows(rid, "wave1") == []
    assert store.telemetry_seqs("d1") == [2]

    assert store.delete_device("d1") and store.device("d1") is None
    assert store.telemetry_seqs("d1") == [] and store.rollout_devices(rid)[0].device_id == "d2"
    assert not store.delete_device("d1")
