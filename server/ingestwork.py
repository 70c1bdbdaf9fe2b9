"""What telemetry ingest does with a group of device messages, in one home for the two
places it runs: the server's ingest thread (the default), or worker processes
(``serve --ingest-processes N``) when one Python process's single core is the limit.

:class:`IngestCore` checks each message (topic, revocation, rate limit, schema, the device
it names), stores the group's telemetry in one transaction, writes reported states and
events, and moves the "stored through" cursors; it returns what the connection's owner
must do next (publish those cursors) and counts everything it dropped. It holds no MQTT
connection: the owner receives, and acknowledges each message to the broker only after
the outcome of its group is known (docs/ingest.md).

:class:`IngestWorkers` runs cores in spawned processes, each with its own store
connection. A group is split by device, so a device's messages (and its cursor, rate
limit and revocation) always meet the same worker; the owner acknowledges a group when
every part of it is done. A worker that dies is started again and given its unfinished
parts once more (storing is idempotent).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import multiprocessing as mp
import threading
import time
import zlib
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

from prunefleet.shared.errors import ProtocolError, TopicError
from prunefleet.shared.fsutil import atomic_write
from prunefleet.shared.gctune import tune_for_throughput
from prunefleet.shared.messages import (
    MAX_SEQ,
    Event,
    ReportedState,
    TelemetryBatch,
    decode,
    is_incarnation,
)
from prunefleet.shared.topics import Topics

from .errors import StoreConflictError, StoreDataError, StoreError
from .ingest import DROP_REASONS, DeviceRateLimiter, LagHistogram, StoredCursors
from .store import Store

log = logging.getLogger(__name__)

REVOKED_REFRESH_S = 5.0
# Reported states and events the store refused, held per process to be written again.
MAX_UNWRITTEN = 10_000
# ...and at most this much of them as kept in the held file (the oldest dropped past it,
# as store_error): one device's events of 2,048 emoji each would make 10,000 of them a
# file of 84 MB, written again after every group of an outage.
MAX_HELD_BYTES = 16 * 2**20

# What an ingest probe starts with (FleetServer.probe_ingest); never stored.
PROBE_MAGIC = b"prunefleet-ingest-probe:"

# A message as the owner hands it over: (topic, payload).
Message = tuple[str, bytes]
# A cursor to publish: (device_id, incarnation, stored_through).
Cursor = tuple[str, str, int]


@dataclass
class IngestCounters:
    telemetry: int = 0
    duplicates: int = 0
    reported: int = 0
    events: int = 0
    event_duplicates: int = 0  # deliveries of an event stored already
    invalid: int = 0  # did not validate, named another device, or hit a bug
    # Rollout reports about a manifest never issued to the reporting device: ignored.
    unoffered_reports: int = 0
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DROP_REASONS, 0))
    transactions: int = 0  # telemetry write transactions (one per group of messages)
    acks_published: int = 0  # "stored through" cursors published to devices
    queue_depth: int = 0  # messages received and not yet handled, at the last group
    # Reported states and events the store refused, held to be written again (a gauge).
    unwritten: int = 0
    # Times the network thread waited for room in a full inbound queue (back-pressure on
    # the broker: nothing dropped).
    inbound_waits: int = 0
    lag: LagHistogram = field(default_factory=LagHistogram)  # interval end → commit

    @classmethod
    def merged(cls, parts: Iterable[IngestCounters]) -> IngestCounters:
        """The sum of several processes' counters (the queue depth too)."""
        out = cls()
        for p in parts:
            for name in ("telemetry", "duplicates", "reported", "events", "event_duplicates",
                         "invalid", "unoffered_reports", "transactions", "acks_published",
                         "queue_depth", "inbound_waits", "unwritten"):
                setattr(out, name, getattr(out, name) + getattr(p, name))
            for reason, n in p.dropped.items():
                out.dropped[reason] = out.dropped.get(reason, 0) + n
            out.lag.counts = [a + b for a, b in zip(out.lag.counts, p.lag.counts, strict=True)]
            out.lag.sum += p.lag.sum
            out.lag.count += p.lag.count
        return out


