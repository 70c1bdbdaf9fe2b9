"""Telemetry aggregation, the bounded on-disk queue, acknowledgements, birth and death."""

from __future__ import annotations

import json
import random

import pytest
from fleet_helpers import make_server, run_agent, wait_for

from prunefleet.agent.sensors import Readings
from prunefleet.agent.telemetry import Aggregator, DiskQueue, TelemetrySender
from prunefleet.shared.messages import Reason, TelemetryBatch, decode
from prunefleet.shared.transport import backoff_delay


def _batch(agg: Aggregator, q: DiskQueue, end: float) -> TelemetryBatch:
    r = Readings(battery_percent=50.0, charging=False, cpu_percent=20.0,
                 mem_available_percent=70.0, temperature_c=40.0, ts=end)
    return agg.cut(q.next_seq(), end, r, "dense", q.take_dropped())


def test_interval_batch_has_percentiles_switches_and_accuracy(tmp_path):
    agg = Aggregator("d1", start=100.0)
    for i in range(100):
        agg.record_request("dense", latency_ms=float(i + 1), correct=i % 10 != 0)
    agg.record_request("small", 0.5)
    agg.record_switch(101.0, "dense", "small", Reason.BATTERY_LOW)
    agg.record_energy(1.25)
    q = DiskQueue(tmp_path)
    b = _batch(agg, q, 110.0)
    d = b.variants["dense"]
    assert (d.requests, d.labeled, d.correct) == (100, 100, 90)
    assert 49 <= d.latency_ms_p50 <= 52 and 94 <= d.latency_ms_p95 <= 96
    assert b.variants["small"].labeled == 0
    assert [s.reason for s in b.switches] == [Reason.BATTERY_LOW]
    assert b.energy_j == 1.25 and b.mem_percent == 30.0
    assert decode(TelemetryBatch, b.encode()) == b
    q.put(b)
    nxt = _batch(agg, q, 120.0)  # the next interval starts empty
    assert nxt.variants == {} and nxt.interval_start == 110.0 and nxt.seq == b.seq + 1


def test_queue_drops_oldest_when_full_and_reports_the_loss(tmp_path):
    q = DiskQueue(tmp_path, max_batches=3)
    agg = Aggregator("d1", 0.0)
    batches = []
    for i in range(5):
        batches.append(_batch(agg, q, float(i + 1)))
        q.put(batches[-1])
    assert q.pending() == [2, 3, 4]
    assert q.dropped_total == 2
    batches.append(_batch(agg, q, 10.0))
    # each loss travels with the next batch cut, so the server can count it
    assert sum(b.batches_dropped for b in batches) == 2
    assert _batch(agg, q, 11.0).batches_dropped == 0


def test_sequence_numbers_survive_a_restart(tmp_path):
    q = DiskQueue(tmp_path)
    agg = Aggregator("d1", 0.0)
    for i in range(3):
        q.put(_batch(agg, q, float(i)))
    again = DiskQueue(tmp_path)
    assert again.pending() == [0, 1, 2]
    assert again.next_seq() == 3


def test_a_kill_while_a_batch_is_cut_leaves_no_gap_in_the_sequence(tmp_path):
    """The server confirms "stored through" a sequence number: a number handed out and
    never written (a kill between cutting a batch and queueing it) would hold its cursor
    below the gap for good, and the device's window would fill with batches it can never
    get confirmed. So a number is taken only when its batch is on disk; and a batch on disk
    whose number was not yet recorded (a kill between the two writes) is not reused."""
    q = DiskQueue(tmp_path)
    agg = Aggregator("d1", 0.0)
    for i in range(3):  # the server is away: 0, 1, 2 wait unconfirmed
        q.put(_batch(agg, q, float(i)))
    _batch(agg, q, 3.0)  # cut, then killed before put
    q = DiskQueue(tmp_path)
    b = _batch(agg, q, 4.0)
    assert b.seq == 3  # the number the killed cut had taken, never written
    q.put(b)
    # Killed after the batch file was written, before next_seq was: the file counts.
    (tmp_path / "next_seq").write_text("3")
    q = DiskQueue(tmp_path)
    assert q.pending() == [0, 1, 2, 3] and q.next_seq() == 4


