"""``prunefleet demo``: the whole loop once, on embedded defaults.

Prepares the digits variants (cached), starts an in-process MQTT broker unless
``--broker`` names one, starts the fleet server, publishes the variants and a signed
desired state for the ``demo`` group, spawns N agent processes (each with a simulated
battery, its own CPU load and a simulated application sending clean and noisy digits),
runs until every agent has switched for its battery and for its input complexity, then
stops them gracefully and prints what the store holds.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from prunefleet.shared.messages import Reason

from .fleet import FleetServer
from .keys import load_or_create
from .registry import register_file, registration_from_report
from .store import Store, sqlite_url

BATTERY_REASONS = {Reason.BATTERY_LOW.value, Reason.BATTERY_CRITICAL.value,
                   Reason.BATTERY_RECOVERED.value, Reason.CHARGING.value}
COMPLEXITY_REASONS = {Reason.COMPLEXITY_HIGH.value, Reason.COMPLEXITY_LOW.value}


@dataclass(frozen=True)
class DemoDevice:
    device_id: str
    battery_percent: float
    cpu_percent: float
    rate_hz: float


def demo_devices(n: int) -> list[DemoDevice]:
    """Devices that differ in charge and load, so they diverge."""
    base = [
        DemoDevice("demo-1", 42.0, 15.0, 60.0),
        DemoDevice("demo-2", 38.0, 45.0, 50.0),
        DemoDevice("demo-3", 35.0, 70.0, 40.0),
    ]
    out = base[:n]
    for i in range(len(out), n):
        out.append(DemoDevice(f"demo-{i + 1}", 34.0 + 4 * (i % 3), 10.0 + 15 * (i % 5),
                              40.0 + 5 * (i % 4)))
    return out


DEMO_ACTIVE_POWER_W = 10.0  # watts one busy core adds: the x86_64 default


def _agent_toml(
    dev: DemoDevice, broker_url: str, state_dir: Path, key: Path, workload: Path,
    capacity_j: float,
) -> str:
    return f"""\
device_id = "{dev.device_id}"
group = "demo"
broker_url = "{broker_url}"
state_dir = "{state_dir}"
trusted_keys = ["{key}"]
telemetry_interval_s = 2.0
sensor_interval_s = 0.25
download_window_chunks = 8

[policy]
min_dwell_s = 1.5

# The demo shows the policy's switches; with the cascade (on by default) the cheapest
# variant answers each input first and a hard one escalates per input, so the active
# variant would not switch for input complexity.
[cascade]
enabled = false

[energy]
meter = "estimate"
active_power_w = {DEMO_ACTIVE_POWER_W}

[sensors]
kind = "simulated"
battery_capacity_j = {capacity_j}
battery_initial_percent = {dev.battery_percent}
cpu_percent = {dev.cpu_percent}

