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

import math
import time
from collections.abc import Callable, Iterator
from functools import partial
from typing import TYPE_CHECKING, Any

import redis.exceptions as rexc

from flexisync._codec import dumps, loads
from flexisync._durations import Duration, optional_seconds, to_ms
from flexisync._keys import validate_name
from flexisync.errors import BackendError, ConfigError, DecodeError, FlexiSyncError

if TYPE_CHECKING:
    from flexisync.coordinator import Coordinator

__all__ = ["StateStore"]

_MISSING = object()
_SCAN_COUNT = 500
_UPDATE_ATTEMPTS = 10_000
_INT64 = 2**63


def _wrong_type(key: str, kind: str) -> DecodeError:
    return DecodeError(key, f"the key holds a Redis {kind}, not a value flexisync wrote")


class _Foreign(str):
    """What ``_get_or_type`` returns for a key of another Redis type: the type's name."""

    __slots__ = ()


def _get_or_type(rkey: str, client: Any) -> Any:
    """GET ``rkey``; for a key of another type, its type name as a :class:`_Foreign`."""
    try:
        return client.get(rkey)
    except rexc.ResponseError as exc:
        if not str(exc).startswith("WRONGTYPE"):
            raise
        return _Foreign(_text(client.type(rkey)))


def _mget(keys: list[str], client: Any) -> Any:
    return client.mget(keys)


