"""Retries that cooperate with a shared breaker: :func:`retrying`.

Why not tenacity: a retry loop that works with the breaker must look at the breaker
between attempts (stop at once when it is open, in this process or because another
one opened it) and at the provider's retry-after, and every attempt must go through
the breaker so that each failure is counted. That is a dozen lines; the policy
(:meth:`Retrying.delay_after`) is written once for the blocking and the asyncio loops.
"""

from __future__ import annotations

import functools
import inspect
import random
from collections.abc import Awaitable, Callable
from typing import Any, ParamSpec, TypeVar, cast

from flexisync._core.plan import Plan, Wait, arun, run
from flexisync.breaker._core import BreakerCore
from flexisync.breaker._policy import foreign_seconds
from flexisync.breaker._providers import transient
from flexisync.errors import CircuitOpenError, ConfigError

__all__ = ["Retrying", "retrying"]

P = ParamSpec("P")
R = TypeVar("R")


def _pause_plan(core: BreakerCore, seconds: float) -> Plan[bool]:
    """Wait ``seconds``, or less if the breaker's mirror turns open meanwhile (then
    True): a backoff wakes the moment another process opens the breaker."""
    signal = core.watch_open()
    try:
        opened = yield Wait(signal, seconds)
    finally:
        core.unwatch_open(signal)
    return bool(opened)


def _sleep(core: BreakerCore, seconds: float) -> bool:
    return run(core.ctx, _pause_plan(core, seconds))


async def _async_sleep(core: BreakerCore, seconds: float) -> bool:
    return await arun(core.ctx, _pause_plan(core, seconds))


