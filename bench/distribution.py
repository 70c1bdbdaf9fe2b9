"""Distribution benchmark: one ~10 MB ONNX artifact to 1, 10 and 50 agents over mosquitto.

    python bench/distribution.py [--quick] [--json PATH] [--procs P] [--state-root DIR]

Each run starts from nothing on a fresh topic prefix of one local mosquitto (started here
with ``deploy/mosquitto/test.conf`` on a free loopback port). The real ``FleetServer``
publishes the artifact once as retained chunks (64 KiB, zlib) and one signed desired state
for the group; every agent then fetches it through the real ``Downloader`` over its own
``MqttTransport`` connection (a window of 8 chunk subscriptions, as the agent's default),
checks every chunk against the signed manifest's hashes, writes and fsyncs it, and checks
the whole file's size and SHA-256 before ``os.replace``.

What it measures, per fleet size N:

* ``seconds``: from the server starting to publish the artifact until the last agent has a
  verified file (it includes the server's publish; each agent was connected beforehand);
* ``server_bytes``: payload bytes the server published (chunk frames + the signed manifest).

It is a "download-only" harness: the agents verify the signed manifest and the artifact but
do not create an ONNX Runtime session (50 of those on 2 cores would measure ONNX Runtime,
not distribution). Agents run as threads in ``--procs`` worker processes (default: one per
core) whose start-up is not timed; their state directories are on tmpfs (``/dev/shm``) by
default, since 50 simulated devices sharing one VM disk would measure that disk's fsync.

Targets (issue #4): server bytes <= 1.2x the artifact whatever N; 50 agents within 3x the
time of one.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import queue
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
CONF = REPO / "deploy" / "mosquitto" / "test.conf"
GROUP = "bench"
CHUNK_BYTES = 64 * 1024
WINDOW = 8


# -- broker ---------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_mosquitto(work: Path, *, connection_messages: bool = True,
                    max_queued_messages: int | None = None) -> tuple[subprocess.Popen, str]:
    """The test config's mosquitto on a free loopback port (``connection_messages=False``
    keeps its log small when thousands of devices connect; ``max_queued_messages`` in
    place of the config's). Shared by the bench scripts."""
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not os.access(binary, os.X_OK):
        sys.exit("mosquitto is not installed (Debian: apt-get install -y mosquitto)")
    port = _free_port()
    conf = work / "mosquitto.conf"
    text = re.sub(r"^listener\s+\d+.*$", f"listener {port} 127.0.0.1", CONF.read_text(),
                  count=1, flags=re.MULTILINE)
    if not connection_messages:
        text = text.replace("connection_messages true", "connection_messages false")
    if max_queued_messages is not None:
        text = re.sub(r"^max_queued_messages\s+\d+", f"max_queued_messages {max_queued_messages}",
                      text, count=1, flags=re.MULTILINE)
    conf.write_text(text)
    log = open(work / "mosquitto.log", "wb")  # noqa: SIM115 - lives as long as the broker
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, f"mqtt://127.0.0.1:{port}"
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.05)
    proc.kill()
    sys.exit(f"mosquitto did not start; see {work / 'mosquitto.log'}")


