"""``prunefleet store migrate``: a SQLite store with telemetry, a rollout and manifests is
copied to PostgreSQL; the counts match, a non-empty target is refused unless --force, and
the server on the new store signs manifests above the old store's."""

from __future__ import annotations

import pytest
from rollout_helpers import Fleet, pg_schema_url

from prunefleet.server.cli import main
from prunefleet.server.store import Store, sqlite_url
from prunefleet.shared.messages import Event, TelemetryBatch, VariantSpec, VariantStats


@pytest.fixture
def pg_url():
    gen = pg_schema_url()
    yield next(gen)
    gen.close()


def old_store(path) -> str:
    url = sqlite_url(path)
    s = Store(url)
    try:
        s.add_telemetry_batches([
            TelemetryBatch(device_id=f"m-{d}", seq=i, incarnation="x", interval_start=i,
                           interval_end=i + 1, variants={"v": VariantStats(requests=3)})
            for d in range(3) for i in range(2500)])
        s.set_device_groups("m-0", ["lab"])
        s.add_event(Event(device_id="m-1", ts=5.0, kind="installed", variant="v"))
        for v in (1, 2, 7):
            s.save_manifest(v, "m-0", f'{{"v": {v}}}')
        s.create_rollout(target_kind="devices", target={"kind": "devices", "devices": ["m-0"]},
                         variants=[], pinned_variant=None, policy=None, config={},
                         status="completed", stage="rest", devices=["m-0"], now=10.0)
        s.take_lease("rollout-controller", "old-replica", 60)
    finally:
        s.close()
    return url


def test_migrate_sqlite_to_postgresql_carries_everything_over(tmp_path, pg_url, capsys,
                                                              mosquitto):
    src = old_store(tmp_path / "fleet.db")
    assert main(["store", "migrate", "--from", src, "--to", pg_url, "--batch", "700"]) == 0
    out = capsys.readouterr().out
    assert "telemetry: 7500 rows" in out and "counts match" in out
    new = Store(pg_url)
    try:
        assert new.telemetry_count() == 7500
        assert new.telemetry_seqs("m-2") == list(range(2500))
        assert new.usage("m-1")["v"]["requests"] == 3 * 2500
        assert new.device_groups() == {"m-0": ["lab"]}
        assert [e.kind for e in new.events("m-1")] == ["installed"]
        assert new.manifest(7) is not None and new.next_manifest_version() == 8
        assert [r.status for r in new.rollouts()] == ["completed"]
        assert new.lease("rollout-controller") is None  # the old replica's: not carried
        # The ids continue above the copied ones.
        rid = new.create_rollout(target_kind="fleet", target={"kind": "fleet"}, variants=[],
                                 pinned_variant=None, policy=None, config={},
                                 status="active", stage="canary", devices=[], now=20.0)
        assert rid == 2
    finally:
        new.close()

    # A target that holds something is refused, unless --force.
    assert main(["store", "migrate", "--from", src, "--to", pg_url]) == 1
    err = capsys.readouterr().err
    assert "not empty" in err and "--force" in err
    assert main(["store", "migrate", "--from", src, "--to", pg_url, "--force"]) == 0
    capsys.readouterr()

    # The server on the new store signs above anything the old one issued.
    f = Fleet(tmp_path, mosquitto.url, db_url=pg_url)
    f.start_server()
    try:
        spec = VariantSpec(name="v", sha256="0" * 64, size=1, chunk_bytes=4096,
                           chunk_sha256=["0" * 64], input_shape=[1, 8], num_classes=2,
                           params=1, macs=1)
        assert f.svc.fleet.deploy("m-0", [spec]).version == 8
    finally:
        f.close()

    # And back to SQLite.
    back = sqlite_url(tmp_path / "back.db")
    assert main(["store", "migrate", "--from", pg_url, "--to", back]) == 0
    s = Store(back)
    try:
        assert s.telemetry_count() == 7500 and s.next_manifest_version() == 9
    finally:
        s.close()


def test_migrate_refuses_a_missing_default_store(tmp_path, capsys):
    code = main(["store", "migrate", "--state-dir", str(tmp_path), "--to",
                 sqlite_url(tmp_path / "new.db")])
    assert code == 2
    assert "no store at" in capsys.readouterr().err


def test_text_with_nul_characters_that_sqlite_took_reaches_postgresql_marked(
        tmp_path, pg_url, capsys):
    """Before ingest refused them at the door, SQLite stored a device's NUL characters (an
    error text, an event's detail), and PostgreSQL stores none in a text column: the copy
    failed as a whole. Each NUL now becomes U+FFFD, counted per column and printed; a NUL
    inside a JSON value needs nothing (it goes escaped), and every row is carried."""
    from prunefleet.shared.messages import ReportedState

    url = sqlite_url(tmp_path / "fleet.db")
    s = Store(url)
    try:
        s.set_reported(ReportedState(device_id="n-0", online=True, last_error="bad\x00input",
                                     counters={"odd\x00key": 3}))
        s.add_event(Event(device_id="n-0", ts=5.0, kind="error", detail="x\x00y\x00z"))
        s.add_event(Event(device_id="n-0", ts=6.0, kind="error", detail="clean"))
    finally:
        s.close()
    assert main(["store", "migrate", "--from", url, "--to", pg_url]) == 0
    out = capsys.readouterr().out
    assert "counts match" in out
    assert "devices.last_error: 1 values held NUL" in out
    assert "events.detail: 1 values held NUL" in out
    new = Store(pg_url)
    try:
        d = new.device("n-0")
        assert d is not None and d.last_error == "bad\ufffdinput"
        assert d.counters == {"odd\x00key": 3}
        assert sorted(e.detail for e in new.events("n-0")) == ["clean", "x\ufffdy\ufffdz"]
    finally:
        new.close()
