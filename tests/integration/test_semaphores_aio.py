"""AsyncSemaphore: cancellation at each await point leaves no slot held by nobody and no
waiter queued; a release in another (blocking) process wakes an asyncio waiter.

Each test cancels at one await of ``acquire``/``release``: the first attempt's script in
flight, the wake-up subscription waiting for Redis's confirmation, the wait for a
wake-up, a re-attempt in flight after a wake-up, the release in flight, and an
``async with`` body. "In flight" is held there by the fault proxy's ``stall()``; the
test knows the task reached that await from a hook on the semaphore's attempts (no
sleep guesses). Afterwards it checks the holders and queue in Redis, the listener's
tables and the Context's background work.
"""

from __future__ import annotations

import asyncio
import multiprocessing
from typing import Any

import pytest
import redis

import flexisync
import flexisync.aio
from flexisync._core.lock_runtime import runtime
from flexisync._core.plan import run
from flexisync.aio.semaphores import AsyncSemaphore
from tests.aio_helpers import AttemptHook, cancel, connect_aio, scripts_run, settle
from tests.faults import FaultProxy
from tests.helpers import join_all


def _keys(aio: flexisync.aio.AsyncCoordinator, name: str) -> tuple[str, str]:
    keys = aio._ctx.keys
    return keys.key("sem", name), keys.key("sem", name, "queue")


async def _assert_clean(aio: flexisync.aio.AsyncCoordinator, direct: redis.Redis,
                        name: str, sem: AsyncSemaphore, holders: int = 0) -> None:
    """After the janitor's work: ``holders`` slots held (the test's own), no queue
    entry, the cancelled task's object holds nothing here, no handler or wait left."""
    await settle(aio)
    slots, queue = _keys(aio, name)
    assert direct.zcard(slots) == holders, "a slot nobody holds was left behind"
    assert direct.zcard(queue) == 0, "a cancelled waiter stayed in the queue"
    assert sem.held == 0
    assert not runtime(aio._ctx).waits, "a wake-up registration was left behind"
    sizes = aio._ctx.listener.table_sizes()
    assert sizes["waiting"] == 0, sizes
    channel = aio._ctx.keys.object_channel("sem", name)
    assert not [k for k in aio._ctx.listener._handlers if k[1] == channel], \
        "the wake-up handler was left in the listener"


async def _assert_free(aio: flexisync.aio.AsyncCoordinator, name: str, limit: int) -> None:
    """All ``limit`` slots can be taken at once: none was left to a cancelled task."""
    probes = [aio.semaphore(name, limit, lease=30) for _ in range(limit)]
    for probe in probes:
        assert await probe.acquire(blocking=False), "a slot is not free after the cancel"
    for probe in probes:
        await probe.release()


async def _warm(aio: flexisync.aio.AsyncCoordinator) -> None:
    """Load semaphore_acquire/_release (asyncio client) and semaphore_abandon (the
    janitor's blocking client) so that each later run is exactly one EVALSHA."""
    warm = aio.semaphore("warm", 1)
    assert await warm.acquire(blocking=False)
    await warm.release()
    run(aio._ctx, warm._abandon("0:warm"))


async def test_cancelled_while_the_first_attempt_is_in_flight(
        proxy: FaultProxy, direct: redis.Redis, namespace: str) -> None:
    """The acquire script is held by a stalled network when the task is cancelled: it
    lands after the cancellation (and takes the free slot), yet no slot is left: the
    undo by token drops it, or its marker makes the late command take nothing."""
    async with connect_aio(proxy.url(), namespace) as aio:
        await _warm(aio)
        scripts = scripts_run(direct)
        sem = aio.semaphore("first", 2, lease=30)
        hook = AttemptHook(sem, before={1: proxy.stall})
        task = asyncio.ensure_future(sem.acquire(timeout=20))
        await asyncio.wait_for(hook.reached.wait(), 10)
        await asyncio.sleep(0)  # the script is sent and its reply awaited
        await cancel(task)
        proxy.resume()
        await _assert_clean(aio, direct, "first", sem)
        assert scripts_run(direct) - scripts == 2  # the late attempt and its undo
        await _assert_free(aio, "first", 2)