@dataclass
class GroupOutcome:
    """What the owner of the connection does after a group: publish ``cursors``; wait a
    little when ``store_failed`` (a store that is down is not hammered). Every message of
    the group is acknowledged to the broker either way: stored, or dropped and counted
    (a telemetry batch the store refused stays unconfirmed on its device, which sends it
    again)."""

    cursors: list[Cursor] = field(default_factory=list)
    probe_seen: bool = False
    store_failed: bool = False

    def add(self, other: GroupOutcome) -> None:
        self.cursors += other.cursors
        self.probe_seen |= other.probe_seen
        self.store_failed |= other.store_failed


@dataclass
class Admitted:
    """A group checked and decoded by :meth:`IngestCore.admit`, not yet written."""

    probe_seen: bool = False
    batches: list[TelemetryBatch] = field(default_factory=list)
    # Reported states and events, (topic, message), in the order they arrived.
    states: list[tuple[str, ReportedState | Event]] = field(default_factory=list)
    # Telemetry batches refused as invalid whose (device, incarnation, seq, floor) could
    # still be read: the cursor passes them (see IngestCore._refused_key).
    refused: list[tuple[str, str, int, int | None]] = field(default_factory=list)


class _WrongDevice(ProtocolError):
    """A message whose body names another device than its topic."""


def _no_nul(payload: bytes) -> None:
    """Refuse a reported state or event with a NUL character in its text (JSON writes one
    as ``\\u0000``, behind an odd number of backslashes): PostgreSQL takes none in text,
    and one such message failed its whole group's one-transaction write, every state of
    the group then written again alone. Any device could do that to every group it
    landed in (found by a review). Telemetry's text is names and codes, which allow none."""
    at = payload.find(b"u0000")
    while at > 0:
        back = at
        while back > 0 and payload[back - 1] == 0x5C:  # a backslash
            back -= 1
        if (at - back) % 2:
            raise ProtocolError("a NUL character in its text, which the store does not take")
        at = payload.find(b"u0000", at + 1)


def _refused_key(device_id: str, payload: bytes) -> tuple[str, str, int, int | None] | None:
    """(device, incarnation, seq, unconfirmed_from) of a telemetry batch that failed
    validation, when its JSON still says them plainly and names its topic's device."""
    if len(payload) > TelemetryBatch.max_bytes:
        return None
    try:
        data = json.loads(payload)
    except (ValueError, RecursionError):
        return None
    if not isinstance(data, dict) or data.get("device_id") != device_id:
        return None
    incarnation, seq, floor = (data.get("incarnation"), data.get("seq"),
                               data.get("unconfirmed_from"))
    if not isinstance(incarnation, str) or not is_incarnation(incarnation):
        return None
    if type(seq) is not int or not 0 <= seq <= MAX_SEQ:
        return None
    if floor is not None and (type(floor) is not int or not 0 <= floor <= seq):
        floor = None
    return device_id, incarnation, seq, floor

