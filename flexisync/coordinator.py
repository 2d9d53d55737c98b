"""``connect()`` and the ``Coordinator``: one application's handle on its shared Redis."""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from flexisync._connection import (
    DEFAULT_URL,
    Backend,
    ConnectionSpec,
    RetryPolicy,
    adopt_client,
    build_client,
    parse_url,
    topology_of,
    validate_redis_options,
)
from flexisync._core.context import Context, shared
from flexisync._dispatch import DEFAULT_CALLBACK_THREADS, pool_of, validate_callback_threads
from flexisync._durations import Duration
from flexisync._keys import KeySpace, validate_name
from flexisync.errors import ConfigError

if TYPE_CHECKING:
    from flexisync.breaker import CircuitBreaker
    from flexisync.events import EventBus
    from flexisync.locks import Lock
    from flexisync.rate_limiter import RateLimiter
    from flexisync.semaphores import Semaphore
    from flexisync.state import StateStore
    from flexisync.streams import Stream

__all__ = ["Coordinator", "connect"]



def connect(url: str | None = None, *, namespace: str = "flexisync", client: Any = None,
            retry: RetryPolicy | None = None,
            callback_threads: int = DEFAULT_CALLBACK_THREADS,
            **redis_options: Any) -> Coordinator:
    """Create a :class:`Coordinator`. Opens no connection until the first operation.

    Args:
        url: ``redis://``, ``rediss://``, ``unix://``, ``memory://`` (and, parsed but
            not yet supported, ``redis+sentinel://`` / ``redis+cluster://``). ``None``
            reads ``FLEXISYNC_URL``, else ``redis://localhost:6379/0``.
        namespace: prefix of every key and channel; processes that should share
            objects use the same namespace.
        client: an existing ``redis.Redis`` to use instead of a URL. flexisync talks to
            the same server with the same settings (credentials, TLS, database) over a
            pool of its own whose connections never retry by themselves and cap every
            socket wait by the call's deadline, so the retry and deadline rules hold
            whatever the client; the given client is left untouched and not closed.
        retry: how long to keep retrying while Redis is unreachable.
        callback_threads: how many threads run the callbacks of event subscriptions
            (default 4, started as needed), however many subscriptions there are.
            Coordinators that share a connection (below) share these threads: there
            are as many as the largest number any of them asked for.
        redis_options: extra keyword arguments for ``redis.Redis`` (e.g.
            ``socket_timeout=1.0``), checked before anything is built.

    Coordinators of one process with the same URL, options, retry policy and namespace
    (sync or :func:`flexisync.aio.connect`) share one connection pool, one pub/sub
    listener and one mirror per breaker; the shared part closes with the last of them.

    Raises:
        ConfigError: malformed URL, unknown scheme, bad namespace, an unknown redis
            option (with the closest known name) or a timeout that is not a finite
            number of seconds, ``client`` combined with ``url`` or ``redis_options``,
            or ``callback_threads`` not an int >= 1.
    """
    threads = validate_callback_threads(callback_threads)
    ctx = open_context(url, namespace=namespace, client=client, retry=retry,
                       redis_options=redis_options)
    pool_of(ctx).widen(threads)
    return Coordinator(ctx)


def open_context(url: str | None, *, namespace: str, client: Any, retry: RetryPolicy | None,
                 redis_options: dict[str, Any]) -> Context:
    """Validate ``connect()``'s arguments and return the shared :class:`Context` for
    them (one more reference taken). Both shells' ``connect()`` use it."""
    keys = KeySpace(validate_name(namespace, "namespace"))
    policy = retry if retry is not None else RetryPolicy()
    if not isinstance(policy, RetryPolicy):
        raise ConfigError(f"retry must be a RetryPolicy, not {type(policy).__name__}")
    if client is not None:
        if url is not None or redis_options:
            raise ConfigError("pass either client= or a URL (with redis options), not both")
        cluster = hasattr(client, "nodes_manager")  # redis.RedisCluster, sync or asyncio
        if not (hasattr(client, "connection_pool") or cluster) \
                or not hasattr(client, "execute_command"):
            raise ConfigError(
                "client must be a redis.Redis or redis.RedisCluster instance, "
                f"not {type(client).__name__}"
            )
        if type(client).__module__.startswith("redis.asyncio"):
            if cluster:
                from flexisync._cluster import sync_twin  # noqa: PLC0415

                client = sync_twin(client)
            else:
                client = _sync_twin(client)
        backend = Backend(adopt_client(client), address=_client_address(client),
                          retry=policy)
        return shared(None, lambda: _context(backend, keys, None, None))
    if url is None:
        url = os.environ.get("FLEXISYNC_URL") or DEFAULT_URL
    spec = parse_url(url)
    checked = validate_redis_options(redis_options)
    # Never logged or shown: it holds the password so that two users never share.
    identity = (repr(dataclasses.asdict(spec)), repr(sorted(checked.items())), policy,
                keys.namespace)

    def build() -> Context:
        backend = Backend(build_client(spec, **checked), address=spec.address, retry=policy)
        return _context(backend, keys, spec, identity)

    return shared(identity, build)


