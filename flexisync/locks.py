"""``Lock``: a distributed lock with a lease, fencing tokens and push wake-ups.

The blocking shell: every method runs a plan of :mod:`flexisync._core.locks` (where the
whole design is described) with blocking I/O. ``flexisync.aio.locks.AsyncLock`` runs
the same plans with ``await``.
"""

from __future__ import annotations

from types import TracebackType
from typing import TYPE_CHECKING

from flexisync._core.locks import LockCore, LockInfo, list_locks_plan
from flexisync._core.plan import run
from flexisync._durations import Duration

if TYPE_CHECKING:
    from flexisync.coordinator import Coordinator

__all__ = ["Lock", "LockInfo", "list_locks"]


class Lock(LockCore):
    """A distributed lock shared by every process that uses the same name.

    Build it with ``coordinator.lock(name, ttl=..., ...)``. A ``Lock`` object holds at
    most one acquisition at a time and is not reentrant; give each thread its own
    ``Lock`` object (they are cheap) for the same name.

    Attributes:
        name: the lock's name.
        ttl: the lease in seconds: a holder that neither releases nor renews loses the
            lock after this long.
        timeout: default seconds :meth:`acquire` and ``with`` wait; ``None`` waits
            forever.
        auto_renew: renew the lease at ttl/3 while held (one watchdog thread per
            process and connection settings).
        fair: serve waiters in arrival order. Every user of a name must agree on it.
        on_lost: called as ``on_lost(lock)`` (on a thread of its own) when a held lease
            is found to be gone.
        replicas: confirm each acquire on this many replicas (``WAIT``, on the
            connection that ran it) before returning; 0 (the default) does not wait.
            Replication stays asynchronous: this keeps a lease across a failover that
            promotes a confirming replica, nothing more (see docs/deploying.md).
        replicas_timeout: seconds ``WAIT`` waits for the replicas (> 0, and at least
            0.25 s less than the retry policy's deadline).
    """

    def acquire(self, blocking: bool = True, timeout: Duration | None = None) -> bool:
        """Take the lock; returns True when this Lock now holds it.

        ``timeout`` bounds the wall time of the whole call, Redis round trips and
        socket waits included, give or take one last bounded round trip: the final
        attempt and a clean-up after a fault or a timeout may each overrun it by
        ``GRACE`` (0.25 s). Without a timeout (or with 0), each round trip is bounded
        by the retry policy's ``deadline``.

        Args:
            blocking: False makes exactly one attempt (one round trip).
            timeout: seconds to wait at most (0: one attempt). ``None`` uses the Lock's
                ``timeout``; when that is ``None`` too, waits forever.

        Returns:
            True when acquired (``fencing_token`` is then set), False when the wait
            timed out or, non-blocking, the lock was held.

        Raises:
            ConfigError: ``timeout`` is negative or not a number, or given together
                with ``blocking=False`` (checked before Redis is touched).
            LockError: this Lock object already holds the lock (not reentrant); or,
                with ``replicas=N``, the lock was taken but fewer than N replicas
                confirmed it within ``replicas_timeout`` (it was released again).
            BackendUnavailable: Redis could not be reached in time, or the Coordinator
                was closed; the lock is not held, and a lease a lost reply may have
                left behind was dropped (or, if Redis stays unreachable, lapses within
                ``ttl``).
            BackendError: Redis rejected the script (e.g. a foreign value in the
                lock's keys); nothing is held.
        """
        return run(self._ctx, self._acquire_plan(blocking, timeout))

    def release(self) -> None:
        """Give the lock up and wake the next waiter (one round trip).

        Whatever the outcome, this Lock no longer holds the lock afterwards; if Redis
        could not be told, the lease lapses by itself after at most ``ttl``. A release
        retried after a lost reply reports the release that happened. Bounded by the
        retry policy's ``deadline``.

        Raises:
            LockNotOwnedError: this Lock does not hold the lock: never acquired,
                already released, inherited across fork(), or its lease lapsed (the
                message says which, and whether another holder has it now).
            BackendUnavailable: Redis could not be reached (the lease lapses by itself).
        """
        run(self._ctx, self._release_plan())

    def extend(self, ttl: Duration | None = None) -> None:
        """Reset the lease to ``ttl`` seconds from now (one round trip, idempotent).

        Args:
            ttl: the new lease; ``None`` uses the Lock's ``ttl``. Later auto-renewals
                use it too.

        Raises:
            ConfigError: ``ttl`` <= 0 (before Redis is touched).
            LockNotOwnedError: this Lock does not hold the lock, or its lease lapsed
                (then it is also marked ``lost``).
            BackendUnavailable: Redis could not be reached.
        """
        run(self._ctx, self._extend_plan(ttl))

    def locked(self) -> bool:
        """True when any process holds the lock right now (one round trip).

        Raises:
            BackendUnavailable: Redis could not be reached.
        """
        return run(self._ctx, self._locked_plan())

    def owned(self) -> bool:
        """True when this Lock holds the lock, as Redis sees it now.

        No round trip when this Lock never acquired (or released) it; otherwise one GET.
        Finding the lease gone marks the lock ``lost``.

        Raises:
            BackendUnavailable: Redis could not be reached.
        """
        return run(self._ctx, self._owned_plan())

    def ensure_held(self) -> None:
        """Raise unless this Lock still holds its lease; a cheap local check.

        Call it right before a critical write. It costs no round trip: it trusts the
        local lease deadline (acquire/renewal time + ttl) and what renewals found; the
        resource should still check :attr:`fencing_token`.

        Raises:
            LockLostError: the lease is gone or may have lapsed.
            LockNotOwnedError: this Lock never acquired the lock (or released it).
        """
        self._check_held()

    def __enter__(self) -> Lock:
        """Acquire, waiting up to the Lock's ``timeout``.

        Raises:
            LockTimeout: not acquired within ``timeout`` seconds.
        """
        run(self._ctx, self._enter_plan())
        return self

    def __exit__(self, exc_type: type[BaseException] | None,
                 exc: BaseException | None, tb: TracebackType | None) -> None:
        """Release. A lease that lapsed inside the block raises ``LockLostError``
        (chained to the explanation) unless the block itself raised, which is never
        masked."""
        run(self._ctx, self._exit_plan(exc))


def list_locks(coordinator: Coordinator) -> list[LockInfo]:
    """Every lock currently held in ``coordinator``'s namespace, sorted by name.

    Uses SCAN (never KEYS) and one pipelined round trip per batch of leases.

    Raises:
        BackendUnavailable: Redis could not be reached.
    """
    return run(coordinator._ctx, list_locks_plan(coordinator._ctx))