class IngestCore:
    """One process's ingest state (rate limits, revocations, cursors, counters) and the
    work on a group."""

    def __init__(self, store: Store, topics: Topics, *, share_group: str | None = None,
                 device_rate_per_s: float = 20.0, device_burst: float = 200.0,
                 held_path: Path | None = None) -> None:
        """``held_path``: a file where the reported states and events the store refused
        are kept (beside this process's memory) before their group is acknowledged, and
        read back at start, so that a server dying while its store is down loses none."""
        self.store = store
        self.topics = topics
        self.share_group = share_group
        self.limiter = DeviceRateLimiter(device_rate_per_s, device_burst)
        self.cursors = StoredCursors()
        self.counters = IngestCounters()
        self._drop_lock = threading.Lock()
        # Revoked devices, re-read from the store at most every REVOKED_REFRESH_S: the
        # broker refuses them once reloaded, and until then nothing they say counts.
        self._revoked: frozenset[str] = frozenset()
        self._revoked_read = -1e18
        # Reported states (the latest per device) and events the store refused, written
        # again before the next group's; at most MAX_UNWRITTEN, the oldest dropped past it.
        self._unwritten: OrderedDict[tuple[str, ...], tuple[str, ReportedState | Event]] = (
            OrderedDict())
        self._event_ids = itertools.count()
        self.held_path = held_path
        if held_path is not None:
            self._load_held(held_path)

    # -- revocations ----------------------------------------------------------------------
    def revoked(self, now: float | None = None) -> frozenset[str]:
        """The revoked devices (from the store, cached for ``REVOKED_REFRESH_S``)."""
        now = time.monotonic() if now is None else now
        if now - self._revoked_read >= REVOKED_REFRESH_S:
            try:
                self._revoked = frozenset(self.store.revocations())
                self._revoked_read = now
            except StoreError as e:
                log.warning("cannot read revocations (keeping the last known): %s", e)
        return self._revoked

    def forget_revocations(self) -> None:
        """Read the revocations again at the next message (after a revoke)."""
        self._revoked_read = -1e18

    # -- a group --------------------------------------------------------------------------
    def process(self, messages: list[Message]) -> GroupOutcome:
        """A group, checked and written: :meth:`admit`, then :meth:`commit`."""
        return self.commit(self.admit(messages))

    def admit(self, messages: list[Message]) -> Admitted:
        """The checks of a group, without writing anything: topic, revocation, rate limit,
        schema and the device the body names. What fails is dropped and counted here. One
        thread admits (the rate limits are its own); another may meanwhile
        :meth:`commit` the group before."""
        out = Admitted()
        now = time.monotonic()
        # Any message on the ingest subscription proves that it delivers (another
        # server's probe too); after an outage the session's backlog comes before the
        # probe, however long it takes.
        out.probe_seen = bool(messages)
        for topic, payload in messages:
            if payload.startswith(PROBE_MAGIC):  # a server's, or a device playing one
                continue  # never stored
            self._admit(topic, payload, now, out)
        return out

    def commit(self, admitted: Admitted) -> GroupOutcome:
        """Write an admitted group: its reported states and events, in order, then its
        telemetry in one transaction; the cursors that moved. Groups are committed in the
        order they were admitted, by one thread."""
        out = GroupOutcome(probe_seen=admitted.probe_seen)
        held = list(self._unwritten.values())
        self._unwritten.clear()
        pending = [*held, *admitted.states]
        if len(pending) > 1 and self._write_states(pending):
            pending = []
        for topic, message in pending:  # one at a time: each failure costs only itself
            try:
                self._write_state(message)
            except (StoreDataError, StoreConflictError) as e:
                # Refused for good (a value the database does not take, a row it will not
                # have): held, it would be tried again with every group for ever, and fail
                # every group's one-transaction write with it.
                self.drop("invalid", topic, detail=f"the store refuses it: {e}")
            except StoreError as e:
                # Acknowledged to the broker with its group, and nothing sends it again
                # (an agent reports a state when it changes): held here and written again
                # with the next group, instead of dropped.
                out.store_failed = True
                self._hold(topic, message, e, already=bool(held))
            except Exception:
                self.drop("error", topic)
                log.exception("ingest failed on %s", topic)
        if held and not self._unwritten:
            log.info("the store took the %d held states and events", len(held))
        if [id(m) for _, m in held] != [id(m) for _, m in self._unwritten.values()]:
            self._save_held()  # what is held changed: kept before the group's ack
        self.counters.unwritten = len(self._unwritten)
        if admitted.batches:
            cursors = self._store_batches(admitted.batches)
            if cursors is None:
                out.store_failed = True
            else:
                out.cursors = cursors
        if admitted.refused:
            out.cursors = self._pass_refused(admitted.refused, out.cursors)
        return out

    def _pass_refused(self, refused: list[tuple[str, str, int, int | None]],
                      cursors: list[Cursor]) -> list[Cursor]:
        """Let the cursors pass batches refused as invalid (counted as ``invalid``): the
        agent re-sends what stays unconfirmed, and one batch no server takes (a bound an
        older agent does not know, a damaged queue file) held its cursor, and its window,
        until the batch aged out of its queue: hours."""
        moved = {(d, i): t for d, i, t in cursors}
        try:
            for device_id, incarnation, seq, floor in refused:
                self._note(device_id, incarnation, seq, floor)
                through = self.cursors.through(device_id, incarnation)
                if through >= 0:
                    moved[(device_id, incarnation)] = through
        except StoreError as e:
            log.warning("cannot seed a cursor past a refused batch (next time): %s", e)
        return [(d, i, t) for (d, i), t in moved.items()]

    def _admit(self, topic: str, payload: bytes, now: float, out: Admitted) -> None:
        """Check one message and add it to ``out``, or drop it."""
        try:
            device_id, channel = self.topics.parse_device(topic)
        except TopicError:
            self.drop("invalid", topic)
            return
        if device_id in self.revoked(now):
            self.drop("revoked", topic)
            return
        if not self.limiter.allow(device_id, now):
            self.drop("rate_limited", topic)
            return
        try:
            if channel == "telemetry":
                try:
                    b = decode(TelemetryBatch, payload)
                except ProtocolError:
                    if (key := _refused_key(device_id, payload)) is not None:
                        out.refused.append(key)
                    raise
                _same_device(device_id, b.device_id)
                out.batches.append(b)
            elif channel == "reported":
                if payload:  # empty: a retained state cleared
                    _no_nul(payload)
                    r = decode(ReportedState, payload)
                    _same_device(device_id, r.device_id)
                    out.states.append((topic, r))
            elif channel == "events":
                _no_nul(payload)
                e = decode(Event, payload)
                _same_device(device_id, e.device_id)
                out.states.append((topic, e))
        except _WrongDevice as e:
            self.drop("wrong_device", topic, detail=str(e))
        except ProtocolError as e:
            self.drop("invalid", topic, detail=str(e))
        except Exception:
            self.drop("error", topic)
            log.exception("ingest failed on %s", topic)

    @property
    def has_unwritten(self) -> bool:
        """Reported states or events the store refused, to be written again."""
        return bool(self._unwritten)

    def _hold(self, topic: str, message: ReportedState | Event, e: StoreError,
              already: bool = False) -> None:
        """Hold a state or event the store refused (``already``: some were held before
        this group, and that was said then)."""
        if not self._unwritten and not already:
            log.warning("the store refused a device's state or event (held, written again "
                        "with the next group): %s", e)
        key = self._held_key(message)
        self._unwritten.pop(key, None)
        self._unwritten[key] = (topic, message)
        while len(self._unwritten) > MAX_UNWRITTEN:
            _, (old_topic, _) = self._unwritten.popitem(last=False)
            self.drop("store_error", old_topic, detail=str(e))

    def _held_key(self, message: ReportedState | Event) -> tuple[str, ...]:
        """A state is held under its device (only the latest counts), an event alone."""
        if isinstance(message, ReportedState):
            return ("reported", message.device_id)
        return ("event", str(next(self._event_ids)))

    def _save_held(self) -> None:
        """Keep what is held in ``held_path`` (none: the file goes), before the group is
        acknowledged. A disk that refuses costs the copy, never the group."""
        path = self.held_path
        if path is None:
            return
        try:
            if not self._unwritten:
                path.unlink(missing_ok=True)
                return
            rows = [(key, json.dumps({"topic": topic, "event": isinstance(m, Event),
                                      "message": m.model_dump(mode="json")},
                                     ensure_ascii=False).encode())
                    for key, (topic, m) in self._unwritten.items()]
            total = sum(len(row) for _, row in rows)
            while total > MAX_HELD_BYTES and len(rows) > 1:
                key, row = rows.pop(0)
                total -= len(row)
                topic, _ = self._unwritten.pop(key)
                self.drop("store_error", topic,
                          detail=f"more than {MAX_HELD_BYTES} bytes held while the store refuses")
            atomic_write(path, b"[" + b",".join(row for _, row in rows) + b"]", mode=0o600)
        except OSError as e:
            log.error("cannot keep %d held states and events in %s (held in memory only): %s",
                      len(self._unwritten), path, e)

    def _load_held(self, path: Path) -> None:
        """What an earlier process held (it stopped, or died, while the store refused)."""
        for item in _read_held(path):
            try:
                topic, raw = str(item["topic"]), item["message"]
                message: ReportedState | Event = (
                    Event.model_validate(raw) if item["event"]
                    else ReportedState.model_validate(raw))
            except (KeyError, TypeError, ValueError) as e:
                log.error("a held state or event in %s cannot be read (lost): %s", path, e)
                continue
            key = self._held_key(message)
            self._unwritten.pop(key, None)
            self._unwritten[key] = (topic, message)
        self.counters.unwritten = len(self._unwritten)
        if self._unwritten:
            log.warning("%d reported states and events held by an earlier run (the store "
                        "had refused them): written with the first group", len(self._unwritten))

    def _write_states(self, pending: list[tuple[str, ReportedState | Event]]) -> bool:
        """The group's reported states and events in one transaction; False when the
        store refused it (then each is written alone, as :meth:`_write_state`)."""
        try:
            counted = self.store.write_reports([m for _, m in pending])
        except StoreError as e:
            log.debug("%d reported states and events not written together (%s): one at a "
                      "time instead", len(pending), e)
            return False
        except Exception:
            log.exception("writing %d reported states and events at once failed; one at "
                          "a time instead", len(pending))
            return False
        for (_, message), offered in zip(pending, counted, strict=True):
            self._count_state(message, offered)
        return True

    def _write_state(self, message: ReportedState | Event) -> None:
        if isinstance(message, ReportedState):
            r = message
            self.store.set_reported(r)
            # The device's facts and on-device profiles, kept per device and aggregated
            # per device class (only profiles of registered variants it has count).
            self.store.set_measurements(r)
            offered = r.rollout is None or self.store.record_rollout_report(
                r.device_id, r.rollout, r.ts or time.time())
        else:
            offered = self.store.add_event(message)
        self._count_state(message, offered)

    def _count_state(self, message: ReportedState | Event, offered: bool) -> None:
        """Count a written state (``offered``: False for a rollout report about a
        manifest never offered to its device, ignored) or event (False: stored already,
        another delivery of it)."""
        if isinstance(message, ReportedState):
            if not offered:
                self.counters.unoffered_reports += 1
            self.counters.reported += 1
        elif offered:
            self.counters.events += 1
        else:
            self.counters.event_duplicates += 1

    def _store_batches(self, batches: list[TelemetryBatch]) -> list[Cursor] | None:
        """One transaction for the group; the cursors it moved, to publish, or None when
        the store refused the group (counted as dropped) or, once it was written, its
        cursors could not be read (counted as stored, no cursor published)."""
        try:
            stored = self.store.add_telemetry_batches(batches)
        except StoreError as e:
            # Unconfirmed, the agents send these again.
            self.drop("store_error", f"{len(batches)} telemetry batches", len(batches),
                      detail=str(e))
            return None
        self.counters.transactions += 1
        committed = time.time()
        touched: dict[tuple[str, str], None] = {}
        for b, new in zip(batches, stored, strict=True):
            if new:
                self.counters.telemetry += 1
                self.counters.lag.observe(committed - b.interval_end)
            else:
                self.counters.duplicates += 1
        try:
            # Stored: a store that fails from here on costs the cursors (the agents send
            # these again and the copies are recognised), not the count of what is stored.
            self._seed_cursors(batches)
            for b in batches:
                if b.incarnation:  # agents from before acknowledgements have none
                    self._note_stored(b)
                    touched[(b.device_id, b.incarnation)] = None
        except StoreError as e:
            log.warning("a group was stored, but its cursors could not be read: %s", e)
            return None
        cursors = []
        for device_id, incarnation in touched:
            through = self.cursors.through(device_id, incarnation)
            if through >= 0:
                cursors.append((device_id, incarnation, through))
        return cursors

    def _seed_cursors(self, batches: list[TelemetryBatch]) -> None:
        """Seed the cursors of the group's (device, incarnation) keys this process has not
        met yet from the store, in one query for all of them (after a restart, or the first
        contact with a fleet, every key of a group is new)."""
        starts: dict[tuple[str, str], int] = {}
        for b in batches:
            key = (b.device_id, b.incarnation)
            if b.incarnation and key not in starts and not self.cursors.known(*key):
                starts[key] = b.unconfirmed_from or 0
        if not starts:
            return
        for key, seqs in self.store.stored_seqs_many(starts).items():
            self.cursors.seed(*key, seqs, starts[key])

    def _note_stored(self, b: TelemetryBatch) -> None:
        self._note(b.device_id, b.incarnation, b.seq, b.unconfirmed_from)

    def _note(self, device_id: str, incarnation: str, seq: int, floor: int | None) -> None:
        """``seq`` of that incarnation is settled (stored, or refused for good)."""
        cursors, key = self.cursors, (device_id, incarnation)
        if not cursors.known(*key):  # first batch of it this process sees: ask the store
            cursors.seed(*key, self.store.stored_seqs(*key, floor or 0), floor or 0)
        cursors.note(*key, seq, floor)
        if self.share_group and cursors.has_gap(*key):
            # Another server may have stored what this one misses.
            cursors.seed(*key, self.store.stored_seqs(*key, cursors.through(*key) + 1))

    def drop(self, reason: str, where: str, n: int = 1, detail: str = "") -> None:
        """Count a drop; log the first few of each reason, then every 1000th. The admitting
        and the committing thread both drop."""
        dropped = self.counters.dropped
        with self._drop_lock:
            before = dropped[reason]
            dropped[reason] = before + n
            if reason in ("invalid", "wrong_device", "error"):
                self.counters.invalid += n
        if before < 10 or before // 1000 != (before + n) // 1000:
            log.warning("dropped (%s, %d so far) %s%s", reason, before + n, where,
                        f": {detail}" if detail else "")


