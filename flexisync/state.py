"""``StateStore``: short-lived JSON values every process of the application reads.

TTL rules, one place for all of them:

* ``set`` and ``add`` write with ``ttl`` if given, else the store's default; with
  neither, the value never expires (``set`` replaces any previous expiry, like SET).
* ``update`` writes with ``ttl`` if given, else the store's default; with neither, the
  key keeps whatever expiry it had (a read-modify-write never drops a TTL).
* ``incr`` gives the key ``ttl`` (else the store's default) only when the key has no
  expiry yet, i.e. when the increment creates it: a counter with a TTL counts a fixed
  window and is not extended by every increment.

Values are JSON: a value read from Redis never executes code. Anything read is treated
as foreign (another program may have written the key): bytes that are not UTF-8 JSON,
nesting deeper than ``MAX_DEPTH`` (512) levels, or a key of another Redis type (a hash, a
list...) raise :class:`~flexisync.DecodeError` naming the key, never anything else.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flexisync._core.plan import run
from flexisync._core.state import StateShell
from flexisync._durations import Duration

__all__ = ["StateStore"]


class StateStore(StateShell):
    """JSON values shared by every process, with optional expiry.

    Build it with ``coordinator.state(scope, ttl=...)``. Keys follow the name rule
    (1-200 characters from letters, digits and ``._-:/@``); a bad key raises
    :class:`~flexisync.ConfigError` before Redis is touched.

    Every method may raise :class:`~flexisync.BackendUnavailable` when Redis cannot be
    reached within the retry budget, and :class:`~flexisync.BackendError` when Redis
    rejects a command.
    """

    # --- single values -------------------------------------------------------------

    def set(self, key: str, value: Any, *, ttl: Duration | None = None) -> None:
        """Store ``value`` under ``key``.

        Args:
            ttl: seconds until it expires; ``None`` uses the store's default. With no
                default either, the value never expires.

        Raises:
            TypeError: ``value`` is not JSON-serializable or nests deeper than 512
                levels (nothing is written).
            ConfigError: bad key, or ``ttl`` <= 0.
        """
        return run(self._ctx, self._core.set(key, value, ttl))

    def get(self, key: str, default: Any = None) -> Any:
        """The value under ``key``, or ``default`` when missing or expired.

        Raises:
            DecodeError: something else wrote the key: its bytes are not UTF-8 JSON,
                nest deeper than 512 levels, or it holds another Redis type.
        """
        return run(self._ctx, self._core.get(key, default))

    def add(self, key: str, value: Any, *, ttl: Duration | None = None) -> bool:
        """Store ``value`` only if ``key`` is absent; True when it was stored.

        Raises:
            TypeError: ``value`` is not JSON-serializable (nothing is written).
        """
        return run(self._ctx, self._core.add(key, value, ttl))

    def delete(self, key: str) -> bool:
        """Remove ``key``; True when it existed."""
        return run(self._ctx, self._core.delete(key))

    def ttl(self, key: str) -> float | None:
        """Seconds until ``key`` expires: ``math.inf`` if it never does, ``None`` if missing."""
        return run(self._ctx, self._core.ttl(key))

    def contains(self, key: str) -> bool:
        """Whether ``key`` is present (``key in store`` does the same)."""
        return run(self._ctx, self._core.exists(key))

    def __contains__(self, key: object) -> bool:
        return run(self._ctx, self._core.exists(key))

    # --- atomic read-modify-write ------------------------------------------------------

    def update(self, key: str, fn: Callable[[Any], Any], *, default: Any = None,
               ttl: Duration | None = None) -> Any:
        """Atomically replace the value under ``key`` with ``fn(current)``.

        ``fn`` receives the current value (``default`` when missing) and returns the new
        one. If another process writes in between, ``fn`` runs again on the fresh value,
        so no concurrent write is lost; ``fn`` must therefore be free of side effects.

        Args:
            ttl: seconds until the new value expires; ``None`` uses the store's default,
                and with no default the key keeps its current expiry.

        Returns:
            The value written.

        Raises:
            TypeError: ``fn`` returned something that is not JSON-serializable (nothing
                is written).
            ConfigError: ``fn`` is not callable, bad key, or ``ttl`` <= 0.
            DecodeError: the current value was written by something else (see
                :meth:`get`); ``fn`` is not called and nothing is written.
        """
        return run(self._ctx, self._core.update(key, fn, default, ttl))

    def incr(self, key: str, amount: int = 1, *, ttl: Duration | None = None) -> int:
        """Atomically add ``amount`` to the integer under ``key`` (missing counts as 0).

        Args:
            ttl: expiry given to the key when it has none yet (when this call creates
                it); ``None`` uses the store's default. Later increments keep it.

        Returns:
            The new value.

        Raises:
            ConfigError: ``amount`` is not an int in [-2**63, 2**63), bad key, or
                ``ttl`` <= 0.
            BackendError: the stored value is not a JSON integer within 64 bits (a
                float, a string...), or the sum would leave that range; the value is
                left unchanged and the message says which.
            DecodeError: another program put a non-string Redis type (a hash...) there.
        """
        return run(self._ctx, self._core.incr(key, amount, ttl))

    # --- the whole scope ---------------------------------------------------------------

    def keys(self) -> list[str]:
        """Every key currently in this scope (sorted), whoever wrote it.

        A key another program wrote is listed too, even when its value is not one
        flexisync can read: :meth:`items` and :meth:`get` raise
        :class:`~flexisync.DecodeError` naming it, and :meth:`clear` deletes it.
        """
        return run(self._ctx, self._core.keys())

    def items(self) -> dict[str, Any]:
        """Every key and value currently stored in this scope.

        It holds the keys :meth:`keys` lists, minus those that expire meanwhile; a key
        is never skipped silently.

        Raises:
            DecodeError: a key of the scope was written by something else (its value
                is not UTF-8 JSON within 512 levels, or it is a hash, a list...); the
                error names the first such key in sorted order.
        """
        return run(self._ctx, self._core.items())

    def clear(self) -> int:
        """Delete every key of this scope; returns how many were deleted."""
        return run(self._ctx, self._core.clear())
