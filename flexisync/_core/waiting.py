"""Waiting for a turn, woken by a release: the wait loop shared by locks and semaphores.

A waiter registers a wake-up handler for its primitive's channel on the process's one
listener (a ``Subscribe`` step, confirmed by Redis) *before* its final attempt, then
sleeps on a :class:`~flexisync._core.plan.Signal` that the release's ``PUBLISH`` sets.
It re-attempts when woken, when the current holder's lease has run out (a crashed
holder publishes nothing: the attempt says how long that lease has left), after the
listener reconnects (the runtime pokes every waiter), and at least every ``refresh``
seconds (which also keeps a queue entry alive). A release may name the waiters that may
go now (its message: space-separated tokens); a waiter woken by exactly that message
and not named sleeps on until its next re-check.
"""

from __future__ import annotations

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
    from flexisync._listener import Registration

__all__ = ["wait_for_turn"]


_HOST = socket.gethostname()


def owner_token() -> str:
    """A new holder token: random, plus host and pid so that an operator can tell whose
    lease or slot it is (``flexisync locks``, ``SemaphoreInfo``)."""
    return f"{os.urandom(10).hex()}:{_HOST}:{os.getpid()}"


def wait_for_turn(ctx: Context, rt: LockRuntime, channel: str, token: str, *,
                  deadline: float | None, refresh: float,
                  attempt: Callable[[], Plan[tuple[bool, int]]],
                  leave: Callable[[bool], Plan[None]] | None = None,
                  keep: Callable[[Registration], None] | None = None) -> Plan[bool]:
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
        keep: given the wake-up registration when the turn was taken, to keep it until
            the release (else it is dropped at once).

    Raises:
        BackendUnavailable: the Context closed, or the subscription failed before the
            deadline.
    """
    try:
        wakeups = rt.join()
    except BackendUnavailable:
        yield from _give_up(leave)
        raise
    mine = token.encode()
    acquired = attempting = False
    try:
        timeout = None if deadline is None else max(deadline - time.monotonic(), 0.001)
        try:
            wakeups.registration = yield Subscribe("channel", channel, wakeups.on_message,
                                                   timeout)
        except BackendUnavailable:
            yield from _give_up(leave)
            if deadline is not None and time.monotonic() >= deadline:
                return False  # the wait ran out while subscribing: a plain timeout
            raise
        retry, recheck = True, 0.0
        while True:
            seen = wakeups.snapshot()[0]
            if retry and not rt.stopping:
                attempting = True
                acquired, pttl = yield from attempt()
                attempting = False
                if acquired:
                    return True
                sleep = refresh if pttl <= 0 else min(refresh, pttl / 1000 + 0.001)
                recheck = time.monotonic() + sleep
            yield from _sleep(rt, wakeups, seen,
                              recheck if deadline is None else min(recheck, deadline))
            seq, data = wakeups.snapshot()
            woke = seq != seen
            # The release named the waiters that may go now, and not this one.
            named_other = seq == seen + 1 and data != b"" and mine not in data.split()
            now = time.monotonic()
            if rt.stopping:
                raise BackendUnavailable(ctx.address, reason="the Coordinator was closed")
            if not woke and deadline is not None and now >= deadline:
                yield from _give_up(leave)
                return False
            retry = not (woke and named_other and now < recheck)
    except GeneratorExit:
        # Cancelled (asyncio) or dropped: an attempt in flight is undone by its own
        # step; otherwise give up the place in the background.
        if leave is not None and not attempting:
            ctx.janitor(leave(True))
        raise
    finally:
        parked = rt.leave(wakeups, acquired=acquired and keep is not None)
        if parked is not None and keep is not None:
            keep(parked)


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
