"""Fetch artifacts over MQTT in a bounded window of retained chunk topics.

The server publishes each chunk once, retained, at ``<prefix>/artifacts/<sha256>/<i>``;
the broker fans it out to every agent that subscribes. An agent subscribes to at most
``window`` chunk topics at a time, so no broker queue can overflow and drop chunks, and
unsubscribes each topic once its chunk is written. Chunks are verified against the
manifest's per-chunk hashes, written at their offset in a ``.part`` file, fsynced, and
recorded in a ``.done`` file: a restarted agent resumes without fetching them again.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from prunefleet.shared.chunks import ChunkPlan, decode_frame, sha256_file, verify_chunk
from prunefleet.shared.errors import IntegrityError, ProtocolError
from prunefleet.shared.fsutil import fsync_dir
from prunefleet.shared.messages import VariantSpec
from prunefleet.shared.topics import Topics

from .store import VariantStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Completed:
    spec: VariantSpec


@dataclass(frozen=True)
class Failed:
    spec: VariantSpec
    reason: str


@dataclass
class _Download:
    spec: VariantSpec
    plan: ChunkPlan
    done: set[int]
    # chunk index → time it was (re)subscribed
    pending: dict[int, float] = field(default_factory=dict)
    failures: dict[int, int] = field(default_factory=dict)
    retry_at: dict[int, float] = field(default_factory=dict)
    # chunk index → the number of its latest request (requests are numbered in order)
    asked: dict[int, int] = field(default_factory=dict)
    fetched: int = 0  # chunks received in this process (resume check)

    @property
    def progress(self) -> float:
        return len(self.done) / self.plan.count


class Downloader:
    def __init__(
        self,
        store: VariantStore,
        topics: Topics,
        subscribe: Callable[[str], None],
        unsubscribe: Callable[[str], None],
        *,
        window: int = 8,
        chunk_timeout_s: float = 15.0,
        retry_s: float = 2.0,
        max_chunk_failures: int = 3,
    ):
        self.store = store
        self.topics = topics
        self._subscribe = subscribe
        self._unsubscribe = unsubscribe
        self.window = window
        self.chunk_timeout_s = chunk_timeout_s
        self.retry_s = retry_s
        self.max_chunk_failures = max_chunk_failures
        self._active: dict[str, _Download] = {}
        self.rejected_chunks = 0
        # Deliveries of a chunk already written (or of a finished download): each one is
        # a chunk fetched again over the network. Should stay 0, lossy links included.
        self.repeated_chunks = 0
        self._heard: float | None = None  # monotonic time the broker was last heard from
        self._asks = 0  # requests made (subscriptions to chunk topics)
        self._answered = 0  # the latest request whose chunk has arrived

    # -- control ------------------------------------------------------------------------
    def want(self, spec: VariantSpec, now: float) -> None:
        if spec.sha256 in self._active:
            return
        plan = ChunkPlan(spec.sha256, spec.size, spec.chunk_bytes, tuple(spec.chunk_sha256))
        done = self._load_done(plan)
        part = self.store.part_path(spec.sha256)
        if not part.exists():
            with open(part, "wb") as f:
                f.truncate(spec.size)
            done = set()
            self.store.done_path(spec.sha256).unlink(missing_ok=True)
        dl = _Download(spec, plan, done)
        self._active[spec.sha256] = dl
        log.info(
            "download %s (%s…, %d bytes, %d chunks, %d already done)",
            spec.name, spec.sha256[:12], spec.size, plan.count, len(done),
        )
        self._fill_window(dl, now)

    def cancel_except(self, keep: set[str]) -> None:
        for sha in list(self._active):
            if sha not in keep:
                self._drop(self._active[sha])

    def progress(self) -> dict[str, float]:
        return {d.spec.name: round(d.progress, 3) for d in self._active.values()}

    def active(self) -> list[VariantSpec]:
        return [d.spec for d in self._active.values()]

    # -- events -------------------------------------------------------------------------
    def handle(self, topic: str, payload: bytes, now: float) -> list[Completed | Failed]:
        try:
            sha, index = self.topics.parse_chunk(topic)
        except ProtocolError:
            return []
        dl = self._active.get(sha)
        if dl is None or index in dl.done or index not in dl.pending:
            if dl is None or index in dl.done:
                self.repeated_chunks += 1
                log.info("chunk %d of %s delivered again after it was written", index, sha[:12])
            return []  # a late or repeated delivery; chunk writes are idempotent anyway
        try:
            header, raw = decode_frame(payload, dl.plan.chunk_size(index))
            if header.sha256 != sha or header.index != index or header.count != dl.plan.count:
                raise ProtocolError("chunk header does not match its topic")
            verify_chunk(dl.plan, index, raw)
        except (ProtocolError, IntegrityError) as e:
            return self._chunk_failed(dl, index, str(e), now)
        self._write_chunk(dl, index, raw)
        dl.pending.pop(index, None)
        self._answered = max(self._answered, dl.asked.pop(index, 0))
        dl.fetched += 1
        self._unsubscribe(self.topics.chunk(sha, index))
        if len(dl.done) == dl.plan.count:
            return [self._finish(dl)]
        self._fill_window(dl, now)
        return []

    def heard(self, now: float) -> None:
        """Something came from the broker (a message, an acknowledgement, a CONNACK): the
        link works. After a silence longer than ``chunk_timeout_s`` (a partition, a
        reconnect) the pending chunks' timers start again: their deliveries may still be
        on the way, and asking again would fetch them twice."""
        if self._heard is not None and now - self._heard > self.chunk_timeout_s:
            if self._active:
                log.info("broker heard again after %.0f s: chunk timers start again",
                         now - self._heard)
            for dl in self._active.values():
                for index in dl.pending:
                    dl.pending[index] = now
        self._heard = now

    def tick(self, now: float) -> list[Completed | Failed]:
        """Re-request chunks that timed out or are due for a retry. Nothing completes on a
        tick here (chunks arrive in :meth:`handle`); the simulated downloader's do.

        A request is repeated only when its chunk is surely not coming: over TCP a late
        delivery is not a lost one, and asking again would fetch it twice. So no chunk
        times out while the link is silent (nothing heard for ``chunk_timeout_s``), and one
        times out after ``chunk_timeout_s`` only once a chunk requested after it arrived
        (the broker answers one connection's requests in order); a chunk with no later
        request to compare (the last ones) waits four times as long.
        """
        silent = self._heard is not None and now - self._heard > self.chunk_timeout_s
        for dl in list(self._active.values()):
            for index, since in list(dl.pending.items()):
                waited = now - since
                passed = self._answered > dl.asked.get(index, 0)
                if not silent and waited > self.chunk_timeout_s and (
                        passed or waited > 4 * self.chunk_timeout_s):
                    log.info("%s: chunk %d not here after %.0f s: asking again", dl.spec.name,
                             index, now - since)
                    topic = self.topics.chunk(dl.spec.sha256, index)
                    self._unsubscribe(topic)
                    self._ask(dl, index, now)
            self._fill_window(dl, now)
        return []

    # -- internals ----------------------------------------------------------------------
    def _load_done(self, plan: ChunkPlan) -> set[int]:
        path = self.store.done_path(plan.sha256)
        try:
            lines = path.read_text().split()
        except FileNotFoundError:
            return set()
        except (OSError, ValueError) as e:  # damaged (ValueError: not UTF-8): start over
            log.warning("%s is unreadable (%s): its chunks are fetched again", path, e)
            return set()
        done = set()
        for tok in lines:
            if tok.isdigit() and int(tok) < plan.count:
                done.add(int(tok))
        return done

    def _fill_window(self, dl: _Download, now: float) -> None:
        for index in range(dl.plan.count):
            if len(dl.pending) >= self.window:
                return
            if index in dl.done or index in dl.pending:
                continue
            if dl.retry_at.get(index, 0.0) > now:
                continue
            self._ask(dl, index, now)

    def _ask(self, dl: _Download, index: int, now: float) -> None:
        self._asks += 1
        dl.asked[index] = self._asks
        dl.pending[index] = now
        self._subscribe(self.topics.chunk(dl.spec.sha256, index))

    def _write_chunk(self, dl: _Download, index: int, raw: bytes) -> None:
        part = self.store.part_path(dl.spec.sha256)
        fd = os.open(part, os.O_WRONLY)
        try:
            os.pwrite(fd, raw, index * dl.plan.chunk_bytes)
            os.fsync(fd)
        finally:
            os.close(fd)
        # Only a synced chunk is recorded as done.
        with open(self.store.done_path(dl.spec.sha256), "a") as f:
            f.write(f"{index}\n")
            f.flush()
            os.fsync(f.fileno())
        dl.done.add(index)

    def _chunk_failed(
        self, dl: _Download, index: int, why: str, now: float
    ) -> list[Completed | Failed]:
        self.rejected_chunks += 1
        n = dl.failures.get(index, 0) + 1
        dl.failures[index] = n
        log.warning("%s: rejected chunk %d (%s), failure %d", dl.spec.name, index, why, n)
        self._unsubscribe(self.topics.chunk(dl.spec.sha256, index))
        dl.pending.pop(index, None)
        if n >= self.max_chunk_failures:
            self._drop(dl, delete=False)
            return [Failed(dl.spec, f"chunk {index} rejected {n} times: {why}")]
        dl.retry_at[index] = now + self.retry_s * n
        return []

    def _finish(self, dl: _Download) -> Completed | Failed:
        part = self.store.part_path(dl.spec.sha256)
        del self._active[dl.spec.sha256]
        size = part.stat().st_size
        digest = sha256_file(part)
        if size != dl.spec.size or digest != dl.spec.sha256:
            part.unlink(missing_ok=True)
            self.store.done_path(dl.spec.sha256).unlink(missing_ok=True)
            return Failed(dl.spec, f"artifact sha256 {digest[:12]}… does not match manifest")
        os.replace(part, self.store.path_of(dl.spec.sha256))
        fsync_dir(self.store.dir)
        self.store.done_path(dl.spec.sha256).unlink(missing_ok=True)
        log.info("%s verified: fetched %d of %d chunks in this process",
                 dl.spec.name, dl.fetched, dl.plan.count)
        return Completed(dl.spec)

    def _drop(self, dl: _Download, delete: bool = False) -> None:
        for index in list(dl.pending):
            self._unsubscribe(self.topics.chunk(dl.spec.sha256, index))
        dl.pending.clear()
        self._active.pop(dl.spec.sha256, None)
        if delete:
            self.store.part_path(dl.spec.sha256).unlink(missing_ok=True)
            self.store.done_path(dl.spec.sha256).unlink(missing_ok=True)