def _context(backend: Backend, keys: KeySpace, spec: ConnectionSpec | None,
             identity: Any) -> Context:
    from flexisync.aio._backend import AsyncBackend, async_client_factory  # noqa: PLC0415

    def make_async() -> AsyncBackend:
        return AsyncBackend(async_client_factory(backend.client), address=backend.address,
                            retry=backend.retry)

    return Context(backend, keys, spec=spec, make_async=make_async, identity=identity)


def _sync_twin(client: Any) -> Any:
    """A blocking ``redis.Redis`` with the settings of a ``redis.asyncio.Redis``."""
    import redis  # noqa: PLC0415

    pool = client.connection_pool
    classes = {"UnixDomainSocketConnection": redis.UnixDomainSocketConnection,
               "SSLConnection": redis.SSLConnection, "Connection": redis.Connection}
    base = next((classes[c.__name__] for c in pool.connection_class.__mro__
                 if c.__name__ in classes), redis.Connection)
    kwargs = {k: v for k, v in pool.connection_kwargs.items()
              if k not in {"retry", "redis_connect_func", "event_dispatcher"}}
    return redis.Redis(connection_pool=redis.ConnectionPool(connection_class=base, **kwargs))


def _client_address(client: Any) -> str:
    if hasattr(client, "nodes_manager"):
        from flexisync._cluster import address_of  # noqa: PLC0415

        return address_of(client)
    if topology_of(client) == "sentinel":
        from flexisync._sentinel import address_of as sentinel_address  # noqa: PLC0415

        return sentinel_address(client)
    kwargs = getattr(client.connection_pool, "connection_kwargs", {})
    if "path" in kwargs:
        return f"unix:{kwargs['path']}"
    return f"{kwargs.get('host', '?')}:{kwargs.get('port', '?')}"


