"""The fleet simulator against real mosquitto and a real server (``FleetService``).

Simulated devices register, send telemetry the server ingests (contiguous seqs, also
across an offline period), a staged rollout reaches them and completes; with a high
fail share the rollout halts at the canary. The CLI refuses bad options in one line and
stops cleanly on SIGTERM.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
from fleet_helpers import wait_for
from rollout_helpers import Fleet

from prunefleet.server.cli import main
from prunefleet.server.simulator import SimOptions, Simulator, device_ids, failing_devices


@pytest.fixture
def fleet(tmp_path, mosquitto):
    f = Fleet(tmp_path, mosquitto.url)
    f.start_server()
    yield f
    f.close()


def _opts(fleet: Fleet, n: int, **kw) -> SimOptions:
    return SimOptions(broker_url=fleet.broker_url, devices=n, prefix=fleet.prefix,
                      keys=fleet.state_dir / "keys", state_dir=fleet.tmp / "sim", **kw)


@pytest.fixture
def simulate(fleet):
    sims: list[Simulator] = []

    def start(n: int, **kw) -> Simulator:
        sim = Simulator(_opts(fleet, n, **kw)).start()
        sims.append(sim)
        return sim

    yield start
    for s in sims:
        s.stop()


@pytest.mark.timeout(60)
def test_thirty_devices_register_report_telemetry_and_take_a_staged_rollout(fleet, simulate):
    sim = simulate(30, telemetry_interval_s=0.5, offline_share=0.1, offline_cycle_s=4.0,
                   seed=7)
    ids = device_ids(sim.opts)
    wait_for(lambda: sum(d["online"] for d in fleet.api.devices()) >= 27, 20,
             what="the simulated devices online at the server")
    fleet.register_mlp("small", hidden=16, accuracy=0.9)
    fleet.register_mlp("large", hidden=48, accuracy=0.95)
    r = fleet.api.create_rollout({"target": {"kind": "fleet"},
                                  "variants": ["small", "large"],
                                  "config": {"canary_percent": 10, "success_phase": "active"}})
    assert sum(1 for d in r["devices"] if d["stage"]) == 3, "only the canary at first"
    done = fleet.wait_rollout(r["id"], "completed", timeout_s=30)
    assert done["counts"]["succeeded"] == 30 and done["counts"]["failed"] == 0
    assert any(n.startswith("promoted") for n in (h["note"] for h in done["history"]))
    assert {d["device_id"] for d in fleet.api.devices()} == set(ids)
    devs = {d.id: d for d in sim.devices}
    assert all(set(d.agent.pool.specs) == {"small", "large"} for d in sim.devices)
    # The offline share really dropped off (Last Will) and came back.
    wait_for(lambda: sum(d.offline_periods > 0 for d in sim.devices) == 3, 10,
             what="the offline share to go offline")

    s = sim.stop()
    assert s.phases["active"] == 30 and s.batches_sent > 0
    wait_for(lambda: not any(d["online"] for d in fleet.api.devices()), 10,
             what="goodbye (or the Last Will) marking every device offline")
    store = fleet.svc.store
    for dev in ids:
        seqs = store.telemetry_seqs(dev)
        assert len(seqs) >= 2, dev
        assert seqs == list(range(len(seqs))), f"{dev}: gaps in {seqs}"
        # Every batch cut reached the store or is still held by its device (one offline
        # at the end, or stored but its confirmation not yet back): none is lost.
        q = devs[dev].agent.tqueue
        assert set(range(q.issued)) <= set(seqs) | set(q.pending()), dev
        assert len(seqs) <= q.issued, dev
    summary = fleet.api.telemetry_summary()
    assert summary["devices"] == 30
    assert set(summary["variants"]) >= {"large"}
    assert summary["variants"]["large"]["requests"] > 0


@pytest.mark.timeout(60)
def test_a_group_configured_on_the_devices_is_a_rollout_target_once_approved(fleet,
                                                                            simulate):
    sim = simulate(6, group="field", download=False, telemetry_interval_s=0.5)
    ids = device_ids(sim.opts)
    fleet.wait_known(ids)
    wait_for(lambda: {d["device_id"] for d in fleet.api.devices()
                      if d["requested_group"] == "field"} == set(ids), 10,
             what="the devices' own group asked of the server")
    assert fleet.api.devices(group="field") == [], "a request, not membership"
    assert main(["devices", "approve", "--all", "--server", fleet.svc.url,
                 f"--token={fleet.svc.token}"]) == 0
    assert {d["device_id"] for d in fleet.api.devices(group="field")} == set(ids)
    fleet.register_mlp("v1", hidden=16)
    r = fleet.api.create_rollout({"target": {"kind": "group", "group": "field"},
                                  "variants": ["v1"]})
    done = fleet.wait_rollout(r["id"], "completed", timeout_s=20)
    assert {d["device_id"] for d in done["devices"]} == set(ids)


def test_a_high_fail_share_halts_the_rollout_at_the_canary(fleet, simulate):
    opts = _opts(fleet, 10, fail_share=0.5, seed=3, download=False)
    canary = set(device_ids(opts)[:3])  # 30%: online first, then by id
    assert canary & failing_devices(opts), "the seed puts a failing device in the canary"
    sim = simulate(10, fail_share=0.5, seed=3, download=False, telemetry_interval_s=0.5)
    fleet.wait_known(device_ids(sim.opts))
    fleet.register_mlp("v1", hidden=16)
    r = fleet.api.create_rollout({"target": {"kind": "fleet"}, "variants": ["v1"],
                                  "config": {"canary_percent": 30,
                                             "failure_threshold": 0.1}})
    halted = fleet.wait_rollout(r["id"], "halted", timeout_s=20)
    assert {d["device_id"] for d in halted["devices"] if d["stage"]} == canary
    failed = {d["device_id"] for d in halted["devices"] if d["phase"] == "failed"}
    assert failed and failed <= failing_devices(opts)
    reason = {d["device_id"]: d["reason"] for d in halted["devices"]}
    assert all("simulated failure" in reason[d] for d in failed)


@pytest.mark.parametrize("extra, message", [
    (["--devices", "0"], "--devices must be at least 1"),
    (["--fail-share", "1.5"], "--fail-share must be between 0 and 1"),
    (["--telemetry-interval", "0"], "--telemetry-interval must be above 0"),
    (["--in-flight", "0"], "--in-flight must be between 1 and 100"),
    (["--broker", "http://x"], "bad broker URL"),
    (["--keys", "/nonexistent/keys"], "no public key at /nonexistent/keys/public.pem"),
    (["--prefix", "bad/+/prefix"], "invalid fleet prefix"),
])
def test_cli_refuses_bad_options_in_one_line(tmp_path, capsys, extra, message):
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "public.pem").write_text("unused")
    argv = ["simulate", "--broker", "mqtt://127.0.0.1:1", "--devices", "5",
            "--keys", str(tmp_path / "keys"), *extra]
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc != 0
    assert len(err.splitlines()) == 1, err
    assert err.startswith("prunefleet: ") and message in err, err


@pytest.mark.timeout(60)
def test_cli_runs_and_stops_cleanly_on_sigterm(fleet):
    cmd = [sys.executable, "-m", "prunefleet.server.cli", "simulate",
           "--broker", fleet.broker_url, "--devices", "5", "--prefix", fleet.prefix,
           "--keys", str(fleet.state_dir / "keys"), "--telemetry-interval", "0.3",
           "--status-interval", "0.5", "--no-download"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        ids = device_ids(SimOptions(broker_url="mqtt://x", devices=5))
        fleet.wait_known(ids)
        wait_for(lambda: all(fleet.svc.store.telemetry_seqs(d) for d in ids), 10,
                 what="telemetry from every simulated device")
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=20)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 0, err
    lines = out.splitlines()
    assert "simulating 5 devices" in lines[0]
    assert lines[1].split()[:3] == ["TIME", "DEVICES", "ONLINE"]
    end = next(line for line in lines if line.split()[0] == "end")
    assert end.split()[1:3] == ["5", "5"]
    assert "telemetry batches confirmed stored" in lines[-1]
    wait_for(lambda: not any(d["online"] for d in fleet.api.devices()), 10,
             what="the simulated devices offline after SIGTERM")


def test_cli_refuses_more_devices_than_the_open_files_hard_limit_allows(tmp_path):
    """Each device holds one open file (its connection): the simulator raises its own
    limit, and when the hard limit is too low it says so in one line instead of failing
    device by device."""
    import resource

    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "public.pem").write_text("unused")

    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 512))

    r = subprocess.run(
        [sys.executable, "-m", "prunefleet.server.cli", "simulate", "--broker",
         "mqtt://127.0.0.1:1", "--devices", "1000", "--keys", str(tmp_path / "keys")],
        capture_output=True, text=True, timeout=60, preexec_fn=low_limit)
    assert r.returncode != 0
    err = r.stderr.strip()
    assert len(err.splitlines()) == 1, err
    assert "--devices 1000 needs 1256 open files" in err and "512" in err, err
