"""Every error flexisync raises.

The tree::

    FlexiSyncError
    ├── ConfigError (also ValueError)      bad URL, name, argument; raised before any I/O
    ├── BackendUnavailable                 Redis unreachable after the retry budget
    ├── BackendError                       Redis answered with an error (WRONGTYPE, NOPERM, OOM...)
    ├── DecodeError (also ValueError)      a stored value is not the JSON flexisync wrote
    ├── CircuitOpenError                   the breaker rejects the call; has .retry_after
    ├── LockError
    │   ├── LockTimeout (also TimeoutError)
    │   ├── LockNotOwnedError              release/extend of a lock this Lock does not hold
    │   ├── LockLostError                  the lease lapsed or was taken away while held
    │   ├── SemaphoreTimeout (a LockTimeout)        no semaphore slot within the timeout
    │   ├── SemaphoreNotHeldError (a LockNotOwnedError) release/extend without a slot
    │   └── SemaphoreLostError (a LockLostError)    a slot's lease ran out while held
    ├── RateLimitTimeout (also TimeoutError) a rate limiter cannot admit within the timeout
    └── EventsTrimmed                      a resume point older than what the stream retains
        └── UnknownResumePoint             a resume point the stream never issued

Errors carry their data as attributes and build their own message, so callers match on
types and read attributes instead of parsing text. Raw ``redis`` exceptions are
translated into these in one place (``flexisync._connection``) with ``raise ... from``.
"""

from __future__ import annotations

__all__ = [
    "BackendError",
    "BackendUnavailable",
    "CircuitOpenError",
    "ConfigError",
    "DecodeError",
    "EventsTrimmed",
    "FlexiSyncError",
    "LockError",
    "LockLostError",
    "LockNotOwnedError",
    "LockTimeout",
    "RateLimitTimeout",
    "SemaphoreLostError",
    "SemaphoreNotHeldError",
    "SemaphoreTimeout",
    "UnknownResumePoint",
]


class FlexiSyncError(Exception):
    """Root of every error raised by flexisync."""


class ConfigError(FlexiSyncError, ValueError):
    """A URL, name or argument is invalid. Raised before Redis is touched."""


class BackendUnavailable(FlexiSyncError):
    """Redis could not be reached within the retry budget.

    Attributes:
        address: where flexisync tried to connect, without credentials.
        attempts: how many attempts were made.
        elapsed: seconds spent trying.
    """

    def __init__(self, address: str, *, attempts: int = 1, elapsed: float = 0.0,
                 reason: str = "") -> None:
        self.address = address
        self.attempts = attempts
        self.elapsed = elapsed
        self.reason = reason
        detail = f": {reason}" if reason else ""
        super().__init__(
            f"Redis at {address} is unavailable after {attempts} attempt(s) "
            f"over {elapsed:.3f}s{detail}"
        )


class BackendError(FlexiSyncError):
    """Redis answered a command with an error (wrong key type, missing permission...).

    Attributes:
        operation: the flexisync operation that failed, e.g. ``"state.get"``.
    """

    def __init__(self, operation: str, reason: str) -> None:
        self.operation = operation
        self.reason = reason
        super().__init__(f"Redis rejected {operation}: {reason}")


class DecodeError(FlexiSyncError, ValueError):
    """A value read from Redis is not valid JSON (something else wrote the key).

    Attributes:
        key: the flexisync key (not the Redis key) whose value could not be decoded.
    """

    def __init__(self, key: str, reason: str) -> None:
        self.key = key
        self.reason = reason
        super().__init__(f"value of {key!r} is not valid JSON: {reason}")


class CircuitOpenError(FlexiSyncError):
    """The circuit breaker is open and rejected the call.

    Attributes:
        name: the breaker's name.
        retry_after: seconds until a probe call may be admitted (``math.inf`` when the
            breaker is forced open).
    """

    def __init__(self, name: str, retry_after: float) -> None:
        self.name = name
        self.retry_after = retry_after
        super().__init__(f"circuit {name!r} is open; retry after {retry_after:.3f}s")


class LockError(FlexiSyncError):
    """Base of lock errors. Attributes: ``name``, the lock's name."""

    def __init__(self, name: str, message: str) -> None:
        self.name = name
        super().__init__(message)


