"""What joining queued packets into one socket write saves a sender of bursts.

    .venv/bin/python bench/transport_writes.py [--quick] [--json PATH] [--connections N]
                                               [--burst N] [--rounds N]

A mosquitto started here with ``deploy/mosquitto/test.conf`` on a free loopback port, and
in this process ``--connections`` :class:`EpollMqttTransport` connections on one
:class:`EpollLoop` (as the simulator drives its devices). Each round, every connection
publishes ``--burst`` QoS 1 messages of 600 bytes (a telemetry batch's size) at once, as
an agent sending its backlog does, and the round ends when the broker has acknowledged
them all. Two modes, alternated round-robin in the same run so that the machine's drift
falls on both:

* ``paho``: paho's own ``_packet_write``, one ``send()`` per packet (the baseline);
* ``joined``: the transport's, the packets queued so far in one ``send()`` (up to 64 KiB).

Figures: CPU seconds of this process per message (``time.process_time``: the connections'
Python and their system calls, not the broker's) and messages per second, per mode, the
median over its repetitions; ``cpu_ratio`` = joined / paho (below 1 is a saving).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from distribution import start_mosquitto  # bench/ is on sys.path as the script's directory

from prunefleet.shared import transport as T

PAYLOAD = b"x" * 600


def _run(ts: list[T.EpollMqttTransport], burst: int, rounds: int, joined: bool) -> tuple:
    """CPU µs per message and messages/s of ``rounds`` rounds."""
    own = T._JitterClient.__dict__["_packet_write"]
    if not joined:  # paho's, for the baseline
        del T._JitterClient._packet_write
    try:
        c0, w0 = time.process_time(), time.perf_counter()
        for _ in range(rounds):
            for t in ts:
                topic = f"bench/{t.options.client_id}/telemetry"
                for _ in range(burst):
                    t.publish(topic, PAYLOAD, qos=1)
            deadline = time.monotonic() + 30
            while any(t.unacknowledged() for t in ts):
                if time.monotonic() > deadline:
                    raise SystemExit("the broker did not acknowledge a round in 30 s")
                time.sleep(0.0005)
        c1, w1 = time.process_time(), time.perf_counter()
    finally:
        if not joined:
            T._JitterClient._packet_write = own
    n = rounds * len(ts) * burst
    return (c1 - c0) / n * 1e6, n / (w1 - w0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    ap.add_argument("--json", type=Path, metavar="PATH")
    ap.add_argument("--connections", type=int, default=100)
    ap.add_argument("--burst", type=int, default=10,
                    help="messages each connection publishes at once (%(default)s: the "
                         "agent's telemetry window)")
    ap.add_argument("--rounds", type=int, default=60, help="rounds per repetition")
    args = ap.parse_args()
    reps = 3 if args.quick else 7

    work = Path(tempfile.mkdtemp(prefix="pf-bench-writes-"))
    broker, url = start_mosquitto(work)
    loop = T.EpollLoop("bench-writes")
    ts = [T.EpollMqttTransport(
        T.BrokerAddress.parse(url),
        T.TransportOptions(client_id=f"w{i}", max_inflight_messages=max(20, args.burst),
                           report_published=False, read_batch=64), loop)
        for i in range(args.connections)]
    try:
        for t in ts:
            t.start()
        for t in ts:
            if not t.connected.wait(20):
                raise SystemExit("a connection did not reach the broker")
        _run(ts, args.burst, 5, joined=True)  # warm: connections, allocations
        got: dict[str, list[tuple[float, float]]] = {"paho": [], "joined": []}
        for _ in range(reps):
            for mode in ("paho", "joined"):
                got[mode].append(_run(ts, args.burst, args.rounds, joined=mode == "joined"))
    finally:
        for t in ts:
            t.stop(wait_s=2)
        loop.close()
        broker.terminate()
        broker.wait(10)

    figures: dict = {"connections": args.connections, "burst": args.burst,
                     "rounds": args.rounds, "repetitions": reps,
                     "machine": f"{platform.machine()}, Python {platform.python_version()}"}
    for mode, runs in got.items():
        figures[mode] = {"cpu_us_per_message": round(statistics.median(r[0] for r in runs), 2),
                         "messages_per_s": round(statistics.median(r[1] for r in runs)),
                         "cpu_us_runs": [round(r[0], 2) for r in runs]}
    figures["cpu_ratio"] = round(figures["joined"]["cpu_us_per_message"]
                                 / figures["paho"]["cpu_us_per_message"], 3)
    figures["rate_ratio"] = round(figures["joined"]["messages_per_s"]
                                  / figures["paho"]["messages_per_s"], 3)
    for mode in ("paho", "joined"):
        f = figures[mode]
        print(f"{mode:7s} {f['cpu_us_per_message']:6.1f} µs CPU per message "
              f"{f['messages_per_s']:8d} msg/s  (runs: {f['cpu_us_runs']})")
    print(f"joined / paho: CPU {figures['cpu_ratio']}, rate {figures['rate_ratio']}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
