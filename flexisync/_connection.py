"""URL parsing, client construction, the retry policy and the one error boundary.

Every Redis call a public method makes goes through :meth:`Backend.call` (or
:meth:`Backend.script`), which

* runs the call directly when nothing fails (no retry machinery on the hot path);
* retries transient connection errors with bounded, jittered exponential backoff
  (tenacity), but retries a non-idempotent call only when the error happened while
  connecting, so the command was never sent;
* translates what is left into flexisync errors with ``raise ... from exc``.

redis-py's own per-command retry is switched off on clients we build, so that a retry
happens in exactly one place.
"""

from __future__ import annotations

import contextlib
import os
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
from redis.backoff import NoBackoff
from redis.retry import Retry
from tenacity import (
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
    wait_random_exponential,
)

from flexisync._durations import seconds
from flexisync._log import get_logger
from flexisync.errors import BackendError, BackendUnavailable, ConfigError

__all__ = [
    "Backend",
    "ConnectionSpec",
    "RetryPolicy",
    "build_client",
    "parse_url",
]

T = TypeVar("T")

DEFAULT_URL = "redis://localhost:6379/0"
SCHEMES = ("redis", "rediss", "unix", "redis+sentinel", "redis+cluster", "memory")
_NOT_YET = ("redis+sentinel", "redis+cluster")

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
    ``max_connections``, ``client_name`` and the ``ssl_*`` file options.

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
        raise ConfigError(
            f"unknown URL scheme {scheme!r}: expected one of "
            f"{', '.join(s + '://' for s in SCHEMES)}"
        )
    if scheme == "memory":
        name = url.split("://", 1)[1].strip("/")
        return ConnectionSpec(scheme="memory", name=name)
    if scheme in ("redis+sentinel", "redis+cluster"):
        return _parse_multi_host(scheme, url)
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"malformed {scheme}:// URL: {_scrub(str(exc), url)}") from None
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password else None
    if scheme == "unix":
        path = unquote(parts.path)
        if not path:
            raise ConfigError("unix:// URL needs a socket path, e.g. unix:///run/redis.sock")
        db = _parse_db(query.pop("db", "0"))
        return ConnectionSpec(scheme=scheme, path=path, db=db, username=username,
                              password=password, options=_parse_options(query))
    if not parts.hostname:
        raise ConfigError(f"{scheme}:// URL needs a host, e.g. {scheme}://localhost:6379/0")
    db_text = parts.path.lstrip("/") or query.pop("db", "0")
    query.pop("db", None)
    return ConnectionSpec(
        scheme=scheme, host=parts.hostname, port=port or 6379, db=_parse_db(db_text),
        username=username, password=password, options=_parse_options(query),
    )


def _parse_multi_host(scheme: str, url: str) -> ConnectionSpec:
    rest = url.split("://", 1)[1]
    rest, _, query_text = rest.partition("?")
    username = password = None
    if "@" in rest:
        auth, rest = rest.rsplit("@", 1)
        user, _, pw = auth.partition(":")
        username, password = (unquote(user) or None), (unquote(pw) or None)
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
    options = _parse_options(dict(parse_qsl(query_text, keep_blank_values=True)))
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


def _scrub(message: str, url: str) -> str:
    """Remove anything that looks like the URL's password from ``message``."""
    try:
        password = urlsplit(url).password
    except ValueError:
        password = None
    if password:
        message = message.replace(password, "***")
    return message


# --- clients -------------------------------------------------------------------------


_memory_servers: dict[str, Any] = {}
_memory_lock = threading.Lock()


