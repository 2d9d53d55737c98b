"""``Lock``: a distributed lock with a lease, fencing tokens and push wake-ups.

How it works, one place for all of it:

* **Lease.** ``acquire`` runs one Lua script (one round trip): ``SET lease token NX PX
  ttl`` and, when that succeeds, the lock's next fencing token, which is returned. The
  token is random per acquisition (plus ``host:pid`` for humans), so only the
  acquisition that set the lease can extend or release it. A retried acquire whose
  first reply was lost finds its own token and gets its own fencing token back; an
  acquire whose outcome stays unknown (no reply before its deadline) drops whatever it
  may have set (``lock_abandon``, one bounded round trip) before raising.
* **Fencing tokens** strictly increase per lock name, across processes, lease expiry,
  the counter's own expiry and a server that lost its data: the counter counts up by
  one, expires after :data:`FENCE_IDLE_TTL` unused, and restarts from the server's
  clock in microseconds (never from 1), see ``lock_lib.lua``. Pass the token to the
  resource you protect and let it reject a smaller one: that is what keeps a holder
  that stalled past its lease (GC pause, network stall) from doing damage.
* **Release** is idempotent per token: the script leaves a marker key "released by
  token T" that expires a few seconds later, so a retry after a lost reply, or a
  renewal that raced the release, hears "released", never "lost".
* **Deadlines.** ``acquire(timeout=t)`` computes one absolute deadline and passes it to
  every round trip, the wake-up subscription and the sleep; release, extend and each
  renewal are bounded by the retry policy (a renewal also by the lease itself).
* **Waiting.** A waiter subscribes to the lock's wake-up channel (on the process's one
  listener connection) *before* its final attempt, then sleeps on a condition that the
  release's ``PUBLISH`` wakes: handoff costs about one round trip, no polling. It also
  re-attempts when the holder's remaining TTL has elapsed (a crashed holder publishes
  nothing) and after the listener reconnects (messages may have been missed). Each
  waiting call has its own handler; the channel is unsubscribed when the last one here
  stops waiting, so nothing lingers per lock name.
* **Fair mode** keeps a FIFO queue of waiters in Redis (each entry expires unless its
  waiter refreshes it, so a dead waiter leaves the queue); a free lock goes to the head
  of the queue only, and the release names the head so other waiters stay asleep.
* **auto_renew** uses one watchdog thread per Coordinator for every held auto-renewing
  lock; it resets each lease at ttl/3. A renewal that finds the lease gone marks the lock
  ``lost``, logs ``lock.lost`` and calls ``on_lost(lock)`` on a thread of its own; a
  renewal that meets this Lock's own release (locally, or through the release's marker
  in Redis) is not a loss.
* **Fork.** A forked child holds nothing: Lock objects it inherited report not owned,
  never touch the parent's lease, and no watchdog runs in the child until it acquires.
"""

from __future__ import annotations

import functools
import math
import os
import socket
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any

from flexisync._durations import Duration, seconds, to_ms
from flexisync._log import get_logger
from flexisync.errors import (
    BackendError,
    BackendUnavailable,
    ConfigError,
    FlexiSyncError,
    LockError,
    LockLostError,
    LockNotOwnedError,
    LockTimeout,
)

if TYPE_CHECKING:
    from flexisync._connection import Backend
    from flexisync._listener import Registration
    from flexisync.coordinator import Coordinator

__all__ = ["Lock", "LockInfo", "list_locks"]

#: A fair-mode queue entry lives this long unless its waiter refreshes it (seconds); a
#: waiter refreshes it three times per period, so only a dead waiter's entry expires.
QUEUE_ENTRY_TTL = 3.0
#: A lock's fencing counter expires after this long without an acquire (seconds; at
#: least twice the lease). Tokens keep increasing after that: the counter restarts from
#: the Redis server's clock in microseconds (``lock_lib.lua``).
FENCE_IDLE_TTL = 86400.0
#: How far a call with a ``timeout`` may overrun it, at most twice (seconds): the last
#: acquire attempt gets at least this long to answer, and so does the clean-up round
#: trip after a fault or a timeout (dropping a lease a lost reply may have set, leaving
#: the fair queue). A healthy Redis answers in well under a millisecond.
GRACE = 0.25
# A release is remembered (for retries of it) this much longer than the retry policy's
# deadline (seconds).
_RELEASE_MEMORY = 2.0
# A waiter re-checks at least this often even without a wake-up (seconds): a safety net
# for a holder whose lease has no expiry (a key someone else wrote).
_MAX_SLEEP = 5.0
_HOST = socket.gethostname()



