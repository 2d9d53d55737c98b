"""``AsyncLock``: :class:`flexisync.Lock` for asyncio.

The same keys, Lua scripts, fencing tokens, wake-ups and errors as the blocking lock
(the logic is :class:`flexisync._core.locks.LockCore`, shared by both); every I/O method
is a coroutine, and ``async with sync.lock("x", ttl=10, timeout=5) as held:`` acquires
and releases. A waiter is woken by the release through the process's one listener (no
polling); auto-renewal runs on the same watchdog thread as the blocking locks', and
``on_lost(lock)`` is called on a thread of its own.

Cancellation leaves nothing held by nobody:

* ``acquire`` cancelled while its command may be in flight: the attempt is undone by
  token on the Context's janitor thread (the lease dropped if it was set, a tombstone
  left so that a command still in flight sets nothing when it lands); cancelled while
  waiting: its wake-up handler is dropped at once and, in fair mode, it leaves the
  queue (janitor). Either way the AsyncLock holds nothing afterwards.
* ``release`` cancelled: the AsyncLock holds nothing afterwards and the lease is still
  released (the janitor repeats the release by token, which is idempotent).
* ``extend``, ``locked``, ``owned`` cancelled: nothing to undo.
* ``async with`` whose body is cancelled: the lock is released on the way out.
* ``replicas=N``: as the blocking lock, the acquire and ``WAIT`` share one connection
  (the event loop's); cancelled while ``WAIT`` runs, the acquire is undone by token.
"""

from __future__ import annotations

from types import TracebackType
from typing import TYPE_CHECKING

from flexisync._core.locks import LockCore, LockInfo, list_locks_plan
from flexisync._core.plan import arun
from flexisync._durations import Duration

if TYPE_CHECKING:
    from flexisync.aio.coordinator import AsyncCoordinator

__all__ = ["AsyncLock", "LockInfo", "list_locks"]


class AsyncLock(LockCore):
    """A distributed lock shared by every process that uses the same name; for asyncio.

    Build it with ``coordinator.lock(name, ttl=..., ...)`` (no I/O) on an
    :class:`~flexisync.aio.AsyncCoordinator`. Each method behaves, and raises, as the
    method of the same name of :class:`flexisync.Lock`. An AsyncLock holds at most one
    acquisition at a time and is not reentrant; give each task its own.
    """

    async def acquire(self, blocking: bool = True, timeout: Duration | None = None) -> bool:
        """Take the lock; True when this AsyncLock now holds it. As
        :meth:`flexisync.Lock.acquire` (same arguments, bounds and errors)."""
        return await arun(self._ctx, self._acquire_plan(blocking, timeout))

    async def release(self) -> None:
        """Give the lock up and wake the next waiter; as :meth:`flexisync.Lock.release`.

        Cancelled, the lease is released all the same (in the background)."""
        await arun(self._ctx, self._release_plan())

    async def extend(self, ttl: Duration | None = None) -> None:
        """Reset the lease to ``ttl`` seconds from now; as :meth:`flexisync.Lock.extend`."""
        await arun(self._ctx, self._extend_plan(ttl))

    async def locked(self) -> bool:
        """True when any process holds the lock right now (one round trip)."""
        return await arun(self._ctx, self._locked_plan())

    async def owned(self) -> bool:
        """True when this AsyncLock holds the lock, as Redis sees it now."""
        return await arun(self._ctx, self._owned_plan())

    async def ensure_held(self) -> None:
        """Raise unless this AsyncLock still holds its lease (no round trip); as
        :meth:`flexisync.Lock.ensure_held`."""
        self._check_held()

    async def __aenter__(self) -> AsyncLock:
        """Acquire, waiting up to the lock's ``timeout``.

        Raises:
            LockTimeout: not acquired within ``timeout`` seconds.
        """
        await arun(self._ctx, self._enter_plan())
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        """Release; as ``Lock.__exit__`` (an exception from the block is never masked)."""
        await arun(self._ctx, self._exit_plan(exc))


async def list_locks(coordinator: AsyncCoordinator) -> list[LockInfo]:
    """Every lock currently held in ``coordinator``'s namespace, sorted by name; as
    :func:`flexisync.locks.list_locks`."""
    return await arun(coordinator._ctx, list_locks_plan(coordinator._ctx))
