"""Locks written once, as plans: the logic both lock shells run.

:class:`LockCore` holds a lock object's state and writes every operation as a plan
(:mod:`flexisync._core.plan`); ``flexisync.locks.Lock`` runs the plans with blocking
I/O, ``flexisync.aio.locks.AsyncLock`` awaits them. :class:`LockRuntime`
(:mod:`flexisync._core.lock_runtime`) is the per-Context machinery both shells share:
wake-up registrations and the auto-renew watchdog. How it works:

* **Lease.** ``acquire`` runs one Lua script (one round trip): ``SET lease token NX PX
  ttl`` and, when that succeeds, the lock's next fencing token. The token is random per
  acquisition (plus ``host:pid`` for humans), so only the acquisition that set the lease
  can extend or release it. A retried acquire whose first reply was lost finds its own
  token and gets its own fencing token back; an acquire whose outcome stays unknown (no
  reply before its deadline, or the task was cancelled while the command was in flight)
  drops whatever it may have set (``lock_abandon``) and leaves a tombstone for its token,
  so a command still in flight that lands later sets nothing.
* **Fencing tokens** strictly increase per lock name, across processes, lease expiry,
  the counter's own expiry and a server that lost its data (``lock_lib.lua``).
* **Release** is idempotent per token: the script leaves a marker "released by token
  T" that expires a few seconds later, so a retry after a lost reply, or a renewal that
  raced the release, hears "released", never "lost".
* **Waiting.** A waiter's failed attempt also puts it in the lock's waiter queue
  (``ns:lock:{name}:waiters``, ZSET token -> arrival, in the same script), and it
  registers a wake-up handler for the lock's channel on the process's one listener (a
  ``Subscribe`` step: confirmed by Redis) *before* its final attempt, then waits on a
  :class:`~flexisync._core.plan.Signal` that the release's ``PUBLISH`` sets: handoff
  costs about one round trip, no polling. A release wakes one waiter, not all: it takes
  the oldest out of the queue and names it, and names the next as a backup
  (``"first ~backup"``): only the first re-attempts at once; the backup does after
  :data:`BACKUP_DELAY` unless another wake-up comes first, so a named waiter that died
  stalls the lock that long; the others sleep on. Redis calls per acquisition therefore
  stay constant in the number of waiters (about 19 in a contended loop). A free lock
  still goes to whoever asks first (barging). A waiter that gives up (timeout,
  cancellation) leaves the queue and, when the lock is free, wakes the next one. Every
  waiter still re-attempts when the holder's remaining TTL has elapsed (a crashed
  holder publishes nothing), after the listener reconnects, and at least every few
  seconds. While the lock stays contended (its release named a waiter), the lock object
  keeps its wake-up handler subscribed for its next wait: no SUBSCRIBE/UNSUBSCRIBE per
  acquisition; an uncontended release drops it.
* **Fair mode** keeps a FIFO queue of waiters (``ns:lock:{name}:queue``). A release
  takes the head out and *reserves* the lease for it (value ``~token``, expiring after
  :data:`RESERVE_TTL`) and names it; only that head can take it, so nobody else wakes.
  A head that died loses its turn when the reservation lapses: the waiters' re-check
  (at the reservation's expiry) reserves the lock for the next head. Newcomers queue
  behind. About 17 Redis calls per acquisition, at any contention.
* **Cancellation** (asyncio): cancelled while its acquire command may be in flight, the
  acquire is undone by token on the Context's janitor thread; cancelled while waiting,
  the waiter drops its wake-up handler at once and leaves the fair queue (janitor); a
  cancelled release still releases (the release step's undo repeats it by token).
* **auto_renew**: one watchdog thread per Context (``flexisync-lock-watchdog``) renews
  every auto-renewing lock of both shells at ttl/3 with blocking I/O. A renewal that
  finds the lease gone marks the lock ``lost``, logs ``lock.lost`` and calls
  ``on_lost(lock)`` on a thread of its own.
* **Fork.** A forked child holds nothing: inherited lock objects report not owned and
  never touch the parent's lease.
* **replicas=N** (Sentinel, or any master with replicas): the acquire script and
  ``WAIT N timeout`` go out pipelined on one connection (no transaction), so ``WAIT``
  counts the replicas that acknowledged that very acquire. Fewer than N within
  ``replicas_timeout``: the lease is dropped again (by token, as an abandoned
  acquire) and the acquire raises :class:`~flexisync.errors.LockError`. Such an
  acquire is never retried after its command was sent (a retry on a fresh connection
  that finds the lease already its own writes nothing, and ``WAIT`` would confirm
  nothing). Replication stays asynchronous: ``WAIT`` makes a failover that promotes a
  confirming replica keep the lease; it does not make Redis strongly consistent (a
  replica that acknowledged may still lose the write, e.g. if it restarts without
  persistence before the failover). Release and renewals are not confirmed.
"""

