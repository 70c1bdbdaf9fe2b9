"""Install safety: smoke test before serving, fallback to the last known good variant,
and downloads that resume after SIGKILL without fetching finished chunks again."""

from __future__ import annotations

import random
import re
import signal

import numpy as np
import pytest
from fleet_helpers import agent_toml, make_server, spawn_agent, stop_agent, wait_for
from onnx_models import golden_for, make_mlp, mlp_spec

from prunefleet.server.fleet import spec_from_file
from prunefleet.shared.chunks import sha256_file
from prunefleet.shared.messages import Golden


def _x():
    return np.random.default_rng(0).normal(0, 1, (1, 1, 8, 8)).astype(np.float32)


def _bad_spec(tmp_path, kind: str):
    path = tmp_path / f"{kind}.onnx"
    if kind == "nan":
        make_mlp(path, 24, seed=7, nan=True)
        return spec_from_file(path, name="bad", input_shape=[1, 1, 8, 8], num_classes=10,
                              params=1, macs=1, chunk_bytes=2048)
    if kind == "wrong_shape":
        make_mlp(path, 24, seed=7)
        return spec_from_file(path, name="bad", input_shape=[1, 1, 8, 8], num_classes=5,
                              params=1, macs=1, chunk_bytes=2048)
    if kind == "wrong_output":
        make_mlp(path, 24, seed=7)
        other = make_mlp(tmp_path / "other.onnx", 24, seed=8)
        gi, go = golden_for(other)
        return spec_from_file(path, name="bad", input_shape=[1, 1, 8, 8], num_classes=10,
                              params=1, macs=1, chunk_bytes=2048,
                              golden=Golden(input_b64=gi, output_b64=go))
    if kind == "not_onnx":
        path.write_bytes(b"this is not an onnx model" * 100)
        return spec_from_file(path, name="bad", input_shape=[1, 1, 8, 8], num_classes=10,
                              params=1, macs=1, chunk_bytes=2048)
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind, reason",
    [("nan", "not finite"), ("wrong_shape", "output shape"),
     ("wrong_output", "differs from the golden"), ("not_onnx", "cannot load")],
)
def test_failing_variant_is_refused_and_last_known_good_keeps_serving(
    tmp_path, fleet, kind, reason
):
    srv, agent = fleet
    good = mlp_spec(tmp_path / "good.onnx", "good", hidden=32, seed=1, chunk_bytes=2048)
    srv.publish_artifact(good, (tmp_path / "good.onnx").read_bytes())
    srv.deploy("dev-1", [good])
    wait_for(lambda: "good" in agent.pool.table, 20, what="good installed")
    before = agent.predict(_x()).logits.copy()

    bad = _bad_spec(tmp_path, kind)
    srv.publish_artifact(bad, (tmp_path / f"{kind}.onnx").read_bytes())
    srv.deploy("dev-1", [bad])
    wait_for(lambda: any(e.kind == "install_failed" and reason in e.detail
                         for e in srv.store.events("dev-1")), 30,
             what=f"install_failed saying {reason!r}")
    out = agent.predict(_x())
    assert out.variant == "good"
    np.testing.assert_allclose(out.logits, before)
    assert "bad" not in agent.pool.specs
    assert not agent.store.path_of(bad.sha256).exists()
    wait_for(lambda: (d := srv.store.device("dev-1")) and d.last_error
             and reason in d.last_error, 10, what="the failure in the reported state")


@pytest.mark.timeout(180)
def test_download_resumes_after_sigkill_without_refetching(tmp_path, mosquitto):
    srv = make_server(tmp_path, mosquitto.url)
    # ~600 KB in 1 KB chunks, pulled one at a time: slow enough to kill mid-way.
    spec = mlp_spec(tmp_path / "big.onnx", "big", hidden=2300, seed=3, chunk_bytes=1024)
    n = len(spec.chunk_sha256)
    srv.publish_artifact(spec, (tmp_path / "big.onnx").read_bytes())
    srv.deploy("dev-r", [spec])
    state = tmp_path / "dev-r"
    state.mkdir()
    cfg = state / "agent.toml"
    cfg.write_text(agent_toml("dev-r", mosquitto.url, state, tmp_path / "keys/public.pem",
                              extra="download_window_chunks = 1"))
    done_file = state / "variants" / f".{spec.sha256}.done"
    rng = random.Random(7)
    logs = []
    try:
        for kill in range(3):
            log = state / f"agent-{kill}.log"
            logs.append(log)
            p = spawn_agent(cfg, log)
            recorded = len(done_file.read_text().split()) if done_file.exists() else 0
            target = recorded + rng.randint(n // 10, n // 5)
            wait_for(lambda t=target: done_file.exists()
                     and len(done_file.read_text().split()) >= t,
                     60, every_s=0.01, what=f"{target} chunks", procs=[p])
            p.send_signal(signal.SIGKILL)
            p.wait(10)
            at_kill = len(set(done_file.read_text().split()))
            assert 0 < at_kill < n
        log = state / "agent-final.log"
        logs.append(log)
        p = spawn_agent(cfg, log)
        installed = state / "variants" / f"{spec.sha256}.onnx"
        wait_for(installed.exists, 60, what="the install", procs=[p])
        wait_for(lambda: "verified: fetched" in log.read_text(), 10, what="the summary line")
        stop_agent(p)
    finally:
        srv.stop()
    assert sha256_file(installed) == spec.sha256
    assert not list((state / "variants").glob(".*.part"))
    # Each restart resumed from what was recorded, and the chunks fetched over all
    # processes add up to the artifact: nothing finished was fetched again.
    resumed = [int(m.group(1)) for lg in logs[1:] for m in
               [re.search(r"(\d+) already done", lg.read_text())] if m]
    assert len(resumed) == 3 and resumed == sorted(resumed) and resumed[0] > 0
    fetched = int(re.search(r"fetched (\d+) of", logs[-1].read_text()).group(1))
    assert fetched == n - resumed[-1]
