"""Helpers for asyncio tests: polling with a deadline, cancelling, hooking attempts.

Shared by the asyncio integration tests (cancellation at each await point) so that each
primitive's test module holds only what is particular to it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import redis

import flexisync
import flexisync.aio


async def until(predicate: Callable[[], Any], what: str, timeout: float = 10.0) -> None:
    """Await until ``predicate()`` is truthy, yielding to the event loop meanwhile; fail
    naming ``what`` after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not predicate():
        if loop.time() > end:
            pytest.fail(f"timed out waiting for: {what} ({timeout}s)")
        await asyncio.sleep(0.002)


def other_tasks() -> set[asyncio.Task[Any]]:
    """Tasks of this loop other than the current one (should be none after a cleanup)."""
    return asyncio.all_tasks() - {asyncio.current_task()}


async def cancel(task: asyncio.Future[Any]) -> None:
    """Cancel ``task`` and check that the cancellation propagates out of it."""
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def settle(aio: flexisync.aio.AsyncCoordinator) -> None:
    """Wait until the Context's janitor finished the compensating work queued so far."""
    assert await asyncio.to_thread(aio._ctx.settle, 10.0), "janitor work did not finish"


@asynccontextmanager
async def connect_aio(url: str, namespace: str,
                      ) -> AsyncIterator[flexisync.aio.AsyncCoordinator]:
    """An AsyncCoordinator with a 5 s retry deadline (room for a stalled command)."""
    async with flexisync.aio.connect(url, namespace=namespace,
                                     retry=flexisync.RetryPolicy(deadline=5.0)) as aio:
        yield aio


def scripts_run(direct: redis.Redis) -> int:
    """How many EVALSHA the server has run so far."""
    return int(direct.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0))


class AttemptHook:
    """Hooks the acquire attempts of an async lock or semaphore (its ``_attempt`` plan):
    records their outcomes, runs ``before[n]`` right before attempt n (1-based) is sent
    and ``after[n]`` right after it returned, and sets ``reached`` after each of these."""

    def __init__(self, primitive: Any, before: dict[int, Any] | None = None,
                 after: dict[int, Any] | None = None) -> None:
        self.results: list[bool] = []
        self.before = before or {}
        self.after = after or {}
        self.reached = asyncio.Event()
        original = primitive._attempt

        def hooked(token: str, waiting: bool, deadline: float | None = None) -> Any:
            hook = self.before.get(len(self.results) + 1)
            if hook is not None:
                hook()
                self.reached.set()
            result = yield from original(token, waiting, deadline)
            self.results.append(result[0])
            hook = self.after.get(len(self.results))
            if hook is not None:
                hook()
            self.reached.set()
            return result

        primitive._attempt = hooked

    async def until(self, n: int) -> None:
        """Until ``n`` attempts returned."""
        while len(self.results) < n:
            self.reached.clear()
            await asyncio.wait_for(self.reached.wait(), 10)
