"""The fleet snapshot: every breaker, held lock, stream and semaphore of one namespace.

One picture of what an application's processes share, read from Redis only (nothing is
created, subscribed, mirrored or written), for ``flexisync top`` and
``flexisync dashboard``::

    {"namespace": "app", "taken_at": 1732243384.5, "limit": 500,
     "truncated": {"breakers": false, "locks": false, "streams": false, "semaphores": false},
     "breakers": [{"name", "state", "retry_after", "open_period", "trips", "failures",
                   "probes_in_flight", "changed_at", "window_calls", "window_failures",
                   "outcomes"}],
     "locks": [{"name", "holder", "ttl_left", "fencing_token", "waiters"}],
     "streams": [{"name", "length", "last_id"}],
     "semaphores": [{"name", "holders", "waiters"}]}

Every value is plain JSON: seconds are floats, an infinite duration (a forced-open
breaker's ``retry_after``, a lease without expiry) is ``None``. ``locks`` are the leases
held now; ``semaphores`` those with live holders or waiters (a semaphore's limit lives
in its users' code, not in Redis). Each list is sorted by name and holds at most
``limit`` objects (the first ``limit`` names in sorted order); ``truncated[kind]`` says
that more exist. A breaker record holding foreign data is listed with state
``"malformed"`` and an ``"error"``; other objects of a foreign type are left out.

Cost: ONE cluster-safe SCAN pass over the namespace (``MATCH ns:[bls]*:{*}``, which
only the objects' main keys match), then one ``breaker_read`` script per breaker, one
pipelined round trip per 200 locks or streams, one ``semaphore_read`` script per
semaphore, and the breakers' fleet call outcomes
(:func:`flexisync.metrics.fleet_outcomes`, when that module provides it). The SCAN
visits the whole keyspace of each master: on a server holding millions of keys a
snapshot takes that long.

The Redis work is a plan (:mod:`flexisync._core.plan`): :func:`snapshot` runs it with
blocking I/O, :func:`asnapshot` with ``await`` (and the outcomes with
``flexisync.metrics.afleet_outcomes``; a blocking reader alone runs in a worker thread).
"""

from __future__ import annotations

import asyncio
import functools
import math
import re
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from flexisync._cluster import scan_page
from flexisync._core.context import Context
from flexisync._core.locks import read_locks_plan
from flexisync._core.plan import Call, Plan, Script, arun, run
from flexisync._log import get_logger
from flexisync.breaker._hub import MalformedRecord, hub_of
from flexisync.breaker._mirror import decode_info, keys_of
from flexisync.errors import BackendError, ConfigError

__all__ = ["KINDS", "MAX_OBJECTS", "OUTCOME_BUCKETS", "asnapshot", "snapshot",
           "snapshot_plan"]

#: Default bound on the objects of each kind in one snapshot.
MAX_OBJECTS = 500
#: Fleet outcome buckets (10 s each) asked for per breaker: the last 5 minutes.
OUTCOME_BUCKETS = 30
#: The kinds of object a snapshot lists, as they appear in its keys.
KINDS = {"breaker": "breakers", "lock": "locks", "stream": "streams", "sem": "semaphores"}

_SCAN_COUNT = 1000
_CHUNK = 200
_WINDOW_MS = 60_000  # failure-rate window totalled per breaker (breaker_info's default)
_log = get_logger("fleet")


def _ctx_of(owner: Any) -> Context:
    return owner if isinstance(owner, Context) else owner._ctx


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _finite(seconds: float | None) -> float | None:
    return None if seconds is None or math.isinf(seconds) else seconds


class _Smallest:
    """The ``limit`` smallest distinct names seen, in bounded memory (at most 2x)."""

    __slots__ = ("limit", "names", "truncated")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.names: set[str] = set()
        self.truncated = False

    def add(self, name: str) -> None:
        self.names.add(name)
        if len(self.names) > 2 * self.limit:
            self.names = set(sorted(self.names)[:self.limit])
            self.truncated = True

    def result(self) -> list[str]:
        ordered = sorted(self.names)
        if len(ordered) > self.limit:
            self.truncated = True
        return ordered[:self.limit]


