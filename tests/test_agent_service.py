"""The agent as a service: systemd notifications, signals, telemetry that survives
broker and agent restarts, the cascade, session unloading, policy from the server."""

from __future__ import annotations

import os
import re
import signal
import socket
import time
from dataclasses import replace

import numpy as np
import pytest
from fleet_helpers import (
    agent_toml,
    make_server,
    run_agent,
    spawn_agent,
    stop_agent,
    wait_for,
)
from onnx_models import mlp_spec, workload

from prunefleet.server.errors import DistributionError
from prunefleet.shared.messages import Manifest


def _x(seed=0, n=1):
    return np.random.default_rng(seed).normal(0, 1, (n, 1, 8, 8)).astype(np.float32)


class NotifySocket:
    """Stands in for systemd: a datagram socket that records what the agent says."""

    def __init__(self, path):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.messages: list[str] = []

    def poll(self) -> list[str]:
        while True:
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except TimeoutError:
                return self.messages

    def saw(self, text: str) -> bool:
        return any(text in m for m in self.poll())

    def close(self):
        self.sock.close()


@pytest.mark.timeout(90)
def test_sd_notify_watchdog_sighup_and_sigterm(tmp_path, mosquitto):
    srv = make_server(tmp_path, mosquitto.url)
    spec = mlp_spec(tmp_path / "v.onnx", "v", hidden=16)
    srv.publish_artifact(spec, (tmp_path / "v.onnx").read_bytes())
    srv.deploy("dev-n", [spec])
    state = tmp_path / "dev-n"
    state.mkdir()
    cfg = state / "agent.toml"
    base = agent_toml("dev-n", mosquitto.url, state, tmp_path / "keys/public.pem")
    cfg.write_text(base + "[policy]\nbattery_low_percent = 30\n")
    ns = NotifySocket(tmp_path / "notify.sock")
    env = {"NOTIFY_SOCKET": ns.path, "WATCHDOG_USEC": "400000"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        p = spawn_agent(cfg, state / "agent.log")
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    try:
        wait_for(lambda: ns.saw("READY=1"), 20, what="READY=1", procs=[p])
        # WATCHDOG_USEC 0.4 s: pinged at least every 0.2 s, so three come soon.
        wait_for(lambda: sum(m == "WATCHDOG=1" for m in ns.poll()) >= 3, 10,
                 what="three watchdog pings", procs=[p])
        # SIGHUP with a changed policy: reloaded; with a broken one: kept, and said so.
        cfg.write_text(base + "[policy]\nbattery_low_percent = 45\n")
        p.send_signal(signal.SIGHUP)
        wait_for(lambda: ns.saw("STATUS=policy reloaded"), 10, what="reload", procs=[p])
        cfg.write_text(base + "[policy]\nbattery_low_percent = 'many'\n")
        p.send_signal(signal.SIGHUP)
        wait_for(lambda: ns.saw("STATUS=reload failed"), 10, what="failed reload", procs=[p])
        assert p.poll() is None, "a bad config on SIGHUP must not stop the agent"
        assert stop_agent(p) == 0
        assert ns.saw("STOPPING=1")
    finally:
        stop_agent(p)
        ns.close()
        srv.stop()
    assert "policy reloaded" in (state / "agent.log").read_text()


@pytest.mark.timeout(150)
def test_telemetry_survives_broker_and_agent_restarts(tmp_path, durable_mosquitto):
    mosquitto = durable_mosquitto
    srv = make_server(tmp_path, mosquitto.url)
    spec = mlp_spec(tmp_path / "v.onnx", "v", hidden=16)
    srv.publish_artifact(spec, (tmp_path / "v.onnx").read_bytes())
    srv.deploy("dev-t", [spec])
    state = tmp_path / "dev-t"
    state.mkdir()
    cfg = state / "agent.toml"
    cfg.write_text(agent_toml("dev-t", mosquitto.url, state, tmp_path / "keys/public.pem",
                              workload=workload(tmp_path / "w.npz"), rate_hz=100))
    logs = [state / "run1.log", state / "run2.log"]
    try:
        p = spawn_agent(cfg, logs[0])
        wait_for(lambda: srv.store.telemetry_count("dev-t") >= 3, 30, what="telemetry",
                 procs=[p])
        mosquitto.stop()  # the broker goes away while the agent keeps serving
        queued = state / "telemetry"
        # Batches cut while the broker is away wait on disk (the interval is 0.5 s).
        wait_for(lambda: len(list(queued.glob("*.json"))) >= 2, 20,
                 what="telemetry queued while the broker is away", procs=[p])
        mosquitto.start()
        n = srv.store.telemetry_count("dev-t")
        wait_for(lambda: srv.store.telemetry_count("dev-t") >= n + 3, 30,
                 what="telemetry after the broker came back", procs=[p])
        assert stop_agent(p) == 0
        p = spawn_agent(cfg, logs[1])  # the agent restarts with its queue and sequence
        n = srv.store.telemetry_count("dev-t")
        wait_for(lambda: srv.store.telemetry_count("dev-t") >= n + 3, 30,
                 what="telemetry after the agent restarted", procs=[p])
        assert stop_agent(p) == 0
        wait_for(lambda: not list((state / "telemetry").glob("*.json")), 10,
                 what="the queue to drain")
        served = sum(int(re.search(r"simulated app served (\d+) requests", lg.read_text())[1])
                     for lg in logs)

        def stored() -> int:
            return sum(u["requests"] for u in srv.store.usage("dev-t").values())

        # Acknowledged by the broker is not yet ingested: wait for the server to store all.
        wait_for(lambda: stored() >= served, 10, what="every served request stored")
    finally:
        srv.stop()
    seqs = srv.store.telemetry_seqs("dev-t")
    assert seqs == list(range(len(seqs))), "no batch lost, none stored twice"
    assert served > 200 and stored() == served


def test_cascade_escalates_only_when_the_small_variant_is_unsure(tmp_path, fleet):
    srv, agent = fleet
    small = mlp_spec(tmp_path / "s.onnx", "small", hidden=8, seed=1)
    large = mlp_spec(tmp_path / "l.onnx", "large", hidden=64, seed=2)
    for spec, f in ((small, "s.onnx"), (large, "l.onnx")):
        srv.publish_artifact(spec, (tmp_path / f).read_bytes())
    srv.deploy("dev-1", [small, large])
    wait_for(lambda: len(agent.pool.table) == 2, 20, what="both variants")
    def cascade(**kw):
        opts = agent.serving.options
        agent.serving.set_options(replace(opts, cascade=opts.cascade.model_copy(update=kw)))

    cascade(enabled=True, confidence=0.999999)
    sure_never = [agent.predict(_x(i)) for i in range(5)]
    assert {s.variant for s in sure_never} == {"large"}
    assert {s.reason.value for s in sure_never} == {"cascade"}
    cascade(confidence=0.01)
    sure_always = [agent.predict(_x(i)) for i in range(5)]
    assert {s.variant for s in sure_always} == {"small"}
    # the small variant's answer is the one returned, batch and all
    direct = agent.pool.table["small"].session.run(None, {"input": _x(3, 4)})[0]
    np.testing.assert_allclose(agent.predict(_x(3, 4)).logits, direct, rtol=1e-5)


def test_sessions_beyond_the_cap_are_unloaded_and_reloaded_off_the_request_path(
    tmp_path, mosquitto
):
    srv = make_server(tmp_path, mosquitto.url)
    try:
        with run_agent(tmp_path, mosquitto.url, device="dev-l", max_loaded_variants=1) as agent:
            a = mlp_spec(tmp_path / "a.onnx", "a", hidden=8, seed=1)
            b = mlp_spec(tmp_path / "b.onnx", "b", hidden=64, seed=2)
            for spec, f in ((a, "a.onnx"), (b, "b.onnx")):
                srv.publish_artifact(spec, (tmp_path / f).read_bytes())
            srv.deploy("dev-l", [a, b], pinned="a")
            wait_for(lambda: len(agent.pool.specs) == 2, 20, what="both installed")
            assert len(agent.pool.table) == 1, "only one session may stay loaded"
            for want, other in (("a", "b"), ("b", "a"), ("a", "b")):
                agent.serving.update(pinned=want)
                if want not in agent.pool.table:
                    # not loaded: served at once by what is loaded, marked as a fallback...
                    out = agent.predict(_x())
                    assert (out.variant, out.reason.value) == (other, "fallback")
                # ...while the loop creates the session off the request path.
                wait_for(lambda w=want: w in agent.pool.table, 10, what=f"{want} loaded")
                assert agent.predict(_x()).variant == want
                assert list(agent.pool.table) == [want]
            assert agent.pool.unloads >= 3
    finally:
        srv.stop()


def test_policy_set_by_the_server_per_device(tmp_path, fleet):
    srv, agent = fleet
    spec = mlp_spec(tmp_path / "v.onnx", "v", hidden=16)
    srv.publish_artifact(spec, (tmp_path / "v.onnx").read_bytes())

    def publish(version, policy):
        now = time.time()
        m = Manifest(target="dev-1", version=version, issued_at=now, expires_at=now + 600,
                     variants=[spec], policy=policy)
        srv.publish_raw(srv.topics.desired("dev-1"), srv.key.sign(m).encode(), retain=True)

    srv.deploy("dev-1", [spec], policy={"battery_low_percent": 55, "min_dwell_s": 0.5})
    wait_for(lambda: agent.policy.battery_low_percent == 55, 10, what="policy applied")
    with pytest.raises(DistributionError, match="invalid policy"):
        srv.deploy("dev-1", [spec], policy={"battery_critical_percent": 90})
    assert srv.store.next_manifest_version() == 2, "a refused deploy publishes nothing"
    assert agent.policy.min_dwell_s == 0.5
    before = agent.counters.rejected_manifests
    # A hostile or buggy publisher bypassing the server's check: the agent refuses it too.
    publish(2, {"battery_critical_percent": 90})  # above the low threshold: invalid
    wait_for(lambda: agent.counters.rejected_manifests > before, 10, what="rejection")
    publish(3, {"no_such_setting": 1})
    wait_for(lambda: agent.counters.rejected_manifests > before + 1, 10, what="rejection")
    assert agent.policy.battery_low_percent == 55, "an invalid policy changes nothing"
    assert agent.store.accepted_version() == 1


@pytest.mark.timeout(60)
def test_agent_process_serves_applications_on_its_socket(tmp_path, mosquitto):
    from prunefleet.agent.client import Client

    srv = make_server(tmp_path, mosquitto.url)
    spec = mlp_spec(tmp_path / "v.onnx", "v", hidden=16)
    srv.publish_artifact(spec, (tmp_path / "v.onnx").read_bytes())
    srv.deploy("dev-s", [spec])
    state = tmp_path / "dev-s"
    state.mkdir()
    sock = tmp_path / "run" / "agent.sock"
    cfg = state / "agent.toml"
    cfg.write_text(agent_toml("dev-s", mosquitto.url, state, tmp_path / "keys/public.pem",
                              extra=f'api_socket = "{sock}"'))
    p = spawn_agent(cfg, state / "agent.log")
    try:
        wait_for(sock.exists, 20, what="the socket", procs=[p])

        def answer():
            try:
                with Client(sock) as c:
                    return c.predict(_x(n=3))
            except Exception:
                return None

        out = wait_for(answer, 20, what="a prediction over the socket", procs=[p])
        assert out.variant == "v" and out.logits.shape == (3, 10)
        assert stop_agent(p) == 0
        assert not sock.exists(), "the socket file is removed on SIGTERM"
        wait_for(lambda: sum(u["requests"] for u in srv.store.usage("dev-s").values()) >= 1,
                 10, what="the request in telemetry")
    finally:
        stop_agent(p)
        srv.stop()


@pytest.mark.timeout(90)
def test_reload_pins_a_new_key_and_takes_the_state_it_signed(tmp_path, mosquitto):
    """`systemctl reload` after a key rotation: an agent that pinned only the old key
    refused the new key's desired state; with the new key added to trusted_keys and a
    SIGHUP it takes the retained state, without a restart."""
    from prunefleet.server.keys import load_keyring, retire_previous, rotate

    srv = make_server(tmp_path, mosquitto.url)
    old = tmp_path / "old-keys" / "public.pem"  # what the agent was installed with
    old.parent.mkdir()
    old.write_bytes((tmp_path / "keys" / "public.pem").read_bytes())
    rotate(tmp_path / "keys")
    retire_previous(tmp_path / "keys")
    srv.key = load_keyring(tmp_path / "keys")  # the new key alone signs from now on
    spec = mlp_spec(tmp_path / "v.onnx", "v", hidden=16)
    srv.publish_artifact(spec, (tmp_path / "v.onnx").read_bytes())
    srv.deploy("dev-k", [spec])
    state = tmp_path / "dev-k"
    state.mkdir()
    cfg = state / "agent.toml"
    sock = tmp_path / "run" / "agent.sock"
    text = agent_toml("dev-k", mosquitto.url, state, old, extra=f'api_socket = "{sock}"')
    cfg.write_text(text)
    log = state / "agent.log"
    p = spawn_agent(cfg, log)
    try:
        wait_for(sock.exists, 20, what="the socket", procs=[p])
        assert _predict(sock) is None, "nothing to serve before the manifest is taken"
        wait_for(lambda: "rejected manifest" in log.read_text(), 20,
                 what="the new key's manifest refused", procs=[p])
        pinned = f'trusted_keys = ["{old}"]'
        assert pinned in text
        cfg.write_text(text.replace(
            pinned, f'trusted_keys = ["{old}", "{tmp_path / "keys" / "public.pem"}"]'))
        p.send_signal(signal.SIGHUP)
        out = wait_for(lambda: _predict(sock), 30, what="a prediction after the reload",
                       procs=[p])
        assert out.variant == "v"
        assert "2 trusted key(s)" in log.read_text()
    finally:
        assert stop_agent(p) == 0
        srv.stop()


def _predict(sock):
    """A prediction over the agent's socket, or None while it cannot serve."""
    from prunefleet.agent.client import ApiNoVariantError, Client

    try:
        with Client(sock) as c:
            return c.predict(_x(n=1))
    except ApiNoVariantError:
        return None
