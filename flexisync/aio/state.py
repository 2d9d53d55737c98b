"""``AsyncStateStore``: :class:`flexisync.StateStore` for asyncio.

The same keys, values, TTL rules and errors as the blocking store (the logic is
:class:`flexisync._core.state.StateCore`, shared by both); every method is a coroutine.
``key in store`` cannot await, so the asyncio store offers ``await store.contains(key)``.

Cancellation: a cancelled call leaves nothing behind. ``set``, ``add``, ``delete`` and
``clear`` may or may not have reached Redis when cancelled; ``update`` either wrote its
value whole (its compare-and-set script ran) or wrote nothing; a cancelled ``incr``
may have been applied (the increment is not undone).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flexisync._core.plan import arun
from flexisync._core.state import StateShell
from flexisync._durations import Duration

__all__ = ["AsyncStateStore"]


class AsyncStateStore(StateShell):
    """JSON values shared by every process, with optional expiry; for asyncio.

    Build it with ``coordinator.state(scope, ttl=...)`` (no I/O) on an
    :class:`~flexisync.aio.AsyncCoordinator`. Each method behaves, and raises, as the
    method of the same name of :class:`flexisync.StateStore`.
    """

    async def set(self, key: str, value: Any, *, ttl: Duration | None = None) -> None:
        """Store ``value`` under ``key``; as :meth:`flexisync.StateStore.set`."""
        return await arun(self._ctx, self._core.set(key, value, ttl))

    async def get(self, key: str, default: Any = None) -> Any:
        """The value under ``key``, or ``default``; as :meth:`flexisync.StateStore.get`."""
        return await arun(self._ctx, self._core.get(key, default))

    async def add(self, key: str, value: Any, *, ttl: Duration | None = None) -> bool:
        """Store ``value`` only if ``key`` is absent; as :meth:`flexisync.StateStore.add`."""
        return await arun(self._ctx, self._core.add(key, value, ttl))

    async def delete(self, key: str) -> bool:
        """Remove ``key``; True when it existed."""
        return await arun(self._ctx, self._core.delete(key))

    async def ttl(self, key: str) -> float | None:
        """Seconds until ``key`` expires: ``math.inf`` if it never does, ``None`` if missing."""
        return await arun(self._ctx, self._core.ttl(key))

    async def contains(self, key: str) -> bool:
        """Whether ``key`` is present (the blocking store's ``key in store``)."""
        return await arun(self._ctx, self._core.exists(key))

    async def update(self, key: str, fn: Callable[[Any], Any], *, default: Any = None,
                     ttl: Duration | None = None) -> Any:
        """Atomically replace the value under ``key`` with ``fn(current)``; the value
        written. As :meth:`flexisync.StateStore.update`.

        ``fn`` is a plain (not ``async``) function: it runs again on the fresh value
        whenever another writer got in first, so it must be quick and free of side
        effects. Cancelled, the update has either written its value whole or nothing.
        """
        return await arun(self._ctx, self._core.update(key, fn, default, ttl))

    async def incr(self, key: str, amount: int = 1, *, ttl: Duration | None = None) -> int:
        """Atomically add ``amount`` to the integer under ``key``; the new value. As
        :meth:`flexisync.StateStore.incr`.

        Cancelled while the increment is in flight, it may have been applied.
        """
        return await arun(self._ctx, self._core.incr(key, amount, ttl))

    async def keys(self) -> list[str]:
        """Every key currently in this scope (sorted); as :meth:`flexisync.StateStore.keys`."""
        return await arun(self._ctx, self._core.keys())

    async def items(self) -> dict[str, Any]:
        """Every key and value of this scope; as :meth:`flexisync.StateStore.items`."""
        return await arun(self._ctx, self._core.items())

    async def clear(self) -> int:
        """Delete every key of this scope; how many were deleted."""
        return await arun(self._ctx, self._core.clear())
