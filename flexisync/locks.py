"""``Lock``: a distributed lock with a lease, fencing tokens and push wake-ups.

How it works, one place for all of it:

* **Lease.** ``acquire`` runs one Lua script (one round trip): ``SET lease token NX PX
  ttl`` and, when that succeeds, ``INCR`` of the lock's fencing counter, whose new value
  is returned. The token is random per acquisition (plus ``host:pid`` for humans), so
  only the acquisition that set the lease can extend or release it. A retried acquire
  whose first reply was lost finds its own token and gets its own fencing token back.
* **Fencing tokens** strictly increase per lock name, across processes and across lease
  expiry (the counter never expires). Pass the token to the resource you protect and
  let it reject a smaller one: that is what keeps a holder that stalled past its lease
  (GC pause, network stall) from doing damage.
* **Waiting.** A waiter subscribes to the lock's wake-up channel (on the process's one
  listener connection) *before* its final attempt, then sleeps on a condition that the
  release's ``PUBLISH`` wakes: handoff costs about one round trip, no polling. It also
  re-attempts when the holder's remaining TTL has elapsed (a crashed holder publishes
  nothing) and after the listener reconnects (messages may have been missed).
* **Fair mode** keeps a FIFO queue of waiters in Redis (each entry expires unless its
  waiter refreshes it, so a dead waiter leaves the queue); a free lock goes to the head
  of the queue only, and the release names the head so other waiters stay asleep.
* **auto_renew** uses one watchdog thread per Coordinator for every held auto-renewing
  lock; it resets each lease at ttl/3. A renewal that finds the lease gone marks the lock
  ``lost``, logs ``lock.lost`` and calls ``on_lost(lock)`` on a thread of its own.
* **Fork.** A forked child holds nothing: Lock objects it inherited report not owned,
  never touch the parent's lease, and no watchdog runs in the child until it acquires.
"""

from __future__ import annotations

import contextlib
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

# A fair-mode queue entry lives this long unless its waiter refreshes it (seconds); a
# waiter refreshes it three times per period, so only a dead waiter's entry expires.
QUEUE_ENTRY_TTL = 3.0
# Wake-up subscriptions nobody waited on for this long are dropped (seconds).
_IDLE_SUBSCRIPTION = 30.0
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
    """One lock name's wake-up channel in this process, shared by all its waiters."""

    __slots__ = ("cond", "data", "idle_since", "refs", "registration", "seq")

    def __init__(self) -> None:
        self.cond = threading.Condition(threading.Lock())
        self.seq = 0
        self.data = b""
        self.refs = 0
        self.idle_since = time.monotonic()
        self.registration: Registration | None = None

    def on_message(self, _channel: str, data: bytes, _pattern: str | None) -> None:
        """Listener-thread handler: record the message and wake every waiter."""
        with self.cond:
            self.seq += 1
            self.data = data
            self.cond.notify_all()

    def poke(self) -> None:
        """Wake every waiter with no message (they re-attempt)."""
        with self.cond:
            self.seq += 2  # never looks like exactly one named wake-up
            self.data = b""
            self.cond.notify_all()


