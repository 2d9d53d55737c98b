"""flexisync for asyncio: the same toolkit, every I/O method a coroutine.

``flexisync.aio.connect()`` takes the arguments of :func:`flexisync.connect` and returns
an :class:`AsyncCoordinator` with the same factories. Async objects close with
``aclose()`` and are async context managers; the errors are those of
:mod:`flexisync.errors`. Sync and asyncio code in one process share one listener and
one breaker mirror (see :func:`connect`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from flexisync.aio.coordinator import AsyncCoordinator, connect

if TYPE_CHECKING:
    from flexisync.aio import sse
    from flexisync.aio.breaker import AsyncCircuitBreaker
    from flexisync.aio.events import AsyncEventBus, AsyncSubscription
    from flexisync.aio.locks import AsyncLock
    from flexisync.aio.rate_limiter import AsyncRateLimiter, AsyncReservation
    from flexisync.aio.semaphores import AsyncSemaphore
    from flexisync.aio.state import AsyncStateStore
    from flexisync.aio.streams import AsyncStream

__all__ = [
    "AsyncCircuitBreaker",
    "AsyncCoordinator",
    "AsyncEventBus",
    "AsyncLock",
    "AsyncRateLimiter",
    "AsyncReservation",
    "AsyncSemaphore",
    "AsyncStateStore",
    "AsyncStream",
    "AsyncSubscription",
    "connect",
    "sse",
]

_LAZY = {
    "AsyncCircuitBreaker": "flexisync.aio.breaker",
    "AsyncEventBus": "flexisync.aio.events",
    "AsyncSubscription": "flexisync.aio.events",
    "AsyncLock": "flexisync.aio.locks",
    "AsyncRateLimiter": "flexisync.aio.rate_limiter",
    "AsyncReservation": "flexisync.aio.rate_limiter",
    "AsyncSemaphore": "flexisync.aio.semaphores",
    "AsyncStateStore": "flexisync.aio.state",
    "AsyncStream": "flexisync.aio.streams",
}


def __getattr__(name: str) -> Any:
    if name == "sse":
        return importlib.import_module("flexisync.aio.sse")
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'flexisync.aio' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
