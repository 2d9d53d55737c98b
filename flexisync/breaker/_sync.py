"""``CircuitBreaker``: the blocking shell over the shared breaker core."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable, Coroutine
from datetime import timedelta
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar, cast

from flexisync._core.plan import run
from flexisync.breaker._core import PLAIN, BreakerCore, Ticket, core_of, pop_ticket, push_ticket
from flexisync.breaker._hub import FORK_MARK
from flexisync.breaker._policy import BreakerInfo, BreakerPolicy, BreakerStats, State

if TYPE_CHECKING:
    from types import TracebackType

    from flexisync._core.context import Context
    from flexisync.aio.breaker import AsyncCircuitBreaker

__all__ = ["CircuitBreaker"]

P = ParamSpec("P")
R = TypeVar("R")
_MARK = FORK_MARK  # module-global alias: the hot path reads it as one LOAD_GLOBAL


class CircuitBreaker:
    """A circuit breaker whose state every process using the same name shares.

    Build it with ``coordinator.breaker(name, **policy)`` (see :class:`BreakerPolicy`
    for the keyword arguments). Two objects with the same name, in one process or in
    many, act on the same shared state; give them the same policy. In one process, a
    ``CircuitBreaker`` and an :class:`~flexisync.aio.AsyncCircuitBreaker` of the same
    name and policy act on one mirror: a transition made by either is seen by the other
    at once.

    Use it as a decorator (sync and ``async def`` functions), a context manager
    (``with`` / ``async with``), or through :meth:`call` / :meth:`acall` (the asyncio
    forms are those of :class:`~flexisync.aio.AsyncCircuitBreaker`). A rejected call
    raises :class:`~flexisync.CircuitOpenError` whose ``retry_after`` says how long
    until a probe may be admitted. A protected call never fails because Redis is down,
    unless ``on_backend_error="reject"``.

    Raises:
        ConfigError: (a ``ValueError``) unknown option or invalid value, at construction.
    """

    _core: BreakerCore
    _aio_shell: AsyncCircuitBreaker | None

    def __new__(cls, ctx: Context, name: str, *, policy: BreakerPolicy | None = None,
                **options: Any) -> CircuitBreaker:
        """One live object per Context, name and policy: asking again returns it.

        So ``sync.breaker("openai")`` may be called on every request without adding a
        subscription each time. A different policy gives another object, which mirrors
        the same shared state. The Context holds breakers weakly (plus the few asked
        for most recently, and those with ``on_state_change`` callbacks): a breaker
        nobody uses any more is released with its subscription.
        """
        core = core_of(ctx, name, policy, options)

        def build(found: BreakerCore) -> CircuitBreaker:
            made: CircuitBreaker = object.__new__(cls)
            made._core = found
            made._aio_shell = None
            return made

        return cast("CircuitBreaker", core.shell("sync", build))

    def __init__(self, ctx: Context, name: str, *, policy: BreakerPolicy | None = None,
                 **options: Any) -> None:
        """Built by ``__new__`` (see there); nothing left to do."""

    @property
    def name(self) -> str:
        """The breaker's name."""
        return self._core.name

    @property
    def policy(self) -> BreakerPolicy:
        """The breaker's validated policy."""
        return self._core.policy

    def __repr__(self) -> str:
        return f"<CircuitBreaker {self.name!r} state={self._core._state!r}>"

    def _aio(self) -> AsyncCircuitBreaker:
        """The asyncio shell over the same core (the asyncio forms delegate to it)."""
        found = self._aio_shell
        if found is None:
            from flexisync.aio.breaker import AsyncCircuitBreaker  # noqa: PLC0415

            found = self._aio_shell = AsyncCircuitBreaker.over(self._core)
        return found

    # --- protecting calls -------------------------------------------------------------

    def __call__(self, fn: Callable[P, R]) -> Callable[P, R]:
        """Decorate ``fn`` (a plain or an ``async def`` function) with this breaker."""
        if inspect.iscoroutinefunction(fn):
            return cast("Callable[P, R]", self._aio()(fn))
        core = self._core

        @functools.wraps(fn)
        def guarded(*args: P.args, **kwargs: P.kwargs) -> R:
            # The closed path of call(), inlined: one call frame less on every call.
            # _MARK[0] is 0 in a child forked without at-fork hooks (see _hub).
            if core._fast and _MARK[0]:
                try:
                    result = fn(*args, **kwargs)
                except BaseException as exc:
                    self._finish(PLAIN, exc)
                    raise
                core._ok += 1
                return result
            return self._call_slow(fn, *args, **kwargs)

        return guarded

    def call(self, fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        """Run ``fn(*args, **kwargs)`` through the breaker; returns its result.

        For an ``async def`` function use :meth:`acall`.

        Raises:
            CircuitOpenError: the breaker rejected the call (``fn`` did not run).
            Exception: whatever ``fn`` raised, after it was counted.
        """
        core = self._core
        if core._fast and _MARK[0]:
            try:
                result = fn(*args, **kwargs)
            except BaseException as exc:
                self._finish(PLAIN, exc)
                raise
            core._ok += 1
            return result
        return self._call_slow(fn, *args, **kwargs)

    def _call_slow(self, fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        ticket = self._admit()
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:
            self._finish(ticket, exc)
            raise
        self._finish(ticket, None)
        return result

    def acall(self, fn: Callable[P, Awaitable[R]], *args: P.args,
              **kwargs: P.kwargs) -> Coroutine[Any, Any, R]:
        """Await ``fn(*args, **kwargs)`` through the breaker; returns its result.

        The same as :meth:`flexisync.aio.AsyncCircuitBreaker.acall` on this breaker's
        mirror: Redis is awaited, never waited for in a thread, and cancellation at any
        ``await`` leaves no probe lease held.

        Raises:
            CircuitOpenError: the breaker rejected the call (``fn`` did not run).
        """
        return (self._aio_shell or self._aio()).acall(fn, *args, **kwargs)  # one frame less

    def __enter__(self) -> CircuitBreaker:
        core = self._core
        push_ticket(self, PLAIN if core._fast and _MARK[0] else self._admit())
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._finish(pop_ticket(self), exc)

    async def __aenter__(self) -> CircuitBreaker:
        await self._aio().__aenter__()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self._aio().__aexit__(exc_type, exc, tb)

    def _admit(self) -> Ticket:
        core = self._core
        ticket = core.admit_quick()
        if ticket is None:
            core.ensure_ready()
            ticket = core.admit_quick()
            if ticket is None:
                ticket = run(core.ctx, core.admit_plan())
        return ticket

    def _finish(self, ticket: Ticket, exc: BaseException | None) -> None:
        core = self._core
        if ticket.kind == Ticket.BYPASS:
            return
        outcome, retry_after = core.classify(ticket, exc)
        run(core.ctx, core.settle_plan(ticket, outcome, retry_after))

    # --- manual control ---------------------------------------------------------------

    def trip(self, retry_after: float | timedelta | None = None) -> None:
        """Open the breaker now, in every process.

        Args:
            retry_after: seconds to stay open (e.g. a provider's Retry-After), at most
                :data:`~flexisync.breaker.MAX_DURATION`; None: the current open period
                (``recovery_timeout`` at first). Never shortens an open period already
                running; a forced-open or disabled breaker is left alone.

        While Redis is unreachable this opens the per-process fallback breaker instead.

        Raises:
            ConfigError: ``retry_after`` is not a positive number of seconds up to
                ``MAX_DURATION`` (nothing is changed anywhere).
        """
        core = self._core
        run(core.ctx, core.trip_plan(retry_after))

    def reset(self) -> None:
        """Close the breaker in every process and clear its counts and open period.

        Also repairs a record another program damaged, replacing a key of another type.

        Raises:
            BackendUnavailable: Redis is unreachable.
        """
        run(self._core.ctx, self._core.command_plan("reset"))

    def force_open(self) -> None:
        """Reject every call in every process until :meth:`reset` (``retry_after=inf``).

        A manual state: it lasts until changed (the record does not expire).

        Raises:
            BackendUnavailable: Redis is unreachable.
        """
        run(self._core.ctx, self._core.command_plan("force_open"))

    def disable(self) -> None:
        """Let every call through in every process, counting nothing, until :meth:`reset`.

        A manual state: it lasts until changed (the record does not expire).

        Raises:
            BackendUnavailable: Redis is unreachable.
        """
        run(self._core.ctx, self._core.command_plan("disable"))

    def on_state_change(self, callback: Callable[[str, str, str], None],
                        ) -> Callable[[str, str, str], None]:
        """Call ``callback(name, old, new)`` in this process on every shared transition.

        Callbacks run on the Context's breaker thread (never the caller's, never the
        listener's), in order; an exception is logged and does not stop the others.
        A breaker with callbacks stays alive as long as its Coordinator.
        Returns ``callback``, so this works as a decorator.

        Raises:
            ConfigError: ``callback`` is not callable.
        """
        self._core.add_callback(callback)
        self._core.ensure_ready()
        return callback

    # --- reading ----------------------------------------------------------------------

    @property
    def state(self) -> State:
        """The state this process acts on (the local fallback's while Redis is down)."""
        self._core.ensure_ready()
        return self._core.current_state()

    def stats(self) -> BreakerStats:
        """This process's view, without any I/O (see :class:`BreakerStats`)."""
        return self._core.stats()

    def info(self) -> BreakerInfo:
        """The shared state as stored in Redis (one round trip).

        Raises:
            BackendUnavailable: Redis is unreachable.
            BackendError: the record is damaged beyond automatic repair.
        """
        return run(self._core.ctx, self._core.info_plan())
