"""AsyncLock: cancellation at each await point leaves nothing held by nobody; handoff
from a blocking holder in another process to an asyncio waiter (issue 10, item 2).

Each test cancels at one await of ``acquire``/``release``: the initial attempt's script
in flight, the wake-up subscription waiting for Redis's confirmation, the wait for a
wake-up, a re-attempt in flight after a wake-up, the release in flight, and an
``async with`` body. "In flight" is held there by the fault proxy's ``stall()``; the
test knows the task reached that await from a hook on the lock's attempts (no sleep
guesses). Afterwards it checks the lock's key and fair queue in Redis, the listener's
tables and the Context's background work.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from typing import Any

import pytest
import redis

import flexisync
import flexisync.aio
from flexisync._core.locks import runtime
from flexisync._core.plan import run
from flexisync.aio.locks import AsyncLock
from tests.aio_helpers import AttemptHook, cancel, connect_aio, scripts_run, settle
from tests.faults import FaultProxy
from tests.helpers import join_all


def _keys(aio: flexisync.aio.AsyncCoordinator, name: str) -> tuple[str, str]:
    keys = aio._ctx.keys
    return keys.key("lock", name), keys.key("lock", name, "queue")


async def _assert_nothing_held(aio: flexisync.aio.AsyncCoordinator, direct: redis.Redis,
                               name: str, lock: AsyncLock, handlers: int = 0) -> None:
    await settle(aio)
    lease, queue = _keys(aio, name)
    assert direct.exists(lease) == 0, "a lease nobody holds was left behind"
    assert direct.zcard(queue) == 0, "a cancelled waiter stayed in the fair queue"
    assert lock.fencing_token is None
    sizes = aio._ctx.listener.table_sizes()
    assert sizes["handlers"] == handlers, sizes
    assert sizes["waiting"] == 0, sizes
    assert not runtime(aio._ctx).waits, "a wake-up registration was left behind"


async def _warm_scripts(aio: flexisync.aio.AsyncCoordinator, fair: bool) -> None:
    """Load lock_acquire (asyncio client) and lock_abandon (the janitor's blocking
    client) so that each later run is exactly one EVALSHA."""
    warm = aio.lock("warm", ttl=5, fair=fair)
    assert await warm.acquire(blocking=False)
    await warm.release()
    run(aio._ctx, warm._abandon("0:warm"))


async def _assert_free(aio: flexisync.aio.AsyncCoordinator, name: str, fair: bool) -> None:
    """Anyone can take the lock at once: it was not left to a cancelled waiter."""
    other = aio.lock(name, ttl=30, fair=fair)
    assert await other.acquire(blocking=False), "the lock is not free after the cancel"
    await other.release()


def _fair_ids(fair: bool) -> str:
    return "fair" if fair else "plain"


@pytest.mark.parametrize("fair", [False, True], ids=_fair_ids)
async def test_cancelled_while_the_first_attempt_is_in_flight(
        proxy: FaultProxy, direct: redis.Redis, namespace: str, fair: bool) -> None:
    """The acquire script is held by a stalled network when the task is cancelled: the
    command lands after the cancellation, yet no lease is left (undo by token, and the
    tombstone makes the late command set nothing)."""
    async with connect_aio(proxy.url(), namespace) as aio:
        await _warm_scripts(aio, fair)
        scripts = scripts_run(direct)
        lock = aio.lock("first", ttl=30, fair=fair)
        hook = AttemptHook(lock, before={1: proxy.stall})
        task = asyncio.ensure_future(lock.acquire(timeout=20))
        await asyncio.wait_for(hook.reached.wait(), 10)
        await asyncio.sleep(0)  # the script is sent and its reply awaited
        await cancel(task)
        proxy.resume()
        await _assert_nothing_held(aio, direct, "first", lock)
        # Both the cancelled attempt (late) and its undo reached the server.
        assert scripts_run(direct) - scripts == 2
        await _assert_free(aio, "first", fair)


@pytest.mark.parametrize("fair", [False, True], ids=_fair_ids)
async def test_cancelled_while_subscribing_for_wakeups(
        proxy: FaultProxy, direct: redis.Redis, namespace: str, fair: bool) -> None:
    """Cancelled while Redis has not yet confirmed the wake-up subscription (stalled):
    the handler is removed, the fair queue entry goes (janitor), nothing is held."""
    async with connect_aio(proxy.url(), namespace) as aio:
        holder = aio.lock("sub", ttl=30, fair=fair)
        assert await holder.acquire()
        warm = await aio._ctx.listener.subscribe_async(("channel", "warm"),
                                                      lambda *_: None)  # listener up
        lock = aio.lock("sub", ttl=30, fair=fair)
        # Stalled right after the first attempt: the SUBSCRIBE that follows it gets
        # no confirmation.
        hook = AttemptHook(lock, after={1: proxy.stall})
        task = asyncio.ensure_future(lock.acquire(timeout=20))
        await hook.until(1)
        assert aio._ctx.listener.table_sizes()["waiting"] == 1, "not subscribing"
        await cancel(task)
        proxy.resume()
        assert hook.results == [False]
        await _assert_nothing_held_but_holder(aio, direct, "sub", lock, fair)
        warm.close()
        await holder.release()


async def _assert_nothing_held_but_holder(aio: flexisync.aio.AsyncCoordinator,
                                          direct: redis.Redis, name: str, lock: AsyncLock,
                                          fair: bool) -> None:
    await settle(aio)
    _, queue = _keys(aio, name)
    assert direct.zcard(queue) == 0, "a cancelled waiter stayed in the fair queue"
    assert lock.fencing_token is None
    assert not runtime(aio._ctx).waits, "a wake-up registration was left behind"
    sizes = aio._ctx.listener.table_sizes()
    assert sizes["waiting"] == 0, sizes
    channel = aio._ctx.keys.object_channel("lock", name)
    assert not [k for k in aio._ctx.listener._handlers if k[1] == channel], \
        "the wake-up handler was left in the listener"


@pytest.mark.parametrize("fair", [False, True], ids=_fair_ids)
async def test_cancelled_while_waiting_for_a_wakeup(
        aio: flexisync.aio.AsyncCoordinator, raw: redis.Redis, fair: bool) -> None:
    """Cancelled asleep on a held lock: the wake-up handler goes at once, the queue
    entry goes, and the next release is not handed to the cancelled waiter."""
    holder = aio.lock("asleep", ttl=30, fair=fair)
    assert await holder.acquire()
    lock = aio.lock("asleep", ttl=30, fair=fair)
    hook = AttemptHook(lock)
    task = asyncio.ensure_future(lock.acquire(timeout=30))
    await hook.until(2)  # subscribed, final attempt failed: it waits now
    _, queue = _keys(aio, "asleep")
    assert raw.zcard(queue) == (1 if fair else 0)
    await cancel(task)
    await _assert_nothing_held_but_holder(aio, raw, "asleep", lock, fair)
    await holder.release()
    await _assert_free(aio, "asleep", fair)


@pytest.mark.parametrize("fair", [False, True], ids=_fair_ids)
async def test_cancelled_while_a_reattempt_after_a_wakeup_is_in_flight(
        proxy: FaultProxy, direct: redis.Redis, namespace: str, fair: bool) -> None:
    """Woken by the release, the waiter's re-attempt is held in flight and cancelled:
    no lease is left for the cancelled waiter, and the lock is free afterwards."""
    async with connect_aio(proxy.url(), namespace) as aio:
        await _warm_scripts(aio, fair)
        holder = aio.lock("again", ttl=30, fair=fair)
        assert await holder.acquire()
        lock = aio.lock("again", ttl=30, fair=fair)
        hook = AttemptHook(lock, before={3: proxy.stall})
        task = asyncio.ensure_future(lock.acquire(timeout=20))
        await hook.until(2)
        scripts = scripts_run(direct)
        hook.reached.clear()
        await holder.release()  # wakes the waiter, whose 3rd attempt stalls
        await asyncio.wait_for(hook.reached.wait(), 10)
        await asyncio.sleep(0)
        await cancel(task)
        proxy.resume()
        assert hook.results == [False, False]
        await _assert_nothing_held(aio, direct, "again", lock)
        # The release, the cancelled attempt (late) and its undo reached the server.
        assert scripts_run(direct) - scripts == 3
        await _assert_free(aio, "again", fair)


async def test_cancelled_release_still_releases(
        proxy: FaultProxy, direct: redis.Redis, namespace: str) -> None:
    """release() cancelled while its script is in flight: the AsyncLock holds nothing
    and the lease is released all the same (the janitor repeats it by token)."""
    async with connect_aio(proxy.url(), namespace) as aio:
        lock = aio.lock("rel", ttl=30, auto_renew=True)
        assert await lock.acquire()
        proxy.stall()
        task = asyncio.ensure_future(lock.release())
        await asyncio.sleep(0)  # the release script is sent; its reply cannot come
        await cancel(task)
        proxy.resume()
        await _assert_nothing_held(aio, direct, "rel", lock)
        assert not lock.lost
        assert not runtime(aio._ctx).renewing, "the watchdog still renews a released lock"
        with pytest.raises(flexisync.LockNotOwnedError):
            await lock.release()


async def test_cancelled_async_with_body_releases_the_lock(
        aio: flexisync.aio.AsyncCoordinator, raw: redis.Redis) -> None:
    """A task cancelled inside `async with lock:` releases the lock on the way out."""
    entered = asyncio.Event()

    async def body() -> None:
        async with aio.lock("cm", ttl=30, timeout=5):
            entered.set()
            await asyncio.Event().wait()

    task = asyncio.ensure_future(body())
    await asyncio.wait_for(entered.wait(), 10)
    await cancel(task)
    assert raw.exists(_keys(aio, "cm")[0]) == 0


async def test_wait_for_with_tiny_timeouts_never_leaves_a_lease(
        aio: flexisync.aio.AsyncCoordinator, raw: redis.Redis) -> None:
    """asyncio.wait_for(acquire(), tiny) cancelled wherever it happens to be, 50 times:
    afterwards nothing is held, queued or registered."""
    lease, queue = _keys(aio, "tiny")
    holder = aio.lock("tiny", ttl=30, fair=True)
    for i in range(50):
        lock = aio.lock("tiny", ttl=30, fair=True)
        if i % 2:
            assert await holder.acquire()
        try:
            await asyncio.wait_for(lock.acquire(), 0.0002 * (i % 10))
        except asyncio.TimeoutError:
            pass
        else:
            await lock.release()
        if i % 2:
            await holder.release()
        await settle(aio)
        assert raw.exists(lease) == 0, f"a lease was left (round {i})"
        assert raw.zcard(queue) == 0, f"a queue entry was left (round {i})"
        assert not runtime(aio._ctx).waits
    assert aio._ctx.listener.table_sizes()["waiting"] == 0


# --- handoff across processes -----------------------------------------------------------


def _sync_holder(url: str, namespace: str, name: str, held: Any, go: Any) -> None:
    """Hold ``name`` with the blocking shell until ``go`` is set, then release."""
    with flexisync.connect(url, namespace=namespace) as sync:
        lock = sync.lock(name, ttl=60)
        assert lock.acquire(timeout=10)
        held.set()
        assert go.wait(60)
        lock.release()


@pytest.mark.parametrize("start", ["fork", "spawn"])
async def test_async_waiter_is_woken_by_a_sync_release_in_another_process(
        aio: flexisync.aio.AsyncCoordinator, flexisync_url: str, namespace: str,
        start: str) -> None:
    """A blocking holder in another process releases; the asyncio waiter here gets the
    lock on the release's wake-up: 3 attempts, long before its 5 s safety re-check
    (the holder's ttl is 60 s), and with a larger fencing token."""
    mp = multiprocessing.get_context(start)
    held, go = mp.Event(), mp.Event()
    worker = mp.Process(target=_sync_holder, args=(flexisync_url, namespace, "handoff",
                                                   held, go))
    worker.start()
    try:
        assert await asyncio.to_thread(held.wait, 30), "the holder never acquired"
        lock = aio.lock("handoff", ttl=30)
        hook = AttemptHook(lock)
        task = asyncio.ensure_future(lock.acquire(timeout=30))
        await hook.until(2)
        released = time.monotonic()
        go.set()
        assert await asyncio.wait_for(task, 30)
        assert time.monotonic() - released < 4.0, "woken by the re-check, not the release"
        assert hook.results == [False, False, True]
        assert lock.fencing_token is not None
        await lock.release()
    finally:
        go.set()
        await asyncio.to_thread(join_all, [worker], 30)


@pytest.mark.parametrize("fair", [False, True], ids=_fair_ids)
def test_an_acquire_that_lands_after_its_undo_sets_nothing(
        sync: flexisync.Coordinator, raw: redis.Redis, fair: bool) -> None:
    """The undo of a cancelled acquire may reach Redis before the acquire command
    itself (another connection): the undo's tombstone makes the late command set no
    lease and join no queue, while other tokens acquire as usual."""
    lock = sync.lock("late", ttl=30, fair=fair)
    owner = "feedbeef:host:1"
    run(sync._ctx, lock._abandon(owner, True))
    args: list[Any] = [owner, 30_000, 60_000] + (["1", 3000] if fair else [])
    reply = sync._ctx.backend.run_script("t", "lock_acquire", lock._acquire_keys(owner), args)
    assert int(reply[0]) == 0
    lease, queue = sync._ctx.keys.key("lock", "late"), sync._ctx.keys.key("lock", "late", "queue")
    assert raw.exists(lease) == 0, "the late acquire set a lease nobody holds"
    assert raw.zcard(queue) == 0, "the late acquire queued a waiter that is gone"
    assert lock.acquire(blocking=False)
    lock.release()
