"""The server's and simulator's collector setting (shared/gctune.py): the youngest
generation is walked less often, and reference cycles are still freed. Run in a child
process, so that this test run's own collector is left as it is."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def _run(code: str) -> str:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], check=True,
                          capture_output=True, text=True, timeout=60).stdout.strip()


def test_cycles_are_still_freed_without_an_explicit_collection():
    out = _run("""
        import gc, weakref
        from prunefleet.shared.gctune import GEN0_THRESHOLD, tune_for_throughput
        tune_for_throughput()
        assert gc.get_threshold()[0] == GEN0_THRESHOLD
        class Node:
            pass
        a, b = Node(), Node()
        a.other, b.other = b, a  # a cycle: reference counting alone never frees it
        gone = weakref.ref(a)
        del a, b
        junk = [[] for _ in range(3 * GEN0_THRESHOLD)]  # allocations, as ingest makes
        print(gone() is None)
    """)
    assert out == "True"


def test_a_setting_less_frequent_than_ours_is_kept():
    out = _run("""
        import gc
        from prunefleet.shared.gctune import tune_for_throughput
        gc.set_threshold(50000, 10, 10)
        tune_for_throughput()
        print(gc.get_threshold()[0])
        gc.disable(); gc.set_threshold(0)
        tune_for_throughput()
        print(gc.get_threshold()[0])
    """)
    assert out.split() == ["50000", "0"]


def test_the_interpreter_lock_changes_hands_sooner_and_a_shorter_setting_is_kept():
    """A thread back from SQLite or a socket waits for the lock at most this long while
    another computes (the commit thread beside ingest's checks)."""
    out = _run("""
        import sys
        from prunefleet.shared.gctune import SWITCH_INTERVAL_S, tune_for_throughput
        print(sys.getswitchinterval() > SWITCH_INTERVAL_S)
        tune_for_throughput()
        print(sys.getswitchinterval() == SWITCH_INTERVAL_S)
        sys.setswitchinterval(0.0002)
        tune_for_throughput()
        print(sys.getswitchinterval() < SWITCH_INTERVAL_S)
    """)
    assert out.split() == ["True", "True", "True"]
