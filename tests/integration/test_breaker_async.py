"""CircuitBreaker's asyncio forms (``acall``, ``async with``, decorated ``async def``).

They delegate to :class:`~flexisync.aio.AsyncCircuitBreaker` on the same mirror, whose
cancellation behaviour at each ``await`` is tested in ``test_breaker_aio.py``; here a
sync-built breaker's probe, cancelled while it runs, frees its lease.
"""

from __future__ import annotations

import asyncio

import pytest

import flexisync
from tests.helpers import wait_until


def half_open(sync: flexisync.Coordinator) -> flexisync.CircuitBreaker:
    """A breaker whose open period is over: the next call is admitted as the probe."""
    breaker = sync.breaker("provider", probe_lease=60)
    assert breaker.state == "closed"
    breaker.trip(0.01)
    wait_until(lambda: breaker.stats().retry_after == 0, message="open period over")
    return breaker


def probes_in_flight(breaker: flexisync.CircuitBreaker) -> int:
    return breaker.info().probes_in_flight


def assert_lease_released(breaker: flexisync.CircuitBreaker) -> None:
    """No lease is left behind, and the fleet may probe again at once."""
    wait_until(lambda: probes_in_flight(breaker) == 0, timeout=5,
               message="the cancelled call's probe lease released")
    assert breaker.call(lambda: "probe") == "probe"
    assert breaker.info().state == "closed"


def test_cancel_while_the_probe_runs_releases_the_lease(
        sync: flexisync.Coordinator) -> None:
    """A probe coroutine cancelled mid-call settles as neutral: its lease is freed."""
    breaker = half_open(sync)

    async def main() -> None:
        started = asyncio.Event()

        async def provider() -> None:
            started.set()
            await asyncio.sleep(3600)

        task = asyncio.create_task(breaker.acall(provider))
        await started.wait()
        assert probes_in_flight(breaker) == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert_lease_released(breaker)


def test_the_async_forms_share_the_sync_breakers_mirror(sync: flexisync.Coordinator) -> None:
    """A decorated ``async def``, ``acall`` and ``async with`` on a CircuitBreaker count
    on the breaker's one mirror, in any event loop (three ``asyncio.run`` in a row)."""
    breaker = sync.breaker("provider", failure_threshold=3)

    @breaker
    async def provider() -> None:
        raise RuntimeError("down")

    async def failing() -> None:
        raise RuntimeError("down")

    async def in_block() -> None:
        async with breaker:
            raise RuntimeError("down")

    forms = (provider, lambda: breaker.acall(failing), in_block)

    async def one(i: int) -> None:
        with pytest.raises(RuntimeError):
            await forms[i]()

    for i in range(3):
        asyncio.run(one(i))
    assert breaker.state == "open"
    assert breaker.stats().local_failures == 3