def build_client(spec: ConnectionSpec, **redis_options: Any) -> Any:
    """Build a redis-py client for ``spec``; ``redis_options`` override our defaults.

    Raises:
        ConfigError: the scheme is not supported yet, or ``memory://`` is used without
            the ``memory`` extra installed.
    """
    if spec.scheme in _NOT_YET:
        raise ConfigError(f"{spec.scheme}:// URLs parse, but are not supported yet")
    if spec.scheme == "memory":
        return _memory_client(spec.name)
    options: dict[str, Any] = {
        "socket_timeout": 5.0,
        "socket_connect_timeout": 2.0,
        "socket_keepalive": True,
        "health_check_interval": 0,
        "retry": Retry(NoBackoff(), 0),
        "protocol": 2,  # the same reply shapes on redis-py 5 through 8
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
    return redis.Redis(**options)


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

    Attributes:
        attempts: total attempts, including the first (>= 1).
        initial: first backoff in seconds; doubles each attempt, with jitter.
        maximum: cap on one backoff, in seconds.
        deadline: cap on the total time spent retrying one call, in seconds.
    """

    attempts: int = 4
    initial: float = 0.05
    maximum: float = 0.5
    deadline: float = 3.0

    def __post_init__(self) -> None:
        if isinstance(self.attempts, bool) or not isinstance(self.attempts, int) \
                or self.attempts < 1:
            raise ConfigError(f"attempts must be an int >= 1, got {self.attempts!r}")
        seconds(self.initial, "initial", allow_zero=True)
        seconds(self.maximum, "maximum", allow_zero=True)
        seconds(self.deadline, "deadline")


_TRANSIENT = (rexc.ConnectionError, rexc.TimeoutError, ConnectionError, TimeoutError)


def is_transient(exc: BaseException) -> bool:
    """A network-level failure worth retrying (not an auth failure)."""
    return isinstance(exc, _TRANSIENT) and not isinstance(exc, rexc.AuthenticationError)


def _is_connect_error(exc: BaseException) -> bool:
    """True when the command cannot have reached the server (it failed to connect)."""
    text = str(exc)
    return "connecting to" in text or "Timeout connecting" in text \
        or isinstance(exc, ConnectionRefusedError)


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

    def call(self, operation: str, fn: Callable[[Any], T], *, idempotent: bool = True) -> T:
        """Run ``fn(client)`` under the retry policy.

        Args:
            operation: a name for messages and logs, e.g. ``"state.set"``.
            fn: the Redis work; it receives the client.
            idempotent: False for a call that must not run twice (an INCR): it is
                retried only when the failure happened while connecting.

        Raises:
            BackendUnavailable: every attempt failed with a connection error.
            BackendError: Redis answered with an error.
        """
        if self.closed:
            raise BackendUnavailable(self.address, reason="the Coordinator is closed")
        if self.pid != os.getpid():
            self.check_fork()
        try:
            return fn(self.client)
        except rexc.RedisError as exc:
            first: BaseException = exc
        except OSError as exc:
            first = exc
        return self._retry(operation, fn, first, idempotent=idempotent)

    def _retry(self, operation: str, fn: Callable[[Any], T], first: BaseException,
               *, idempotent: bool) -> T:
        if not is_transient(first):
            raise _translate(operation, first, self.address, 1, 0.0) from first
        if not idempotent and not _is_connect_error(first):
            raise _translate(operation, first, self.address, 1, 0.0) from first
        policy = self.retry
        if policy.attempts < 2:
            raise _translate(operation, first, self.address, 1, 0.0) from first
        start = time.monotonic()
        attempts = 1

        def retryable(exc: BaseException) -> bool:
            return is_transient(exc) and (idempotent or _is_connect_error(exc))

        def attempt(client: Any) -> T:
            nonlocal attempts
            attempts += 1
            return fn(client)

        retrying = Retrying(
            stop=stop_after_attempt(policy.attempts - 1) | stop_after_delay(policy.deadline),
            wait=wait_random_exponential(multiplier=policy.initial, max=policy.maximum),
            retry=retry_if_exception(retryable),
            reraise=True,
        )
        try:
            time.sleep(policy.initial)
            return retrying(attempt, self.client)
        except (rexc.RedisError, OSError) as exc:
            elapsed = time.monotonic() - start
            raise _translate(operation, exc, self.address, attempts, elapsed) from exc

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
            found = self._scripts[name] = self.client.register_script(load_script(name))
        return found

    def run_script(self, operation: str, name: str, keys: Sequence[str],
                   args: Sequence[Any], *, idempotent: bool = True) -> Any:
        """Run a Lua script through :meth:`call`."""
        script = self.script(name)
        return self.call(operation, lambda _c: script(keys=keys, args=args),
                         idempotent=idempotent)

    def ping(self) -> float:
        """One PING; the round-trip time in seconds."""
        start = time.perf_counter()
        self.call("ping", lambda c: c.ping())
        return time.perf_counter() - start

    def close(self) -> None:
        """Close the client's connections (in this process only)."""
        with contextlib.suppress(rexc.RedisError, OSError):  # a dead one is fine
            self.client.close()


def _translate(operation: str, exc: BaseException, address: str, attempts: int,
               elapsed: float) -> Exception:
    if isinstance(exc, rexc.AuthenticationError):
        return BackendUnavailable(address, attempts=attempts, elapsed=elapsed,
                                  reason="authentication failed")
    if is_transient(exc):
        return BackendUnavailable(address, attempts=attempts, elapsed=elapsed,
                                  reason=type(exc).__name__ + ": " + str(exc))
    return BackendError(operation, str(exc))


_script_cache: dict[str, str] = {}


_INCLUDE = re.compile(r"^-- include: ([a-z_]+)$", re.MULTILINE)


def load_script(name: str) -> str:
    """The text of ``flexisync/_scripts/<name>.lua`` (read once per process).

    A line ``-- include: other`` puts ``other.lua`` (helpers shared by a family of
    scripts, e.g. ``lock_lib``) in front of the script, once.
    """
    text = _script_cache.get(name)
    if text is None:
        text = resources.files("flexisync._scripts").joinpath(f"{name}.lua").read_text("utf-8")
        for lib in dict.fromkeys(_INCLUDE.findall(text)):
            text = load_script(lib) + "\n" + text
        _script_cache[name] = text
    return text
