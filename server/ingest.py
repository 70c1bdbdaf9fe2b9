"""The pure parts of telemetry ingest: per-device rate limits, "stored through" cursors,
the lag histogram and the reasons a message is dropped.

No I/O here: :class:`~prunefleet.server.fleet.FleetServer` feeds them what it received and
committed, and publishes what they say. Every structure is bounded, whatever devices send.
"""

from __future__ import annotations

import bisect
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field

__all__ = ["DROP_REASONS", "LAG_BUCKETS_S", "DeviceRateLimiter", "LagHistogram",
           "StoredCursors"]

# Why the server dropped a device message (the ``reason`` label of
# ``prunefleet_ingest_dropped``): a fixed set, never a device id.
DROP_REASONS = (
    "invalid",  # did not validate (bounds, cross-checks, size, nesting, not JSON)
    "wrong_device",  # the body names another device than the topic
    "rate_limited",  # over the device's token bucket
    "revoked",  # the device was revoked (`prunefleet devices revoke`): nothing it says counts
    "store_error",  # the store refused the write; the agent sends it again
    "inbound_full",  # the transport's inbound queue was full
    "error",  # an unexpected error on this message (logged with its traceback)
)

LAG_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


class DeviceRateLimiter:
    """A token bucket per device: ``rate_per_s`` sustained, ``burst`` at once.

    At most ``max_devices`` buckets are kept (least recently used first out); a bucket that
    is dropped starts full again, which only matters for a fleet larger than that.
    ``rate_per_s`` 0 turns limiting off.
    """

    def __init__(self, rate_per_s: float, burst: float, max_devices: int = 200_000) -> None:
        if rate_per_s < 0 or burst < 0:
            raise ValueError("rate and burst must not be negative")
        self.rate_per_s = rate_per_s
        self.burst = max(1.0, float(burst))
        self.max_devices = max_devices
        self._buckets: OrderedDict[str, list[float]] = OrderedDict()  # id -> [tokens, t]

    @property
    def enabled(self) -> bool:
        return self.rate_per_s > 0

    def allow(self, device_id: str, now: float) -> bool:
        if not self.enabled:
            return True
        b = self._buckets.get(device_id)
        if b is None:
            b = self._buckets[device_id] = [self.burst, now]
            if len(self._buckets) > self.max_devices:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(device_id)
            b[0] = min(self.burst, b[0] + (now - b[1]) * self.rate_per_s)
            b[1] = now
        if b[0] >= 1.0:
            b[0] -= 1.0
            return True
        return False

    def __len__(self) -> int:
        return len(self._buckets)


@dataclass
class _Cursor:
    through: int = -1  # every seq up to this one is stored (or given up by the agent)
    above: set[int] = field(default_factory=set)  # stored seqs past a gap


class StoredCursors:
    """Per device and incarnation, the highest ``seq`` such that every batch up to it is
    stored: the "stored through" cursor the server acknowledges to the agent.

    The agent says in each batch the lowest seq it still holds (``unconfirmed_from``); what
    lies below it was confirmed or given up, so the cursor passes any gap there. Seqs stored
    past a gap wait in a set (at most ``max_above``; one that does not fit is simply noted
    again when the agent re-sends it). At most ``max_keys`` cursors are kept, least recently
    used first out; a forgotten one is seeded from the store again (:meth:`seed`).
    """

    def __init__(self, max_above: int = 4096, max_keys: int = 200_000) -> None:
        self.max_above = max_above
        self.max_keys = max_keys
        self._cursors: OrderedDict[tuple[str, str], _Cursor] = OrderedDict()

    def known(self, device_id: str, incarnation: str) -> bool:
        return (device_id, incarnation) in self._cursors

    def seed(self, device_id: str, incarnation: str, stored: Iterable[int],
             floor: int | None = None) -> None:
        """Start (or refresh) a cursor from the seqs the store holds for this incarnation."""
        c = self._get(device_id, incarnation)
        self._floor(c, floor)
        for seq in stored:
            self._add(c, seq)
        self._advance(c)

    def note(self, device_id: str, incarnation: str, seq: int, floor: int | None) -> None:
        """``seq`` is in the store (just stored, or found there as a duplicate)."""
        c = self._get(device_id, incarnation)
        self._floor(c, floor)
        self._add(c, seq)
        self._advance(c)

    def through(self, device_id: str, incarnation: str) -> int:
        c = self._cursors.get((device_id, incarnation))
        return -1 if c is None else c.through

    def has_gap(self, device_id: str, incarnation: str) -> bool:
        c = self._cursors.get((device_id, incarnation))
        return c is not None and bool(c.above)

    def __len__(self) -> int:
        return len(self._cursors)

    # -- internals ------------------------------------------------------------------------
    def _get(self, device_id: str, incarnation: str) -> _Cursor:
        key = (device_id, incarnation)
        c = self._cursors.get(key)
        if c is None:
            c = self._cursors[key] = _Cursor()
            if len(self._cursors) > self.max_keys:
                self._cursors.popitem(last=False)
        else:
            self._cursors.move_to_end(key)
        return c

    @staticmethod
    def _floor(c: _Cursor, floor: int | None) -> None:
        if floor is not None and floor - 1 > c.through:
            c.through = floor - 1
            c.above = {s for s in c.above if s > c.through}

    def _add(self, c: _Cursor, seq: int) -> None:
        if seq > c.through + 1 and len(c.above) < self.max_above:
            c.above.add(seq)
        elif seq == c.through + 1:
            c.through = seq

    @staticmethod
    def _advance(c: _Cursor) -> None:
        while c.through + 1 in c.above:
            c.above.discard(c.through + 1)
            c.through += 1


class LagHistogram:
    """Seconds from the end of a batch's interval to its commit, in fixed buckets."""

    def __init__(self, buckets: tuple[float, ...] = LAG_BUCKETS_S) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, seconds: float) -> None:
        seconds = max(0.0, seconds)
        self.counts[bisect.bisect_left(self.buckets, seconds)] += 1
        self.sum += seconds
        self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        """``(le, count)`` pairs as Prometheus wants them, ``+Inf`` last."""
        out, total = [], 0
        for le, n in zip((*(f"{b:g}" for b in self.buckets), "+Inf"), self.counts,
                         strict=True):
            total += n
            out.append((le, total))
        return out