from __future__ import annotations

import functools
import hashlib
import math
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import redis.exceptions as rexc

from flexisync._cluster import scan_page
from flexisync._connection import load_script
from flexisync._core.lock_runtime import LockRuntime, runtime
from flexisync._core.plan import Call, Plan, Script, Step, run
from flexisync._core.tally import tally_of
from flexisync._core.waiting import owner_token, wait_for_turn
from flexisync._durations import Duration, optional_seconds, seconds, to_ms
from flexisync._keys import validate_name
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
    from flexisync._core.context import Context
    from flexisync._core.lock_runtime import Wakeups

__all__ = ["BACKUP_DELAY", "FENCE_IDLE_TTL", "GRACE", "RESERVE_TTL", "ConfirmedScript",
           "LockCore", "LockInfo", "LockRuntime", "check_replicas", "list_locks_plan",
           "runtime"]

#: A released fair lock stays reserved this long for the queue head it names (seconds):
#: a head that died meanwhile loses its turn after this long.
RESERVE_TTL = 3.0
#: A default-mode waiter named as a release's backup tries after this long unless
#: another wake-up comes first (seconds): what a waiter that died after being named
#: costs the lock.
BACKUP_DELAY = 0.2
#: A lock's fencing counter expires after at most this long (seconds; every 1024th
#: acquire extends it); a restarted counter still issues larger tokens (lock_lib.lua).
FENCE_IDLE_TTL = 86400.0
#: How far a call with a ``timeout`` may overrun it, at most twice (seconds): the last
#: attempt and the clean-up round trip after a fault or a timeout each get this long.
GRACE = 0.25
# A release (or an abandoned token) is remembered this much longer than the retry
# policy's deadline (seconds).
_RELEASE_MEMORY = 2.0
# A waiter re-checks at least this often even without a wake-up (seconds).
_MAX_SLEEP = 5.0
# A waiter queue lives this long after a waiter joined or re-checked (seconds).
_QUEUE_TTL = 6 * _MAX_SLEEP


def _logger() -> Any:
    return get_logger("locks")


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass(frozen=True)
class LockInfo:
    """A lock that is held right now, as ``list_locks`` reports it.

    Attributes:
        name: the lock's name.
        ttl: seconds left on the lease; ``math.inf`` when it has no expiry.
        fencing_token: the holder's fencing token, ``None`` when unknown.
        holder: ``"host:pid"`` of the holding process, ``None`` when unknown.
        waiters: entries in the lock's waiter queue (fair or default mode).
    """

    name: str
    ttl: float
    fencing_token: int | None
    holder: str | None
    waiters: int = 0


# --- replicas=N -----------------------------------------------------------------------


def check_replicas(ctx: Context, replicas: object, timeout: Duration) -> tuple[int, float]:
    """Validate ``lock(..., replicas=N, replicas_timeout=T)``; returns ``(N, T)``.

    Raises:
        ConfigError: ``replicas`` is not an int >= 0; ``replicas_timeout`` is not a
            positive number of seconds or leaves no room (:data:`GRACE`) within the
            retry policy's deadline; replicas are asked of Redis Cluster (``WAIT``
            would have to run on the key's node: not supported) or of ``memory://``.
    """
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 0:
        raise ConfigError(f"replicas must be an int >= 0, got {replicas!r}")
    wait = seconds(timeout, "replicas_timeout")
    if not replicas:
        return 0, wait
    topology = ctx.backend.topology
    if topology in ("cluster", "memory"):
        raise ConfigError(
            f"replicas={replicas} is not supported on "
            f"{'Redis Cluster' if topology == 'cluster' else 'memory://'}: it needs WAIT on "
            "the connection that ran the acquire, on a master with replicas (single node "
            "with replicas, or Sentinel)")
    deadline = ctx.backend.retry.deadline
    if wait + GRACE > deadline:
        raise ConfigError(
            f"replicas_timeout ({wait:g}s) must leave {GRACE:g}s within the retry "
            f"policy's deadline ({deadline:g}s): lower it or raise RetryPolicy(deadline=)")
    return replicas, wait