class _Runtime:
    """Everything lock-related one Coordinator runs: subscriptions and the watchdog."""

    def __init__(self, coordinator: Coordinator) -> None:
        self._coordinator = weakref.ref(coordinator)
        self._reset()
        coordinator._on_fork(self._after_fork)
        coordinator._on_close(self.close)

    def _reset(self) -> None:
        self.mutex = threading.Lock()
        self.wakeups: dict[str, _Wakeups] = {}
        self.locks: weakref.WeakSet[Lock] = weakref.WeakSet()
        self.renewing: dict[int, Lock] = {}
        self.cond = threading.Condition(threading.Lock())
        self.thread: threading.Thread | None = None
        self.stopping = False
        self.remove_hook: Callable[[], None] | None = None

    # wake-ups

    def join(self, name: str) -> _Wakeups:
        """The subscribed wake-up channel of ``name``, with one more reference held."""
        coordinator = self._coordinator()
        if coordinator is None or coordinator.closed:
            address = coordinator._backend.address if coordinator is not None else "?"
            raise BackendUnavailable(address, reason="the Coordinator is closed")
        with self.mutex:
            self._sweep()
            wakeups = self.wakeups.get(name)
            if wakeups is None:
                wakeups = _Wakeups()
                listener = coordinator._listener
                if self.remove_hook is None:
                    self.remove_hook = listener.add_reconnect_hook(self._poke_all)
                channel = coordinator._keys.channel("lock", name)
                wakeups.registration = listener.subscribe(channel, wakeups.on_message)
                self.wakeups[name] = wakeups
            wakeups.refs += 1
            return wakeups

    def leave(self, wakeups: _Wakeups) -> None:
        """Drop a reference taken by :meth:`join` (the subscription lingers a while)."""
        with self.mutex:
            wakeups.refs -= 1
            wakeups.idle_since = time.monotonic()

    def _sweep(self) -> None:
        now = time.monotonic()
        for name, wakeups in list(self.wakeups.items()):
            if wakeups.refs == 0 and now - wakeups.idle_since > _IDLE_SUBSCRIPTION:
                del self.wakeups[name]
                if wakeups.registration is not None:
                    wakeups.registration.close()

    def _poke_all(self) -> None:
        # Runs on the listener thread after a reconnect: messages may have been missed.
        for wakeups in list(self.wakeups.values()):
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
        """Stop the watchdog and drop every subscription (Coordinator.close)."""
        with self.cond:
            self.stopping = True
            self.renewing.clear()
            self.cond.notify_all()
        thread = self.thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5.0)
        with self.mutex:
            for wakeups in self.wakeups.values():
                if wakeups.registration is not None:
                    wakeups.registration.close()
                wakeups.poke()  # waiters re-attempt now and learn the Coordinator closed
            self.wakeups.clear()

    def _after_fork(self) -> None:
        # In the child: no thread exists, locks inherited from the parent are not ours.
        locks = list(self.locks)
        remove_hook = self.remove_hook
        for wakeups in self.wakeups.values():
            if wakeups.registration is not None:
                wakeups.registration.close()  # the child's listener keeps registrations
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
        self._queue_key = keys.key("lock", name, "queue")
        self._queue_ttl_key = keys.key("lock", name, "queue", "ttl")
        self._channel = keys.channel("lock", name)
        # The scripts run in fair mode when given the queue keys.
        queue = [self._queue_key, self._queue_ttl_key] if self.fair else []
        self._acquire_keys = [self._key, self._fence_key, *queue]
        self._release_keys = [self._key, *queue]
        self._queue_ms = to_ms(QUEUE_ENTRY_TTL)
        self._runtime = _runtime(coordinator)
        self._runtime.locks.add(self)
        self._mutex = threading.Lock()
        self._token: str | None = None
        self._fence: int | None = None
        self._lease_ttl = ttl
        self._acquired_at = 0.0
        self._lease_deadline = 0.0  # monotonic time by which the lease surely lapsed
        self._renew_at = math.inf
        self._lost = False
        self._inherited = False

    def __repr__(self) -> str:
        state = "lost" if self._lost else ("held" if self._token else "unheld")
        return (f"<Lock {self.name!r} ttl={self.ttl} fair={self.fair} "
                f"auto_renew={self.auto_renew} {state} fence={self._fence}>")

    # --- acquire -------------------------------------------------------------------

    def acquire(self, blocking: bool = True, timeout: Duration | None = None) -> bool:
        """Take the lock; returns True when this Lock now holds it.

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
            BackendUnavailable: Redis could not be reached; the lock is not held.
            BackendError: Redis rejected the script.
        """
        wait: float | None
        if timeout is not None:
            if not blocking:
                raise ConfigError("timeout cannot be given with blocking=False")
            wait = seconds(timeout, "timeout", allow_zero=True, allow_inf=True)
        else:
            wait = self.timeout if blocking else 0.0
        if self._token is not None:
            if not self.lost:
                raise LockError(self.name, f"lock {self.name!r} is already held by this "
                                           "Lock object; locks are not reentrant")
            self._runtime.stop_renewing(self)  # a lost acquisition is simply dropped
            self._token = None
        token = f"{os.urandom(10).hex()}:{_HOST}:{os.getpid()}"
        waiting = wait is None or wait > 0
        if self._attempt(token, waiting)[0]:
            return True
        if not waiting:
            return False
        deadline = None if wait is None or math.isinf(wait) else time.monotonic() + wait
        return self._wait(token, deadline)

    def _attempt(self, token: str, waiting: bool) -> tuple[bool, int]:
        """One acquire round trip: (acquired, holder's remaining ms or fence)."""
        args: list[Any] = [token, to_ms(self.ttl)]
        if self.fair:
            args += ["1" if waiting else "0", self._queue_ms]
        started = time.monotonic()
        script = self._backend.script("lock_acquire")
        reply = self._backend.call(
            "lock.acquire", lambda _c: script(keys=self._acquire_keys, args=args))
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

    def _wait(self, token: str, deadline: float | None) -> bool:
        """Wait for a wake-up, re-attempting; the subscription precedes every attempt."""
        runtime = self._runtime
        wakeups = runtime.join(self.name)
        refresh = QUEUE_ENTRY_TTL / 3 if self.fair else _MAX_SLEEP
        mine = token.encode()
        attempt = True
        recheck = 0.0
        try:
            while True:
                seen = wakeups.seq
                if attempt:
                    acquired, pttl = self._attempt(token, True)
                    if acquired:
                        return True
                    # Re-attempt when the holder's lease runs out (a crashed holder
                    # publishes nothing), and in fair mode often enough to keep our
                    # queue entry alive.
                    sleep = refresh if pttl <= 0 else min(refresh, pttl / 1000 + 0.001)
                    recheck = time.monotonic() + sleep
                with wakeups.cond:
                    while wakeups.seq == seen:
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
            runtime.leave(wakeups)

    def _leave_queue(self, token: str) -> None:
        if not self.fair:
            return
        queue, expiries = self._queue_key, self._queue_ttl_key

        def leave(client: Any) -> Any:
            pipe = client.pipeline(transaction=True)
            pipe.zrem(queue, token)
            pipe.zrem(expiries, token)
            return pipe.execute()

        # The entry expires by itself within QUEUE_ENTRY_TTL if this fails.
        with contextlib.suppress(FlexiSyncError):
            self._backend.call("lock.leave_queue", leave)

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
        could not be told, the lease lapses by itself after at most ``ttl``.

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
        self._runtime.stop_renewing(self)
        script = self._backend.script("lock_release")
        args = [token, self._channel]
        attempts = 0

        def run(_client: Any) -> Any:
            nonlocal attempts
            attempts += 1
            return script(keys=self._release_keys, args=args)

        try:
            outcome = _text(self._backend.call("lock.release", run))
            # A retry after a lost reply finds its own release done: "expired".
            done = outcome == "released" or (outcome == "expired" and attempts > 1)
            if not done:
                self._mark_lost(token, f"release found the lease {outcome}")
        finally:
            with self._mutex:
                if self._token == token:
                    self._token = None
                    self._fence = None
                    self._renew_at = math.inf
        if not done:
            raise LockNotOwnedError(self.name, self._lapsed_reason(outcome, "release"))

    def _lapsed_reason(self, outcome: str, operation: str) -> str:
        held = time.monotonic() - self._acquired_at
        who = ("another holder has it now" if outcome == "taken"
               else "nobody holds it now (it expired or was deleted)")
        return (f"no longer held by this Lock: its lease (ttl {self._lease_ttl:g}s) lapsed "
                f"before {operation}, {held:.3f}s after it was acquired, and {who}; work "
                "done after the lapse was not protected (use auto_renew=True, a longer "
                "ttl, or check fencing tokens at the resource)")

    def extend(self, ttl: Duration | None = None) -> None:
        """Reset the lease to ``ttl`` seconds from now (one round trip).

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

    def _extend(self, token: str, ttl: float) -> str:
        started = time.monotonic()
        outcome = _text(self._backend.run_script("lock.extend", "lock_extend", [self._key],
                                                 [token, to_ms(ttl)]))
        if outcome == "extended":
            with self._mutex:
                if self._token == token:
                    self._lease_ttl = ttl
                    self._lease_deadline = started + ttl
                    if self.auto_renew:
                        self._renew_at = started + ttl / 3
        else:
            self._mark_lost(token, f"extend found the lease {outcome}")
        return outcome

    def _renew(self) -> None:
        """Watchdog: renew the lease once; mark it lost when that proves impossible."""
        token = self._token
        if token is None:
            self._runtime.stop_renewing(self)
            return
        try:
            self._extend(token, self._lease_ttl)
        except (BackendUnavailable, BackendError) as exc:
            now = time.monotonic()
            if now >= self._lease_deadline:
                self._mark_lost(token, f"renewal failed until the lease ran out: {exc}")
            else:
                self._renew_at = now + min(self._lease_ttl / 10, 0.5)
                _logger().warning("lock.renew_failed", lock=self.name, error=str(exc))

    def _mark_lost(self, token: str, reason: str) -> None:
        with self._mutex:
            if self._token != token or self._lost:
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
        self._mutex = threading.Lock()
        if self._token is not None:
            self._inherited = True
        self._token = None
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
