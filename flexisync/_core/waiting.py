"""Waiting for a turn, woken by a release: the wait loop shared by locks and semaphores.

A waiter registers a wake-up handler for its primitive's channel on the process's one
listener (a ``Subscribe`` step, confirmed by Redis) *before* its final attempt, then
sleeps on a :class:`~flexisync._core.plan.Signal` that the release's ``PUBLISH`` sets.
A lock may hand in a handler still subscribed from its previous wait (``reuse``): then
the attempt made before the wait already ran under the subscription, and no
SUBSCRIBE/UNSUBSCRIBE is sent. It re-attempts when woken, when the current holder's
lease has run out (a crashed holder publishes nothing: the attempt says how long that
lease has left), after the listener reconnects (the runtime pokes every waiter), and at
least every ``refresh`` seconds (which also keeps a queue entry alive).

A release may name the waiters that may go now (its message: space-separated tokens);
a waiter woken by exactly that message and not named sleeps on until its next
re-check. A token written ``~token`` names a backup: it tries after ``backup_delay``
seconds unless another wake-up comes first (a release naming a waiter that died stalls
the lock that long, not until the re-check). An empty message wakes everybody.
"""

from __future__ import annotations

import math
import os
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from flexisync._core.plan import Plan, Subscribe, Wait
from flexisync.errors import BackendUnavailable

if TYPE_CHECKING:
    from flexisync._core.context import Context
    from flexisync._core.lock_runtime import LockRuntime, Wakeups

__all__ = ["owner_token", "wait_for_turn"]


_HOST = socket.gethostname()


def owner_token() -> str:
    """A new holder token: random, plus host and pid so that an operator can tell whose
    lease or slot it is (``flexisync locks``, ``SemaphoreInfo``)."""
    return f"{os.urandom(10).hex()}:{_HOST}:{os.getpid()}"


def wait_for_turn(ctx: Context, rt: LockRuntime, channel: str, token: str, *,
                  deadline: float | None, refresh: float,
                  attempt: Callable[[], Plan[tuple[bool, int]]],
                  leave: Callable[[bool], Plan[None]] | None = None,
                  keep: Callable[[Wakeups], None] | None = None,
                  reuse: tuple[Wakeups, int, int] | None = None,
                  on_turn: Callable[[str], None] = lambda _why: None,
                  backup_delay: float = math.inf) -> Plan[bool]:
    """Wait, re-attempting, until ``attempt`` succeeds (True) or ``deadline`` (False).

    Args:
        ctx, rt: the Context and its lock runtime (wake-up records, reconnect pokes).
        channel: the channel a release publishes on.
        token: this waiter's token (a release's message may name it).
        deadline: ``time.monotonic()`` by which to give up; ``None``: never.
        refresh: re-attempt at least this often (seconds) without a wake-up.
        attempt: one acquire round trip: (acquired, ms the holder's lease has left,
            ``<= 0`` when unknown or none).
        leave: ``leave(background)`` gives up the waiter's place (its queue entry) when
            the wait ends without the turn; with ``background`` it is run on the
            janitor (the task was cancelled). ``None``: nothing to give up.
        keep: given the wake-up record when the turn was taken, its handler still
            subscribed, to keep it (else the handler is dropped at once).
        reuse: ``(wakeups, seen, pttl)``: a wake-up record whose handler is still
            subscribed, the message count it had before the attempt just made, and
            that attempt's ``pttl``. ``None``: subscribe now and attempt again.
        on_turn: told why each attempt is made, right before it: ``"named"`` (a
            release named this waiter), ``"backup"``, ``"woken"`` (a wake-up for
            everybody, a reconnect), ``"recheck"`` (the periodic re-check or the
            holder's lease ran out) or ``"subscribed"`` (the attempt after subscribing).
        backup_delay: seconds a waiter named as a backup waits for another wake-up
            before it tries (``inf``: backups are treated as not named).

    Raises:
        BackendUnavailable: the Context closed, or the subscription failed before the
            deadline.
    """
    wakeups = yield from _join(rt, token, reuse, leave)
    acquired = attempting = False
    try:
        if reuse is None:
            if not (yield from _subscribe(wakeups, channel, deadline, leave)):
                return False  # the wait ran out while subscribing: a plain timeout
            retry, why, seen, recheck = True, "subscribed", 0, 0.0
        else:
            _, seen, pttl = reuse
            retry, why = False, ""
            recheck = time.monotonic() + _sleep_for(refresh, pttl)
        backup_at = math.inf
        while True:
            if retry and not rt.stopping:
                seen = wakeups.snapshot()[0]
                on_turn(why)
                attempting = True
                acquired, pttl = yield from attempt()
                attempting = False
                if acquired:
                    return True
                recheck = time.monotonic() + _sleep_for(refresh, pttl)
                backup_at = math.inf
            limit = min(recheck, backup_at)
            yield from _sleep(rt, wakeups, seen,
                              limit if deadline is None else min(limit, deadline))
            snap = wakeups.snapshot()
            now = time.monotonic()
            if rt.stopping:
                raise BackendUnavailable(ctx.address, reason="the Coordinator was closed")
            if snap[0] == seen and deadline is not None and now >= deadline:
                yield from _give_up(leave)
                return False
            why, backup_at = _why_wake(snap, wakeups.watched, seen, now=now,
                                       recheck=recheck, backup_at=backup_at,
                                       backup_delay=backup_delay)
            retry, seen = why != "", snap[0]
    except GeneratorExit:
        # Cancelled (asyncio) or dropped: an attempt in flight is undone by its own
        # step; otherwise give up the place in the background.
        if leave is not None and not attempting:
            ctx.janitor(leave(True))
        raise
    finally:
        if rt.leave(wakeups, keep=acquired and keep is not None) is not None:
            keep(wakeups)  # type: ignore[misc]  # (keep is set: leave() kept it)


