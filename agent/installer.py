"""Applies what the follower says: follow a desired state, fetch, verify and install,
retire the old.

Install is atomic: the downloader checks every chunk and the whole file before it lands
in the store under its digest; the engine's session must then pass the smoke test on the
manifest's golden input before the variant may serve. A variant that fails is reported
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

    def want(self, spec: VariantSpec, now: float) -> None: ...
    def cancel_except(self, keep: set[str]) -> None: ...
    def progress(self) -> dict[str, float]: ...
    def active(self) -> list[VariantSpec]: ...
    def handle(self, topic: str, payload: bytes, now: float) -> list[Completed | Failed]: ...
    def tick(self, now: float) -> list[Completed | Failed]: ...


class Installer:
    """Loop thread only. ``on_verifying()`` runs before a smoke test (the agent publishes
    its reported state then, so the server sees the phase)."""

    def __init__(self, follower: ManifestFollower, store: VariantStore, pool: ModelPool,
                 engine: Engine, downloader: Fetcher, reporter: Reporter,
                 serving: RequestPath, event: EventSink,
                 on_verifying: Callable[[], None]) -> None:
        self.follower = follower
        self.serving = serving
        self.store = store
        self.pool = pool
        self.engine = engine
        self.downloader = downloader
        self.reporter = reporter
        self._event = event
        self._on_verifying = on_verifying
        self.failed: set[str] = set()  # digests that failed under the current manifest
        self.verifying: str | None = None

    def load(self, spec: VariantSpec) -> LoadedVariant:
        return self.engine.load(self.store.path_of(spec.sha256), spec)

    def load_installed(self) -> None:
        """At start: a session for every installed variant; one that no longer loads is
        forgotten (it is fetched again if the manifest still names it)."""
        for name, spec in self.store.installed().items():
            try:
                self.pool.put(self.load(spec))
            except InstallError as e:
                log.error("installed variant %s no longer loads: %s", name, e)
                self.store.forget(name)

    def offer(self, signed: SignedManifest, source: Source, wall: float, now: float) -> None:
        """A desired state from the device's (``source="device"``) or group's topic."""
        verdict = self.follower.offer(signed, source, wall)
        if isinstance(verdict, Rejected):
            self.reporter.counters.rejected_manifests += 1
            self.reporter.last_error = f"manifest rejected: {verdict.reason}"
            self._event(EventKind.REJECTED, None, verdict.reason)
            log.warning("rejected manifest from %s: %s", source, verdict.reason)
            self.reporter.mark()
            return
        self.store.set_accepted_version(self.follower.floors[source], source)
        if isinstance(verdict, Follow):
            self.store.save_manifest(signed.encode())
            self.serving.update(policy=verdict.policy, pinned=verdict.manifest.pinned_variant)
            log.info("following manifest v%d: %s", verdict.manifest.version,
                     ", ".join(v.name for v in verdict.manifest.variants))
            self.failed.clear()
            self.reconcile(now)

    def restore(self, wall: float, now: float) -> None:
        """After a restart: follow the saved manifest again (its signature checked again)
        and resume what it needs, unless it expired meanwhile."""
        raw = self.store.load_manifest()
        if raw is None:
            return
        try:
            manifest = self.follower.restore(decode(SignedManifest, raw), wall)
        except ProtocolError as e:
            manifest = None
            log.warning("ignoring the saved manifest: %s", e)
        if manifest is None:
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
            lv = self.load(spec)
        except InstallError as e:
            self.store.path_of(spec.sha256).unlink(missing_ok=True)
            self.install_failed(spec, str(e))
            return
        finally:
            self.verifying = None
        self.store.record(spec)
        self.pool.put(lv)
        self.reporter.counters.installs += 1
        self._event(EventKind.INSTALLED, spec.name, spec.sha256)
        log.info("installed %s (%s…)", spec.name, spec.sha256[:12])
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
            self.store.forget(name)

    def rollout(self, active: str | None) -> RolloutReport | None:
        """The phase of the followed manifest on this device."""
        return rollout_report(
            self.follower.manifest, failed=self.failed, serving=self.pool.serving,
            verifying=self.verifying is not None, downloading=bool(self.downloader.active()),
            progress=self.downloader.progress(), active=active,
            last_error=self.reporter.last_error)
