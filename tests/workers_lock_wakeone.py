"""Workers for tests/integration/test_lock_wakeone.py, run in real processes (importable
under spawn)."""

from __future__ import annotations

import time
from typing import Any

import flexisync


def loop_worker(url: str, namespace: str, barrier: Any, out: Any, *, index: int,
                fair: bool, n: int) -> None:
    """Acquire and release the lock 'loop' ``n`` times (no hold), each time reading and
    incrementing a plain counter key inside the lock; report, per acquisition,
    (fence, index, counter value read, monotonic time the acquire began, monotonic time
    its first attempt came back having joined the queue, or ``None``)."""
    with flexisync.connect(url, namespace=namespace) as sync:
        client = sync.client
        key = f"{namespace}:plain-counter"
        lock = sync.lock("loop", ttl=10, timeout=60, fair=fair)
        original = lock._attempt
        joined: list[float] = []

        def noting(token: str, waiting: bool, deadline: float | None = None) -> Any:
            first = lock._turn == "" and not lock._queued
            acquired, pttl = yield from original(token, waiting, deadline)
            if first and not acquired:
                joined.append(time.monotonic())
            return acquired, pttl

        lock._attempt = noting  # type: ignore[method-assign]
        seen: list[tuple[int, int, int, float, float | None]] = []
        barrier.wait(60)
        for _ in range(n):
            joined.clear()
            started = time.monotonic()
            with lock:
                value = int(client.get(key) or 0)
                client.set(key, value + 1)
                assert lock.fencing_token is not None
                seen.append((lock.fencing_token, index, value, started,
                             joined[0] if joined else None))
        barrier.wait(60)  # everyone finished: the parent reads the command counts now
        out.put(seen)


def queued_waiter(url: str, namespace: str, fair: bool, listening: Any, out: Any) -> None:
    """Wait for the lock 'named', setting ``listening`` once it sleeps (its first
    attempt and the one after its wake-up handler subscribed came back); report
    (acquired, why the attempt that took it was made)."""
    with flexisync.connect(url, namespace=namespace) as sync:
        lock = sync.lock("named", ttl=10, fair=fair)
        original = lock._attempt
        attempts = 0

        def noting(token: str, waiting: bool, deadline: float | None = None) -> Any:
            nonlocal attempts
            result = yield from original(token, waiting, deadline)
            attempts += 1
            if attempts == 2:
                listening.set()
            return result

        lock._attempt = noting  # type: ignore[method-assign]
        acquired = lock.acquire(timeout=60)
        out.put((acquired, lock._turn))
        if acquired:
            lock.release()
