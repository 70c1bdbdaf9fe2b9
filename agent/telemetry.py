"""Telemetry: per-interval aggregation and a bounded on-disk queue that survives restarts.

The one home of telemetry batching: :class:`Aggregator` cuts an interval into a batch,
a :class:`TelemetryQueue` keeps it (:class:`DiskQueue` on a device, :class:`MemoryQueue`
for a simulated one), :class:`TelemetrySender` sends it with a bounded number in flight.

A batch is written to ``<state>/telemetry/<seq>.json`` before it is sent, and deleted
only when the broker acknowledged its QoS 1 publish. When the queue is full the oldest
batch is dropped and the loss is counted in the next batch (``batches_dropped``).
Sequence numbers survive restarts (``next_seq``), so the server drops duplicates.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from prunefleet.shared.fsutil import atomic_write
from prunefleet.shared.messages import Reason, SwitchEvent, TelemetryBatch, VariantStats

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

    def record_energy(self, joules: float) -> None:
        with self._lock:
            self._energy_j += joules

    def cut(
        self, seq: int, end: float, readings: Readings | None, active: str | None,
        batches_dropped: int = 0,
    ) -> TelemetryBatch:
        """Close the interval into a batch and start the next one."""
        with self._lock:
            vars_, self._vars = self._vars, defaultdict(_VariantAgg)
            switches, self._switches = self._switches, []
            sd, self._switches_dropped = self._switches_dropped, 0
            energy, self._energy_j = self._energy_j, 0.0
            start, self._start = self._start, end
        stats = {}
        for name, a in vars_.items():
            p50 = p95 = p99 = None
            if a.latencies:
                p50, p95, p99 = (float(v) for v in np.percentile(a.latencies, [50, 95, 99]))
            stats[name] = VariantStats(
                requests=a.requests, errors=a.errors, labeled=a.labeled, correct=a.correct,
                latency_ms_p50=p50, latency_ms_p95=p95, latency_ms_p99=p99,
            )
        r = readings
        mem = None
        if r is not None and r.mem_available_percent is not None:
            mem = max(0.0, min(100.0, 100.0 - r.mem_available_percent))
        return TelemetryBatch(
            device_id=self.device_id, seq=seq, interval_start=start, interval_end=max(end, start),
            variants=stats, switches=switches, switches_dropped=sd, active_variant=active,
            battery_percent=_clip(r.battery_percent if r else None),
            charging=r.charging if r else None,
            cpu_percent=_clip(r.cpu_percent if r else None),
            mem_percent=mem,
            temperature_c=r.temperature_c if r else None,
            energy_j=energy, batches_dropped=batches_dropped,
        )


def _clip(v: float | None) -> float | None:
    return None if v is None else max(0.0, min(100.0, float(v)))


class TelemetryQueue(Protocol):
    """Where cut batches wait until they are acknowledged: on disk on a device, in memory
    for a simulated one. Bounded: past ``max_batches`` the oldest is dropped and counted."""

    max_batches: int
    dropped_total: int

    @property
    def issued(self) -> int:
        """Sequence numbers handed out so far (the next batch's ``seq``)."""
        ...

    def next_seq(self) -> int: ...
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
        self._dropped_unreported = 0
        self._next_seq = 0
        self._batches: dict[int, bytes] = {}

    @property
    def issued(self) -> int:
        return self._next_seq

    def next_seq(self) -> int:
        seq = self._next_seq
        self._next_seq += 1
        return seq

    def take_dropped(self) -> int:
        n, self._dropped_unreported = self._dropped_unreported, 0
        return n

    def pending(self) -> list[int]:
        return sorted(self._batches)

    def put(self, batch: TelemetryBatch) -> None:
        self._batches[batch.seq] = batch.encode()
        while len(self._batches) > self.max_batches:
            del self._batches[min(self._batches)]
            self.dropped_total += 1
            self._dropped_unreported += 1

    def read(self, seq: int) -> bytes | None:
        return self._batches.get(seq)

    def ack(self, seq: int) -> None:
        self._batches.pop(seq, None)


class DiskQueue:
    """Bounded FIFO of encoded batches, one file each, named by sequence number."""

    def __init__(self, directory: Path, max_batches: int = 1000):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_batches = max_batches
        self._seq_path = self.dir / "next_seq"
        self.dropped_total = 0
        self._dropped_unreported = 0
        try:
            self._next_seq = int(self._seq_path.read_text())
        except (FileNotFoundError, ValueError):
            existing = self.pending()
            self._next_seq = existing[-1] + 1 if existing else 0

    @property
    def issued(self) -> int:
        return self._next_seq

    def next_seq(self) -> int:
        seq = self._next_seq
        self._next_seq += 1
        atomic_write(self._seq_path, str(self._next_seq).encode())
        return seq

    def take_dropped(self) -> int:
        n, self._dropped_unreported = self._dropped_unreported, 0
        return n

    def path(self, seq: int) -> Path:
        return self.dir / f"{seq:012d}.json"

    def pending(self) -> list[int]:
        out = []
        for p in self.dir.glob("*.json"):
            if p.stem.isdigit():
                out.append(int(p.stem))
        return sorted(out)

    def put(self, batch: TelemetryBatch) -> None:
        atomic_write(self.path(batch.seq), batch.encode())
        pend = self.pending()
        while len(pend) > self.max_batches:
            oldest = pend.pop(0)
            self.path(oldest).unlink(missing_ok=True)
            self.dropped_total += 1
            self._dropped_unreported += 1
            log.warning("telemetry queue full: dropped batch %d", oldest)

    def read(self, seq: int) -> bytes | None:
        try:
            return self.path(seq).read_bytes()
        except FileNotFoundError:
            return None

    def ack(self, seq: int) -> None:
        self.path(seq).unlink(missing_ok=True)


class TelemetrySender:
    """Sends queued batches at QoS 1, a bounded number in flight, deletes on PUBACK."""

    def __init__(self, queue: TelemetryQueue, max_in_flight: int = 10):
        self.queue = queue
        self.max_in_flight = max_in_flight
        self._in_flight: dict[int, int] = {}  # mid → seq
        self.acked_total = 0

    def pump(self, publish, connected: bool) -> int:
        """Publish pending batches not yet in flight; returns how many were sent."""
        if not connected:
            return 0
        flying = set(self._in_flight.values())
        sent = 0
        for seq in self.queue.pending():
            if len(self._in_flight) >= self.max_in_flight:
                break
            if seq in flying:
                continue
            data = self.queue.read(seq)
            if data is None:
                continue
            mid = publish(data)
            self._in_flight[mid] = seq
            sent += 1
        return sent

    def acked(self, mid: int) -> None:
        seq = self._in_flight.pop(mid, None)
        if seq is not None:
            self.queue.ack(seq)
            self.acked_total += 1

    def disconnected(self) -> None:
        # paho re-sends unacknowledged QoS 1 messages itself after a reconnect; forget
        # them here too, so anything lost is sent again (the server drops duplicates).
        self._in_flight.clear()

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)
