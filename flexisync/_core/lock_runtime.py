"""The lock runtime: what every lock of one Context shares, in both shells.

One :class:`LockRuntime` per Context (``ctx.extension("locks", ...)``) keeps the
wake-up records of waiting acquires (poked after a listener reconnect and when the
Context closes) and runs the auto-renew watchdog: one named daemon thread
(``flexisync-lock-watchdog``) that renews every auto-renewing lock of the blocking and
the asyncio shell with blocking I/O, started on first use, stopped on close, and not
inherited by a forked child (which holds none of the parent's locks).
"""

from __future__ import annotations

import math
import threading
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from flexisync._core.plan import Signal
from flexisync._log import get_logger
from flexisync.errors import BackendUnavailable

if TYPE_CHECKING:
    from flexisync._core.context import Context
    from flexisync._core.locks import LockCore
    from flexisync._listener import Registration

__all__ = ["LockRuntime", "Wakeups", "runtime"]


def _logger() -> Any:
    return get_logger("locks")


class Wakeups:
    """One waiter's wake-up handler and the signal it waits on.

    A lock keeps its record (and the handler's subscription) from one wait to the next
    while the lock is contended, so that waiting again costs no SUBSCRIBE."""

    __slots__ = ("_lock", "data", "named", "registration", "seq", "signal", "watched")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.signal = Signal()
        self.seq = 0
        self.named = -1  # the last message (seq) that named ``watched`` to go now
        self.data = b""
        self.watched = b""
        self.registration: Registration | None = None

    def watch(self, token: bytes) -> None:
        """Note messages that name ``token`` (the current waiter's) to go now."""
        with self._lock:
            self.watched = token
            self.named = -1

    def on_message(self, _channel: str, data: bytes, _pattern: str | None) -> None:
        """Listener-thread handler: record the message and wake the waiter."""
        with self._lock:
            self.seq += 1
            self.data = data
            if self.watched and self.watched in data.split():
                self.named = self.seq
        self.signal.set()

    def poke(self) -> None:
        """Wake the waiter with no message (it re-attempts)."""
        with self._lock:
            self.seq += 2  # never looks like exactly one named wake-up
            self.data = b""
        self.signal.set()

    def snapshot(self) -> tuple[int, bytes, int]:
        """(messages seen, the last message, the last message that named the watched
        token)."""
        with self._lock:
            return self.seq, self.data, self.named


class LockRuntime:
    """Everything lock-related one Context runs: wake-up handlers and the watchdog."""

    def __init__(self, ctx: Context) -> None:
        self._ctx = ctx
        self._reset()
        ctx.on_fork(self._after_fork)
        ctx.on_close(self.close)

    def _reset(self) -> None:
        self.mutex = threading.Lock()
        self.waits: set[Wakeups] = set()
        self.locks: weakref.WeakSet[LockCore] = weakref.WeakSet()
        self.renewing: dict[int, LockCore] = {}
        self.cond = threading.Condition(threading.Lock())
        self.thread: threading.Thread | None = None
        self.stopping = False
        self.remove_hook: Callable[[], None] | None = None

    def join(self, wakeups: Wakeups | None = None) -> Wakeups:
        """Start a wait: a new wake-up record (no I/O: the plan then subscribes its
        handler), or ``wakeups`` whose handler is still subscribed. Reconnects of the
        listener poke it.

        Raises:
            BackendUnavailable: the Context is closed.
        """
        ctx = self._ctx
        if ctx.closed or self.stopping:
            raise BackendUnavailable(ctx.address, reason="the Coordinator is closed")
        if wakeups is None:
            wakeups = Wakeups()
        with self.mutex:
            if self.remove_hook is None:
                self.remove_hook = ctx.listener.add_reconnect_hook(self._poke_all)
            self.waits.add(wakeups)
        return wakeups

    def leave(self, wakeups: Wakeups, *, keep: bool = False) -> Registration | None:
        """End a :meth:`join`: its handler goes (no waiting for Redis). With ``keep``
        the handler's registration is returned instead, still subscribed."""
        with self.mutex:
            self.waits.discard(wakeups)
        registration = wakeups.registration
        if keep or registration is None:
            return registration
        wakeups.registration = None
        registration.close(wait=False)
        return None

    def _poke_all(self) -> None:
        with self.mutex:
            waits = list(self.waits)
        for wakeups in waits:
            wakeups.poke()

    def start_renewing(self, lock: LockCore) -> None:
        """Have the watchdog renew ``lock`` at its ``_renew_at`` times."""
        with self.cond:
            if self.stopping:
                return
            self.renewing[id(lock)] = lock
            self.cond.notify()
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(target=self._watch,
                                               name="flexisync-lock-watchdog", daemon=True)
                self.thread.start()

    def stop_renewing(self, lock: LockCore) -> None:
        """Stop renewing ``lock`` (idempotent)."""
        with self.cond:
            self.renewing.pop(id(lock), None)

    def _watch(self) -> None:
        while True:
            with self.cond:
                while True:
                    if self.stopping:
                        return
                    now = time.monotonic()
                    due = [lk for lk in self.renewing.values() if lk._renew_at <= now]
                    if due:
                        break
                    wake = min((lk._renew_at for lk in self.renewing.values()),
                               default=math.inf)
                    self.cond.wait(min(wake - now, 60.0))
            for lock in due:
                try:
                    lock._renew()
                except Exception:  # never let one lock's failure stop the others
                    _logger().exception("lock.renew_failed", lock=lock.name)

    def close(self) -> None:
        """Stop the watchdog and end every wait (the Context closes)."""
        with self.cond:
            self.stopping = True
            self.renewing.clear()
            self.cond.notify_all()
        thread = self.thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5.0)
        with self.mutex:
            waits = list(self.waits)
            self.waits.clear()
        for wakeups in waits:
            registration = wakeups.registration
            if registration is not None:
                registration.close(wait=False)
            wakeups.poke()  # waiters re-check now and learn the Context closed

    def _after_fork(self) -> None:
        locks = list(self.locks)
        for wakeups in self.waits:
            if wakeups.registration is not None:
                wakeups.registration.close(wait=False)
        if self.remove_hook is not None:
            self.remove_hook()
        self._reset()
        for lock in locks:
            lock._forget_after_fork()
            self.locks.add(lock)


def runtime(ctx: Context) -> LockRuntime:
    """The Context's one :class:`LockRuntime`."""
    return ctx.extension("locks", LockRuntime)