class LockTimeout(LockError, TimeoutError):
    """The lock was not acquired within ``timeout`` seconds."""

    def __init__(self, name: str, timeout: float | None) -> None:
        self.timeout = timeout
        super().__init__(name, f"lock {name!r} not acquired within {timeout}s")


class LockNotOwnedError(LockError):
    """``release()`` or ``extend()`` of a lock this ``Lock`` does not hold."""

    def __init__(self, name: str, reason: str = "not held by this Lock") -> None:
        self.reason = reason
        super().__init__(name, f"lock {name!r} is {reason}")


class LockLostError(LockError):
    """The lock's lease lapsed, or the key was removed, while this ``Lock`` held it."""

    def __init__(self, name: str) -> None:
        super().__init__(name, f"lock {name!r} was lost: its lease is no longer held")


class SemaphoreTimeout(LockTimeout):
    """No slot of the semaphore was free within ``timeout`` seconds (``with sem:``).

    A :class:`LockTimeout` (and a ``TimeoutError``). Attributes: ``name``, ``timeout``.
    """

    def __init__(self, name: str, timeout: float | None) -> None:
        self.timeout = timeout
        LockError.__init__(self, name, f"semaphore {name!r}: no slot free within {timeout}s")


class SemaphoreNotHeldError(LockNotOwnedError):
    """``release()``/``extend()`` of a semaphore object that holds no slot, or whose
    slot's lease had run out. A :class:`LockNotOwnedError`. Attributes: ``name``,
    ``reason``."""

    def __init__(self, name: str, reason: str = "holds no slot") -> None:
        self.reason = reason
        LockError.__init__(self, name, f"semaphore {name!r} {reason}")


class SemaphoreLostError(LockLostError):
    """A slot's lease ran out inside ``with sem:`` (the slot may have gone to another
    holder). A :class:`LockLostError`. Attributes: ``name``."""

    def __init__(self, name: str) -> None:
        LockError.__init__(self, name, f"semaphore {name!r}: a slot's lease ran out "
                                       "while it was held")


class RateLimitTimeout(FlexiSyncError, TimeoutError):
    """``acquire(cost, timeout=...)`` would have to wait longer than ``timeout``.

    Raised at once, without waiting: the limiter's answer says how long admission would
    take, and nothing was reserved.

    Attributes:
        name: the rate limiter's name.
        cost: the cost that was asked for.
        timeout: the longest wait accepted, seconds.
        retry_after: seconds the wait would have been when asked.
    """

    def __init__(self, name: str, cost: float, timeout: float, retry_after: float) -> None:
        self.name = name
        self.cost = cost
        self.timeout = timeout
        self.retry_after = retry_after
        super().__init__(
            f"rate limiter {name!r} cannot admit cost {cost:g} within {timeout:g}s "
            f"(it would take {retry_after:.3f}s)")


class EventsTrimmed(FlexiSyncError):
    """A resume point is older than the oldest event the stream still retains.

    Attributes:
        stream: the stream's name.
        after: the id the reader asked to resume after.
        oldest: the oldest retained id, or ``None`` when the stream is empty.
    """

    def __init__(self, stream: str, after: str, oldest: str | None) -> None:
        self.stream = stream
        self.after = after
        self.oldest = oldest
        super().__init__(
            f"stream {stream!r} no longer holds events after {after!r} "
            f"(oldest retained: {oldest!r})"
        )


class UnknownResumePoint(EventsTrimmed):
    """A resume point this stream never issued: it lies beyond the newest id.

    A fabricated id, or one of another stream (a browser's ``Last-Event-ID`` sent to
    the wrong endpoint), would otherwise answer "caught up" and hold back every new
    event until the clock passed it. It is an :class:`EventsTrimmed`, so
    code that starts over on trimming starts over here too.

    Attributes:
        stream: the stream's name.
        after: the id the reader asked to resume after.
        oldest: always ``None`` (kept from :class:`EventsTrimmed`).
        newest: the newest id the stream issued, or ``None`` when the stream does not
            exist (then ``after`` lies beyond the Redis server's clock).
    """

    def __init__(self, stream: str, after: str, newest: str | None) -> None:
        super().__init__(stream, after, None)
        self.newest = newest
        where = f"its newest id is {newest!r}" if newest else \
            "it does not exist and the id is ahead of the server's clock"
        Exception.__init__(
            self, f"stream {stream!r} never issued {after!r}: {where}; start over")