HELD_GLOB = "ingest-held*.json"


def _read_held(path: Path) -> list:
    """The items of a held file; one that cannot be read is set aside as ``*.bad``
    (logged: what it held is lost) so that it stops no start."""
    try:
        items = json.loads(path.read_bytes())
    except FileNotFoundError:
        return []
    except (OSError, ValueError, RecursionError, MemoryError) as e:
        log.error("held states and events in %s cannot be read (lost, set aside as "
                  "%s.bad): %s", path, path.name, e)
        with contextlib.suppress(OSError):
            path.replace(path.with_name(path.name + ".bad"))
        return []
    return items if isinstance(items, list) else []


def gather_held(held_dir: Path, into: str) -> None:
    """Fold the held files of an earlier run with another number of ingest processes
    (``ingest-held.json``, ``ingest-held-<i>.json``) into ``into``, the one file this run
    reads back first, so that none is left unread (and replayed, stale, by a later run)."""
    others = sorted(p for p in held_dir.glob(HELD_GLOB) if p.name != into)
    if not others:
        return
    target = held_dir / into
    items = _read_held(target)
    for p in others:
        items += _read_held(p)
    try:
        if items:
            atomic_write(target, json.dumps(items, ensure_ascii=False).encode(), mode=0o600)
        for p in others:
            p.unlink(missing_ok=True)
    except OSError as e:
        log.error("cannot gather the held files in %s: %s", held_dir, e)


