"""Redis Sentinel: clients that follow the master, and ``+switch-master`` handling.

A ``redis+sentinel://`` URL (or a ``connect(client=...)`` whose pool is a
``redis.sentinel.SentinelConnectionPool``) gives a client whose connections go to the
master of one Sentinel service. What this module adds to redis-py's own Sentinel
support is *following* the master:

* **One master address per client** (:class:`MasterAddress`). Every connection of the
  blocking pool, every ``redis.asyncio`` connection and the listener's pub/sub
  connection take it from there when they connect. While the address is *confirmed*
  (a :class:`_Watcher` holds a live ``+switch-master`` subscription on at least one
  sentinel and the last re-check answered) connecting costs nothing extra; otherwise
  every sentinel is asked (``SENTINEL MASTER``) and the answer with the highest
  ``config-epoch`` wins, so a sentinel that has not heard of a failover yet is
  outvoted; when no sentinel answers, the last known address is used.
* **A watcher thread per Context** (``flexisync-sentinel``) subscribes to
  ``+switch-master`` on every sentinel of the URL (so the first announcement counts,
  whichever sentinel makes it, and losing a sentinel loses nothing), re-checks the
  address on every (re)subscription and every :data:`RECHECK` seconds (one
  ``SENTINEL MASTER`` per sentinel), and pings its subscriptions to notice a half-open
  socket.
* **A switch** (an announcement for our service, or a re-check naming a master with a
  newer epoch) at once: records the new address; drops idle pooled connections and
  shuts down the sockets of the ones in use (a reply the old master sends after the
  announcement is not trusted: the call fails or retries, as any connection error);
  aborts the asyncio connections still on the old master (on their own event loops);
  and has the Context's listener reconnect, which resubscribes and runs the reconnect
  hooks (breaker mirrors re-read, lock waiters re-check, stream followers re-fetch
  after their last id). A connection also checks the address before each command it
  sends, so none is sent to the old master once the switch is known. Logged once per
  process as ``sentinel.switch_master`` (addresses only, never a password).

URL query options of ``redis+sentinel://`` (see :func:`parse_url_options`): ``ssl``,
``sentinel_ssl``, ``sentinel_username``, ``sentinel_password``. As in the ``limits``
library, the URL's ``user:password@`` authenticates to the data nodes *and* the
sentinels, unless ``sentinel_username`` / ``sentinel_password`` say otherwise (an empty
``sentinel_password=`` means the sentinels take no password).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import redis
import redis.asyncio
import redis.asyncio.connection as aconnection
import redis.exceptions as rexc
import redis.sentinel
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.connection import SSLConnection
from redis.retry import Retry

from flexisync._connection import CLIENT_DEFAULTS
from flexisync._log import get_logger
from flexisync.errors import ConfigError

if TYPE_CHECKING:
    from flexisync._connection import ConnectionSpec
    from flexisync._core.context import Context

__all__ = ["URL_OPTIONS", "MasterAddress", "address_of", "adopt_client",
           "async_client_factory", "attach", "build_client", "master_of", "parse_url_options",
           "pubsub_connection"]

#: Seconds between two re-checks of the master's address by the watcher.
RECHECK = 5.0
#: Socket timeouts (seconds) of the connections to the sentinels themselves; every
#: wait is also capped by the current call's deadline.
SENTINEL_TIMEOUT = 1.0
#: The channel the sentinels announce a new master on.
SWITCH_CHANNEL = "+switch-master"

_BOOL_TEXT = {"1": True, "true": True, "yes": True, "on": True,
              "0": False, "false": False, "no": False, "off": False}

#: Query options a ``redis+sentinel://`` URL may carry on top of the common ones.
URL_OPTIONS = ("ssl", "sentinel_ssl", "sentinel_username", "sentinel_password")


class Secret(str):
    """A password from a URL's query string: a ``str`` whose ``repr`` hides it."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "'***'"


