"""The state store's logic, once, as plans run by the blocking and the asyncio shells.

:class:`StateCore` validates keys, lays them out, encodes and decodes values, applies
the TTL rules (see :mod:`flexisync.state`) and tells foreign data apart; every method
returns a plan (:mod:`flexisync._core.plan`). :class:`flexisync.state.StateStore` runs
them with blocking I/O and :class:`flexisync.aio.state.AsyncStateStore` awaits them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any, NoReturn

import redis.exceptions as rexc

from flexisync._cluster import scan_page
from flexisync._codec import dumps, loads
from flexisync._core.plan import Call, Plan, Script, Sleep
from flexisync._durations import Duration, optional_seconds, to_ms
from flexisync._keys import validate_name
from flexisync.errors import BackendError, ConfigError, DecodeError, FlexiSyncError

if TYPE_CHECKING:
    from flexisync._core.context import Context
    from flexisync._keys import KeySpace

__all__ = ["StateCore", "StateShell"]

_SCAN_COUNT = 500
_UPDATE_ATTEMPTS = 10_000
_INT64 = 2**63
#: Validated key names remembered per scope (the cache is emptied when full).
_KEY_CACHE = 1024


def _wrong_type(key: str, kind: str) -> DecodeError:
    return DecodeError(key, f"the key holds a Redis {kind}, not a value flexisync wrote")


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _is_wrongtype(exc: BackendError) -> bool:
    """Whether ``exc`` is Redis's WRONGTYPE answer (a key of another Redis type)."""
    cause = exc.__cause__
    return isinstance(cause, rexc.ResponseError) and str(cause).startswith("WRONGTYPE")


