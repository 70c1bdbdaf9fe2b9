"""A simulated application on the device: labelled digit requests in phases.

Used by the demo and tests. It feeds held-out samples through :meth:`Agent.predict` at a
fixed rate; a phase with ``noise_sigma`` adds Gaussian noise (a "busy scene"), which the
agent's complexity estimate notices. Labels let telemetry report served accuracy.
"""

from __future__ import annotations

import logging
import threading
import time

import numpy as np

from .config import WorkloadConfig
from .errors import InferenceError, NoVariantError

log = logging.getLogger(__name__)


class SimulatedApp:
    def __init__(self, agent, config: WorkloadConfig):
        self.agent = agent
        self.config = config
        with np.load(config.data) as d:
            self.x = np.ascontiguousarray(d["x"], dtype=np.float32)
            self.y = np.asarray(d["y"], dtype=np.int64)
        if self.x.ndim != 4 or len(self.x) != len(self.y) or len(self.x) == 0:
            raise ValueError(f"{config.data}: expected x (N,C,H,W) and y (N,)")
        self.rng = np.random.default_rng(config.seed)
        self.served = 0
        self.errors = 0
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="simapp", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        period = 1.0 / self.config.rate_hz
        phases = self.config.phases
        t_next = time.monotonic()
        phase_i, phase_end = 0, time.monotonic() + phases[0].duration_s
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= phase_end:
                phase_i = (phase_i + 1) % len(phases)
                phase_end = now + phases[phase_i].duration_s
            sigma = phases[phase_i].noise_sigma
            i = int(self.rng.integers(len(self.x)))
            x = self.x[i]
            if sigma > 0:
                x = (x + self.rng.normal(0, sigma, x.shape)).astype(np.float32)
            try:
                self.agent.predict(x, label=int(self.y[i]))
                self.served += 1
            except NoVariantError:
                pass  # nothing installed yet
            except InferenceError as e:
                self.errors += 1
                log.warning("request failed: %s", e)
            t_next += period
            delay = t_next - time.monotonic()
            if delay > 0:
                self._stop.wait(delay)
            else:
                t_next = time.monotonic()
