"""``CircuitBreaker``: one breaker per dependency, shared by every process of the fleet.

How it works:

* The shared state lives in Redis (``ns:breaker:{name}`` and its ``:window`` and
  ``:probes`` keys). Every decision that changes it (count a failure and maybe open,
  admit a half-open probe, settle a probe, trip/reset/force/disable) is ONE Lua script,
  timed by the Redis server's clock. A transition bumps a version and is PUBLISHed.
* Each process mirrors the state: messages arrive on the Coordinator's one listener
  thread; the mirror applies a version only when it is newer than what it holds, and
  re-reads the state after a reconnect, every ``refresh_interval`` seconds and when the
  listener loses its connection, so a lost message cannot leave a process stale.
* Hot path: a successful call while closed costs no round trip (a counter is bumped;
  the counts are flushed by a background thread at most every 100 ms when they matter).
  A failure costs one round trip. While open, calls are rejected from the mirror's
  deadline with no round trip until a probe may be admitted.

Counting semantics:

* ``failure_rate=None`` (default): the breaker opens after ``failure_threshold``
  consecutive failures counted across every process; a success resets the count.
  Successes are not sent per call: a process reports them with its next failure (so
  within one process the order is exact) or in the background at most 100 ms later,
  and only while failures are pending. A success in one process thus resets the count
  when it reaches Redis, which may be up to 100 ms after it happened. For a provider
  that fails most of the time but not always, prefer ``failure_rate``.
* ``failure_rate=r``: the breaker opens when, over the last ``window`` seconds, at least
  ``minimum_calls`` calls were seen fleet-wide and at least ``r`` of them failed. A
  success never erases a failure; it only adds to the call count. The consecutive rule
  is not applied in this mode.
* A call slower than ``slow_call_duration`` counts as a failure (its result is still
  returned). An exception in ``ignore`` counts as nothing; one outside ``failure_on``
  counts as a success (the dependency answered); ``BaseException``s that are not
  ``Exception`` (cancellation, ``KeyboardInterrupt``) count as nothing.
* A failure whose exception carries a provider's retry-after (by default an attribute
  ``retry_after`` in seconds; see ``retry_after_of``) opens the breaker at once for
  exactly that long (at most :data:`MAX_DURATION`), or keeps a longer open period
  already running.

Robustness:

* Manual states (``forced_open``, ``disabled``) last until changed: their record has
  no expiry. An automatic state's record expires 7 days after its last change.
* Every duration is bounded (:data:`MAX_DURATION`, 10 years) at construction and at
  ``trip()``; every script checks all its arguments and the stored record before its
  first write, so it either applies entirely or changes nothing.
* A record another program damaged is reported (``breaker.record_repaired``) and
  repaired; one that cannot be repaired without destroying foreign data (a key of
  another type) is reported (``breaker.record_malformed``) and treated per
  ``on_backend_error`` until ``reset()`` replaces it. Garbage on the breaker's channel
  is reported (``breaker.message_malformed``) and ignored.
* Only the process whose script made a transition logs it (``breaker.opened`` at
  warning...); mirrors log ``breaker.mirrored`` at debug.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import math
import threading
import time
import uuid
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, fields
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, ParamSpec, TypeVar, cast

from flexisync._breaker_hub import (
    FORK_MARK,
    RECHECK_INTERVAL,
    MalformedRecord,
    detect_fork,
    hub_of,
)
from flexisync._breaker_local import LocalBreaker
from flexisync._durations import seconds, to_ms
from flexisync._keys import validate_name
from flexisync._log import get_logger
from flexisync.errors import BackendUnavailable, CircuitOpenError, ConfigError, FlexiSyncError

if TYPE_CHECKING:
    from types import TracebackType

    from flexisync.coordinator import Coordinator

__all__ = [
    "MAX_DURATION",
    "BreakerInfo",
    "BreakerPolicy",
    "BreakerStats",
    "CircuitBreaker",
    "State",
    "breaker_info",
    "list_breakers",
]

State = Literal["closed", "open", "half_open", "forced_open", "disabled"]
BackendMode = Literal["local", "allow", "reject"]
P = ParamSpec("P")
R = TypeVar("R")

_STATES = ("closed", "open", "half_open", "forced_open", "disabled")
#: The longest duration (seconds) any breaker argument accepts: 10 years. It keeps every
#: server-side instant an exact integer of milliseconds (see breaker_lib.lua's MAX_MS).
MAX_DURATION = 10 * 365 * 86400.0
_MAX_COUNT = 1_000_000_000  # bound on the integer options
_MAX_INT = 10**13  # bound on an integer read back from Redis (breaker_lib.lua's LIMIT)
_MARK = FORK_MARK  # module-global alias: the hot path reads it as one LOAD_GLOBAL
_EVENTS = {"closed": "breaker.closed", "open": "breaker.opened",
           "half_open": "breaker.half_opened", "forced_open": "breaker.forced_open",
           "disabled": "breaker.disabled"}


def retry_after_attribute(exc: BaseException) -> float | None:
    """The default ``retry_after_of``: ``exc.retry_after`` as seconds, if it is one.

    Accepts a positive finite int/float or a ``timedelta``; anything else means "no
    retry-after". (A value above :data:`MAX_DURATION` is cut to it when used.)
    """
    value = getattr(exc, "retry_after", None)
    if isinstance(value, timedelta):
        value = value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    result = float(value)
    return result if math.isfinite(result) and result > 0 else None


def _duration(value: object, name: str) -> float:
    """``value`` as float seconds in (0, MAX_DURATION]; ConfigError naming ``name``."""
    result = seconds(value, name)
    if result > MAX_DURATION:
        raise ConfigError(f"{name} must be at most {MAX_DURATION:.0f} seconds (10 years), "
                          f"got {result:g}")
    return result


def _optional_duration(value: object, name: str) -> float | None:
    return None if value is None else _duration(value, name)


def _foreign_seconds(value: object) -> float | None:
    """A retry-after a provider (or a user's ``retry_after_of``) handed us: a positive
    finite number of seconds, cut to :data:`MAX_DURATION`; anything else is ignored."""
    if isinstance(value, timedelta):
        value = value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    result = float(value)
    if not (math.isfinite(result) and result > 0):
        return None
    return min(result, MAX_DURATION)


def _exception_classes(value: object, name: str) -> tuple[type[BaseException], ...]:
    items = value if isinstance(value, tuple) else (value,)
    for item in items:
        if not (isinstance(item, type) and issubclass(item, BaseException)):
            raise ConfigError(f"{name} must be exception classes, got {item!r}")
    return cast("tuple[type[BaseException], ...]", items)


def _positive_int(value: object, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= _MAX_COUNT:
        raise ConfigError(f"{name} must be an int from 1 to {_MAX_COUNT:_}, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class BreakerPolicy:
    """A breaker's configuration, validated at construction (before any I/O).

    Durations are float seconds (a ``timedelta`` is accepted and converted), each
    greater than 0 and at most :data:`MAX_DURATION` (10 years); the integer options are
    from 1 to 1,000,000,000.

    Attributes:
        failure_threshold: consecutive failures, fleet-wide, that open the breaker
            (used when ``failure_rate`` is None).
        failure_rate: open when the fleet-wide failure ratio over ``window`` reaches
            this, in (0, 1]; replaces the consecutive rule.
        minimum_calls: calls needed in the window before ``failure_rate`` is judged.
        window: length of the failure-rate window, seconds.
        slow_call_duration: calls slower than this count as failures; None: never.
        recovery_timeout: first open period before a probe is admitted, seconds.
        max_recovery_timeout: each failed probe doubles the open period, up to this.
        half_open_max_calls: probes running at once across ALL processes.
        success_threshold: successful probes needed to close.
        failure_on: exception classes that count as failures.
        ignore: exception classes that count as nothing (checked first).
        on_backend_error: while Redis is unreachable: ``"local"`` keeps breaking per
            process with this policy, ``"allow"`` lets every call through,
            ``"reject"`` raises :class:`~flexisync.CircuitOpenError`.
        probe_lease: seconds a half-open probe holds its slot; a probe still running
            (or whose process died) after that frees it for another.
        refresh_interval: seconds between re-reads of the shared state (repairs a
            missed message).
        retry_after_of: ``fn(exc) -> seconds | None``: a provider's retry-after carried
            by a failure, which opens the breaker at once for that long. None disables.

    Raises:
        ConfigError: (a ``ValueError``) any value out of range or of the wrong type.
    """

    failure_threshold: int = 5
    failure_rate: float | None = None
    minimum_calls: int = 20
    window: float = 60.0
    slow_call_duration: float | None = None
    recovery_timeout: float = 30.0
    max_recovery_timeout: float = 600.0
    half_open_max_calls: int = 1
    success_threshold: int = 1
    failure_on: tuple[type[BaseException], ...] = (Exception,)
    ignore: tuple[type[BaseException], ...] = ()
    on_backend_error: BackendMode = "local"
    probe_lease: float = 30.0
    refresh_interval: float = 5.0
    retry_after_of: Callable[[BaseException], float | None] | None = field(
        default=retry_after_attribute)

    def __post_init__(self) -> None:
        put = functools.partial(object.__setattr__, self)
        for name in ("failure_threshold", "minimum_calls", "half_open_max_calls",
                     "success_threshold"):
            _positive_int(getattr(self, name), name)
        rate = self.failure_rate
        if rate is not None:
            if isinstance(rate, bool) or not isinstance(rate, (int, float)) \
                    or not 0 < rate <= 1:
                raise ConfigError(f"failure_rate must be in (0, 1], got {rate!r}")
            put("failure_rate", float(rate))
        for name in ("window", "recovery_timeout", "max_recovery_timeout", "probe_lease",
                     "refresh_interval"):
            put(name, _duration(getattr(self, name), name))
        put("slow_call_duration", _optional_duration(self.slow_call_duration,
                                                     "slow_call_duration"))
        if self.max_recovery_timeout < self.recovery_timeout:
            raise ConfigError(
                f"max_recovery_timeout ({self.max_recovery_timeout}s) must be >= "
                f"recovery_timeout ({self.recovery_timeout}s)")
        put("failure_on", _exception_classes(self.failure_on, "failure_on"))
        put("ignore", _exception_classes(self.ignore, "ignore"))
        if self.on_backend_error not in ("local", "allow", "reject"):
            raise ConfigError(f"on_backend_error must be 'local', 'allow' or 'reject', "
                              f"got {self.on_backend_error!r}")
        if self.retry_after_of is not None and not callable(self.retry_after_of):
            raise ConfigError("retry_after_of must be callable or None")


_OPTIONS = frozenset(f.name for f in fields(BreakerPolicy))


@dataclass(frozen=True)
class BreakerStats:
    """What this process's mirror knows, read without any I/O.

    Attributes:
        name: the breaker's name.
        state: the state this process acts on.
        version: version of the shared state last mirrored (-1: never read).
        failures: shared failure count last mirrored (consecutive failures, or
            failures in the window in failure-rate mode).
        retry_after: seconds until a probe may be admitted (0 when not open,
            ``math.inf`` when forced open).
        successes: successful calls made through this object in this process.
        local_failures: failed calls made through this object in this process.
        rejected: calls this object rejected with ``CircuitOpenError``.
        backend_available: False while the shared state cannot be used: Redis is
            unreachable, or the record holds foreign data that cannot be repaired
            (``on_backend_error`` applies).
    """

    name: str
    state: State
    version: int
    failures: int
    retry_after: float
    successes: int
    local_failures: int
    rejected: int
    backend_available: bool


@dataclass(frozen=True)
class BreakerInfo:
    """A breaker's shared state as stored in Redis (see :func:`list_breakers`).

    Attributes:
        name: the breaker's name.
        state: the shared state.
        version: bumped by every published change.
        failures: consecutive failures, or failures in the window (failure-rate mode).
        retry_after: seconds until a probe may be admitted (``math.inf``: forced open).
        trips: how many times it opened.
        probes_in_flight: half-open probe leases currently held.
        open_period: the current open period in seconds (grows after failed probes),
            None while closed.
        window_calls: calls counted in the failure-rate window (0 in consecutive mode
            or when not asked for).
        window_failures: failures counted in that window.
        changed_at: server time (Unix seconds) of the last published change, or None.
    """

    name: str
    state: State
    version: int
    failures: int
    retry_after: float
    trips: int
    probes_in_flight: int
    open_period: float | None
    window_calls: int
    window_failures: int
    changed_at: float | None


class _Ticket:
    """What admission decided for one call; handed back when it finishes."""

    __slots__ = ("kind", "start", "token")

    PLAIN, PROBE, LOCAL, LOCAL_PROBE, BYPASS = range(5)

    def __init__(self, kind: int, token: str = "", start: float = 0.0) -> None:
        self.kind = kind
        self.token = token
        self.start = start


_PLAIN = _Ticket(_Ticket.PLAIN)
_BYPASS = _Ticket(_Ticket.BYPASS)
_open_tickets: contextvars.ContextVar[tuple[tuple[int, _Ticket], ...]] = \
    contextvars.ContextVar("flexisync_breaker_tickets", default=())


class _Handoff:
    """An admission running in a worker thread for an awaiting task that may be
    cancelled: whichever side comes second releases a probe lease nobody will use."""

    __slots__ = ("_lock", "abandoned", "ticket")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.ticket: _Ticket | None = None
        self.abandoned = False

    def deliver(self, ticket: _Ticket) -> bool:
        """From the thread: False when the task is gone (the caller releases)."""
        with self._lock:
            if self.abandoned:
                return False
            self.ticket = ticket
            return True

    def abandon(self) -> _Ticket | None:
        """From the cancelled task: the ticket already delivered, to release, if any."""
        with self._lock:
            self.abandoned = True
            ticket, self.ticket = self.ticket, None
            return ticket


def _in_thread(fn: Callable[..., R], *args: Any) -> asyncio.Future[R]:
    """Run ``fn(*args)`` in the loop's default executor, with the caller's context.

    Await the result through :func:`asyncio.shield`: once submitted, it runs to the
    end even if the awaiting task is cancelled (a cancelled executor future would
    otherwise be skipped before it starts, and a lease it should settle would leak).
    """
    loop = asyncio.get_running_loop()
    context = contextvars.copy_context()
    future = loop.run_in_executor(None, functools.partial(context.run, fn, *args))
    future.add_done_callback(_retrieve)
    return future


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()  # retrieved: no "exception was never retrieved" warning


class _Subscription:
    """A breaker's pub/sub registration, closable after the breaker itself is gone."""

    __slots__ = ("registration",)

    def __init__(self) -> None:
        self.registration: Any = None

    def close(self) -> None:
        registration, self.registration = self.registration, None
        if registration is not None:
            registration.close()


def _message_handler(ref: weakref.ref[CircuitBreaker],
                     ) -> Callable[[str, bytes, str | None], None]:
    """A listener handler that does not keep the breaker alive."""

    def handle(channel: str, data: bytes, pattern: str | None) -> None:
        breaker = ref()
        if breaker is not None:
            breaker._on_message(channel, data, pattern)

    return handle


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _integer(value: Any) -> int:
    """An integer from a reply or a message, in the range flexisync writes."""
    if isinstance(value, bool):
        raise ValueError("not an integer")
    number = value if isinstance(value, int) else int(_text(value)[:20])
    if not -_MAX_INT <= number <= _MAX_INT:
        raise ValueError("integer out of range")
    return number


class _Snapshot(NamedTuple):
    """What every breaker script replies first (see breaker_lib.lua)."""

    epoch: str
    version: int
    state: State
    remaining_ms: int
    failures: int
    before: str  # the state the script started from


def _snapshot(values: Any, *, operation: str, before: bool = True) -> _Snapshot:
    """Validate ``[epoch, version, state, remaining_ms, failures(, before)]``.

    Raises:
        MalformedRecord: anything else (never IndexError/ValueError).
    """
    size = 6 if before else 5
    try:
        if not isinstance(values, (list, tuple)) or len(values) < size:
            raise ValueError("wrong shape")
        epoch = _text(values[0])
        state = _text(values[2])
        if len(epoch) > 64 or " " in epoch:
            raise ValueError("bad epoch")
        if state not in _STATES:
            raise ValueError("bad state")
        start = _text(values[5]) if before else state
        if start not in _STATES:
            raise ValueError("bad state")
        return _Snapshot(epoch, _integer(values[1]), cast("State", state),
                         _integer(values[3]), _integer(values[4]), start)
    except (ValueError, TypeError, UnicodeDecodeError) as exc:
        raise MalformedRecord(operation, f"unreadable reply ({exc})") from None


class CircuitBreaker:
    """A circuit breaker whose state every process using the same name shares.

    Build it with ``coordinator.breaker(name, **policy)`` (see :class:`BreakerPolicy`
    for the keyword arguments). Two objects with the same name, in one process or in
    many, act on the same shared state; give them the same policy.

    Use it as a decorator (sync and ``async def`` functions), a context manager
    (``with`` / ``async with``), or through :meth:`call` / :meth:`acall`. A rejected
    call raises :class:`~flexisync.CircuitOpenError` whose ``retry_after`` says how long
    until a probe may be admitted. A protected call never fails because Redis is down,
    unless ``on_backend_error="reject"``.

    Raises:
        ConfigError: (a ``ValueError``) unknown option or invalid value, at construction.
    """

    def __new__(cls, coordinator: Coordinator, name: str, *,
                policy: BreakerPolicy | None = None, **options: Any) -> CircuitBreaker:
        """One live object per Coordinator, name and policy: asking again returns it.

        So ``sync.breaker("openai")`` may be called on every request without adding a
        subscription each time. A different policy gives another object, which mirrors
        the same shared state. The Coordinator holds breakers weakly (plus the few asked
        for most recently, and those with ``on_state_change`` callbacks): a breaker
        nobody uses any more is released with its subscription.
        """
        unknown = sorted(set(options) - _OPTIONS)
        if unknown:
            raise ConfigError(f"unknown breaker option(s) {', '.join(unknown)}; "
                              f"expected some of {', '.join(sorted(_OPTIONS))}")
        if policy is not None and options:
            raise ConfigError("pass either policy= or keyword options, not both")
        if policy is not None and not isinstance(policy, BreakerPolicy):
            raise ConfigError(f"policy must be a BreakerPolicy, not {type(policy).__name__}")
        chosen = policy if policy is not None else BreakerPolicy(**options)
        validate_name(name, "breaker name")

        def build() -> CircuitBreaker:
            made: CircuitBreaker = object.__new__(cls)
            made._setup(coordinator, name, chosen)
            return made

        return hub_of(coordinator).instance((name, chosen), build)

    def __init__(self, coordinator: Coordinator, name: str, *,
                 policy: BreakerPolicy | None = None, **options: Any) -> None:
        """Built by ``__new__`` (see there); nothing left to do."""

    def _setup(self, coordinator: Coordinator, name: str, policy: BreakerPolicy) -> None:
        self.policy = policy
        self.name = name
        self._coordinator = coordinator
        self._keys = _keys_of(coordinator, name)
        self._channel = coordinator._keys.channel("breaker", name)
        self._hub = hub_of(coordinator)
        self._log = get_logger("breaker", breaker=name, namespace=coordinator.namespace)
        pol = self.policy
        self._mode = "count" if pol.failure_rate is None else "rate"
        self._record_args = [self._channel, self._mode, pol.failure_threshold,
                             pol.failure_rate or 0, pol.minimum_calls, to_ms(pol.window),
                             to_ms(pol.recovery_timeout)]
        self._slow = pol.slow_call_duration
        self._callbacks: list[Callable[[str, str, str], None]] = []
        self._subscription = _Subscription()
        self._handler = _message_handler(weakref.ref(self))
        weakref.finalize(self, self._hub.release, self._subscription)
        self._fast = False  # closed, mirrored and healthy: the zero-round-trip path
        self._ok = 0  # successes seen on the hot path (flushed as a delta)
        self._local_failures = 0
        self._rejected = 0
        self._garbage_logged_at = -math.inf
        self._init_runtime()

    def _init_runtime(self) -> None:
        self._mirror_lock = threading.Lock()
        self._prepare_lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._flush_idle = threading.Event()  # cleared while a flush is in flight
        self._flush_idle.set()
        self._state: State = "closed"
        self._epoch: str | None = None
        self._version = -1
        self._behind = 0  # consecutive reads older than the mirror (see _apply)
        self._shared_failures = 0
        self._open_until = 0.0
        self._ask_after = 0.0
        self._ready = False
        self._down = False
        self._fast = False
        self._ok_sent = self._ok
        self._refresh_due = 0.0
        self._recheck_at = 0.0
        self._local = LocalBreaker(self.name, self.policy)

    def __repr__(self) -> str:
        return f"<CircuitBreaker {self.name!r} state={self._state!r}>"

    # --- protecting calls -------------------------------------------------------------

    def __call__(self, fn: Callable[P, R]) -> Callable[P, R]:
        """Decorate ``fn`` (a plain or an ``async def`` function) with this breaker."""
        if inspect.iscoroutinefunction(fn):
            return cast("Callable[P, R]", self._wrap_async(fn))

        @functools.wraps(fn)
        def guarded(*args: P.args, **kwargs: P.kwargs) -> R:
            # The closed path of call(), inlined: one call frame less on every call.
            # _MARK[0] is 0 in a child forked without at-fork hooks (see _breaker_hub).
            if self._fast and _MARK[0]:
                try:
                    result = fn(*args, **kwargs)
                except BaseException as exc:
                    self._finish(_PLAIN, exc)
                    raise
                self._ok += 1
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
        if self._fast and _MARK[0]:
            try:
                result = fn(*args, **kwargs)
            except BaseException as exc:
                self._finish(_PLAIN, exc)
                raise
            self._ok += 1
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

    async def acall(self, fn: Callable[P, Awaitable[R]], *args: P.args,
                    **kwargs: P.kwargs) -> R:
        """Await ``fn(*args, **kwargs)`` through the breaker; returns its result.

        Redis round trips (a failure, a probe) run in a worker thread, so the event
        loop is never blocked by Redis. Cancellation at any ``await`` leaves no probe
        lease held: one granted to a cancelled call is released.

        Raises:
            CircuitOpenError: the breaker rejected the call (``fn`` did not run).
        """
        ticket = _PLAIN if self._fast and _MARK[0] else await self._admit_async()
        try:
            result = await fn(*args, **kwargs)
        except BaseException as exc:
            await self._finish_async(ticket, exc)
            raise
        if ticket is _PLAIN:
            self._ok += 1
        else:
            await self._finish_async(ticket, None)
        return result

    def _wrap_async(self, fn: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
        @functools.wraps(fn)
        async def guarded(*args: P.args, **kwargs: P.kwargs) -> R:
            return await self.acall(fn, *args, **kwargs)

        return guarded

    def __enter__(self) -> CircuitBreaker:
        ticket = _PLAIN if self._fast and _MARK[0] else self._admit()
        _open_tickets.set((*_open_tickets.get(), (id(self), ticket)))
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._finish(self._pop_ticket(), exc)

    async def __aenter__(self) -> CircuitBreaker:
        ticket = _PLAIN if self._fast and _MARK[0] else await self._admit_async()
        _open_tickets.set((*_open_tickets.get(), (id(self), ticket)))
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self._finish_async(self._pop_ticket(), exc)

    def _pop_ticket(self) -> _Ticket:
        stack = _open_tickets.get()
        for i in range(len(stack) - 1, -1, -1):
            if stack[i][0] == id(self):
                _open_tickets.set(stack[:i] + stack[i + 1:])
                return stack[i][1]
        return _PLAIN

    # --- admission ------------------------------------------------------------------

    def _admit(self) -> _Ticket:
        ticket = self._admit_quick()
        if ticket is None:
            self._ensure_ready()
            ticket = self._admit_quick()
            if ticket is None:
                ticket = self._admit_remote()
        return ticket

    async def _admit_async(self) -> _Ticket:
        ticket = self._admit_quick()
        if ticket is not None:
            return ticket
        handoff = _Handoff()
        future = _in_thread(self._admit_for, handoff)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            orphan = handoff.abandon()  # admitted, but the caller is gone
            if orphan is not None:
                self._release(orphan)
            raise

    def _admit_for(self, handoff: _Handoff) -> _Ticket:
        """``_admit`` in a worker thread, for a task that may be cancelled meanwhile."""
        ticket = self._admit()
        if not handoff.deliver(ticket):
            self._release(ticket)
        return ticket

    def _release(self, ticket: _Ticket) -> None:
        """Give back what an admission took for a call that will never run."""
        if ticket.kind == _Ticket.PROBE:
            self._hub.notify(self._settle, ticket, "neutral", None)  # a round trip
        elif ticket.kind == _Ticket.LOCAL_PROBE:
            self._local.record(True, "neutral", None)

    def _admit_quick(self) -> _Ticket | None:
        """Decide from the mirror alone; None when a round trip is needed."""
        if not _MARK[0]:
            detect_fork()  # forked without at-fork hooks: the mirror is the parent's
        if self._down:
            return self._admit_down()
        if not self._ready:
            return None
        state = self._state
        if state == "closed":
            return _Ticket(_Ticket.PLAIN, "", time.perf_counter()) if self._slow else _PLAIN
        if state == "disabled":
            return _BYPASS
        if state == "forced_open":
            self._reject(math.inf)
        now = time.monotonic()
        if state == "open" and now < self._open_until:
            self._reject(self._open_until - now)
        if state == "half_open" and now < self._ask_after:
            self._reject(self._ask_after - now)
        return None

    def _reject(self, retry_after: float) -> None:
        self._rejected += 1
        raise CircuitOpenError(self.name, retry_after)

    def _admit_down(self) -> _Ticket:
        mode = self.policy.on_backend_error
        if mode == "allow":
            return _BYPASS
        if mode == "reject":
            at = self._hub.recheck_at if self._hub.down else self._recheck_at
            self._reject(max(0.0, at - time.monotonic()))
        try:
            probe = self._local.admit()
        except CircuitOpenError:
            self._rejected += 1
            raise
        kind = _Ticket.LOCAL_PROBE if probe else _Ticket.LOCAL
        return _Ticket(kind, "", time.perf_counter() if self._slow else 0.0)

    def _admit_remote(self) -> _Ticket:
        """Ask Redis for a probe slot (the open period is over, or half-open)."""
        token = uuid.uuid4().hex
        try:
            reply = self._run("probe", [self._channel, token, to_ms(self.policy.probe_lease),
                                        self.policy.half_open_max_calls])
            snap = self._apply_reply(reply, "probe")
            verdict, retry_ms = _integer(reply[6]), _integer(reply[7])
        except (FlexiSyncError, IndexError, ValueError) as exc:
            self._go_down(exc)
            return self._admit_down()
        now = time.monotonic()
        start = time.perf_counter() if self._slow else 0.0
        if verdict == 1:
            return _Ticket(_Ticket.PROBE, token, start)
        if verdict == 2:
            return _Ticket(_Ticket.PLAIN, "", start) if snap.state != "disabled" else _BYPASS
        retry = math.inf if retry_ms < 0 else retry_ms / 1000.0
        if self._state == "half_open":
            self._ask_after = now + retry
        elif self._state == "open":  # our deadline ran out before the server's
            self._open_until = max(self._open_until, now + retry)
        self._reject(retry)
        raise AssertionError("unreachable")  # pragma: no cover

    # --- outcomes -------------------------------------------------------------------

    def _classify(self, ticket: _Ticket, exc: BaseException | None,
                  ) -> tuple[str, float | None]:
        policy = self.policy
        if exc is None:
            outcome = "ok"
        elif isinstance(exc, policy.ignore):
            return "neutral", None
        elif isinstance(exc, policy.failure_on):
            outcome = "fail"
        elif not isinstance(exc, Exception):
            return "neutral", None
        else:
            outcome = "ok"
        if outcome == "ok":
            if self._slow is not None and ticket.start \
                    and time.perf_counter() - ticket.start > self._slow:
                return "fail", None
            return "ok", None
        retry_after = None
        if policy.retry_after_of is not None and exc is not None:
            try:
                retry_after = _foreign_seconds(policy.retry_after_of(exc))
            except Exception:
                self._log.exception("breaker.retry_after_of_failed")
        return "fail", retry_after

    def _finish(self, ticket: _Ticket, exc: BaseException | None) -> None:
        if ticket.kind == _Ticket.BYPASS:
            return
        outcome, retry_after = self._classify(ticket, exc)
        self._settle(ticket, outcome, retry_after)

    async def _finish_async(self, ticket: _Ticket, exc: BaseException | None) -> None:
        if ticket.kind == _Ticket.BYPASS:
            return
        outcome, retry_after = self._classify(ticket, exc)
        if ticket.kind == _Ticket.PROBE or (ticket.kind == _Ticket.PLAIN and outcome == "fail"):
            # Shielded: cancelling the caller here must not skip settling a probe lease.
            await asyncio.shield(_in_thread(self._settle, ticket, outcome, retry_after))
        else:
            self._settle(ticket, outcome, retry_after)

    def _settle(self, ticket: _Ticket, outcome: str, retry_after: float | None) -> None:
        kind = ticket.kind
        if outcome == "fail":
            self._local_failures += 1
        if kind in (_Ticket.LOCAL, _Ticket.LOCAL_PROBE):
            self._local.record(kind == _Ticket.LOCAL_PROBE, outcome, retry_after)
            return
        if kind == _Ticket.PROBE:
            self._settle_probe(ticket.token, outcome, retry_after)
            return
        if outcome == "ok":
            self._ok += 1
        elif outcome == "fail":
            self._record_failure(retry_after)

    def _record_failure(self, retry_after: float | None) -> None:
        """Count one failure (with this process's pending successes): one round trip.

        No lock is held across the round trip, so concurrent failing calls never wait
        for each other (a hung Redis costs each of them one bounded round trip at most,
        and once one has found it unreachable the others skip Redis altogether).
        """
        retry_ms = "" if retry_after is None else str(to_ms(retry_after))
        successes = self._successes_before_failure()
        try:
            reply = self._run("record", [*self._record_args, successes, 1, retry_ms])
            self._apply_reply(reply, "record")
        except FlexiSyncError as exc:
            self._go_down(exc)
            self._local.record(False, "fail", retry_after)

    def _settle_probe(self, token: str, outcome: str, retry_after: float | None) -> None:
        pol = self.policy
        retry_ms = "" if retry_after is None else str(to_ms(retry_after))
        try:
            reply = self._run("settle", [
                self._channel, token, outcome, pol.success_threshold,
                to_ms(pol.recovery_timeout), to_ms(pol.max_recovery_timeout), retry_ms])
            self._apply_reply(reply, "settle")
        except FlexiSyncError as exc:
            self._go_down(exc)
            self._local.record(False, outcome, retry_after)

    def _successes_before_failure(self) -> int:
        """Take the unreported successes for a failure report, after any background flush
        in flight has landed, so that successes made before the failure never reach
        Redis after it (they would reset the count the failure just raised). Waiting
        for a flush is never longer than the failure's own round trip would be: the
        flush started earlier, under the same bound, and if it finds Redis unreachable
        the failure skips Redis."""
        bound = time.monotonic() + self._coordinator._backend.retry.deadline + 1.0
        while True:
            self._flush_idle.wait(max(0.0, bound - time.monotonic()))
            with self._flush_lock:
                if self._flush_idle.is_set() or time.monotonic() >= bound:
                    return self._take_successes()

    def _take_successes(self) -> int:
        """Successes not yet reported, now marked reported; caller holds the flush lock."""
        ok = self._ok
        count = ok - self._ok_sent
        self._ok_sent = ok
        return count

    # --- manual control ---------------------------------------------------------------

    def trip(self, retry_after: float | timedelta | None = None) -> None:
        """Open the breaker now, in every process.

        Args:
            retry_after: seconds to stay open (e.g. a provider's Retry-After), at most
                :data:`MAX_DURATION`; None: the current open period
                (``recovery_timeout`` at first). Never shortens an open period already
                running; a forced-open or disabled breaker is left alone.

        While Redis is unreachable this opens the per-process fallback breaker instead.

        Raises:
            ConfigError: ``retry_after`` is not a positive number of seconds up to
                :data:`MAX_DURATION` (nothing is changed anywhere).
        """
        period = _optional_duration(retry_after, "retry_after")
        args = [self._channel, "trip", "" if period is None else to_ms(period),
                to_ms(self.policy.recovery_timeout)]
        try:
            reply = self._run("command", args)
            self._apply_reply(reply, "command")
        except FlexiSyncError as exc:
            self._go_down(exc)
            self._local.record(False, "fail", period or self.policy.recovery_timeout)

    def reset(self) -> None:
        """Close the breaker in every process and clear its counts and open period.

        Also repairs a record another program damaged, replacing a key of another type.

        Raises:
            BackendUnavailable: Redis is unreachable.
        """
        self._command("reset")
        self._local.seed("closed", 0.0)

    def force_open(self) -> None:
        """Reject every call in every process until :meth:`reset` (``retry_after=inf``).

        A manual state: it lasts until changed (the record does not expire).

        Raises:
            BackendUnavailable: Redis is unreachable.
        """
        self._command("force_open")

    def disable(self) -> None:
        """Let every call through in every process, counting nothing, until :meth:`reset`.

        A manual state: it lasts until changed (the record does not expire).

        Raises:
            BackendUnavailable: Redis is unreachable.
        """
        self._command("disable")

    def _command(self, op: str) -> None:
        args = [self._channel, op, "", to_ms(self.policy.recovery_timeout)]
        reply = self._run("command", args, force=op == "reset", fail_fast=False)
        self._apply_reply(reply, "command")
        if self._down:
            self._recheck_at = 0.0  # Redis answered: rejoin the shared state at once

    def on_state_change(self, callback: Callable[[str, str, str], None],
                        ) -> Callable[[str, str, str], None]:
        """Call ``callback(name, old, new)`` in this process on every shared transition.

        Callbacks run on the Coordinator's breaker thread (never the caller's, never the
        listener's), in order; an exception is logged and does not stop the others.
        A breaker with callbacks stays alive as long as its Coordinator.
        Returns ``callback``, so this works as a decorator.
        """
        if not callable(callback):
            raise ConfigError("callback must be callable")
        self._callbacks.append(callback)
        self._hub.pin(self)
        self._ensure_ready()
        return callback

    # --- reading ----------------------------------------------------------------------

    @property
    def state(self) -> State:
        """The state this process acts on (the local fallback's while Redis is down)."""
        self._ensure_ready()
        if self._down and self.policy.on_backend_error == "local":
            return cast("State", self._local.state)
        return self._state

    def stats(self) -> BreakerStats:
        """This process's view, without any I/O (see :class:`BreakerStats`)."""
        if not _MARK[0]:
            detect_fork()
        if self._down and self.policy.on_backend_error == "local":
            state: State = cast("State", self._local.state)
            retry_after = self._local.remaining()
        else:
            state = self._state
            retry_after = (math.inf if state == "forced_open" else
                           max(0.0, self._open_until - time.monotonic())
                           if state == "open" else 0.0)
        return BreakerStats(name=self.name, state=state, version=self._version,
                            failures=self._shared_failures, retry_after=retry_after,
                            successes=self._ok, local_failures=self._local_failures,
                            rejected=self._rejected, backend_available=not self._down)

    def info(self) -> BreakerInfo:
        """The shared state as stored in Redis (one round trip).

        Raises:
            BackendUnavailable: Redis is unreachable.
            BackendError: the record is damaged beyond automatic repair.
        """
        return _info(self.name, self._read(fail_fast=False))

    # --- Redis ------------------------------------------------------------------------

    def _run(self, op: str, args: list[Any], *, force: bool = False,
             fail_fast: bool = True) -> list[Any]:
        """Run a breaker script; a damaged record is repaired (and reported) first.

        Args:
            force: repair even a state key of another type (an explicit reset).
            fail_fast: fail at once while Redis is known to be down (protected calls
                and background work); False for explicit commands and reads.

        Raises:
            MalformedRecord: the record cannot be repaired without ``force`` (a key of
                another type: maybe another program's data).
            BackendUnavailable, BackendError: as :meth:`Hub.run`.
        """
        try:
            return self._hub.run(op, self._keys, args, fail_fast=fail_fast)
        except MalformedRecord as exc:
            self._repair(exc, force=force)
        return self._hub.run(op, self._keys, args, fail_fast=fail_fast)

    def _repair(self, found: MalformedRecord, *, force: bool) -> None:
        reply = self._hub.run("repair", self._keys, [self._channel, "force" if force else ""],
                              fail_fast=False)
        snap = _snapshot(reply, operation="breaker.repair")
        defects = [_text(item) for item in reply[6:]] or [found.defects]
        self._log.warning("breaker.record_repaired", defects=defects, state=snap.state)
        self._apply(snap, time.monotonic(), authoritative=True)

    def _read(self, *, fail_fast: bool = True) -> list[Any]:
        window_ms = to_ms(self.policy.window) if self._mode == "rate" else 0
        reply = self._run("read", [self._channel, window_ms], fail_fast=fail_fast)
        self._apply(_snapshot(reply, operation="breaker.read"), time.monotonic(),
                    authoritative=True)
        return reply

    # --- the mirror -------------------------------------------------------------------

    def _ensure_ready(self) -> None:
        """Subscribe (confirmed), then read: before the first decision of this object."""
        if not _MARK[0]:
            detect_fork()
        if self._ready or self._down:
            return
        with self._prepare_lock:
            if not self._needs_prepare():
                return
            try:
                self._read()  # fails fast when Redis is down
                if self._subscription.registration is None:
                    self._subscription.registration = self._coordinator._listener.subscribe(
                        self._channel, self._handler, timeout=2.0)
                self._read()  # anything published before the subscription
            except FlexiSyncError as exc:
                self._go_down(exc)
            else:
                self._refresh_due = time.monotonic() + self.policy.refresh_interval
                self._ready = True
                self._update_fast()
            self._hub.register(self)

    def _needs_prepare(self) -> bool:
        return not (self._ready or self._down)

    def _on_message(self, _channel: str, data: bytes, _pattern: str | None) -> None:
        try:
            text = data.decode("utf-8")
            parts = text.split(" ")
            if len(parts) != 5 or len(text) > 200:
                raise ValueError("not five fields")
            snap = _snapshot(parts, operation="breaker.message", before=False)
        except (ValueError, MalformedRecord):
            self._garbage(data)
            return
        old = self._apply(snap, time.monotonic())
        if old is not None:
            self._log.debug("breaker.mirrored", old=old, new=snap.state,
                            version=snap.version)

    def _garbage(self, data: bytes) -> None:
        """Something else published on this breaker's channel: report, re-read soon."""
        now = time.monotonic()
        self._refresh_due = min(self._refresh_due, now + 0.2)
        log = self._log.debug
        if now - self._garbage_logged_at > 60.0:  # at most one warning a minute
            self._garbage_logged_at = now
            log = self._log.warning
        log("breaker.message_malformed", size=len(data), channel=self._channel)

    def _apply_reply(self, reply: Any, operation: str) -> _Snapshot:
        """Mirror a script's reply; log a transition this process's script made.

        Only the process that made a transition logs it under its event name
        (``breaker.opened`` at warning...); mirrors log ``breaker.mirrored`` at debug.
        """
        snap = _snapshot(reply, operation=f"breaker.{operation}")
        old = self._apply(snap, time.monotonic())
        if snap.before != snap.state:
            state = snap.state
            log = self._log.warning if state in ("open", "forced_open") else self._log.info
            log(_EVENTS[state], old=snap.before, new=state, version=snap.version,
                retry_after=None if snap.remaining_ms <= 0 else snap.remaining_ms / 1000.0)
        elif old is not None:
            self._log.debug("breaker.mirrored", old=old, new=snap.state,
                            version=snap.version)
        return snap

    def _apply(self, snap: _Snapshot, at: float, *, authoritative: bool = False,
               ) -> str | None:
        """Take ``snap`` into the mirror if it is newer than the snapshot held; ``at`` is
        when it was received (monotonic). Returns the old state when the state changed.

        ``authoritative`` (a read of the record): a read older than the mirror, within
        one epoch, is normally a reply overtaken by a message; twice in a row it means
        the mirror holds a version the server never had (something else published on
        our channel), and the server's record wins.
        """
        with self._mirror_lock:
            if snap.epoch == self._epoch and snap.version <= self._version:
                if not authoritative:
                    return None  # an older (out-of-order) or duplicate snapshot
                if snap.version == self._version:
                    self._behind = 0  # the record agrees with the mirror
                    return None
                self._behind += 1
                if self._behind < 2:
                    self._refresh_due = min(self._refresh_due, at + 0.2)
                    return None
            self._behind = 0
            old = self._state
            self._epoch, self._version = snap.epoch, snap.version
            self._state = snap.state
            self._shared_failures = snap.failures
            remaining_ms = snap.remaining_ms
            self._open_until = math.inf if remaining_ms < 0 else at + remaining_ms / 1000.0
            self._ask_after = 0.0
            self._update_fast()
        if old == snap.state:
            return None
        if self._callbacks:
            self._hub.notify(self._fire, old, snap.state)
        return old

    def _update_fast(self) -> None:
        self._fast = (self._ready and not self._down and self._state == "closed"
                      and self._slow is None)

    def _fire(self, old: str, new: str) -> None:
        for callback in list(self._callbacks):
            try:
                callback(self.name, old, new)
            except Exception:
                self._log.exception("breaker.callback_failed", old=old, new=new)

    # --- background work (the hub thread) ------------------------------------------

    def _tick(self, now: float, *, check_now: bool) -> None:
        if self._down:
            if not self._hub.down and now >= self._recheck_at:
                self._recover()
            return
        if not self._ready:
            return
        try:
            self._flush()
            if check_now or now >= self._refresh_due:
                self._refresh_due = now + self.policy.refresh_interval
                self._read()
        except FlexiSyncError as exc:
            self._go_down(exc)

    def _flush(self) -> None:
        if self._ok == self._ok_sent:
            return
        if self._mode == "count" and (self._shared_failures == 0 or self._state != "closed"):
            with self._flush_lock:
                self._take_successes()  # no failure pending: nothing to reset
            return
        with self._flush_lock:
            successes = self._take_successes()
            if not successes:
                return
            self._flush_idle.clear()
        try:
            reply = self._run("record", [*self._record_args, successes, 0, ""])
        finally:
            self._flush_idle.set()
        self._apply_reply(reply, "record")

    def _go_down(self, exc: BaseException) -> None:
        """Stop using Redis for this breaker: ``on_backend_error`` applies until
        :meth:`_recover` succeeds (after the hub's check for an outage; after
        ``refresh_interval`` for a record that cannot be used)."""
        unavailable = isinstance(exc, BackendUnavailable)
        with self._mirror_lock:
            if self._down:
                return
            self._down = True
            self._fast = False
            self._recheck_at = time.monotonic() + (
                RECHECK_INTERVAL if unavailable else self.policy.refresh_interval)
            self._local.seed(self._state, self._open_until)
        mode = self.policy.on_backend_error
        if isinstance(exc, MalformedRecord):
            self._log.warning("breaker.record_malformed", mode=mode, defects=exc.defects)
        elif unavailable:
            self._log.warning("breaker.backend_unavailable", mode=mode,
                              error=f"{type(exc).__name__}: {exc}")
        else:
            self._log.warning("breaker.backend_error", mode=mode,
                              error=f"{type(exc).__name__}: {exc}")
        self._hub.register(self)

    def _recover(self) -> None:
        """Redis may be back: reconcile the local fallback, re-read, resume sharing."""
        self._recheck_at = time.monotonic() + RECHECK_INTERVAL
        try:
            if self.policy.on_backend_error == "local" and self._local.state == "open":
                remaining = self._local.remaining()
                if remaining > 0:
                    self._apply_reply(self._run("command", [
                        self._channel, "trip", to_ms(min(remaining, MAX_DURATION)),
                        to_ms(self.policy.recovery_timeout)]), "command")
            self._read()
            if self._subscription.registration is None:
                self._subscription.registration = self._coordinator._listener.subscribe(
                    self._channel, self._handler, timeout=2.0)
                self._read()
        except MalformedRecord:
            self._recheck_at = time.monotonic() + self.policy.refresh_interval
            return
        except FlexiSyncError:
            return
        with self._mirror_lock:
            self._down = False
            self._ready = True
            self._refresh_due = time.monotonic() + self.policy.refresh_interval
            self._ok_sent = self._ok  # calls made while down were counted locally
            self._update_fast()
        self._log.info("breaker.backend_restored", state=self._state)

    def _after_fork(self) -> None:
        """In a forked child: fresh locks, no inherited subscription, re-read on use."""
        self._init_runtime()
        self._subscription.close()


def _keys_of(coordinator: Coordinator, name: str) -> list[str]:
    keys = coordinator._keys
    return [keys.key("breaker", name), keys.key("breaker", name, "window"),
            keys.key("breaker", name, "probes")]


def _info(name: str, reply: list[Any]) -> BreakerInfo:
    snap = _snapshot(reply, operation="breaker.read")
    try:
        trips, probes, _probe_ok, open_ms, calls, fails, changed = (
            _integer(v) for v in reply[6:13])
    except (ValueError, TypeError) as exc:
        raise MalformedRecord("breaker.read", f"unreadable reply ({exc})") from None
    state = snap.state
    remaining = snap.remaining_ms
    return BreakerInfo(
        name=name, state=state, version=snap.version, failures=snap.failures,
        retry_after=math.inf if remaining < 0 else remaining / 1000.0,
        trips=trips, probes_in_flight=probes,
        open_period=open_ms / 1000.0 if open_ms and state != "closed" else None,
        window_calls=calls, window_failures=fails,
        changed_at=changed / 1000.0 if changed else None)


def breaker_info(coordinator: Coordinator, name: str, *, window: float = 60.0,
                 ) -> BreakerInfo:
    """The shared state of breaker ``name`` as stored in Redis (one round trip).

    Reads only: no :class:`CircuitBreaker` is created, nothing is subscribed or
    mirrored, nothing is written.

    Args:
        window: the failure-rate window to total (the breaker's own ``window``).

    Raises:
        ConfigError: bad name or window.
        BackendUnavailable: Redis is unreachable.
        BackendError: the record holds data flexisync did not write (``reset()``
            repairs it).
    """
    validate_name(name, "breaker name")
    window_ms = to_ms(_duration(window, "window"))
    channel = coordinator._keys.channel("breaker", name)
    reply = hub_of(coordinator).run("read", _keys_of(coordinator, name), [channel, window_ms],
                                    fail_fast=False)
    return _info(name, reply)


def list_breakers(coordinator: Coordinator) -> list[BreakerInfo]:
    """Every breaker with shared state in this namespace, sorted by name (Redis only).

    Reads only, like :func:`breaker_info`.

    Raises:
        BackendUnavailable: Redis is unreachable.
        BackendError: a record holds data flexisync did not write.
    """
    prefix = f"{coordinator.namespace}:breaker:{{"

    def scan(client: Any) -> list[str]:
        names = []
        for raw_key in client.scan_iter(match=prefix + "*", count=500):
            key = _text(raw_key)
            if key.endswith("}") and "}" not in key[len(prefix):-1]:
                names.append(key[len(prefix):-1])
        return names

    names = coordinator._backend.call("breaker.list", scan)
    return [breaker_info(coordinator, name) for name in sorted(set(names))]