def _same_device(topic_id: str, body_id: str) -> None:
    if topic_id != body_id:
        raise _WrongDevice(f"message for {body_id!r} on the topic of {topic_id!r}")


# -- worker processes -------------------------------------------------------------------------
@dataclass
class CoreOptions:
    """What a worker needs to build its core (picklable)."""

    store_url: str
    prefix: str
    share_group: str | None
    device_rate_per_s: float
    device_burst: float
    log_level: int = logging.WARNING
    # Where worker i keeps what its store refused (``ingest-held-<i>.json``); None: memory.
    held_dir: str | None = None


def _worker_main(conn: Connection, opts: CoreOptions, index: int = 0) -> None:
    logging.basicConfig(level=opts.log_level,
                        format="%(levelname)s %(name)s [ingest worker %(process)d] %(message)s")
    store = Store(opts.store_url)
    core = IngestCore(store, Topics(opts.prefix), share_group=opts.share_group,
                      device_rate_per_s=opts.device_rate_per_s,
                      device_burst=opts.device_burst,
                      held_path=None if opts.held_dir is None
                      else Path(opts.held_dir) / f"ingest-held-{index}.json")
    tune_for_throughput()
    conn.send(("ready", 0, None, core.counters))
    try:
        while True:
            try:
                request = conn.recv()
            except EOFError:
                return  # the server went away
            if request is None:
                return
            kind, ticket, messages = request
            if kind == "forget":
                core.forget_revocations()
                continue
            try:
                out = core.process(messages)
            except Exception:  # a bug costs this part, never the worker
                core.drop("error", f"a group of {len(messages)} messages", len(messages))
                log.exception("ingest failed on a group of %d messages", len(messages))
                out = GroupOutcome()
            conn.send(("done", ticket, out, core.counters))
    finally:
        store.close()


