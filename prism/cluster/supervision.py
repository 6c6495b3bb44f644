"""When to restart a dead device worker: exponential backoff, a bounded number of attempts.

Pure bookkeeping (no processes, no clock of its own), so the policy is testable alone; the
server's Supervisor (prism/server/supervisor.py) carries it out. Every attempt counts, whether
the new worker failed to start or started and died later: a worker that crashes again and
again is given up after `max_restarts` attempts within `window_s`, instead of being restarted
for ever.
"""
from __future__ import annotations

from dataclasses import dataclass, field

FIRST_DELAY_S = 0.5  # then 1 s, 2 s, 4 s...: a crash loop does not spin a CPU
MAX_RESTARTS = 5
WINDOW_S = 300.0
MAX_RESTART_WAIT_S = 30.0  # the longest a request waits for a restarting device


@dataclass
class RestartBudget:
    max_restarts: int = MAX_RESTARTS
    window_s: float = WINDOW_S
    first_delay_s: float = FIRST_DELAY_S
    _attempts: dict[str, list[float]] = field(default_factory=dict)

    def next_delay(self, device: str, now: float) -> float | None:
        """Record an attempt to restart `device` now; the delay to wait before it, or None when
        the budget is spent (the device is failed for good)."""
        recent = [t for t in self._attempts.get(device, []) if now - t < self.window_s]
        if len(recent) >= self.max_restarts:
            self._attempts[device] = recent
            return None
        recent.append(now)
        self._attempts[device] = recent
        return self.delay(device)

    def delay(self, device: str) -> float:
        """The backoff of `device`'s latest attempt (the first one's before any)."""
        return self.first_delay_s * 2 ** max(0, self.attempts(device) - 1)

    def attempts(self, device: str) -> int:
        return len(self._attempts.get(device, []))


__all__ = ["FIRST_DELAY_S", "MAX_RESTARTS", "MAX_RESTART_WAIT_S", "WINDOW_S", "RestartBudget"]
