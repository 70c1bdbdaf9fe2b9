"""Telemetry: per-interval aggregation and a bounded on-disk queue that survives restarts.

The one home of telemetry batching: :class:`Aggregator` cuts an interval into a batch,
a :class:`TelemetryQueue` keeps it (:class:`DiskQueue` on a device, :class:`MemoryQueue`
for a simulated one), :class:`TelemetrySender` sends it with a bounded number in flight.

A batch is written to ``<state>/telemetry/<seq>.json`` before it is sent, and deleted
only when the server confirmed storing it (its "stored through" cursor on
``<prefix>/devices/<id>/acked``); what stays unconfirmed is sent again. When the queue is
full the oldest batch is dropped and the loss is counted in the next batch
(``batches_dropped``). Sequence numbers survive restarts (``next_seq``) and count within
the queue's incarnation, so the server drops duplicates but not a re-flashed device's data.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from prunefleet.shared.fsutil import atomic_write
from prunefleet.shared.messages import (
    MAX_ENERGY_J,
    MAX_LATENCY_MS,
    EnergySource,
    Reason,
    SwitchEvent,
    TelemetryBatch,
    VariantStats,
    is_incarnation,
)

from .sensors import Readings

log = logging.getLogger(__name__)

MAX_LATENCY_SAMPLES = 4096
MAX_SWITCHES = 256


@dataclass
class _VariantAgg:
    requests: int = 0
    errors: int = 0
    labeled: int = 0
    correct: int = 0
    latencies: list[float] = field(default_factory=list)


class Aggregator:
    """Collects what happens during one interval; thread-safe, bounded."""

    def __init__(self, device_id: str, start: float):
        self.device_id = device_id
        self._lock = threading.Lock()
        self._start = start
        self._vars: dict[str, _VariantAgg] = defaultdict(_VariantAgg)
        self._switches: list[SwitchEvent] = []
        self._switches_dropped = 0
        self._energy_j = 0.0
        self._energy_by_source: dict[str, float] = {}

    def record_request(
        self, variant: str, latency_ms: float, ok: bool = True, correct: bool | None = None
    ) -> None:
        with self._lock:
            a = self._vars[variant]
            a.requests += 1
            if not ok:
                a.errors += 1
            if correct is not None:
                a.labeled += 1
                a.correct += int(correct)
            if len(a.latencies) < MAX_LATENCY_SAMPLES:
                a.latencies.append(latency_ms)

    def record_switch(self, ts: float, old: str | None, new: str, reason: Reason) -> None:
        with self._lock:
            if len(self._switches) < MAX_SWITCHES:
                self._switches.append(
                    SwitchEvent(ts=ts, from_variant=old, to_variant=new, reason=reason)
                )
            else:
                self._switches_dropped += 1

    def record_energy(self, joules: float, source: EnergySource | None = None) -> None:
        """``source``: where the figure came from (profile's meter, or the estimate)."""
        with self._lock:
            self._energy_j += joules
            if source is not None:
                self._energy_by_source[source] = self._energy_by_source.get(source, 0.0) + joules

    def cut(
        self, seq: int, end: float, readings: Readings | None, active: str | None,
        batches_dropped: int = 0, incarnation: str = "", unconfirmed_from: int | None = None,
    ) -> TelemetryBatch:
        """Close the interval into a batch and start the next one."""
        with self._lock:
            vars_, self._vars = self._vars, defaultdict(_VariantAgg)
            switches, self._switches = self._switches, []
            sd, self._switches_dropped = self._switches_dropped, 0
            energy, self._energy_j = self._energy_j, 0.0
            by_source, self._energy_by_source = self._energy_by_source, {}
            start, self._start = self._start, end
        stats = {}
        for name, a in vars_.items():
            p50 = p95 = p99 = None
            if a.latencies:
                qs = np.percentile(np.clip(a.latencies, 0.0, MAX_LATENCY_MS * 0.999),
                                   [50, 95, 99])
                # The wire model refuses decreasing percentiles; rounding must not cause one.
                p50 = float(qs[0])
                p95 = max(p50, float(qs[1]))
                p99 = max(p95, float(qs[2]))
            stats[name] = VariantStats(
                requests=a.requests, errors=a.errors, labeled=a.labeled, correct=a.correct,
                latency_ms_p50=p50, latency_ms_p95=p95, latency_ms_p99=p99,
            )
        r = readings
        mem = None
        if r is not None and r.mem_available_percent is not None:
            mem = max(0.0, min(100.0, 100.0 - r.mem_available_percent))
        return TelemetryBatch(
            device_id=self.device_id, seq=seq, incarnation=incarnation,
            unconfirmed_from=seq if unconfirmed_from is None else min(unconfirmed_from, seq),
            interval_start=start, interval_end=max(end, start),
            variants=stats, switches=switches, switches_dropped=sd, active_variant=active,
            battery_percent=_clip(r.battery_percent if r else None),
            charging=r.charging if r else None,
            cpu_percent=_clip(r.cpu_percent if r else None),
            mem_percent=mem,
            temperature_c=(None if r is None or r.temperature_c is None
                           else max(-100.0, min(200.0, float(r.temperature_c)))),
            energy_j=min(max(energy, 0.0), MAX_ENERGY_J), batches_dropped=batches_dropped,
            energy_by_source={k: min(max(v, 0.0), MAX_ENERGY_J) for k, v in by_source.items()},
        )


def _clip(v: float | None) -> float | None:
    return None if v is None else max(0.0, min(100.0, float(v)))


def new_incarnation() -> str:
    return secrets.token_hex(8)


class TelemetryQueue(Protocol):
    """Where cut batches wait until the server confirmed storing them: on disk on a device,
    in memory for a simulated one. Bounded: past ``max_batches`` the oldest is dropped and
    counted. Sequence numbers count within ``incarnation``, made once per queue."""

    max_batches: int
    dropped_total: int
    incarnation: str

    @property
    def issued(self) -> int:
        """Sequence numbers handed out so far (the next batch's ``seq``)."""
        ...

    def next_seq(self) -> int:
        """The sequence number the next batch takes; handed out only by :meth:`put`, so
        a batch cut and never put (a kill in between) leaves no gap."""
        ...

    def take_dropped(self) -> int: ...
    def pending(self) -> list[int]: ...
    def put(self, batch: TelemetryBatch) -> None: ...
    def read(self, seq: int) -> bytes | None: ...
    def ack(self, seq: int) -> None: ...


class MemoryQueue:
    """A :class:`TelemetryQueue` in memory (lost with the process; for simulated devices)."""

    def __init__(self, max_batches: int = 1000) -> None:
        self.max_batches = max_batches
        self.dropped_total = 0
        self.incarnation = new_incarnation()
        self._dropped_unreported = 0
        self._next_seq = 0
        self._batches: dict[int, bytes] = {}  # in seq order: put in order, deleted from any

    @property
    def issued(self) -> int:
        return self._next_seq

    def next_seq(self) -> int:
        return self._next_seq

    def take_dropped(self) -> int:
        n, self._dropped_unreported = self._dropped_unreported, 0
        return n

    def pending(self) -> list[int]:
        return list(self._batches)

    def put(self, batch: TelemetryBatch) -> None:
        self._batches[batch.seq] = batch.encode()
        self._next_seq = max(self._next_seq, batch.seq + 1)
        while len(self._batches) > self.max_batches:
            del self._batches[next(iter(self._batches))]
            self.dropped_total += 1
            self._dropped_unreported += 1

    def read(self, seq: int) -> bytes | None:
        return self._batches.get(seq)

    def ack(self, seq: int) -> None:
        self._batches.pop(seq, None)


class DiskQueue:
    """Bounded FIFO of encoded batches, one file each, named by sequence number.

    ``<dir>/incarnation`` holds the random id made when the directory was first used: a
    re-flashed device (a new state directory) starts a new incarnation, so its sequence
    numbers starting again at 0 are not taken for duplicates by the server.
    """

    def __init__(self, directory: Path, max_batches: int = 1000):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_batches = max_batches
        self._seq_path = self.dir / "next_seq"
        self.dropped_total = 0
        self._dropped_unreported = 0
        # The queued seqs, lowest first: read from the directory once, then kept here, so
        # that sending and confirming do not list up to max_batches files on every step.
        self._index: dict[int, None] = dict.fromkeys(self._scan())
        # The batch file is written before next_seq (put): a kill between the two leaves a
        # file past the recorded next_seq, never a number handed out and not written.
        recorded = self._read_next_seq()
        existing = self.pending()
        self._next_seq = max(recorded or 0, existing[-1] + 1 if existing else 0)
        self.incarnation = self._load_incarnation(seq_known=recorded is not None)

    def _read_next_seq(self) -> int | None:
        """The recorded next_seq; None when missing or unreadable."""
        try:
            return int(self._seq_path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:  # ValueError: garbage, or not UTF-8
            log.warning("telemetry: %s is unreadable (%s)", self._seq_path, e)
            return None

    def _load_incarnation(self, seq_known: bool) -> str:
        """This queue's incarnation: from its file, else from the batches it holds. A
        new one when neither tells, or when the numbers it handed out are not known (its
        next_seq missing or damaged): numbering again from 0 under the same incarnation
        would have the server drop every new batch as a duplicate of a stored one, and
        confirm it, and the agent delete it."""
        path = self.dir / "incarnation"
        try:
            value = path.read_text().strip()
        except FileNotFoundError:
            value = ""
        except (OSError, ValueError) as e:  # ValueError: not UTF-8
            log.warning("telemetry: %s is unreadable (%s)", path, e)
            value = ""
        if not is_incarnation(value):
            # The queued batches carry it: taking a new one would leave them unconfirmable
            # (the server confirms them under theirs, which the agent would ignore).
            value = self._queued_incarnation()
            if value:
                atomic_write(path, value.encode())
        if is_incarnation(value) and seq_known:
            return value
        old = value
        value = new_incarnation()
        if old:
            log.warning("telemetry: the sequence numbers of incarnation %s are not known "
                        "(next_seq missing or damaged): continuing as %s", old, value)
        self._adopt(value, every=bool(old))
        # Its numbers are known from here on, also if no batch is ever put before a restart.
        atomic_write(self._seq_path, str(self._next_seq).encode())
        atomic_write(path, value.encode())
        return value

    def _queued_incarnation(self) -> str:
        """The incarnation the oldest readable queued batch names, or ""."""
        for seq in self.pending():
            try:
                value = str(json.loads(self.read(seq) or b"{}").get("incarnation") or "")
            except (ValueError, AttributeError):
                continue
            if is_incarnation(value):
                return value
        return ""

    def _adopt(self, incarnation: str, every: bool = False) -> None:
        """Give queued batches ``incarnation``: those without one (queued by an agent from
        before incarnations), or with ``every`` all of them (their own is given up). The
        server confirms only an incarnation's batches."""
        for seq in self.pending():
            data = self.read(seq)
            try:
                batch = TelemetryBatch.model_validate_json(data or b"")
            except ValueError:
                self.path(seq).unlink(missing_ok=True)  # unreadable: lost either way
                self._index.pop(seq, None)
                self.dropped_total += 1
                self._dropped_unreported += 1
                continue
            if every or not batch.incarnation:
                atomic_write(self.path(seq),
                             batch.model_copy(update={"incarnation": incarnation}).encode())

    @property
    def issued(self) -> int:
        return self._next_seq

    def next_seq(self) -> int:
        return self._next_seq

    def take_dropped(self) -> int:
        n, self._dropped_unreported = self._dropped_unreported, 0
        return n

    def path(self, seq: int) -> Path:
        return self.dir / f"{seq:012d}.json"

    def _scan(self) -> list[int]:
        out = []
        for p in self.dir.glob("*.json"):
            if p.stem.isdigit():
                out.append(int(p.stem))
        return sorted(out)

    def pending(self) -> list[int]:
        return list(self._index)

    def put(self, batch: TelemetryBatch) -> None:
        try:
            atomic_write(self.path(batch.seq), batch.encode())
        except OSError as e:  # a full disk, most likely: the interval is lost, and counted
            self.dropped_total += 1
            self._dropped_unreported += 1
            log.error("telemetry: batch %d not queued, counted as dropped: %s", batch.seq, e)
            return
        if batch.seq >= self._next_seq:
            self._next_seq = batch.seq + 1
            atomic_write(self._seq_path, str(self._next_seq).encode())
        last = next(reversed(self._index), -1)
        self._index[batch.seq] = None
        if batch.seq < last:  # not from next_seq(): keep the index in order
            self._index = dict.fromkeys(sorted(self._index))
        while len(self._index) > self.max_batches:
            oldest = next(iter(self._index))
            del self._index[oldest]
            self.path(oldest).unlink(missing_ok=True)
            self.dropped_total += 1
            self._dropped_unreported += 1
            log.warning("telemetry queue full: dropped batch %d", oldest)

    def read(self, seq: int) -> bytes | None:
        try:
            return self.path(seq).read_bytes()
        except FileNotFoundError:
            self._index.pop(seq, None)  # gone from the disk: gone from the queue
            return None

    def ack(self, seq: int) -> None:
        self.path(seq).unlink(missing_ok=True)
        self._index.pop(seq, None)


class TelemetrySender:
    """Sends queued batches at QoS 1 and deletes each one only when the server confirmed
    storing it (its "stored through" cursor, :meth:`confirmed`), never on the broker's
    PUBACK alone: the broker may still drop a message on its way to a slow server.

    A batch is in flight from its publish until confirmed; at most ``max_in_flight`` are,
    which paces a device to what the server stores. One not confirmed within
    ``ack_timeout_s`` is sent again (``resent_total``); the server drops the duplicate and
    confirms it again.
    """

    def __init__(self, queue: TelemetryQueue, max_in_flight: int = 10,
                 ack_timeout_s: float = 30.0):
        self.queue = queue
        self.max_in_flight = max_in_flight
        self.ack_timeout_s = ack_timeout_s
        self._sent: dict[int, float] = {}  # seq -> when it was (last) sent, monotonic
        self.sent_total = 0
        self.resent_total = 0
        self.acked_total = 0  # confirmed by the server, deleted from the queue
        self.stored_through = -1  # the server's last cursor for this incarnation

    def pump(self, publish, connected: bool, now: float) -> int:
        """Send what is due: unconfirmed batches past their timeout again, then new ones
        while fewer than ``max_in_flight`` are in flight. Returns how many were sent."""
        if not connected:
            return 0
        sent = 0
        for seq, at in list(self._sent.items()):
            if now - at < self.ack_timeout_s:
                continue
            data = self.queue.read(seq)
            if data is None:  # dropped from a full queue meanwhile
                del self._sent[seq]
                continue
            publish(data)
            self._sent[seq] = now
            self.resent_total += 1
            sent += 1
        if len(self._sent) >= self.max_in_flight:
            return sent
        for seq in self.queue.pending():
            if len(self._sent) >= self.max_in_flight:
                break
            if seq in self._sent:
                continue
            data = self.queue.read(seq)
            if data is None:
                continue
            publish(data)
            self._sent[seq] = now
            self.sent_total += 1
            sent += 1
        return sent

    def confirmed(self, incarnation: str, stored_through: int) -> int:
        """The server stored every batch of ``incarnation`` up to ``stored_through``:
        delete them. A cursor of another incarnation (an earlier install) is ignored.
        Returns how many batches were deleted."""
        if incarnation != self.queue.incarnation:
            return 0
        self.stored_through = max(self.stored_through, stored_through)
        n = 0
        for seq in self.queue.pending():
            if seq > stored_through:
                break
            self.queue.ack(seq)
            self._sent.pop(seq, None)
            n += 1
        self.acked_total += n
        return n

    def lag_s(self, now_wall: float) -> float:
        """Age of the oldest batch not yet confirmed (from the end of its interval)."""
        pending = self.queue.pending()
        data = self.queue.read(pending[0]) if pending else None
        if data is None:
            return 0.0
        try:
            return max(0.0, now_wall - float(json.loads(data)["interval_end"]))
        except (ValueError, KeyError, TypeError):
            return 0.0

    @property
    def in_flight(self) -> int:
        """Batches sent and not yet confirmed by the server."""
        return len(self._sent)
