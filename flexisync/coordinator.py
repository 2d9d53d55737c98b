"""``connect()`` and the ``Coordinator``: one application's handle on its shared Redis."""

from __future__ import annotations

import os
import sys
import threading
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar, cast

from flexisync._connection import (
    DEFAULT_URL,
    Backend,
    ConnectionSpec,
    RetryPolicy,
    adopt_client,
    build_client,
    parse_url,
)
from flexisync._durations import Duration, optional_seconds, seconds
from flexisync._keys import KeySpace, validate_name
from flexisync._listener import Listener
from flexisync._log import get_logger
from flexisync.errors import ConfigError

if TYPE_CHECKING:
    from flexisync.breaker import CircuitBreaker
    from flexisync.events import EventBus
    from flexisync.locks import Lock
    from flexisync.state import StateStore
    from flexisync.streams import Stream

__all__ = ["Coordinator", "connect"]

_T = TypeVar("_T")

_live: weakref.WeakSet[Coordinator] = weakref.WeakSet()
_fork_hook_installed = False
_install_lock = threading.Lock()


def connect(url: str | None = None, *, namespace: str = "flexisync", client: Any = None,
            retry: RetryPolicy | None = None, **redis_options: Any) -> Coordinator:
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
        redis_options: extra keyword arguments for ``redis.Redis`` (e.g.
            ``socket_timeout=1.0``), checked before anything is built.

    Raises:
        ConfigError: malformed URL, unknown scheme, bad namespace, an unknown redis
            option (with the closest known name) or a timeout that is not a finite
            number of seconds, or ``client`` combined with ``url`` or ``redis_options``.
    """
    keys = KeySpace(validate_name(namespace, "namespace"))
    policy = retry if retry is not None else RetryPolicy()
    if not isinstance(policy, RetryPolicy):
        raise ConfigError(f"retry must be a RetryPolicy, not {type(policy).__name__}")
    if client is not None:
        if url is not None or redis_options:
            raise ConfigError("pass either client= or a URL (with redis options), not both")
        if not hasattr(client, "connection_pool") or not hasattr(client, "execute_command"):
            raise ConfigError(
                f"client must be a redis.Redis instance, not {type(client).__name__}"
            )
        backend = Backend(adopt_client(client), address=_client_address(client),
                          retry=policy)
        return Coordinator(backend, keys, spec=None)
    if url is None:
        url = os.environ.get("FLEXISYNC_URL") or DEFAULT_URL
    spec = parse_url(url)
    backend = Backend(build_client(spec, **redis_options), address=spec.address, retry=policy)
    return Coordinator(backend, keys, spec=spec)


def _client_address(client: Any) -> str:
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

    def __init__(self, backend: Backend, keys: KeySpace, *, spec: ConnectionSpec | None) -> None:
        self._backend = backend
        self._keys = keys
        self._spec = spec
        self._log = get_logger("coordinator", namespace=keys.namespace)
        self._lock = threading.RLock()  # RLock: an extension's factory may use the listener
        self._listener_obj: Listener | None = None
        self._extensions: dict[str, Any] = {}
        self._events_obj: EventBus | None = None
        self._fork_hooks: list[Callable[[], None]] = []
        self._close_hooks: list[Callable[[], None]] = []
        self._closed = False
        self.fork_generation = 0
        backend.on_fork = self._after_fork
        _install_fork_hook()
        _live.add(self)
        _warn_if_uwsgi_skips_fork_hooks(self._log)

    # --- identity ------------------------------------------------------------------

    @property
    def namespace(self) -> str:
        """The prefix of every key and channel this Coordinator uses."""
        return self._keys.namespace

    @property
    def url(self) -> str:
        """The connection URL with any password replaced by ``***``."""
        return self._spec.redacted() if self._spec is not None else self._backend.address

    @property
    def client(self) -> Any:
        """The underlying redis-py client (for advanced use; bypasses flexisync errors)."""
        return self._backend.client

    @property
    def closed(self) -> bool:
        """True once :meth:`close` has run."""
        return self._closed

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

        return StateStore(self, validate_name(scope, "scope"),
                          ttl=optional_seconds(ttl, "ttl"))

    def lock(self, name: str, *, ttl: Duration = 30.0, timeout: Duration | None = None,
             auto_renew: bool = False, fair: bool = False,
             on_lost: Callable[[Lock], None] | None = None) -> Lock:
        """A :class:`~flexisync.locks.Lock` named ``name``. See that class."""
        from flexisync.locks import Lock  # noqa: PLC0415

        return Lock(self, validate_name(name, "lock name"), ttl=seconds(ttl, "ttl"),
                    timeout=optional_seconds(timeout, "timeout", allow_zero=True),
                    auto_renew=auto_renew, fair=fair, on_lost=on_lost)

    @property
    def events(self) -> EventBus:
        """The :class:`~flexisync.events.EventBus` of this namespace."""
        bus = self._events_obj
        if bus is None:
            from flexisync.events import EventBus  # noqa: PLC0415

            with self._lock:
                if self._events_obj is None:
                    self._events_obj = EventBus(self)
                bus = self._events_obj
        return bus

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

        return Stream(self, validate_name(name, "stream name"), maxlen=maxlen,
                      ttl=optional_seconds(ttl, "ttl"))

    def breaker(self, name: str, **policy: Any) -> CircuitBreaker:
        """The :class:`~flexisync.breaker.CircuitBreaker` named ``name``. See that class."""
        from flexisync.breaker import CircuitBreaker  # noqa: PLC0415

        return CircuitBreaker(self, validate_name(name, "breaker name"), **policy)

    # --- operations --------------------------------------------------------------------

    def ping(self) -> float:
        """Round-trip time of one PING, in seconds.

        Raises:
            BackendUnavailable: Redis did not answer within the retry budget.
        """
        return self._backend.ping()

    def close(self) -> None:
        """Stop this Coordinator's threads and close its connections. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for hook in reversed(self._close_hooks):
            try:
                hook()
            except Exception:
                self._log.exception("coordinator.close_hook_failed")
        if self._listener_obj is not None:
            self._listener_obj.close()
        self._backend.closed = True
        self._backend.close()

    def __enter__(self) -> Coordinator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- internal, for the primitives --------------------------------------------------

    @property
    def _listener(self) -> Listener:
        listener = self._listener_obj
        if listener is None:
            with self._lock:
                if self._listener_obj is None:
                    self._listener_obj = Listener(self._backend)
                listener = self._listener_obj
        return listener

    def _extension(self, key: str, factory: Callable[[Coordinator], _T]) -> _T:
        """The one per-Coordinator helper object under ``key``, built by ``factory`` once.

        Primitives keep their process-wide machinery here (the lock watchdog, the breaker
        hub), so it lives and dies with the Coordinator.
        """
        found = self._extensions.get(key)
        if found is None:
            with self._lock:
                found = self._extensions.get(key)
                if found is None:
                    found = self._extensions[key] = factory(self)
        return cast(_T, found)

    def _on_fork(self, hook: Callable[[], None]) -> None:
        """Run ``hook()`` in a forked child, after connections and listener are reset."""
        self._fork_hooks.append(hook)

    def _on_close(self, hook: Callable[[], None]) -> None:
        """Run ``hook()`` first thing in :meth:`close` (stop threads before sockets)."""
        self._close_hooks.append(hook)

    def _after_fork(self) -> None:
        self._backend.pid = os.getpid()
        self._lock = threading.RLock()
        self.fork_generation += 1
        if self._closed:
            return
        if self._listener_obj is not None:
            self._listener_obj.after_fork()
        for hook in self._fork_hooks:
            try:
                hook()
            except Exception:
                self._log.exception("coordinator.fork_hook_failed")


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


def _after_fork_in_child() -> None:
    for coordinator in list(_live):
        coordinator._after_fork()


def _install_fork_hook() -> None:
    global _fork_hook_installed
    with _install_lock:
        if not _fork_hook_installed and hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=_after_fork_in_child)
            _fork_hook_installed = True

