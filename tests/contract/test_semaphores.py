"""Contract: the fleet-wide semaphore, in every shell (sync, asyncio; Redis, memory://)."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

import flexisync
from flexisync._core.lock_runtime import runtime
from tests.contract.conftest import Shell


async def _subscribed_waiters(shell: Shell, count: int) -> None:
    """Until ``count`` acquire calls wait with a confirmed wake-up subscription."""
    waits = runtime(shell.coordinator._ctx).waits
    for _ in range(2000):
        if sum(w.registration is not None for w in list(waits)) >= count:
            return
        await asyncio.sleep(0.005)
    pytest.fail(f"{count} waiter(s) never subscribed")


def _in_background(shell: Shell, sem: Any, order: list[int], index: int,
                   timeout: float = 30) -> Any:
    """Start ``sem.acquire(timeout)`` in a task (asyncio) or a thread (blocking); the
    result is awaited with ``_finish``. The acquirer appends ``index`` to ``order`` when
    it got its slot, then gives it back at once (waking the next waiter)."""
    if shell.is_async:
        async def go() -> bool:
            ok: bool = await sem.acquire(timeout=timeout)
            if ok:
                order.append(index)
                await sem.release()
            return ok
        return asyncio.ensure_future(go())
    result: dict[str, Any] = {}

    def go_thread() -> None:
        result["ok"] = sem.acquire(timeout=timeout)
        if result["ok"]:
            order.append(index)
            sem.release()
    thread = threading.Thread(target=go_thread, daemon=True)
    thread.start()
    return thread, result


async def _finish(shell: Shell, handle: Any) -> bool:
    if shell.is_async:
        return bool(await asyncio.wait_for(handle, 30))
    thread, result = handle
    await asyncio.to_thread(thread.join, 30)
    assert not thread.is_alive()
    return bool(result["ok"])


async def test_at_most_limit_slots_and_release_frees_one(shell: Shell) -> None:
    """limit 2: two acquire, the third cannot; info() counts them; a release frees one."""
    one = shell.coordinator.semaphore("pool", 2, lease=30)
    two = shell.coordinator.semaphore("pool", 2, lease=30)
    three = shell.coordinator.semaphore("pool", 2, lease=30)
    assert await shell(one.acquire()) is True
    assert await shell(two.acquire(blocking=False)) is True
    assert await shell(three.acquire(blocking=False)) is False
    assert await shell(three.acquire(timeout=0.2)) is False
    info = await shell(one.info())
    assert (info.holders, info.waiters, info.limit) == (2, 0, 2)
    assert one.held == 1
    assert three.held == 0
    await shell(one.release())
    assert one.held == 0
    assert await shell(three.acquire(blocking=False)) is True
    await shell(two.release())
    await shell(three.release())
    assert (await shell(one.info())).holders == 0


async def test_context_manager_takes_and_gives_back_a_slot(shell: Shell) -> None:
    """``with`` / ``async with`` hold one slot inside the block, none after; a full
    semaphore makes entering raise LockTimeout after the semaphore's timeout."""
    sem = shell.coordinator.semaphore("cm", 1, lease=30, timeout=0.2)
    other = shell.coordinator.semaphore("cm", 1, lease=30, timeout=0.2)
    if shell.is_async:
        async with sem as entered:
            assert entered is sem
            assert (await sem.info()).holders == 1
            with pytest.raises(flexisync.SemaphoreTimeout):
                async with other:
                    pass
    else:
        with sem as entered:
            assert entered is sem
            assert sem.info().holders == 1
            with pytest.raises(flexisync.SemaphoreTimeout), other:
                pass
    assert (await shell(sem.info())).holders == 0
    assert sem.held == 0


async def test_release_without_a_slot_raises(shell: Shell) -> None:
    """release()/extend() with no slot taken here raise LockNotOwnedError."""
    sem = shell.coordinator.semaphore("none", 3)
    with pytest.raises(flexisync.SemaphoreNotHeldError):
        await shell(sem.release())
    with pytest.raises(flexisync.SemaphoreNotHeldError):
        await shell(sem.extend())


async def test_release_wakes_a_waiter(shell: Shell) -> None:
    """A waiter blocked on a full semaphore gets the slot when the holder releases
    (the holder's lease is long: only the release can have woken it)."""
    holder = shell.coordinator.semaphore("wake", 1, lease=60)
    waiter = shell.coordinator.semaphore("wake", 1, lease=60)
    assert await shell(holder.acquire())
    order: list[int] = []
    handle = _in_background(shell, waiter, order, 1)
    await _subscribed_waiters(shell, 1)
    assert (await shell(holder.info())).waiters == 1
    await shell(holder.release())
    assert await _finish(shell, handle)
    assert order == [1]
    info = await shell(holder.info())
    assert (info.holders, info.waiters) == (0, 0)
    assert waiter.held == 0  # the background task/thread gave it back


