"""On-device profiles: each installed variant measured on this device's own hardware.

After a variant passed its smoke test (and on a ``profile`` command) the agent measures
it with its own session, so with its own thread setting: latency p50/p95 at batch 1, CPU
time per inference, the memory its session added (resident memory before and after the
session was created), and energy per inference with its source (:mod:`.energy`).

Never in the way of a request: the measurement runs in its own thread at a raised
niceness (Linux: per thread), in slices of a few inferences. Before each slice it waits
until no request came for ``idle_gap_ms``; a slice during which a request arrived is
thrown away (its latencies met contention, its energy includes the request's); after each
slice it sleeps long enough to stay below ``cpu_budget_percent`` of one core. A steady
request stream (a camera at 30 frames a second) may never leave a gap that long: after
waiting :data:`STARVED_AFTER_S` for one, the profiler measures single inferences in the
stream's short gaps (no request for :data:`SHORT_GAP_S`), each thrown away if a request
arrived meanwhile, until a full gap comes again; those slices give latency and CPU time,
not metered energy.

Energy: with a meter, the idle power is measured first (the device asleep as far as we
are concerned), then the meter is read around every clean slice; the energy per
inference is what the slices used above idle, divided by their inferences. A meter too
coarse for the time it was given, or a figure at or below idle (noise), gives the CPU-time
estimate instead, labelled as such.

Profiles persist in ``<state>/profiles.json`` under each artifact's digest and what the
figures depend on (thread setting, ONNX Runtime version, device class, energy source), so
a restart does not measure unchanged variants again. The simulated engine (fleet
simulator) answers with simulated profiles at once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from prunefleet.shared.fsutil import atomic_write
from prunefleet.shared.messages import VariantProfile, VariantSpec

from .config import ProfileConfig
from .energy import EnergyMeter, estimate_j
from .runtime import LoadedVariant

log = logging.getLogger(__name__)

__all__ = ["Activity", "ProfileStore", "Profiler", "measure", "rss_bytes"]

PROFILE_FILE = "profiles.json"
# Waiting this long (or ten idle gaps, if longer) for a full idle gap means a steady stream:
# the profiler then measures single inferences in gaps of SHORT_GAP_S.
STARVED_AFTER_S = 0.5
SHORT_GAP_S = 0.001


def rss_bytes() -> int | None:
    """The agent's resident memory now (psutil), None where it cannot be read."""
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except Exception:  # psutil raises several types on restricted systems
        return None


@runtime_checkable
class SimulatesProfiles(Protocol):
    """An engine that has no hardware to measure (the simulated one) and says what a
    profile would find."""

    def simulated_profile(self, spec: VariantSpec, threads: int, runs: int) -> VariantProfile:
        ...


@dataclass
class Activity:
    """What the profiler needs to know of the request path: requests so far, requests in
    flight, and when the last one arrived (``time.monotonic``). Written by request
    threads under its lock."""

    started: int = 0
    in_flight: int = 0
    last: float = -1e18

    def __post_init__(self) -> None:
        self._lock = threading.Lock()

    def begin(self) -> None:
        with self._lock:
            self.started += 1
            self.in_flight += 1
            self.last = time.monotonic()

    def end(self) -> None:
        with self._lock:
            self.in_flight -= 1

    def snapshot(self) -> tuple[int, int, float]:
        with self._lock:
            return self.started, self.in_flight, self.last


class ProfileStore:
    """``<state>/profiles.json``: digest → (what the figures depend on, the profile)."""

    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / PROFILE_FILE
        self._data: dict[str, dict] = {}
        try:
            raw = json.loads(self.path.read_text())
            self._data = {k: v for k, v in raw.items()
                          if isinstance(v, dict) and isinstance(v.get("key"), str)}
        except FileNotFoundError:
            pass
        except (ValueError, TypeError, AttributeError) as e:
            log.error("%s unreadable (%s): variants are profiled again", self.path, e)

    def get(self, sha256: str, key: str) -> VariantProfile | None:
        entry = self._data.get(sha256)
        if entry is None or entry["key"] != key:
            return None
        try:
            return VariantProfile.model_validate(entry["profile"])
        except (ValueError, TypeError, KeyError):
            return None

    def put(self, profile: VariantProfile, key: str) -> None:
        self._data[profile.sha256] = {"key": key, "profile": profile.model_dump(mode="json")}
        self._save()

    def retain(self, digests: set[str]) -> None:
        """Forget the profiles of artifacts no longer installed."""
        if set(self._data) - digests:
            self._data = {k: v for k, v in self._data.items() if k in digests}
            self._save()

    def _save(self) -> None:
        atomic_write(self.path, json.dumps(self._data, indent=1, sort_keys=True).encode())


class _Stopped(Exception):
    pass


def _input(spec: VariantSpec) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.standard_normal([1, *spec.input_shape[1:]]).astype(np.float32)


