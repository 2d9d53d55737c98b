"""``Semaphore``: at most ``limit`` holders across the whole fleet, with leases.

The blocking shell: every method runs a plan of :mod:`flexisync._core.semaphores`
(where the design is described) with blocking I/O.
``flexisync.aio.semaphores.AsyncSemaphore`` runs the same plans with ``await``.
"""

from __future__ import annotations

from types import TracebackType

from flexisync._core.plan import run
from flexisync._core.semaphores import SemaphoreCore, SemaphoreInfo
from flexisync._durations import Duration

__all__ = ["Semaphore", "SemaphoreInfo"]


class Semaphore(SemaphoreCore):
    """A semaphore shared by every process that uses the same name.

    Build it with ``coordinator.semaphore(name, limit, lease=..., timeout=...)`` (no
    I/O). At most ``limit`` slots are held at once, fleet-wide; each slot has a lease
    of ``lease`` seconds, so a holder that dies frees its slot after that long. Waiters
    are served in arrival order and woken by a release (no polling).

    One object may be shared by many threads: each ``acquire`` (or ``with``) takes one
    slot, and ``release`` gives back the most recent slot the calling thread took
    through this object or, if it took none, the most recent slot the object holds (so
    a slot may be released by another thread than the one that took it).

    Attributes:
        name, limit, lease, timeout: as ``Coordinator.semaphore``. Every user of a name
            must agree on ``limit``.
    """

    def acquire(self, blocking: bool = True, timeout: Duration | None = None) -> bool:
        """Take one slot; True when taken.

        Args:
            blocking: False makes exactly one attempt (one round trip); it does not
                jump the queue: a free slot goes to earlier waiters first.
            timeout: seconds to wait at most (0: one attempt). ``None`` uses the
                semaphore's ``timeout``; when that is ``None`` too, waits forever.

        Returns:
            True when a slot was taken, False when the wait timed out or,
            non-blocking, no slot was free.

        Raises:
            ConfigError: ``timeout`` is negative or not a number, or given together
                with ``blocking=False``.
            BackendUnavailable: Redis could not be reached in time, or the Coordinator
                was closed; no slot is held (one an unanswered command may have taken
                was given back, or lapses within ``lease``).
            BackendError: Redis rejected the script; nothing is held.
        """
        return run(self._ctx, self._acquire_plan(blocking, timeout))

    def release(self) -> None:
        """Give back one slot and wake the next waiter (one round trip): the most recent
        slot the calling thread took through this object, else the object's most recent
        slot. Afterwards this object no longer holds that slot.

        Raises:
            SemaphoreNotHeldError: this object holds no slot, or the slot's lease had run
                out (it may have gone to another holder).
            BackendUnavailable: Redis could not be told; the slot lapses within
                ``lease``.
        """
        run(self._ctx, self._release_plan())

    def extend(self, lease: Duration | None = None) -> None:
        """Reset the lease of the slot :meth:`release` would give back to ``lease``
        seconds from now (default: the semaphore's ``lease``).

        Raises:
            ConfigError: ``lease`` is not a positive number of seconds.
            SemaphoreNotHeldError: no slot held here, or its lease had already run out.
        """
        run(self._ctx, self._extend_plan(lease))

    def info(self) -> SemaphoreInfo:
        """Live holders and waiters fleet-wide right now (one round trip)."""
        return run(self._ctx, self._info_plan())

    def __enter__(self) -> Semaphore:
        """Take a slot, waiting up to the semaphore's ``timeout``.

        Raises:
            SemaphoreTimeout: no slot within ``timeout`` seconds.
        """
        run(self._ctx, self._enter_plan())
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        """Release. A lease that ran out inside the block raises ``SemaphoreLostError``,
        unless the block itself raised (that exception is never masked)."""
        run(self._ctx, self._exit_plan(exc))
