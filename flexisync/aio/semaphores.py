"""``AsyncSemaphore``: :class:`flexisync.semaphores.Semaphore` for asyncio.

The same keys, Lua scripts, FIFO queue, wake-ups and errors as the blocking semaphore
(the logic is :class:`flexisync._core.semaphores.SemaphoreCore`, shared by both); every
I/O method is a coroutine, and ``async with sem:`` acquires and releases. One object may
be shared by many tasks: each ``acquire`` takes one slot, and ``release`` gives back the
most recent slot the calling task took through the object (else the object's most
recent slot: ``await asyncio.wait_for(sem.acquire(), 5)`` then ``await sem.release()``
works although ``wait_for`` ran the acquire in a task of its own).

Cancellation leaves no slot held by nobody:

* ``acquire`` cancelled while its command may be in flight: the attempt is undone by
  token on the Context's janitor thread (the slot dropped if it was taken, a marker
  left so that a command still in flight takes nothing); cancelled while waiting: its
  wake-up handler is dropped at once and it leaves the queue (janitor).
* ``release`` cancelled: the object no longer holds the slot and the slot is still
  given back (the janitor repeats the release by token, which is idempotent).
* ``extend``, ``info`` cancelled: nothing to undo.
* ``async with`` whose body is cancelled: the slot is released on the way out.
"""

from __future__ import annotations

from types import TracebackType

from flexisync._core.plan import arun
from flexisync._core.semaphores import SemaphoreCore, SemaphoreInfo
from flexisync._durations import Duration

__all__ = ["AsyncSemaphore", "SemaphoreInfo"]


class AsyncSemaphore(SemaphoreCore):
    """A fleet-wide semaphore for asyncio; as :class:`flexisync.semaphores.Semaphore`.

    Build it with ``coordinator.semaphore(name, limit, ...)`` (no I/O) on an
    :class:`~flexisync.aio.AsyncCoordinator`. Each ``acquire`` takes one slot,
    ``release`` gives back the calling task's most recent slot (else the object's).
    """

    async def acquire(self, blocking: bool = True, timeout: Duration | None = None) -> bool:
        """Take one slot; as :meth:`Semaphore.acquire`."""
        return await arun(self._ctx, self._acquire_plan(blocking, timeout))

    async def release(self) -> None:
        """Give back one slot; as :meth:`Semaphore.release`.

        Cancelled, the slot is given back all the same (in the background)."""
        await arun(self._ctx, self._release_plan())

    async def extend(self, lease: Duration | None = None) -> None:
        """Reset the lease of the slot ``release`` would give back; as
        :meth:`Semaphore.extend`."""
        await arun(self._ctx, self._extend_plan(lease))

    async def info(self) -> SemaphoreInfo:
        """Live holders and waiters fleet-wide right now (one round trip)."""
        return await arun(self._ctx, self._info_plan())

    async def __aenter__(self) -> AsyncSemaphore:
        """Take a slot, waiting up to the semaphore's ``timeout``.

        Raises:
            SemaphoreTimeout: no slot within ``timeout`` seconds.
        """
        await arun(self._ctx, self._enter_plan())
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        """Release; as ``Semaphore.__exit__`` (an exception from the block is never
        masked)."""
        await arun(self._ctx, self._exit_plan(exc))