def _why_wake(snapshot: tuple[int, bytes, int], watched: bytes, seen: int, *, now: float,
              recheck: float, backup_at: float, backup_delay: float) -> tuple[str, float]:
    """After a sleep that began at message ``seen``: why to attempt now (``""``: sleep
    on), and when a backup's turn comes."""
    seq, data, named = snapshot
    if seq == seen:  # no wake-up: a timer ran out (or a spurious wake)
        if now >= recheck:
            return "recheck", backup_at
        return ("backup" if now >= backup_at else ""), backup_at
    if named > seen:
        return "named", math.inf
    if seq == seen + 1 and data != b"":
        # One release that named others: sleep on (a backup: for a while).
        backup = b"~" + watched in data.split() and backup_delay < math.inf
        return ("recheck" if now >= recheck else ""), \
            now + backup_delay if backup else math.inf
    return "woken", math.inf


def _join(rt: LockRuntime, token: str, reuse: tuple[Wakeups, int, int] | None,
          leave: Callable[[bool], Plan[None]] | None) -> Plan[Wakeups]:
    """Start the wait: a new wake-up record watching ``token``, or the reused one
    (which watches it since before its attempt)."""
    try:
        wakeups = rt.join() if reuse is None else rt.join(reuse[0])
    except BackendUnavailable:
        yield from _give_up(leave)
        raise
    if reuse is None:
        wakeups.watch(token.encode())
    return wakeups


def _subscribe(wakeups: Wakeups, channel: str, deadline: float | None,
               leave: Callable[[bool], Plan[None]] | None) -> Plan[bool]:
    """Subscribe the waiter's handler; False when the deadline passed meanwhile."""
    timeout = None if deadline is None else max(deadline - time.monotonic(), 0.001)
    try:
        wakeups.registration = yield Subscribe("channel", channel, wakeups.on_message,
                                               timeout)
    except BackendUnavailable:
        yield from _give_up(leave)
        if deadline is not None and time.monotonic() >= deadline:
            return False
        raise
    return True


def _sleep_for(refresh: float, pttl: int) -> float:
    return refresh if pttl <= 0 else min(refresh, pttl / 1000 + 0.001)


def _give_up(leave: Callable[[bool], Plan[None]] | None) -> Plan[None]:
    if leave is not None:
        yield from leave(False)


def _sleep(rt: LockRuntime, wakeups: Wakeups, seen: int, limit: float) -> Plan[None]:
    """Wait until a wake-up newer than ``seen``, the runtime stops, or ``limit``."""
    while not rt.stopping:
        wakeups.signal.clear()
        if wakeups.snapshot()[0] != seen:
            return
        now = time.monotonic()
        if now >= limit:
            return
        yield Wait(wakeups.signal, limit - now)
