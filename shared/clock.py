"""The clock seam: :class:`SystemClock` for production, :class:`FakeClock` for tests.

Code that measures intervals or stamps messages takes a :class:`Clock`, so a test moves time
by hand (``clock.tick(30)``) instead of sleeping and hoping.
"""

from __future__ import annotations

import threading
import time
from typing import Protocol

__all__ = ["Clock", "FakeClock", "SystemClock"]


class Clock(Protocol):
    def monotonic(self) -> float:
        """Seconds on a clock that never goes back; for intervals and dwell times."""
        ...

    def time(self) -> float:
        """Seconds since the Unix epoch; for timestamps sent to the server."""
        ...


class SystemClock:
    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()


class FakeClock:
    """A clock that moves only when told to; both readings advance together."""

    def __init__(self, monotonic: float = 1000.0, wall: float = 1_700_000_000.0) -> None:
        self._lock = threading.Lock()
        self._monotonic = monotonic
        self._wall = wall

    def monotonic(self) -> float:
        with self._lock:
            return self._monotonic

    def time(self) -> float:
        with self._lock:
            return self._wall

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError(f"a clock cannot go back ({seconds} s)")
        with self._lock:
            self._monotonic += seconds
            self._wall += seconds

    def tick(self, seconds: float) -> None:
        """The same as :meth:`advance`."""
        self.advance(seconds)
