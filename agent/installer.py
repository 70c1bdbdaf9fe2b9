"""Applies what the follower says: follow a desired state, fetch, verify and install,
retire the old.

Install is atomic: the downloader checks every chunk and the whole file before it lands
in the store under its digest; the engine's session must then pass the smoke test on the
manifest's golden input before the variant may serve (then the agent profiles it on this
device: :mod:`.profile`). A variant that fails is reported
and not retried under the same manifest; the variants installed before keep serving until
one of the new manifest's own does (:meth:`ManifestFollower.retire`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

from prunefleet.shared.errors import ProtocolError
from prunefleet.shared.messages import (
    EventKind,
    RolloutReport,
    SignedManifest,
    VariantSpec,
    decode,
)

from .downloader import Completed, Failed
from .errors import InstallError
from .follower import Follow, ManifestFollower, Rejected, Source
from .phase import rollout_report
from .profile import rss_bytes
from .reporting import Reporter
from .runtime import Engine, LoadedVariant, ModelPool
from .serving import RequestPath
from .store import VariantStore

log = logging.getLogger(__name__)

__all__ = ["Installer"]

EventSink = Callable[[EventKind, str | None, str], None]


class Fetcher(Protocol):
    """What the installer needs of a downloader (:class:`Downloader`, or the simulated
    one that fetches nothing)."""

    rejected_chunks: int
    repeated_chunks: int

    def want(self, spec: VariantSpec, now: float) -> None: ...
    def cancel_except(self, keep: set[str]) -> None: ...
    def progress(self) -> dict[str, float]: ...
    def active(self) -> list[VariantSpec]: ...
    def handle(self, topic: str, payload: bytes, now: float) -> list[Completed | Failed]: ...
    def tick(self, now: float) -> list[Completed | Failed]: ...
    def heard(self, now: float) -> None: ...


class Installer:
    """Loop thread only. ``on_verifying()`` runs before a smoke test (the agent publishes
    its reported state then, so the server sees the phase)."""

    def __init__(self, follower: ManifestFollower, store: VariantStore, pool: ModelPool,
                 engine: Engine, downloader: Fetcher, reporter: Reporter,
                 serving: RequestPath, event: EventSink,
                 on_verifying: Callable[[], None],
                 on_loaded: Callable[[LoadedVariant, float | None], None] | None = None,
                 ) -> None:
        """``on_loaded(lv, memory_mb)``: a session passed its smoke test (at install or at
        start), with the resident memory its creation added: the agent profiles it."""
        self.follower = follower
        self.serving = serving
        self.store = store
        self.pool = pool
        self.engine = engine
        self.downloader = downloader
        self.reporter = reporter
        self._event = event
        self._on_verifying = on_verifying
        self._on_loaded = on_loaded
        self._reconcile_due = False  # a reconcile an OS error stopped: again at each tick
        self.failed: set[str] = set()  # digests that failed under the current manifest
        self.verifying: str | None = None
        # The newest desired state refused (its claimed version, why): reported as that
        # version's failure, so a rollout counts it at once.
        self.rejected: tuple[int, str] | None = None

    def load(self, spec: VariantSpec) -> LoadedVariant:
        return self.engine.load(self.store.path_of(spec.sha256), spec)

    def _load_measured(self, spec: VariantSpec) -> tuple[LoadedVariant, float | None]:
        """A session, and the resident memory (MiB) creating it added."""
        before = rss_bytes()
        lv = self.load(spec)
        after = rss_bytes()
        grown = None if before is None or after is None else max(after - before, 0) / 2**20
        return lv, grown

    def _loaded(self, lv: LoadedVariant, memory_mb: float | None) -> None:
        if self._on_loaded is not None:
            self._on_loaded(lv, memory_mb)

    def load_installed(self) -> None:
        """At start: a session for every installed variant; one that no longer loads, for
        any reason, is counted as an install failure and forgotten (fetched again if the
        manifest still names it). The agent starts and serves whatever still loads."""
        for name, spec in self.store.installed().items():
            try:
                lv, memory_mb = self._load_measured(spec)
                self.pool.put(lv)
            except Exception as e:  # nothing on disk may stop the start
                self.reporter.counters.install_failures += 1
                self.reporter.last_error = f"{name}: no longer loads: {e}"[:1024]
                log.error("installed variant %s no longer loads: %s", name, e)
                try:
                    self.store.forget(name)
                except OSError as err:  # a full disk must not stop the start either
                    log.error("cannot forget %s (tried again at the next start): %s",
                              name, err)
            else:
                self._loaded(lv, memory_mb)

    def offer(self, signed: SignedManifest, source: Source, wall: float, now: float) -> None:
        """A desired state from the device's (``source="device"``) or group's topic."""
        verdict = self.follower.offer(signed, source, wall)
        if isinstance(verdict, Rejected):
            self.reporter.counters.rejected_manifests += 1
            self.reporter.last_error = f"manifest rejected: {verdict.reason}"
            self._event(EventKind.REJECTED, None, verdict.reason)
            log.warning("rejected manifest from %s: %s", source, verdict.reason)
            # The device's own desired state is what a rollout offers (a refused group
            # state must not hide the progress of the device's own). One older than what
            # the device follows is reported too: only the server writes that topic, so it
            # signed below what the device accepted (a restored store), and its rollout
            # would otherwise wait out its device timeout without a word.
            followed = self.follower.manifest.version if self.follower.manifest else 0
            if source == "device" and verdict.version is not None \
                    and verdict.version != followed:
                self.rejected = (verdict.version, self.reporter.last_error)
            self.reporter.mark()
            return
        if self.follower.revoked - self.store.revoked_keyids():
            self.store.add_revoked(self.follower.revoked)
            log.warning("signing key(s) revoked: %s",
                        ", ".join(k[:12] for k in sorted(self.follower.revoked)))
        try:
            self.store.set_accepted_version(self.follower.floors[source], source)
            if isinstance(verdict, Follow):
                self.store.save_manifest(signed.encode())
        except OSError as e:
            # A full disk: the follower has moved on, so it is followed from memory (and
            # saved with the next one); stopping here left it followed and never fetched,
            # and its retained copy seen again later counted as already followed.
            self.reporter.last_error = f"cannot save the desired state: {e}"[:1024]
            self.reporter.mark()
            log.error("cannot save the desired state (followed from memory): %s", e)
        if isinstance(verdict, Follow):
            # A signed, newer desired state supersedes any refused one (whose version was
            # only claimed, never verified).
            self.rejected = None
            self.serving.update(policy=verdict.policy, pinned=verdict.manifest.pinned_variant)
            log.info("following manifest v%d: %s", verdict.manifest.version,
                     ", ".join(v.name for v in verdict.manifest.variants))
            self.failed.clear()
            self._reconcile_or_later(now)

    def _reconcile_or_later(self, now: float) -> None:
        """Reconcile; on a full disk (or another OS error) again at the next tick, until
        it goes through: the desired state is followed either way, and its copy seen again
        later counts as already followed."""
        try:
            self.reconcile(now)
        except OSError as e:
            if not self._reconcile_due:
                self.reporter.last_error = f"cannot start the desired state: {e}"[:1024]
                self.reporter.mark()
                log.error("cannot start the desired state (tried again each second): %s", e)
            self._reconcile_due = True
        else:
            self._reconcile_due = False

    def restore(self, wall: float, now: float) -> None:
        """After a restart: follow the saved manifest again (its signature checked again)
        and resume what it needs, unless it expired meanwhile."""
        raw = self.store.load_manifest()
        if raw is None:
            return
        try:
            manifest = self.follower.restore(decode(SignedManifest, raw), wall)
            why = "it no longer verifies"
        except (ProtocolError, ValueError, RecursionError) as e:
            manifest, why = None, str(e)
        if manifest is None:
            # Not a reason to stop: the retained desired state arrives again from the
            # broker, and the installed variants serve meanwhile.
            self.reporter.counters.rejected_manifests += 1
            self.reporter.last_error = f"saved manifest ignored: {why}"[:1024]
            log.warning("ignoring the saved manifest: %s", why)
            return
        self.serving.update(policy=self.follower.policy, pinned=manifest.pinned_variant)
        if self.follower.is_current(wall):
            self.reconcile(now)  # e.g. resume a download the restart interrupted

    def reconcile(self, now: float) -> None:
        plan = self.follower.plan(lambda s: self.store.has(s) and self.pool.serving(s),
                                  self.store.have_blob, self.failed)
        self.downloader.cancel_except(set(plan.keep))
        downloading = {s.sha256 for s in self.downloader.active()}
        for spec in plan.install:
            self.install(spec)
        for spec in plan.download:
            if spec.sha256 not in downloading:
                self._event(EventKind.DOWNLOAD_STARTED, spec.name, f"{spec.size} bytes")
            self.downloader.want(spec, now)
        self.retire()
        self.reporter.mark()

    def on_chunk(self, topic: str, payload: bytes, now: float) -> None:
        self.on_results(self.downloader.handle(topic, payload, now))

    def tick(self, now: float) -> None:
        """Retries and timeouts of the downloads (and progress for the reported state)."""
        if self._reconcile_due:
            self._reconcile_or_later(now)
        self.on_results(self.downloader.tick(now))
        if self.downloader.active():
            self.reporter.mark()  # progress

    def on_results(self, results: list[Completed | Failed]) -> None:
        for result in results:
            if isinstance(result, Completed):
                self.install(result.spec)
            elif isinstance(result, Failed):
                self.install_failed(result.spec, result.reason)

    def install(self, spec: VariantSpec) -> None:
        self.verifying = spec.name
        self._on_verifying()
        try:
            lv, memory_mb = self._load_measured(spec)
        except Exception as e:  # InstallError, or anything a damaged file may raise
            self.store.path_of(spec.sha256).unlink(missing_ok=True)
            self.install_failed(spec, str(e) if isinstance(e, InstallError)
                                else f"{type(e).__name__}: {e}")
            return
        finally:
            self.verifying = None
        try:
            self.store.record(spec)
        except OSError as e:
            # A full disk: it serves now, and is fetched again if the agent restarts.
            self.reporter.last_error = f"{spec.name}: not recorded: {e}"[:1024]
            log.error("installed %s, but could not record it (fetched again after a "
                      "restart): %s", spec.name, e)
        self.pool.put(lv)
        self.reporter.counters.installs += 1
        self._event(EventKind.INSTALLED, spec.name, spec.sha256)
        log.info("installed %s (%s…)", spec.name, spec.sha256[:12])
        self._loaded(lv, memory_mb)
        self.retire()
        self.reporter.mark()

    def install_failed(self, spec: VariantSpec, why: str) -> None:
        self.reporter.counters.install_failures += 1
        self.failed.add(spec.sha256)
        self.reporter.last_error = f"{spec.name}: {why}"
        self._event(EventKind.INSTALL_FAILED, spec.name, why)
        log.error("install of %s failed: %s", spec.name, why)
        self.reporter.mark()

    def retire(self) -> None:
        for name in self.follower.retire(self.pool.specs):
            self.pool.remove(name)
            try:
                self.store.forget(name)
            except OSError as e:  # a full disk: forgotten at the next start instead
                log.error("cannot forget %s: %s", name, e)

    def rollout(self, active: str | None) -> RolloutReport | None:
        """The phase of the followed manifest on this device."""
        return rollout_report(
            self.follower.manifest, failed=self.failed, serving=self.pool.serving,
            verifying=self.verifying is not None, downloading=bool(self.downloader.active()),
            progress=self.downloader.progress(), active=active,
            last_error=self.reporter.last_error, rejected=self.rejected)
