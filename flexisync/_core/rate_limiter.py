"""The fleet-wide rate limiter written once, as plans: the logic both shells run.

:class:`RateLimiterCore` validates, builds keys and writes every operation as a plan
(:mod:`flexisync._core.plan`); ``flexisync.rate_limiter.RateLimiter`` runs the plans
with blocking I/O, ``flexisync.aio.rate_limiter.AsyncRateLimiter`` awaits them. How it
works:

* **GCRA.** The limiter's whole state is one key holding the *theoretical arrival time*
  (TAT, server microseconds): the moment the limiter is back to its full ``burst``. One
  unit of cost takes ``interval = per / rate`` seconds to refill; a request of ``cost``
  is admitted at ``max(now, TAT + cost * interval - burst * interval)`` and moves the
  TAT by ``cost * interval``. Every decision is one Lua script (``ratelimit_acquire``)
  on the server's clock (``TIME``), O(1) whatever the cost: 5,000 tokens cost what 1
  does. The key expires once the limiter is full again.
* **Waiting without polling.** ``acquire`` reserves its place in one round trip and the
  script answers how long to wait until the reservation is admitted; the caller sleeps
  exactly that long and proceeds. Reservations are served in arrival order, and one
  script call makes one admission (no retry loop). A wait longer than ``timeout`` is
  refused at once, reserving nothing (:class:`RateLimitTimeout`).
* **Reservations.** Each admission returns a reservation; ``settle(actual)`` corrects
  its cost afterwards (reserve the estimated tokens before an LLM call, settle with the
  usage the provider reports): an overrun is charged in full (later callers wait it
  off), unused capacity is given back (never above ``burst``).
* **Cancellation.** Each reservation leaves a short-lived marker keyed by a random
  token (its cost and admission time). An acquire cancelled while its script may be in
  flight, or while sleeping until its admission time (asyncio cancellation, or a
  KeyboardInterrupt in the blocking shell), is undone on the Context's janitor thread
  by ``ratelimit_adjust cancel``: the reserved cost is given back if the marker says
  it was reserved, and a tombstone makes a script still in flight reserve nothing. A
  script call whose outcome stays unknown (no reply in time) is undone the same way.
"""

from __future__ import annotations

import functools
import math
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

from flexisync._core.plan import Plan, Script, Sleep
from flexisync._core.tally import tally_of
from flexisync._durations import Duration, seconds, to_ms
from flexisync._keys import validate_name
from flexisync.errors import ConfigError, FlexiSyncError, RateLimitTimeout

if TYPE_CHECKING:
    from flexisync._core.context import Context

__all__ = ["RateLimitTimeout", "RateLimiterCore", "ReservationCore"]

# A reservation's marker outlives its admission time by the retry deadline plus this
# (seconds): long enough for a cancellation to find it.
_MARKER_MEMORY = 2.0
# The clean-up of an unknown outcome is bounded by this (seconds), as the lock's GRACE.
_GRACE = 0.25
_US = 1_000_000.0