[workload]
data = "{workload}"
rate_hz = {dev.rate_hz}
seed = {abs(hash(dev.device_id)) % 1000}
phases = [{{ duration_s = 5.0 }}, {{ duration_s = 5.0, noise_sigma = 0.6 }}]
"""


def run_demo(
    work_dir: Path,
    *,
    broker_url: str | None = None,
    agents: int = 3,
    timeout_s: float = 90.0,
    out=print,
    summary: dict | None = None,
) -> int:
    """Run the demo; 0 when every agent switched for battery and for input complexity.
    ``summary``, when given, is filled with what the report prints (``--json``)."""
    from .prepare import prepare_digits

    t0 = time.monotonic()
    work_dir = Path(work_dir).resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    out(f"prunefleet demo: {agents} agents, working directory {work_dir}")

    out("\n== preparing variants (cached after the first run)")
    prepared = prepare_digits(work_dir / "variants", progress=sys.stderr.isatty())
    # The digits recipe always has data: a workload file and an accuracy for every variant.
    workload_path = prepared.workload_path
    assert workload_path is not None
    out(f"{'variant':<10} {'technique':<11} {'params':>8} {'MACs':>9} {'ONNX B':>8} "
        f"{'acc %':>6} {'p50 ms':>7} {'speedup':>7}")
    for v in prepared.variants:
        assert v.accuracy is not None
        out(f"{v.name:<10} {v.technique:<11} {v.params:>8} {v.macs:>9} {v.onnx_bytes:>8} "
            f"{100 * v.accuracy:>6.2f} {v.latency_ms_p50:>7.3f} {v.speedup:>6.2f}x")

    broker = None
    if broker_url is None:
        from .broker import EmbeddedBroker

        broker = EmbeddedBroker().start()
        broker_url = broker.url
        out(f"\n== embedded MQTT broker (amqtt, MQTT 3.1.1) at {broker_url}")
    else:
        out(f"\n== external MQTT broker at {broker_url}")

    db = work_dir / "fleet.db"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    store = Store(sqlite_url(db))
    key = load_or_create(work_dir / "keys")
    server = FleetServer(broker_url, store, key, client_id=f"pf-demo-server-{os.getpid()}",
                         persistent_session=False)
    procs: list[tuple[DemoDevice, subprocess.Popen, Path]] = []
    try:
        server.start()
        # The registration path of `prunefleet variants register report.json`, without HTTP.
        before = server.bytes_published
        specs = [
            register_file(store, server, v.path, registration_from_report(
                v.to_report(), sha256=v.sha256, chunk_bytes=16 * 1024))
            for v in prepared.variants
        ]
        sent = server.bytes_published - before
        manifest = server.deploy("demo", specs, group=True)
        out(f"published {len(specs)} variants ({sent} bytes, once, retained; the broker fans "
            f"them out) and signed desired state v{manifest.version} for group 'demo'")

        # A battery sized so the most expensive variant drains ~1/3 of it in ~20 s. The
        # agents estimate energy as CPU time x active power (the demo names both, so it
        # behaves alike on machines with and without a power meter); CPU time per request
        # is about 4x the bare inference latency the report measured (the request path).
        dense_s = max((v.latency_ms or 0.1) for v in specs) / 1000.0
        capacity_j = max(0.5, 20 * 55 * dense_s * 4 * DEMO_ACTIVE_POWER_W * 3)

        out(f"\n== starting {agents} agent processes")
        agents_dir = work_dir / "agents"
        shutil.rmtree(agents_dir, ignore_errors=True)
        agents_dir.mkdir()
        for dev in demo_devices(agents):
            state = agents_dir / dev.device_id
            state.mkdir()
            cfg = state / "agent.toml"
            cfg.write_text(_agent_toml(dev, broker_url, state, work_dir / "keys" / "public.pem",
                                       workload_path, capacity_j))
            with open(state / "agent.log", "wb") as log:
                p = subprocess.Popen(
                    [sys.executable, "-m", "prunefleet.agent.cli", "--config", str(cfg)],
                    stdout=log, stderr=subprocess.STDOUT,
                    env={**os.environ, "PYTHONUNBUFFERED": "1"},
                )
            procs.append((dev, p, state))
            out(f"  {dev.device_id}: battery {dev.battery_percent:.0f}%, CPU load "
                f"{dev.cpu_percent:.0f}%, {dev.rate_hz:.0f} requests/s  (pid {p.pid})")

        out("\n== running until every agent has switched for battery and for input complexity")
        deadline = time.monotonic() + timeout_s
        done = False
        while time.monotonic() < deadline:
            time.sleep(1.0)
            dead = [d.device_id for d, p, _ in procs if p.poll() is not None]
            if dead:
                out(f"agent process(es) exited early: {', '.join(dead)}")
                break
            if all(_has_both(store, d.device_id) for d, _, _ in procs):
                done = True
                break
        out(f"  {'all agents switched' if done else 'time limit reached'} after "
            f"{time.monotonic() - t0:.0f} s; stopping agents (SIGTERM)")
    finally:
        for _, p, _ in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for _, p, _ in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
        _settle(store)
        server.stop()
        if broker is not None:
            broker.stop()

    agents_summary: list[dict] = []
    ok = _report(store, procs, out, agents_summary)
    out(f"\ntelemetry: {store.telemetry_count()} batches from "
        f"{len(store.devices())} devices stored in {db} (SQLite)")
    out(f"demo finished in {time.monotonic() - t0:.0f} s")
    if summary is not None:
        summary.update({"ok": bool(ok and done), "seconds": round(time.monotonic() - t0, 1),
                        "store": str(db), "telemetry_batches": store.telemetry_count(),
                        "agents": agents_summary})
    store.close()
    return 0 if ok and done else 1


def _has_both(store: Store, device_id: str) -> bool:
    reasons = {s.reason for s in store.switches(device_id)}
    return bool(reasons & BATTERY_REASONS) and bool(reasons & COMPLEXITY_REASONS)


def _settle(store: Store, quiet_s: float = 1.5, max_s: float = 10.0) -> None:
    """Wait until the last telemetry batches have been ingested."""
    end = time.monotonic() + max_s
    last, since = -1, time.monotonic()
    while time.monotonic() < end:
        n = store.telemetry_count()
        if n != last:
            last, since = n, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return
        time.sleep(0.25)


def _report(store: Store, procs, out, summary: list[dict]) -> bool:
    ok = True
    devices = {d.device_id: d for d in store.devices()}
    for dev, p, state in procs:
        row = devices.get(dev.device_id)
        out(f"\n== {dev.device_id} (exit code {p.returncode}, log {state / 'agent.log'})")
        if row is None:
            out("  no telemetry stored")
            ok = False
            continue
        installed = ", ".join(v["name"] for v in row.installed) or "(none)"
        out(f"  installed: {installed}")
        switches = store.switches(dev.device_id)
        t_first = switches[0].ts if switches else 0.0
        out(f"  switches ({len(switches)}):")
        for s in switches:
            out(f"    +{s.ts - t_first:6.1f}s  {s.from_variant or '-':<9} → {s.to_variant:<9} "
                f"{s.reason}")
        usage = store.usage(dev.device_id)
        total = sum(u["requests"] for u in usage.values())
        out(f"  served {total} requests:")
        for name, u in sorted(usage.items()):
            acc = f"{100 * u['correct'] / u['labeled']:.1f}%" if u["labeled"] else "n/a"
            out(f"    {name:<9} {u['requests']:>6} requests, accuracy {acc}")
        rows = store.telemetry_seqs(dev.device_id)
        trace = store.battery_trace(dev.device_id)
        battery = f", battery {trace[0]:.0f}% → {trace[-1]:.0f}%" if trace else ""
        out(f"  telemetry batches stored: {len(rows)}{battery}")
        reasons = {s.reason for s in switches}
        has_b = bool(reasons & BATTERY_REASONS)
        has_c = bool(reasons & COMPLEXITY_REASONS)
        out(f"  battery-driven switch: {'yes' if has_b else 'NO'}; "
            f"input-complexity-driven switch: {'yes' if has_c else 'NO'}")
        ok = ok and has_b and has_c and bool(rows)
        summary.append({
            "device_id": dev.device_id, "exit_code": p.returncode, "installed":
            [v["name"] for v in row.installed],
            "switches": [{"ts": s.ts, "from": s.from_variant, "to": s.to_variant,
                          "reason": s.reason} for s in switches],
            "requests": {name: {"requests": u["requests"], "labeled": u["labeled"],
                                "correct": u["correct"]} for name, u in sorted(usage.items())},
            "telemetry_batches": len(rows),
            "battery_percent": [trace[0], trace[-1]] if trace else None,
            "battery_switch": has_b, "complexity_switch": has_c})
    return ok
