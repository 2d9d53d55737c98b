"""asyncio pub/sub: cancellation at every await, several event loops, fork, and one
listener shared with the blocking shell."""

from __future__ import annotations

import asyncio
import multiprocessing
from typing import Any

import pytest
import redis

import flexisync
import flexisync.aio
from flexisync import Event
from flexisync.embedded import EmbeddedRedis
from tests.aio_helpers import other_tasks, until
from tests.faults import FaultProxy


async def _baseline(aio: flexisync.aio.AsyncCoordinator) -> dict[str, int]:
    """Listener table sizes once the bus exists and the listener is connected."""
    sub = await aio.events.subscribe("warm-up")
    await sub.aclose()
    return aio._ctx.listener.table_sizes()


# --- cancellation -------------------------------------------------------------------------


async def test_cancelled_subscribe_while_unconfirmed_leaves_nothing_registered(
        proxy: FaultProxy, own_server: EmbeddedRedis) -> None:
    """subscribe() cancelled while Redis has not confirmed (server stalled) raises
    CancelledError and leaves no handler, no waiter, no pending command, no task and,
    once the server answers, no subscription on the server."""
    aio = flexisync.aio.connect(proxy.url(), namespace="aio-cancel")
    try:
        listener = aio._ctx.listener
        baseline = await _baseline(aio)
        proxy.stall()
        task = asyncio.create_task(aio.events.subscribe("never", timeout=30))
        await until(lambda: listener.table_sizes()["waiting"] == 1,
                     "subscribe() waiting for the confirmation")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert listener.table_sizes()["handlers"] == baseline["handlers"]
        assert listener.table_sizes()["waiting"] == 0
        proxy.resume()
        await until(lambda: listener.table_sizes() == baseline,
                     f"listener tables back to {baseline} ({listener.table_sizes()})")
        assert not other_tasks()
        server = redis.Redis(port=own_server.port)
        channel = aio._ctx.keys.channel("events", "never")
        assert server.pubsub_numsub(channel) == [(channel.encode(), 0)]
        server.close()
        assert await aio.events.publish("never", 1) == 0
    finally:
        proxy.resume()
        await aio.aclose()


async def test_cancelled_get_takes_nothing_off_the_queue(
        aio: flexisync.aio.AsyncCoordinator) -> None:
    """A get() cancelled while it waits (task.cancel or wait_for's timeout) loses no
    event: the next get() returns the next one; the counters stay balanced."""
    baseline = await _baseline(aio)
    sub = await aio.events.subscribe("cancel-get")
    task = asyncio.create_task(sub.get())
    await asyncio.sleep(0)  # the task runs up to its first suspension: waiting
    assert not task.done()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(sub.get(), 0.01)
    await aio.events.publish("cancel-get", "kept")
    event = await sub.get(timeout=5)
    assert event is not None
    assert event.data == "kept"
    stats = sub.stats
    assert (stats.received, stats.delivered, stats.dropped, stats.queued) == (1, 1, 0, 0)
    await sub.aclose()
    assert aio._ctx.listener.table_sizes() == baseline
    assert not other_tasks()


