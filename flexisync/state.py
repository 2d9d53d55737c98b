"""``StateStore``: short-lived JSON values every process of the application reads.

TTL rules, one place for all of them:

* ``set`` and ``add`` write with ``ttl`` if given, else the store's default; with
  neither, the value never expires (``set`` replaces any previous expiry, like SET).
* ``update`` writes with ``ttl`` if given, else the store's default; with neither, the
  key keeps whatever expiry it had (a read-modify-write never drops a TTL).
* ``incr`` gives the key ``ttl`` (else the store's default) only when the key has no
  expiry yet, i.e. when the increment creates it: a counter with a TTL counts a fixed
  window and is not extended by every increment.

Values are JSON: a value read from Redis never executes code.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from functools import partial
from typing import TYPE_CHECKING, Any

from flexisync._durations import Duration, optional_seconds, to_ms
from flexisync._keys import validate_name
from flexisync.errors import ConfigError, DecodeError, FlexiSyncError

if TYPE_CHECKING:
    from flexisync.coordinator import Coordinator

__all__ = ["StateStore"]

_MISSING = object()
_SCAN_COUNT = 500
_UPDATE_ATTEMPTS = 10_000


def encode(value: Any) -> str:
    """``value`` as compact JSON.

    Raises:
        TypeError: ``value`` (or something inside it) is not JSON-serializable, or is
            NaN / infinity, which JSON cannot carry.
    """
    try:
        return json.dumps(value, separators=(",", ":"), allow_nan=False)
    except ValueError as exc:  # NaN, inf, circular reference
        raise TypeError(f"value is not JSON-serializable: {exc}") from None
    except TypeError as exc:
        raise TypeError(f"value is not JSON-serializable: {exc}") from None


def decode(key: str, raw: bytes | str) -> Any:
    """Parse a stored value; :class:`DecodeError` if it is not JSON."""
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise DecodeError(key, str(exc)) from None


def _mget(keys: list[str], client: Any) -> Any:
    return client.mget(keys)


def _delete(keys: list[str], client: Any) -> Any:
    return client.delete(*keys)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class StateStore:
    """JSON values shared by every process, with optional expiry.

    Build it with ``coordinator.state(scope, ttl=...)``. Keys follow the name rule
    (1-200 characters from letters, digits and ``._-:/@``); a bad key raises
    :class:`~flexisync.ConfigError` before Redis is touched.

    Every method may raise :class:`~flexisync.BackendUnavailable` when Redis cannot be
    reached within the retry budget, and :class:`~flexisync.BackendError` when Redis
    rejects a command.
    """

    def __init__(self, coordinator: Coordinator, scope: str, *, ttl: float | None) -> None:
        self._backend = coordinator._backend
        self._keys = coordinator._keys
        self.scope = scope
        self.default_ttl = ttl
        self._prefix = self._keys.prefix("state", scope)

    def __repr__(self) -> str:
        return f"<StateStore {self.scope!r} ttl={self.default_ttl}>"

    def _key(self, key: object) -> str:
        return self._prefix + validate_name(key, "state key")

    def _ttl(self, ttl: Duration | None) -> float | None:
        value = optional_seconds(ttl, "ttl")
        return self.default_ttl if value is None else value

    # --- single values -------------------------------------------------------------

    def set(self, key: str, value: Any, *, ttl: Duration | None = None) -> None:
        """Store ``value`` under ``key``.

        Args:
            ttl: seconds until it expires; ``None`` uses the store's default. With no
                default either, the value never expires.

        Raises:
            TypeError: ``value`` is not JSON-serializable (nothing is written).
            ConfigError: bad key, or ``ttl`` <= 0.
        """
        rkey, raw, seconds = self._key(key), encode(value), self._ttl(ttl)
        px = to_ms(seconds) if seconds is not None else None
        self._backend.call("state.set", lambda c: c.set(rkey, raw, px=px))

    def get(self, key: str, default: Any = None) -> Any:
        """The value under ``key``, or ``default`` when missing or expired.

        Raises:
            DecodeError: the stored bytes are not JSON (something else wrote them).
        """
        rkey = self._key(key)
        raw = self._backend.call("state.get", lambda c: c.get(rkey))
        return default if raw is None else decode(key, raw)

    def add(self, key: str, value: Any, *, ttl: Duration | None = None) -> bool:
        """Store ``value`` only if ``key`` is absent; True when it was stored.

        Raises:
            TypeError: ``value`` is not JSON-serializable (nothing is written).
        """
        rkey, raw, seconds = self._key(key), encode(value), self._ttl(ttl)
        px = to_ms(seconds) if seconds is not None else None
        done = self._backend.call("state.add", lambda c: c.set(rkey, raw, px=px, nx=True))
        return bool(done)

    def delete(self, key: str) -> bool:
        """Remove ``key``; True when it existed."""
        rkey = self._key(key)
        return bool(self._backend.call("state.delete", lambda c: c.delete(rkey)))

    def ttl(self, key: str) -> float | None:
        """Seconds until ``key`` expires: ``math.inf`` if it never does, ``None`` if missing."""
        rkey = self._key(key)
        ms = int(self._backend.call("state.ttl", lambda c: c.pttl(rkey)))
        if ms == -2:
            return None
        if ms == -1:
            return math.inf
        return ms / 1000.0

    def __contains__(self, key: object) -> bool:
        rkey = self._key(key)
        return bool(self._backend.call("state.exists", lambda c: c.exists(rkey)))

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
        """
        if not callable(fn):
            raise ConfigError(f"fn must be callable, not {type(fn).__name__}")
        rkey, seconds = self._key(key), self._ttl(ttl)
        mode, ms = ("px", to_ms(seconds)) if seconds is not None else ("keep", 0)
        script = self._backend.script("state_cas")
        delay = 0.0005
        for _ in range(_UPDATE_ATTEMPTS):
            raw = self._backend.call("state.update", lambda c: c.get(rkey))
            current = default if raw is None else decode(key, raw)
            new_raw = encode(fn(current))
            expected = ("0", "") if raw is None else ("1", raw)
            written = self._backend.call(
                "state.update",
                lambda _c, e=expected, n=new_raw: script(  # type: ignore[misc]
                    keys=[rkey], args=[e[0], e[1], n, mode, ms]),
                idempotent=False,
            )
            if written:
                return json.loads(new_raw)
            time.sleep(delay)  # back off a little under heavy contention
            delay = min(delay * 2, 0.02)
        raise FlexiSyncError(f"update of {key!r} lost the race {_UPDATE_ATTEMPTS} times")

    def incr(self, key: str, amount: int = 1, *, ttl: Duration | None = None) -> int:
        """Atomically add ``amount`` to the integer under ``key`` (missing counts as 0).

        Args:
            ttl: expiry given to the key when it has none yet (when this call creates
                it); ``None`` uses the store's default. Later increments keep it.

        Returns:
            The new value.

        Raises:
            ConfigError: ``amount`` is not an int, bad key, or ``ttl`` <= 0.
            BackendError: the stored value is not an integer.
        """
        if isinstance(amount, bool) or not isinstance(amount, int):
            raise ConfigError(f"amount must be an int, not {type(amount).__name__}")
        rkey, seconds = self._key(key), self._ttl(ttl)
        ms = str(to_ms(seconds)) if seconds is not None else ""
        return int(self._backend.run_script("state.incr", "state_incr", [rkey],
                                            [amount, ms], idempotent=False))

    # --- the whole scope ---------------------------------------------------------------

    def _scan(self) -> Iterator[str]:
        pattern = self._prefix + "*"

        def scan_all(c: Any) -> list[str]:
            return [_text(k) for k in c.scan_iter(match=pattern, count=_SCAN_COUNT)]

        yield from self._backend.call("state.keys", scan_all)

    def keys(self) -> list[str]:
        """The keys currently stored in this scope (sorted)."""
        cut = len(self._prefix)
        return sorted(k[cut:] for k in self._scan())

    def items(self) -> dict[str, Any]:
        """Every key and value currently stored in this scope.

        Raises:
            DecodeError: a stored value is not JSON.
        """
        rkeys = sorted(self._scan())
        result: dict[str, Any] = {}
        cut = len(self._prefix)
        for start in range(0, len(rkeys), _SCAN_COUNT):
            chunk = rkeys[start:start + _SCAN_COUNT]
            raws: list[Any] = self._backend.call("state.items", partial(_mget, chunk))
            for rkey, raw in zip(chunk, raws, strict=True):
                if raw is not None:  # expired between SCAN and MGET
                    result[rkey[cut:]] = decode(rkey[cut:], raw)
        return result

    def clear(self) -> int:
        """Delete every key of this scope; returns how many were deleted."""
        rkeys = list(self._scan())
        deleted = 0
        for start in range(0, len(rkeys), _SCAN_COUNT):
            chunk = rkeys[start:start + _SCAN_COUNT]
            deleted += int(self._backend.call("state.clear", partial(_delete, chunk)))
        return deleted