class Coordinator:
    """One application's handle on its shared Redis; build it with :func:`connect`.

    Factories (``state``, ``lock``, ``events``, ``stream``, ``breaker``) return objects
    that share their state with every process using the same namespace and name.
    A Coordinator created before ``fork()`` keeps working in the child: it opens new
    connections and threads there and holds none of the parent's locks.
    """

    def __init__(self, ctx: Context) -> None:
        self._ctx = ctx
        self._closed = False
        _warn_if_uwsgi_skips_fork_hooks(ctx.log)

    # --- identity ------------------------------------------------------------------

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
    def client(self) -> Any:
        """The underlying redis-py client (for advanced use; bypasses flexisync errors)."""
        return self._ctx.backend.client

    @property
    def closed(self) -> bool:
        """True once :meth:`close` has run."""
        return self._closed or self._ctx.closed

    def __repr__(self) -> str:
        return f"<Coordinator {self.url} namespace={self.namespace!r}>"

    # --- factories ---------------------------------------------------------------------

    def state(self, scope: str, *, ttl: Duration | None = None) -> StateStore:
        """A :class:`~flexisync.state.StateStore` named ``scope``.

        Args:
            scope: the store's name; the same scope in two processes is the same store.
            ttl: default expiry of written values in seconds (``None``: no expiry).

        Raises:
            ConfigError: bad scope, or ``ttl`` <= 0.
        """
        from flexisync.state import StateStore  # noqa: PLC0415  (keeps import light)

        return StateStore(self._ctx, scope, ttl=ttl)

    def lock(self, name: str, *, ttl: Duration = 30.0, timeout: Duration | None = None,
             auto_renew: bool = False, fair: bool = False,
             on_lost: Callable[[Lock], None] | None = None, replicas: int = 0,
             replicas_timeout: Duration = 1.0) -> Lock:
        """A :class:`~flexisync.locks.Lock` named ``name``. See that class."""
        from flexisync.locks import Lock  # noqa: PLC0415

        return Lock(self._ctx, name, ttl=ttl, timeout=timeout, auto_renew=auto_renew,
                    fair=fair, on_lost=on_lost, replicas=replicas,
                    replicas_timeout=replicas_timeout)

    def semaphore(self, name: str, limit: int, *, lease: Duration = 60.0,
                  timeout: Duration | None = None) -> Semaphore:
        """A fleet-wide :class:`~flexisync.semaphores.Semaphore`. See that class."""
        from flexisync.semaphores import Semaphore  # noqa: PLC0415

        return Semaphore(self._ctx, name, limit, lease=lease, timeout=timeout)

    def rate_limiter(self, name: str, rate: float, *, per: Duration = 60.0,
                     burst: float | None = None) -> RateLimiter:
        """A fleet-wide :class:`~flexisync.rate_limiter.RateLimiter`. See that class."""
        from flexisync.rate_limiter import RateLimiter  # noqa: PLC0415

        return RateLimiter(self._ctx, name, rate, per=per, burst=burst)

    @property
    def events(self) -> EventBus:
        """The :class:`~flexisync.events.EventBus` of this namespace."""
        from flexisync.events import EventBus  # noqa: PLC0415

        return self._ctx.extension("events", EventBus)

    def stream(self, name: str, *, maxlen: int | None = 10_000,
               ttl: Duration | None = 604_800.0) -> Stream:
        """A durable :class:`~flexisync.streams.Stream` named ``name``. See that class.

        Args:
            name: the stream's name; the same name in two processes is the same stream.
            maxlen: about how many events to retain (trimmed in whole nodes); ``None``
                keeps everything.
            ttl: expire the stream this long after its last append, in seconds
                (default 7 days, ``flexisync.streams.DEFAULT_TTL``); ``None`` = never.

        Raises:
            ConfigError: bad name, ``maxlen`` < 1, or ``ttl`` <= 0.
        """
        from flexisync.streams import Stream  # noqa: PLC0415

        return Stream(self._ctx, name, maxlen=maxlen, ttl=ttl)

    def breaker(self, name: str, **policy: Any) -> CircuitBreaker:
        """The :class:`~flexisync.breaker.CircuitBreaker` named ``name``. See that class."""
        from flexisync.breaker import CircuitBreaker  # noqa: PLC0415

        return CircuitBreaker(self._ctx, name, **policy)

    # --- operations --------------------------------------------------------------------

    def ping(self) -> float:
        """Round-trip time of one PING, in seconds.

        Raises:
            BackendUnavailable: Redis did not answer within the retry budget.
        """
        return self._ctx.backend.ping()

    def close(self) -> None:
        """Close this Coordinator. Idempotent.

        Its threads and connections stop when no other Coordinator of this process
        shares them (same URL, options and namespace, sync or asyncio).
        """
        if self._closed:
            return
        self._closed = True
        self._ctx.release()

    def __enter__(self) -> Coordinator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_uwsgi_warned = False


def _warn_if_uwsgi_skips_fork_hooks(log: Any) -> None:
    """Warn once when created in a uWSGI master that will fork without Python's hooks.

    uWSGI forks its workers from C; unless ``py-call-uwsgi-fork-hooks`` (or
    ``lazy-apps``) is set, ``os.register_at_fork`` callbacks never run in the workers.
    flexisync then notices the fork only at a worker's first Redis call (pid check),
    so a breaker mirror or a subscription made in the master waits until then.
    """
    global _uwsgi_warned
    uwsgi = sys.modules.get("uwsgi")
    if uwsgi is None or _uwsgi_warned:
        return
    try:
        options = {k.decode() if isinstance(k, bytes) else str(k) for k in uwsgi.opt}
        in_master = uwsgi.worker_id() == 0
    except Exception:  # a uwsgi module we do not understand: stay quiet
        return
    if in_master and not options & {"py-call-uwsgi-fork-hooks", "lazy-apps", "lazy"}:
        _uwsgi_warned = True
        log.warning("coordinator.uwsgi_fork_hooks_missing",
                    hint="set py-call-uwsgi-fork-hooks = true (or lazy-apps = true)")
