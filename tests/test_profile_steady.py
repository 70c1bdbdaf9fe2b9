"""A device whose requests never pause for the profiler's idle gap (a camera at 30 frames
a second, a sensor polled every few milliseconds) still gets its variants profiled, in the
stream's short gaps."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from onnx_models import mlp_spec

from prunefleet.agent.config import ProfileConfig
from prunefleet.agent.profile import Activity, measure
from prunefleet.agent.runtime import OnnxEngine, load_session

# A full idle gap of 50 ms never comes in a stream of a request every 4 ms.
SETTINGS = ProfileConfig(runs=30, warmup_runs=5, slice_runs=5, cpu_budget_percent=100,
                         idle_gap_ms=50, nice=0)


class Stream:
    """Requests every ``every_s`` (each in flight for ``busy_s``) until stopped."""

    def __init__(self, activity: Activity, every_s: float = 0.004,
                 busy_s: float = 0.0005) -> None:
        self.activity, self.every_s, self.busy_s = activity, every_s, busy_s
        self.served = 0
        self.started = threading.Event()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(self.every_s):
            self.activity.begin()
            end = time.perf_counter() + self.busy_s
            while time.perf_counter() < end:
                pass
            self.activity.end()
            self.served += 1
            self.started.set()


@pytest.mark.timeout(60)
def test_a_steady_stream_does_not_keep_a_variant_from_being_profiled(tmp_path: Path) -> None:
    path = tmp_path / "mlp.onnx"
    lv = load_session(path, mlp_spec(path, "mlp", hidden=32), 1)
    activity = Activity()
    stream = Stream(activity)
    stream.thread.start()
    try:
        assert stream.started.wait(10)
        before = stream.served
        p = measure(lv, OnnxEngine(1).infer, SETTINGS, threads=1, active_power_w=4.0,
                    activity=activity)
        during = stream.served - before
    finally:
        stream.stop.set()
        stream.thread.join(5)
    assert p.runs == SETTINGS.runs
    assert 0 < p.latency_ms_p50 <= p.latency_ms_p95
    assert during >= 10  # the stream went on while the profile was taken
    assert p.energy_source == "cpu_time_estimate"
