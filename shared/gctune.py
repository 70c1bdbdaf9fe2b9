"""Collector and interpreter-lock settings for a process that handles thousands of
messages a second.

CPython's cyclic collector walks its youngest generation every 700 container allocations,
and the older ones every 10 walks of the one below. Ingest allocates dozens of containers
per message (decoded models, rows, queue items) and reference counting frees nearly all of
them, so the walks find little and cost much: what survives a walk (queued messages,
cursors) is walked again in the older generations. Measured on the server alone storing a
40,000-batch backlog (docs/ingest.md, 2-core VM): 131-152 µs of CPU per batch with
CPython's default, 93-100 µs with the youngest generation walked every 10,000 allocations
or more, about 40% more batches a second.

And the interpreter lock's switch interval: a thread back from a system call (SQLite's
statements and commit, a socket's read) waits for the lock up to this long while another
thread computes (CPython's default: 5 ms). The server's commit thread makes a dozen such
calls per transaction beside two busy threads (paho's network thread, the checks), and a
simulated fleet's workers beside its network loop. With 1 ms, six interleaved pairs of
the quick ingest benchmark gave 0.70-0.85 of the bare baseline against 0.47-0.83 with the
default, the 1 ms run ahead in each pair (docs/ingest.md).
"""

from __future__ import annotations

import gc
import sys

__all__ = ["GEN0_THRESHOLD", "SWITCH_INTERVAL_S", "tune_for_throughput"]

# Container allocations between two walks of the youngest generation (CPython's default:
# 700). Ten thousand short-lived objects are a few MB at most.
GEN0_THRESHOLD = 10_000

# Seconds a thread holding the interpreter lock keeps it while another waits (CPython's
# default: 0.005).
SWITCH_INTERVAL_S = 0.001


def tune_for_throughput(gen0: int = GEN0_THRESHOLD) -> None:
    """Walk the youngest generation every ``gen0`` container allocations (never more
    often than CPython would), and hand the interpreter lock over every
    ``SWITCH_INTERVAL_S`` (never less often than set before). Cycles are still found and
    freed, only later and in larger batches. Process-wide, so called only where a process
    starts as one of these: the ``serve`` and ``simulate`` commands and an ingest worker,
    never inside the library (``FleetService``, ``Simulator``), which tests start in a
    process of their own: there an object freed only by the collector (a connection in a
    reference cycle) would stay open longer than the test expects, as the agent API's
    idle-connection test showed."""
    current, gen1, gen2 = gc.get_threshold()
    if current and current < gen0:
        gc.set_threshold(gen0, gen1, gen2)
    if sys.getswitchinterval() > SWITCH_INTERVAL_S:
        sys.setswitchinterval(SWITCH_INTERVAL_S)