async def test_cancelled_while_subscribing_for_wakeups(
        proxy: FaultProxy, direct: redis.Redis, namespace: str) -> None:
    """Cancelled while Redis has not confirmed the wake-up subscription (stalled): the
    handler is removed, the queue entry goes (janitor), only the holder's slot stays."""
    async with connect_aio(proxy.url(), namespace) as aio:
        holder = aio.semaphore("sub", 1, lease=30)
        assert await holder.acquire()
        warm = await aio._ctx.listener.subscribe_async(("channel", "warm"),
                                                      lambda *_: None)  # listener up
        sem = aio.semaphore("sub", 1, lease=30)
        hook = AttemptHook(sem, after={1: proxy.stall})  # the SUBSCRIBE after it stalls
        task = asyncio.ensure_future(sem.acquire(timeout=20))
        await hook.until(1)
        assert aio._ctx.listener.table_sizes()["waiting"] == 1, "not subscribing"
        await cancel(task)
        proxy.resume()
        assert hook.results == [False]
        await _assert_clean(aio, direct, "sub", sem, holders=1)
        warm.close()
        await holder.release()
        await _assert_free(aio, "sub", 1)


async def test_cancelled_while_waiting_for_a_wakeup(
        aio: flexisync.aio.AsyncCoordinator, raw: redis.Redis) -> None:
    """Cancelled asleep on a full semaphore: its handler goes at once, its queue entry
    goes, and the next release is not handed to it."""
    holder = aio.semaphore("asleep", 1, lease=30)
    assert await holder.acquire()
    sem = aio.semaphore("asleep", 1, lease=30)
    hook = AttemptHook(sem)
    task = asyncio.ensure_future(sem.acquire(timeout=30))
    await hook.until(2)  # subscribed, the final attempt failed: it waits now
    assert raw.zcard(_keys(aio, "asleep")[1]) == 1
    await cancel(task)
    await _assert_clean(aio, raw, "asleep", sem, holders=1)
    await holder.release()
    await _assert_free(aio, "asleep", 1)


async def test_cancelled_while_a_reattempt_after_a_wakeup_is_in_flight(
        proxy: FaultProxy, direct: redis.Redis, namespace: str) -> None:
    """Woken by the release, the waiter's re-attempt is held in flight and cancelled:
    the slot it may have taken is given back, the semaphore is free afterwards."""
    async with connect_aio(proxy.url(), namespace) as aio:
        await _warm(aio)
        holder = aio.semaphore("again", 1, lease=30)
        assert await holder.acquire()
        sem = aio.semaphore("again", 1, lease=30)
        hook = AttemptHook(sem, before={3: proxy.stall})
        task = asyncio.ensure_future(sem.acquire(timeout=20))
        await hook.until(2)
        scripts = scripts_run(direct)
        hook.reached.clear()
        await holder.release()  # wakes the waiter, whose 3rd attempt stalls
        await asyncio.wait_for(hook.reached.wait(), 10)
        await asyncio.sleep(0)
        await cancel(task)
        proxy.resume()
        assert hook.results == [False, False]
        await _assert_clean(aio, direct, "again", sem)
        # The release, the cancelled attempt (late) and its undo reached the server.
        assert scripts_run(direct) - scripts == 3
        await _assert_free(aio, "again", 1)


async def test_cancelled_release_still_releases(
        proxy: FaultProxy, direct: redis.Redis, namespace: str) -> None:
    """release() cancelled while its script is in flight: the task holds nothing and
    the slot is given back all the same (the janitor repeats the release by token)."""
    async with connect_aio(proxy.url(), namespace) as aio:
        sem = aio.semaphore("rel", 1, lease=30)
        assert await sem.acquire()
        proxy.stall()
        task = asyncio.ensure_future(sem.release())
        await asyncio.sleep(0)  # the release script is sent; its reply cannot come
        await cancel(task)
        proxy.resume()
        await _assert_clean(aio, direct, "rel", sem)
        with pytest.raises(flexisync.SemaphoreNotHeldError):
            await sem.release()
        await _assert_free(aio, "rel", 1)