def parse_url_options(query: dict[str, str]) -> dict[str, Any]:
    """Take the Sentinel-only options out of a ``redis+sentinel://`` URL's query.

    Removes them from ``query`` (the caller parses what is left as common options) and
    returns them parsed:

    * ``ssl`` (bool: ``true``/``false``/``1``/``0``/``yes``/``no``): TLS to the data
      nodes (master and replicas). The common ``ssl_cert_reqs``, ``ssl_ca_certs``,
      ``ssl_certfile``, ``ssl_keyfile`` options apply to every TLS connection.
    * ``sentinel_ssl`` (bool): TLS to the sentinels; default: as ``ssl``.
    * ``sentinel_username``, ``sentinel_password``: credentials for the sentinels;
      default: the URL's ``user:password@`` (which always applies to the data nodes).
      An empty value means none. The password never appears in a repr or message.

    Raises:
        ConfigError: a boolean option that is not a boolean (the value is quoted only
            for non-secret options).
    """
    found: dict[str, Any] = {}
    for key in ("ssl", "sentinel_ssl"):
        if key in query:
            text = query.pop(key)
            value = _BOOL_TEXT.get(text.strip().lower())
            if value is None:
                raise ConfigError(f"URL option {key} must be true or false, got {text!r}")
            found[key] = value
    if "sentinel_username" in query:
        found["sentinel_username"] = query.pop("sentinel_username") or None
    if "sentinel_password" in query:
        found["sentinel_password"] = Secret(query.pop("sentinel_password"))
    return found


# --- the master's address ------------------------------------------------------------


def _address_text(address: tuple[str, int] | None) -> str | None:
    return None if address is None else f"{address[0]}:{address[1]}"


_switch_logged: dict[str, tuple[int, Any, Any]] = {}
_switch_logged_lock = threading.Lock()