def _logger() -> Any:
    # Looked up on each (rare) use, so logging configured after import applies.
    return get_logger("locks")


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass(frozen=True)
class LockInfo:
    """A lock that is held right now, as :func:`list_locks` reports it.

    Attributes:
        name: the lock's name.
        ttl: seconds left on the lease; ``math.inf`` when it has no expiry.
        fencing_token: the holder's fencing token, ``None`` when unknown.
        holder: ``"host:pid"`` of the holding process, ``None`` when unknown.
        waiters: live entries in the lock's fair-mode queue (0 for unfair locks).
    """

    name: str
    ttl: float
    fencing_token: int | None
    holder: str | None
    waiters: int = 0


# --- per-Coordinator runtime: wake-up subscriptions and the watchdog ------------------


class _Wakeups:
    """One waiting ``acquire``'s wake-up subscription and the condition it sleeps on."""

    __slots__ = ("cond", "data", "registration", "seq")

    def __init__(self) -> None:
        self.cond = threading.Condition(threading.Lock())
        self.seq = 0
        self.data = b""
        self.registration: Registration | None = None

    def on_message(self, _channel: str, data: bytes, _pattern: str | None) -> None:
        """Listener-thread handler: record the message and wake the waiter."""
        with self.cond:
            self.seq += 1
            self.data = data
            self.cond.notify_all()

    def poke(self) -> None:
        """Wake the waiter with no message (it re-attempts)."""
        with self.cond:
            self.seq += 2  # never looks like exactly one named wake-up
            self.data = b""
            self.cond.notify_all()


class _Runtime:
    """Everything lock-related one Coordinator runs: wake-ups and the watchdog."""

    def __init__(self, coordinator: Coordinator) -> None:
        self._coordinator = weakref.ref(coordinator)
        self._reset()
        coordinator._on_fork(self._after_fork)
        coordinator._on_close(self.close)

    def _reset(self) -> None:
        self.mutex = threading.Lock()
        self.waits: set[_Wakeups] = set()
        self.locks: weakref.WeakSet[Lock] = weakref.WeakSet()
        self.renewing: dict[int, Lock] = {}
        self.cond = threading.Condition(threading.Lock())
        self.thread: threading.Thread | None = None
        self.stopping = False
        self.remove_hook: Callable[[], None] | None = None

    # wake-ups

    def join(self, name: str, deadline: float | None) -> _Wakeups:
        """A wake-up subscription to ``name``'s channel for one waiting ``acquire``.

        Every waiting call has its own handler on the process's one listener; the
        listener subscribes the channel for the first and unsubscribes it when the last
        one leaves, so nothing lingers for a lock nobody here waits on.

        Raises:
            BackendUnavailable: the Coordinator is closed, or Redis did not confirm
                the subscription by ``deadline`` (else within the retry policy).
        """
        coordinator = self._coordinator()
        if coordinator is None or coordinator.closed:
            address = coordinator._backend.address if coordinator is not None else "?"
            raise BackendUnavailable(address, reason="the Coordinator is closed")
        listener = coordinator._listener
        wakeups = _Wakeups()
        with self.mutex:
            if self.remove_hook is None:
                self.remove_hook = listener.add_reconnect_hook(self._poke_all)
            self.waits.add(wakeups)
        timeout = None if deadline is None else max(deadline - time.monotonic(), 0.001)
        try:
            wakeups.registration = listener.subscribe(
                coordinator._keys.channel("lock", name), wakeups.on_message, timeout=timeout)
        except BaseException:
            with self.mutex:
                self.waits.discard(wakeups)
            raise
        return wakeups

    def leave(self, wakeups: _Wakeups, *, acquired: bool = False) -> Registration | None:
        """End a :meth:`join`: its handler goes, and the channel with the last one.

        With ``acquired``, the handler is returned instead, for the new holder to drop
        at its release: the UNSUBSCRIBE then costs nothing on the handoff path.
        """
        with self.mutex:
            self.waits.discard(wakeups)
        registration = wakeups.registration
        if acquired or registration is None:
            return registration
        registration.close(wait=False)
        return None

    def _poke_all(self) -> None:
        # Runs on the listener thread after a reconnect: messages may have been missed.
        with self.mutex:
            waits = list(self.waits)
        for wakeups in waits:
            wakeups.poke()

    # the watchdog

    def start_renewing(self, lock: Lock) -> None:
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

    def stop_renewing(self, lock: Lock) -> None:
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
        """Stop the watchdog and end every wait (Coordinator.close)."""
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
            if wakeups.registration is not None:
                wakeups.registration.close(wait=False)
            wakeups.poke()  # waiters re-attempt now and learn the Coordinator closed

    def _after_fork(self) -> None:
        # In the child: no thread exists, locks inherited from the parent are not ours,
        # and no thread of the child is waiting (only the forking thread survives).
        locks = list(self.locks)
        remove_hook = self.remove_hook
        for wakeups in self.waits:
            if wakeups.registration is not None:
                wakeups.registration.close(wait=False)
        if remove_hook is not None:
            remove_hook()
        self._reset()
        for lock in locks:
            lock._forget_after_fork()
            self.locks.add(lock)