@pytest.mark.parametrize("damage", [b"", b"garbage", b"\xff\xfe\x00"])
def test_a_damaged_next_seq_starts_a_new_incarnation_instead_of_reusing_numbers(tmp_path,
                                                                               damage):
    """Every batch confirmed and deleted, then next_seq damaged: numbering again from 0
    under the same incarnation would have the server drop each new batch as a duplicate of
    a stored one (and confirm it, and the agent delete it). A new incarnation instead."""
    q = DiskQueue(tmp_path)
    agg = Aggregator("d1", 0.0)
    for i in range(3):
        q.put(_batch(agg, q, float(i)))
        q.ack(i)
    old = q.incarnation
    (tmp_path / "next_seq").write_bytes(damage)
    q = DiskQueue(tmp_path)
    assert q.incarnation != old
    assert DiskQueue(tmp_path).incarnation == q.incarnation  # and it stays


# A fullwidth "d1" is alphanumeric to Python (isalnum, which the check was) but not to the
# wire: an agent that kept it stamped every batch with an incarnation no server takes.
@pytest.mark.parametrize("damage", [b"", b"not/alnum", b"\xff\xfe\x00",
                                    "\uff44\uff11".encode()])
def test_a_damaged_incarnation_is_taken_back_from_the_queued_batches(tmp_path, damage):
    """Batches queued under an incarnation must stay confirmable: a damaged incarnation
    file is read back from them (a new one would leave them re-sent forever, since the
    server confirms them under theirs); one that is not UTF-8 no longer stops the agent."""
    q = DiskQueue(tmp_path)
    agg = Aggregator("d1", 0.0)
    for i in range(3):
        b = _batch(agg, q, float(i))
        q.put(b.model_copy(update={"incarnation": q.incarnation}))
    old = q.incarnation
    (tmp_path / "incarnation").write_bytes(damage)
    q = DiskQueue(tmp_path)
    assert q.incarnation == old and q.pending() == [0, 1, 2] and q.next_seq() == 3
    # Both damaged: a new incarnation, and the queued batches carry it.
    (tmp_path / "incarnation").write_bytes(damage)
    (tmp_path / "next_seq").write_bytes(damage)
    q = DiskQueue(tmp_path)
    assert q.incarnation != old
    assert {TelemetryBatch.model_validate_json(q.read(s) or b"").incarnation
            for s in q.pending()} == {q.incarnation}


def test_a_batch_the_disk_cannot_take_is_counted_in_the_next_one(tmp_path, monkeypatch):
    """A full disk when an interval is cut: the batch is lost, not the agent, and the
    loss travels with the next batch (batches_dropped) so the server counts it; its
    number is used by the next batch, so no gap holds the server's cursor."""
    import prunefleet.agent.telemetry as telemetry

    q = DiskQueue(tmp_path)
    agg = Aggregator("d1", 0.0)
    q.put(_batch(agg, q, 1.0))
    real = telemetry.atomic_write

    def full(path, data):
        if path.suffix == ".json":
            raise OSError(28, "No space left on device")
        real(path, data)

    monkeypatch.setattr(telemetry, "atomic_write", full)
    q.put(_batch(agg, q, 2.0))
    monkeypatch.setattr(telemetry, "atomic_write", real)
    nxt = _batch(agg, q, 3.0)
    assert (nxt.seq, nxt.batches_dropped) == (1, 1)
    q.put(nxt)
    assert q.pending() == [0, 1] and q.dropped_total == 1


def test_batches_are_deleted_only_when_the_server_confirmed_them(tmp_path):
    q = DiskQueue(tmp_path)
    agg = Aggregator("d1", 0.0)
    for i in range(4):
        q.put(_batch(agg, q, float(i)))
    sent: list[bytes] = []

    def publish(data: bytes) -> int:
        sent.append(data)
        return 100 + len(sent)

    s = TelemetrySender(q, max_in_flight=3, ack_timeout_s=30.0)
    assert s.pump(publish, connected=False, now=0.0) == 0
    assert s.pump(publish, connected=True, now=0.0) == 3  # bounded in flight
    assert s.pump(publish, connected=True, now=10.0) == 0  # waiting for the server
    assert s.confirmed(q.incarnation, 0) == 1
    assert q.pending() == [1, 2, 3]
    assert s.pump(publish, connected=True, now=10.0) == 1  # a slot freed: batch 3
    assert s.pump(publish, connected=True, now=30.0) == 2  # 1 and 2 unconfirmed: again
    assert s.resent_total == 2
    assert [json.loads(d)["seq"] for d in sent] == [0, 1, 2, 3, 1, 2]
    assert s.confirmed("another-install", 3) == 0  # not this incarnation's cursor
    assert s.confirmed(q.incarnation, 3) == 3 and q.pending() == []


