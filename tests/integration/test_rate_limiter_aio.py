"""AsyncRateLimiter: a cancelled acquire gives back what it reserved (issue 11, item 5).

Each test cancels ``acquire`` at one of its awaits: the reservation script in flight
(held there by the fault proxy's ``stall()``), and the sleep until the admission time
the server named. The test knows the task reached that await from a hook on the async
backend's script calls (no sleep guesses). Afterwards, once the janitor is done, the
limiter's budget is whole again and the reservation's marker is a tombstone, so a
script still in flight reserves nothing when it lands.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis

import flexisync
import flexisync.aio
from tests.aio_helpers import cancel, settle
from tests.faults import FaultProxy


class _Scripts:
    """Hooks the async backend's script calls: runs ``before()`` right before each is
    sent, and sets ``sent`` / ``returned`` around it."""

    def __init__(self, aio: flexisync.aio.AsyncCoordinator, before: Any = None) -> None:
        self.sent = asyncio.Event()
        self.returned = asyncio.Event()
        backend = aio._ctx.abackend
        original = backend.run_script

        async def hooked(*args: Any, **kwargs: Any) -> Any:
            if before is not None:
                before()
            self.sent.set()
            result = await original(*args, **kwargs)
            self.returned.set()
            return result

        backend.run_script = hooked  # type: ignore[method-assign]


def _markers(client: redis.Redis, aio: flexisync.aio.AsyncCoordinator, name: str,
             before: dict[str, str] | None = None) -> dict[str, str]:
    """The reservation markers of limiter ``name`` (key -> value), minus ``before``."""
    prefix = aio._ctx.keys.key("ratelimit", name, "r") + ":"
    found = {key: client.get(key) for key in client.scan_iter(match=prefix + "*")}
    return {k: v for k, v in found.items() if k not in (before or {})}


async def test_cancelled_while_waiting_for_its_turn_gives_the_reservation_back(
        aio: flexisync.aio.AsyncCoordinator, raw: redis.Redis) -> None:
    """Past the burst, acquire reserved a slot 60 s ahead and sleeps; cancelled there,
    the slot is returned: the next caller waits 60 s, not 120 s."""
    limiter = aio.rate_limiter("slow", 1, per=60.0, burst=1)
    assert await limiter.acquire() is not None
    before = _markers(raw, aio, "slow")
    hook = _Scripts(aio)
    task = asyncio.create_task(limiter.acquire())
    await asyncio.wait_for(hook.returned.wait(), 10)  # reserved; now in asyncio.sleep
    assert next(iter(_markers(raw, aio, "slow", before).values())).startswith("1 ")
    await cancel(task)
    await settle(aio)
    assert list(_markers(raw, aio, "slow", before).values()) == ["x"], \
        "the marker did not become a tombstone"
    with pytest.raises(flexisync.errors.FlexiSyncError) as info:
        await limiter.acquire(timeout=0)
    assert 59.0 < info.value.retry_after <= 60.0  # type: ignore[attr-defined]


async def test_cancelled_by_wait_for_while_waiting_gives_tokens_back(
        aio: flexisync.aio.AsyncCoordinator) -> None:
    """asyncio.wait_for around a token reservation that must wait: on the timeout the
    tokens are returned (the limiter is where it was before the call)."""
    limiter = aio.rate_limiter("tokens", 6000, per=60.0, burst=6000)
    assert await limiter.acquire(5000) is not None  # 1000 left
    hook = _Scripts(aio)
    task = asyncio.ensure_future(asyncio.wait_for(limiter.acquire(3000), 30))
    await asyncio.wait_for(hook.returned.wait(), 10)
    await cancel(task)
    await settle(aio)
    # 1000 (+ a few refilled) left, as before the cancelled call.
    assert await limiter.try_acquire(1000) is not None
    assert await limiter.try_acquire(500) is None


async def test_cancelled_while_its_script_is_in_flight_reserves_nothing(
        proxy: FaultProxy, direct: redis.Redis, namespace: str) -> None:
    """The reservation script is held by a stalled network when the task is cancelled:
    whichever lands first (the script or the janitor's cancel), nothing stays reserved
    and the marker ends a tombstone."""
    async with flexisync.aio.connect(proxy.url(), namespace=namespace,
                                     retry=flexisync.RetryPolicy(deadline=5.0)) as aio:
        limiter = aio.rate_limiter("flight", 10, per=60.0, burst=10)
        assert await limiter.try_acquire(1) is not None  # scripts loaded, 9 left
        before = _markers(direct, aio, "flight")
        hook = _Scripts(aio, before=proxy.stall)
        task = asyncio.create_task(limiter.acquire(5))
        await asyncio.wait_for(hook.sent.wait(), 10)
        await asyncio.sleep(0)  # let the task write the command into the stalled socket
        await cancel(task)
        proxy.resume()
        await settle(aio)
        assert list(_markers(direct, aio, "flight", before).values()) == ["x"]
        limiter2 = aio.rate_limiter("flight", 10, per=60.0, burst=10)
        backend = aio._ctx.abackend
        backend.run_script = type(backend).run_script.__get__(backend)  # type: ignore[method-assign]
        assert await limiter2.try_acquire(9) is not None, "the cancelled cost stayed taken"
        assert await limiter2.try_acquire(1) is None


async def test_a_sync_and_an_async_limiter_share_one_budget(
        sync: flexisync.Coordinator, aio: flexisync.aio.AsyncCoordinator) -> None:
    """The blocking and the asyncio shell on one name draw on one budget."""
    blocking = sync.rate_limiter("mixed", 2, per=60.0)
    asynchronous = aio.rate_limiter("mixed", 2, per=60.0)
    assert blocking.try_acquire() is not None
    assert await asynchronous.try_acquire() is not None
    assert blocking.try_acquire() is None
    assert await asynchronous.try_acquire() is None
