"""What the agent costs: latency added per request by the socket API, idle CPU, memory, torch.

    .venv/bin/python bench/agent_overhead.py [--quick] [--json PATH] [--variants DIR]

Real processes throughout: a mosquitto started here on a free port with
``deploy/mosquitto/test.conf`` (the embedded amqtt broker if mosquitto is missing), and
the agent CLI (``python -m prunefleet.agent.cli``) with the three digits variants
pre-installed in its state directory (as if delivered) and ``api_socket`` set.

1. **Idle agent**: default intervals and system sensors, the API listening, no requests.
   CPU as % of one core over ``--idle-s`` (from the kernel's per-thread run time, not
   tick-quantised) and RSS, next to a bare Python process that holds the same three ONNX
   Runtime sessions and nothing else. ``/proc/PID/maps`` says whether torch is loaded.
2. **Added latency**: a second agent (simulated sensors with a full battery, so the policy
   keeps serving the dense variant for a noisy digit) and a separate "application"
   process, as on a device, sending the same input in rounds that interleave three paths
   on the same model: ONNX Runtime called directly in the application (1 intra-op thread,
   batch 1), ``Client.predict`` to the agent, and ``Client.predict`` to a bare
   :class:`ApiServer` process in front of ONNX Runtime alone. Added per request =
   p50(agent) - p50(direct), the median over several application processes (where the
   scheduler places the two processes sways a round trip); the bare server splits it
   between the API itself and the agent's request path (complexity estimate, policy,
   telemetry, battery).

Targets (issue #5): <= 0.2 ms added per request; idle CPU < 1% of a core; no torch.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np

from prunefleet.agent.store import VariantStore
from prunefleet.server.keys import load_or_create
from prunefleet.shared.errors import ProtocolError
from prunefleet.shared.messages import ReportedState, decode
from prunefleet.shared.topics import Topics

# bench/ is the script's directory, so it is on sys.path: share switch.py's helpers.
from switch import DEFAULT_VARIANTS, digits_set, machine, pct  # isort: skip

REPO = Path(__file__).resolve().parent.parent

# The application: direct ONNX Runtime and the socket client, interleaved in rounds.
APP = textwrap.dedent("""
    import json, sys, time
    import numpy as np, onnxruntime as ort
    from prunefleet.agent.client import Client
    agent_sock, bare_sock, xfile = sys.argv[1:4]
    n, rounds = int(sys.argv[4]), int(sys.argv[5])
    files = dict(a.split("=", 1) for a in sys.argv[6:])
    x = np.load(xfile)
    agent, bare = Client(agent_sock), Client(bare_sock)
    variant = agent.predict(x).variant
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(files[variant], opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    want = sess.run(None, {name: x[None]})[0]
    for c in (agent, bare):
        assert np.allclose(c.predict(x).logits, want, rtol=1e-5, atol=1e-6)
    for _ in range(300):
        sess.run(None, {name: x[None]}); agent.predict(x); bare.predict(x)
    lat = {"direct": [], "agent": [], "bare": []}
    other = 0
    for _ in range(rounds):
        for _ in range(n):
            t0 = time.perf_counter(); sess.run(None, {name: x[None]})
            lat["direct"].append((time.perf_counter() - t0) * 1000)
        for _ in range(n):
            t0 = time.perf_counter(); p = agent.predict(x)
            lat["agent"].append((time.perf_counter() - t0) * 1000)
            other += p.variant != variant
        for _ in range(n):
            t0 = time.perf_counter(); bare.predict(x)
            lat["bare"].append((time.perf_counter() - t0) * 1000)
    print(json.dumps({"variant": variant, "other": other, **lat}))
""")

# A bare process holding the same sessions: the floor for the agent's memory.
BARE = textwrap.dedent("""
    import sys, time
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sessions = [ort.InferenceSession(p, opts, providers=["CPUExecutionProvider"])
                for p in sys.argv[1:]]
    print("ready", flush=True)
    time.sleep(3600)
""")


# -- processes ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Broker:
    """mosquitto with deploy/mosquitto/test.conf on a free port, else the embedded broker."""

    def __init__(self, work: Path) -> None:
        self.proc: subprocess.Popen | None = None
        self.embedded = None
        binary = shutil.which("mosquitto") or next(
            (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")
             if os.access(p, os.X_OK)), None)
        if binary:
            port = free_port()
            conf = work / "mosquitto.conf"
            template = (REPO / "deploy" / "mosquitto" / "test.conf").read_text()
            conf.write_text(re.sub(r"^listener[ \t]+\d+.*$", f"listener {port} 127.0.0.1",
                                   template, count=1, flags=re.MULTILINE))
            self.proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL)
            self.url, self.kind = f"mqtt://127.0.0.1:{port}", "mosquitto"
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    socket.create_connection(("127.0.0.1", port), 0.2).close()
                    return
                except OSError:
                    time.sleep(0.05)
            raise RuntimeError("mosquitto did not start")
        from prunefleet.server.broker import EmbeddedBroker

        self.embedded = EmbeddedBroker().start()
        self.url, self.kind = self.embedded.url, "embedded amqtt (mosquitto not found)"

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
        if self.embedded is not None:
            self.embedded.stop()


def wait_reported(url: str, device: str, variants: int, timeout_s: float,
                  proc: subprocess.Popen) -> ReportedState:
    """The agent's retained reported state, once it is online with ``variants`` installed."""
    import paho.mqtt.client as mqtt

    host, port = url.removeprefix("mqtt://").split(":")
    topic = Topics("prunefleet").reported(device)
    latest: list[ReportedState] = []
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-watch-{os.getpid()}")
    c.on_connect = lambda cl, *_: cl.subscribe(topic, 1)

    def on_message(_c, _u, m) -> None:
        try:
            latest.append(decode(ReportedState, m.payload))
        except ProtocolError as e:
            print(f"ignored a reported state that does not validate: {e}", file=sys.stderr)

    c.on_message = on_message
    c.connect(host, int(port))
    c.loop_start()
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"agent exited with {proc.returncode}")
            if latest and latest[-1].online and len(latest[-1].installed) == variants:
                return latest[-1]
            time.sleep(0.1)
        raise RuntimeError("agent did not report itself online with its variants")
    finally:
        c.loop_stop()
        c.disconnect()


