"""The per-process breaker a :class:`~flexisync.CircuitBreaker` falls back on while Redis
is unreachable (``on_backend_error="local"``).

It applies the same policy as the shared breaker (consecutive failures or a failure
rate over a window, slow calls, growing open periods, a half-open probe budget), but
counts only what this process sees, on this process's monotonic clock.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from typing import TYPE_CHECKING

from flexisync.errors import CircuitOpenError

if TYPE_CHECKING:
    from flexisync.breaker._policy import BreakerPolicy

__all__ = ["LocalBreaker"]


class LocalBreaker:
    """A thread-safe in-process circuit breaker; internal to :mod:`flexisync.breaker`."""

    def __init__(self, name: str, policy: BreakerPolicy) -> None:
        self._name = name
        self._policy = policy
        self._lock = threading.Lock()
        self.state = "closed"
        self.open_until = 0.0
        self._period = policy.recovery_timeout
        self._failures = 0
        self._window: deque[tuple[float, bool]] = deque()
        self._probes = 0
        self._probe_ok = 0

    def seed(self, state: str, open_until: float) -> None:
        """Start from the shared state last mirrored (so an open breaker stays open)."""
        with self._lock:
            self.state = state  # forced_open and disabled stay in force during an outage
            self.open_until = open_until
            self._period = self._policy.recovery_timeout
            self._failures = 0
            self._window.clear()
            self._probes = self._probe_ok = 0

    def remaining(self) -> float:
        """Seconds until this local breaker admits a probe (0 when not open)."""
        if self.state == "forced_open":
            return math.inf
        if self.state != "open":
            return 0.0
        return max(0.0, self.open_until - time.monotonic())

    def admit(self) -> bool:
        """Admit a call: False for a plain call, True for a probe.

        Raises:
            CircuitOpenError: open, or half-open with every probe slot taken.
        """
        with self._lock:
            if self.state in ("closed", "disabled"):
                return False
            if self.state == "forced_open":
                raise CircuitOpenError(self._name, math.inf)
            now = time.monotonic()
            if self.state == "open":
                if now < self.open_until:
                    raise CircuitOpenError(self._name, self.open_until - now)
                self.state, self._probes, self._probe_ok = "half_open", 0, 0
            if self._probes >= self._policy.half_open_max_calls:
                raise CircuitOpenError(self._name, self._policy.recovery_timeout)
            self._probes += 1
            return True

    def record(self, probe: bool, outcome: str, retry_after: float | None) -> None:
        """Count one outcome (``"ok"``, ``"fail"`` or ``"neutral"``)."""
        policy = self._policy
        with self._lock:
            now = time.monotonic()
            if probe:
                self._settle_probe(now, outcome, retry_after)
                return
            if outcome == "neutral" or self.state in ("forced_open", "disabled"):
                return
            if outcome == "fail" and retry_after is not None:
                self._open(now, retry_after)
                return
            if self.state != "closed":
                return
            if policy.failure_rate is None:
                self._failures = self._failures + 1 if outcome == "fail" else 0
                if self._failures >= policy.failure_threshold:
                    self._open(now, self._period)
                return
            window = self._window
            window.append((now, outcome == "fail"))
            while window and window[0][0] <= now - policy.window:
                window.popleft()
            failed = sum(1 for _, bad in window if bad)
            if outcome == "fail" and len(window) >= policy.minimum_calls \
                    and failed >= policy.failure_rate * len(window):
                self._open(now, self._period)

    def _settle_probe(self, now: float, outcome: str, retry_after: float | None) -> None:
        """A probe's outcome (the lock is held): success_threshold good probes close; a
        failed one reopens for exactly its retry-after, else for the doubled period."""
        self._probes = max(0, self._probes - 1)
        if self.state != "half_open":
            return
        if outcome == "ok":
            self._probe_ok += 1
            if self._probe_ok >= self._policy.success_threshold:
                self._close()
        elif outcome == "fail":
            if retry_after is not None:
                self._open(now, retry_after)
                return
            self._period = min(self._period * 2, self._policy.max_recovery_timeout)
            self._open(now, self._period)

    def _open(self, now: float, period: float) -> None:
        if self.state in ("forced_open", "disabled"):
            return  # a manual override outlasts an outage
        target = now + period
        if self.state == "open" and self.open_until >= target:
            return  # never shorten an open period
        self.state, self.open_until = "open", target
        self._probes = self._probe_ok = 0

    def _close(self) -> None:
        self.state = "closed"
        self._period = self._policy.recovery_timeout
        self._failures = 0
        self._window.clear()