async def test_cancelled_async_for_frees_nothing_it_did_not_hold(
        aio: flexisync.aio.AsyncCoordinator) -> None:
    """Cancelling a task iterating `async for` ends it; the subscription still
    delivers the next event; after aclose the listener is back to its baseline."""
    baseline = await _baseline(aio)
    sub = await aio.events.subscribe("cancel-iter")
    seen: list[Any] = []
    first = asyncio.Event()

    async def consume() -> None:
        async for event in sub:
            seen.append(event.data)
            first.set()

    task = asyncio.create_task(consume())
    await aio.events.publish("cancel-iter", 1)
    await asyncio.wait_for(first.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await aio.events.publish("cancel-iter", 2)
    event = await sub.get(timeout=5)
    assert event is not None
    assert (seen, event.data) == ([1], 2)
    await sub.aclose()
    assert aio._ctx.listener.table_sizes() == baseline
    assert not other_tasks()


async def test_aclose_ends_a_callback_subscriptions_task(
        aio: flexisync.aio.AsyncCoordinator) -> None:
    """A coroutine callback runs on this loop, in order; a raising one is counted;
    aclose() ends the dispatcher task and unregisters the handler."""
    baseline = await _baseline(aio)
    seen: list[int] = []
    loop = asyncio.get_running_loop()
    loops: set[Any] = set()

    async def callback(event: Event) -> None:
        loops.add(asyncio.get_running_loop())
        await asyncio.sleep(0)  # a suspending callback must not reorder events
        seen.append(event.data)
        if event.data == 0:
            raise ValueError("boom")

    sub = await aio.events.subscribe("cb", callback)
    assert len(other_tasks()) == 1, "one dispatcher task, no thread"
    for i in range(5):
        await aio.events.publish("cb", i)
    await until(lambda: len(seen) == 5, "five callback calls")
    assert seen == [0, 1, 2, 3, 4]
    assert loops == {loop}
    assert sub.stats.errors == 1
    await sub.aclose()
    assert not other_tasks()
    assert aio._ctx.listener.table_sizes() == baseline


async def test_cancelled_aclose_still_closes(proxy: FaultProxy) -> None:
    """aclose() cancelled while it awaits the UNSUBSCRIBE confirmation leaves the
    subscription closed and its handler removed. The proxy holds the confirmation back,
    so the cancellation always lands while aclose() waits for it."""
    aio = flexisync.aio.connect(proxy.url(), namespace="aio-cancel-close")
    try:
        baseline = await _baseline(aio)
        sub = await aio.events.subscribe("cancel-close")
        proxy.stall()
        try:
            task = asyncio.create_task(sub.aclose())
            await asyncio.sleep(0)  # the task sends UNSUBSCRIBE and awaits its answer
            assert not task.done()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert sub.closed
            assert aio._ctx.listener.table_sizes()["handlers"] == baseline["handlers"]
        finally:
            proxy.resume()
        await until(lambda: aio._ctx.listener.table_sizes() == baseline, "unsubscribe answered")
    finally:
        await aio.aclose()


# --- reconnects -----------------------------------------------------------------------------


async def test_on_reconnect_runs_a_coroutine_hook_on_this_loop(proxy: FaultProxy) -> None:
    """After the listener's connection is cut and restored, an async hook runs on the
    loop that registered it and the live subscription counts one gap."""
    aio = flexisync.aio.connect(proxy.url(), namespace="aio-reconnect")
    try:
        called = asyncio.Event()
        loop = asyncio.get_running_loop()
        where: list[Any] = []

        async def hook() -> None:
            where.append(asyncio.get_running_loop())
            called.set()

        remove = aio.events.on_reconnect(hook)
        sub = await aio.events.subscribe("live")
        proxy.cut()
        await asyncio.wait_for(called.wait(), 15)
        assert where == [loop]
        assert sub.stats.gaps == 1
        assert await aio.events.publish("live", "after") == 1
        event = await sub.get(timeout=5)
        assert event is not None
        assert event.data == "after"
        remove()
        await sub.aclose()
    finally:
        await aio.aclose()


# --- one process, one listener ------------------------------------------------------------


def test_sync_and_async_subscriptions_share_one_listener_connection(
        flexisync_url: str, namespace: str, raw: redis.Redis) -> None:
    """A sync and an asyncio subscription to the same topic in one process: Redis sees
    one subscriber connection (PUBSUB NUMSUB = 1, PUBLISH counts 1) and both receive."""
    sync = flexisync.connect(flexisync_url, namespace=namespace)
    aio = flexisync.aio.connect(flexisync_url, namespace=namespace)
    try:
        assert aio._ctx is sync._ctx
        sync_sub = sync.events.subscribe("shared")

        async def main() -> tuple[Any, Any, int, Any]:
            async_sub = await aio.events.subscribe("shared")
            other = await aio.events.subscribe("async-only")
            channels = [sync._ctx.keys.channel("events", t) for t in ("shared", "async-only")]
            counts = raw.pubsub_numsub(*channels)
            published = await aio.events.publish("shared", "both")
            event = await async_sub.get(timeout=5)
            await async_sub.aclose()
            await other.aclose()
            return counts, event, published, channels

        counts, async_event, published, channels = asyncio.run(main())
        assert counts == [(channels[0], 1), (channels[1], 1)], "one connection per channel"
        assert published == 1, "one subscriber connection in this process"
        sync_event = sync_sub.get(timeout=5)
        assert async_event is not None
        assert sync_event is not None
        assert async_event.id == sync_event.id
        assert sync._ctx.listener.generation == 1
        sync_sub.close()
    finally:
        sync.close()
        asyncio.run(aio.aclose())


# --- several event loops, fork -------------------------------------------------------------


def test_one_subscription_serves_event_loops_one_after_the_other(
        flexisync_url: str, namespace: str) -> None:
    """Subscribe in one asyncio.run(), get in the next ones (one left waiting when its
    loop ended), close in a last one: no 'different loop' errors, nothing lost."""
    aio = flexisync.aio.connect(flexisync_url, namespace=namespace)
    sub = asyncio.run(aio.events.subscribe("loops"))

    async def abandon() -> None:
        task = asyncio.create_task(sub.get())
        await asyncio.sleep(0)
        assert not task.done()  # left waiting: asyncio.run cancels it at the end

    asyncio.run(abandon())

    async def roundtrip(value: int) -> Any:
        await aio.events.publish("loops", value)
        event = await sub.get(timeout=5)
        return None if event is None else event.data

    assert [asyncio.run(roundtrip(i)) for i in range(3)] == [0, 1, 2]
    assert aio._ctx.listener.handler_errors == 0
    asyncio.run(sub.aclose())
    assert sub.closed
    assert sub.stats.delivered == 3
    asyncio.run(aio.aclose())


def _child(aio: flexisync.aio.AsyncCoordinator, sub: Any, out: Any) -> None:
    """In a forked child: use the inherited subscription and a new one in a new loop."""

    async def main() -> list[Any]:
        fresh = await aio.events.subscribe("child")
        await aio.events.publish("fork", "to-inherited")
        await aio.events.publish("child", "to-fresh")
        inherited_event = await sub.get(timeout=10)
        fresh_event = await fresh.get(timeout=10)
        await fresh.aclose()
        return [None if e is None else e.data for e in (inherited_event, fresh_event)]

    try:
        out.put(asyncio.run(main()))
    except BaseException as exc:  # report, do not hang the parent
        out.put(repr(exc))


def test_forked_child_can_asyncio_run_a_subscription(flexisync_url: str,
                                                     namespace: str) -> None:
    """After fork, a child runs its own event loop on the inherited Coordinator: the
    inherited subscription and a new one both receive; the parent's keeps working."""
    aio = flexisync.aio.connect(flexisync_url, namespace=namespace)
    sub = asyncio.run(aio.events.subscribe("fork"))
    mp = multiprocessing.get_context("fork")
    out = mp.Queue()
    child = mp.Process(target=_child, args=(aio, sub, out))
    child.start()
    try:
        assert out.get(timeout=60) == ["to-inherited", "to-fresh"]
    finally:
        child.join(60)
    assert child.exitcode == 0

    async def parent() -> Any:
        event = await sub.get(timeout=5)  # the child's publish reached us too
        await aio.events.publish("fork", "parent")
        later = await sub.get(timeout=5)
        await sub.aclose()
        return [None if e is None else e.data for e in (event, later)]

    assert asyncio.run(parent()) == ["to-inherited", "parent"]
    asyncio.run(aio.aclose())