async def test_waiters_are_served_in_arrival_order(shell: Shell) -> None:
    """Three waiters queue one after another behind a full semaphore (limit 1); each
    release hands the slot to the earliest one (each gives it back at once)."""
    holder = shell.coordinator.semaphore("fifo", 1, lease=60)
    assert await shell(holder.acquire())
    order: list[int] = []
    handles = []
    waiters = [shell.coordinator.semaphore("fifo", 1, lease=60) for _ in range(3)]
    for index, waiter in enumerate(waiters):
        handles.append(_in_background(shell, waiter, order, index))
        await _subscribed_waiters(shell, index + 1)
        for _ in range(2000):
            if (await shell(holder.info())).waiters == index + 1:
                break
            await asyncio.sleep(0.005)
    assert (await shell(holder.info())).waiters == 3
    await shell(holder.release())
    for handle in handles:
        assert await _finish(shell, handle)
    assert order == [0, 1, 2]
    info = await shell(holder.info())
    assert (info.holders, info.waiters) == (0, 0)


async def test_a_non_blocking_try_does_not_jump_the_queue(shell: Shell) -> None:
    """limit 1, one waiter queued: when the slot frees, a try_acquire from elsewhere
    finds it reserved for the waiter."""
    holder = shell.coordinator.semaphore("nojump", 1, lease=60)
    assert await shell(holder.acquire())
    waiter = shell.coordinator.semaphore("nojump", 1, lease=60)
    order: list[int] = []
    handle = _in_background(shell, waiter, order, 0)
    await _subscribed_waiters(shell, 1)
    for _ in range(2000):
        if (await shell(holder.info())).waiters == 1:
            break
        await asyncio.sleep(0.005)
    # Free the slot by deleting the holders directly, so no wake-up is published and
    # the waiter sleeps until its re-check: the slot is free but reserved.
    ctx = shell.coordinator._ctx
    ctx.backend.client.delete(ctx.keys.key("sem", "nojump"))
    intruder = shell.coordinator.semaphore("nojump", 1, lease=60)
    assert await shell(intruder.acquire(blocking=False)) is False
    assert await _finish(shell, handle)  # the waiter takes it at its re-check
    assert order == [0]


async def test_a_timed_out_waiter_leaves_the_queue(shell: Shell) -> None:
    """acquire(timeout) that runs out returns False and removes its queue entry."""
    holder = shell.coordinator.semaphore("leave", 1, lease=60)
    assert await shell(holder.acquire())
    waiter = shell.coordinator.semaphore("leave", 1, lease=60)
    assert await shell(waiter.acquire(timeout=0.3)) is False
    assert (await shell(holder.info())).waiters == 0
    assert not runtime(shell.coordinator._ctx).waits
    await shell(holder.release())


async def test_lease_lapse_frees_the_slot_and_release_reports_it(shell: Shell) -> None:
    """A slot whose lease ran out goes to the next taker; its release then raises
    LockNotOwnedError and leaving ``with`` raises LockLostError."""
    sem = shell.coordinator.semaphore("lapse", 1, lease=0.2)
    assert await shell(sem.acquire())
    other = shell.coordinator.semaphore("lapse", 1, lease=30)
    assert await shell(other.acquire(timeout=10)) is True  # after the 0.2 s lease
    with pytest.raises(flexisync.SemaphoreNotHeldError, match="lease"):
        await shell(sem.release())
    with pytest.raises(flexisync.SemaphoreNotHeldError):
        await shell(sem.extend())
    await shell(other.release())
    short = shell.coordinator.semaphore("lapse2", 1, lease=0.05)
    taker = shell.coordinator.semaphore("lapse2", 1, lease=30)

    async def lapse_inside() -> None:
        if shell.is_async:
            async with short:
                assert await taker.acquire(timeout=10)
        else:
            with short:
                assert taker.acquire(timeout=10)
    with pytest.raises(flexisync.SemaphoreLostError):
        await lapse_inside()
    await shell(taker.release())


async def test_extend_keeps_the_slot(shell: Shell) -> None:
    """extend() pushes the lease out: the slot outlives its original lease."""
    sem = shell.coordinator.semaphore("ext", 1, lease=0.3)
    assert await shell(sem.acquire())
    await shell(sem.extend(30))
    other = shell.coordinator.semaphore("ext", 1, lease=30)
    assert await shell(other.acquire(timeout=0.6)) is False
    await shell(sem.release())