async def test_cancelled_async_with_body_releases_the_slot(
        aio: flexisync.aio.AsyncCoordinator, raw: redis.Redis) -> None:
    """A task cancelled inside ``async with sem:`` gives its slot back on the way out."""
    entered = asyncio.Event()
    sem = aio.semaphore("cm", 1, lease=30, timeout=5)

    async def body() -> None:
        async with sem:
            entered.set()
            await asyncio.Event().wait()

    task = asyncio.ensure_future(body())
    await asyncio.wait_for(entered.wait(), 10)
    assert raw.zcard(_keys(aio, "cm")[0]) == 1
    await cancel(task)
    assert raw.zcard(_keys(aio, "cm")[0]) == 0


async def test_wait_for_with_tiny_timeouts_never_leaves_a_slot(
        aio: flexisync.aio.AsyncCoordinator, raw: redis.Redis) -> None:
    """asyncio.wait_for(acquire(), tiny) cancelled wherever it happens to be, 50 times
    (every other round behind a holder): afterwards nothing is held, queued or
    registered."""
    slots, queue = _keys(aio, "tiny")
    holder = aio.semaphore("tiny", 1, lease=30)
    for i in range(50):
        sem = aio.semaphore("tiny", 1, lease=30)
        if i % 2:
            assert await holder.acquire()
        try:
            await asyncio.wait_for(sem.acquire(), 0.0002 * (i % 10))
        except asyncio.TimeoutError:
            pass
        else:
            await sem.release()
        if i % 2:
            await holder.release()
        assert await asyncio.to_thread(aio._ctx.settle, 10.0)
        assert raw.zcard(slots) == 0, f"a slot was left (round {i})"
        assert raw.zcard(queue) == 0, f"a queue entry was left (round {i})"
        assert not runtime(aio._ctx).waits
    assert aio._ctx.listener.table_sizes()["waiting"] == 0


def test_an_acquire_that_lands_after_its_undo_takes_nothing(
        sync: flexisync.Coordinator, raw: redis.Redis) -> None:
    """The undo of a cancelled acquire may reach Redis before the acquire command itself
    (another connection): the marker makes the late command take no slot and join no
    queue, while other tokens acquire as usual."""
    sem = sync.semaphore("late", 1, lease=30)
    owner = "feedbeef:host:1"
    run(sync._ctx, sem._abandon(owner, True))
    reply = sync._ctx.backend.run_script("t", "semaphore_acquire", sem._keys(owner),
                                         [owner, 1, 30_000, "1", 3000])
    assert int(reply[0]) == 0
    slots, queue = sync._ctx.keys.key("sem", "late"), sync._ctx.keys.key("sem", "late", "queue")
    assert raw.zcard(slots) == 0, "the late acquire took a slot nobody holds"
    assert raw.zcard(queue) == 0, "the late acquire queued a waiter that is gone"
    assert sem.acquire(blocking=False)
    sem.release()


# --- handoff across processes -----------------------------------------------------------


def _sync_holder(url: str, namespace: str, name: str, held: Any, go: Any) -> None:
    """Hold the one slot of ``name`` with the blocking shell until ``go``, then release."""
    with flexisync.connect(url, namespace=namespace) as sync:
        sem = sync.semaphore(name, 1, lease=60)
        assert sem.acquire(timeout=10)
        held.set()
        assert go.wait(60)
        sem.release()


@pytest.mark.parametrize("start", ["fork", "spawn"])
async def test_async_waiter_is_woken_by_a_sync_release_in_another_process(
        aio: flexisync.aio.AsyncCoordinator, flexisync_url: str, namespace: str,
        start: str) -> None:
    """A blocking holder in another process releases; the asyncio waiter here gets the
    slot on the release's wake-up: 3 attempts (first, final before sleeping, after the
    wake-up), so not by a re-check (the holder's lease is 60 s)."""
    mp = multiprocessing.get_context(start)
    held, go = mp.Event(), mp.Event()
    worker = mp.Process(target=_sync_holder, args=(flexisync_url, namespace, "handoff",
                                                   held, go))
    worker.start()
    try:
        assert await asyncio.to_thread(held.wait, 30), "the holder never acquired"
        sem = aio.semaphore("handoff", 1, lease=30)
        hook = AttemptHook(sem)
        task = asyncio.ensure_future(sem.acquire(timeout=30))
        await hook.until(2)
        go.set()
        assert await asyncio.wait_for(task, 30)
        assert hook.results == [False, False, True]
        await sem.release()
    finally:
        go.set()
        await asyncio.to_thread(join_all, [worker], 30)
