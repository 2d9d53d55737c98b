"""Breaker configuration and the read-only views: :class:`BreakerPolicy` (validated at
construction, before any I/O), :class:`BreakerStats` and :class:`BreakerInfo`."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from datetime import timedelta
from typing import Any, Literal, cast

from flexisync._durations import seconds
from flexisync._keys import validate_name
from flexisync.breaker._providers import Outcome, provider_outcome, provider_retry_after
from flexisync.errors import ConfigError

__all__ = ["MAX_DURATION", "STATES", "BackendMode", "BreakerInfo", "BreakerPolicy",
           "BreakerStats", "State", "choose_policy", "duration", "foreign_seconds",
           "optional_duration", "retry_after_attribute"]

State = Literal["closed", "open", "half_open", "forced_open", "disabled"]
BackendMode = Literal["local", "allow", "reject"]

STATES = ("closed", "open", "half_open", "forced_open", "disabled")
#: The longest duration (seconds) any breaker argument accepts: 10 years. It keeps every
#: server-side instant an exact integer of milliseconds (see breaker_lib.lua's MAX_MS).
MAX_DURATION = 10 * 365 * 86400.0
_MAX_COUNT = 1_000_000_000  # bound on the integer options


def retry_after_attribute(exc: BaseException) -> float | None:
    """``exc.retry_after`` as seconds, if it is one (the default ``retry_after_of``
    before :func:`~flexisync.breaker.provider_retry_after`, which also reads it).

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


def duration(value: object, name: str) -> float:
    """``value`` as float seconds in (0, MAX_DURATION]; ConfigError naming ``name``."""
    result = seconds(value, name)
    if result > MAX_DURATION:
        raise ConfigError(f"{name} must be at most {MAX_DURATION:.0f} seconds (10 years), "
                          f"got {result:g}")
    return result


def optional_duration(value: object, name: str) -> float | None:
    return None if value is None else duration(value, name)


def foreign_seconds(value: object) -> float | None:
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
        max_recovery_timeout: each failed probe without a Retry-After doubles the
            open period, up to this.
        half_open_max_calls: probes running at once across ALL processes.
        success_threshold: successful probes needed to close.
        failure_on: exception classes that count as failures (an exception outside
            counts as a success: the dependency answered).
        ignore: exception classes that count as nothing (checked first).
        outcome_of: ``fn(exc) -> "failure" | "success" | "ignore" | None``: refines
            the verdict for an exception in ``failure_on`` (not in ``ignore``); None
            keeps "failure". The default, :func:`~flexisync.breaker.provider_outcome`,
            reads the HTTP status (and a provider's error type): 408, 429, 5xx and
            overload are failures, other 4xx are ignored. None: every exception in
            ``failure_on`` is a failure.
        on_backend_error: while Redis is unreachable: ``"local"`` keeps breaking per
            process with this policy, ``"allow"`` lets every call through,
            ``"reject"`` raises :class:`~flexisync.CircuitOpenError`.
        probe_lease: seconds a half-open probe holds its slot; a probe still running
            (or whose process died) after that frees it for another.
        refresh_interval: seconds between re-reads of the shared state (repairs a
            missed message).
        retry_after_of: ``fn(exc) -> seconds | None``: a provider's retry-after carried
            by a failure, which opens the breaker at once for exactly that long. The
            default, :func:`~flexisync.breaker.provider_retry_after`, reads
            ``exc.retry_after`` and the response's ``retry-after-ms``,
            ``retry-after`` and rate-limit reset headers. None disables.

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
    outcome_of: Callable[[BaseException], Outcome | None] | None = field(
        default=provider_outcome)
    retry_after_of: Callable[[BaseException], float | None] | None = field(
        default=provider_retry_after)

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
            put(name, duration(getattr(self, name), name))
        put("slow_call_duration", optional_duration(self.slow_call_duration,
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
        for name in ("outcome_of", "retry_after_of"):
            hook = getattr(self, name)
            if hook is not None and not callable(hook):
                raise ConfigError(f"{name} must be callable or None")


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
        open_period: the length in seconds of the open period running (half-open:
            of the one that just ended): exactly a provider's Retry-After when one
            opened it, else the period grown by failed probes; lengthened when a
            longer Retry-After extended it. None while closed.
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


def choose_policy(name: str, policy: BreakerPolicy | None, options: dict[str, Any],
                  ) -> BreakerPolicy:
    """The policy a breaker constructor was given (``policy=`` or keyword options).

    Raises:
        ConfigError: unknown option, invalid value, both forms given, or a bad name.
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
    return chosen
