"""Functions run inside multiprocessing workers by the breaker tests (importable under spawn)."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from typing import Any

import flexisync


class ProviderDown(RuntimeError):
    """What the fake dependency raises."""


def _fail() -> None:
    raise ProviderDown("provider is down")


def _first_rejection(breaker: flexisync.CircuitBreaker, timeout: float = 10.0,
                     ) -> float | None:
    """Call until the breaker rejects (the trip reached this process); its retry_after."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            breaker.call(lambda: None)
        except flexisync.CircuitOpenError as exc:
            return exc.retry_after
        time.sleep(0.001)
    return None


def hammer_worker(url: str, namespace: str, policy: dict[str, Any], barrier: Any,
                  out: Any) -> None:
    """Call a failing function until the breaker rejects; report (calls made, retry_after)."""
    with flexisync.connect(url, namespace=namespace) as sync:
        breaker = sync.breaker("provider", **policy)
        assert breaker.state == "closed"  # subscribed and read before the race starts
        barrier.wait(30)
        calls = 0
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                breaker.call(_fail)
            except ProviderDown:
                calls += 1
            except flexisync.CircuitOpenError as exc:
                out.put((os.getpid(), calls, exc.retry_after))
                return
        out.put((os.getpid(), calls, None))


def probe_worker(url: str, namespace: str, policy: dict[str, Any], barrier: Any,  # noqa: PLR0917  (Process args are positional)
                 out: Any, release: Any) -> None:
    """Try one call once the open period is over; an admitted probe blocks until released."""
    with flexisync.connect(url, namespace=namespace) as sync:
        breaker = sync.breaker("provider", **policy)
        assert breaker.state in ("open", "half_open")
        barrier.wait(30)

        def probe() -> str:
            out.put("admitted")
            release.wait(30)
            return "ok"

        try:
            breaker.call(probe)
        except flexisync.CircuitOpenError:
            out.put("rejected")


def stuck_probe_worker(url: str, namespace: str, policy: dict[str, Any], out: Any) -> None:
    """Become the half-open probe and never finish (the test SIGKILLs this process)."""
    with flexisync.connect(url, namespace=namespace) as sync:
        breaker = sync.breaker("provider", **policy)

        def probe() -> None:
            out.put("admitted")
            threading.Event().wait(120)

        try:
            breaker.call(probe)
        except flexisync.CircuitOpenError:
            out.put("rejected")


def outcome_worker(url: str, namespace: str, policy: dict[str, Any],  # noqa: PLR0917  (Process args are positional)
                   successes: int, failures: int, done: Any) -> None:
    """Make ``successes`` successful then ``failures`` failing calls; wait for the flush."""
    with flexisync.connect(url, namespace=namespace) as sync:
        breaker = sync.breaker("provider", **policy)
        for _ in range(successes):
            breaker.call(lambda: None)
        for _ in range(failures):
            with contextlib.suppress(ProviderDown):
                breaker.call(_fail)
        done.wait(30)  # stay alive until the parent saw the flushed counts


def retry_after_worker(url: str, namespace: str, ready: Any, tripped: Any,
                       out: Any) -> None:
    """After the parent trips the breaker, report the retry_after a rejected call carries."""
    with flexisync.connect(url, namespace=namespace) as sync:
        breaker = sync.breaker("provider")
        assert breaker.state == "closed"
        ready.wait(30)
        tripped.wait(30)
        out.put(_first_rejection(breaker))


def transitions_worker(url: str, namespace: str, ready: Any, out: Any, expected: int) -> None:
    """Report every on_state_change callback this process receives (until ``expected``),
    and, when forced open, whether a call is then rejected."""
    with flexisync.connect(url, namespace=namespace) as sync:
        breaker = sync.breaker("provider")
        seen: list[tuple[str, str, str]] = []
        enough = threading.Event()

        def record(name: str, old: str, new: str) -> None:
            seen.append((name, old, new))
            if new == "forced_open":
                try:
                    breaker.call(lambda: None)
                except flexisync.CircuitOpenError:
                    out.put(("forced", os.getpid(), True))
                else:
                    out.put(("forced", os.getpid(), False))
            if len(seen) >= expected:
                enough.set()

        breaker.on_state_change(record)
        ready.wait(30)
        enough.wait(30)
        out.put(("seen", os.getpid(), seen))


def inherited_breaker_worker(breaker: flexisync.CircuitBreaker, ready: Any, tripped: Any,
                             out: Any) -> None:
    """Use, after fork(), a breaker the parent created and used before forking."""
    out.put(("state", breaker.state))
    ready.set()
    tripped.wait(30)
    out.put(("rejected", _first_rejection(breaker)))