def snapshot_plan(ctx: Context, *, limit: int = MAX_OBJECTS) -> Plan[dict[str, Any]]:
    """The snapshot without the breakers' fleet ``outcomes`` (each left ``[]``).

    Raises:
        ConfigError: ``limit`` is not an int >= 1.
        BackendUnavailable: Redis could not be reached.
        BackendError: Redis rejected a command.
    """
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ConfigError(f"limit must be an int >= 1, got {limit!r}")
    namespace = ctx.keys.namespace
    taken_at = time.time()
    # Names cannot hold glob characters or braces, so this matches exactly the keys
    # ``ns:<kind>:{name}`` of kinds starting with b, l or s (and nothing with a suffix).
    pattern = f"{namespace}:[bls]*:{{*}}"
    shape = re.compile(re.escape(namespace) + r":(breaker|lock|stream|sem):\{([^{}]+)\}")
    found = {kind: _Smallest(limit) for kind in KINDS}
    cursor: Any = 0
    while True:
        cursor, batch = yield Call("fleet.scan", functools.partial(_scan, cursor, pattern))
        for raw in batch:
            match = shape.fullmatch(_text(raw))
            if match is not None:
                found[match.group(1)].add(match.group(2))
        if int(cursor) == 0:
            break
    names = {kind: found[kind].result() for kind in KINDS}
    result: dict[str, Any] = {
        "namespace": namespace,
        "taken_at": taken_at,
        "limit": limit,
        "truncated": {plural: found[kind].truncated for kind, plural in KINDS.items()},
        "breakers": (yield from _breakers(ctx, names["breaker"])),
        "locks": (yield from _locks(ctx, names["lock"])),
        "streams": (yield from _streams(ctx, names["stream"])),
        "semaphores": (yield from _semaphores(ctx, names["sem"])),
    }
    return result


def snapshot(owner: Any, *, limit: int = MAX_OBJECTS,
             buckets: int = OUTCOME_BUCKETS) -> dict[str, Any]:
    """The fleet snapshot of ``owner``'s namespace (see the module docstring), blocking.

    Args:
        owner: a ``Coordinator``, an ``AsyncCoordinator`` (the reads block) or a Context.
        limit: at most this many objects of each kind.
        buckets: fleet outcome buckets (10 s each) per breaker, newest last.

    Raises:
        ConfigError: ``limit`` is not an int >= 1, or ``buckets`` is out of the outcome
            reader's range (1-90).
        BackendUnavailable: Redis could not be reached.
        BackendError: Redis rejected a command.
    """
    ctx = _ctx_of(owner)
    result = run(ctx, snapshot_plan(ctx, limit=limit))
    _add_outcomes(owner, result["breakers"], buckets)
    return result


async def asnapshot(owner: Any, *, limit: int = MAX_OBJECTS,
                    buckets: int = OUTCOME_BUCKETS) -> dict[str, Any]:
    """:func:`snapshot` for asyncio code, every read awaited. Same arguments and errors."""
    ctx = _ctx_of(owner)
    result = await arun(ctx, snapshot_plan(ctx, limit=limit))
    readable = [b for b in result["breakers"] if b["state"] != "malformed"]
    if not readable:
        return result
    areader = _async_outcomes_reader()
    if areader is not None:
        handle = _Owner(owner) if isinstance(owner, Context) else owner
        for breaker in readable:
            breaker["outcomes"] = list(await areader(handle, breaker["name"],
                                                     buckets=buckets))
    elif _outcomes_reader() is not None:
        await asyncio.to_thread(_add_outcomes, owner, result["breakers"], buckets)
    return result


# --- fleet call outcomes (flexisync.metrics, interface 2) ------------------------------


class _Owner:
    """A Coordinator-shaped handle on a Context, for readers that take a coordinator."""

    __slots__ = ("_ctx",)

    def __init__(self, ctx: Context) -> None:
        self._ctx = ctx


def _outcomes_reader() -> Callable[..., list[dict[str, Any]]] | None:
    """``flexisync.metrics.fleet_outcomes``, or None while that module lacks it."""
    try:
        from flexisync import metrics  # noqa: PLC0415  (not needed at import)
    except ImportError:
        return None
    reader: Callable[..., list[dict[str, Any]]] | None = getattr(
        metrics, "fleet_outcomes", None)
    return reader


def _async_outcomes_reader() -> Callable[..., Awaitable[list[dict[str, Any]]]] | None:
    """``flexisync.metrics.afleet_outcomes`` (awaited), or None without it."""
    if _outcomes_reader() is None:  # one switch for both (tests stub this one)
        return None
    from flexisync import metrics  # noqa: PLC0415

    reader: Callable[..., Awaitable[list[dict[str, Any]]]] | None = getattr(
        metrics, "afleet_outcomes", None)
    return reader


