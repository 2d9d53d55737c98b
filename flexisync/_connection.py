"""URL parsing, client construction, the retry policy and the one error boundary.

Every Redis call a public method makes goes through :meth:`Backend.call` (or
:meth:`Backend.script`), which

* runs the call directly when nothing fails (no retry machinery on the hot path);
* bounds its wall time: one absolute deadline per call (``RetryPolicy.deadline``, or a
  sooner one the caller passes) caps every socket wait of every attempt, through a
  connection class that narrows the socket timeout to the time left;
* retries transient connection errors with jittered exponential backoff spread over
  that deadline, but retries a non-idempotent call only when the error
  happened before the command was sent;
* translates what is left into flexisync errors with ``raise ... from exc``, reporting
  the true attempts and elapsed time.

redis-py's own per-command retry is switched off on every client flexisync uses, the
ones it builds and the ones it adopts (``connect(client=...)``), so that a retry happens
in exactly one place.
"""

from __future__ import annotations

import contextlib
import contextvars
import difflib
import inspect
import os
import random
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from importlib import resources
from typing import Any, TypeVar
from urllib.parse import parse_qsl, unquote, urlsplit

import redis
import redis.exceptions as rexc
import redis.sentinel
from redis.backoff import NoBackoff
from redis.retry import Retry

from flexisync._durations import seconds
from flexisync._log import get_logger
from flexisync.errors import BackendError, BackendUnavailable, ConfigError

__all__ = [
    "Backend",
    "ConnectionSpec",
    "RetryPolicy",
    "adopt_client",
    "build_client",
    "parse_url",
    "validate_redis_options",
]

T = TypeVar("T")

DEFAULT_URL = "redis://localhost:6379/0"
SCHEMES = ("redis", "rediss", "unix", "redis+sentinel", "redis+cluster", "memory")