def measure(lv: LoadedVariant, infer: Callable[[LoadedVariant, np.ndarray], object],
            settings: ProfileConfig, *, threads: int, active_power_w: float,
            meter: EnergyMeter | None = None, activity: Activity | None = None,
            memory_mb: float | None = None, stop: threading.Event | None = None,
            wall: Callable[[], float] = time.time) -> VariantProfile:
    """Profile ``lv`` (see the module docstring). Blocks; run it off the request path."""
    activity = activity or Activity()
    stop = stop or threading.Event()
    x = _input(lv.spec)
    # One intra-op thread runs in the calling thread; more use a pool the thread's own
    # CPU clock does not see.
    cpu_clock = time.thread_time if threads == 1 else time.process_time
    gap_s = settings.idle_gap_ms / 1000.0
    budget = settings.cpu_budget_percent / 100.0

    short_s = min(gap_s, SHORT_GAP_S)
    starve_s = max(STARVED_AFTER_S, 10 * gap_s)
    starved = [False]  # no full gap came within starve_s; until one comes again

    def quiet() -> tuple[int, bool]:
        """Wait until no request came for ``gap_s`` (or, starved, ``short_s``); the request
        count then, and whether only a short gap was found."""
        t0 = time.monotonic()
        while True:
            if stop.is_set():
                raise _Stopped
            started, in_flight, last = activity.snapshot()
            now = time.monotonic()
            wait = last + gap_s - now
            if in_flight == 0 and wait <= 0:
                starved[0] = False
                return started, False
            starved[0] = starved[0] or now - t0 >= starve_s
            if starved[0]:
                wait = last + short_s - now
                if in_flight == 0 and wait <= 0:
                    return started, True
                stop.wait(max(wait, short_s))
            else:
                stop.wait(max(wait, gap_s, 0.001))

    def run_slice(n: int) -> tuple[list[float], float, float, float | None] | None:
        """``n`` timed inferences (one in a short gap): (latencies ms, CPU s, busy s,
        joules or None); None when a request arrived meanwhile."""
        seen, short = quiet()
        if short:
            n = 1
        e0 = meter.joules() if meter else None
        c0, t0 = cpu_clock(), time.perf_counter()
        lat = []
        for _ in range(n):
            s = time.perf_counter()
            infer(lv, x)
            lat.append((time.perf_counter() - s) * 1000.0)
            if activity.snapshot()[0] != seen:
                break
        t1, c1 = time.perf_counter(), cpu_clock()
        e1 = meter.joules() if meter else None
        cpu = max(c1 - c0, 0.0)
        if budget < 1.0:
            stop.wait(cpu * (1.0 / budget - 1.0))  # stay within the CPU budget
        started, in_flight, _ = activity.snapshot()
        if started != seen or in_flight or len(lat) < n:
            return None
        joules = None if e0 is None or e1 is None or short else e1 - e0
        return lat, cpu, t1 - t0, joules

    for _ in range(-(-settings.warmup_runs // settings.slice_runs)):
        run_slice(min(settings.slice_runs, settings.warmup_runs))

    if meter is not None and meter.min_window_s > settings.energy_max_s:
        meter = None  # it cannot resolve the time we may spend: the estimate, at once
    idle_w = _idle_power(meter, quiet, activity, stop) if meter else None

    lat_all: list[float] = []
    cpu_s = 0.0
    e_j = e_busy_s = 0.0
    e_runs = 0
    while len(lat_all) < settings.runs:
        got = run_slice(min(settings.slice_runs, settings.runs - len(lat_all)))
        if got is None:
            continue
        lat, cpu, busy, joules = got
        lat_all += lat
        cpu_s += cpu
        if joules is not None:
            e_j, e_busy_s, e_runs = e_j + joules, e_busy_s + busy, e_runs + len(lat)
    runs = len(lat_all)
    cpu_per = cpu_s / runs
    # A slow meter wants more busy time than the latency runs took: keep going (bounded).
    if meter is not None and idle_w is not None:
        extra_s = 0.0
        while e_busy_s < meter.min_window_s and extra_s < settings.energy_max_s:
            got = run_slice(settings.slice_runs)
            if got is None:
                continue
            lat, _, busy, joules = got
            extra_s += busy
            if joules is not None:
                e_j, e_busy_s, e_runs = e_j + joules, e_busy_s + busy, e_runs + len(lat)
    energy_j, source = None, None
    if meter is not None and idle_w is not None and e_runs and e_busy_s >= meter.min_window_s:
        above_idle = e_j - idle_w * e_busy_s
        if above_idle > 0:
            energy_j, source = above_idle / e_runs, meter.source
        else:
            log.info("%s: energy above idle not resolved by %s; using the CPU-time estimate",
                     lv.name, meter.source)
    if energy_j is None:
        energy_j, source = estimate_j(cpu_per, active_power_w), "cpu_time_estimate"
    p50, p95 = (float(v) for v in np.percentile(lat_all, [50, 95]))
    return VariantProfile(
        sha256=lv.spec.sha256, latency_ms_p50=p50, latency_ms_p95=max(p50, p95),
        cpu_ms=cpu_per * 1000.0, memory_mb=memory_mb, energy_mj=energy_j * 1000.0,
        energy_source=source, runs=runs, threads=threads, ts=wall())


def _idle_power(meter: EnergyMeter, quiet: Callable[[], tuple[int, bool]],
                activity: Activity, stop: threading.Event, attempts: int = 5) -> float | None:
    """Watts the device draws while this agent serves nothing (requests, and a short gap
    only, void a try)."""
    window = max(meter.min_window_s, 0.1)
    for _ in range(attempts):
        seen, short = quiet()
        if short:
            continue
        e0, t0 = meter.joules(), time.monotonic()
        if stop.wait(window):
            raise _Stopped
        e1, t1 = meter.joules(), time.monotonic()
        if activity.snapshot()[0] != seen or e0 is None or e1 is None:
            continue
        return max(e1 - e0, 0.0) / max(t1 - t0, 1e-9)
    return None


@dataclass(frozen=True)
class _Job:
    lv: LoadedVariant
    memory_mb: float | None


class Profiler:
    """Profiles variants in a background thread; the loop thread collects the results
    (:meth:`take`). ``key`` names what the figures depend on; stored profiles with the
    same key are taken as they are."""

    def __init__(self, engine: object, infer: Callable[[LoadedVariant, np.ndarray], object],
                 settings: ProfileConfig, store: ProfileStore, *, key: str, threads: int,
                 active_power_w: float, meter: EnergyMeter | None = None,
                 activity: Activity | None = None, wall: Callable[[], float] = time.time,
                 ) -> None:
        self.engine = engine
        self.infer = infer
        self.settings = settings
        self.store = store
        self.key = key
        self.threads = threads
        self.active_power_w = active_power_w
        self.meter = meter
        self.activity = activity or Activity()
        self.wall = wall
        self._jobs: queue.Queue[_Job] = queue.Queue()
        self._results: queue.Queue[tuple[str, VariantProfile]] = queue.Queue()
        self._pending: set[tuple[str, str]] = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def stored(self, spec: VariantSpec) -> VariantProfile | None:
        return self.store.get(spec.sha256, self.key)

    def want(self, lv: LoadedVariant, memory_mb: float | None = None,
             force: bool = False) -> None:
        """Profile ``lv`` unless a stored profile (same digest and key) exists or one is
        under way; ``force`` measures again."""
        spec = lv.spec
        if not self.settings.enabled:
            return
        if not force and (p := self.stored(spec)) is not None:
            self._results.put((spec.name, p))
            return
        if isinstance(self.engine, SimulatesProfiles):
            p = self.engine.simulated_profile(spec, self.threads, self.settings.runs)
            self._results.put((spec.name, p.model_copy(update={"ts": self.wall()})))
            return
        with self._lock:
            if (spec.name, spec.sha256) in self._pending:
                return
            self._pending.add((spec.name, spec.sha256))
            self._jobs.put(_Job(lv, memory_mb))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="profiler",
                                                daemon=True)
                self._thread.start()

    def take(self) -> list[tuple[str, VariantProfile]]:
        """Profiles finished since the last call (loop thread)."""
        out = []
        while True:
            try:
                out.append(self._results.get_nowait())
            except queue.Empty:
                return out

    @property
    def busy(self) -> bool:
        with self._lock:
            return bool(self._pending)

    def close(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        t = self._thread
        if t is not None:
            t.join(timeout_s)

    def _run(self) -> None:
        if hasattr(os, "nice") and self.settings.nice:
            with contextlib.suppress(OSError):
                os.nice(self.settings.nice)  # this thread only, on Linux
        while not self._stop.is_set():
            with self._lock:
                try:
                    job = self._jobs.get_nowait()
                except queue.Empty:
                    self._thread = None
                    return
            spec = job.lv.spec
            try:
                p = measure(job.lv, self.infer, self.settings, threads=self.threads,
                            active_power_w=self.active_power_w, meter=self.meter,
                            activity=self.activity, memory_mb=job.memory_mb,
                            stop=self._stop, wall=self.wall)
            except _Stopped:
                return
            except Exception as e:  # a session that fails here must not kill the thread
                log.error("profiling %s failed: %s", spec.name, e)
            else:
                log.info("profiled %s: p50 %.3f ms, p95 %.3f ms, %.3f mJ (%s)", spec.name,
                         p.latency_ms_p50, p.latency_ms_p95, p.energy_mj, p.energy_source)
                self._results.put((spec.name, p))
            finally:
                with self._lock:
                    self._pending.discard((spec.name, spec.sha256))


def profile_key(*, threads: int, ort_version: str | None, device_class: str,
                energy: str, active_power_w: float) -> str:
    """What a stored profile's figures depend on: a change of any re-profiles."""
    return (f"threads={threads};ort={ort_version};class={device_class};energy={energy};"
            f"active_w={active_power_w:g}")
