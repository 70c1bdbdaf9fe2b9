"""Simulated inference and downloads, for the fleet simulator (no device needs them).

A simulated device is the real :class:`~prunefleet.agent.service.Agent` (follower,
installer, policy, telemetry, reported state) with these parts plugged in where a device
has hardware:

- :class:`SimulatedEngine` creates no ONNX Runtime session (that is what makes a device
  light). Its smoke test passes, or fails for a device told to fail. Its answers are
  right with the variant's declared accuracy and take the variant's declared latency
  times the device's speed. The true label travels in the input itself: the first
  element of each sample (:func:`encode_label`), which only the simulated application
  writes.
- :class:`SimulatedDownloader` (``--no-download``) fetches nothing: a variant "arrives"
  after its size divided by the device's bandwidth, then installs as usual.
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import numpy as np

from prunefleet.shared.messages import DeviceFacts, VariantProfile, VariantSpec

from .downloader import Completed, Failed
from .errors import InstallError
from .runtime import LoadedVariant

__all__ = ["SimulatedDownloader", "SimulatedEngine", "encode_label", "simulated_facts"]


def encode_label(x: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``x`` (N, ...) with each sample's first element set to its label."""
    out = np.array(x, dtype=np.float32, copy=True)
    out.reshape(out.shape[0], -1)[:, 0] = labels
    return out


class SimulatedEngine:
    """``active_power_w``: watts a busy core of this simulated device draws above idle
    (its profiles' energy is their latency times it, as the CPU-time estimate counts)."""

    def __init__(self, *, speed: float = 1.0, fails: bool = False, seed: str | int = 0,
                 active_power_w: float = 2.0) -> None:
        self.speed = speed
        self.fails = fails
        self.active_power_w = active_power_w
        self._rng = np.random.default_rng(
            int.from_bytes(hashlib.sha256(f"engine:{seed}".encode()).digest()[:8], "big"))
        self._lock = threading.Lock()

    def load(self, path: Path, spec: VariantSpec) -> LoadedVariant:
        if self.fails:
            raise InstallError(f"{spec.name}: smoke test output differs from the golden "
                               "output (simulated failure)")
        return LoadedVariant(spec, None, "x")

    def infer(self, lv: LoadedVariant, x: np.ndarray) -> tuple[np.ndarray, float]:
        spec = lv.spec
        n, classes = x.shape[0], spec.num_classes
        labels = np.clip(np.rint(x.reshape(n, -1)[:, 0]), 0, classes - 1).astype(np.int64)
        with self._lock:
            right = self._rng.random(n) < (spec.accuracy if spec.accuracy is not None else 0.9)
            wrong = (labels + 1 + self._rng.integers(0, max(1, classes - 1), n)) % classes
            jitter = float(self._rng.uniform(0.9, 1.1))
        pred = np.where(right, labels, wrong)
        # A right answer is confident, a wrong one is not: the cascade sees the difference.
        logits = np.zeros((n, classes), dtype=np.float32)
        logits[np.arange(n), pred] = np.where(right, 6.0, 1.0)
        return logits, self._latency_ms(spec) * jitter * n

    def _latency_ms(self, spec: VariantSpec) -> float:
        per_sample = spec.latency_ms if spec.latency_ms is not None else 0.2 + spec.macs / 5e6
        return per_sample * self.speed

    def simulated_profile(self, spec: VariantSpec, threads: int, runs: int) -> VariantProfile:
        """What profiling would find here: the declared latency times the device's speed,
        all of it CPU time, and the energy the CPU-time estimate gives for it."""
        ms = self._latency_ms(spec)
        return VariantProfile(
            sha256=spec.sha256, latency_ms_p50=ms, latency_ms_p95=ms * 1.1, cpu_ms=ms,
            memory_mb=round(spec.params * 4 / 2**20 + 0.5, 3), energy_mj=ms * self.active_power_w,
            energy_source="cpu_time_estimate", runs=runs, threads=threads)


def simulated_facts(device_class: str = "sim-x86_64-1c", cores: int = 1,
                    active_power_w: float = 2.0) -> DeviceFacts:
    """The facts a simulated device reports (it reads nothing of the machine it runs on)."""
    return DeviceFacts(arch="simulated", cpu_model="simulated", isa=[], cores=cores,
                       memory_mb=1024, ort_version=None, providers=[],
                       device_class=device_class, active_power_w=active_power_w)


class SimulatedDownloader:
    """The downloader's interface, with a timed progress bar instead of chunks."""

    def __init__(self, bandwidth_bytes_s: float) -> None:
        self.bandwidth = bandwidth_bytes_s
        self.rejected_chunks = 0
        self.repeated_chunks = 0
        self._active: dict[str, tuple[VariantSpec, float]] = {}  # sha → (spec, started)
        self._progress: dict[str, float] = {}

    def heard(self, now: float) -> None:
        """Nothing to time out: progress is simulated."""

    def want(self, spec: VariantSpec, now: float) -> None:
        self._active.setdefault(spec.sha256, (spec, now))

    def cancel_except(self, keep: set[str]) -> None:
        for sha in [s for s in self._active if s not in keep]:
            del self._active[sha]

    def progress(self) -> dict[str, float]:
        return {spec.name: round(self._progress.get(sha, 0.0), 3)
                for sha, (spec, _) in self._active.items()}

    def active(self) -> list[VariantSpec]:
        return [spec for spec, _ in self._active.values()]

    def handle(self, topic: str, payload: bytes, now: float) -> list[Completed | Failed]:
        return []

    def tick(self, now: float) -> list[Completed | Failed]:
        done: list[Completed | Failed] = []
        for sha, (spec, started) in list(self._active.items()):
            share = (now - started) * self.bandwidth / max(spec.size, 1)
            self._progress[sha] = min(1.0, share)
            if share >= 1.0:
                del self._active[sha]
                done.append(Completed(spec))
        return done