class MasterAddress:
    """Where the master of one Sentinel service is, as far as this process knows.

    Shared by a client's blocking pool, its asyncio connections and its listener
    connection. Thread-safe; rebuilt per process after ``fork()`` (:meth:`after_fork`).

    Attributes:
        service: the Sentinel service name.
        address: the last known ``(host, port)``, ``None`` before the first look-up.
        confirmed: True while a watcher subscription vouches for ``address``.
        switches: how many switches this process has followed.
        switched_at: ``time.monotonic()`` of the last switch followed, or ``None``.
    """

    def __init__(self, service: str, sentinels: list[redis.Redis]) -> None:
        self.service = service
        self.sentinels = sentinels
        self.address: tuple[str, int] | None = None
        self.epoch = -1
        self.confirmed = False
        self.switches = 0
        self.switched_at: float | None = None
        self._lock = threading.Lock()
        self._pools: weakref.WeakSet[_FollowingPool] = weakref.WeakSet()
        self._aconns: weakref.WeakSet[Any] = weakref.WeakSet()
        self._callbacks: list[Callable[[], None]] = []
        self._poke: Callable[[], None] | None = None
        self._log = get_logger("sentinel", service=service)

    # -- reading -----------------------------------------------------------------------

    def current(self) -> tuple[str, int] | None:
        """The address while confirmed by a watcher, else ``None`` (then connections
        do not second-guess the address they are on)."""
        return self.address if self.confirmed else None

    def resolve(self) -> tuple[str, int]:
        """The address to connect to: the confirmed one, else the sentinels' answer
        (which may itself be a switch this process had missed), else the last known.

        Raises:
            redis.sentinel.MasterNotFoundError: no sentinel answered and no address
                was ever known (a ``ConnectionError`` raised before anything was sent).
        """
        address = self.address
        if self.confirmed and address is not None:
            return address
        try:
            found, epoch = self.query()
        except rexc.ConnectionError:
            if address is not None:
                return address
            raise
        self.update(found, epoch, via="query")
        return self.address or found

    async def resolve_async(self) -> tuple[str, int]:
        """:meth:`resolve` for the asyncio connections (a look-up runs on a thread)."""
        address = self.address
        if self.confirmed and address is not None:
            return address
        return await asyncio.to_thread(self.resolve)

    def query(self) -> tuple[tuple[str, int], int]:
        """Ask every sentinel where the master is: the answer with the highest
        ``config-epoch`` among those that see a live master.

        Raises:
            redis.sentinel.MasterNotFoundError: no sentinel gave a usable answer.
        """
        best: tuple[tuple[str, int], int] | None = None
        errors: list[str] = []
        for sentinel in self.sentinels:
            try:
                state: Any = sentinel.sentinel_master(self.service)
            except (rexc.RedisError, OSError) as exc:
                errors.append(type(exc).__name__)
                continue
            if not state.get("is_master") or state.get("is_sdown") or state.get("is_odown"):
                continue
            epoch = int(state.get("config-epoch", 0))
            if best is None or epoch > best[1]:
                best = ((str(state["ip"]), int(state["port"])), epoch)
        if best is None:
            why = f" ({', '.join(errors)})" if errors else ""
            raise redis.sentinel.MasterNotFoundError(
                f"Error connecting to the master of {self.service!r}: no sentinel named a "
                f"live master{why}")
        return best

    # -- changing ----------------------------------------------------------------------

    def update(self, address: tuple[str, int], epoch: int | None, *, via: str,
               replaces: tuple[str, int] | None = None) -> bool:
        """Adopt ``address`` (from a re-check with ``epoch``, or an announcement of a
        switch from ``replaces`` when ``epoch`` is ``None``); returns True when that was
        a switch, which is then applied at once (see the module docstring).

        Stale news is ignored: a re-check answer with an older epoch than one already
        seen (that sentinel has not heard of the failover yet), and an announcement of
        a switch away from a master that is not ours (a late echo of an earlier
        failover; the watcher then re-checks)."""
        with self._lock:
            old = self.address
            if epoch is None:  # an announcement: a failover raised the epoch by >= 1
                if address == old or (old is not None and replaces != old):
                    return False
                self.epoch += 1
            else:
                if epoch < self.epoch:
                    return False
                self.epoch = epoch
                if address == old:
                    return False
            self.address = address
            if old is None:
                return False  # the first look-up is no switch
            self.switches += 1
            self.switched_at = time.monotonic()
            pools = list(self._pools)
            aconns = list(self._aconns)
            callbacks = list(self._callbacks)
        for pool in pools:
            pool.follow()
        _abort_async(aconns, address)
        for callback in callbacks:
            try:
                callback()
            except Exception:
                self._log.exception("sentinel.switch_hook_failed")
        self._log_switch(old, address, via)
        return True

    def _log_switch(self, old: tuple[str, int], new: tuple[str, int], via: str) -> None:
        entry = (os.getpid(), old, new)
        with _switch_logged_lock:  # once per process, however many clients follow it
            if _switch_logged.get(self.service) == entry:
                return
            _switch_logged[self.service] = entry
        self._log.warning("sentinel.switch_master", old=_address_text(old),
                          new=_address_text(new), via=via)

    def suspect(self) -> None:
        """A connection met a replica where the master should be: stop trusting the
        address and have the watcher re-check now."""
        self.confirmed = False
        poke = self._poke
        if poke is not None:
            poke()

    def add_pool(self, pool: _FollowingPool) -> None:
        with self._lock:
            self._pools.add(pool)

    def add_async_connection(self, conn: Any) -> None:
        with self._lock:
            self._aconns.add(conn)

    def on_switch(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback()`` after each switch; returns a function removing it."""
        with self._lock:
            self._callbacks.append(callback)

        def remove() -> None:
            with self._lock:
                if callback in self._callbacks:
                    self._callbacks.remove(callback)

        return remove

    def after_fork(self) -> None:
        """In a forked child: a fresh lock; the address is kept but unconfirmed until
        the child's own watcher subscribed."""
        self._lock = threading.Lock()
        self.confirmed = False
        self._aconns = weakref.WeakSet()

    def close(self) -> None:
        """Close the connections to the sentinels (this process only)."""
        for sentinel in self.sentinels:
            with contextlib.suppress(rexc.RedisError, OSError):
                sentinel.close()


def _abort_async(conns: list[Any], address: tuple[str, int]) -> None:
    """Abort, on their own loops, asyncio connections not on ``address``."""
    by_loop: dict[Any, list[Any]] = {}
    for conn in conns:
        loop = getattr(conn, "_fx_loop", None)
        if loop is not None and (conn.host, conn.port) != address:
            by_loop.setdefault(loop, []).append(conn)
    for loop, found in by_loop.items():
        with contextlib.suppress(RuntimeError):  # a closed loop: nothing to abort
            loop.call_soon_threadsafe(_abort_on_loop, found, address)


def _abort_on_loop(conns: list[Any], address: tuple[str, int]) -> None:
    for conn in conns:
        writer = getattr(conn, "_writer", None)
        if writer is not None and (conn.host, conn.port) != address:
            with contextlib.suppress(Exception):
                writer.transport.abort()


# --- blocking connections and pool ---------------------------------------------------


class _Proxy(redis.sentinel.SentinelConnectionPoolProxy):
    """The pool's view of the master: :class:`MasterAddress` instead of a sentinel
    query per new connection."""

    master: MasterAddress

    def get_master_address(self) -> tuple[str, int]:
        address = self.master.resolve()
        self.master_address = address
        return address


class _ResolvingConnection(redis.sentinel.SentinelManagedConnection):
    """Connects to the master :class:`MasterAddress` names (the listener's kind)."""

    def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().read_response(*args, **kwargs)
        except rexc.ConnectionError as exc:
            if "previous master is now a slave" in str(exc):
                self.connection_pool.master.suspect()
            raise


class _FollowingConnection(_ResolvingConnection):
    """A pooled connection: before each command, if the confirmed master is no longer
    the server this connection is on, reconnect (to the master) first."""

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        if getattr(self, "_sock", None) is not None:
            at = self.connection_pool.master.current()
            if at is not None and at != (self.host, self.port):
                self.disconnect()  # type: ignore[no-untyped-call]
        super().send_packed_command(command, check_health)  # type: ignore[no-untyped-call]


class _ResolvingSSLConnection(_ResolvingConnection, SSLConnection):
    pass


class _FollowingSSLConnection(_FollowingConnection, SSLConnection):
    pass


class _FollowingPool(redis.sentinel.SentinelConnectionPool):
    """A ``SentinelConnectionPool`` whose master address is a :class:`MasterAddress`."""

    def __init__(self, master: MasterAddress, **kwargs: Any) -> None:
        super().__init__(master.service, None, **kwargs)  # type: ignore[no-untyped-call]
        proxy = _Proxy(  # type: ignore[no-untyped-call]
            connection_pool=self, is_master=True, check_connection=self.check_connection,
            service_name=master.service, sentinel_manager=None)
        proxy.master = master
        self.proxy = proxy
        self.connection_kwargs["connection_pool"] = proxy
        self.fx_master = master
        master.add_pool(self)

    def follow(self) -> None:
        """The master moved (to ``fx_master.address``): idle connections are closed;
        connections in use elsewhere have their socket shut down (their owner thread
        sees a connection error and disconnects; the next command reconnects)."""
        address = self.fx_master.address
        self.proxy.master_address = address
        with self._lock:
            for conn in self._available_connections:
                conn.disconnect()
            in_use = list(self._in_use_connections)
        for conn in in_use:
            sock = getattr(conn, "_sock", None)
            if sock is not None and (conn.host, conn.port) != address:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


# --- building clients ----------------------------------------------------------------


def _sentinel_clients(endpoints: list[tuple[type, dict[str, Any]]]) -> list[redis.Redis]:
    """Clients on the sentinels: deadline-capped connections, redis-py retries off."""
    from flexisync._connection import _deadline_class  # noqa: PLC0415

    clients = []
    for cls, given in endpoints:
        kwargs = {k: v for k, v in given.items()
                  if not k.startswith(("maint_notifications", "orig_"))}
        kwargs["retry"] = Retry(NoBackoff(), 0)
        kwargs["decode_responses"] = True
        kwargs["protocol"] = 2
        pool = redis.ConnectionPool(connection_class=_deadline_class(cls), **kwargs)
        clients.append(redis.Redis(connection_pool=pool))
    return clients


def _client(service: str, endpoints: list[tuple[type, dict[str, Any]]], ssl: bool,
            kwargs: dict[str, Any], max_connections: int | None) -> redis.Redis:
    """A ``redis.Redis`` over a :class:`_FollowingPool` for ``service``."""
    from flexisync._connection import _deadline_class  # noqa: PLC0415

    master = MasterAddress(service, _sentinel_clients(endpoints))
    kwargs = {k: v for k, v in kwargs.items()
              if k not in ("host", "port", "connection_pool", "path")
              and not k.startswith(("maint_notifications", "orig_"))}  # the user's pool's
    kwargs["retry"] = Retry(NoBackoff(), 0)  # retries happen in Backend.call only
    base = _FollowingSSLConnection if ssl else _FollowingConnection
    options: dict[str, Any] = {"connection_class": _deadline_class(base)}
    if max_connections is not None:
        options["max_connections"] = max_connections
    pool = _FollowingPool(master, **options, **kwargs)
    return redis.Redis(connection_pool=pool)


def _connection_settings(options: dict[str, Any]) -> tuple[type, dict[str, Any]]:
    """The connection class and kwargs ``redis.Redis(**options)`` would use (no I/O)."""
    probe = redis.Redis(**options)
    pool = probe.connection_pool
    return pool.connection_class, dict(pool.connection_kwargs)


def build_client(spec: ConnectionSpec, options: dict[str, Any]) -> Any:
    """A blocking client for a ``redis+sentinel://`` URL (``options``: the validated
    ``connect(**redis_options)``, which override the URL's).

    Defaults as for one server: 5 s socket timeout, 2 s connect timeout, keep-alive,
    RESP2, redis-py's retries off, every socket wait capped by the call's deadline.

    Raises:
        ConfigError: an option that makes no sense here (``host``, ``port``,
            ``unix_socket_path``), or ``ssl_*`` file options without TLS.
    """
    for key in ("host", "port", "unix_socket_path"):
        if key in options:
            raise ConfigError(f"redis option {key!r} cannot be used with redis+sentinel://: "
                              "the sentinels name the master")
    url_options = dict(spec.options)
    sentinel_ssl = url_options.pop("sentinel_ssl", None)
    has_user = "sentinel_username" in url_options
    has_password = "sentinel_password" in url_options
    sentinel_user = url_options.pop("sentinel_username", None)
    sentinel_password = url_options.pop("sentinel_password", None)
    data: dict[str, Any] = {
        **CLIENT_DEFAULTS,
        "db": spec.db,
        "username": spec.username,
        "password": spec.password,
    }
    data.update(url_options)
    data.update(options)
    ssl = bool(data.get("ssl", False))
    tls_files = {k: v for k, v in data.items() if k.startswith("ssl_")}
    if tls_files and not ssl and not sentinel_ssl:
        raise ConfigError(f"URL option {sorted(tls_files)[0]} needs TLS: add ssl=true "
                          "(data nodes) and/or sentinel_ssl=true (sentinels)")
    if not ssl:
        for key in tls_files:
            data.pop(key)
    max_connections = data.pop("max_connections", None)
    cls, kwargs = _connection_settings(data)
    sentinel: dict[str, Any] = {
        "socket_timeout": SENTINEL_TIMEOUT,
        "socket_connect_timeout": SENTINEL_TIMEOUT,
        "socket_keepalive": True,
        "protocol": 2,
        "username": sentinel_user if has_user else spec.username,
        "password": (sentinel_password or None) if has_password else spec.password,
        "ssl": ssl if sentinel_ssl is None else bool(sentinel_ssl),
    }
    if sentinel["ssl"]:
        sentinel.update(tls_files)
    scls, skwargs = _connection_settings(sentinel)
    endpoints = []
    for host, port in spec.hosts:
        endpoint = dict(skwargs)
        endpoint.update(host=host, port=port)
        endpoints.append((scls, endpoint))
    return _client(str(spec.service), endpoints, issubclass(cls, SSLConnection), kwargs,
                   max_connections)


def adopt_client(client: Any) -> Any:
    """The client flexisync uses for a user's sentinel-managed ``redis.Redis``
    (``sentinel.master_for(service)``): one of its own over the same sentinels, service
    and connection settings, following the master as a URL's client does. The user's
    client is left untouched.

    Raises:
        ConfigError: the client is a replica client (``slave_for``): flexisync writes.
    """
    pool = client.connection_pool
    if not getattr(pool, "is_master", True):
        raise ConfigError("connect(client=...) got a replica client (sentinel.slave_for); "
                          "flexisync writes, so pass sentinel.master_for(service)")
    manager = pool.sentinel_manager
    endpoints = [(s.connection_pool.connection_class, dict(s.connection_pool.connection_kwargs))
                 for s in manager.sentinels]
    max_connections = getattr(pool, "max_connections", None)
    if not isinstance(max_connections, int) or max_connections >= 2**31 - 1:
        max_connections = None
    return _client(pool.service_name, endpoints,
                   issubclass(pool.connection_class, SSLConnection),
                   dict(pool.connection_kwargs), max_connections)


def address_of(client: Any) -> str:
    """``h1:26379,h2:26379/service`` for a sentinel-managed ``redis.Redis`` (messages)."""
    pool = client.connection_pool
    hosts = ",".join(f"{k.get('host')}:{k.get('port')}" for k in (
        s.connection_pool.connection_kwargs for s in pool.sentinel_manager.sentinels))
    return f"{hosts}/{pool.service_name}"


def master_of(client: Any) -> MasterAddress:
    """The :class:`MasterAddress` of a client this module built.

    Raises:
        ConfigError: ``client`` was not built by this module.
    """
    master = getattr(getattr(client, "connection_pool", None), "fx_master", None)
    if not isinstance(master, MasterAddress):
        raise ConfigError("this client was not built by flexisync for Sentinel")
    return master


def pubsub_connection(client: Any) -> Any:
    """A fresh connection to the current master, outside the pool, for the listener.

    Not second-guessed before each command (the listener owns its connection's
    state); on a switch the listener is told to reconnect instead.
    """
    pool = client.connection_pool
    from flexisync._connection import _deadline_class  # noqa: PLC0415

    ssl = issubclass(pool.connection_class, SSLConnection)
    cls = _deadline_class(_ResolvingSSLConnection if ssl else _ResolvingConnection)
    kwargs = dict(pool.connection_kwargs)
    kwargs["decode_responses"] = False
    kwargs["health_check_interval"] = 0
    kwargs["protocol"] = 2
    kwargs["socket_timeout"] = 10.0  # reads only follow can_read(); this bounds a stall
    return cls(**kwargs)


# --- asyncio -------------------------------------------------------------------------


class _AsyncFollowing:
    """Mixin for ``redis.asyncio`` connections: connect to the master the
    :class:`MasterAddress` names; before each command, reconnect if it moved."""

    fx_master: MasterAddress
    host: str
    port: int
    is_connected: bool

    async def connect_check_health(self, check_health: bool = True,
                                   retry_socket_connect: bool = True) -> None:
        if self.is_connected:
            return
        self.host, self.port = await self.fx_master.resolve_async()
        await super().connect_check_health(  # type: ignore[misc]
            check_health=check_health, retry_socket_connect=retry_socket_connect)
        self._fx_loop = asyncio.get_running_loop()
        self.fx_master.add_async_connection(self)

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        if self.is_connected:
            at = self.fx_master.current()
            if at is not None and at != (self.host, self.port):
                await self.disconnect()  # type: ignore[attr-defined]
        await super().send_packed_command(command, check_health)  # type: ignore[misc]


_async_classes: dict[tuple[int, bool], type] = {}


def async_client_factory(client: Any) -> Callable[[], Any]:
    """A function building a ``redis.asyncio`` client like the blocking ``client`` (one
    per event loop, as ``AsyncBackend`` asks): the same service, settings and
    :class:`MasterAddress`, so it follows every switch the watcher sees.

    Raises:
        ConfigError: ``client`` was not built by this module.
    """
    from flexisync.aio._backend import _accepted  # noqa: PLC0415

    master = master_of(client)
    pool = client.connection_pool
    ssl = issubclass(pool.connection_class, SSLConnection)
    key = (id(master), ssl)
    cls = _async_classes.get(key)
    if cls is None or cls.fx_master is not master:  # type: ignore[attr-defined]
        base = aconnection.SSLConnection if ssl else aconnection.Connection
        cls = _async_classes[key] = type(f"Following{base.__name__}", (_AsyncFollowing, base),
                                         {"fx_master": master})
    accepted = _accepted(cls)
    kwargs = {k: v for k, v in pool.connection_kwargs.items()
              if k in accepted and k not in ("host", "port", "connection_pool")}
    kwargs["retry"] = AsyncRetry(NoBackoff(), 0)  # retries happen in AsyncBackend.call
    kwargs["socket_timeout"] = None  # AsyncBackend bounds every await (see _backend)

    def build() -> Any:
        apool = redis.asyncio.ConnectionPool(connection_class=cls, **kwargs)
        return redis.asyncio.Redis(connection_pool=apool)

    return build


def attach(ctx: Context) -> None:
    """Start following the sentinels' ``+switch-master`` for ``ctx``: a watcher thread
    (stopped by the Context's close, rebuilt after fork) and, on each switch, the
    listener's reconnect. A no-op for a client this module did not build."""
    client = ctx.backend.client
    master = getattr(getattr(client, "connection_pool", None), "fx_master", None)
    if not isinstance(master, MasterAddress):
        return
    endpoints = [(s.connection_pool.connection_class, dict(s.connection_pool.connection_kwargs))
                 for s in master.sentinels]
    from flexisync._sentinel_watcher import Watcher  # noqa: PLC0415

    watcher = Watcher(master, endpoints)

    def reconnect_listener() -> None:
        listener = ctx.listener_if_started
        if listener is not None:
            listener.reconnect()

    master.on_switch(reconnect_listener)
    ctx.extension("sentinel.watcher", lambda _ctx: watcher)

    def close() -> None:
        watcher.stop()
        master.close()

    ctx.on_close(close)
    ctx.on_fork(watcher.after_fork)
    watcher.start()