def _runtime(coordinator: Coordinator) -> _Runtime:
    return coordinator._extension("locks", _Runtime)


# --- the Lock ---------------------------------------------------------------------------


class Lock:
    """A distributed lock shared by every process that uses the same name.

    Build it with ``coordinator.lock(name, ttl=..., ...)``. A ``Lock`` object holds at
    most one acquisition at a time and is not reentrant; give each thread its own
    ``Lock`` object (they are cheap) for the same name.

    Attributes:
        name: the lock's name.
        ttl: the lease in seconds: a holder that neither releases nor renews loses the
            lock after this long.
        timeout: default seconds :meth:`acquire` and ``with`` wait; ``None`` waits
            forever.
        auto_renew: renew the lease at ttl/3 while held (one watchdog thread per
            Coordinator).
        fair: serve waiters in arrival order. Every user of a name must agree on it.
        on_lost: called as ``on_lost(lock)`` (on a thread of its own) when a held lease
            is found to be gone.
    """

    def __init__(self, coordinator: Coordinator, name: str, *, ttl: float,
                 timeout: float | None, auto_renew: bool, fair: bool,
                 on_lost: Callable[[Lock], None] | None) -> None:
        if on_lost is not None and not callable(on_lost):
            raise ConfigError(f"on_lost must be callable, not {type(on_lost).__name__}")
        self.name = name
        self.ttl = ttl
        self.timeout = timeout
        self.auto_renew = bool(auto_renew)
        self.fair = bool(fair)
        self.on_lost = on_lost
        self._coordinator = coordinator
        self._backend: Backend = coordinator._backend
        keys = coordinator._keys
        self._key = keys.key("lock", name)
        self._fence_key = keys.key("lock", name, "fence")
        # lock_release leaves "released by token T" here for a few seconds.
        self._marker_prefix = keys.key("lock", name, "released") + ":"
        self._queue_key = keys.key("lock", name, "queue")
        self._queue_ttl_key = keys.key("lock", name, "queue", "ttl")
        self._channel = keys.channel("lock", name)
        # The scripts run in fair mode when given the queue keys.
        queue = [self._queue_key, self._queue_ttl_key] if self.fair else []
        self._acquire_keys = [self._key, self._fence_key, *queue]
        self._queue_keys = queue
        self._abandon_keys = [self._key, *queue]
        self._queue_ms = to_ms(QUEUE_ENTRY_TTL)
        self._fence_ms = to_ms(max(FENCE_IDLE_TTL, 2 * ttl))
        # A release is remembered for longer than one call may keep retrying it.
        self._released_ms = to_ms(self._backend.retry.deadline + _RELEASE_MEMORY)
        self._runtime = _runtime(coordinator)
        self._runtime.locks.add(self)
        self._mutex = threading.Lock()
        self._token: str | None = None
        self._releasing: str | None = None  # the token a release() in progress gives up
        self._fence: int | None = None
        self._lease_ttl = ttl
        self._acquired_at = 0.0
        self._lease_deadline = 0.0  # monotonic time by which the lease surely lapsed
        self._renew_at = math.inf
        self._lost = False
        self._inherited = False
        # The wake-up handler of the wait that acquired, dropped at release.
        self._parked: Registration | None = None
        self._parked_finalizer: weakref.finalize[Any, Any] | None = None

    def __repr__(self) -> str:
        state = "lost" if self._lost else ("held" if self._token else "unheld")
        return (f"<Lock {self.name!r} ttl={self.ttl} fair={self.fair} "
                f"auto_renew={self.auto_renew} {state} fence={self._fence}>")

    # --- acquire -------------------------------------------------------------------

    def acquire(self, blocking: bool = True, timeout: Duration | None = None) -> bool:
        """Take the lock; returns True when this Lock now holds it.

        ``timeout`` bounds the wall time of the whole call, Redis round trips and
        socket waits included, give or take one last bounded round trip: the final
        attempt and a clean-up after a fault or a timeout may each overrun it by
        :data:`GRACE` (0.25 s). Without a timeout (or with 0), each round trip is
        bounded by the retry policy's ``deadline``.

        Args:
            blocking: False makes exactly one attempt (one round trip).
            timeout: seconds to wait at most (0: one attempt). ``None`` uses the Lock's
                ``timeout``; when that is ``None`` too, waits forever.

        Returns:
            True when acquired (``fencing_token`` is then set), False when the wait
            timed out or, non-blocking, the lock was held.

        Raises:
            ConfigError: ``timeout`` is negative or not a number, or given together
                with ``blocking=False`` (checked before Redis is touched).
            LockError: this Lock object already holds the lock (not reentrant).
            BackendUnavailable: Redis could not be reached in time; the lock is not
                held, and a lease a lost reply may have left behind was dropped (or, if
                Redis stays unreachable, lapses within ``ttl``).
            BackendError: Redis rejected the script (e.g. a foreign value in the
                lock's keys); nothing is held.
        """
        wait: float | None
        if timeout is not None:
            if not blocking:
                raise ConfigError("timeout cannot be given with blocking=False")
            wait = seconds(timeout, "timeout", allow_zero=True, allow_inf=True)
        else:
            wait = self.timeout if blocking else 0.0
        # One absolute deadline for the whole call; every round trip is cut at it.
        deadline = None if wait is None or math.isinf(wait) or wait == 0 \
            else time.monotonic() + wait
        if self._token is not None:
            if not self.lost:
                raise LockError(self.name, f"lock {self.name!r} is already held by this "
                                           "Lock object; locks are not reentrant")
            self._runtime.stop_renewing(self)  # a lost acquisition is simply dropped
            self._token = None
        self._drop_parked()
        token = f"{os.urandom(10).hex()}:{_HOST}:{os.getpid()}"
        waiting = wait is None or wait > 0
        if self._attempt(token, waiting, deadline)[0]:
            return True
        if not waiting:
            return False
        return self._wait(token, deadline)

    def _attempt(self, token: str, waiting: bool,
                 deadline: float | None = None) -> tuple[bool, int]:
        """One acquire round trip: (acquired, holder's remaining ms or fence).

        When the outcome is unknown (no reply in time, or an error), whatever the
        attempt may have set is dropped before the error is raised, so no lease is left
        that nobody holds.
        """
        args: list[Any] = [token, to_ms(self.ttl), self._fence_ms]
        if self.fair:
            args += ["1" if waiting else "0", self._queue_ms]
        started = time.monotonic()
        script = self._backend.script("lock_acquire")
        bound = None if deadline is None else max(deadline, started + GRACE)
        try:
            reply = self._backend.call(
                "lock.acquire", lambda _c: script(keys=self._acquire_keys, args=args),
                deadline=bound)
        except BaseException:
            self._abandon(token)
            raise
        if int(reply[0]) != 1:
            return False, int(reply[1])
        with self._mutex:
            self._token = token
            self._fence = int(reply[1])
            self._lease_ttl = self.ttl
            self._acquired_at = started
            self._lease_deadline = started + self.ttl
            self._lost = False
            self._inherited = False
            if self.auto_renew:
                self._renew_at = started + self.ttl / 3
        if self.auto_renew:
            self._runtime.start_renewing(self)
        return True, self._fence

    def _abandon(self, token: str) -> None:
        """Drop the lease ``token`` may hold and its queue entry; one bounded round trip.

        Best effort: if Redis cannot be told, the lease lapses within ``ttl`` and the
        queue entry within :data:`QUEUE_ENTRY_TTL`.
        """
        if self._backend.closed:
            return  # the Coordinator is closed: nothing can be sent
        try:
            dropped = self._backend.run_script(
                "lock.abandon", "lock_abandon", self._abandon_keys, [token, self._channel],
                deadline=time.monotonic() + GRACE)
        except FlexiSyncError as exc:
            _logger().warning("lock.abandon_failed", lock=self.name, error=str(exc))
            return
        if int(dropped):
            _logger().info("lock.abandoned", lock=self.name,
                           reason="an acquire whose outcome was unknown had set the lease")

    def _wait(self, token: str, deadline: float | None) -> bool:
        """Wait for a wake-up, re-attempting; the subscription precedes every attempt."""
        runtime = self._runtime
        try:
            wakeups = runtime.join(self.name, deadline)
        except BackendUnavailable:
            self._leave_queue(token)
            if deadline is not None and time.monotonic() >= deadline:
                return False  # the wait ran out while subscribing: a plain timeout
            raise
        refresh = QUEUE_ENTRY_TTL / 3 if self.fair else _MAX_SLEEP
        mine = token.encode()
        attempt = True
        recheck = 0.0
        acquired = False
        try:
            while True:
                seen = wakeups.seq
                if attempt:
                    acquired, pttl = self._attempt(token, True, deadline)
                    if acquired:
                        return True
                    # Re-attempt when the holder's lease runs out (a crashed holder
                    # publishes nothing), and in fair mode often enough to keep our
                    # queue entry alive.
                    sleep = refresh if pttl <= 0 else min(refresh, pttl / 1000 + 0.001)
                    recheck = time.monotonic() + sleep
                with wakeups.cond:
                    # ``stopping`` too: close() may have poked before ``seen`` was read
                    # (while the subscription was being confirmed); it sets stopping
                    # before it pokes, so checking it under the same condition is enough.
                    while wakeups.seq == seen and not runtime.stopping:
                        now = time.monotonic()
                        limit = recheck if deadline is None else min(recheck, deadline)
                        if now >= limit:
                            break
                        wakeups.cond.wait(limit - now)
                    woke = wakeups.seq != seen
                    # Fair mode: the release named another waiter as the next holder.
                    named_other = (self.fair and wakeups.seq == seen + 1
                                   and wakeups.data not in (b"", mine))
                now = time.monotonic()
                if runtime.stopping:
                    raise BackendUnavailable(self._backend.address,
                                             reason="the Coordinator was closed")
                if not woke and deadline is not None and now >= deadline:
                    self._leave_queue(token)
                    return False
                attempt = not (woke and named_other and now < recheck)
        finally:
            parked = runtime.leave(wakeups, acquired=acquired)
            if parked is not None:
                self._park(parked)

    def _park(self, registration: Registration) -> None:
        """Keep the wake-up handler of the wait that acquired until this Lock releases
        (or acquires again, or is garbage-collected)."""
        self._drop_parked()
        self._parked = registration
        finalizer = weakref.finalize(self, functools.partial(registration.close, wait=False))
        finalizer.atexit = False  # the Coordinator's close drops everything at exit
        self._parked_finalizer = finalizer

    def _drop_parked(self) -> None:
        finalizer = self._parked_finalizer
        if finalizer is not None:
            self._parked = self._parked_finalizer = None
            finalizer()  # closes the parked registration once, without waiting

    def _leave_queue(self, token: str) -> None:
        """A fair waiter that gives up leaves the queue (one bounded round trip)."""
        if self.fair:
            self._abandon(token)

    # --- release / extend --------------------------------------------------------------

    def _not_owned_reason(self) -> str:
        if self._inherited:
            return ("not held in this process: it was acquired by the parent before "
                    "fork(), and a forked child holds nothing")
        if self._lost:
            return "not held by this Lock: its lease was lost"
        return "not held by this Lock (never acquired, or already released)"

    def release(self) -> None:
        """Give the lock up and wake the next waiter (one round trip).

        Whatever the outcome, this Lock no longer holds the lock afterwards; if Redis
        could not be told, the lease lapses by itself after at most ``ttl``. A release
        retried after a lost reply reports the release that happened (the script
        remembers the tokens it released). Bounded by the retry policy's ``deadline``.

        Raises:
            LockNotOwnedError: this Lock does not hold the lock: never acquired,
                already released, inherited across fork(), or its lease lapsed (the
                message says which, and whether another holder has it now).
            BackendUnavailable: Redis could not be reached (the lease lapses by itself).
        """
        with self._mutex:
            token = self._token
            if token is None:
                raise LockNotOwnedError(self.name, self._not_owned_reason())
            # From here on a renewal or owned() that finds the lease gone is looking at
            # this release, not at a loss.
            self._releasing = token
        self._runtime.stop_renewing(self)
        try:
            outcome = _text(self._backend.run_script(
                "lock.release", "lock_release",
                [self._key, self._marker(token), *self._queue_keys],
                [token, self._channel, self._released_ms]))
            if outcome != "released":
                self._mark_lost(token, f"release found the lease {outcome}", releasing=True)
        finally:
            with self._mutex:
                if self._token == token:
                    self._token = None
                    self._fence = None
                    self._renew_at = math.inf
                if self._releasing == token:
                    self._releasing = None
            self._drop_parked()
        if outcome != "released":
            raise LockNotOwnedError(self.name, self._lapsed_reason(outcome, "release"))

    def _marker(self, token: str) -> str:
        """The key in which lock_release remembers that ``token`` released its lease."""
        return self._marker_prefix + token.partition(":")[0]

    def _lapsed_reason(self, outcome: str, operation: str) -> str:
        if outcome == "released":
            return "not held by this Lock: it was released"
        held = time.monotonic() - self._acquired_at
        who = ("another holder has it now" if outcome == "taken"
               else "nobody holds it now (it expired or was deleted)")
        return (f"no longer held by this Lock: its lease (ttl {self._lease_ttl:g}s) lapsed "
                f"before {operation}, {held:.3f}s after it was acquired, and {who}; work "
                "done after the lapse was not protected (use auto_renew=True, a longer "
                "ttl, or check fencing tokens at the resource)")

    def extend(self, ttl: Duration | None = None) -> None:
        """Reset the lease to ``ttl`` seconds from now (one round trip).

        Idempotent: a retry after a lost reply extends again. Bounded by the retry
        policy's ``deadline``.

        Args:
            ttl: the new lease; ``None`` uses the Lock's ``ttl``. Later auto-renewals
                use it too.

        Raises:
            ConfigError: ``ttl`` <= 0 (before Redis is touched).
            LockNotOwnedError: this Lock does not hold the lock, or its lease lapsed
                (then it is also marked ``lost``).
            BackendUnavailable: Redis could not be reached.
        """
        new_ttl = self.ttl if ttl is None else seconds(ttl, "ttl")
        token = self._token
        if token is None:
            raise LockNotOwnedError(self.name, self._not_owned_reason())
        outcome = self._extend(token, new_ttl)
        if outcome != "extended":
            raise LockNotOwnedError(self.name, self._lapsed_reason(outcome, "extend"))

    def _extend(self, token: str, ttl: float, deadline: float | None = None) -> str:
        started = time.monotonic()
        outcome = _text(self._backend.run_script(
            "lock.extend", "lock_extend", [self._key, self._marker(token)],
            [token, to_ms(ttl)], deadline=deadline))
        if outcome == "extended":
            with self._mutex:
                if self._token == token:
                    self._lease_ttl = ttl
                    self._lease_deadline = started + ttl
                    if self.auto_renew:
                        self._renew_at = started + ttl / 3
        elif outcome != "released":  # "released": our own release won the race
            self._mark_lost(token, f"extend found the lease {outcome}")
        return outcome

    def _renew(self) -> None:
        """Watchdog: renew the lease once; mark it lost when that proves impossible.

        The renewal is cut at the local lease deadline (or after :data:`GRACE` when
        the watchdog comes late: Redis still knows whether the token holds the lease),
        so one stalled renewal never holds up the other locks' renewals for long.
        """
        with self._mutex:
            token = self._token
            if token is None or self._releasing == token:
                token = None
        if token is None:
            self._runtime.stop_renewing(self)
            return
        try:
            self._extend(token, self._lease_ttl,
                         deadline=max(self._lease_deadline, time.monotonic() + GRACE))
        except (BackendUnavailable, BackendError) as exc:
            now = time.monotonic()
            if now >= self._lease_deadline:
                self._mark_lost(token, f"renewal failed until the lease ran out: {exc}")
            else:
                self._renew_at = now + min(self._lease_ttl / 10, 0.5)
                _logger().warning("lock.renew_failed", lock=self.name, error=str(exc))

    def _mark_lost(self, token: str, reason: str, *, releasing: bool = False) -> None:
        """Mark the acquisition ``token`` lost (once), log it and call ``on_lost``.

        A finding made while this Lock's own release of ``token`` is under way (a
        renewal or ``owned()`` that saw the lease already deleted) is not a loss; only
        the release itself (``releasing=True``) may report one then.
        """
        with self._mutex:
            if self._token != token or self._lost:
                return
            if self._releasing == token and not releasing:
                return
            self._lost = True
            fence = self._fence
        self._runtime.stop_renewing(self)
        _logger().warning("lock.lost", lock=self.name, reason=reason, fencing_token=fence,
                          held_for=round(time.monotonic() - self._acquired_at, 3))
        callback = self.on_lost
        if callback is not None:
            threading.Thread(target=self._call_on_lost, args=(callback,),
                             name="flexisync-lock-on-lost", daemon=True).start()

    def _call_on_lost(self, callback: Callable[[Lock], None]) -> None:
        try:
            callback(self)
        except Exception:
            _logger().exception("lock.on_lost_failed", lock=self.name)

    def _forget_after_fork(self) -> None:
        self._drop_parked()  # the listener has already forgotten the parent's socket
        self._mutex = threading.Lock()
        if self._token is not None:
            self._inherited = True
        self._token = None
        self._releasing = None
        self._fence = None
        self._renew_at = math.inf
        self._lost = False

    # --- inspection ----------------------------------------------------------------

    def locked(self) -> bool:
        """True when any process holds the lock right now (one round trip).

        Raises:
            BackendUnavailable: Redis could not be reached.
        """
        key = self._key
        return bool(self._backend.call("lock.locked", lambda c: c.exists(key)))

    def owned(self) -> bool:
        """True when this Lock holds the lock, as Redis sees it now.

        No round trip when this Lock never acquired (or released) it; otherwise one GET.
        Finding the lease gone marks the lock ``lost``.

        Raises:
            BackendUnavailable: Redis could not be reached.
        """
        token = self._token
        if token is None or self._lost:
            return False
        key = self._key
        current = self._backend.call("lock.owned", lambda c: c.get(key))
        if current is not None and _text(current) == token:
            return True
        self._mark_lost(token, "the lease is gone")
        return False

    @property
    def fencing_token(self) -> int | None:
        """The fencing token of the current acquisition, ``None`` when not acquired.

        Strictly greater than every token issued before for this name, in any process.
        It stays readable after the lease is lost (so a write made with it is rejected
        by a resource that checks tokens) until :meth:`release` or the next acquire.
        """
        return self._fence

    @property
    def lost(self) -> bool:
        """True once the lease of the current acquisition is known, or must be
        presumed, gone: a renewal, extend, release or ``owned()`` found it gone, or the
        lease ran past ``ttl`` without a successful renewal. No round trip."""
        token = self._token
        if token is not None and not self._lost and time.monotonic() >= self._lease_deadline:
            self._mark_lost(token, f"the lease ran past its ttl ({self._lease_ttl:g}s)")
        return self._lost

    def ensure_held(self) -> None:
        """Raise unless this Lock still holds its lease; a cheap local check.

        Call it right before a critical write. It costs no round trip: it trusts the
        local lease deadline (acquire/renewal time + ttl) and what renewals found. A
        stalled process can still pass it and then write late, which is why the
        resource should check :attr:`fencing_token`.

        Raises:
            LockLostError: the lease is gone or may have lapsed.
            LockNotOwnedError: this Lock never acquired the lock (or released it).
        """
        if self.lost:
            raise LockLostError(self.name)
        if self._token is None:
            raise LockNotOwnedError(self.name, self._not_owned_reason())

    # --- context manager -------------------------------------------------------------

    def __enter__(self) -> Lock:
        """Acquire, waiting up to the Lock's ``timeout``.

        Raises:
            LockTimeout: not acquired within ``timeout`` seconds.
        """
        if not self.acquire(blocking=True, timeout=self.timeout):
            raise LockTimeout(self.name, self.timeout)
        return self

    def __exit__(self, exc_type: type[BaseException] | None,
                 exc: BaseException | None, tb: TracebackType | None) -> None:
        """Release. A lease that lapsed inside the block raises :class:`LockLostError`
        (chained to the explanation) unless the block itself raised, which is never
        masked."""
        try:
            self.release()
        except LockNotOwnedError as error:
            if exc is None:
                raise LockLostError(self.name) from error
            _logger().warning("lock.release_failed", lock=self.name, error=str(error))
        except FlexiSyncError as error:
            if exc is None:
                raise
            _logger().warning("lock.release_failed", lock=self.name, error=str(error))


