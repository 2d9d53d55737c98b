"""``RateLimiter``: a fleet-wide rate limiter for requests or tokens (GCRA, one key).

The blocking shell: every method runs a plan of :mod:`flexisync._core.rate_limiter`
(where the design is described) with blocking I/O.
``flexisync.aio.rate_limiter.AsyncRateLimiter`` runs the same plans with ``await``.
"""

from __future__ import annotations

from flexisync._core.plan import run
from flexisync._core.rate_limiter import RateLimiterCore, RateLimitTimeout, ReservationCore
from flexisync._durations import Duration

__all__ = ["RateLimitTimeout", "RateLimiter", "Reservation"]


class Reservation(ReservationCore):
    """One admission by a :class:`RateLimiter`.

    Attributes:
        name: the rate limiter's name.
        cost: the units currently charged (``settle`` changes it).
        waited: seconds ``acquire`` slept before admission (0: admitted at once).
        remaining: units the limiter could admit right after this one (a snapshot,
            e.g. for an ``X-RateLimit-Remaining`` header).
        admitted_at: server time of admission, seconds since the epoch.
    """

    def settle(self, actual: float) -> float:
        """Correct the charge to ``actual`` units (one round trip).

        Reserve an estimate before the call, settle with the usage the provider
        reports: an overrun is charged in full (later callers wait it off), unused
        capacity is given back (the limiter never goes above its burst). May be called
        again; each call corrects from the previous charge.

        Returns:
            The correction applied, in units (less than asked when capacity given back
            would have lifted the limiter above its burst).

        Raises:
            ConfigError: ``actual`` is negative or not a finite number.
            BackendUnavailable: Redis could not be reached; the charge is unchanged.
        """
        return run(self._limiter._ctx, self._settle_plan(actual))


class RateLimiter(RateLimiterCore):
    """A rate limiter shared by every process that uses the same name.

    Build it with ``coordinator.rate_limiter(name, rate, per=60.0, burst=None)`` (no
    I/O): at most ``rate`` units of cost per ``per`` seconds across the fleet, with up
    to ``burst`` units (default: ``rate``) admitted at once from a limiter that was idle.
    A unit is whatever the caller counts: requests (cost 1) or LLM tokens (cost = the
    estimated token count). The object is cheap and thread-safe; every decision is one
    Lua script on the server's clock, O(1) whatever the cost.

    Raises (at construction):
        ConfigError: ``rate``, ``per`` or ``burst`` is not a finite number > 0, or the
            name is invalid.
    """

    _reservation_cls = Reservation

    def acquire(self, cost: float = 1.0, *, timeout: Duration | None = None,
                ) -> Reservation:
        """Wait until ``cost`` units are admitted; the reservation.

        One round trip reserves the units and tells how long to wait; the call then
        sleeps exactly that long (no polling) and returns. Waiters are admitted in the
        order they asked.

        Args:
            cost: units to admit, > 0 and at most ``burst``.
            timeout: the longest wait accepted, seconds (0: admitted now or never);
                ``None`` waits as long as needed.

        Raises:
            ConfigError: ``cost`` <= 0 or above ``burst`` (it could never be
                admitted), or a bad ``timeout`` (before Redis is touched).
            RateLimitTimeout: admission would take longer than ``timeout``; raised at
                once, nothing reserved. Also a ``TimeoutError``.
            BackendUnavailable: Redis could not be reached; nothing stays reserved
                (a reservation a lost reply may have made is given back).
            BackendError: Redis rejected the script (foreign data in the key).
        """
        reservation = run(self._ctx, self._acquire_plan(cost, timeout))
        assert isinstance(reservation, Reservation)
        return reservation

    def try_acquire(self, cost: float = 1.0) -> Reservation | None:
        """Admit ``cost`` units now, or return ``None`` (nothing reserved); one round
        trip. Raises as :meth:`acquire` (never ``RateLimitTimeout``)."""
        reservation = run(self._ctx, self._try_acquire_plan(cost))
        assert reservation is None or isinstance(reservation, Reservation)
        return reservation