def _number(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{name} must be a number, not {type(value).__name__}")
    number = float(value)
    if not math.isfinite(number) or number <= 0:
        raise ConfigError(f"{name} must be a finite number > 0, not {value!r}")
    return number


@dataclass(eq=False)
class ReservationCore:
    """One admission by a rate limiter; the shells add ``settle``.

    Attributes:
        name: the rate limiter's name.
        cost: the units currently charged for it (``settle`` changes it).
        waited: seconds the caller was told to wait before proceeding (0: at once).
        remaining: units the limiter could admit right after this one (a snapshot).
        admitted_at: server time of admission, seconds since the epoch.
    """

    name: str
    cost: float
    waited: float
    remaining: float
    admitted_at: float
    _limiter: RateLimiterCore = field(repr=False)

    def _settle_plan(self, actual: float) -> Plan[float]:
        """``settle(actual)``: charge ``actual - cost`` more (or give it back)."""
        if isinstance(actual, bool) or not isinstance(actual, int | float) \
                or not math.isfinite(actual) or actual < 0:
            raise ConfigError(f"actual must be a finite number >= 0, not {actual!r}")
        delta = float(actual) - self.cost
        if delta == 0:
            return 0.0
        limiter = self._limiter
        # Not idempotent: a lost reply is never resent (a charge must not apply twice).
        applied = yield Script("ratelimit.settle", "ratelimit_adjust", [limiter._key],
                               ["settle", limiter._interval_arg, repr(delta)],
                               idempotent=False)
        self.cost = float(actual)
        return float(applied)


class RateLimiterCore:
    """State and plans of one rate limiter object; the shells subclass it.

    Attributes:
        name: the limiter's name (shared by every process using it).
        rate: units admitted per ``per`` seconds, fleet-wide.
        per: the period, seconds.
        burst: the most units admitted at once from a full limiter (the capacity); also
            the largest cost one call may ask for.
    """

    #: The reservation class a shell hands out.
    _reservation_cls: ClassVar[type[ReservationCore]] = ReservationCore

    def __init__(self, ctx: Context, name: str, rate: float, *, per: Duration = 60.0,
                 burst: float | None = None) -> None:
        self.name = validate_name(name, "rate limiter name")
        self.rate = _number(rate, "rate")
        self.per = seconds(per, "per")
        self.burst = self.rate if burst is None else _number(burst, "burst")
        self._ctx = ctx
        self._key = ctx.keys.key("ratelimit", self.name)
        self._marker_prefix = ctx.keys.key("ratelimit", self.name, "r") + ":"
        interval_us = self.per * _US / self.rate
        self._interval_arg = repr(interval_us)
        self._tau_arg = repr(self.burst * interval_us)
        self._memory_ms = to_ms(ctx.backend.retry.deadline + _MARKER_MEMORY)

    def __repr__(self) -> str:
        return (f"<{type(self).__name__} {self.name!r} rate={self.rate:g} "
                f"per={self.per:g}s burst={self.burst:g}>")

    def _cost(self, cost: object) -> float:
        value = _number(cost, "cost")
        if value > self.burst:
            raise ConfigError(
                f"cost {value:g} exceeds rate limiter {self.name!r}'s burst "
                f"{self.burst:g}: it could never be admitted")
        return value

    def _acquire_plan(self, cost: object, timeout: Duration | None) -> Plan[ReservationCore]:
        """``acquire(cost, timeout=...)``: see the shells' docstring."""
        units = self._cost(cost)
        wait = None if timeout is None else seconds(timeout, "timeout", allow_zero=True,
                                                    allow_inf=True)
        if wait is not None and math.isinf(wait):
            wait = None
        reservation = yield from self._reserve(units, wait)
        if reservation is None:
            raise AssertionError("unreachable")  # pragma: no cover
        return reservation

    def _try_acquire_plan(self, cost: object) -> Plan[ReservationCore | None]:
        """``try_acquire(cost)``: admitted now, or ``None`` (nothing reserved)."""
        units = self._cost(cost)
        return (yield from self._reserve(units, 0.0, raising=False))

    def _reserve(self, units: float, wait: float | None,
                 raising: bool = True) -> Plan[ReservationCore | None]:
        token = os.urandom(10).hex()
        marker = self._marker_prefix + token
        max_wait = -1 if wait is None else math.floor(wait * _US)
        try:
            reply = yield Script(
                "ratelimit.acquire", "ratelimit_acquire", [self._key, marker],
                [self._interval_arg, self._tau_arg, repr(units), max_wait,
                 self._memory_ms],
                undo=functools.partial(self._cancel, marker, True))
        except Exception:
            yield from self._cancel(marker)
            raise
        status = int(reply[0])
        waited = int(reply[1]) / _US
        remaining = float(reply[3])
        if status == 0:
            tally_of(self._ctx).rate_limiter(self.name).refused()
            if raising:
                raise RateLimitTimeout(self.name, units, wait or 0.0, waited)
            return None
        if status != 1:  # cancelled before it arrived: cannot happen to a live call
            raise FlexiSyncError(f"rate limiter {self.name!r}: reservation was cancelled")
        if waited > 0:
            try:
                yield Sleep(waited)
            except GeneratorExit:  # cancelled (or interrupted) while waiting: give it back
                self._ctx.janitor(self._cancel(marker, True))
                raise
        tally_of(self._ctx).rate_limiter(self.name).admitted(waited)
        return self._reservation_cls(self.name, units, waited, remaining,
                                     int(reply[2]) / _US, self)

    def _cancel(self, marker: str, background: bool = False) -> Plan[None]:
        """Give back what the reservation ``marker`` holds, and make a script still in
        flight for it reserve nothing. Best effort, bounded by ``_GRACE`` (in the
        ``background``: the retry policy's deadline)."""
        if self._ctx.closed:
            return  # nothing can be sent; an unused reservation refills within ``per``
        try:
            yield Script("ratelimit.cancel", "ratelimit_adjust", [self._key, marker],
                         ["cancel", self._interval_arg, self._memory_ms],
                         deadline=None if background else time.monotonic() + _GRACE)
        except FlexiSyncError:
            if background:
                raise  # the janitor logs it
