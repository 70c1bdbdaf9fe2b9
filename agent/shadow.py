"""Shadow evaluation: does a variant under evaluation answer like the reference?

While a rollout is judged, its manifest carries a ``shadow`` section
(:class:`~prunefleet.shared.messages.ShadowSpec`). The request path hands every request to
:meth:`ShadowEvaluator.offer`, which copies a sampled share into a bounded queue and never
waits (a request not sampled takes no lock): when the queue is full the sample is dropped
and counted. A worker thread at low priority (``os.setpriority`` where allowed) and within
a CPU budget (a share of one core) runs each sample on the reference and on each variant
under evaluation, and aggregates per variant: top-1 agreement, output divergence, errors
and its latency p95. :meth:`cut` hands one interval's figures to telemetry, with the CPU
time the worker spent (its waiting for gaps included).

The worker shares the interpreter and the cores with the request path, so it runs only in
the request path's idle gaps: each inference of a sample (reference, then each variant)
starts only once no request is in flight and none began within the longer of
``idle_gap_s`` and the time one shadow inference has been taking; a request that arrives
meanwhile waits for at most the one inference under way, never for the whole sample.

The reference is the one the manifest names, else the variant the device served before the
shadow section arrived, else the largest installed variant not under evaluation.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import os
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from prunefleet.shared.messages import ShadowReport, ShadowSpec, ShadowStats, VariantProfile

from .profile import Activity
from .runtime import LoadedVariant, ModelPool

log = logging.getLogger(__name__)

__all__ = ["ShadowEvaluator", "ShadowOptions", "idle_wait"]

_MAX_LATENCIES = 512  # per variant per interval, for the p95


@dataclass(frozen=True)
class ShadowOptions:
    queue_max: int = 32
    # CPU time the worker may spend per second of wall time (0.1: a tenth of one core).
    cpu_share: float = 0.1
    nice: int = 10
    # Each shadow inference starts only once the request path has been idle this long (no
    # request in flight, none begun within it), or as long as one shadow inference has
    # been taking if that is longer: in one process the worker's Python work would
    # otherwise hold the interpreter lock while a request waits for it.
    idle_gap_s: float = 0.002
    # How often a waiting worker looks again at most: each look takes the interpreter
    # lock, so not more often than this (a busy device's requests would pay for it).
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
        # Requests offered since configure: the k-th is sampled when k * share passes an
        # integer. ``next`` on it is atomic, so a request that is not sampled takes no lock.
        self._seq = itertools.count()
        # Wall seconds one shadow inference has been taking (smoothed): the idle gap the
        # worker waits for is at least this long.
        self._step_s = 0.0
        self._acc: dict[str, _Acc] = {}
        self._sampled = 0
        self._dropped = 0
        self._cpu_s = 0.0
        self._profiles: dict[str, VariantProfile] = {}
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.sampled_total = 0
        self.dropped_total = 0
        self.evaluated_total = 0  # samples run on the reference and the variants

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
            self._seq = itertools.count()
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
        k, share = next(self._seq), spec.sample_share
        if int((k + 1) * share) == int(k * share):
            return
        with self._lock:
            self._sampled += 1
            self.sampled_total += 1
            if len(self._queue) >= self.options.queue_max:
                self._dropped += 1
                self.dropped_total += 1
                return
            self._queue.append(np.array(x, copy=True))
            if len(self._queue) == 1:
                self._ready.notify()  # the worker waits only on an empty queue

    # -- worker ---------------------------------------------------------------------------
    def run_once(self) -> bool:
        """Evaluate one queued sample; False when the queue was empty (or the evaluator is
        stopping). The worker thread waits for an idle gap before each inference."""
        with self._lock:
            if not self._queue or self._spec is None:
                return False
            x = self._queue.popleft()
            spec, ref_name = self._spec, self._reference
        t0 = time.thread_time()
        try:
            self._evaluate(spec, ref_name, x)
        except _Stopping:
            return False
        else:
            self.evaluated_total += 1
        finally:
            with self._lock:
                self._cpu_s += time.thread_time() - t0
        return True

    def _infer(self, spec: ShadowSpec, lv: LoadedVariant,
               x: np.ndarray) -> tuple[np.ndarray, float]:
        """One shadow inference, started in an idle gap (worker thread only), and its
        milliseconds; :class:`_Stopping` if evaluation was reconfigured meanwhile. With one
        intra-op thread the inference runs in this thread, and its figure is this thread's
        CPU time: the worker's low priority and its waits for the interpreter lock say
        nothing about the variant, and would count against it."""
        if self._in_worker():
            self._wait_for_idle()
            if self._spec is not spec:
                raise _Stopping
        one_thread = getattr(self.pool.engine, "intra_op_threads", None) == 1
        t0, c0 = time.monotonic(), time.thread_time()
        try:
            y, ms = self.pool.infer(lv, x)
        finally:
            took = time.monotonic() - t0
            self._step_s = took if not self._step_s else 0.8 * self._step_s + 0.2 * took
        if one_thread:
            ms = (time.thread_time() - c0) * 1000.0
        return y, ms

    def _in_worker(self) -> bool:
        t = self._thread
        return t is not None and t.ident == threading.get_ident()

    def _evaluate(self, spec: ShadowSpec, ref_name: str | None, x: np.ndarray) -> None:
        table = self.pool.table
        if ref_name is None:
            # A profile-only candidate (``prunefleet tune``) is never a reference.
            others = [lv for n, lv in table.items()
                      if n not in spec.variants and not lv.spec.profile_only]
            if not others:
                return
            ref = max(others, key=lambda lv: (lv.spec.macs, lv.name))
        else:
            ref = table.get(ref_name)  # type: ignore[assignment]
            if ref is None:
                return  # not loaded (yet): nothing to compare with
        try:
            x = self.pool.check_input(x, ref.spec)
            y_ref, _ = self._infer(spec, ref, x)
        except _Stopping:
            raise
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
                y, ms = self._infer(spec, lv, x)
                ok = y.shape == y_ref.shape and bool(np.all(np.isfinite(y)))
            except _Stopping:
                raise
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
            c0 = time.thread_time()
            with self._lock:
                while not self._queue and not self._stop.is_set():
                    self._ready.wait(timeout=1.0)
            if self._stop.is_set():
                return
            t0, c1 = time.monotonic(), time.thread_time()
            self.run_once()  # waits for an idle gap before each inference
            # Stay within the budget: after spending c seconds of CPU, rest c / share - c.
            spent = time.thread_time() - c1
            rest = spent / share - (time.monotonic() - t0)
            with self._lock:
                self._cpu_s += c1 - c0  # waking up counts too
            if rest > 0:
                self._stop.wait(min(rest, 5.0))

    def _wait_for_idle(self) -> None:
        """Wait until no request is in flight and none began within the idle gap; raises
        :class:`_Stopping` when the evaluator stops. Samples wait in the (bounded) queue
        meanwhile: a device saturated with requests gathers no evidence, and its wave says
        so. Each look costs the request path an interpreter-lock handoff: not more often
        than every ``idle_poll_s``. Its CPU time counts in :meth:`run_once`, around it."""
        act = self.activity
        gap = max(self.options.idle_gap_s, self._step_s)
        if act is None or self.options.idle_gap_s <= 0:
            if self._stop.is_set():
                raise _Stopping
            return
        while not self._stop.is_set():
            _, in_flight, last = act.snapshot()
            wait = idle_wait(in_flight, last, time.monotonic(), gap)
            if wait == 0.0:
                return
            self._stop.wait(max(wait, self.options.idle_poll_s))
        raise _Stopping


class _Stopping(Exception):
    """The evaluator stops, or is reconfigured, while the worker waits for a gap."""


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