async def test_one_object_shared_by_several_tasks_or_threads(shell: Shell) -> None:
    """One object, limit 2, used by 4 concurrent tasks/threads with ``with``: never more
    than 2 inside at once, and each releases its own slot."""
    sem = shell.coordinator.semaphore("shared", 2, lease=30, timeout=30)
    inside, peak = [0], [0]
    guard = threading.Lock()

    def enter() -> None:
        with guard:
            inside[0] += 1
            peak[0] = max(peak[0], inside[0])

    def leave() -> None:
        with guard:
            inside[0] -= 1

    if shell.is_async:
        async def task() -> None:
            for _ in range(3):
                async with sem:
                    enter()
                    await asyncio.sleep(0.01)
                    leave()
        await asyncio.wait_for(asyncio.gather(*(task() for _ in range(4))), 60)
    else:
        def worker() -> None:
            for _ in range(3):
                with sem:
                    enter()
                    threading.Event().wait(0.01)
                    leave()
        threads = [threading.Thread(target=worker) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            await asyncio.to_thread(thread.join, 60)
    assert peak[0] == 2
    assert (await shell(sem.info())).holders == 0


async def test_nested_acquire_takes_a_second_slot(shell: Shell) -> None:
    """Within one thread/task, a second acquire takes a second slot; releases give them
    back most recent first."""
    sem = shell.coordinator.semaphore("nested", 2, lease=30)
    assert await shell(sem.acquire())
    assert await shell(sem.acquire(blocking=False))
    assert sem.held == 2
    assert await shell(sem.acquire(blocking=False)) is False
    await shell(sem.release())
    await shell(sem.release())
    assert sem.held == 0
    assert (await shell(sem.info())).holders == 0


async def test_a_slot_taken_in_one_task_or_thread_is_released_in_another(
        shell: Shell) -> None:
    """acquire in another task (``asyncio.wait_for`` runs it in one) or thread, release
    here: the object's slot is given back; the calling context's own slot goes first."""
    sem = shell.coordinator.semaphore("across", 3, lease=30)
    if shell.is_async:
        assert await asyncio.wait_for(sem.acquire(), 10)
    else:
        assert await asyncio.to_thread(sem.acquire)
    assert sem.held == 1
    await shell(sem.release())
    assert sem.held == 0
    assert (await shell(sem.info())).holders == 0
    # Own slot first: a slot taken elsewhere with a short lease, one here with a long
    # one; the release here gives back its own (the short one then lapses: its release
    # reports it).
    short = shell.coordinator.semaphore("own", 3, lease=0.2)
    if shell.is_async:
        assert await asyncio.wait_for(short.acquire(), 10)
    else:
        assert await asyncio.to_thread(short.acquire)
    short.lease = 30.0
    assert await shell(short.acquire())
    await shell(short.release())  # ours (lease 30): no error
    assert short.held == 1
    for _ in range(400):
        if (await shell(short.info())).holders == 0:
            break
        await asyncio.sleep(0.01)
    with pytest.raises(flexisync.SemaphoreNotHeldError, match="lease"):
        await shell(short.release())  # the other one, lapsed
    assert short.held == 0


@pytest.mark.parametrize(("args", "kwargs", "match"), [
    (("x", 0), {}, "limit must be >= 1"),
    (("x", 1.5), {}, "limit must be an int"),
    (("x", True), {}, "limit must be an int"),
    (("x", 2), {"lease": 0}, "lease"),
    (("x", 2), {"lease": -1}, "lease"),
    (("x", 2), {"timeout": -1}, "timeout"),
    (("bad name", 2), {}, "semaphore name"),
    (("", 2), {}, "semaphore name"),
])
async def test_validation(shell: Shell, args: tuple[Any, ...], kwargs: dict[str, Any],
                          match: str) -> None:
    """Bad limits, leases, timeouts and names raise ConfigError naming the problem."""
    with pytest.raises(flexisync.ConfigError, match=match):
        shell.coordinator.semaphore(*args, **kwargs)


async def test_acquire_argument_errors(shell: Shell) -> None:
    """timeout with blocking=False, or a negative timeout: ConfigError, nothing taken."""
    sem = shell.coordinator.semaphore("args", 1)
    with pytest.raises(flexisync.ConfigError):
        await shell(sem.acquire(blocking=False, timeout=1))
    with pytest.raises(flexisync.ConfigError):
        await shell(sem.acquire(timeout=-1))
    assert (await shell(sem.info())).holders == 0
