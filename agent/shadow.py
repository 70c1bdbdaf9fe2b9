"""Shadow evaluation: does a variant under evaluation answer like the reference?

While a rollout is judged, its manifest carries a ``shadow`` section
(:class:`~prunefleet.shared.messages.ShadowSpec`). The request path hands every request to
:meth:`ShadowEvaluator.offer`, which copies a sampled share into a bounded queue and never
waits: when the queue is full the sample is dropped and counted. A worker thread at low
priority (``os.setpriority`` where allowed) and within a CPU budget (a share of one core)
runs each sample, in the request path's idle gaps, on each variant under evaluation and on
the reference, and aggregates per
variant: top-1 agreement, output divergence, errors and its latency p95. :meth:`cut`
hands one interval's figures to telemetry.

The reference is the one the manifest names, else the variant the device served before the
shadow section arrived, else the largest installed variant not under evaluation.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from prunefleet.shared.messages import ShadowReport, ShadowSpec, ShadowStats, VariantProfile

from .profile import Activity
from .runtime import ModelPool

log = logging.getLogger(__name__)

__all__ = ["ShadowEvaluator", "ShadowOptions", "idle_wait"]

_MAX_LATENCIES = 512  # per variant per interval, for the p95


@dataclass(frozen=True)
class ShadowOptions:
    queue_max: int = 32
    # CPU time the worker may spend per second of wall time (0.1: a tenth of one core).
    cpu_share: float = 0.1
    nice: int = 10
    # The worker runs a sample only once the request path has been idle this long (no
    # request in flight, none begun within it): in one process the worker's Python work
    # would otherwise hold the interpreter lock while a request waits for it.
    idle_gap_s: float = 0.002
    # How often a waiting worker looks again: each look takes the interpreter lock, so not
    # more often than this (a busy device's requests would pay for it).
    idle_poll_s: float = 0.02
    # False: no worker thread; whoever owns the evaluator calls run_once (tests).
    worker_thread: bool = True


@dataclass
class _Acc:
    reference: str
    samples: int = 0
    agreed: int = 0
    divergence_sum: float = 0.0
    errors: int = 0
    latencies: list[float] = field(default_factory=list)


class ShadowEvaluator:
    """Thread-safe: :meth:`offer` from request threads, :meth:`configure` and :meth:`cut`
    from the loop thread, :meth:`run_once` from the worker (or a test)."""

    def __init__(self, pool: ModelPool, options: ShadowOptions | None = None,
                 activity: Activity | None = None) -> None:
        self.pool = pool
        self.options = options or ShadowOptions()
        # The request path's activity (requests in flight, the last one's start); None:
        # the worker does not wait for idle gaps.
        self.activity = activity
        self._lock = threading.Lock()
        self._queue: collections.deque[np.ndarray] = collections.deque()
        self._ready = threading.Condition(self._lock)
        self._spec: ShadowSpec | None = None
        self._reference: str | None = None
        self._credit = 0.0  # sampling: a request is copied each time this passes 1
        self._acc: dict[str, _Acc] = {}
        self._sampled = 0
        self._dropped = 0
        self._cpu_s = 0.0
        self._profiles: dict[str, VariantProfile] = {}
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.sampled_total = 0
        self.dropped_total = 0

    # -- loop thread ----------------------------------------------------------------------
    def configure(self, spec: ShadowSpec | None, served_before: str | None) -> None:
        """Start (or stop, with None) evaluating; ``served_before`` is the variant the
        device served when the section arrived."""
        with self._lock:
            if spec == self._spec:
                return
            self._spec = spec
            self._queue.clear()
            self._acc = {}
            self._credit = 0.0
            if spec is None:
                self._reference = None
            elif spec.reference is not None:
                self._reference = spec.reference
            elif served_before is not None and served_before not in spec.variants:
                self._reference = served_before
            else:
                self._reference = None  # the largest installed, chosen per sample
        if spec is not None:
            log.info("shadow evaluation of %s against %s, %.1f%% of requests",
                     ", ".join(spec.variants), self._reference or "the largest installed",
                     spec.sample_share * 100)

    def set_profiles(self, profiles: dict[str, VariantProfile]) -> None:
        with self._lock:
            self._profiles = dict(profiles)

    @property
    def active(self) -> bool:
        return self._spec is not None

    def cut(self) -> ShadowReport | None:
        """This interval's figures (None when nothing was evaluated or sampled)."""
        with self._lock:
            spec, acc = self._spec, self._acc
            sampled, dropped, cpu_s = self._sampled, self._dropped, self._cpu_s
            self._acc = {k: _Acc(a.reference) for k, a in acc.items()}
            self._sampled = self._dropped = 0
            self._cpu_s = 0.0
            profiles, specs = self._profiles, self.pool.specs
        if spec is None and not sampled and not any(a.samples for a in acc.values()):
            return None
        stats = {}
        for name, a in acc.items():
            if not a.samples:
                continue
            prof, vs = profiles.get(name), specs.get(name)
            known = prof is not None and vs is not None and prof.sha256 == vs.sha256
            stats[name] = ShadowStats(
                reference=a.reference, samples=a.samples, agreed=a.agreed,
                divergence_sum=min(a.divergence_sum, float(a.samples)), errors=a.errors,
                latency_ms_p95=float(np.percentile(a.latencies, 95)) if a.latencies else None,
                profile_latency_ms=prof.latency_ms_p95 if known and prof else None)
        return ShadowReport(rollout_id=spec.rollout_id if spec else None, variants=stats,
                            sampled=sampled, dropped=dropped, cpu_ms=cpu_s * 1000.0)

    # -- request threads ------------------------------------------------------------------
    def offer(self, x: np.ndarray) -> None:
        """Copy ``x`` into the queue if it is sampled; never waits."""
        spec = self._spec
        if spec is None:
            return
        with self._lock:
            self._credit += spec.sample_share
            if self._credit < 1.0:
                return
            self._credit -= 1.0
            self._sampled += 1
            self.sampled_total += 1
            if len(self._queue) >= self.options.queue_max:
                self._dropped += 1
                self.dropped_total += 1
                return
            self._queue.append(np.array(x, copy=True))
            self._ready.notify()

    # -- worker ---------------------------------------------------------------------------
    def run_once(self) -> bool:
        """Evaluate one queued sample; False when the queue was empty."""
        with self._lock:
            if not self._queue or self._spec is None:
                return False
            x = self._queue.popleft()
            spec, ref_name = self._spec, self._reference
        t0 = time.thread_time()
        try:
            self._evaluate(spec, ref_name, x)
        finally:
            with self._lock:
                self._cpu_s += time.thread_time() - t0
        return True

    def _evaluate(self, spec: ShadowSpec, ref_name: str | None, x: np.ndarray) -> None:
        table = self.pool.table
        if ref_name is None:
            others = [lv for n, lv in table.items() if n not in spec.variants]
            if not others:
                return
            ref = max(others, key=lambda lv: (lv.spec.macs, lv.name))
        else:
            ref = table.get(ref_name)  # type: ignore[assignment]
            if ref is None:
                return  # not loaded (yet): nothing to compare with
        try:
            x = self.pool.check_input(x, ref.spec)
            y_ref, _ = self.pool.infer(ref, x)
        except Exception as e:  # onnxruntime raises its own untyped errors
            log.warning("shadow: reference %s failed: %s", ref.name, e)
            return
        p_ref = _softmax(y_ref)
        for name in spec.variants:
            lv = table.get(name)
            if lv is None or name == ref.name:
                continue
            ok, y, ms = True, None, 0.0
            try:
                y, ms = self.pool.infer(lv, x)
                ok = y.shape == y_ref.shape and bool(np.all(np.isfinite(y)))
            except Exception as e:
                log.debug("shadow: %s failed: %s", name, e)
                ok = False
            with self._lock:
                if self._spec is not spec:
                    return  # reconfigured meanwhile: these figures belong to no one
                a = self._acc.setdefault(name, _Acc(ref.name))
                a.reference = ref.name
                n = int(y_ref.shape[0])
                a.samples += n
                if not ok or y is None:
                    a.errors += n
                    continue
                a.agreed += int(np.sum(np.argmax(y, axis=1) == np.argmax(y_ref, axis=1)))
                a.divergence_sum += float(np.sum(0.5 * np.abs(_softmax(y) - p_ref).sum(axis=1)))
                if len(a.latencies) < _MAX_LATENCIES:
                    a.latencies.append(ms)

    def start(self) -> None:
        if self._thread is None and self.options.worker_thread:
            self._thread = threading.Thread(target=self._work, name="shadow", daemon=True)
            self._thread.start()

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            self._ready.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _work(self) -> None:
        # Not on every platform, nor always allowed: then at normal priority.
        with contextlib.suppress(AttributeError, OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self.options.nice)
        share = max(self.options.cpu_share, 1e-3)
        while not self._stop.is_set():
            with self._lock:
                while not self._queue and not self._stop.is_set():
                    self._ready.wait(timeout=1.0)
            if self._stop.is_set():
                return
            if not self._wait_for_idle():
                return
            t0, c0 = time.monotonic(), time.thread_time()
            self.run_once()
            # Stay within the budget: after spending c seconds of CPU, rest c / share - c.
            spent = time.thread_time() - c0
            rest = spent / share - (time.monotonic() - t0)
            if rest > 0:
                self._stop.wait(min(rest, 5.0))


    def _wait_for_idle(self) -> bool:
        """Wait until no request is in flight and none began within ``idle_gap_s``; False
        when the evaluator is stopping. Samples wait in the (bounded) queue meanwhile: a
        device saturated with requests gathers no evidence, and its wave says so."""
        act, gap = self.activity, self.options.idle_gap_s
        if act is None or gap <= 0:
            return not self._stop.is_set()
        while not self._stop.is_set():
            _, in_flight, last = act.snapshot()
            wait = idle_wait(in_flight, last, time.monotonic(), gap)
            if wait == 0.0:
                return True
            self._stop.wait(max(wait, self.options.idle_poll_s))
        return False


def idle_wait(in_flight: int, last_start: float, now: float, gap: float) -> float:
    """Seconds to wait before the request path counts as idle (0.0: idle now): no request
    in flight and none begun within ``gap``."""
    if in_flight > 0:
        return gap
    quiet = now - last_start
    return 0.0 if quiet >= gap else gap - quiet


def _softmax(y: np.ndarray) -> np.ndarray:
    z = y - y.max(axis=1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(axis=1, keepdims=True)
