"""Simulator benchmark: what a fleet of simulated devices costs on one machine.

    python bench/simulator.py [--quick] [--json PATH] [--devices N,N,...] [--steady-s S]

For each fleet size, a fresh local mosquitto (``deploy/mosquitto/test.conf`` on a free
loopback port, ``connection_messages false``) and one ``prunefleet simulate`` process
(``Simulator`` with ``download=False``, the default 10 s telemetry interval, every device on
its own MQTT connection driven by the epoll loop): the time until every device's CONNACK
arrived (``connect_s``), then ``--steady-s`` seconds of steady running, measuring the
simulator's CPU seconds per second per device (``cpu_ms_per_device_s``: milliseconds of CPU
per device per second of running, both cores counted) and its resident memory per device
(``rss_kb_per_device``: resident set size above the bare interpreter with the modules
imported, divided by the devices), and the broker's CPU and memory the same way. Baseline in
the same run: the thread-per-connection ``MqttTransport`` at a size it can hold (200
devices), for the same figures.

No server runs: its telemetry acknowledgements are not what is measured (``bench/ingest.py``
measures the server); devices re-send unconfirmed batches every 30 s, as they would with a
slow server.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# bench/ is the script's directory, so it is on sys.path: share distribution.py's broker.
from distribution import start_mosquitto  # isort: skip

REPO = Path(__file__).resolve().parent.parent


def _proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def sim_main(url: str, keys: str, devices: int, threads: bool, steady_s: float,
             conn: Any) -> None:
    import logging

    logging.basicConfig(level=logging.ERROR)
    from prunefleet.server.simulator import SimOptions, Simulator
    from prunefleet.shared.transport import raise_fd_limit

    raise_fd_limit(devices + 1024)
    rss0 = _rss_kb(os.getpid())
    opts = SimOptions(broker_url=url, devices=devices, id_prefix="bench", keys=Path(keys),
                      download=False, drain_s=0.0, status_interval_s=3600,
                      connect_timeout_s=120)
    # The baseline: a transport seam that gives none, so each device builds paho's own
    # thread-per-connection transport.
    sim = Simulator(opts, transports=lambda _id: None) if threads else Simulator(opts)
    t0 = time.monotonic()
    sim.start()
    while sum(d.connected for d in sim.devices) < devices:
        if time.monotonic() - t0 > 300:
            break
        time.sleep(0.05)
    connect_s = time.monotonic() - t0
    connected = sum(d.connected for d in sim.devices)
    time.sleep(2.0)
    cpu0, w0 = _proc_cpu_s(os.getpid()), time.monotonic()
    conn.send(("steady", None))
    time.sleep(steady_s)
    cpu = _proc_cpu_s(os.getpid()) - cpu0
    wall = time.monotonic() - w0
    rss = _rss_kb(os.getpid()) - rss0
    online = sum(d.connected for d in sim.devices)
    sent = sum(d.agent.tqueue.issued for d in sim.devices)
    conn.send(("done", {"connect_s": round(connect_s, 2), "connected": connected,
                        "online_at_end": online, "batches_cut": sent,
                        "cpu_ms_per_device_s": round(1000 * cpu / wall / devices, 3),
                        "cpu_cores": round(cpu / wall, 2),
                        "rss_kb_per_device": round(rss / devices, 1),
                        "threads": threads}))
    sim.stop()


def measure(work: Path, keys: Path, devices: int, steady_s: float, threads: bool) -> dict:
    broker, url = start_mosquitto(work, connection_messages=False)
    try:
        ctx = mp.get_context("spawn")
        ours, theirs = ctx.Pipe()
        p = ctx.Process(target=sim_main, args=(url, str(keys), devices, threads, steady_s,
                                               theirs))
        b_rss0 = _rss_kb(broker.pid)
        p.start()
        kind, _ = ours.recv()
        assert kind == "steady"
        b_cpu0, w0 = _proc_cpu_s(broker.pid), time.monotonic()
        kind, out = ours.recv()
        b_cpu = _proc_cpu_s(broker.pid) - b_cpu0
        wall = time.monotonic() - w0
        out["devices"] = devices
        out["broker_cpu_ms_per_device_s"] = round(1000 * b_cpu / wall / devices, 3)
        out["broker_rss_kb_per_device"] = round((_rss_kb(broker.pid) - b_rss0) / devices, 1)
        p.join(120)
        if p.is_alive():
            p.kill()
        return out
    finally:
        broker.terminate()
        broker.wait(10)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="1,000 devices, 10 s steady")
    ap.add_argument("--json", type=Path, help="write the figures here")
    ap.add_argument("--devices", default="1000,3000,10000",
                    help="comma-separated fleet sizes (default 1000,3000,10000)")
    ap.add_argument("--steady-s", type=float, default=30.0)
    args = ap.parse_args()
    sizes = [1000] if args.quick else [int(x) for x in args.devices.split(",")]
    steady = 10.0 if args.quick else args.steady_s
    sys.path.insert(0, str(REPO))
    from prunefleet.server.keys import load_or_create

    rows = []
    with tempfile.TemporaryDirectory(prefix="pf-bench-sim-") as tmp:
        work = Path(tmp)
        load_or_create(work / "keys")
        for n, threads in [(200, True), *((n, False) for n in sizes)]:
            d = work / f"run-{n}-{threads}"
            d.mkdir()
            r = measure(d, work / "keys", n, steady, threads)
            rows.append(r)
            print(f"{'threads' if threads else 'epoll':>7}  {n:>6} devices  connect "
                  f"{r['connect_s']:>6.1f} s ({r['connected']} connected, {r['online_at_end']}"
                  f" online at end)  sim CPU {r['cpu_ms_per_device_s']:.3f} ms/device/s "
                  f"({r['cpu_cores']} cores)  sim RSS {r['rss_kb_per_device']:.0f} kB/device"
                  f"  broker CPU {r['broker_cpu_ms_per_device_s']:.3f} ms/device/s, RSS "
                  f"{r['broker_rss_kb_per_device']:.0f} kB/device", flush=True)
    result = {"machine": f"{platform.machine()} {os.cpu_count()} CPUs, "
                         f"Python {platform.python_version()}", "runs": rows}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