@dataclass
class _Part:
    ticket: int
    messages: list[Message]


@dataclass
class _Group:
    on_done: Callable[[GroupOutcome], None]
    left: int
    outcome: GroupOutcome = field(default_factory=GroupOutcome)


class _Worker:
    def __init__(self, index: int, ctx: Any, opts: CoreOptions) -> None:
        self.index = index
        self.ctx = ctx
        self.opts = opts
        self.pending: deque[_Part] = deque()  # sent, not answered yet, in order
        self.counters = IngestCounters()
        self.base = IngestCounters()
        self.restarts = 0
        self.proc: Any = None
        self.conn: Connection | None = None

    def start(self, timeout_s: float) -> None:
        here, there = self.ctx.Pipe()
        self.proc = self.ctx.Process(target=_worker_main, args=(there, self.opts, self.index),
                                     name=f"pf-ingest-{self.index}", daemon=True)
        self.proc.start()
        there.close()
        if not here.poll(timeout_s):
            self.proc.kill()
            raise StoreError(f"ingest worker {self.index} did not start in {timeout_s:g} s")
        _, _, _, counters = here.recv()
        self.base = IngestCounters.merged([self.counters, counters])  # earlier lives' counts
        self.counters = self.base
        self.conn = here


class IngestWorkers:
    """``n`` worker processes, each with an :class:`IngestCore`; see the module's text."""

    def __init__(self, n: int, opts: CoreOptions, max_parts: int = 2) -> None:
        ctx = mp.get_context("spawn")
        self._workers = [_Worker(i, ctx, opts) for i in range(max(1, n))]
        self._groups: dict[int, _Group] = {}
        self._lock = threading.Lock()
        self._room = threading.Semaphore(max(1, max_parts) * len(self._workers))
        self._ticket = 0
        self._stopping = False
        self._thread: threading.Thread | None = None

    def start(self, timeout_s: float = 60.0) -> None:
        try:
            for w in self._workers:
                w.start(timeout_s)
        except BaseException:
            self.stop()
            raise
        self._thread = threading.Thread(target=self._collect, name="ingest-results",
                                        daemon=True)
        self._thread.start()

    def __len__(self) -> int:
        return len(self._workers)

    @property
    def counters(self) -> IngestCounters:
        with self._lock:
            return IngestCounters.merged(w.counters for w in self._workers)

    def pids(self) -> list[int]:
        return [w.proc.pid if w.proc is not None else 0 for w in self._workers]

    @property
    def restarts(self) -> int:
        return sum(w.restarts for w in self._workers)

    def submit(self, messages: list[Message], on_done: Callable[[GroupOutcome], None],
               stop: threading.Event) -> bool:
        """Hand a group over, split by device; ``on_done`` runs (on the results thread)
        when every part is done. Waits while every worker has its fill of parts; False if
        ``stop`` was set meanwhile."""
        n = len(self._workers)
        parts: dict[int, list[Message]] = {}
        for topic, payload in messages:
            # <prefix>/devices/<id>/<channel>: a device always meets the same worker.
            device = topic.rsplit("/", 2)[-2] if topic.count("/") >= 2 else topic
            parts.setdefault(zlib.crc32(device.encode()) % n if n > 1 else 0,
                             []).append((topic, payload))
        for _ in parts:
            while not self._room.acquire(timeout=0.2):
                if stop.is_set():
                    return False
        with self._lock:
            self._ticket += 1
            ticket = self._ticket
            self._groups[ticket] = _Group(on_done, len(parts))
            for index, part in parts.items():
                w = self._workers[index]
                w.pending.append(_Part(ticket, part))
                self._send(w, ("group", ticket, part))
        return True

    def forget_revocations(self) -> None:
        with self._lock:
            for w in self._workers:
                self._send(w, ("forget", 0, []))

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stopping = True
        with self._lock:
            for w in self._workers:
                self._send(w, None)
        for w in self._workers:
            if w.proc is not None:
                w.proc.join(timeout_s)
                if w.proc.is_alive():
                    w.proc.kill()
        if self._thread is not None:
            self._thread.join(timeout_s)

    # -- internals ------------------------------------------------------------------------
    @staticmethod
    def _send(w: _Worker, request: Any) -> None:
        try:
            if w.conn is not None:
                w.conn.send(request)
        except (OSError, ValueError):
            pass  # a dead worker: the results thread restarts it and sends its parts again

    def _collect(self) -> None:
        while not self._stopping:
            for w in self._workers:
                if w.conn is None:  # died, and its restart failed: try again
                    self._restart(w)
            by_conn: dict[Any, _Worker] = {w.conn: w for w in self._workers
                                           if w.conn is not None}
            for conn in wait(list(by_conn), timeout=0.2):
                w = by_conn[conn]
                try:
                    kind, ticket, outcome, counters = w.conn.recv()  # type: ignore[union-attr]
                except (EOFError, OSError):
                    if not self._stopping:
                        self._restart(w)
                    continue
                self._result(w, kind, ticket, outcome, counters)

    def _result(self, w: _Worker, kind: str, ticket: int, outcome: GroupOutcome,
                counters: IngestCounters) -> None:
        with self._lock:
            w.counters = IngestCounters.merged([w.base, counters])
            if kind != "done":
                return
            if w.pending and w.pending[0].ticket == ticket:
                w.pending.popleft()
            group = self._groups.get(ticket)
            if group is None:
                return
            group.outcome.add(outcome)
            group.left -= 1
            done = group.left == 0
            if done:
                del self._groups[ticket]
        self._room.release()
        if done:
            try:
                group.on_done(group.outcome)
            except Exception:
                log.exception("ingest: acknowledging a group failed")

    def _restart(self, w: _Worker) -> None:
        code = w.proc.exitcode if w.proc is not None else None
        log.error("ingest worker %d ended (exit code %s); starting it again with its %d "
                  "unfinished part(s)", w.index, code, len(w.pending))
        if w.conn is not None:
            w.restarts += 1
            w.conn.close()
            w.conn = None
            w.counters = w.base = IngestCounters.merged([w.counters])
        try:
            w.start(60.0)
        except (StoreError, OSError) as e:
            log.error("%s; trying again in 1 s", e)
            time.sleep(1.0)
            return
        with self._lock:
            for part in w.pending:
                self._send(w, ("group", part.ticket, part.messages))
