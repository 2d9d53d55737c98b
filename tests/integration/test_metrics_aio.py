"""flexisync.metrics with the asyncio shell: its calls bump the same core counters,
and the fleet stats and afleet_outcomes work from coroutines."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest

import flexisync
import flexisync.aio
from flexisync import metrics
from tests.aio_helpers import until


class Boom(RuntimeError):
    pass


def value(namespace: str, name: str, **labels: str) -> Any:
    for sample in metrics.collect():
        if sample.name == name and sample.labels.get("namespace") == namespace \
                and all(sample.labels.get(k) == v for k, v in labels.items()):
            return sample.value
    return None


async def _ok() -> int:
    return 1


async def _boom() -> None:
    raise Boom


async def _cancelled() -> None:
    raise asyncio.CancelledError


async def test_async_breaker_calls_share_the_sync_counters(
        aio: flexisync.aio.AsyncCoordinator, sync: flexisync.Coordinator,
        namespace: str) -> None:
    breaker = aio.breaker("b", failure_threshold=100)
    for _ in range(3):
        await breaker.acall(_ok)
    sync.breaker("b", failure_threshold=100).call(lambda: None)  # the same core
    with pytest.raises(Boom):
        await breaker.acall(_boom)
    with pytest.raises(asyncio.CancelledError):
        await breaker.acall(_cancelled)  # a cancelled call counts as nothing

    def calls(outcome: str) -> Any:
        return value(namespace, "flexisync_breaker_calls_total", breaker="b",
                     outcome=outcome)

    assert [calls(o) for o in ("success", "failure", "ignored")] == [4, 1, 1]
    await breaker.trip(retry_after=30)
    with pytest.raises(flexisync.CircuitOpenError):
        await breaker.acall(_ok)
    assert calls("rejected") == 1
    assert value(namespace, "flexisync_breaker_transitions_total", breaker="b",
                 to="open") == 1

    async def totals() -> dict[str, int]:
        rows = await metrics.afleet_outcomes(aio, "b")
        return {k: sum(r[k] for r in rows) for k in ("success", "failure", "rejected",
                                                      "ignored")}

    found: dict[str, int] = {}

    async def check() -> None:
        found.update(await totals())

    loop = asyncio.get_running_loop()
    end = loop.time() + 10
    while found != {"success": 4, "failure": 1, "rejected": 1, "ignored": 1}:
        assert loop.time() < end, f"fleet stats never added up: {found}"
        await check()
        await asyncio.sleep(0.05)


async def test_async_lock_semaphore_limiter_events_stream(
        aio: flexisync.aio.AsyncCoordinator, namespace: str) -> None:
    async with aio.lock("l", ttl=5):
        pass
    assert value(namespace, "flexisync_lock_acquisitions_total", lock="l") == 1
    assert value(namespace, "flexisync_lock_wait_seconds", lock="l").count == 1
    holder = aio.lock("held", ttl=5)
    assert await holder.acquire()
    assert not await aio.lock("held", ttl=5).acquire(blocking=False)
    assert value(namespace, "flexisync_lock_timeouts_total", lock="held") == 1
    await holder.release()

    async with aio.semaphore("m", 1):
        pass
    assert value(namespace, "flexisync_semaphore_admissions_total", semaphore="m") == 1
    limiter = aio.rate_limiter("r", 10, burst=1)
    await limiter.acquire()
    assert await limiter.try_acquire() is None
    assert value(namespace, "flexisync_rate_limiter_admissions_total", limiter="r") == 1
    assert value(namespace, "flexisync_rate_limiter_rejections_total", limiter="r") == 1

    sub = await aio.events.subscribe("t")
    await aio.events.publish("t", {"x": 1})
    assert (await sub.get(timeout=5)) is not None
    assert value(namespace, "flexisync_events_published_total", topic="t") == 1
    assert value(namespace, "flexisync_events_delivered_total", topic="t") == 1
    await sub.aclose()
    assert value(namespace, "flexisync_events_delivered_total", topic="t") == 1

    stream = aio.stream("s")
    await stream.append(1)
    follow = stream.follow(timeout=5)
    assert (await follow.__anext__()).data == 1  # replayed; now following live
    await stream.append(2)
    await stream.append(3)
    assert value(namespace, "flexisync_stream_appends_total", stream="s") == 3
    await until(lambda: value(namespace, "flexisync_stream_follower_lag",
                              stream="s") == 2, "two entries waiting for the follower")
    with contextlib.suppress(StopAsyncIteration):
        assert (await follow.__anext__()).data == 2
    await follow.aclose()