def list_locks(coordinator: Coordinator) -> list[LockInfo]:
    """Every lock currently held in ``coordinator``'s namespace, sorted by name.

    Uses SCAN (never KEYS) and one pipelined round trip per batch of leases.

    Raises:
        BackendUnavailable: Redis could not be reached.
    """
    keys = coordinator._keys
    prefix = f"{keys.namespace}:lock:{{"
    backend = coordinator._backend

    def scan(client: Any) -> list[str]:
        found = (_text(k) for k in client.scan_iter(match=prefix + "*", count=500))
        return sorted(k for k in found if k.endswith("}"))

    leases = backend.call("locks.list", scan)
    result: list[LockInfo] = []
    for start in range(0, len(leases), 200):
        chunk = leases[start:start + 200]

        def read(client: Any, chunk: list[str] = chunk) -> list[Any]:
            pipe = client.pipeline(transaction=False)
            for lease in chunk:
                pipe.get(lease)
                pipe.pttl(lease)
                pipe.get(lease + ":fence")
                pipe.zcard(lease + ":queue")
            return list(pipe.execute())

        replies = backend.call("locks.list", read)
        for i, lease in enumerate(chunk):
            value, pttl, fence, waiters = replies[4 * i:4 * i + 4]
            if value is None or int(pttl) == -2:
                continue  # released between SCAN and the read
            parts = _text(value).split(":", 1)
            result.append(LockInfo(
                name=lease[len(prefix):-1],
                ttl=math.inf if int(pttl) == -1 else int(pttl) / 1000,
                fencing_token=int(fence) if fence is not None else None,
                holder=parts[1] if len(parts) == 2 else None,
                waiters=int(waiters),
            ))
    return result