class StateCore:
    """The operations of one state scope, as plans; see the module docstring.

    Argument errors (:class:`~flexisync.ConfigError`, ``TypeError`` from the codec) are
    raised when the plan first runs, before any step is yielded, so nothing is sent.
    """

    def __init__(self, keys: KeySpace, scope: str, *, ttl: float | None) -> None:
        self.scope = scope
        self.default_ttl = ttl
        self.prefix = keys.prefix("state", scope)
        # Redis keys of names already validated (bounded; only exact str instances).
        self._rkeys: dict[str, str] = {}

    def key(self, key: object) -> str:
        """The Redis key of ``key``; ConfigError when it breaks the name rule."""
        if type(key) is str:
            found = self._rkeys.get(key)
            if found is not None:
                return found
            rkey = self.prefix + validate_name(key, "state key")
            if len(self._rkeys) >= _KEY_CACHE:
                self._rkeys.clear()
            self._rkeys[key] = rkey
            return rkey
        return self.prefix + validate_name(key, "state key")

    def ttl_seconds(self, ttl: Duration | None) -> float | None:
        """``ttl`` in seconds, else the default; ConfigError when <= 0."""
        if ttl is None:
            return self.default_ttl
        return optional_seconds(ttl, "ttl")

    @staticmethod
    def _refused(operation: str, key: str, rkey: str, exc: BackendError) -> Plan[NoReturn]:
        """After a GET of ``rkey`` failed with ``exc``: re-raise it, or, for Redis's
        WRONGTYPE (a key of another Redis type), ask its type and raise DecodeError."""
        if not _is_wrongtype(exc):
            raise exc
        kind = yield Call(operation, partial(_type, rkey))
        raise _wrong_type(key, _text(kind)) from None

    # --- single values -------------------------------------------------------------

    def set(self, key: str, value: Any, ttl: Duration | None) -> Plan[None]:
        """SET with the TTL rules of ``set``."""
        rkey, raw, seconds = self.key(key), dumps(value), self.ttl_seconds(ttl)
        px = to_ms(seconds) if seconds is not None else None
        yield Call("state.set", lambda c: c.set(rkey, raw, px=px))

    def get(self, key: str, default: Any) -> Plan[Any]:
        """The decoded value, or ``default`` when missing."""
        rkey = self.key(key)
        try:
            raw = yield Call("state.get", partial(_get, rkey))
        except BackendError as exc:
            raw = yield from self._refused("state.get", key, rkey, exc)  # raises
        return default if raw is None else loads(raw, key)

    def add(self, key: str, value: Any, ttl: Duration | None) -> Plan[bool]:
        """SET NX; whether it was stored."""
        rkey, raw, seconds = self.key(key), dumps(value), self.ttl_seconds(ttl)
        px = to_ms(seconds) if seconds is not None else None
        stored = yield Call("state.add", lambda c: c.set(rkey, raw, px=px, nx=True))
        return bool(stored)

    def delete(self, key: str) -> Plan[bool]:
        """DEL; whether the key existed."""
        rkey = self.key(key)
        return bool((yield Call("state.delete", lambda c: c.delete(rkey))))

    def ttl(self, key: str) -> Plan[float | None]:
        """Seconds left: ``math.inf`` without expiry, ``None`` when missing."""
        rkey = self.key(key)
        ms = int((yield Call("state.ttl", lambda c: c.pttl(rkey))))
        if ms == -2:
            return None
        if ms == -1:
            return math.inf
        return ms / 1000.0

    def exists(self, key: object) -> Plan[bool]:
        """EXISTS; whether the key is present."""
        rkey = self.key(key)
        return bool((yield Call("state.exists", lambda c: c.exists(rkey))))

    # --- atomic read-modify-write ------------------------------------------------------

    def update(self, key: str, fn: Callable[[Any], Any], default: Any,
               ttl: Duration | None) -> Plan[Any]:
        """The compare-and-set loop of ``update`` (``state_cas.lua``); the value written.

        A cancellation (async shell) between the read and the script leaves the value
        untouched; during the script, the script either ran whole or not at all.
        """
        if not callable(fn):
            raise ConfigError(f"fn must be callable, not {type(fn).__name__}")
        rkey, seconds = self.key(key), self.ttl_seconds(ttl)
        mode, ms = ("px", to_ms(seconds)) if seconds is not None else ("keep", 0)
        delay = 0.0005
        for _ in range(_UPDATE_ATTEMPTS):
            try:
                raw = yield Call("state.update", partial(_get, rkey))
            except BackendError as exc:
                raw = yield from self._refused("state.update", key, rkey, exc)  # raises
            current = default if raw is None else loads(raw, key)
            new_raw = dumps(fn(current))
            expected = ("0", "") if raw is None else ("1", raw)
            written = yield Script("state.update", "state_cas", [rkey],
                                   [expected[0], expected[1], new_raw, mode, ms],
                                   idempotent=False)
            if isinstance(written, (bytes, str)):  # "wrongtype": replaced since the GET
                raise _wrong_type(key, "value of another type")
            if written:
                return loads(new_raw, key)
            yield Sleep(delay)  # back off a little under heavy contention
            delay = min(delay * 2, 0.02)
        raise FlexiSyncError(f"update of {key!r} lost the race {_UPDATE_ATTEMPTS} times")

    def incr(self, key: str, amount: int, ttl: Duration | None) -> Plan[int]:
        """INCRBY with the TTL rule of ``incr`` (``state_incr.lua``); the new value."""
        if isinstance(amount, bool) or not isinstance(amount, int):
            raise ConfigError(f"amount must be an int, not {type(amount).__name__}")
        if not -_INT64 <= amount < _INT64:
            raise ConfigError(f"amount must fit in 64 bits, got {amount}")
        rkey, seconds = self.key(key), self.ttl_seconds(ttl)
        if seconds is None:  # no TTL rule to apply: INCRBY alone, errors told apart here
            try:
                return int((yield Call("state.incr", partial(_incrby, rkey, amount),
                                       idempotent=False)))
            except BackendError as exc:
                return (yield from self._incr_refused(key, rkey, amount, exc))
        ms = str(to_ms(seconds))
        outcome, value = yield Script("state.incr", "state_incr", [rkey], [amount, ms],
                                      idempotent=False)
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

    @staticmethod
    def _incr_refused(key: str, rkey: str, amount: int,
                      exc: BackendError) -> Plan[NoReturn]:
        """After INCRBY failed with ``exc``: raise the error ``state_incr.lua`` would
        report for the same refusal, or ``exc`` itself for any other."""
        cause = exc.__cause__
        text = str(cause) if isinstance(cause, rexc.ResponseError) else ""
        if text.startswith("WRONGTYPE"):
            kind = yield Call("state.incr", partial(_type, rkey))
            raise _wrong_type(key, _text(kind)) from None
        if "overflow" in text:
            raise BackendError("state.incr", f"adding {amount} to {key!r} would leave "
                               "the 64-bit integer range; the value is unchanged") from None
        if "not an integer" in text:
            raise BackendError("state.incr", f"the value of {key!r} is not an integer "
                               "(incr needs a JSON integer within 64 bits); it is "
                               "unchanged") from None
        raise exc

    # --- the whole scope ---------------------------------------------------------------

    def _scan(self, operation: str) -> Plan[list[str]]:
        """Every Redis key of the scope (SCAN until the cursor comes back to 0)."""
        pattern = self.prefix + "*"
        found: set[str] = set()  # SCAN may return a key more than once
        cursor: Any = 0
        while True:
            cursor, batch = yield Call(operation, partial(_scan_page, cursor, pattern))
            found.update(_text(k) for k in batch)
            if int(cursor) == 0:
                return sorted(found)

    def keys(self) -> Plan[list[str]]:
        """The scope's keys, sorted."""
        cut = len(self.prefix)
        return [k[cut:] for k in (yield from self._scan("state.keys"))]

    def items(self) -> Plan[dict[str, Any]]:
        """Every key and value; DecodeError on the first foreign key in sorted order."""
        rkeys = yield from self._scan("state.keys")
        result: dict[str, Any] = {}
        cut = len(self.prefix)
        for start in range(0, len(rkeys), _SCAN_COUNT):
            chunk = rkeys[start:start + _SCAN_COUNT]
            raws: list[Any] = yield Call("state.items", partial(_mget, chunk))
            missing = [rkey for rkey, raw in zip(chunk, raws, strict=True) if raw is None]
            # MGET answers nil both for a key that expired since the SCAN and for a key
            # of another type: ask which, rather than skip a foreign key silently.
            kinds: dict[str, str] = {}
            if missing:
                types = yield Call("state.items", partial(_types, missing))
                kinds = dict(zip(missing, (_text(t) for t in types), strict=True))
            for rkey, raw in zip(chunk, raws, strict=True):
                if raw is not None:
                    result[rkey[cut:]] = loads(raw, rkey[cut:])
                elif kinds[rkey] not in ("none", "string"):
                    raise _wrong_type(rkey[cut:], kinds[rkey])
        return result

    def clear(self) -> Plan[int]:
        """Delete every key of the scope; how many were deleted."""
        rkeys = yield from self._scan("state.keys")
        deleted = 0
        for start in range(0, len(rkeys), _SCAN_COUNT):
            chunk = rkeys[start:start + _SCAN_COUNT]
            deleted += int((yield Call("state.clear", partial(_delete, chunk))))
        return deleted