@dataclass(slots=True, eq=False)
class ConfirmedScript(Step):
    """A Lua script and ``WAIT replicas timeout_ms`` pipelined on one connection (no
    transaction); result: ``(script reply, replicas that acknowledged)``.

    Never retried once sent (``idempotent=False``): a retry on another connection
    could find its work already done, write nothing, and be "confirmed" by a WAIT
    that had nothing to wait for."""

    operation: str
    name: str
    keys: Sequence[str]
    args: Sequence[Any]
    replicas: int
    timeout_ms: int
    deadline: float | None = None
    undo: Callable[[], Plan[Any]] | None = None

    def _pipe(self, client: Any, sha: str) -> Any:
        pipe = client.pipeline(transaction=False)
        pipe.evalsha(sha, len(self.keys), *self.keys, *self.args)
        pipe.execute_command("WAIT", self.replicas, self.timeout_ms)
        return pipe

    def run(self, ctx: Context) -> Any:
        text, sha = _script_text(self.name)

        def fn(client: Any) -> Any:
            replies = self._pipe(client, sha).execute(raise_on_error=False)
            if isinstance(replies[0], rexc.NoScriptError):  # nothing ran: load, once more
                client.script_load(text)
                replies = self._pipe(client, sha).execute(raise_on_error=False)
            return _confirmed(replies)

        return ctx.backend.call(self.operation, fn, idempotent=False, deadline=self.deadline)

    async def arun(self, ctx: Context) -> Any:
        text, sha = _script_text(self.name)

        async def fn(client: Any) -> Any:
            replies = await self._pipe(client, sha).execute(raise_on_error=False)
            if isinstance(replies[0], rexc.NoScriptError):
                await client.script_load(text)
                replies = await self._pipe(client, sha).execute(raise_on_error=False)
            return _confirmed(replies)

        return await ctx.abackend.call(self.operation, fn, idempotent=False,
                                       deadline=self.deadline)


def _script_text(name: str) -> tuple[str, str]:
    text = load_script(name)
    return text, hashlib.sha1(text.encode(), usedforsecurity=False).hexdigest()


def _confirmed(replies: list[Any]) -> tuple[Any, int]:
    """(script reply, acknowledgements); an error reply raised as itself."""
    for reply in replies:
        if isinstance(reply, Exception):
            raise reply
    return replies[0], int(replies[1])


# --- the lock, as plans --------------------------------------------------------------