def _types(keys: list[str], client: Any) -> list[str]:
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.type(key)
    return [_text(kind) for kind in pipe.execute()]


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

    @staticmethod
    def _decode(key: str, raw: bytes | str) -> Any:
        """A value read by ``_get_or_type``: JSON, or a :class:`_Foreign` type name."""
        if isinstance(raw, _Foreign):
            raise _wrong_type(key, raw)
        return loads(raw, key)

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
            TypeError: ``value`` is not JSON-serializable or nests deeper than 512
                levels (nothing is written).
            ConfigError: bad key, or ``ttl`` <= 0.
        """
        rkey, raw, seconds = self._key(key), dumps(value), self._ttl(ttl)
        px = to_ms(seconds) if seconds is not None else None
        self._backend.call("state.set", lambda c: c.set(rkey, raw, px=px))

    def get(self, key: str, default: Any = None) -> Any:
        """The value under ``key``, or ``default`` when missing or expired.

        Raises:
            DecodeError: something else wrote the key: its bytes are not UTF-8 JSON,
                nest deeper than 512 levels, or it holds another Redis type.
        """
        rkey = self._key(key)
        raw = self._backend.call("state.get", partial(_get_or_type, rkey))
        return default if raw is None else self._decode(key, raw)

    def add(self, key: str, value: Any, *, ttl: Duration | None = None) -> bool:
        """Store ``value`` only if ``key`` is absent; True when it was stored.

        Raises:
            TypeError: ``value`` is not JSON-serializable (nothing is written).
        """
        rkey, raw, seconds = self._key(key), dumps(value), self._ttl(ttl)
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
            DecodeError: the current value was written by something else (see
                :meth:`get`); ``fn`` is not called and nothing is written.
        """
        if not callable(fn):
            raise ConfigError(f"fn must be callable, not {type(fn).__name__}")
        rkey, seconds = self._key(key), self._ttl(ttl)
        mode, ms = ("px", to_ms(seconds)) if seconds is not None else ("keep", 0)
        script = self._backend.script("state_cas")
        delay = 0.0005
        for _ in range(_UPDATE_ATTEMPTS):
            raw = self._backend.call("state.update", partial(_get_or_type, rkey))
            current = default if raw is None else self._decode(key, raw)
            new_raw = dumps(fn(current))
            expected = ("0", "") if raw is None else ("1", raw)
            written = self._backend.call(
                "state.update",
                lambda _c, e=expected, n=new_raw: script(  # type: ignore[misc]
                    keys=[rkey], args=[e[0], e[1], n, mode, ms]),
                idempotent=False,
            )
            if isinstance(written, (bytes, str)):  # "wrongtype": replaced since the GET
                raise _wrong_type(key, "value of another type")
            if written:
                return loads(new_raw, key)
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
            ConfigError: ``amount`` is not an int in [-2**63, 2**63), bad key, or
                ``ttl`` <= 0.
            BackendError: the stored value is not a JSON integer within 64 bits (a
                float, a string...), or the sum would leave that range; the value is
                left unchanged and the message says which.
            DecodeError: another program put a non-string Redis type (a hash...) there.
        """
        if isinstance(amount, bool) or not isinstance(amount, int):
            raise ConfigError(f"amount must be an int, not {type(amount).__name__}")
        if not -_INT64 <= amount < _INT64:
            raise ConfigError(f"amount must fit in 64 bits, got {amount}")
        rkey, seconds = self._key(key), self._ttl(ttl)
        ms = str(to_ms(seconds)) if seconds is not None else ""
        outcome, value = self._backend.run_script("state.incr", "state_incr", [rkey],
                                                  [amount, ms], idempotent=False)
        outcome = _text(outcome)
        if outcome == "ok":
            return int(value)
        if outcome == "wrongtype":
            raise _wrong_type(key, _text(value))
        if outcome == "overflow":
            raise BackendError("state.incr", f"adding {amount} to {key!r} would leave the "
                               "64-bit integer range; the value is unchanged")
        raise BackendError("state.incr", f"the value of {key!r} is not an integer "
                           "(incr needs a JSON integer within 64 bits); it is unchanged")

    # --- the whole scope ---------------------------------------------------------------

    def _scan(self) -> Iterator[str]:
        pattern = self._prefix + "*"

        def scan_all(c: Any) -> list[str]:
            return [_text(k) for k in c.scan_iter(match=pattern, count=_SCAN_COUNT)]

        yield from self._backend.call("state.keys", scan_all)

    def keys(self) -> list[str]:
        """Every key currently in this scope (sorted), whoever wrote it.

        A key another program wrote is listed too, even when its value is not one
        flexisync can read: :meth:`items` and :meth:`get` raise
        :class:`~flexisync.DecodeError` naming it, and :meth:`clear` deletes it.
        """
        cut = len(self._prefix)
        return sorted(k[cut:] for k in self._scan())

    def items(self) -> dict[str, Any]:
        """Every key and value currently stored in this scope.

        It holds the keys :meth:`keys` lists, minus those that expire meanwhile; a key
        is never skipped silently.

        Raises:
            DecodeError: a key of the scope was written by something else (its value
                is not UTF-8 JSON within 512 levels, or it is a hash, a list...); the
                error names the first such key in sorted order.
        """
        rkeys = sorted(self._scan())
        result: dict[str, Any] = {}
        cut = len(self._prefix)
        for start in range(0, len(rkeys), _SCAN_COUNT):
            chunk = rkeys[start:start + _SCAN_COUNT]
            raws: list[Any] = self._backend.call("state.items", partial(_mget, chunk))
            missing = [rkey for rkey, raw in zip(chunk, raws, strict=True) if raw is None]
            # MGET answers nil both for a key that expired since the SCAN and for a key
            # of another type: ask which, rather than skip a foreign key silently.
            kinds = dict(zip(missing, self._backend.call(
                "state.items", partial(_types, missing)), strict=True)) if missing else {}
            for rkey, raw in zip(chunk, raws, strict=True):
                if raw is not None:
                    result[rkey[cut:]] = loads(raw, rkey[cut:])
                elif kinds[rkey] not in ("none", "string"):
                    raise _wrong_type(rkey[cut:], kinds[rkey])
        return result

    def clear(self) -> int:
        """Delete every key of this scope; returns how many were deleted."""
        rkeys = list(self._scan())
        deleted = 0
        for start in range(0, len(rkeys), _SCAN_COUNT):
            chunk = rkeys[start:start + _SCAN_COUNT]
            deleted += int(self._backend.call("state.clear", partial(_delete, chunk)))
        return deleted
