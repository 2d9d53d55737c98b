"""``AsyncCircuitBreaker``: the asyncio shell over the shared breaker core.

The same breaker as :class:`flexisync.CircuitBreaker` (same policy options, same
shared state, same errors), with coroutines for everything that talks to Redis. In one
process it acts on the same mirror as a ``CircuitBreaker`` of the same name and policy.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar, cast

from flexisync._core.plan import arun
from flexisync.breaker._core import PLAIN, BreakerCore, Ticket, core_of, pop_ticket, push_ticket
from flexisync.breaker._hub import FORK_MARK
from flexisync.breaker._policy import BreakerInfo, BreakerPolicy, BreakerStats, State
from flexisync.errors import ConfigError

if TYPE_CHECKING:
    from types import TracebackType

    from flexisync._core.context import Context

__all__ = ["AsyncCircuitBreaker"]

P = ParamSpec("P")
R = TypeVar("R")
_MARK = FORK_MARK  # module-global alias: the hot path reads it as one LOAD_GLOBAL


class AsyncCircuitBreaker:
    """A circuit breaker for asyncio whose state every process using the name shares.

    Build it with ``coordinator.breaker(name, **policy)`` (no I/O) on an
    :class:`~flexisync.aio.AsyncCoordinator` (the options of
    :class:`~flexisync.breaker.BreakerPolicy`). Use it as a decorator of ``async def``
    functions, with ``async with breaker:``, or through :meth:`acall`. While closed, a
    call costs no Redis round trip and no thread; a failure, a probe and the commands
    are awaited on the event loop.

    Cancellation is safe at every ``await``: a cancelled call counts as nothing (not a
    failure), and a probe lease taken for a call that is cancelled (during admission,
    while the call runs, or while its outcome is reported) is given back.

    Raises:
        ConfigError: (a ``ValueError``) unknown option or invalid value, at construction.
    """

    _core: BreakerCore

    def __new__(cls, ctx: Context, name: str, *, policy: BreakerPolicy | None = None,
                **options: Any) -> AsyncCircuitBreaker:
        """One live object per Context, name and policy (as ``CircuitBreaker``)."""
        return cls.over(core_of(ctx, name, policy, options))

    def __init__(self, ctx: Context, name: str, *, policy: BreakerPolicy | None = None,
                 **options: Any) -> None:
        """Built by ``__new__`` (see there); nothing left to do."""

    @classmethod
    def over(cls, core: BreakerCore) -> AsyncCircuitBreaker:
        """The asyncio shell of ``core`` (internal: the sync shell delegates to it)."""

        def build(found: BreakerCore) -> AsyncCircuitBreaker:
            made: AsyncCircuitBreaker = object.__new__(cls)
            made._core = found
            return made

        return cast("AsyncCircuitBreaker", core.shell("async", build))

    @property
    def name(self) -> str:
        """The breaker's name."""
        return self._core.name

    @property
    def policy(self) -> BreakerPolicy:
        """The breaker's validated policy."""
        return self._core.policy

    def __repr__(self) -> str:
        return f"<AsyncCircuitBreaker {self.name!r} state={self._core._state!r}>"

    # --- protecting calls -------------------------------------------------------------

    def __call__(self, fn: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
        """Decorate the ``async def`` function ``fn`` with this breaker.

        Raises:
            ConfigError: ``fn`` is not an ``async def`` function (use
                ``CircuitBreaker`` for blocking code).
        """
        if not inspect.iscoroutinefunction(fn):
            raise ConfigError("AsyncCircuitBreaker decorates async def functions; use "
                              "flexisync.CircuitBreaker for blocking ones")

        @functools.wraps(fn)
        async def guarded(*args: P.args, **kwargs: P.kwargs) -> R:
            return await self.acall(fn, *args, **kwargs)

        return guarded

    async def acall(self, fn: Callable[P, Awaitable[R]], *args: P.args,
                    **kwargs: P.kwargs) -> R:
        """Await ``fn(*args, **kwargs)`` through the breaker; returns its result.

        Raises:
            CircuitOpenError: the breaker rejected the call (``fn`` was not called).
            Exception: whatever ``fn`` raised, after it was counted.
        """
        core = self._core
        if core._fast and _MARK[0]:  # closed: no Redis, no thread
            try:
                result = await fn(*args, **kwargs)
            except BaseException as exc:
                await self._finish(PLAIN, exc)
                raise
            core._ok += 1
            return result
        ticket = await self._admit()
        try:
            result = await fn(*args, **kwargs)
        except BaseException as exc:
            await self._finish(ticket, exc)
            raise
        await self._finish(ticket, None)
        return result

    async def __aenter__(self) -> AsyncCircuitBreaker:
        core = self._core
        push_ticket(self, PLAIN if core._fast and _MARK[0] else await self._admit())
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self._finish(pop_ticket(self), exc)

    async def _admit(self) -> Ticket:
        core = self._core
        ticket = core.admit_quick()
        if ticket is None:
            ticket = await arun(core.ctx, core.admit_plan())
        return ticket

    async def _finish(self, ticket: Ticket, exc: BaseException | None) -> None:
        if ticket.kind == Ticket.BYPASS:
            return
        core = self._core
        outcome, retry_after = core.classify(ticket, exc)
        plan = core.settle_plan(ticket, outcome, retry_after)
        if not core.needs_io(ticket, outcome):
            await arun(core.ctx, plan)  # no I/O: completes without suspending
        elif isinstance(exc, asyncio.CancelledError):
            # The task is being cancelled: do not await in it; the janitor frees the
            # probe lease (a cancelled call is neutral: nothing else to report).
            core.ctx.janitor(plan)
        else:
            await arun(core.ctx, plan)

    # --- manual control (coroutines) ----------------------------------------------------

    async def trip(self, retry_after: float | timedelta | None = None) -> None:
        """Open the breaker now, in every process; as ``CircuitBreaker.trip``.

        Raises:
            ConfigError: ``retry_after`` is not a positive number of seconds up to
                ``MAX_DURATION`` (nothing is changed anywhere).
        """
        core = self._core
        await arun(core.ctx, core.trip_plan(retry_after))

    async def reset(self) -> None:
        """Close the breaker in every process; as ``CircuitBreaker.reset``.

        Raises:
            BackendUnavailable: Redis is unreachable.
        """
        await arun(self._core.ctx, self._core.command_plan("reset"))

    async def force_open(self) -> None:
        """Reject every call in every process until :meth:`reset`.

        Raises:
            BackendUnavailable: Redis is unreachable.
        """
        await arun(self._core.ctx, self._core.command_plan("force_open"))

    async def disable(self) -> None:
        """Let every call through in every process, counting nothing, until :meth:`reset`.

        Raises:
            BackendUnavailable: Redis is unreachable.
        """
        await arun(self._core.ctx, self._core.command_plan("disable"))

    async def info(self) -> BreakerInfo:
        """The shared state as stored in Redis (one round trip).

        Raises:
            BackendUnavailable: Redis is unreachable.
            BackendError: the record is damaged beyond automatic repair.
        """
        return await arun(self._core.ctx, self._core.info_plan())

    async def prepare(self) -> None:
        """Subscribe to the breaker's transitions and read its state, if not done yet.

        Optional: the first call or command does it. Never raises a FlexiSyncError
        (an unreachable Redis puts the breaker in its ``on_backend_error`` mode).
        """
        await arun(self._core.ctx, self._core.prepare_plan())

    # --- no I/O -------------------------------------------------------------------------

    def on_state_change(self, callback: Callable[[str, str, str], None],
                        ) -> Callable[[str, str, str], None]:
        """Call ``callback(name, old, new)`` on every shared transition (a plain
        function, run on the Context's breaker thread, as ``CircuitBreaker``'s).

        Subscribing happens in the background (no I/O here); ``await prepare()`` to
        know it is in place. Returns ``callback``.

        Raises:
            ConfigError: ``callback`` is not callable.
        """
        self._core.add_callback(callback)
        self._core.prepare_soon()
        return callback

    @property
    def state(self) -> State:
        """The state this process acts on, from the mirror, without I/O.

        Until the mirror has read Redis once (the first call or command, or
        :meth:`prepare`; started in the background by this property) it is
        ``"closed"``.
        """
        core = self._core
        core.prepare_soon()
        return core.current_state()

    def stats(self) -> BreakerStats:
        """This process's view, without any I/O (see ``BreakerStats``)."""
        return self._core.stats()