class StateShell:
    """What both shells' stores hold: the Context, the core, the scope and default TTL."""

    def __init__(self, ctx: Context, scope: str, *, ttl: Duration | None) -> None:
        """Raises ConfigError for a bad scope or a ``ttl`` that is not > 0 seconds."""
        scope = validate_name(scope, "scope")
        ttl = optional_seconds(ttl, "ttl")
        self._ctx = ctx
        self._core = StateCore(ctx.keys, scope, ttl=ttl)
        self.scope = scope
        self.default_ttl = ttl

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.scope!r} ttl={self.default_ttl}>"


# Redis work for Call steps, bound with functools.partial (each returns the client's
# reply, which the asyncio shell awaits).


def _get(key: str, client: Any) -> Any:
    return client.get(key)


def _type(key: str, client: Any) -> Any:
    return client.type(key)


def _incrby(key: str, amount: int, client: Any) -> Any:
    return client.incrby(key, amount)


def _scan_page(cursor: Any, pattern: str, client: Any) -> Any:
    # A cluster's SCAN visits every master in turn (flexisync._cluster.scan_page).
    return scan_page(cursor, pattern, _SCAN_COUNT, client)


def _mget(keys: list[str], client: Any) -> Any:
    return client.mget(keys)


def _delete(keys: list[str], client: Any) -> Any:
    return client.delete(*keys)


def _types(keys: list[str], client: Any) -> Any:
    """TYPE of each key in one pipeline."""
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.type(key)
    return pipe.execute()
