"""Shadow evaluation on the device: the real Agent with ONNX Runtime on the in-memory
broker. A variant that answers like the reference agrees; a differently seeded one does
not; requests never wait for a shadow run."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from onnx_models import mlp_spec, scaled_copy
from test_agent_memory import Fleet

from prunefleet.agent.profile import Activity
from prunefleet.agent.service import Agent
from prunefleet.agent.shadow import ShadowEvaluator, ShadowOptions
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


class _Watched(Activity):
    """The request path's activity; ``busy_looks`` is set once the worker has looked twice
    while a request was in flight."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.looks_while_busy = 0
        self.busy_looks = threading.Event()

    def snapshot(self) -> tuple[int, int, float]:
        snap = super().snapshot()
        if snap[1] > 0:
            self.looks_while_busy += 1
            if self.looks_while_busy >= 2:
                self.busy_looks.set()
        return snap


class _Recording:
    """The agent's engine, recording which variant each shadow inference ran; with
    ``arrive_during`` a request arrives while that variant's first inference runs."""

    def __init__(self, inner, activity: Activity, arrive_during: str | None = None) -> None:
        self.inner, self.activity, self.arrive_during = inner, activity, arrive_during
        self.ran: list[str] = []
        self.changed = threading.Condition()

    def infer(self, lv, x):
        if lv.name == self.arrive_during:
            self.arrive_during = None
            self.activity.begin()
        out = self.inner.infer(lv, x)
        with self.changed:
            self.ran.append(lv.name)
            self.changed.notify_all()
        return out

    def wait_for(self, n: int) -> list[str]:
        with self.changed:
            assert self.changed.wait_for(lambda: len(self.ran) >= n, timeout=10)
            return list(self.ran)


def _worker(agent: Agent, activity: Activity, arrive_during: str | None = None):
    agent.pool.engine = engine = _Recording(agent.pool.engine, activity, arrive_during)
    ev = ShadowEvaluator(agent.pool, ShadowOptions(queue_max=8, cpu_share=1.0,
                                                   idle_poll_s=0.001), activity=activity)
    ev.configure(ShadowSpec(variants=["good"], sample_share=1.0, reference="base"), "base")
    return ev, engine


@pytest.mark.timeout(60)
def test_the_worker_evaluates_queued_samples_once_requests_pause(setup) -> None:
    fleet, agent, base, good, _bad = setup
    fleet.deploy([base, good])
    fleet.run_until(agent, lambda: set(agent.pool.table) == {"base", "good"}, steps=200)
    activity = _Watched()
    ev, engine = _worker(agent, activity)
    activity.begin()  # a request in flight: the samples wait
    for x in _requests(3):
        ev.offer(x)
    ev.start()
    try:
        assert activity.busy_looks.wait(10)
        assert engine.ran == []  # the worker looked, saw the request and ran nothing
        activity.end()
        assert engine.wait_for(6) == ["base", "good"] * 3
        report = ev.cut()
        assert report is not None and report.variants["good"].samples == 3
        assert report.variants["good"].agreed == 3
    finally:
        ev.close()


@pytest.mark.timeout(60)
def test_a_request_arriving_mid_sample_waits_for_one_inference_not_the_sample(setup) -> None:
    fleet, agent, base, good, _bad = setup
    fleet.deploy([base, good])
    fleet.run_until(agent, lambda: set(agent.pool.table) == {"base", "good"}, steps=200)
    activity = _Watched()
    ev, engine = _worker(agent, activity, arrive_during="base")
    ev.offer(_requests(1)[0])
    ev.start()
    try:
        # The reference ran; a request arrived meanwhile: the candidate's inference waits
        # for the request path to be idle again.
        assert engine.wait_for(1) == ["base"]
        assert activity.busy_looks.wait(10)
        assert engine.ran == ["base"]
        activity.end()
        assert engine.wait_for(2) == ["base", "good"]
    finally:
        ev.close()
    report = ev.cut()
    assert report is not None and report.variants["good"].samples == 1
    assert report.cpu_ms > 0


def test_a_share_of_requests_is_sampled_evenly(setup) -> None:
    agent = setup[1]
    ev = ShadowEvaluator(agent.pool, ShadowOptions(queue_max=4096, worker_thread=False))
    for share, n, want in ((0.05, 400, 20), (0.2, 100, 20), (1 / 3, 99, 33), (1.0, 7, 7)):
        ev.configure(ShadowSpec(variants=["bad"], sample_share=share), "base")
        for x in _requests(n):
            ev.offer(x)
        report = ev.cut()
        assert report is not None and (report.sampled, report.dropped) == (want, 0)
        ev.configure(None, None)