class LockCore:
    """State and plans of one lock object; the shells subclass it and run the plans.

    Attributes:
        name, ttl, timeout, auto_renew, fair, on_lost, replicas, replicas_timeout: as
            ``Coordinator.lock``.
    """

    def __init__(self, ctx: Context, name: str, *, ttl: Duration, timeout: Duration | None,
                 auto_renew: bool, fair: bool, on_lost: Callable[[Any], None] | None,
                 replicas: int = 0, replicas_timeout: Duration = 1.0) -> None:
        """Raises ConfigError for a bad name, ``ttl``, ``timeout``, ``on_lost``,
        ``replicas`` or ``replicas_timeout`` (see :func:`check_replicas`)."""
        name = validate_name(name, "lock name")
        ttl = seconds(ttl, "ttl")
        timeout = optional_seconds(timeout, "timeout", allow_zero=True)
        if on_lost is not None and not callable(on_lost):
            raise ConfigError(f"on_lost must be callable, not {type(on_lost).__name__}")
        self.replicas, self.replicas_timeout = check_replicas(ctx, replicas, replicas_timeout)
        self.name = name
        self.ttl = ttl
        self.timeout = timeout
        self.auto_renew = bool(auto_renew)
        self.fair = bool(fair)
        self.on_lost = on_lost
        self._ctx = ctx
        keys = ctx.keys
        self._key = keys.key("lock", name)
        self._fence_key = keys.key("lock", name, "fence")
        # lock_release / lock_abandon leave "released by token T" here for a few seconds.
        self._marker_prefix = keys.key("lock", name, "released") + ":"
        self._channel = keys.object_channel("lock", name)
        # Waiters queue here: default mode so that a release wakes one (plus a backup),
        # fair mode in arrival order.
        self._queue_key = keys.key("lock", name, "queue" if self.fair else "waiters")
        self._mode = "1" if self.fair else "0"
        self._queue_ms = to_ms(_QUEUE_TTL)
        self._reserve_ms = to_ms(RESERVE_TTL)
        self._fence_ms = to_ms(max(FENCE_IDLE_TTL, 2 * ttl))
        self._released_ms = to_ms(ctx.backend.retry.deadline + _RELEASE_MEMORY)
        self._runtime = runtime(ctx)
        self._runtime.locks.add(self)
        self._mutex = threading.Lock()
        self._token: str | None = None
        self._releasing: str | None = None  # the token a release in progress gives up
        self._fence: int | None = None
        self._lease_ttl = ttl
        self._acquired_at = 0.0
        self._lease_deadline = 0.0  # monotonic time by which the lease surely lapsed
        self._renew_at = math.inf
        self._lost = False
        self._inherited = False
        self._parked_finalizer: weakref.finalize[Any, Any] | None = None
        self._parked: Wakeups | None = None  # a wake-up handler kept from the last wait
        self._queued = False  # the current token may be in the waiter queue
        self._turn = ""  # why the wait makes its next attempt (waiting.wait_for_turn)

    def __repr__(self) -> str:
        state = "lost" if self._lost else ("held" if self._token else "unheld")
        return (f"<{type(self).__name__} {self.name!r} ttl={self.ttl} fair={self.fair} "
                f"auto_renew={self.auto_renew} {state} fence={self._fence}>")

    def _acquire_keys(self, token: str) -> list[str]:
        """lock_acquire's KEYS for ``token``: lease, fence, tombstone, waiter queue."""
        return [self._key, self._fence_key, self._marker(token), self._queue_key]

    def _marker(self, token: str) -> str:
        """The key in which ``token``'s release (or abandonment) is remembered."""
        return self._marker_prefix + token.partition(":")[0]

    # --- acquire --------------------------------------------------------------------

    def _acquire_plan(self, blocking: bool, timeout: Duration | None) -> Plan[bool]:
        """``acquire(blocking, timeout)``: see the shells' docstring."""
        wait: float | None
        if timeout is not None:
            if not blocking:
                raise ConfigError("timeout cannot be given with blocking=False")
            wait = seconds(timeout, "timeout", allow_zero=True, allow_inf=True)
        else:
            wait = self.timeout if blocking else 0.0
        deadline = None if wait is None or math.isinf(wait) or wait == 0 \
            else time.monotonic() + wait
        if self._token is not None:
            if not self.lost:
                raise LockError(self.name, f"lock {self.name!r} is already held by this "
                                           "Lock object; locks are not reentrant")
            self._runtime.stop_renewing(self)  # a lost acquisition is simply dropped
            self._token = None
        token = owner_token()
        waiting = wait is None or wait > 0
        started = time.monotonic()
        self._queued, self._turn = False, ""
        parked = self._parked
        if parked is not None and (parked.registration is None or not waiting):
            self._drop_parked()
            parked = None
        seen = 0
        if parked is not None:  # its handler is live: note a release naming us from now
            parked.watch(token.encode())
            seen = parked.snapshot()[0]
        acquired, pttl = yield from self._attempt(token, waiting, deadline)
        if not acquired and waiting:
            reuse = None if parked is None else (parked, seen, pttl)
            acquired = yield from self._wait(token, deadline, reuse)
            if not acquired:
                self._drop_parked()
        record = tally_of(self._ctx).lock(self.name)
        if acquired:
            record.acquired(time.monotonic() - started)
        else:
            with record.wait.lock:
                record.timeouts += 1
        return acquired

    def _enter_plan(self) -> Plan[None]:
        """Entering ``with``: acquire within ``timeout`` or raise :class:`LockTimeout`."""
        if not (yield from self._acquire_plan(True, self.timeout)):
            raise LockTimeout(self.name, self.timeout)

    def _attempt(self, token: str, waiting: bool,
                 deadline: float | None = None) -> Plan[tuple[bool, int]]:
        """One acquire round trip: (acquired, holder's remaining ms or fence).

        When the outcome is unknown (an error, no reply in time, or the task cancelled
        while the command was in flight), the attempt is abandoned by token.
        """
        # Queue flags (lock_acquire.lua): 1 = join (or keep alive) when not taken,
        # 2 = leave when taken, 4 = join at the front. A release that named this waiter
        # took it out already; if a newcomer took the lock first, it keeps its turn.
        named = self._turn == "named"
        queued = self._queued and not named
        join = waiting and (not queued or self._turn == "recheck")
        flags = int(join) + 2 * int(queued) + 4 * int(join and named and not self.fair)
        args: list[Any] = [token, to_ms(self.ttl), self._fence_ms, flags, self._queue_ms,
                           self._mode, self._reserve_ms, self._channel]
        started = time.monotonic()
        bound = None if deadline is None else max(deadline, started + GRACE)
        undo = functools.partial(self._abandon, token, True)
        try:
            if self.replicas:
                if bound is not None:  # WAIT must end in time for its reply to be read
                    bound = max(bound, started + self.replicas_timeout + GRACE)
                reply, acked = yield ConfirmedScript(
                    "lock.acquire", "lock_acquire", self._acquire_keys(token), args,
                    self.replicas, to_ms(self.replicas_timeout), deadline=bound, undo=undo)
            else:
                reply = yield Script("lock.acquire", "lock_acquire", self._acquire_keys(token),
                                     args, deadline=bound, undo=undo)
                acked = 0
        except Exception:
            self._queued = False
            yield from self._abandon(token)
            raise
        if int(reply[0]) != 1:
            self._queued = queued or join
            return False, int(reply[1])
        self._queued = False
        if int(acked) < self.replicas:
            _logger().warning("lock.not_replicated", lock=self.name, replicas=self.replicas,
                              confirmed=int(acked), timeout=self.replicas_timeout)
            yield from self._abandon(token)
            raise LockError(self.name, (
                f"lock {self.name!r} was acquired but only {int(acked)} of "
                f"{self.replicas} replicas confirmed it within {self.replicas_timeout:g}s "
                "(replicas=); it was released again, nothing is held"))
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
        return True, int(reply[1])

    def _abandon(self, token: str, background: bool = False) -> Plan[None]:
        """Drop the lease ``token`` may hold and its queue entry, and leave a tombstone
        so that a late acquire of ``token`` sets nothing. Best effort, bounded by
        :data:`GRACE` (in the ``background``: the retry policy's deadline)."""
        if self._ctx.closed:
            return  # nothing can be sent; the lease lapses within ttl
        bound = None if background else time.monotonic() + GRACE
        try:
            dropped = yield Script("lock.abandon", "lock_abandon",
                                   [self._key, self._marker(token), self._queue_key],
                                   [token, self._channel, self._released_ms, self._mode,
                                    self._reserve_ms],
                                   deadline=bound, undo=None if background else
                                   functools.partial(self._abandon, token, True))
        except FlexiSyncError as exc:
            _logger().warning("lock.abandon_failed", lock=self.name, error=str(exc))
            return
        if int(dropped):
            _logger().info("lock.abandoned", lock=self.name,
                           reason="an acquire whose outcome was unknown had set the lease")

    def _wait(self, token: str, deadline: float | None,
              reuse: tuple[Wakeups, int, int] | None) -> Plan[bool]:
        """Wait for a release's wake-up, re-attempting (:mod:`flexisync._core.waiting`);
        the wait that acquires keeps its wake-up handler (see :meth:`_park`)."""
        return (yield from wait_for_turn(
            self._ctx, self._runtime, self._channel, token, deadline=deadline,
            refresh=_MAX_SLEEP,
            attempt=functools.partial(self._attempt, token, True, deadline),
            leave=functools.partial(self._abandon, token),
            keep=self._park, reuse=reuse, on_turn=self._on_turn,
            backup_delay=math.inf if self.fair else BACKUP_DELAY))

    def _on_turn(self, why: str) -> None:
        self._turn = why

    def _park(self, wakeups: Wakeups) -> None:
        """Keep the wake-up handler of the wait that acquired, still subscribed: the
        release drops it unless other waiters were queued (then the next acquire of
        this contended lock waits without a SUBSCRIBE/UNSUBSCRIBE pair)."""
        if wakeups is self._parked:
            return
        self._drop_parked()
        registration = wakeups.registration
        if registration is None:
            return
        finalizer = weakref.finalize(self, functools.partial(registration.close, wait=False))
        finalizer.atexit = False  # the Context's close drops everything at exit
        self._parked_finalizer = finalizer
        self._parked = wakeups

    def _drop_parked(self) -> None:
        finalizer, self._parked_finalizer = self._parked_finalizer, None
        parked, self._parked = self._parked, None
        if parked is not None:
            parked.registration = None
        if finalizer is not None:
            finalizer()

    # --- release / extend ------------------------------------------------------------

    def _not_owned_reason(self) -> str:
        if self._inherited:
            return ("not held in this process: it was acquired by the parent before "
                    "fork(), and a forked child holds nothing")
        if self._lost:
            return "not held by this Lock: its lease was lost"
        return "not held by this Lock (never acquired, or already released)"

    def _release_step(self, token: str, undo: bool) -> Script:
        return Script("lock.release", "lock_release",
                      [self._key, self._marker(token), self._queue_key],
                      [token, self._channel, self._released_ms, self._mode,
                       self._reserve_ms],
                      undo=functools.partial(self._release_again, token) if undo else None)

    def _release_again(self, token: str) -> Plan[None]:
        """A release cancelled in flight, repeated by token (idempotent) on the janitor."""
        try:
            yield self._release_step(token, undo=False)
        except FlexiSyncError as exc:
            _logger().warning("lock.release_failed", lock=self.name, error=str(exc))

    def _release_plan(self) -> Plan[None]:
        """``release()``: see the shells' docstring."""
        with self._mutex:
            token = self._token
            if token is None:
                raise LockNotOwnedError(self.name, self._not_owned_reason())
            # From here on a renewal or owned() that finds the lease gone is looking at
            # this release, not at a loss.
            self._releasing = token
        self._runtime.stop_renewing(self)
        queued = False
        try:
            reply = yield self._release_step(token, undo=True)
            outcome, queued = _text(reply[0]), bool(int(reply[1]))
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
            if not queued:  # uncontended: no subscription stays behind
                self._drop_parked()
        if outcome != "released":
            raise LockNotOwnedError(self.name, self._lapsed_reason(outcome, "release"))

    def _exit_plan(self, exc: BaseException | None) -> Plan[None]:
        """Leaving ``with``: release. A lease that lapsed inside the block raises
        :class:`LockLostError` unless the block itself raised, which is never masked."""
        try:
            yield from self._release_plan()
        except LockNotOwnedError as error:
            if exc is None:
                raise LockLostError(self.name) from error
            _logger().warning("lock.release_failed", lock=self.name, error=str(error))
        except FlexiSyncError as error:
            if exc is None:
                raise
            _logger().warning("lock.release_failed", lock=self.name, error=str(error))

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

    def _extend_plan(self, ttl: Duration | None) -> Plan[None]:
        """``extend(ttl)``: see the shells' docstring."""
        new_ttl = self.ttl if ttl is None else seconds(ttl, "ttl")
        token = self._token
        if token is None:
            raise LockNotOwnedError(self.name, self._not_owned_reason())
        outcome = yield from self._extend_once(token, new_ttl)
        if outcome != "extended":
            raise LockNotOwnedError(self.name, self._lapsed_reason(outcome, "extend"))

    def _extend_once(self, token: str, ttl: float,
                     deadline: float | None = None) -> Plan[str]:
        started = time.monotonic()
        outcome = _text((yield Script("lock.extend", "lock_extend",
                                      [self._key, self._marker(token)], [token, to_ms(ttl)],
                                      deadline=deadline)))
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

    def _extend(self, token: str, ttl: float, deadline: float | None = None) -> str:
        """:meth:`_extend_once` with blocking I/O (the watchdog's thread)."""
        return run(self._ctx, self._extend_once(token, ttl, deadline))

    def _renew(self) -> None:
        """Watchdog: renew the lease once; mark it lost when that proves impossible.

        Cut at the local lease deadline (or after :data:`GRACE` when the watchdog comes
        late), so one stalled renewal never holds up the others for long.
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
        """Mark the acquisition ``token`` lost (once), log it and call ``on_lost``."""
        with self._mutex:
            if self._token != token or self._lost:
                return
            if self._releasing == token and not releasing:
                return
            self._lost = True
            fence = self._fence
        record = tally_of(self._ctx).lock(self.name)
        with record.wait.lock:
            record.lost += 1
        self._runtime.stop_renewing(self)
        _logger().warning("lock.lost", lock=self.name, reason=reason, fencing_token=fence,
                          held_for=round(time.monotonic() - self._acquired_at, 3))
        callback = self.on_lost
        if callback is not None:
            threading.Thread(target=self._call_on_lost, args=(callback,),
                             name="flexisync-lock-on-lost", daemon=True).start()

    def _call_on_lost(self, callback: Callable[[Any], None]) -> None:
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

    # --- inspection ------------------------------------------------------------------

    def _locked_plan(self) -> Plan[bool]:
        key = self._key
        return bool((yield Call("lock.locked", lambda c: c.exists(key))))

    def _owned_plan(self) -> Plan[bool]:
        token = self._token
        if token is None or self._lost:
            return False
        key = self._key
        current = yield Call("lock.owned", lambda c: c.get(key))
        if current is not None and _text(current) == token:
            return True
        self._mark_lost(token, "the lease is gone")
        return False

    @property
    def fencing_token(self) -> int | None:
        """The fencing token of the current acquisition, ``None`` when not acquired.

        Strictly greater than every token issued before for this name, in any process.
        It stays readable after the lease is lost until the release or next acquire.
        """
        return self._fence

    @property
    def lost(self) -> bool:
        """True once the lease of the current acquisition is known, or must be
        presumed, gone (a renewal, extend, release or ``owned()`` found it gone, or it
        ran past ``ttl`` without a successful renewal). No round trip."""
        token = self._token
        if token is not None and not self._lost and time.monotonic() >= self._lease_deadline:
            self._mark_lost(token, f"the lease ran past its ttl ({self._lease_ttl:g}s)")
        return self._lost

    def _check_held(self) -> None:
        if self.lost:
            raise LockLostError(self.name)
        if self._token is None:
            raise LockNotOwnedError(self.name, self._not_owned_reason())


def list_locks_plan(ctx: Context) -> Plan[list[LockInfo]]:
    """Every lock held in ``ctx``'s namespace, sorted by name (SCAN, never KEYS; one
    pipelined round trip per 200 leases)."""
    prefix = f"{ctx.keys.namespace}:lock:{{"
    cursor: Any = 0
    found: set[str] = set()
    while True:
        cursor, batch = yield Call("locks.list",
                                   functools.partial(_scan, cursor, prefix + "*"))
        found.update(k for k in map(_text, batch) if k.endswith("}"))
        if int(cursor) == 0:
            break
    names = sorted(lease[len(prefix):-1] for lease in found)
    return (yield from read_locks_plan(ctx, names))


def read_locks_plan(ctx: Context, names: list[str]) -> Plan[list[LockInfo]]:
    """The locks among ``names`` that are held now, in the order given (one pipelined
    round trip per 200 names). A lock released meanwhile is left out, and so is a key
    holding data flexisync did not write (a wrong type, a fence that is not a number):
    listing never fails on foreign data."""
    result: list[LockInfo] = []
    for start in range(0, len(names), 200):
        chunk = names[start:start + 200]
        leases = [ctx.keys.key("lock", name) for name in chunk]
        replies = yield Call("locks.list", functools.partial(_read_leases, leases))
        for i, name in enumerate(chunk):
            value, pttl, fence, queued, waiting = replies[5 * i:5 * i + 5]
            if value is None or not isinstance(pttl, int) or pttl == -2 \
                    or not isinstance(queued, int) or not isinstance(waiting, int) \
                    or isinstance(value, Exception):
                continue  # released between SCAN and the read, or not a lease
            fencing_token = _int_or_none(fence)
            if fence is not None and fencing_token is None:
                continue  # a fence flexisync did not write
            # A fair lock reserved for its queue head ("~token") shows as the head's.
            parts = _text(value).lstrip("~").split(":", 1)
            result.append(LockInfo(
                name=name,
                ttl=math.inf if pttl == -1 else pttl / 1000,
                fencing_token=fencing_token,
                holder=parts[1] if len(parts) == 2 else None,
                waiters=queued + waiting,
            ))
    return result


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _scan(cursor: Any, match: str, client: Any) -> Any:
    # A cluster's SCAN visits every master in turn (flexisync._cluster.scan_page).
    return scan_page(cursor, match, 500, client)


def _read_leases(chunk: list[str], client: Any) -> Any:
    pipe = client.pipeline(transaction=False)
    for lease in chunk:
        pipe.get(lease).pttl(lease).get(lease + ":fence").zcard(lease + ":queue") \
            .zcard(lease + ":waiters")
    return pipe.execute(raise_on_error=False)  # a foreign key fails alone
