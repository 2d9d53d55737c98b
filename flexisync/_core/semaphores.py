"""Fleet-wide semaphores written once, as plans: the logic both semaphore shells run.

:class:`SemaphoreCore` holds a semaphore object's settings and writes every operation
as a plan (:mod:`flexisync._core.plan`); ``flexisync.semaphores.Semaphore`` runs the
plans with blocking I/O, ``flexisync.aio.semaphores.AsyncSemaphore`` awaits them. How
it works:

* **Slots.** The holders are one ZSET (owner token -> lease expiry on the server's
  clock). ``acquire`` runs one Lua script (``semaphore_acquire``): it drops holders
  whose lease ran out (a crashed process frees its slot after ``lease`` seconds) and
  grants a slot when fewer than ``limit`` live holders exist. The token is random per
  acquisition (plus ``host:pid`` for humans); only that acquisition can extend or
  release the slot.
* **First come, first served.** A caller that will wait joins a FIFO queue (ZSET token
  -> arrival time, server microseconds) in the same script; a free slot goes to a
  caller only when fewer waiters than free slots arrived before it. Each queue entry
  expires unless its waiter refreshes it (every :data:`QUEUE_ENTRY_TTL`/3 seconds), so
  a dead waiter never blocks the queue for long.
* **Wake-ups.** A waiter registers a wake-up handler for the semaphore's channel on the
  process's one listener (confirmed by Redis) before its final attempt, then waits on a
  :class:`~flexisync._core.plan.Signal` that the release's ``PUBLISH`` sets; the
  message names the waiters that may take a slot now, so the others stay asleep. It
  also re-attempts when the earliest holder's lease has run out (a crashed holder
  publishes nothing), after the listener reconnects, and to refresh its queue entry.
  No polling. The wake-up records and reconnect hooks are the lock runtime's.
* **Release** is idempotent per token (a marker "released by T" lives a few seconds).
* **Unknown outcomes.** An acquire whose reply is lost for good, or whose task was
  cancelled while the command may have been in flight, is undone by token
  (``semaphore_abandon``): the slot and queue entry are dropped and a marker makes a
  command still in flight take nothing. Cancelled while waiting, the waiter leaves the
  queue on the Context's janitor thread; a cancelled release is repeated there.
* **Who holds what.** Each ``acquire`` takes one slot; the object keeps the tokens of
  all the slots it holds, and the calling thread's (or asyncio task's) context
  (a :class:`contextvars.ContextVar`) remembers which of them that thread or task took.
  ``release`` gives back the most recent slot the calling thread/task took through this
  object or, when it took none (``asyncio.wait_for(sem.acquire(), t)`` runs the acquire
  in a task of its own, a worker thread may release for a caller), the most recent
  slot the object holds. So one semaphore object may be shared by many threads or
  tasks (``with sem:`` in each), a nested ``with`` takes a second slot, and a slot may
  be released by another thread or task than the one that took it.
* **Fork.** A forked child holds none of the parent's slots (slots remember their pid).
"""

from __future__ import annotations

import contextvars
import functools
import itertools
import math
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from flexisync._core.lock_runtime import runtime
from flexisync._core.locks import GRACE
from flexisync._core.plan import Plan, Script
from flexisync._core.streams import text as _text
from flexisync._core.tally import tally_of
from flexisync._core.waiting import owner_token, wait_for_turn
from flexisync._durations import Duration, optional_seconds, seconds, to_ms
from flexisync._keys import validate_name
from flexisync._log import get_logger
from flexisync.errors import (
    ConfigError,
    FlexiSyncError,
    SemaphoreLostError,
    SemaphoreNotHeldError,
    SemaphoreTimeout,
)

if TYPE_CHECKING:
    from flexisync._core.context import Context

__all__ = ["QUEUE_ENTRY_TTL", "SemaphoreCore", "SemaphoreInfo"]

# A release (or a given-up token) is remembered this much longer than the retry
# policy's deadline (seconds).
_MARKER_MEMORY = 2.0
#: Seconds a waiter's queue entry lives unless refreshed: a waiter that died blocks the
#: queue at most this long.
QUEUE_ENTRY_TTL = 6.0
# A waiter re-checks (and refreshes its queue entry) at least this often even without a
# wake-up (seconds).
_REFRESH = QUEUE_ENTRY_TTL / 3
_ids = itertools.count(1)


