"""Small helpers for tests: waiting on a condition with a deadline, joining workers."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any


def wait_until(predicate: Callable[[], Any], timeout: float = 5.0, interval: float = 0.002,
               message: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{message} not met within {timeout}s")
        time.sleep(interval)


def join_all(processes: Iterable[Any], timeout: float = 60.0) -> None:
    """Join every process within ``timeout`` s in total; kill stragglers and fail."""
    deadline = time.monotonic() + timeout
    stuck = []
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            stuck.append(process)
            process.kill()
            process.join(5)
    assert not stuck, f"{len(stuck)} worker(s) did not finish within {timeout}s"
    failed = [p.exitcode for p in processes if p.exitcode != 0]
    assert not failed, f"workers exited with {failed}"


def start_queued_in_order(mp: Any, target: Callable[..., Any],
                          args_of: Callable[[int], tuple[Any, ...]], count: int,
                          queued: Callable[[], int]) -> list[Any]:
    """Start ``count`` processes ``target(*args_of(i))`` one after another, each only once
    the previous one is queued (``queued()`` counts the waiters in Redis's queue)."""
    waiters = []
    for index in range(count):
        waiter = mp.Process(target=target, args=args_of(index))
        waiter.start()
        waiters.append(waiter)
        wait_until(lambda n=index + 1: queued() == n, timeout=60,
                   message=f"waiter {index} queued")
    return waiters