class AgentProcess:
    """The agent CLI with the variants pre-installed (as if delivered) and the API on."""

    def __init__(self, vs, work: Path, device: str, broker: Broker, extra: str = "") -> None:
        self.dir = work / device
        state = self.dir / "state"
        store = VariantStore(state)
        for name, spec in vs.specs.items():
            shutil.copyfile(vs.paths[name], store.path_of(spec.sha256))
            store.record(spec)
        self.socket = self.dir / "api.sock"
        cfg = self.dir / "agent.toml"
        cfg.write_text(textwrap.dedent(f"""\
            device_id = "{device}"
            broker_url = "{broker.url}"
            state_dir = "{state}"
            trusted_keys = ["{work / 'keys' / 'public.pem'}"]
            api_socket = "{self.socket}"
            """) + extra)
        self.log = open(self.dir / "agent.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "prunefleet.agent.cli", "--config", str(cfg),
             "--log-level", "WARNING"], stdout=self.log, stderr=subprocess.STDOUT)
        self.pid = self.proc.pid
        try:
            self.reported = wait_reported(broker.url, device, len(vs.specs), 60, self.proc)
            deadline = time.monotonic() + 10
            while not self.socket.exists():
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{device}: no API socket at {self.socket}")
                time.sleep(0.05)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


# -- /proc -------------------------------------------------------------------------------