def test_batches_queued_before_incarnations_are_adopted_by_the_new_one(tmp_path):
    old = DiskQueue(tmp_path)
    agg = Aggregator("d1", 0.0)
    for i in range(2):
        old.put(_batch(agg, old, float(i)))  # cut without an incarnation, as before
    (tmp_path / "incarnation").unlink()  # what an agent from before left on disk
    q = DiskQueue(tmp_path)
    assert q.pending() == [0, 1]
    assert {decode(TelemetryBatch, q.read(s) or b"").incarnation for s in (0, 1)} \
        == {q.incarnation}


def test_incarnation_is_made_once_per_state_directory(tmp_path):
    q = DiskQueue(tmp_path / "a")
    assert DiskQueue(tmp_path / "a").incarnation == q.incarnation  # a restart keeps it
    assert DiskQueue(tmp_path / "b").incarnation != q.incarnation  # a re-flash does not
    agg = Aggregator("d1", 0.0)
    b = agg.cut(q.next_seq(), 1.0, None, None, incarnation=q.incarnation,
                unconfirmed_from=None)
    assert (b.incarnation, b.unconfirmed_from) == (q.incarnation, 0)


def test_reconnect_backoff_grows_and_is_jittered():
    rng = random.Random(1)
    delays = [[backoff_delay(a, 1.0, 60.0, rng) for _ in range(200)] for a in range(8)]
    for a, ds in enumerate(delays):
        cap = min(60.0, 2.0 ** a)
        assert all(cap / 2 <= d <= cap for d in ds)
        assert max(ds) - min(ds) > cap / 4, "retries of a fleet must spread out"
    assert max(delays[-1]) <= 60.0


def test_last_will_marks_a_vanished_device_offline(tmp_path, mosquitto):
    srv = make_server(tmp_path, mosquitto.url)
    try:
        with run_agent(tmp_path, mosquitto.url, device="dev-w") as agent:
            # (other tests' devices arrive too, as retained reported states)
            wait_for(lambda: (d := srv.store.device("dev-w")) and d.online, 15,
                     what="the device online")
            agent.transport.kill()  # power cut: no DISCONNECT, the broker sends the will
            wait_for(lambda: not srv.store.device("dev-w").online, 15,
                     what="the device marked offline by its Last Will")
    finally:
        srv.stop()


def test_a_long_queue_is_sent_and_confirmed_without_listing_its_directory(tmp_path,
                                                                        monkeypatch):
    """After an outage a device holds up to max_batches files: sending and confirming go
    by the queue's own index (the directory is listed once, at start), which stays what
    the disk holds through sends, confirmations, drops and a restart."""
    q = DiskQueue(tmp_path, max_batches=50)
    agg = Aggregator("d1", 0.0)
    for i in range(60):  # 10 over the bound: the oldest dropped
        q.put(_batch(agg, q, float(i + 1)))
    listed = []
    real_glob = type(tmp_path).glob
    monkeypatch.setattr(type(tmp_path), "glob",
                        lambda self, pattern: listed.append(pattern) or real_glob(self, pattern))
    s = TelemetrySender(q, max_in_flight=10)
    sent: list[bytes] = []
    for step in range(3):
        s.pump(sent.append, True, float(step))
        s.confirmed(q.incarnation, 10 + 10 * step + 9)
    assert listed == []  # nothing listed while sending and confirming
    on_disk = sorted(int(p.stem) for p in real_glob(tmp_path, "*.json"))
    assert q.pending() == on_disk == list(range(40, 60))
    assert len(sent) == 30 and q.dropped_total == 10
    monkeypatch.undo()
    assert DiskQueue(tmp_path, max_batches=50).pending() == on_disk


def test_an_incarnation_the_wire_takes_is_kept_whatever_its_characters(tmp_path):
    """An incarnation with '_' or '-' (the wire allows them: one set by an older or
    another agent) is the queue's, not damage: it is kept, with its batches' numbers."""
    q = DiskQueue(tmp_path)
    agg = Aggregator("d1", 0.0)
    (tmp_path / "incarnation").write_text("unit_7-a")
    q = DiskQueue(tmp_path)
    q.put(_batch(agg, q, 1.0).model_copy(update={"incarnation": "unit_7-a"}))
    q = DiskQueue(tmp_path)
    assert q.incarnation == "unit_7-a" and q.pending() == [0]
