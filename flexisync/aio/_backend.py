"""The asyncio backend: a ``redis.asyncio`` client per event loop, same rules as sync.

Every call is bounded by one wall-clock deadline (the retry policy's, or a sooner one
the caller gives) and retried with the same decisions as the blocking backend
(:func:`flexisync._connection.next_pause`). A ``redis.asyncio`` connection belongs to
the event loop that opened it, so the backend keeps one client per running loop:
``asyncio.run()`` called again and again (as test suites do) gets a fresh client each
time, never one "attached to a different loop". The clients are built from the same
settings as the Context's blocking client (server, credentials, TLS, database).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import inspect
import os
import sys
import time
import weakref
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import redis
import redis.asyncio
import redis.asyncio.connection as aconnection
import redis.exceptions as rexc
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff

from flexisync._connection import (
    CALL_ERRORS,
    RetryPolicy,
    call_bound,
    load_script,
    next_pause,
    translate,
)
from flexisync._log import get_logger
from flexisync.errors import BackendUnavailable, ConfigError

if sys.version_info >= (3, 11):
    from asyncio import timeout as _timeout
else:  # pragma: no cover - redis-py depends on async-timeout below 3.11.3
    from async_timeout import timeout as _timeout  # type: ignore[import-not-found,unused-ignore]

__all__ = ["AsyncBackend", "async_client_factory"]

T = TypeVar("T")

_CLASSES: dict[str, type] = {
    "UnixDomainSocketConnection": aconnection.UnixDomainSocketConnection,
    "SSLConnection": aconnection.SSLConnection,
    "Connection": aconnection.Connection,
}


def _accepted(cls: type) -> frozenset[str]:
    names: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is not None:
            names.update(inspect.signature(init).parameters)
    return frozenset(names - {"self", "args", "kwargs"})


def async_client_factory(client: Any) -> Callable[[], Any]:
    """A function building a ``redis.asyncio`` client like the blocking ``client``.

    Raises:
        ConfigError: the client is of a kind the asyncio shell cannot mirror.
    """
    from flexisync._connection import topology_of  # noqa: PLC0415

    kind = topology_of(client)
    if kind == "cluster":
        from flexisync import _cluster  # noqa: PLC0415

        return _cluster.async_client_factory(client)
    if kind == "sentinel":
        from flexisync import _sentinel  # noqa: PLC0415

        return _sentinel.async_client_factory(client)
    if type(client).__module__.startswith("fakeredis"):
        import fakeredis  # noqa: PLC0415  (the memory extra)

        server = client.connection_pool.connection_kwargs.get("server")
        return lambda: fakeredis.FakeAsyncRedis(server=server)
    pool = client.connection_pool
    base = next((c for c in pool.connection_class.__mro__ if c.__name__ in _CLASSES), None)
    if base is None:
        raise ConfigError(f"no asyncio equivalent of {pool.connection_class.__name__}")
    cls = _CLASSES[base.__name__]
    accepted = _accepted(cls)
    kwargs = {k: v for k, v in pool.connection_kwargs.items() if k in accepted}
    kwargs["retry"] = AsyncRetry(NoBackoff(), 0)  # retries happen in AsyncBackend.call
    # No per-socket timeout: every await of a command is bounded by AsyncBackend.call's
    # one wall-clock timeout (the call's deadline). With a socket_timeout, redis.asyncio
    # wraps each send in asyncio.wait_for, which costs a task per command (~25 µs a
    # call) and, before Python 3.12, can swallow a cancellation landing as the write
    # completes. Connecting keeps its own socket_connect_timeout.
    kwargs["socket_timeout"] = None

    def build() -> Any:
        # The number of connections is bounded by AsyncBackend's per-loop semaphore (a
        # burst waits for a free slot within its deadline, instead of failing with
        # MaxConnectionsError); redis-py's BlockingConnectionPool would cost ~20 us a call.
        apool = redis.asyncio.ConnectionPool(connection_class=cls, **kwargs)
        return redis.asyncio.Redis(connection_pool=apool)

    return build


class AsyncBackend:
    """``redis.asyncio`` clients (one per event loop) plus retries and deadlines."""

    def __init__(self, make_client: Callable[[], Any], *, address: str,
                 retry: RetryPolicy, max_connections: int = 100,
                 sharded: bool | None = None) -> None:
        self._make_client = make_client
        #: Scripts publish with SPUBLISH (Redis Cluster); ``None``: decided by the
        #: kind of client ``make_client`` builds, on first use.
        self._sharded = sharded
        self.max_connections = max_connections
        self.address = address
        self.retry = retry
        self.closed = False
        self._clients: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, tuple[Any, asyncio.Semaphore]] = \
            weakref.WeakKeyDictionary()
        self._shas: dict[str, str] = {}
        self._pid = os.getpid()
        self._log = get_logger("connection", address=address)

    @property
    def sharded(self) -> bool:
        """True when the clients are ``redis.asyncio.RedisCluster`` (scripts SPUBLISH)."""
        found = self._sharded
        if found is None:
            found = self._sharded = bool(getattr(self._make_client, "sharded", False))
        return found

    def client(self) -> Any:
        """The running event loop's client (built on first use in that loop)."""
        return self._slot()[0]

    def _slot(self) -> tuple[Any, asyncio.Semaphore]:
        if self._pid != os.getpid():
            self.after_fork()
        loop = asyncio.get_running_loop()
        found = self._clients.get(loop)
        if found is None:
            found = self._clients[loop] = (self._make_client(),
                                           asyncio.Semaphore(self.max_connections))
        return found

    async def call(self, operation: str, fn: Callable[[Any], Awaitable[T] | T], *,
                   idempotent: bool = True, deadline: float | None = None,
                   retry: RetryPolicy | None = None) -> T:
        """Await ``fn(client)`` under the retry policy, within one wall-clock bound.

        The same arguments and errors as the blocking ``Backend.call``: raises
        ``BackendUnavailable`` when Redis cannot be reached before the bound (with the
        true attempts and seconds) and ``BackendError`` when Redis answers an error.
        """
        if self.closed:
            raise BackendUnavailable(self.address, reason="the Coordinator is closed")
        policy = self.retry if retry is None else retry
        start = time.monotonic()
        bound = call_bound(policy, start, deadline)
        client, slots = self._slot()
        attempts = 0
        while True:
            attempts += 1
            try:
                if slots.locked():  # every connection busy: wait for one, within the bound
                    try:
                        async with _timeout(max(bound - time.monotonic(), 0.0)):
                            await slots.acquire()
                    except TimeoutError:
                        raise rexc.TimeoutError(
                            f"no free connection within the call deadline "
                            f"({self.max_connections} in use)") from None
                else:
                    await slots.acquire()
                try:
                    return await self._attempt(fn, client, bound)
                finally:
                    slots.release()
            except CALL_ERRORS as exc:
                failure: BaseException = exc
            pause = next_pause(policy, failure, attempts, idempotent=idempotent, bound=bound)
            if pause is None:
                raise translate(operation, failure, self.address, attempts,
                                time.monotonic() - start) from failure
            await asyncio.sleep(pause)

    @staticmethod
    async def _attempt(fn: Callable[[Any], Awaitable[T] | T], client: Any, bound: float) -> T:
        left = bound - time.monotonic()
        if left <= 0:
            raise rexc.TimeoutError("flexisync deadline reached before the command was sent")
        try:
            async with _timeout(left):
                result = fn(client)
                if inspect.isawaitable(result):
                    return await result
                return result
        except TimeoutError:
            raise rexc.TimeoutError(f"no reply within {left:.3f}s (call deadline)") from None

    async def run_script(self, operation: str, name: str, keys: Sequence[str],
                         args: Sequence[Any], *, idempotent: bool = True,
                         deadline: float | None = None,
                         retry: RetryPolicy | None = None) -> Any:
        """Run ``flexisync/_scripts/<name>.lua`` by EVALSHA (loading it on NOSCRIPT)."""
        text = load_script(name, sharded=self.sharded)
        sha = self._shas.get(name)
        if sha is None:
            sha = self._shas[name] = hashlib.sha1(text.encode(), usedforsecurity=False).hexdigest()

        async def evalsha(client: Any) -> Any:
            try:
                return await client.evalsha(sha, len(keys), *keys, *args)
            except rexc.NoScriptError:
                await client.script_load(text)
                return await client.evalsha(sha, len(keys), *keys, *args)

        return await self.call(operation, evalsha, idempotent=idempotent, deadline=deadline,
                               retry=retry)

    async def ping(self) -> float:
        """One PING; the round-trip time in seconds."""
        start = time.perf_counter()
        await self.call("ping", lambda c: c.ping())
        return time.perf_counter() - start

    async def aclose(self) -> None:
        """Close the running loop's client; forget the others (their loops are gone or
        will close their sockets with them)."""
        self.closed = True
        with contextlib.suppress(RuntimeError):
            loop = asyncio.get_running_loop()
            slot = self._clients.pop(loop, None)
            if slot is not None:
                client = slot[0]
                with contextlib.suppress(rexc.RedisError, OSError):
                    await client.aclose()
        self._clients = weakref.WeakKeyDictionary()

    def after_fork(self) -> None:
        """Forget the parent's clients (their sockets belong to the parent)."""
        self._pid = os.getpid()
        self._clients = weakref.WeakKeyDictionary()