@dataclass(frozen=True, slots=True)
class _Slot:
    token: str
    pid: int
    acquired_at: float  # monotonic
    lease: float  # seconds, as last set


#: The tokens of the slots the current thread / asyncio task took, per semaphore object
#: (its ``_id``), most recent last. Immutable values: a task created inside a ``with``
#: copies the context and must not share the holder's tuple.
_MINE: contextvars.ContextVar[Mapping[int, tuple[str, ...]] | None] = \
    contextvars.ContextVar("flexisync_semaphore_tokens", default=None)


def _mine() -> Mapping[int, tuple[str, ...]]:
    return _MINE.get() or {}


def _logger() -> Any:
    return get_logger("semaphores")


@dataclass(frozen=True)
class SemaphoreInfo:
    """A semaphore's use right now, as ``info()`` reports it.

    Attributes:
        name: the semaphore's name.
        limit: this object's limit.
        holders: live slots held fleet-wide (leases not yet run out).
        waiters: live entries in the waiter queue.
    """

    name: str
    limit: int
    holders: int
    waiters: int


class SemaphoreCore:
    """Settings and plans of one semaphore object; the shells subclass it.

    Attributes:
        name: the semaphore's name.
        limit: at most this many slots are held at once across the fleet. Every user
            of a name must agree on it.
        lease: seconds a slot stays held without a release or ``extend``: a holder
            that dies frees its slot after this long.
        timeout: default seconds ``acquire`` and ``with`` wait; ``None`` waits forever.
    """

    def __init__(self, ctx: Context, name: str, limit: int, *, lease: Duration = 60.0,
                 timeout: Duration | None = None) -> None:
        self.name = validate_name(name, "semaphore name")
        if isinstance(limit, bool) or not isinstance(limit, int):
            raise ConfigError(f"semaphore limit must be an int, not {type(limit).__name__}")
        if limit < 1:
            raise ConfigError(f"semaphore limit must be >= 1, got {limit}")
        self.limit = limit
        self.lease = seconds(lease, "lease")
        self.timeout = optional_seconds(timeout, "timeout", allow_zero=True)
        self._ctx = ctx
        self._id = next(_ids)
        keys = ctx.keys
        self._key = keys.key("sem", self.name)
        self._queue_keys = [keys.key("sem", self.name, "queue"),
                            keys.key("sem", self.name, "queue", "ttl")]
        self._marker_prefix = keys.key("sem", self.name, "done") + ":"
        self._channel = keys.object_channel("sem", self.name)
        self._marker_ms = to_ms(ctx.backend.retry.deadline + _MARKER_MEMORY)
        self._queue_ms = to_ms(QUEUE_ENTRY_TTL)
        self._runtime = runtime(ctx)
        self._mutex = threading.Lock()
        self._pid = os.getpid()
        self._slots: list[_Slot] = []

    def __repr__(self) -> str:
        return (f"<{type(self).__name__} {self.name!r} limit={self.limit} "
                f"lease={self.lease} held={self.held}>")

    # --- which slot a release gives back ---------------------------------------------

    def _guard(self) -> threading.Lock:
        """The mutex of this object's books; a forked child gets a fresh one (the
        parent's may have been held by another thread at fork())."""
        if self._pid != os.getpid():
            self._mutex, self._pid = threading.Lock(), os.getpid()
        return self._mutex

    def _live(self) -> list[_Slot]:
        """This object's slots (a forked child holds none of its parent's). Caller
        holds ``_mutex``."""
        pid = os.getpid()
        if any(slot.pid != pid for slot in self._slots):
            self._slots = [slot for slot in self._slots if slot.pid == pid]
        return self._slots

    def _push(self, slot: _Slot) -> None:
        with self._guard():
            self._live().append(slot)
        mine = _mine()
        _MINE.set({**mine, self._id: (*mine.get(self._id, ()), slot.token)})

    def _pick(self, *, remove: bool) -> _Slot | None:
        """The most recent slot the calling thread/task took through this object, else
        the most recent slot this object holds (taken by another task or thread);
        ``remove`` takes it out of the object's books."""
        mine = _mine().get(self._id, ())
        with self._guard():
            slots = self._live()
            if not slots:
                return None
            tokens = {slot.token: i for i, slot in enumerate(slots)}
            index = next((tokens[t] for t in reversed(mine) if t in tokens), len(slots) - 1)
            slot = slots.pop(index) if remove else slots[index]
        if remove and slot.token in mine:
            _MINE.set({**_mine(), self._id: tuple(t for t in mine if t != slot.token)})
        return slot

    def _renewed(self, slot: _Slot, lease: float, at: float) -> None:
        with self._guard():
            slots = self._live()
            for i, held in enumerate(slots):
                if held.token == slot.token:
                    slots[i] = _Slot(slot.token, slot.pid, at, lease)

    @property
    def held(self) -> int:
        """How many slots this object holds in this process, whichever thread or task
        took them (no round trip; a lease that ran out counts until released)."""
        with self._guard():
            return len(self._live())

    def _marker(self, token: str) -> str:
        return self._marker_prefix + token.partition(":")[0]

    def _keys(self, token: str) -> list[str]:
        return [self._key, *self._queue_keys, self._marker(token)]

    # --- acquire --------------------------------------------------------------------

    def _acquire_plan(self, blocking: bool, timeout: Duration | None) -> Plan[bool]:
        """``acquire(blocking, timeout)``: see the shells' docstring."""
        wait: float | None
        if timeout is not None:
            if not blocking:
                raise ConfigError("timeout cannot be given with blocking=False")
            wait = seconds(timeout, "timeout", allow_zero=True, allow_inf=True)
        elif blocking:
            wait = self.timeout
        else:
            wait = 0.0
        forever = wait is None or math.isinf(wait)
        deadline = None if forever or wait == 0 else time.monotonic() + (wait or 0.0)
        token = owner_token()
        waiting = forever or bool(wait)
        started = time.monotonic()
        acquired, _ = yield from self._attempt(token, waiting, deadline)
        if not acquired and waiting:
            acquired = yield from self._wait(token, deadline)
        record = tally_of(self._ctx).semaphore(self.name)
        if acquired:
            record.admitted(time.monotonic() - started)
        else:
            record.refused()
        return acquired

    def _enter_plan(self) -> Plan[None]:
        """Entering ``with``: acquire within ``timeout`` or raise :class:`SemaphoreTimeout`."""
        if not (yield from self._acquire_plan(True, None)):
            raise SemaphoreTimeout(self.name, self.timeout)

    def _attempt(self, token: str, waiting: bool,
                 deadline: float | None) -> Plan[tuple[bool, int]]:
        """One acquire round trip: (acquired, ms until the earliest lease ends).

        When the outcome is unknown (an error, no reply in time, or the task cancelled
        while the command was in flight), the attempt is abandoned by token.
        """
        started = time.monotonic()
        bound = None if deadline is None else max(deadline, started + GRACE)
        try:
            reply = yield Script(
                "semaphore.acquire", "semaphore_acquire", self._keys(token),
                [token, self.limit, to_ms(self.lease), "1" if waiting else "0",
                 self._queue_ms],
                deadline=bound, undo=functools.partial(self._abandon, token, True))
        except Exception:
            yield from self._abandon(token)
            raise
        if int(reply[0]) != 1:
            return False, int(reply[1])
        self._push(_Slot(token, os.getpid(), started, self.lease))
        return True, 0

    def _abandon(self, token: str, background: bool = False) -> Plan[None]:
        """Drop the slot and queue entry ``token`` may hold and leave a marker so a late
        acquire of ``token`` takes nothing. Best effort, bounded by :data:`GRACE` (in
        the ``background``: by the retry policy's deadline)."""
        if self._ctx.closed:
            return  # nothing can be sent; a slot lapses within lease
        bound = None if background else time.monotonic() + GRACE
        try:
            dropped = yield Script(
                "semaphore.abandon", "semaphore_abandon", self._keys(token),
                [token, self._channel, self._marker_ms], deadline=bound,
                undo=None if background else functools.partial(self._abandon, token, True))
        except FlexiSyncError as exc:
            _logger().warning("semaphore.abandon_failed", semaphore=self.name,
                              error=str(exc))
            return
        if int(dropped):
            _logger().info("semaphore.abandoned", semaphore=self.name,
                           reason="an acquire whose outcome was unknown had taken a slot")

    def _wait(self, token: str, deadline: float | None) -> Plan[bool]:
        """Wait for a release's wake-up, re-attempting (:mod:`flexisync._core.waiting`);
        a wait that ends without a slot leaves the queue (by token)."""
        return (yield from wait_for_turn(
            self._ctx, self._runtime, self._channel, token, deadline=deadline,
            refresh=_REFRESH, attempt=functools.partial(self._attempt, token, True, deadline),
            leave=functools.partial(self._abandon, token)))

    # --- release / extend ------------------------------------------------------------

    def _not_held(self) -> SemaphoreNotHeldError:
        return SemaphoreNotHeldError(
            self.name, "is not held by this object: it holds no slot (never acquired, "
                       "already released, or acquired before fork())")

    def _release_step(self, token: str, undo: bool) -> Script:
        return Script("semaphore.release", "semaphore_release", self._keys(token),
                      [token, self._channel, self._marker_ms, self.limit],
                      undo=functools.partial(self._release_again, token) if undo else None)

    def _release_again(self, token: str) -> Plan[None]:
        """A release cancelled in flight, repeated by token (idempotent) on the janitor."""
        try:
            yield self._release_step(token, undo=False)
        except FlexiSyncError as exc:
            _logger().warning("semaphore.release_failed", semaphore=self.name,
                              error=str(exc))

    def _lapsed(self, slot: _Slot, operation: str) -> SemaphoreNotHeldError:
        held = time.monotonic() - slot.acquired_at
        return SemaphoreNotHeldError(
            self.name, f"is no longer held: the slot's lease ({slot.lease:g}s) ran out "
                       f"before {operation}, {held:.3f}s after it was acquired, and the "
                       "slot may have gone to another holder (use a longer lease or "
                       "extend() it)")

    def _release_plan(self) -> Plan[None]:
        """``release()``: see the shells' docstring."""
        slot = self._pick(remove=True)
        if slot is None:
            raise self._not_held()
        outcome = _text((yield self._release_step(slot.token, undo=True)))
        if outcome != "released":
            _logger().warning("semaphore.lapsed", semaphore=self.name,
                              held_for=round(time.monotonic() - slot.acquired_at, 3))
            raise self._lapsed(slot, "release")

    def _exit_plan(self, exc: BaseException | None) -> Plan[None]:
        """Leaving ``with``: release. A lease that ran out inside the block raises
        :class:`SemaphoreLostError` unless the block itself raised (never masked)."""
        try:
            yield from self._release_plan()
        except SemaphoreNotHeldError as error:
            if exc is None:
                raise SemaphoreLostError(self.name) from error
        except FlexiSyncError as error:
            if exc is None:
                raise
            _logger().warning("semaphore.release_failed", semaphore=self.name,
                              error=str(error))

    def _extend_plan(self, lease: Duration | None) -> Plan[None]:
        """``extend(lease)``: see the shells' docstring."""
        new = self.lease if lease is None else seconds(lease, "lease")
        slot = self._pick(remove=False)
        if slot is None:
            raise self._not_held()
        started = time.monotonic()
        outcome = _text((yield Script("semaphore.extend", "semaphore_extend",
                                      [self._key, self._marker(slot.token)],
                                      [slot.token, to_ms(new)])))
        if outcome != "extended":
            raise self._lapsed(slot, "extend")
        self._renewed(slot, new, started)

    # --- inspection ------------------------------------------------------------------

    def _info_plan(self) -> Plan[SemaphoreInfo]:
        holders, waiters = yield Script("semaphore.info", "semaphore_read",
                                        [self._key, self._queue_keys[1]], [])
        return SemaphoreInfo(self.name, self.limit, int(holders), int(waiters))