def cpu_ns(pid: int) -> int:
    """Time on CPU of every thread of ``pid``, in ns (schedstat: not tick-quantised)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue  # a thread that ended meanwhile
    return total


def cpu_percent(pid: int, seconds: float) -> float:
    c0, t0 = cpu_ns(pid), time.monotonic()
    time.sleep(seconds)
    return (cpu_ns(pid) - c0) / 1e9 / (time.monotonic() - t0) * 100.0


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def mapped(pid: int, pattern: str) -> list[str]:
    libs = set()
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and re.search(pattern, parts[5]):
            libs.add(parts[5])
    return sorted(libs)


def threads(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/task").iterdir()))


# -- 1. idle -----------------------------------------------------------------------------


def idle_agent(vs, work: Path, broker: Broker, seconds: float) -> dict:
    agent = AgentProcess(vs, work, "bench-idle", broker)
    bare = subprocess.Popen([sys.executable, "-c", BARE, *(str(p) for p in vs.paths.values())],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert bare.stdout is not None and bare.stdout.readline().strip() == "ready"
        time.sleep(2.0)  # let start-up settle (first reported state, first sensor reads)
        out = {
            "cpu": cpu_percent(agent.pid, seconds),
            "rss": rss_mb(agent.pid),
            "bare_cpu": cpu_percent(bare.pid, min(seconds, 5.0)),
            "bare_rss": rss_mb(bare.pid),
            "torch": mapped(agent.pid, r"libtorch|/torch/"),
            "ort": bool(mapped(agent.pid, r"onnxruntime")),
            "threads": threads(agent.pid),
            "installed": [v.name for v in agent.reported.installed],
        }
    finally:
        bare.terminate()
        bare.wait(10)
        agent.stop()
    print(f"\n1. idle agent over {seconds:g} s: real CLI, default intervals, system sensors, API "
          f"listening, {broker.kind}; installed {', '.join(out['installed'])}; "
          f"{out['threads']} threads")
    print(f"{'process':<46} {'CPU % of a core':>15} {'RSS MB':>8}")
    print(f"{'prunefleet-agent, no requests':<46} {out['cpu']:>15.3f} {out['rss']:>8.1f}")
    print(f"{'bare Python + the same 3 ORT sessions':<46} {out['bare_cpu']:>15.3f} "
          f"{out['bare_rss']:>8.1f}")
    print(f"agent RSS beyond the bare sessions: {out['rss'] - out['bare_rss']:.1f} MB; "
          f"torch mapped in the agent: {', '.join(out['torch']) or 'no'}; "
          f"onnxruntime mapped: {'yes' if out['ort'] else 'no'}")
    return out


# -- 2. added latency --------------------------------------------------------------------


class BareApi:
    """The socket API in front of ONNX Runtime alone (no policy, no telemetry): what the API
    itself costs, in its own process like the agent."""

    SCRIPT = textwrap.dedent("""
        import sys, threading
        from pathlib import Path
        import onnxruntime as ort
        from prunefleet.agent.api import ApiServer
        from prunefleet.agent.runtime import Served
        from prunefleet.shared.messages import Reason
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        sess = ort.InferenceSession(sys.argv[2], opts, providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        def predict(x, label):
            return Served("dense", Reason.INITIAL, sess.run(None, {name: x})[0], 0.0)
        with ApiServer(Path(sys.argv[1]), predict, dict, input_shape=lambda: [1, 1, 8, 8]):
            print("ready", flush=True)
            sys.stdin.read()
    """)

    def __init__(self, socket_path: Path, model: Path) -> None:
        self.socket = socket_path
        self.proc = subprocess.Popen([sys.executable, "-c", self.SCRIPT, str(socket_path),
                                      str(model)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError("bare API process did not start")

    def stop(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(10)


def added_latency(vs, work: Path, broker: Broker, n: int, rounds: int, trials: int) -> dict:
    """``trials`` application processes, one after another, each ``rounds`` x ``n`` per path.

    Where the scheduler places the two processes (one vCPU or two) decides much of a
    round trip's cost and holds for a process's life, so each trial is a fresh process and
    the figure is the median of the trials' p50s.
    """
    agent = AgentProcess(vs, work, "bench-serve", broker, textwrap.dedent("""\
        [sensors]
        kind = "simulated"
        battery_capacity_j = 1e12
        """))
    bare = BareApi(work / "bare.sock", vs.paths["dense"])
    x = vs.x[0]  # a noisy digit, (1, 8, 8): the full battery and its complexity get dense
    np.save(work / "x.npy", x)
    results = []
    try:
        rss_before = rss_mb(agent.pid)
        for _ in range(trials):
            p = subprocess.run(
                [sys.executable, "-c", APP, str(agent.socket), str(bare.socket),
                 str(work / "x.npy"), str(n), str(rounds),
                 *(f"{k}={v}" for k, v in vs.paths.items())],
                capture_output=True, text=True, timeout=600,
            )
            if p.returncode != 0:
                raise RuntimeError(f"application process failed:\n{p.stderr[-3000:]}")
            results.append(json.loads(p.stdout))
        rss_after = rss_mb(agent.pid)
    finally:
        bare.stop()
        agent.stop()

    paths = [("direct", "ONNX Runtime called directly in the application"),
             ("bare", "socket API -> ONNX Runtime alone (API's own cost)"),
             ("agent", "socket API -> the agent (policy, telemetry, ...)")]
    served = sum(len(r["agent"]) + 302 for r in results)
    print(f"\n2. latency per request, {results[0]['variant']} digits variant, batch 1: "
          f"{trials} application processes x {rounds} rounds x {n} requests per path, "
          f"interleaved")
    print(f"{'path (p50 ms per trial; all requests)':<52} {'trials':>22} {'p50 ms':>7} "
          f"{'p90 ms':>7} {'p99 ms':>7}")
    for key, label in paths:
        per = " ".join(f"{pct(r[key], 50):.3f}" for r in results)
        every = [v for r in results for v in r[key]]
        print(f"{label:<52} {per:>22} {pct(every, 50):>7.4f} {pct(every, 90):>7.4f} "
              f"{pct(every, 99):>7.4f}")
    added = [pct(r["agent"], 50) - pct(r["direct"], 50) for r in results]
    api = [pct(r["bare"], 50) - pct(r["direct"], 50) for r in results]
    a, b = float(np.median(added)), float(np.median(api))
    print(f"added per request (median of the trials' p50s): {a:.4f} ms "
          f"(trials {min(added):.3f}-{max(added):.3f}) = socket API (framing, two "
          f"processes, client) {b:.4f} ms (trials {min(api):.3f}-{max(api):.3f}) + the "
          f"agent's request path {a - b:.4f} ms; requests served by another variant: "
          f"{sum(r['other'] for r in results)}")
    print(f"agent RSS: {rss_before:.1f} MB before, {rss_after:.1f} MB after {served} requests")
    return {"added": a, "api": b}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a reduced run (well under 2 min)")
    p.add_argument("--json", type=Path, help="write the figures to this file")
    p.add_argument("--variants", type=Path, default=DEFAULT_VARIANTS,
                   help=f"where the digits variants are prepared (default {DEFAULT_VARIANTS})")
    p.add_argument("--idle-s", type=float, help="idle measurement (default 15 s, quick 6 s)")
    args = p.parse_args(argv)
    n, rounds, trials, idle_s = (500, 3, 2, 6.0) if args.quick else (1000, 4, 5, 15.0)
    idle_s = args.idle_s or idle_s

    print(f"machine: {machine()}")
    vs = digits_set(args.variants)
    with tempfile.TemporaryDirectory(prefix="pf-bench-") as tmp:
        work = Path(tmp)
        load_or_create(work / "keys")
        broker = Broker(work)
        try:
            idle = idle_agent(vs, work, broker, idle_s)
            lat = added_latency(vs, work, broker, n, rounds, trials)
        finally:
            broker.stop()
    out = {
        "added_ms_per_request": round(lat["added"], 4),
        "idle_cpu_percent": round(idle["cpu"], 3),
        "rss_mb": round(idle["rss"], 1),
        "torch_loaded": bool(idle["torch"]),
    }
    ok = (out["added_ms_per_request"] <= 0.2, out["idle_cpu_percent"] < 1.0,
          not out["torch_loaded"])
    print(f"\ntargets: <= 0.2 ms added per request {'met' if ok[0] else 'MISSED'} "
          f"({out['added_ms_per_request']:.4f} ms); idle CPU < 1% of a core "
          f"{'met' if ok[1] else 'MISSED'} ({out['idle_cpu_percent']:.3f}%); no torch in the "
          f"agent {'met' if ok[2] else 'MISSED'}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
