"""Where policies get the time from: a Clock, never `time.time()` directly.

The device worker passes a `MonotonicClock`; tests and the simulator pass a `ManualClock`
and move it themselves, so the very same policy code runs in both.
"""
from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Seconds on this clock's own timeline (only differences are meaningful)."""
        ...


class MonotonicClock:
    """Real time that never jumps backwards (NTP adjustments do not move it)."""

    def now(self) -> float:
        return time.monotonic()


class ManualClock:
    """Time that moves only when told to: for tests and discrete-event simulation."""

    def __init__(self, start: float = 0.0) -> None:
        self._t = float(start)

    def now(self) -> float:
        return self._t

    def advance(self, seconds: float) -> float:
        """Move forward by `seconds` (>= 0) and return the new time."""
        if seconds < 0:
            raise ValueError(f"a clock cannot go back: advance({seconds})")
        self._t += seconds
        return self._t

    def set(self, t: float) -> None:
        """Jump to `t`, which must not be earlier than now (events are processed in order)."""
        if t < self._t:
            raise ValueError(f"a clock cannot go back: set({t}) < now {self._t}")
        self._t = float(t)
