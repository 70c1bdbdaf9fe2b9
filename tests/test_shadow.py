"""Shadow evaluation on the device: the real Agent with ONNX Runtime on the in-memory
broker. A variant that answers like the reference agrees; a differently seeded one does
not; requests never wait for a shadow run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from onnx_models import mlp_spec, scaled_copy
from test_agent_memory import Fleet

from prunefleet.agent.service import Agent
from prunefleet.agent.shadow import ShadowOptions
from prunefleet.server.fleet import spec_from_file
from prunefleet.shared.messages import ShadowReport, ShadowSpec, VariantSpec

CHUNK = 4096


class OnnxFleet(Fleet):
    """The memory-broker fleet with the agent's real ONNX Runtime engine."""

    def onnx_agent(self) -> Agent:
        agent = self.agent()
        from prunefleet.agent.runtime import OnnxEngine

        engine = OnnxEngine(1)
        agent.engine = agent.pool.engine = agent.installer.engine = engine
        # The test runs the shadow samples itself, so what it asserts is deterministic.
        agent.shadow.options = ShadowOptions(queue_max=32, worker_thread=False)
        return agent

    def publish(self, spec: VariantSpec, path: Path) -> None:
        self.publish_chunks(spec, path.read_bytes())


def _nudged(src: Path, dst: Path, name: str, scale: float) -> VariantSpec:
    scaled_copy(src, dst, scale)
    return spec_from_file(dst, name=name, input_shape=[1, 1, 8, 8], num_classes=10,
                          params=64 * 32 + 320, macs=64 * 32 + 320 - 1, chunk_bytes=CHUNK)


@pytest.fixture
def setup(tmp_path: Path):
    fleet = OnnxFleet(tmp_path)
    base = mlp_spec(tmp_path / "base.onnx", "base", 32, seed=0, chunk_bytes=CHUNK)
    good = _nudged(tmp_path / "base.onnx", tmp_path / "good.onnx", "good", 0.9)
    bad = mlp_spec(tmp_path / "bad.onnx", "bad", 16, seed=7, chunk_bytes=CHUNK)
    for spec, f in ((base, "base"), (good, "good"), (bad, "bad")):
        fleet.publish(spec, tmp_path / f"{f}.onnx")
    agent = fleet.onnx_agent()
    fleet.deploy([base])
    fleet.run_until(agent, lambda: set(agent.pool.table) == {"base"}, steps=200)
    return fleet, agent, base, good, bad


def _requests(n: int, seed: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 1, (n, 1, 1, 8, 8)).astype(np.float32)


def _shadow_telemetry(fleet: OnnxFleet, agent: Agent) -> ShadowReport | None:
    agent.cut_telemetry()
    fleet.telemetry_batches()
    agent.step()
    got = fleet.telemetry_batches()
    assert got
    return got[-1].shadow


@pytest.mark.timeout(60)
def test_the_bad_variant_disagrees_and_the_good_one_agrees(setup) -> None:
    fleet, agent, base, good, bad = setup
    for x in _requests(20):
        agent.predict(x)  # served "base" before the rollout
    fleet.deploy([base, good, bad], shadow=ShadowSpec(variants=["good", "bad"],
                                                      sample_share=0.5, rollout_id=4))
    fleet.run_until(agent, lambda: set(agent.pool.table) == {"base", "good", "bad"},
                    steps=200)
    agent.serving.update(pinned="base")  # what serves does not matter to the evaluation
    served = []
    for chunk in np.split(_requests(200, seed=5), 10):
        for x in chunk:
            served.append(agent.predict(x).variant)
        while agent.shadow.run_once():
            pass
    assert len(served) == 200
    report = _shadow_telemetry(fleet, agent)
    assert report is not None and report.rollout_id == 4
    assert (report.sampled, report.dropped) == (100, 0)
    g, b = report.variants["good"], report.variants["bad"]
    assert (g.reference, b.reference) == ("base", "base")
    assert g.samples == b.samples == 100
    assert g.agreed == 100 and g.errors == 0
    assert b.agreed < 50
    assert b.divergence_sum / b.samples > g.divergence_sum / g.samples
    assert g.latency_ms_p95 is not None
    assert report.cpu_ms > 0


@pytest.mark.timeout(60)
def test_a_full_shadow_queue_drops_samples_and_no_request_waits(setup) -> None:
    fleet, agent, base, _, bad = setup
    fleet.deploy([base, bad], shadow=ShadowSpec(variants=["bad"], sample_share=1.0))
    fleet.run_until(agent, lambda: "bad" in agent.pool.table, steps=200)
    answers = [agent.predict(x) for x in _requests(100)]  # nobody runs the shadow queue
    assert len(answers) == 100
    report = _shadow_telemetry(fleet, agent)
    assert report is not None
    assert (report.sampled, report.dropped) == (100, 68)  # the queue holds 32


@pytest.mark.timeout(60)
def test_evaluation_stops_with_a_desired_state_without_a_shadow_section(setup) -> None:
    fleet, agent, base, _, bad = setup
    fleet.deploy([base, bad], shadow=ShadowSpec(variants=["bad"], sample_share=1.0))
    fleet.run_until(agent, lambda: "bad" in agent.pool.table, steps=200)
    fleet.deploy([base, bad])
    fleet.run_until(agent, lambda: agent.manifest is not None and agent.manifest.shadow is None,
                    steps=50)
    agent.step()
    for x in _requests(20):
        agent.predict(x)
    assert not agent.shadow.run_once()
    assert _shadow_telemetry(fleet, agent) is None


@pytest.mark.parametrize(("in_flight", "last_start", "now", "wait"), [
    (1, 0.0, 10.0, 0.002),     # a request in flight: wait, however long ago it began
    (0, 9.9995, 10.0, 0.0015),  # one began 0.5 ms ago: wait out the rest of the gap
    (0, 9.998, 10.0, 0.0),     # idle for the whole gap: run now
    (0, -1e18, 10.0, 0.0),     # no request yet
])
def test_the_worker_runs_only_in_the_request_paths_idle_gaps(in_flight, last_start, now,
                                                              wait):
    from prunefleet.agent.shadow import idle_wait

    assert idle_wait(in_flight, last_start, now, 0.002) == pytest.approx(wait)


def test_the_worker_evaluates_queued_samples_once_requests_pause(setup):
    import threading

    from prunefleet.agent.profile import Activity
    from prunefleet.agent.shadow import ShadowEvaluator

    fleet, agent, base, good, _bad = setup
    fleet.deploy([base, good])
    fleet.run_until(agent, lambda: set(agent.pool.table) == {"base", "good"}, steps=200)
    activity = Activity()
    ev = ShadowEvaluator(agent.pool, ShadowOptions(queue_max=8, cpu_share=1.0),
                         activity=activity)
    ev.configure(ShadowSpec(variants=["good"], sample_share=1.0, reference="base"), "base")
    activity.begin()  # a request in flight: the samples wait in the queue
    for x in _requests(3):
        ev.offer(x)
    ev.start()
    try:
        with ev._lock:  # the worker never takes a sample while a request is in flight
            assert len(ev._queue) == 3
        activity.end()
        done = threading.Event()

        def evaluated() -> None:
            while not done.is_set():
                with ev._lock:
                    if not ev._queue:
                        done.set()
                        return
                ev._stop.wait(0.001)

        threading.Thread(target=evaluated, daemon=True).start()
        assert done.wait(10), "the worker evaluated the queued samples once idle"
    finally:
        ev.close()
