"""``AsyncRateLimiter``: :class:`flexisync.rate_limiter.RateLimiter` for asyncio.

The same key, Lua scripts, arithmetic and errors as the blocking limiter (the logic is
:class:`flexisync._core.rate_limiter.RateLimiterCore`, shared by both); every I/O method
is a coroutine. A waiting ``acquire`` sleeps with ``asyncio.sleep`` for exactly the wait
the server named.

Cancellation gives back what it took: an ``acquire`` cancelled while its script may be
in flight, or while sleeping until its admission, has its reservation returned on the
Context's janitor thread (and a script still in flight reserves nothing). A cancelled
``settle`` may or may not have applied (it is not resent).
"""

from __future__ import annotations

from flexisync._core.plan import arun
from flexisync._core.rate_limiter import RateLimiterCore, RateLimitTimeout, ReservationCore
from flexisync._durations import Duration

__all__ = ["AsyncRateLimiter", "AsyncReservation", "RateLimitTimeout"]


class AsyncReservation(ReservationCore):
    """One admission by an :class:`AsyncRateLimiter`; attributes as
    :class:`flexisync.rate_limiter.Reservation`."""

    async def settle(self, actual: float) -> float:
        """Correct the charge to ``actual`` units; as
        :meth:`flexisync.rate_limiter.Reservation.settle`."""
        return await arun(self._limiter._ctx, self._settle_plan(actual))


class AsyncRateLimiter(RateLimiterCore):
    """A rate limiter shared by every process that uses the same name; for asyncio.

    Build it with ``coordinator.rate_limiter(name, rate, ...)`` on an
    :class:`~flexisync.aio.AsyncCoordinator`. Each method behaves, and raises, as the
    method of the same name of :class:`flexisync.rate_limiter.RateLimiter`.
    """

    _reservation_cls = AsyncReservation

    async def acquire(self, cost: float = 1.0, *, timeout: Duration | None = None,
                      ) -> AsyncReservation:
        """Wait until ``cost`` units are admitted; as
        :meth:`flexisync.rate_limiter.RateLimiter.acquire`."""
        reservation = await arun(self._ctx, self._acquire_plan(cost, timeout))
        assert isinstance(reservation, AsyncReservation)
        return reservation

    async def try_acquire(self, cost: float = 1.0) -> AsyncReservation | None:
        """Admit ``cost`` units now or return ``None``; as
        :meth:`flexisync.rate_limiter.RateLimiter.try_acquire`."""
        reservation = await arun(self._ctx, self._try_acquire_plan(cost))
        assert reservation is None or isinstance(reservation, AsyncReservation)
        return reservation