class Retrying:
    """Retry transient failures of calls made through a breaker (see :func:`retrying`)."""

    def __init__(self, breaker: Any, *, attempts: int = 3, backoff: float = 0.5,
                 max_backoff: float = 30.0, max_wait: float = 60.0,
                 retry_on: Callable[[BaseException], bool] = transient,
                 jitter: bool = True) -> None:
        if not isinstance(getattr(breaker, "_core", None), BreakerCore):
            raise ConfigError(f"retrying() needs a CircuitBreaker or an "
                              f"AsyncCircuitBreaker, got {type(breaker).__name__}")
        if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 1:
            raise ConfigError(f"attempts must be an int >= 1, got {attempts!r}")
        for name, value in (("backoff", backoff), ("max_backoff", max_backoff),
                            ("max_wait", max_wait)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not 0 <= value < float("inf"):
                raise ConfigError(f"{name} must be a finite number of seconds >= 0, "
                                  f"got {value!r}")
        if not callable(retry_on):
            raise ConfigError("retry_on must be callable")
        self.breaker = breaker
        self.attempts = attempts
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self.max_wait = float(max_wait)
        self.retry_on = retry_on
        self.jitter = jitter

    def delay_after(self, exc: BaseException, attempt: int) -> float | None:
        """Seconds to wait before attempt ``attempt + 1`` after ``exc``; None: give up
        (the caller re-raises ``exc``).

        Raises:
            CircuitOpenError: the breaker is open (this failure opened it, or another
                process did): retrying now would only be rejected. Chained to ``exc``.
        """
        if isinstance(exc, CircuitOpenError) or not isinstance(exc, Exception):
            return None
        if attempt >= self.attempts or not self.retry_on(exc):
            return None
        stats = self.breaker.stats()
        if stats.state in ("open", "forced_open"):
            raise CircuitOpenError(self.breaker.name, stats.retry_after) from exc
        of = self.breaker.policy.retry_after_of
        wait = foreign_seconds(of(exc)) if of is not None else None
        if wait is None:
            wait = min(self.max_backoff, self.backoff * 2.0 ** (attempt - 1))
            if self.jitter:
                wait *= random.uniform(0.5, 1.0)  # not for cryptography
        return wait if wait <= self.max_wait else None

    def _opened(self, exc: BaseException) -> None:
        """The breaker opened during a backoff: CircuitOpenError chained to ``exc``."""
        raise CircuitOpenError(self.breaker.name, self.breaker.stats().retry_after) from exc

    def call(self, fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        """``fn(*args, **kwargs)`` through the breaker, retried; returns its result.

        Raises:
            CircuitOpenError: the breaker is open (before an attempt, or after a
                failure: then chained to that failure).
            Exception: the last failure, when it is not transient, the attempts are
                used up, or the retry-after is longer than ``max_wait``.
        """
        attempt = 0
        while True:
            attempt += 1
            try:
                return cast("R", self.breaker.call(fn, *args, **kwargs))
            except Exception as exc:
                wait = self.delay_after(exc, attempt)
                if wait is None:
                    raise
                last = exc
            if _sleep(self.breaker._core, wait):
                self._opened(last)

    async def acall(self, fn: Callable[P, Awaitable[R]], *args: P.args,
                    **kwargs: P.kwargs) -> R:
        """``await fn(*args, **kwargs)`` through the breaker, retried (as :meth:`call`).

        Cancellation propagates at once (a cancelled attempt counts as nothing).
        """
        attempt = 0
        while True:
            attempt += 1
            try:
                return cast("R", await self.breaker.acall(fn, *args, **kwargs))
            except Exception as exc:
                wait = self.delay_after(exc, attempt)
                if wait is None:
                    raise
                last = exc
            if await _async_sleep(self.breaker._core, wait):
                self._opened(last)

    def __call__(self, fn: Callable[P, R]) -> Callable[P, R]:
        """Decorate ``fn`` (a plain or an ``async def`` function)."""
        if inspect.iscoroutinefunction(fn):
            async_fn = cast("Callable[P, Awaitable[Any]]", fn)

            @functools.wraps(fn)
            async def guarded_async(*args: P.args, **kwargs: P.kwargs) -> Any:
                return await self.acall(async_fn, *args, **kwargs)

            return cast("Callable[P, R]", guarded_async)

        @functools.wraps(fn)
        def guarded(*args: P.args, **kwargs: P.kwargs) -> R:
            return self.call(fn, *args, **kwargs)

        return guarded


def retrying(breaker: Any, *, attempts: int = 3, backoff: float = 0.5,
             max_backoff: float = 30.0, max_wait: float = 60.0,
             retry_on: Callable[[BaseException], bool] = transient,
             jitter: bool = True) -> Retrying:
    """Retries that work with ``breaker`` instead of hiding failures from it.

    Every attempt goes through ``breaker`` (a :class:`~flexisync.CircuitBreaker` or an
    :class:`~flexisync.aio.AsyncCircuitBreaker`), so every failure is counted
    fleet-wide. After a failure the call is retried only when ``retry_on(exc)`` says
    it is transient (default :func:`~flexisync.breaker.transient`: timeouts, lost
    connections, 408, 429, 5xx, overload; never a 4xx), and:

    * if the breaker is now open (this failure opened it, e.g. a 429 with a
      retry-after, or another process did), it raises
      :class:`~flexisync.CircuitOpenError` at once (chained to the failure) instead
      of sleeping; a backoff under way ends the moment the breaker opens (the shared
      state is mirrored: no polling), and the next attempt is then rejected unrun;
    * else it waits for the provider's retry-after (the breaker's ``retry_after_of``)
      when the failure carries one, giving up (re-raising the failure) if that is more
      than ``max_wait`` seconds, or else for an exponential backoff: ``backoff``,
      ``2 * backoff``... up to ``max_backoff`` seconds, times a random factor in
      [0.5, 1] unless ``jitter=False``.

    At most ``attempts`` calls are made; the last failure is re-raised. Disable the
    SDK's own retries (``OpenAI(max_retries=0)``, ``Anthropic(max_retries=0)``) so
    that the breaker sees each failure and no worker sleeps inside the SDK.

    Use the result as a decorator (plain and ``async def`` functions), or call
    ``.call(fn, *args)`` / ``await .acall(fn, *args)``.

    Raises:
        ConfigError: a bad argument (at once).
    """
    return Retrying(breaker, attempts=attempts, backoff=backoff, max_backoff=max_backoff,
                    max_wait=max_wait, retry_on=retry_on, jitter=jitter)
