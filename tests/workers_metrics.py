"""Functions run inside multiprocessing workers by the metrics tests (importable under spawn)."""

from __future__ import annotations

import contextlib
import time
from typing import Any

from structlog.testing import capture_logs

import flexisync
from flexisync import metrics


class ProviderDown(RuntimeError):
    """What the fake dependency raises."""


def _fail() -> None:
    raise ProviderDown("provider is down")


def _transitions(namespace: str) -> float:
    return sum(float(s.value) for s in metrics.collect()  # type: ignore[arg-type]
               if s.name == "flexisync_breaker_transitions_total"
               and s.labels["namespace"] == namespace)


def opener_worker(url: str, namespace: str, threshold: int, barrier: Any, out: Any) -> None:
    """Fail once after the barrier (all workers together reach the threshold), wait
    until this process's mirror shows the breaker open, then report every log line
    (event, level) and this process's transition count."""
    with capture_logs() as logs, flexisync.connect(url, namespace=namespace) as sync:
        breaker = sync.breaker("provider", failure_threshold=threshold,
                               recovery_timeout=60.0)
        assert breaker.state == "closed"  # subscribed and read before the race
        barrier.wait(30)
        with contextlib.suppress(ProviderDown, flexisync.CircuitOpenError):
            breaker.call(_fail)
        deadline = time.monotonic() + 20
        while breaker.state != "open" and time.monotonic() < deadline:
            time.sleep(0.002)  # polling this process's mirror (no I/O), with a deadline
        state = breaker.state
        transitions = _transitions(namespace)
        lines = [(str(entry.get("event")), str(entry.get("log_level"))) for entry in logs
                 if str(entry.get("event", "")).startswith("breaker.")]
    out.put((state, transitions, lines))


def caller_worker(url: str, namespace: str, successes: int, failures: int) -> None:
    """Make ``successes`` good calls and ``failures`` failing ones, then close (which
    adds what the stats flusher has not sent yet)."""
    with flexisync.connect(url, namespace=namespace) as sync:
        breaker = sync.breaker("provider", failure_threshold=10_000)
        for _ in range(successes):
            breaker.call(lambda: None)
        for _ in range(failures):
            with contextlib.suppress(ProviderDown):
                breaker.call(_fail)