# -- artifact -------------------------------------------------------------------------------
def make_artifact(path: Path, target_bytes: int = 10_000_000) -> Path:
    """A real ONNX MLP of about ``target_bytes`` of float32 weights (compresses like one)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    hidden2 = 576
    hidden1 = max(64, (target_bytes // 4 - hidden2 * 10) // (64 + hidden2))
    shapes = {"w1": (64, hidden1), "b1": (hidden1,), "w2": (hidden1, hidden2),
              "b2": (hidden2,), "w3": (hidden2, 10), "b3": (10,)}
    inits = [numpy_helper.from_array(rng.normal(0, 0.05, s).astype(np.float32), n)
             for n, s in shapes.items()]
    g = helper.make_graph(
        [helper.make_node("Flatten", ["input"], ["x"], axis=1),
         helper.make_node("Gemm", ["x", "w1", "b1"], ["h1"]),
         helper.make_node("Relu", ["h1"], ["r1"]),
         helper.make_node("Gemm", ["r1", "w2", "b2"], ["h2"]),
         helper.make_node("Relu", ["h2"], ["r2"]),
         helper.make_node("Gemm", ["r2", "w3", "b3"], ["logits"])],
        "bench", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits,
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path))
    return path


# -- agents (worker processes) ----------------------------------------------------------------
def _agent_thread(device_id: str, broker_url: str, prefix: str, pub_pem: bytes,
                  state_dir: Path, out: mp.Queue, stop: threading.Event,
                  ready: threading.Barrier) -> None:
    from prunefleet.agent.downloader import Completed, Downloader, Failed
    from prunefleet.agent.store import VariantStore
    from prunefleet.shared.errors import PrunefleetError
    from prunefleet.shared.messages import SignedManifest, decode
    from prunefleet.shared.signing import TrustedKeys, load_public_pem
    from prunefleet.shared.topics import Topics
    from prunefleet.shared.transport import BrokerAddress, MqttTransport, TransportOptions

    topics = Topics(prefix)
    desired = topics.group_desired(GROUP)
    trusted = TrustedKeys([load_public_pem(pub_pem)])
    transport = MqttTransport(BrokerAddress.parse(broker_url), TransportOptions(
        client_id=f"pf-bench-{prefix}-{device_id}", subscriptions={desired: 1},
        inbound_queue_size=10000))
    store = VariantStore(state_dir)
    dl = Downloader(store, topics, lambda t: transport.subscribe(t, 1), transport.unsubscribe,
                    window=WINDOW)
    transport.start()
    ok = transport.wait_connected(30)
    ready.wait()
    if not ok:
        out.put(("failed", device_id, time.time(), "not connected"))
        return
    wanted = 0
    done = 0
    next_tick = time.monotonic() + 1
    try:
        while not stop.is_set():
            try:
                item = transport.inbound.get(timeout=0.1)
            except queue.Empty:
                item = None
            now = time.monotonic()
            if item is not None and item.kind == "message":
                if item.topic == desired:
                    try:
                        m = trusted.verify(decode(SignedManifest, item.payload))
                    except PrunefleetError as e:
                        out.put(("failed", device_id, time.time(), str(e)))
                        return
                    for spec in m.variants:
                        wanted += 1
                        dl.want(spec, now)
                else:
                    for r in dl.handle(item.topic, item.payload, now):
                        if isinstance(r, Completed):
                            done += 1
                        elif isinstance(r, Failed):
                            out.put(("failed", device_id, time.time(), r.reason))
                            return
                    if wanted and done == wanted:
                        out.put(("verified", device_id, time.time(), ""))
                        return
            if now >= next_tick:
                dl.tick(now)
                next_tick = now + 1
    finally:
        transport.stop()


def worker(device_ids: list[str], broker_url: str, prefix: str, pub_pem: bytes,
           state_root: str, out: mp.Queue, go: Any) -> None:
    stop = threading.Event()
    ready = threading.Barrier(len(device_ids) + 1)
    threads = [threading.Thread(
        target=_agent_thread, daemon=True,
        args=(d, broker_url, prefix, pub_pem, Path(state_root) / d, out, stop, ready))
        for d in device_ids]
    for t in threads:
        t.start()
    ready.wait()
    out.put(("ready", len(device_ids), time.time(), ""))
    cpu0 = _cpu_s()
    go.wait(600)
    for t in threads:
        t.join(300)
    stop.set()
    out.put(("cpu", len(device_ids), _cpu_s() - cpu0, ""))


def _cpu_s(pid: int | None = None) -> float:
    import psutil

    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


# -- one run ----------------------------------------------------------------------------------
def run_once(n: int, procs: int, broker_url: str, broker_pid: int, artifact: Path,
             work: Path, state_root: Path, compression: str = "zlib") -> dict[str, Any]:
    from prunefleet.server.fleet import FleetServer, spec_from_file
    from prunefleet.server.keys import load_or_create
    from prunefleet.server.store import Store, sqlite_url

    prefix = f"bench{uuid.uuid4().hex[:8]}"
    key = load_or_create(work / "keys")
    store = Store(sqlite_url(work / f"{prefix}.db"))
    server = FleetServer(broker_url, store, key, prefix=prefix, client_id=f"pf-{prefix}")
    server.start()
    data = artifact.read_bytes()
    spec = spec_from_file(artifact, name="big", input_shape=[1, 1, 8, 8], num_classes=10,
                          params=len(data) // 4, macs=len(data) // 4, chunk_bytes=CHUNK_BYTES,
                          compression=compression)
    ctx = mp.get_context("spawn")
    out: mp.Queue = ctx.Queue()
    go = ctx.Event()
    ids = [f"agent-{i:03d}" for i in range(n)]
    run_root = Path(tempfile.mkdtemp(prefix=f"{prefix}-", dir=state_root))
    workers = [ctx.Process(target=worker, args=(ids[i::procs], broker_url, prefix,
                                                key.public_pem(), str(run_root), out, go))
               for i in range(min(procs, n))]
    try:
        for w in workers:
            w.start()
        ready = 0
        while ready < n:
            kind, count, _, _ = out.get(timeout=120)
            if kind == "ready":
                ready += count
            elif kind == "failed":
                raise RuntimeError(f"an agent failed before the start: {count}")
        go.set()
        cpu_server0, cpu_broker0 = _cpu_s(), _cpu_s(broker_pid)
        t0 = time.time()
        server.publish_artifact(spec, data)
        published_s = time.time() - t0
        server.deploy(GROUP, [spec], group=True)
        finished: dict[str, float] = {}
        failures = []
        cpus: list[float] = []
        while len(finished) + len(failures) < n:
            kind, device, ts, why = out.get(timeout=600)
            if kind == "verified":
                finished[device] = ts
            elif kind == "failed":
                failures.append(f"{device}: {why}")
            elif kind == "cpu":
                cpus.append(ts)
        cpu_server, cpu_broker = _cpu_s() - cpu_server0, _cpu_s(broker_pid) - cpu_broker0
        if failures:
            raise RuntimeError(f"{len(failures)} agents failed: {failures[:3]}")
        while len(cpus) < len(workers):
            kind, _, cpu, _ = out.get(timeout=60)
            if kind == "cpu":
                cpus.append(cpu)
        cpu_agents = sum(cpus)
        for i in ids:  # every one of them really has the verified file
            assert (run_root / i / "variants" / f"{spec.sha256}.onnx").stat().st_size == len(
                data)
        return {"agents": n, "seconds": round(max(finished.values()) - t0, 3),
                "server_bytes": server.bytes_published,
                "publish_seconds": round(published_s, 3),
                # CPU seconds spent while the run was timed (agents: until each worker
                # process had all its agents verified and disconnected).
                "cpu_seconds": {"agents": round(cpu_agents, 2), "broker": round(cpu_broker, 2),
                                "server": round(cpu_server, 2)}}
    finally:
        go.set()
        for w in workers:
            w.join(30)
            if w.is_alive():
                w.kill()
        server.stop()
        store.close()
        shutil.rmtree(run_root, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="1 and 10 agents only")
    p.add_argument("--json", type=Path, metavar="PATH", help="write the figures here")
    p.add_argument("--procs", type=int, default=os.cpu_count() or 2,
                   help="agent worker processes (default: one per core)")
    p.add_argument("--state-root", type=Path,
                   default=Path("/dev/shm") if Path("/dev/shm").is_dir() else None,
                   help="where agents keep their files (default /dev/shm)")
    p.add_argument("--artifact-bytes", type=int, default=10_000_000)
    p.add_argument("--compression", choices=["zlib", "none"], default="zlib",
                   help="chunk compression (default zlib, the server's default)")
    p.add_argument("--repeat", type=int, help="runs per fleet size, median kept "
                   "(default 3, 1 with --quick)")
    args = p.parse_args(argv)
    sizes = [1, 10] if args.quick else [1, 10, 50]
    repeat = args.repeat or (1 if args.quick else 3)

    with tempfile.TemporaryDirectory(prefix="pf-bench-dist-") as tmp:
        work = Path(tmp)
        broker, url = start_mosquitto(work)
        try:
            artifact = make_artifact(work / "big.onnx", args.artifact_bytes)
            size = artifact.stat().st_size
            state_root = args.state_root or work
            runs = []
            for n in sizes:
                tries = []
                for _ in range(repeat):
                    tries.append(run_once(n, args.procs, url, broker.pid, artifact, work,
                                          state_root, args.compression))
                    print(f"  {n:>3} agents: {tries[-1]['seconds']:.2f} s", file=sys.stderr)
                tries.sort(key=lambda r: r["seconds"])
                r = tries[len(tries) // 2]
                r["all_seconds"] = sorted(t["seconds"] for t in tries)
                runs.append(r)
        finally:
            broker.terminate()
            broker.wait(10)

    one = runs[0]["seconds"]
    print(f"\nartifact: {size} bytes (ONNX, float32 weights), chunks of {CHUNK_BYTES} bytes, "
          f"{args.compression}; window {WINDOW}; mosquitto {url}; median of {repeat}")
    print(f"machine: {platform.machine()}, {os.cpu_count()} logical cores, "
          f"Python {platform.python_version()}\n")
    print(f"{'agents':>6} {'seconds':>8} {'vs 1':>6} {'server bytes':>13} {'/artifact':>9} "
          f"{'publish s':>9} {'CPU s: agents':>13} {'broker':>6} {'server':>6}")
    for r in runs:
        c = r["cpu_seconds"]
        print(f"{r['agents']:>6} {r['seconds']:>8.2f} {r['seconds'] / one:>5.2f}x "
              f"{r['server_bytes']:>13} {r['server_bytes'] / size:>9.3f} "
              f"{r['publish_seconds']:>9.2f} {c['agents']:>13.2f} {c['broker']:>6.2f} "
              f"{c['server']:>6.2f}")
    bytes_ok = all(r["server_bytes"] <= 1.2 * size for r in runs)
    print(f"\ntarget server bytes <= 1.2 x artifact for every N: "
          f"{'met' if bytes_ok else 'MISSED'}")
    big = [r for r in runs if r["agents"] == 50]
    if big:
        ratio = big[0]["seconds"] / one
        print(f"target 50 agents within 3 x one agent: {ratio:.2f}x, "
              f"{'met' if ratio <= 3 else 'MISSED'}")
        floor = big[0]["cpu_seconds"]["agents"] / (os.cpu_count() or 1)
        print(f"  (the 50 simulated agents alone need {big[0]['cpu_seconds']['agents']:.2f} "
              f"CPU s: at least {floor:.2f} s of wall time on {os.cpu_count()} cores, "
              f"{floor / one:.1f}x one agent's time, before any distribution cost)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "artifact_bytes": size, "runs": runs, "compression": args.compression,
            "repeat": repeat, "machine": {"arch": platform.machine(), "cores": os.cpu_count(),
                                          "python": platform.python_version()},
        }, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
