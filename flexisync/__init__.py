"""flexisync: the worker processes of one application, coordinated through Redis.

Pub/sub events every worker hears, TTL state they all read, fenced distributed locks,
and a circuit breaker whose state every process mirrors.

    import flexisync
    sync = flexisync.connect("redis://localhost:6379/0")
    providers = sync.state("providers", ttl=60.0)

Importing flexisync opens no connection and starts no thread.
"""

from __future__ import annotations

from flexisync._connection import RetryPolicy
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
)
from flexisync.state import StateStore

__version__ = "0.1.0.dev0"

__all__ = [
    # entry points
    "Coordinator",
    "RetryPolicy",
    "connect",
    # primitives
    "StateStore",
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
]