def _add_outcomes(owner: Any, breakers: list[dict[str, Any]], buckets: int) -> None:
    """Fill each breaker's ``outcomes`` (oldest bucket first); ``[]`` without a reader."""
    reader = _outcomes_reader()
    if reader is None:
        return
    handle = _Owner(owner) if isinstance(owner, Context) else owner
    for breaker in breakers:
        if breaker["state"] != "malformed":
            breaker["outcomes"] = list(reader(handle, breaker["name"], buckets=buckets))


# --- reads, in chunks ------------------------------------------------------------------


def _chunks(names: list[str]) -> Iterable[list[str]]:
    for start in range(0, len(names), _CHUNK):
        yield names[start:start + _CHUNK]


def _breakers(ctx: Context, names: list[str]) -> Plan[list[dict[str, Any]]]:
    rows: list[dict[str, Any]] = []
    if not names:
        return rows
    hub = hub_of(ctx)  # read as breaker_info does (MalformedRecord for foreign data)
    for name in names:
        channel = ctx.keys.object_channel("breaker", name)
        try:
            reply = yield from hub.script("read", keys_of(ctx, name), [channel, _WINDOW_MS],
                                          fail_fast=False)
            info = decode_info(name, reply)
        except MalformedRecord as exc:  # foreign data: shown, not fatal to the picture
            _log.debug("fleet.breaker_unreadable", breaker=name, defects=exc.defects)
            rows.append({"name": name, "state": "malformed", "error": exc.defects,
                         "retry_after": None, "open_period": None, "trips": 0,
                         "failures": 0, "probes_in_flight": 0, "changed_at": None,
                         "window_calls": 0, "window_failures": 0, "outcomes": []})
            continue
        rows.append({"name": name, "state": info.state,
                     "retry_after": _finite(info.retry_after),
                     "open_period": _finite(info.open_period), "trips": info.trips,
                     "failures": info.failures, "probes_in_flight": info.probes_in_flight,
                     "changed_at": info.changed_at, "window_calls": info.window_calls,
                     "window_failures": info.window_failures, "outcomes": []})
    return rows


def _locks(ctx: Context, names: list[str]) -> Plan[list[dict[str, Any]]]:
    infos = yield from read_locks_plan(ctx, names)
    return [{"name": info.name, "holder": info.holder,
             "ttl_left": _finite(info.ttl), "fencing_token": info.fencing_token,
             "waiters": info.waiters} for info in infos]


def _streams(ctx: Context, names: list[str]) -> Plan[list[dict[str, Any]]]:
    rows: list[dict[str, Any]] = []
    for chunk in _chunks(names):
        keys = [ctx.keys.key("stream", name) for name in chunk]
        replies = yield Call("fleet.streams", functools.partial(_read_streams, keys))
        for i, name in enumerate(chunk):
            length, newest = replies[2 * i:2 * i + 2]
            if _foreign(length, newest):
                continue
            if int(length) == 0 and not newest:
                continue  # deleted since the SCAN, or emptied by hand
            rows.append({"name": name, "length": int(length),
                         "last_id": _text(newest[0][0]) if newest else None})
    return rows


def _semaphores(ctx: Context, names: list[str]) -> Plan[list[dict[str, Any]]]:
    rows: list[dict[str, Any]] = []
    for name in names:  # live holders by the server's clock: its own read script
        keys = [ctx.keys.key("sem", name), ctx.keys.key("sem", name, "queue", "ttl")]
        try:
            holders, waiters = yield Script("fleet.semaphore", "semaphore_read", keys, [])
        except BackendError as exc:  # WRONGTYPE: not a semaphore flexisync wrote
            _log.debug("fleet.semaphore_unreadable", semaphore=name, reason=exc.reason)
            continue
        if int(holders) or int(waiters):
            rows.append({"name": name, "holders": int(holders), "waiters": int(waiters)})
    return rows


def _foreign(*replies: Any) -> bool:
    """True when a pipelined read failed (e.g. WRONGTYPE: a key flexisync did not write)."""
    return any(isinstance(reply, Exception) for reply in replies)


# Redis work for Call steps, bound with functools.partial: each only chains client
# calls and returns the reply (awaited by the asyncio shell). Pipelines are not
# transactions, so on a cluster their keys may live on different masters.


def _scan(cursor: Any, pattern: str, client: Any) -> Any:
    # A cluster's SCAN visits every master in turn (flexisync._cluster.scan_page).
    return scan_page(cursor, pattern, _SCAN_COUNT, client)


def _read_streams(keys: list[str], client: Any) -> Any:
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.xlen(key).xrevrange(key, "+", "-", count=1)
    return pipe.execute(raise_on_error=False)
