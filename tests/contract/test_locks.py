"""Contract: the distributed lock, in every shell (sync, asyncio; Redis, memory://)."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import pytest

import flexisync
from flexisync._core.locks import runtime
from flexisync.aio.locks import list_locks as alist
from flexisync.locks import list_locks
from tests.contract.conftest import Shell


def _list_locks(shell: Shell) -> Any:
    if shell.is_async:
        return alist(shell.coordinator)
    return list_locks(shell.coordinator)


async def _subscribed_waiters(shell: Shell, count: int) -> None:
    """Until ``count`` acquire calls wait with a confirmed wake-up subscription."""
    waits = runtime(shell.coordinator._ctx).waits
    for _ in range(1000):
        if sum(w.registration is not None for w in list(waits)) >= count:
            return
        await asyncio.sleep(0.005)
    pytest.fail(f"{count} waiter(s) never subscribed")


async def test_acquire_release_and_inspection(shell: Shell) -> None:
    """acquire holds the lock (locked/owned agree), others cannot take it, release frees it."""
    lock = shell.coordinator.lock("job", ttl=5.0)
    assert not await shell(lock.locked())
    assert not await shell(lock.owned())
    assert lock.fencing_token is None
    assert await shell(lock.acquire()) is True
    assert await shell(lock.locked())
    assert await shell(lock.owned())
    await shell(lock.ensure_held())
    other = shell.coordinator.lock("job", ttl=5.0)
    assert await shell(other.acquire(blocking=False)) is False
    assert not await shell(other.owned())
    await shell(lock.release())
    assert not await shell(lock.locked())
    assert lock.fencing_token is None
    assert await shell(other.acquire(blocking=False)) is True
    await shell(other.release())


async def test_acquire_times_out_while_another_holds_it(shell: Shell) -> None:
    """A held lock: acquire(timeout) returns False, timeout=0 makes one attempt."""
    holder = shell.coordinator.lock("busy", ttl=30)
    assert await shell(holder.acquire())
    waiter = shell.coordinator.lock("busy", ttl=30)
    assert await shell(waiter.acquire(timeout=0.2)) is False
    assert await shell(waiter.acquire(timeout=0)) is False
    assert waiter.fencing_token is None
    await shell(holder.release())
    assert await shell(waiter.acquire(timeout=0))
    await shell(waiter.release())


async def test_fencing_tokens_strictly_increase(shell: Shell) -> None:
    """Every acquisition of a name gets a larger fencing token, whatever the object."""
    tokens = []
    for _ in range(4):
        lock = shell.coordinator.lock("fenced", ttl=5.0)
        assert await shell(lock.acquire())
        tokens.append(lock.fencing_token)
        await shell(lock.release())
    assert all(isinstance(t, int) for t in tokens)
    assert tokens == sorted(set(tokens)), tokens


async def test_extend_and_release_of_what_is_not_held(shell: Shell) -> None:
    """extend resets the lease; release/extend/ensure_held of an unheld lock raise
    LockNotOwnedError; acquire is not reentrant."""
    lock = shell.coordinator.lock("ext", ttl=1.0)
    with pytest.raises(flexisync.LockNotOwnedError, match="never acquired"):
        await shell(lock.release())
    assert await shell(lock.acquire())
    await shell(lock.extend(30))
    infos = await shell(_list_locks(shell))
    assert [i.name for i in infos] == ["ext"]
    assert 20 < infos[0].ttl <= 30
    assert infos[0].fencing_token == lock.fencing_token
    with pytest.raises(flexisync.LockError, match="not reentrant"):
        await shell(lock.acquire(timeout=0))
    await shell(lock.release())
    for call in (lock.release, lock.extend, lock.ensure_held):
        with pytest.raises(flexisync.LockNotOwnedError):
            await shell(call())
    assert await shell(_list_locks(shell)) == []


async def test_waiter_is_woken_by_release(shell: Shell) -> None:
    """A waiter blocked in acquire gets the lock once the holder releases (and long
    before its 5 s safety re-check: the holder's ttl is 60 s)."""
    holder = shell.coordinator.lock("wake", ttl=60)
    assert await shell(holder.acquire())
    waiter = shell.coordinator.lock("wake", ttl=60)
    if shell.is_async:
        task = asyncio.ensure_future(waiter.acquire(timeout=30))
        await _subscribed_waiters(shell, 1)
        await holder.release()
        assert await asyncio.wait_for(task, 4.0)
    else:
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(None, lambda: waiter.acquire(timeout=30))
        await _subscribed_waiters(shell, 1)
        holder.release()
        assert await asyncio.wait_for(future, 4.0)
    assert waiter.fencing_token is not None
    assert holder.fencing_token is None
    await shell(waiter.release())


async def test_fair_lock_serves_waiters_in_arrival_order(shell: Shell) -> None:
    """fair=True: three waiters queued one after the other get the lock in that order."""
    holder = shell.coordinator.lock("fair", ttl=30, fair=True)
    assert await shell(holder.acquire())
    order: list[int] = []

    async def wait_then_hold(index: int) -> None:
        lock = shell.coordinator.lock("fair", ttl=30, fair=True)
        if shell.is_async:
            assert await lock.acquire(timeout=30)
            order.append(index)
            await lock.release()
        else:
            loop = asyncio.get_running_loop()
            assert await loop.run_in_executor(None, lambda: lock.acquire(timeout=30))
            order.append(index)
            lock.release()

    tasks = []
    for index in range(3):
        tasks.append(asyncio.ensure_future(wait_then_hold(index)))
        for _ in range(200):  # until this waiter is queued (list_locks counts waiters)
            infos = await shell(_list_locks(shell))
            if infos and infos[0].waiters == index + 1:
                break
            await asyncio.sleep(0.01)
        else:
            pytest.fail(f"waiter {index} never queued")
    await shell(holder.release())
    await asyncio.wait_for(asyncio.gather(*tasks), 30)
    assert order == [0, 1, 2]


async def test_context_manager_yields_the_lock_and_times_out(shell: Shell) -> None:
    """`with` / `async with` gives the lock object and releases it; a lock held
    elsewhere raises LockTimeout (a TimeoutError) naming the lock and the timeout."""
    if shell.is_async:
        async with shell.coordinator.lock("cm", ttl=5, timeout=1) as held:
            assert await held.owned()
            with pytest.raises(flexisync.LockTimeout) as info:
                async with shell.coordinator.lock("cm", ttl=5, timeout=0.2):
                    pytest.fail("entered a lock held by someone else")
    else:
        with shell.coordinator.lock("cm", ttl=5, timeout=1) as held:
            assert held.owned()
            with pytest.raises(flexisync.LockTimeout) as info, \
                    shell.coordinator.lock("cm", ttl=5, timeout=0.2):
                pytest.fail("entered a lock held by someone else")
    assert info.value.name == "cm"
    assert info.value.timeout == 0.2
    assert isinstance(info.value, TimeoutError)
    assert not await shell(held.locked())


async def test_with_block_exception_is_not_masked_and_the_lock_is_released(
        shell: Shell) -> None:
    """An exception from the block propagates and the lock is released."""
    lock = shell.coordinator.lock("cm-raise", ttl=5, timeout=1)

    async def body() -> None:
        if shell.is_async:
            async with lock:
                raise KeyError("from the block")
        else:
            with lock:
                raise KeyError("from the block")

    with pytest.raises(KeyError, match="from the block"):
        await body()
    assert not await shell(lock.locked())


async def test_lease_deleted_behind_the_holder_is_reported_lost(shell: Shell) -> None:
    """owned() that finds the lease gone marks the lock lost; ensure_held raises
    LockLostError; release explains the lapse."""
    lock = shell.coordinator.lock("gone", ttl=30)
    assert await shell(lock.acquire())
    intruder = shell.coordinator.lock("gone", ttl=30)
    key = shell.coordinator._ctx.keys.key("lock", "gone")
    if shell.is_async:
        await shell.coordinator._ctx.abackend.call("t", lambda c: c.delete(key))
    else:
        shell.coordinator._ctx.backend.call("t", lambda c: c.delete(key))
    assert await shell(intruder.acquire(blocking=False))
    assert not await shell(lock.owned())
    assert lock.lost
    with pytest.raises(flexisync.LockLostError):
        await shell(lock.ensure_held())
    with pytest.raises(flexisync.LockNotOwnedError, match="another holder"):
        await shell(lock.release())
    await shell(intruder.release())


@pytest.mark.parametrize("ttl", [0, -1, math.nan, math.inf, "5", None])
async def test_bad_ttl_raises_config_error_before_redis(shell: Shell, ttl: object) -> None:
    """A ttl that is not a positive finite number is a ConfigError (a ValueError)."""
    with pytest.raises(flexisync.ConfigError, match="ttl"):
        shell.coordinator.lock("x", ttl=ttl)


async def test_bad_names_and_timeouts_raise_config_error_before_redis(shell: Shell) -> None:
    """Bad names, negative timeouts, a timeout with blocking=False, extend(0) and a
    non-callable on_lost are ConfigErrors, raised before any I/O."""
    for name in ("", "has space", "x" * 201, "{brace}"):
        with pytest.raises(flexisync.ConfigError):
            shell.coordinator.lock(name)
    with pytest.raises(ValueError, match="timeout"):
        shell.coordinator.lock("x", timeout=-1)
    with pytest.raises(ValueError, match="on_lost"):
        shell.coordinator.lock("x", on_lost="not callable")
    lock = shell.coordinator.lock("x")
    with pytest.raises(ValueError, match="timeout"):
        await shell(lock.acquire(timeout=-0.1))
    with pytest.raises(ValueError, match="timeout"):
        await shell(lock.acquire(blocking=False, timeout=1))
    assert await shell(lock.acquire())
    with pytest.raises(ValueError, match="ttl"):
        await shell(lock.extend(0))
    await shell(lock.release())


async def test_watchdog_renews_and_reports_a_lost_lease(shell: Shell) -> None:
    """auto_renew: the one watchdog thread renews the lease, and a
    lease deleted behind the holder's back is reported once through on_lost(lock)."""
    calls: list[Any] = []
    lock = shell.coordinator.lock("renewed", ttl=0.6, auto_renew=True, on_lost=calls.append)
    assert await shell(lock.acquire())
    ctx = shell.coordinator._ctx
    key = ctx.keys.key("lock", "renewed")

    acquired_until = lock._lease_deadline
    for _ in range(1000):  # until a renewal moved the lease's end (Redis said "extended")
        if lock._lease_deadline > acquired_until:
            break
        await asyncio.sleep(0.005)
    else:
        pytest.fail("the watchdog never renewed the lease")
    assert await shell(lock.owned())
    ctx.backend.call("t", lambda c: c.delete(key))
    for _ in range(1000):
        if calls:
            break
        await asyncio.sleep(0.005)
    assert calls == [lock]
    assert lock.lost
    with pytest.raises(flexisync.LockLostError):
        await shell(lock.ensure_held())
