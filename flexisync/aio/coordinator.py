"""``flexisync.aio.connect()`` and the ``AsyncCoordinator``: the asyncio shell's handle."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from flexisync._connection import RetryPolicy
from flexisync._core.context import Context
from flexisync._durations import Duration
from flexisync.coordinator import open_context
from flexisync.errors import ConfigError

if TYPE_CHECKING:
    from flexisync.aio.breaker import AsyncCircuitBreaker
    from flexisync.aio.events import AsyncEventBus
    from flexisync.aio.locks import AsyncLock
    from flexisync.aio.rate_limiter import AsyncRateLimiter
    from flexisync.aio.semaphores import AsyncSemaphore
    from flexisync.aio.state import AsyncStateStore
    from flexisync.aio.streams import AsyncStream

__all__ = ["AsyncCoordinator", "connect"]


def connect(url: str | None = None, *, namespace: str = "flexisync", client: Any = None,
            retry: RetryPolicy | None = None, **redis_options: Any) -> AsyncCoordinator:
    """Create an :class:`AsyncCoordinator`; the arguments of :func:`flexisync.connect`
    but ``callback_threads`` (asyncio callbacks run as tasks on their event loop).

    Opens nothing (no socket, no thread) until the first operation, so it may run at
    import time or outside any event loop. ``client`` may be a ``redis.Redis`` or a
    ``redis.asyncio.Redis``: flexisync uses the same settings over pools of its own.
    In one process it shares connections, the pub/sub listener and the breaker mirrors
    with every Coordinator (sync or asyncio) of the same URL, options and namespace.

    Raises:
        ConfigError: as :func:`flexisync.connect`, and for ``callback_threads``.
    """
    if "callback_threads" in redis_options:
        raise ConfigError("callback_threads is not an option of flexisync.aio.connect: "
                          "asyncio callbacks run as tasks on their event loop, no thread")
    return AsyncCoordinator(open_context(url, namespace=namespace, client=client,
                                         retry=retry, redis_options=redis_options))


class AsyncCoordinator:
    """The asyncio shell's handle on the shared Redis; build it with :func:`connect`.

    The same factories as :class:`flexisync.Coordinator`, returning objects whose I/O
    methods are coroutines. Use it from any number of event loops in turn (each gets
    its own connections) and in forked children. ``async with`` closes it.
    """

    def __init__(self, ctx: Context) -> None:
        self._ctx = ctx
        self._closed = False

    @property
    def namespace(self) -> str:
        """The prefix of every key and channel this Coordinator uses."""
        return self._ctx.keys.namespace

    @property
    def url(self) -> str:
        """The connection URL with any password replaced by ``***``."""
        spec = self._ctx.spec
        return spec.redacted() if spec is not None else self._ctx.address

    @property
    def closed(self) -> bool:
        """True once :meth:`aclose` has run."""
        return self._closed or self._ctx.closed

    def __repr__(self) -> str:
        return f"<AsyncCoordinator {self.url} namespace={self.namespace!r}>"

    # --- factories (no I/O) -------------------------------------------------------------

    def state(self, scope: str, *, ttl: Duration | None = None) -> AsyncStateStore:
        """An :class:`~flexisync.aio.state.AsyncStateStore`; as ``Coordinator.state``."""
        from flexisync.aio.state import AsyncStateStore  # noqa: PLC0415

        return AsyncStateStore(self._ctx, scope, ttl=ttl)

    def lock(self, name: str, *, ttl: Duration = 30.0, timeout: Duration | None = None,
             auto_renew: bool = False, fair: bool = False,
             on_lost: Callable[[Any], None] | None = None, replicas: int = 0,
             replicas_timeout: Duration = 1.0) -> AsyncLock:
        """An :class:`~flexisync.aio.locks.AsyncLock`; as ``Coordinator.lock``."""
        from flexisync.aio.locks import AsyncLock  # noqa: PLC0415

        return AsyncLock(self._ctx, name, ttl=ttl, timeout=timeout, auto_renew=auto_renew,
                         fair=fair, on_lost=on_lost, replicas=replicas,
                         replicas_timeout=replicas_timeout)

    def semaphore(self, name: str, limit: int, *, lease: Duration = 60.0,
                  timeout: Duration | None = None) -> AsyncSemaphore:
        """An :class:`~flexisync.aio.semaphores.AsyncSemaphore`; as
        ``Coordinator.semaphore``."""
        from flexisync.aio.semaphores import AsyncSemaphore  # noqa: PLC0415

        return AsyncSemaphore(self._ctx, name, limit, lease=lease, timeout=timeout)

    def rate_limiter(self, name: str, rate: float, *, per: Duration = 60.0,
                     burst: float | None = None) -> AsyncRateLimiter:
        """An :class:`~flexisync.aio.rate_limiter.AsyncRateLimiter`; as
        ``Coordinator.rate_limiter``."""
        from flexisync.aio.rate_limiter import AsyncRateLimiter  # noqa: PLC0415

        return AsyncRateLimiter(self._ctx, name, rate, per=per, burst=burst)

    @property
    def events(self) -> AsyncEventBus:
        """The :class:`~flexisync.aio.events.AsyncEventBus` of this namespace."""
        from flexisync.aio.events import AsyncEventBus  # noqa: PLC0415

        return self._ctx.extension("aio.events", AsyncEventBus)

    def stream(self, name: str, *, maxlen: int | None = 10_000,
               ttl: Duration | None = 604_800.0) -> AsyncStream:
        """An :class:`~flexisync.aio.streams.AsyncStream`; as ``Coordinator.stream``."""
        from flexisync.aio.streams import AsyncStream  # noqa: PLC0415

        return AsyncStream(self._ctx, name, maxlen=maxlen, ttl=ttl)

    def breaker(self, name: str, **policy: Any) -> AsyncCircuitBreaker:
        """An :class:`~flexisync.aio.breaker.AsyncCircuitBreaker` over the same mirror as
        ``Coordinator.breaker(name)`` in this process; as that method."""
        from flexisync.aio.breaker import AsyncCircuitBreaker  # noqa: PLC0415

        return AsyncCircuitBreaker(self._ctx, name, **policy)

    # --- operations ---------------------------------------------------------------------

    async def ping(self) -> float:
        """Round-trip time of one PING, in seconds.

        Raises:
            BackendUnavailable: Redis did not answer within the retry budget.
        """
        return await self._ctx.abackend.ping()

    async def aclose(self) -> None:
        """Close this Coordinator. Idempotent.

        Closes this event loop's connections; the shared threads and connections stop
        when no other Coordinator of this process uses them.
        """
        if self._closed:
            return
        self._closed = True
        ctx = self._ctx
        ctx.release()
        if ctx.closed:
            await ctx.abackend.aclose()

    async def __aenter__(self) -> AsyncCoordinator:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
