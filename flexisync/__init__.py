"""flexisync: the worker processes of one application, coordinated through Redis.

Pub/sub events every worker hears, TTL state they all read, fenced distributed locks,
and a circuit breaker whose state every process mirrors.

    import flexisync
    sync = flexisync.connect("redis://localhost:6379/0")
    providers = sync.state("providers", ttl=60.0)

Importing flexisync opens no connection and starts no thread. The submodules
``flexisync.sse``, ``flexisync.embedded`` and ``flexisync.testing`` are reachable as
attributes after ``import flexisync`` alone; they are imported on first use.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from flexisync._connection import RetryPolicy
from flexisync.breaker import BreakerInfo, BreakerPolicy, BreakerStats, CircuitBreaker
from flexisync.coordinator import Coordinator, connect
from flexisync.errors import (
    BackendError,
    BackendUnavailable,
    CircuitOpenError,
    ConfigError,
    DecodeError,
    EventsTrimmed,
    FlexiSyncError,
    LockError,
    LockLostError,
    LockNotOwnedError,
    LockTimeout,
    RateLimitTimeout,
    SemaphoreLostError,
    SemaphoreNotHeldError,
    SemaphoreTimeout,
    UnknownResumePoint,
)
from flexisync.events import Event, EventBus, Subscription, SubscriptionStats
from flexisync.locks import Lock, LockInfo
from flexisync.rate_limiter import RateLimiter, Reservation
from flexisync.semaphores import Semaphore, SemaphoreInfo
from flexisync.state import StateStore
from flexisync.streams import Stream

__version__ = "0.1.0.dev0"

__all__ = [
    # entry points
    "Coordinator",
    "RetryPolicy",
    "connect",
    # primitives
    "BreakerInfo",
    "BreakerPolicy",
    "BreakerStats",
    "CircuitBreaker",
    "Event",
    "EventBus",
    "Lock",
    "LockInfo",
    "RateLimiter",
    "Reservation",
    "Semaphore",
    "SemaphoreInfo",
    "StateStore",
    "Stream",
    "Subscription",
    "SubscriptionStats",
    # errors
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

_LAZY_SUBMODULES = frozenset({"aio", "embedded", "sse", "testing"})


def __getattr__(name: str) -> ModuleType:
    """Import ``flexisync.aio``, ``flexisync.sse``, ``flexisync.embedded`` and
    ``flexisync.testing`` on use."""
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f"flexisync.{name}")
    raise AttributeError(f"module 'flexisync' has no attribute {name!r}")