# Query-string options a URL may carry, with their parsers.
_FLOAT_OPTIONS = ("socket_timeout", "socket_connect_timeout", "health_check_interval")
_INT_OPTIONS = ("max_connections",)
_STR_OPTIONS = ("client_name", "ssl_cert_reqs", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile")


@dataclass(frozen=True)
class ConnectionSpec:
    """A parsed connection URL. ``password`` never appears in ``repr`` or messages."""

    scheme: str
    host: str | None = None
    port: int | None = None
    path: str | None = None
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    hosts: tuple[tuple[str, int], ...] = ()
    service: str | None = None
    name: str = ""
    options: Mapping[str, Any] = field(default_factory=dict)

    def redacted(self) -> str:
        """The URL with any password replaced by ``***``; safe for logs and errors."""
        auth = ""
        if self.username or self.password:
            auth = (self.username or "") + (":***" if self.password else "") + "@"
        if self.scheme == "unix":
            return f"unix://{auth}{self.path}?db={self.db}"
        if self.scheme == "memory":
            return f"memory://{self.name}"
        if self.hosts:
            hosts = ",".join(f"{h}:{p}" for h, p in self.hosts)
            tail = f"/{self.service}/{self.db}" if self.service else ""
            return f"{self.scheme}://{auth}{hosts}{tail}"
        return f"{self.scheme}://{auth}{self.host}:{self.port}/{self.db}"

    @property
    def address(self) -> str:
        """Where the server is, without credentials or scheme."""
        if self.scheme == "unix":
            return f"unix:{self.path}"
        if self.scheme == "memory":
            return f"memory://{self.name}"
        if self.hosts:
            return ",".join(f"{h}:{p}" for h, p in self.hosts)
        return f"{self.host}:{self.port}"


def parse_url(url: object) -> ConnectionSpec:
    """Parse a flexisync connection URL.

    Supported: ``redis://[user:pass@]host[:port][/db]``, ``rediss://`` (TLS),
    ``unix:///path/to.sock?db=N``, ``redis+sentinel://h1:26379,h2:26379/service/db``,
    ``redis+cluster://h1:7000,h2:7001`` and ``memory://[name]``. Query options:
    ``socket_timeout``, ``socket_connect_timeout``, ``health_check_interval`` (seconds),
    ``max_connections``, ``client_name`` and the ``ssl_*`` file options;
    ``redis+sentinel://`` also takes ``ssl``, ``sentinel_ssl``, ``sentinel_username``
    and ``sentinel_password`` (:func:`flexisync._sentinel.parse_url_options`).

    Raises:
        ConfigError: the URL is not a string, has an unknown scheme, a bad port, a bad
            database number, a missing host or path, or an unknown option. The message
            never contains the password.
    """
    if not isinstance(url, str):
        raise ConfigError(f"URL must be a str, not {type(url).__name__}")
    if "://" not in url:
        raise ConfigError(
            f"URL has no scheme: expected one of {', '.join(s + '://' for s in SCHEMES)}"
        )
    scheme = url.split("://", 1)[0].lower()
    if scheme not in SCHEMES:
        # Quote the scheme only when it looks like one: text before "://" may hold a
        # password (``user:pw@redis://...``), and no part of one is ever echoed.
        shown = f" {scheme!r}" if re.fullmatch(r"[a-z][a-z0-9+.-]{0,30}", scheme) else ""
        raise ConfigError(
            f"unknown URL scheme{shown}: expected one of "
            f"{', '.join(s + '://' for s in SCHEMES)}"
        )
    if scheme == "memory":
        name = url.split("://", 1)[1].strip("/")
        return ConnectionSpec(scheme="memory", name=name)
    username, password, rest = _split_userinfo(scheme, url.split("://", 1)[1])
    if scheme in ("redis+sentinel", "redis+cluster"):
        return _parse_multi_host(scheme, rest, username, password)
    # From here on no text of the URL can contain the password: it was cut off above.
    parts = urlsplit(f"{scheme}://{rest}")
    try:
        port = parts.port
    except ValueError:
        raise ConfigError(
            f"malformed {scheme}:// URL: the port is not a number from 1 to 65535") from None
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    query_db = query.pop("db", None)
    if scheme == "unix":
        path = unquote(parts.path)
        if not path:
            raise ConfigError("unix:// URL needs a socket path, e.g. unix:///run/redis.sock")
        db = _parse_db(query_db if query_db is not None else "0")
        return ConnectionSpec(scheme=scheme, path=path, db=db, username=username,
                              password=password, options=_parse_options(query))
    if not parts.hostname:
        raise ConfigError(f"{scheme}:// URL needs a host, e.g. {scheme}://localhost:6379/0")
    path_db = parts.path.lstrip("/")
    db = _parse_db(path_db or query_db or "0")
    if path_db and query_db is not None and _parse_db(query_db) != db:
        raise ConfigError(
            f"{scheme}:// URL names the database twice, differently: /{path_db} in the path "
            f"and ?db={query_db} in the query"
        )
    return ConnectionSpec(
        scheme=scheme, host=parts.hostname, port=port or 6379, db=db,
        username=username, password=password, options=_parse_options(query),
    )


def _split_userinfo(scheme: str, rest: str) -> tuple[str | None, str | None, str]:
    """Cut ``user:password@`` off the part of a URL after ``scheme://``.

    The userinfo ends at the last ``@``. A ``/``, ``?`` or ``#`` before that ``@``
    means the password (or username) holds a reserved character that was not
    percent-encoded; the URL cannot be read unambiguously, so it is refused with a
    message that quotes nothing from it.

    Returns:
        ``(username, password, rest)`` with both decoded, ``None`` when absent.
    """
    if "@" not in rest:
        return None, None, rest
    userinfo, _, after = rest.rpartition("@")
    if any(c in userinfo for c in "/?#"):
        raise ConfigError(
            f"{scheme}:// URL has a '/', '?' or '#' before its last '@': percent-encode "
            "reserved characters in the username and password ('/' as %2F, '?' as %3F, "
            "'#' as %23, '@' as %40, ':' in a username as %3A)"
        )
    user, _, pw = userinfo.partition(":")
    return (unquote(user) or None), (unquote(pw) or None), after


def _parse_multi_host(scheme: str, rest: str, username: str | None,
                      password: str | None) -> ConnectionSpec:
    rest, _, query_text = rest.partition("?")
    netloc, _, path = rest.partition("/")
    if not netloc:
        raise ConfigError(f"{scheme}:// URL needs at least one host:port")
    default_port = 26379 if scheme == "redis+sentinel" else 6379
    hosts = tuple(_parse_host_port(h, default_port, scheme) for h in netloc.split(","))
    service = None
    db = 0
    segments = [s for s in path.split("/") if s]
    if scheme == "redis+sentinel":
        if not segments:
            raise ConfigError(
                "redis+sentinel:// URL needs a service name: "
                "redis+sentinel://h1:26379,h2:26379/mymaster/0"
            )
        service = unquote(segments[0])
        if len(segments) > 1:
            db = _parse_db(segments[1])
    elif segments:
        raise ConfigError("redis+cluster:// URL takes no database path (a cluster has only db 0)")
    query = dict(parse_qsl(query_text, keep_blank_values=True))
    extra: dict[str, Any] = {}
    if scheme == "redis+sentinel":  # ssl, sentinel_ssl, sentinel_username/_password
        from flexisync import _sentinel  # noqa: PLC0415

        extra = _sentinel.parse_url_options(query)
    options = {**_parse_options(query), **extra}
    return ConnectionSpec(scheme=scheme, hosts=hosts, service=service, db=db,
                          username=username, password=password, options=options)


def _parse_host_port(text: str, default: int, scheme: str) -> tuple[str, int]:
    host, sep, port_text = text.rpartition(":")
    if not sep:
        host, port_text = text, str(default)
    if not host:
        raise ConfigError(f"{scheme}:// URL has an empty host in {text!r}")
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigError(f"{scheme}:// URL has a non-numeric port {port_text!r}") from None
    if not 0 < port < 65536:
        raise ConfigError(f"{scheme}:// URL port {port} is outside 1-65535")
    return host, port


def _parse_db(text: str) -> int:
    try:
        db = int(text)
    except ValueError:
        raise ConfigError(f"database must be a non-negative integer, got {text!r}") from None
    if db < 0:
        raise ConfigError(f"database must be a non-negative integer, got {db}")
    return db


def _parse_options(query: Mapping[str, str]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for key, text in query.items():
        if key in _FLOAT_OPTIONS:
            options[key] = seconds(_number(key, text), key, allow_zero=True)
        elif key in _INT_OPTIONS:
            value = int(_number(key, text))
            if value <= 0:
                raise ConfigError(f"URL option {key} must be > 0, got {value}")
            options[key] = value
        elif key in _STR_OPTIONS:
            options[key] = text
        else:
            known = ", ".join((*_FLOAT_OPTIONS, *_INT_OPTIONS, *_STR_OPTIONS))
            raise ConfigError(f"unknown URL option {key!r}; known options: {known}")
    return options


def _number(key: str, text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"URL option {key} must be a number, got {text!r}") from None


# --- deadlines on the socket ------------------------------------------------------------

#: The absolute ``time.monotonic()`` instant by which the current Redis call must end,
#: set by :meth:`Backend.call` around each attempt. A ContextVar, so each thread (and,
#: later, each asyncio task) has its own.
_DEADLINE: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "flexisync_deadline", default=None)

#: The shortest socket wait an attempt is given, so that a nearly spent deadline still
#: fails as a timeout rather than as a zero-timeout (non-blocking) socket error.
_MIN_WAIT = 0.001

#: How much later than its deadline a socket wait may end, to spare a system call per
#: command: the socket's timeout is narrowed only when it would overshoot by more.
_OVERSHOOT = 0.05


class _DeadlineMixin:
    """Caps every socket wait of a redis-py connection by the current call's deadline.

    redis-py gives each connection one fixed ``socket_timeout``; a call with a 3 s
    deadline on a 5 s socket would wait 5 s on a hung server, and a retry another 5 s.
    This mixin narrows the socket's timeout to the time left before each send, each
    read and each connect. ``settimeout`` costs a system call, so the socket is touched
    only when the time left differs from what is set by more than a small tolerance
    (never more than :data:`_OVERSHOOT` late, never early by more than a quarter of
    the time left): in steady state, with one deadline after another of the same
    length, no call touches the socket at all. Code outside a deadline (the listener,
    users of ``Coordinator.client``) gets the connection's own timeout back.
    """

    socket_timeout: float | None
    socket_connect_timeout: float | None
    _sock: Any
    _fx_timeout: float | None = None  # what the socket is capped to; None: its own

    def _left(self) -> float | None:
        at = _DEADLINE.get()
        if at is None:
            return None
        left = at - time.monotonic()
        if left <= 0:
            raise rexc.TimeoutError("flexisync deadline reached before the command was sent")
        return max(left, _MIN_WAIT)

    def _cap(self) -> None:
        sock = self._sock
        if sock is None:
            return
        at = _DEADLINE.get()  # _left() inlined: this runs twice per command
        if at is None:
            left = None
        else:
            left = at - time.monotonic()
            if left <= 0:
                raise rexc.TimeoutError(
                    "flexisync deadline reached before the command was sent")
            left = max(left, _MIN_WAIT)
        current = self._fx_timeout
        own = self.socket_timeout
        if left is None or (own is not None and left >= own):
            if current is not None:  # give the connection its own timeout back
                self._fx_timeout = None
                with contextlib.suppress(OSError):
                    sock.settimeout(own)
            return
        if current is None or left < current - _OVERSHOOT or left > current + left / 4:
            sock.settimeout(left)
            self._fx_timeout = left

    def connect(self) -> None:
        if self._sock is not None:
            # redis-py calls this before every command, and returns at once when
            # connected (after a retry wrapper and two lambdas): skip straight to that.
            return
        self._fx_timeout = None
        left = self._left()
        if left is None:
            super().connect()  # type: ignore[misc]
            return
        connect_timeout, read_timeout = self.socket_connect_timeout, self.socket_timeout
        self.socket_connect_timeout = left if connect_timeout is None \
            else min(connect_timeout, left)
        self.socket_timeout = left if read_timeout is None else min(read_timeout, left)
        try:
            super().connect()  # type: ignore[misc]
        finally:
            self.socket_connect_timeout, self.socket_timeout = connect_timeout, read_timeout
            opened = getattr(self, "_sock", None) is not None  # set by super().connect()
            if opened and (read_timeout is None or read_timeout > left):
                self._fx_timeout = left  # the socket still carries the capped timeout

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        self._cap()
        super().send_packed_command(command, check_health)  # type: ignore[misc]

    def read_response(self, *args: Any, **kwargs: Any) -> Any:
        self._cap()
        return super().read_response(*args, **kwargs)  # type: ignore[misc]

    def disconnect(self, *args: Any, **kwargs: Any) -> None:
        self._fx_timeout = None
        super().disconnect(*args, **kwargs)  # type: ignore[misc]


_deadline_classes: dict[type, type] = {}


def _deadline_class(base: type) -> type:
    """``base`` (a redis-py connection class) with :class:`_DeadlineMixin` in front."""
    if issubclass(base, _DeadlineMixin):
        return base
    found = _deadline_classes.get(base)
    if found is None:
        found = _deadline_classes[base] = type(f"Deadline{base.__name__}",
                                               (_DeadlineMixin, base), {})
    return found


# --- clients -------------------------------------------------------------------------


_memory_servers: dict[str, Any] = {}
_memory_lock = threading.Lock()

#: The keyword arguments ``redis.Redis`` accepts, for validating ``**redis_options``.
_REDIS_PARAMETERS = frozenset(inspect.signature(redis.Redis.__init__).parameters) - {"self"}
_TIMEOUT_OPTIONS = ("socket_timeout", "socket_connect_timeout", "health_check_interval")
# Options flexisync must control for its retry and deadline rules to hold.
_OWNED_OPTIONS = frozenset({"retry", "retry_on_timeout", "retry_on_error", "connection_pool",
                            "single_connection_client"})


def validate_redis_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """Check ``connect(**redis_options)`` before any client is built.

    Returns the options with durations converted to float seconds.

    Raises:
        ConfigError: an option ``redis.Redis`` does not know (with the closest known
            name), an option flexisync controls itself (``retry``...), or a timeout that
            is not a finite number of seconds (``None`` means no socket timeout).
    """
    checked = dict(options)
    for key, value in options.items():
        if key in _OWNED_OPTIONS:
            raise ConfigError(
                f"redis option {key!r} is set by flexisync (its retries follow "
                "connect(retry=RetryPolicy(...))); remove it"
            )
        if key not in _REDIS_PARAMETERS:
            close = difflib.get_close_matches(key, sorted(_REDIS_PARAMETERS), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"unknown redis option {key!r}{hint}")
        if key in _TIMEOUT_OPTIONS and value is not None:
            checked[key] = seconds(value, key, allow_zero=key == "health_check_interval")
    return checked


#: Connection settings every client flexisync builds starts from (single node, Sentinel
#: data nodes, Cluster nodes); URL options and ``connect(**redis_options)`` override them.
CLIENT_DEFAULTS: Mapping[str, Any] = {
    "socket_timeout": 5.0,
    "socket_connect_timeout": 2.0,
    "socket_keepalive": True,
    "health_check_interval": 0,
    "protocol": 2,  # the same reply shapes on redis-py 5 through 8
}


def build_client(spec: ConnectionSpec, **redis_options: Any) -> Any:
    """Build a redis-py client for ``spec``; ``redis_options`` override our defaults.

    Raises:
        ConfigError: the scheme is not supported yet, an option is unknown or out of
            range, or ``memory://`` is used without the ``memory`` extra installed.
    """
    redis_options = validate_redis_options(redis_options)
    if spec.scheme == "memory":
        return _memory_client(spec.name)
    if spec.scheme == "redis+sentinel":
        from flexisync import _sentinel  # noqa: PLC0415  (only for sentinel URLs)

        return _sentinel.build_client(spec, redis_options)
    if spec.scheme == "redis+cluster":
        from flexisync import _cluster  # noqa: PLC0415  (only for cluster URLs)

        return _cluster.build_client(spec, redis_options)
    options: dict[str, Any] = {
        **CLIENT_DEFAULTS,
        "db": spec.db,
        "username": spec.username,
        "password": spec.password,
    }
    options.update(spec.options)
    if spec.scheme == "unix":
        options["unix_socket_path"] = spec.path
    else:
        options["host"] = spec.host
        options["port"] = spec.port
        options["ssl"] = spec.scheme == "rediss"
    options.update(redis_options)
    options["retry"] = Retry(NoBackoff(), 0)  # retries happen in Backend.call only
    client = redis.Redis(**options)
    pool = client.connection_pool
    pool.connection_class = _deadline_class(pool.connection_class)
    return client


def topology_of(client: Any) -> str:
    """What kind of deployment a (blocking) client talks to: ``"cluster"`` (a
    ``redis.RedisCluster``), ``"sentinel"`` (a pool managed by ``redis.sentinel``),
    ``"memory"`` (fakeredis) or ``"single"`` (one server)."""
    if isinstance(client, redis.RedisCluster):
        return "cluster"
    if type(client).__module__.startswith("fakeredis"):
        return "memory"
    if isinstance(getattr(client, "connection_pool", None), redis.sentinel.SentinelConnectionPool):
        return "sentinel"
    return "single"


def _client_over(base: type, kwargs: dict[str, Any], max_connections: int | None) -> Any:
    """A ``redis.Redis`` whose pool makes deadline-capped, never-retrying connections."""
    kwargs = dict(kwargs)
    kwargs["retry"] = Retry(NoBackoff(), 0)  # retries happen in Backend.call only
    pool_options: dict[str, Any] = {"connection_class": _deadline_class(base)}
    if max_connections is not None:
        pool_options["max_connections"] = max_connections
    pool = redis.ConnectionPool(**pool_options, **kwargs)
    return redis.Redis(connection_pool=pool)


def adopt_client(client: Any) -> Any:
    """The client flexisync uses for a user's ``connect(client=...)``.

    A ``redis.Redis`` is not used as it is: redis-py's own retries would run a call that
    must not run twice (an INCR) again after a timeout, and its fixed socket timeout
    would outlast a call's deadline. flexisync builds a client of its own over a pool
    with the same connection settings (server, credentials, TLS, database, decoding),
    its own retries off and every socket wait capped by the call's deadline. The
    user's client and its connections are left untouched; ``Coordinator.close()``
    closes only flexisync's pool. In-process fakes (``fakeredis``) are used as given.
    """
    if isinstance(client, redis.RedisCluster):
        from flexisync import _cluster  # noqa: PLC0415

        return _cluster.adopt_client(client)
    pool = getattr(client, "connection_pool", None)
    if pool is None or type(client).__module__.startswith("fakeredis") \
            or not isinstance(pool, redis.ConnectionPool):
        return client
    if topology_of(client) == "sentinel":
        from flexisync import _sentinel  # noqa: PLC0415

        return _sentinel.adopt_client(client)
    kwargs = dict(pool.connection_kwargs)
    max_connections = getattr(pool, "max_connections", None)
    if not isinstance(max_connections, int) or max_connections >= 2**31 - 1:
        max_connections = None
    return _client_over(pool.connection_class, kwargs, max_connections)


def _memory_client(name: str) -> Any:
    try:
        import fakeredis  # noqa: PLC0415  (optional dependency, imported on use)
    except ImportError:
        raise ConfigError(
            "memory:// needs the 'memory' extra: pip install 'flexisync[memory]'"
        ) from None
    with _memory_lock:
        server = _memory_servers.get(name)
        if server is None:
            server = _memory_servers[name] = fakeredis.FakeServer()
    return fakeredis.FakeRedis(server=server)


# --- the retry policy and the error boundary ---------------------------------------


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """How long flexisync keeps trying a call while Redis is unreachable.

    ``deadline`` bounds the wall time of every public call that uses the policy, socket
    waits included: each attempt's socket timeout is capped by the time left, and
    retries (with jittered exponential backoff from ``initial`` to ``maximum``) go on
    until the deadline, so an outage shorter than the deadline costs a delay, not an
    error.

    Attributes:
        attempts: cap on the total attempts, including the first (>= 1); ``None``
            (the default) means as many as fit within ``deadline``.
        initial: first backoff in seconds; doubles each attempt, with jitter.
        maximum: cap on one backoff, in seconds.
        deadline: cap on the wall time of one call, retries included, in seconds.
    """

    attempts: int | None = None
    initial: float = 0.05
    maximum: float = 0.5
    deadline: float = 3.0

    def __post_init__(self) -> None:
        if self.attempts is not None and (
                isinstance(self.attempts, bool) or not isinstance(self.attempts, int)
                or self.attempts < 1):
            raise ConfigError(f"attempts must be an int >= 1 or None, got {self.attempts!r}")
        object.__setattr__(self, "initial", seconds(self.initial, "initial", allow_zero=True))
        object.__setattr__(self, "maximum", seconds(self.maximum, "maximum", allow_zero=True))
        object.__setattr__(self, "deadline", seconds(self.deadline, "deadline"))
        if self.maximum < self.initial:
            raise ConfigError(
                f"maximum backoff ({self.maximum}s) must be >= initial ({self.initial}s)"
            )

    def backoff(self, retry: int) -> float:
        """Seconds to wait before retry number ``retry`` (1-based), with jitter."""
        base = min(self.maximum, self.initial * 2 ** min(retry - 1, 30))
        return random.uniform(base / 2, base)


_TRANSIENT = (rexc.ConnectionError, rexc.TimeoutError, ConnectionError, TimeoutError)

#: Redis Cluster replies and client states that mean "not now, and nothing was run":
#: CLUSTERDOWN / MASTERDOWN (a failover in progress), TRYAGAIN (a slot migrating),
#: too many redirects, a slot no master serves yet. Retried like a connect error, even
#: for a command that must not run twice.
_CLUSTER_NOT_RUN = (rexc.ClusterDownError, rexc.TryAgainError, rexc.ClusterError,
                    rexc.SlotNotCoveredError)

#: What a call through redis-py may raise that the error boundary handles
#: (``RedisClusterException`` is not a ``RedisError``).
CALL_ERRORS = (rexc.RedisError, OSError, rexc.RedisClusterException)


def is_transient(exc: BaseException) -> bool:
    """A network-level failure worth retrying (not an auth failure), or a cluster
    that cannot serve the slot right now (failover, migration, topology refresh)."""
    if isinstance(exc, _CLUSTER_NOT_RUN) or _cluster_unreachable(exc):
        return True
    return isinstance(exc, _TRANSIENT) and not isinstance(exc, rexc.AuthenticationError)


def _cluster_unreachable(exc: BaseException) -> bool:
    """redis-py's cluster client could not refresh its slot map (no node answered, or
    the slots are not all served yet): nothing was sent."""
    if type(exc) is not rexc.RedisClusterException:
        return False
    text = str(exc)
    return "cannot be connected" in text or "not covered" in text \
        or "No targets were found" in text


def _is_connect_error(exc: BaseException) -> bool:
    """True when the command cannot have reached the server (it failed to connect)."""
    if isinstance(exc, _CLUSTER_NOT_RUN) or _cluster_unreachable(exc):
        return True
    text = str(exc)
    return "connecting to" in text or "Timeout connecting" in text \
        or "deadline reached before the command was sent" in text \
        or isinstance(exc, ConnectionRefusedError)


def next_pause(policy: RetryPolicy, failure: BaseException, attempts: int, *,
               idempotent: bool, bound: float) -> float | None:
    """Seconds to wait before retrying after ``failure`` (attempt number ``attempts``
    just failed), or ``None`` when the call must fail now: the failure is not
    transient, the command may have run and must not run twice, the policy's attempts
    are spent, or the backoff would end past ``bound`` (a ``time.monotonic()`` instant).
    Both backends (blocking and asyncio) follow it."""
    if not is_transient(failure) or not (idempotent or _is_connect_error(failure)):
        return None
    if policy.attempts is not None and attempts >= policy.attempts:
        return None
    pause = min(policy.backoff(attempts), bound - time.monotonic() - _MIN_WAIT)
    return None if pause < 0 else pause


def call_bound(policy: RetryPolicy, start: float, deadline: float | None) -> float:
    """The instant a call started at ``start`` must end by: the policy's deadline, or
    the caller's ``deadline`` when that is sooner."""
    own = start + policy.deadline
    return own if deadline is None or deadline > own else deadline


class Backend:
    """A redis-py client plus the retry policy and error translation around it."""

    def __init__(self, client: Any, *, address: str, retry: RetryPolicy) -> None:
        self.client = client
        self.address = address
        self.retry = retry
        self._scripts: dict[str, Any] = {}
        self.closed = False
        # Fork detection by pid, for servers that fork without running Python's at-fork
        # hooks (uWSGI without py-call-uwsgi-fork-hooks): the owner sets on_fork.
        self.pid = os.getpid()
        self.on_fork: Callable[[], None] | None = None
        self._log = get_logger("connection", address=address)

    @cached_property
    def is_cluster(self) -> bool:
        """True for a ``redis.RedisCluster`` client."""
        return isinstance(self.client, redis.RedisCluster)

    @cached_property
    def topology(self) -> str:
        """``"cluster"``, ``"sentinel"``, ``"single"`` or ``"memory"``: see
        :func:`topology_of`."""
        return topology_of(self.client)

    def call(self, operation: str, fn: Callable[[Any], T], *, idempotent: bool = True,
             deadline: float | None = None, retry: RetryPolicy | None = None) -> T:
        """Run ``fn(client)`` under the retry policy, within one wall-clock bound.

        Args:
            operation: a name for messages and logs, e.g. ``"state.set"``.
            fn: the Redis work; it receives the client.
            idempotent: False for a call that must not run twice (an INCR): it is
                retried only when the failure happened before the command was sent.
            deadline: an absolute ``time.monotonic()`` instant the call must end by,
                when that is sooner than the policy's deadline from now (a method
                with its own ``timeout=``). It can only shorten the bound.
            retry: a policy for this call instead of the Coordinator's (the breaker
                makes at most two quick attempts, so that callers fail fast).

        Raises:
            BackendUnavailable: Redis could not be reached before the bound; carries
                the true number of attempts and seconds spent.
            BackendError: Redis answered with an error.
        """
        if self.closed:
            raise BackendUnavailable(self.address, reason="the Coordinator is closed")
        if self.pid != os.getpid():
            self.check_fork()
        policy = self.retry if retry is None else retry
        start = time.monotonic()
        bound = start + policy.deadline  # call_bound(), inlined on the hot path
        if deadline is not None and deadline < bound:
            bound = deadline
        token = _DEADLINE.set(bound)
        try:
            return fn(self.client)
        except CALL_ERRORS as exc:
            first: BaseException = exc
        finally:
            _DEADLINE.reset(token)
        return self._retry(operation, fn, first, policy, idempotent=idempotent,
                           start=start, bound=bound)

    def _retry(self, operation: str, fn: Callable[[Any], T], failure: BaseException,
               policy: RetryPolicy, *, idempotent: bool, start: float, bound: float) -> T:
        """Retry after ``failure`` with backoff until ``bound``, or raise it translated."""
        attempts = 1
        while True:
            pause = next_pause(policy, failure, attempts, idempotent=idempotent, bound=bound)
            if pause is None:
                raise translate(operation, failure, self.address, attempts,
                                time.monotonic() - start) from failure
            time.sleep(pause)
            attempts += 1
            token = _DEADLINE.set(bound)
            try:
                return fn(self.client)
            except CALL_ERRORS as exc:
                failure = exc
            finally:
                _DEADLINE.reset(token)

    def check_fork(self) -> None:
        """Run ``on_fork`` once if this process is a fork the at-fork hooks missed."""
        pid = os.getpid()
        if self.pid != pid:
            self.pid = pid
            if self.on_fork is not None:
                self.on_fork()

    def script(self, name: str) -> Any:
        """The registered redis-py ``Script`` for ``flexisync/_scripts/<name>.lua``.

        It runs by EVALSHA and reloads itself on NOSCRIPT (after a server restart).
        """
        found = self._scripts.get(name)
        if found is None:
            text = load_script(name, sharded=self.is_cluster)
            found = self._scripts[name] = self.client.register_script(text)
        return found

    def run_script(self, operation: str, name: str, keys: Sequence[str],
                   args: Sequence[Any], *, idempotent: bool = True,
                   deadline: float | None = None, retry: RetryPolicy | None = None) -> Any:
        """Run a Lua script through :meth:`call` (same arguments, same errors).

        EVALSHA straight on the client (what redis-py's ``Script.__call__`` does, minus
        its per-call import and copies); on NOSCRIPT (a restarted or other server) the
        script is loaded and run again, as there.
        """
        script = self.script(name)

        def evalsha(client: Any) -> Any:
            try:
                return client.evalsha(script.sha, len(keys), *keys, *args)
            except rexc.NoScriptError:
                script.sha = client.script_load(script.script)
                return client.evalsha(script.sha, len(keys), *keys, *args)

        return self.call(operation, evalsha, idempotent=idempotent, deadline=deadline,
                         retry=retry)

    def ping(self) -> float:
        """One PING; the round-trip time in seconds."""
        start = time.perf_counter()
        self.call("ping", lambda c: c.ping())
        return time.perf_counter() - start

    def close(self) -> None:
        """Close the client's connections (in this process only)."""
        with contextlib.suppress(rexc.RedisError, OSError):  # a dead one is fine
            self.client.close()


def translate(operation: str, exc: BaseException, address: str, attempts: int,
               elapsed: float) -> Exception:
    if isinstance(exc, rexc.AuthenticationError):
        return BackendUnavailable(address, attempts=attempts, elapsed=elapsed,
                                  reason="authentication failed")
    if is_transient(exc):
        return BackendUnavailable(address, attempts=attempts, elapsed=elapsed,
                                  reason=type(exc).__name__ + ": " + str(exc))
    return BackendError(operation, str(exc))


_script_cache: dict[tuple[str, bool], str] = {}


_INCLUDE = re.compile(r"^-- include: ([a-z_]+)$", re.MULTILINE)

#: How a script publishes on its object's channel; ``sharded=True`` swaps it for
#: ``SPUBLISH`` (Redis Cluster: the channel carries the object's hash tag, so it is in
#: the slot of the script's keys and a sharded channel of that slot).
_PUBLISH = "redis.call('PUBLISH', "
_SPUBLISH = "redis.call('SPUBLISH', "


def load_script(name: str, *, sharded: bool = False) -> str:
    """The text of ``flexisync/_scripts/<name>.lua`` (read once per process).

    A line ``-- include: other`` puts ``other.lua`` (helpers shared by a family of
    scripts, e.g. ``lock_lib``) in front of the script, once. With ``sharded=True``
    (Redis Cluster) every ``redis.call('PUBLISH', ...)`` becomes
    ``redis.call('SPUBLISH', ...)``: the script publishes on its object's sharded
    channel. The text returned is exactly what runs, so its SHA1 is the EVALSHA digest.
    """
    text = _script_cache.get((name, sharded))
    if text is None:
        if sharded:
            text = load_script(name).replace(_PUBLISH, _SPUBLISH)
        else:
            text = resources.files("flexisync._scripts").joinpath(
                f"{name}.lua").read_text("utf-8")
            for lib in dict.fromkeys(_INCLUDE.findall(text)):
                text = load_script(lib) + "\n" + text
        _script_cache[(name, sharded)] = text
    return text
