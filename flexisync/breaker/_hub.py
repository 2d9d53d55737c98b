"""The background half of every breaker of one Context (sync and asyncio shells alike).

One named daemon thread per Context (``flexisync-breakers``), started on the first
breaker use, stopped when the Context closes and rebuilt lazily after ``fork()``:

* runs ``on_state_change`` callbacks, in order, off the listener thread;
* every 100 ms flushes the successes each breaker aggregated on its hot path, for the
  breakers where a success can matter (failure-rate breakers, and consecutive-failure
  breakers while failures are pending), and lets breakers cut off from Redis check
  whether they may rejoin: the breakers with such work are in an active set
  (:meth:`Hub.activate`), so a tick costs nothing per idle breaker;
* refreshes every breaker's mirror at least every ``refresh_interval`` seconds, and at
  once when the listener lost its connection, so a missed message is repaired: one
  ``breaker_versions.lua`` call returns where the records of up to
  :data:`VERSIONS_CHUNK` breakers stand, and only the mirrors whose record moved (or
  holds foreign data) read it in full. So an idle process sends one script call per
  refresh for up to 500 breakers (its Redis cost is one HMGET per breaker); on a
  Cluster one per hash slot (breakers' keys are spread over the slots: about one per
  breaker). Mirrors whose refresh is due within half their interval join the batch,
  so mirrors of one ``refresh_interval`` settle into one batch per interval;
* while Redis is unreachable, checks every half second, with one PING for all the
  Coordinator's breakers, whether it is back, and then lets the breakers reconcile;
* about every second, adds the calls each breaker saw since the last time to the
  fleet's outcome stats (one pipeline for all breakers; nothing when there were no
  calls; see :data:`STATS_INTERVAL` and :mod:`flexisync.metrics`).

Backend-down fast path: the first breaker round trip that finds Redis unreachable marks
the hub down; from then on every breaker script of this Coordinator fails at once
(:meth:`Hub.run` raises without any I/O), so callers go to their ``on_backend_error``
mode without waiting, until the background PING sees Redis again. No lock is held
across a round trip, so concurrent failing calls never queue behind each other.

Breakers are held weakly (plus the few most recently asked for, and those with
``on_state_change`` callbacks), so names that are no longer used cost nothing.

Fork detection without Python's at-fork hooks (uWSGI forks from C): :data:`FORK_MARK`
is a byte in a page the kernel wipes in a forked child (``MADV_WIPEONFORK``); the hot
path reads it (about 20 ns), and a child that finds it zero resets every Coordinator
that owns breakers before it decides anything. Where the kernel cannot wipe a page,
a pid comparison stands in (slower, same result).

It also holds the one mirror per breaker name and policy (:class:`BreakerCore`) that both
shells use, and words the breaker Lua scripts as plan steps (:meth:`Hub.script`): each
script is ``breaker_lib.lua`` followed by the operation's own file, run by EVALSHA.
"""

from __future__ import annotations

import collections
import functools
import math
import mmap
import os
import queue
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from redis.crc import key_slot

from flexisync._connection import RetryPolicy
from flexisync._core.plan import Plan, Script, run
from flexisync._core.tally import tally_of
from flexisync._log import get_logger
from flexisync.errors import BackendError, BackendUnavailable, FlexiSyncError

if TYPE_CHECKING:
    from flexisync._core.context import Context
    from flexisync._core.plan import Step
    from flexisync.breaker._core import BreakerCore

__all__ = ["FLUSH_INTERVAL", "FORK_MARK", "OUTCOMES", "RECENT", "RECHECK_INTERVAL",
           "STATS_BUCKET", "STATS_INTERVAL", "STATS_TTL", "VERSIONS_CHUNK", "Hub",
           "MalformedRecord", "detect_fork", "decode_versions", "hub_of",
           "refresh_groups", "stats_key"]

FLUSH_INTERVAL = 0.1  # seconds between flushes of aggregated successes
#: Seconds between two writes of a process's call outcomes to the fleet stats.
STATS_INTERVAL = 1.0
#: Width of one fleet stats bucket, seconds (fields ``"<bucket>:<outcome>"``).
STATS_BUCKET = 10
#: A fleet stats hash expires this long after its last write (seconds).
STATS_TTL = 900
#: Past this many fields a stats hash is trimmed of buckets older than STATS_TTL.
STATS_MAX_FIELDS = 600
#: The outcomes of a protected call, in the order of ``Mirror.outcome_totals()``.
OUTCOMES = ("success", "failure", "rejected", "ignored", "probe")
RECHECK_INTERVAL = 0.5  # seconds between checks whether Redis is back
#: Most record keys in one ``breaker_versions`` call (one EVALSHA).
VERSIONS_CHUNK = 500
RECENT = 128  # breakers kept alive after their last user dropped them (cheap re-asks)
_MADV_WIPEONFORK = 18  # Linux >= 4.14; Python's mmap module does not name it
MALFORMED = "FLEXISYNC_MALFORMED"


class MalformedRecord(BackendError):
    """A breaker's record in Redis holds data flexisync did not write (and so cannot
    trust); the script that found it changed nothing.

    Attributes:
        defects: what is wrong, as short descriptions naming flexisync's own fields.
    """

    def __init__(self, operation: str, defects: str) -> None:
        self.defects = defects
        super().__init__(operation, f"malformed breaker record: {defects}")


class _PidMark:
    """:data:`FORK_MARK` where the kernel cannot wipe a page on fork: compares pids."""

    def __init__(self) -> None:
        self._pid = os.getpid()

    def __getitem__(self, index: int) -> int:
        return 1 if os.getpid() == self._pid else 0

    def __setitem__(self, index: int, value: int) -> None:
        self._pid = os.getpid()


def _new_fork_mark() -> Any:
    try:
        page = mmap.mmap(-1, mmap.PAGESIZE,
                         flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # type: ignore[attr-defined,unused-ignore]
        page.madvise(_MADV_WIPEONFORK)
    except (AttributeError, OSError, ValueError):
        return _PidMark()
    page[0] = 1
    return page


#: Reads 1 in the process that imported flexisync, 0 in a child forked from it until
#: the child handled the fork (:func:`detect_fork`, or the at-fork hook).
FORK_MARK: Any = _new_fork_mark()
_hubs: weakref.WeakSet[Hub] = weakref.WeakSet()


def detect_fork() -> None:
    """Called when :data:`FORK_MARK` reads 0: this is a forked child. Resets every
    Coordinator that owns breakers (new connections, threads, mirrors) if the at-fork
    hooks did not already, then marks the fork handled."""
    for hub in list(_hubs):
        hub._backend.check_fork()
    FORK_MARK[0] = 1


_exit_hook: list[tuple[int, Any]] = []  # (pid, multiprocessing.util.Finalize)


def _flush_at_exit_once() -> None:
    """At interpreter exit (and at the exit of a multiprocessing child, fork or spawn,
    which skips ``atexit``), add the calls not yet reported to the fleet stats.

    Registered once per process: a forked child re-registers when its hub thread
    starts (multiprocessing ignores a parent's finalizers in a child, and clears them
    in its own children)."""
    found = _exit_hook[0] if _exit_hook else None
    if found is not None and found[0] == os.getpid() and found[1].still_active():
        return
    from multiprocessing import util  # noqa: PLC0415

    _exit_hook[:] = [(os.getpid(), util.Finalize(None, _flush_all, exitpriority=10))]


def _flush_all() -> None:
    for hub in list(_hubs):
        if hub._closed or hub._backend.closed or hub.ctx.closed:
            continue
        try:
            hub.flush_stats()
        except Exception:  # noqa: S112 - exiting: nothing else to do
            continue


def stats_key(ctx: Context, name: str) -> str:
    """The fleet outcome stats hash of breaker ``name``: ``ns:stats:{breaker:NAME}``."""
    return ctx.keys.key("stats", "breaker:" + name)


def _write_stats(entries: list[tuple[str, dict[str, int]]], ttl_ms: int,
                 client: Any) -> Any:
    pipe = client.pipeline(transaction=False)
    for key, fields in entries:
        for field, amount in fields.items():
            pipe.hincrby(key, field, amount)
        pipe.pexpire(key, ttl_ms)
        pipe.hlen(key)
    return pipe.execute()


def _trim_stats(key: str, cut: int, client: Any) -> int:
    """Delete the buckets of ``key`` at or before ``cut`` (unix seconds)."""
    stale = []
    for raw in client.hkeys(key):
        field = raw.decode() if isinstance(raw, bytes) else str(raw)
        head = field.split(":", 1)[0]
        if not head.isdigit() or int(head) <= cut:
            stale.append(field)
    return int(client.hdel(key, *stale)) if stale else 0


def refresh_groups(keys: Sequence[str], *, cluster: bool,
                   chunk: int = VERSIONS_CHUNK) -> list[list[int]]:
    """How to split a refresh of the records ``keys`` into ``breaker_versions`` calls:
    lists of indexes into ``keys``, at most ``chunk`` each, in order. On a Cluster
    (``cluster=True``) each list holds keys of one hash slot only (a script's keys
    must share one), so there are at least as many calls as distinct slots."""
    if not cluster:
        return [list(range(start, min(start + chunk, len(keys))))
                for start in range(0, len(keys), chunk)]
    by_slot: dict[int, list[int]] = {}
    for index, key in enumerate(keys):
        by_slot.setdefault(key_slot(key.encode()), []).append(index)
    return [indexes[start:start + chunk] for indexes in by_slot.values()
            for start in range(0, len(indexes), chunk)]


def decode_versions(reply: Any, count: int) -> list[tuple[str, int] | None]:
    """A ``breaker_versions`` reply for ``count`` keys: per key ``(epoch, version)``,
    or None where the record must be read in full (foreign data).

    Raises:
        MalformedRecord: the reply is not one the script writes (wrong length,
            unreadable item).
    """
    from flexisync.breaker._mirror import integer, text  # noqa: PLC0415 (import cycle)

    if not isinstance(reply, (list, tuple)) or len(reply) != 2 * count:
        raise MalformedRecord("breaker.versions", "unreadable reply (wrong shape)")
    found: list[tuple[str, int] | None] = []
    try:
        for i in range(0, 2 * count, 2):
            epoch, version = text(reply[i]), integer(reply[i + 1])
            if version < 0:
                found.append(None)
                continue
            if len(epoch) > 64 or " " in epoch:
                raise ValueError("bad epoch")
            found.append((epoch, version))
    except (ValueError, TypeError, UnicodeDecodeError) as exc:
        raise MalformedRecord("breaker.versions", f"unreadable reply ({exc})") from None
    return found


def hub_of(owner: Any) -> Hub:
    """The one :class:`Hub` of a Context, or of a (sync or asyncio) Coordinator's
    Context (built on first use)."""
    ctx: Context = getattr(owner, "_ctx", owner)
    return ctx.extension("breakers", Hub)


class Hub:
    """Per-Context breaker machinery. Internal; see the module docstring."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self._backend = ctx.backend
        self._log = get_logger("breaker", namespace=ctx.namespace)
        self._breakers: weakref.WeakSet[BreakerCore] = weakref.WeakSet()
        # One BreakerCore per (name, policy) while anyone holds it: see
        # BreakerCore.__new__. ``_recent`` keeps the last few alive a while longer,
        # so asking for a breaker on every request does not re-subscribe each time;
        # ``_pinned`` keeps those with on_state_change callbacks.
        self.instances: weakref.WeakValueDictionary[tuple[str, Any], BreakerCore] = \
            weakref.WeakValueDictionary()
        self._recent: collections.OrderedDict[tuple[str, Any], BreakerCore] = \
            collections.OrderedDict()
        self._pinned: set[BreakerCore] = set()
        self.instances_lock = threading.Lock()
        self._reconnect_hook: Callable[[], None] | None = None
        self._closed = False
        self.down_since: float | None = None  # monotonic; None while Redis answers
        # A protected call must not wait for Redis: a script gets one more attempt, at
        # once, only when the command was never sent; the background PING gets one.
        deadline = self._backend.retry.deadline
        self._quick = RetryPolicy(attempts=2, initial=0.0, maximum=0.0, deadline=deadline)
        self._once = RetryPolicy(attempts=1, deadline=deadline)
        self.recheck_at = 0.0
        self._reset_runtime()
        self._reset_stats()
        ctx.on_close(self.close)
        ctx.on_fork(self._after_fork)
        _hubs.add(self)
        _flush_at_exit_once()

    def _reset_runtime(self) -> None:
        self._lock = threading.Lock()
        # The batch refresh runs when the monotonic clock reaches _refresh_at: the
        # earliest ``_refresh_due`` of any mirror (each mirror lowers it through
        # refresh_by when it wants a refresh sooner).
        self._refresh_lock = threading.Lock()
        self._refresh_at = math.inf
        # The breakers the 100 ms tick visits (Mirror._wants_tick): weakly held, so
        # that a failure-rate breaker nobody uses is still collected.
        self._active_lock = threading.Lock()
        self._active: weakref.WeakSet[BreakerCore] = weakref.WeakSet()
        self._queue: queue.SimpleQueue[tuple[Callable[..., None], tuple[Any, ...]]] = \
            queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def _reset_stats(self) -> None:
        #: (name, counts) of cores that were collected (appended by Mirror.__del__).
        self.graveyard: collections.deque[tuple[str, dict[str, Any]]] = \
            collections.deque()
        self._stats_lock = threading.Lock()
        self._stats_due = 0.0
        self._unsent: dict[str, list[int]] = {}  # deltas of collected cores, by name
        self._trims: set[str] = set()  # stats keys that grew past STATS_MAX_FIELDS
        self._flushing = threading.Lock()

    # --- instances ------------------------------------------------------------------

    def instance(self, key: tuple[str, Any], build: Callable[[], BreakerCore],
                 ) -> BreakerCore:
        """The live breaker for ``key`` (name, policy), built by ``build`` if none."""
        with self.instances_lock:
            found = self.instances.get(key)
            if found is None:
                found = self.instances[key] = build()
            self._recent[key] = found
            self._recent.move_to_end(key)
            while len(self._recent) > RECENT:
                self._recent.popitem(last=False)
        return found

    def pin(self, breaker: BreakerCore) -> None:
        """Keep ``breaker`` alive while the Coordinator is (it has callbacks to run)."""
        with self.instances_lock:
            self._pinned.add(breaker)

    def release(self, registration: Any) -> None:
        """Close a dead breaker's subscription on the hub thread (safe in a finalizer)."""
        self._queue.put((registration.close, ()))

    # --- scripts --------------------------------------------------------------------

    @property
    def down(self) -> bool:
        """True while Redis is known to be unreachable (breakers use their fallback)."""
        return self.down_since is not None

    def run(self, name: str, keys: Sequence[str], args: Sequence[Any], *,
            fail_fast: bool = True) -> list[Any]:
        """:meth:`script` run with blocking I/O."""
        return run(self.ctx, self.script(name, keys, args, fail_fast=fail_fast))

    def script(self, name: str, keys: Sequence[str], args: Sequence[Any], *,
               fail_fast: bool = True, undo: Callable[[], Plan[Any]] | None = None,
               ) -> Plan[list[Any]]:
        """Run ``breaker_<name>.lua``, once more at once only if it was never sent.

        No backoff: a protected call must not wait for Redis; the caller degrades
        instead. Every socket wait is capped by the retry policy's deadline. While the
        hub is down this fails at once, without I/O, unless ``fail_fast`` is False (an
        explicit command or read, which tries Redis and clears the mark on success).
        ``undo`` as :class:`~flexisync._core.plan.Step`'s (asyncio cancellation).

        Raises:
            BackendUnavailable: Redis could not be reached (or did not answer in time),
                now or by an earlier call that the background check has not cleared.
            MalformedRecord: the stored record holds foreign data (nothing changed).
            BackendError: Redis rejected the script.
        """
        if self.ctx.closed or self._backend.closed:
            raise BackendUnavailable(self._backend.address, reason="the Coordinator is closed")
        since = self.down_since
        if since is not None and fail_fast:
            raise BackendUnavailable(
                self._backend.address, attempts=0, elapsed=0.0,
                reason=f"unreachable for {time.monotonic() - since:.3f}s; waiting for "
                       "the background check")
        step: Step = Script(f"breaker.{name}", f"breaker_{name}", keys, args,
                            idempotent=False, retry=self._quick, undo=undo)
        try:
            reply = list((yield step))
        except BackendError as exc:
            if MALFORMED in exc.reason:
                defects = exc.reason.split(MALFORMED, 1)[1].split(" script: ", 1)[0]
                raise MalformedRecord(f"breaker.{name}",
                                      defects.split("\n", 1)[0].strip()) from exc
            raise
        except BackendUnavailable:
            self.mark_down()
            raise
        if since is not None:
            self.down_since = None  # it answered: the background check need not wait
        return reply

    def mark_down(self) -> None:
        """Redis was found unreachable: breakers fail fast until the background check."""
        with self._lock:
            if self.down_since is None:
                self.down_since = time.monotonic()
                self.recheck_at = self.down_since + RECHECK_INTERVAL
            self._ensure_thread()

    def _recheck(self) -> None:
        """One PING (on the hub thread) while down; clears the mark when it answers."""
        self.recheck_at = time.monotonic() + RECHECK_INTERVAL

        try:
            self._backend.call("breaker.recheck", lambda client: client.ping(),
                               retry=self._once)
        except (BackendUnavailable, BackendError):
            return
        self.down_since = None

    # --- registration ---------------------------------------------------------------

    def register(self, breaker: BreakerCore) -> None:
        """Include ``breaker`` in the periodic work and start the thread if needed."""
        with self._lock:
            self._breakers.add(breaker)
            if self._reconnect_hook is None:
                self._reconnect_hook = self.ctx.listener.add_reconnect_hook(
                    self._on_reconnect)
            self._ensure_thread()

    def activate(self, breaker: BreakerCore) -> None:
        """Have the 100 ms tick visit ``breaker`` until its ``_wants_tick()`` turns
        False (checked by the hub after a tick, under the same lock, so a breaker
        that turns active again meanwhile is not dropped). Any thread."""
        with self._active_lock:
            self._active.add(breaker)

    def refresh_by(self, at: float) -> None:
        """Run the batch refresh no later than ``at`` (monotonic seconds; rounded up to
        the next 100 ms tick). Any thread; takes no other lock."""
        with self._refresh_lock:
            self._refresh_at = min(self._refresh_at, at)

    def notify(self, fn: Callable[..., None], *args: Any) -> None:
        """Run ``fn(*args)`` on the hub thread, soon (callbacks, deferred releases)."""
        self._queue.put((fn, args))
        with self._lock:
            self._ensure_thread()

    def _ensure_thread(self) -> None:
        if self._closed:
            return
        if self._thread is None or not self._thread.is_alive():
            _flush_at_exit_once()
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._run, name="flexisync-breakers",
                                            daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Stop the thread (runs first when the Context closes), then add the calls
        not yet in the fleet stats (one bounded round trip, none if there are none)."""
        self._closed = True
        self._stop.set()
        self._queue.put((_noop, ()))
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5.0)
        if not self._backend.closed:
            try:
                self.flush_stats()
            except Exception:
                self._log.exception("breaker.stats_failed")
        with self.instances_lock:
            self._recent.clear()
            self._pinned.clear()

    def _after_fork(self) -> None:
        self.instances_lock = threading.Lock()
        self._reset_runtime()  # the listener kept our reconnect hook: not added again
        self._reset_stats()  # the parent's calls are the parent's to report
        self.down_since = None  # the child finds out for itself
        for breaker in list(self.instances.values()):
            breaker._after_fork()
        FORK_MARK[0] = 1

    def _on_reconnect(self) -> None:
        # On the listener thread: only mark; the hub thread does the reads.
        self._refresh_all_now()
        self._queue.put((_noop, ()))

    def _refresh_all_now(self) -> None:
        """Make every mirror's refresh due now (a message may have been missed)."""
        with self._lock:  # register() adds under it: no change while listing
            breakers = list(self._breakers)
        for breaker in breakers:
            breaker._refresh_due = 0.0
        self.refresh_by(0.0)

    # --- the loop -------------------------------------------------------------------

    def _run(self) -> None:
        next_tick = time.monotonic()
        was_connected = True
        while not self._stop.is_set():
            timeout = max(0.0, next_tick - time.monotonic())
            try:
                fn, args = self._queue.get(timeout=timeout)
            except queue.Empty:
                pass
            else:
                try:
                    fn(*args)
                except Exception:
                    self._log.exception("breaker.callback_failed")
                del fn, args  # hold nothing (a breaker's bound method) until the next item
                if time.monotonic() < next_tick:
                    continue
            if self._stop.is_set():
                break
            now = time.monotonic()
            next_tick = now + FLUSH_INTERVAL
            if self.down_since is not None and now >= self.recheck_at:
                self._recheck()
            listener = self.ctx.listener_if_started
            connected = listener is None or listener.connected
            lost = was_connected and not connected
            was_connected = connected
            self._tick_all(now, lost=lost)
            if now >= self._stats_due:
                self._stats_due = now + STATS_INTERVAL
                try:
                    self.flush_stats()
                except Exception:
                    self._log.exception("breaker.stats_failed")

    # --- fleet outcome stats ----------------------------------------------------------

    def bury(self) -> list[tuple[str, dict[str, Any]]]:
        """Take the counts of collected cores (for :mod:`flexisync.metrics`), keeping
        their unsent fleet deltas for the next :meth:`flush_stats`."""
        buried = []
        while True:
            try:
                name, counts = self.graveyard.popleft()
            except IndexError:
                break
            sent = counts["fleet_sent"]
            totals = (counts["success"], counts["failure"], counts["rejected"],
                      counts["ignored"], counts["probe_success"] + counts["probe_failure"]
                      + counts["probe_ignored"])
            with self._stats_lock:
                _add(self._unsent, name, [t - d for t, d in zip(totals, sent, strict=True)])
            buried.append((name, counts))
        if buried:
            tally = tally_of(self.ctx)
            for name, counts in buried:
                record = tally.breaker(name)
                with tally._lock:
                    for field in ("success", "failure", "ignored", "rejected",
                                  "probe_success", "probe_failure", "probe_ignored",
                                  "open_seconds"):
                        setattr(record, field, getattr(record, field) + counts[field])
                    record.probe = (record.probe_success + record.probe_failure
                                    + record.probe_ignored)
                    for state, n in counts["transitions"].items():
                        record.transitions[state] = record.transitions.get(state, 0) + n
        return buried

    def flush_stats(self) -> bool:
        """Add every breaker's calls since the last flush to the fleet stats: one
        pipeline of HINCRBY (fields ``"<bucket>:<outcome>"``), PEXPIRE and HLEN per
        breaker with calls; nothing at all when there were none. While Redis is down
        or refuses the write, the deltas wait for the next flush (never raises a
        FlexiSyncError). One flush at a time. Returns whether anything was written.
        """
        with self._flushing:
            return self._flush_stats()

    def _flush_stats(self) -> bool:
        self.bury()
        with self.instances_lock:
            cores = list(self.instances.values())
        deltas: dict[str, list[int]] = {}
        marks: list[tuple[Any, tuple[int, int, int, int, int]]] = []
        for core in cores:
            totals, sent = core.outcome_totals(), core.fleet_sent
            if totals != sent:
                _add(deltas, core.name, [t - d for t, d in zip(totals, sent, strict=True)])
                marks.append((core, totals))
        with self._stats_lock:
            unsent, self._unsent = self._unsent, {}
        for name, row in unsent.items():
            _add(deltas, name, row)
        bucket = int(time.time() // STATS_BUCKET) * STATS_BUCKET
        entries = [(stats_key(self.ctx, name), fields) for name, row in deltas.items()
                   if (fields := {f"{bucket}:{outcome}": amount for outcome, amount
                                  in zip(OUTCOMES, row, strict=True) if amount > 0})]
        if not entries:
            return False
        try:
            if self.down:
                raise BackendUnavailable(self._backend.address, reason="unreachable")
            replies = self._backend.call(
                "breaker.stats", functools.partial(_write_stats, entries, STATS_TTL * 1000),
                idempotent=False, retry=self._once)
        except (BackendUnavailable, BackendError):
            with self._stats_lock:  # try again at the next flush
                for name, row in unsent.items():
                    _add(self._unsent, name, row)
            return False
        for core, totals in marks:
            core.fleet_sent = totals
        position = 0
        for key, fields in entries:
            position += len(fields) + 2
            if int(replies[position - 1]) > STATS_MAX_FIELDS:
                self._trims.add(key)
        if self._trims:
            self._trim(bucket - STATS_TTL)
        return True

    def _trim(self, cut: int) -> None:
        trims, self._trims = self._trims, set()
        for key in trims:
            try:
                self._backend.call("breaker.stats", functools.partial(_trim_stats, key, cut),
                                   retry=self._once)
            except (BackendUnavailable, BackendError):
                return

    def _tick_all(self, now: float, *, lost: bool) -> None:
        # A method of its own: the loop's references end with it, so a breaker nobody
        # else holds is not kept alive by this thread until the next tick.
        if lost:
            self._refresh_all_now()
        if self._active:
            with self._active_lock:
                active = list(self._active)
            for breaker in active:
                try:
                    breaker._tick(now)
                except Exception:
                    self._log.exception("breaker.tick_failed", breaker=breaker.name)
            with self._active_lock:
                for breaker in active:
                    if not breaker._wants_tick():
                        self._active.discard(breaker)
            del active
        if now >= self._refresh_at:
            try:
                self._refresh(now)
            except Exception:
                self._log.exception("breaker.refresh_failed")
                self.refresh_by(now + 1.0)  # a bug must not end the refreshes

    # --- the batch refresh ------------------------------------------------------------

    def _refresh(self, now: float) -> None:
        """Refresh every mirror whose refresh is due within half its interval: one
        ``breaker_versions`` call per group of :func:`refresh_groups`, then a full
        read for each mirror whose record moved. Plans the next batch."""
        with self._refresh_lock:
            self._refresh_at = math.inf
        due: list[BreakerCore] = []
        next_at = math.inf
        with self._lock:
            breakers = list(self._breakers)
        for breaker in breakers:
            if breaker._down or not breaker._ready:
                continue  # prepare_plan and _recover plan their own next refresh
            interval = breaker.policy.refresh_interval
            if breaker._refresh_due <= now + interval / 2:
                breaker._refresh_due = now + interval
                due.append(breaker)
            next_at = min(next_at, breaker._refresh_due)
        self.refresh_by(next_at)
        if due:
            self.refresh_mirrors(due)

    def refresh_mirrors(self, mirrors: Sequence[BreakerCore]) -> None:
        """Bring ``mirrors`` up to date with blocking I/O (the hub thread): one
        ``breaker_versions`` call per group, then ``read_plan`` for those whose
        (epoch, version) differs from the one mirrored or whose record holds foreign
        data (it repairs or reports as a read does). Never raises a FlexiSyncError:
        Redis unreachable puts the mirrors not yet refreshed on their
        ``on_backend_error`` fallback (as their own read would have); any other
        failure of a group's call falls back to one full read per mirror of it."""
        keys = [mirror._keys[0] for mirror in mirrors]
        groups = refresh_groups(keys, cluster=self._backend.is_cluster)
        for position, group in enumerate(groups):
            members = [mirrors[i] for i in group]
            try:
                reply = self.run("versions", [keys[i] for i in group], [])
                found = decode_versions(reply, len(group))
            except BackendUnavailable as exc:
                # The hub is marked down now: every later group would fail at once.
                for rest in groups[position:]:
                    for i in rest:
                        mirrors[i]._go_down(exc)
                return
            except FlexiSyncError as exc:
                self._log.warning("breaker.versions_failed", breakers=len(members),
                                  error=f"{type(exc).__name__}: {exc}")
                found = [None] * len(members)
            for mirror, seen in zip(members, found, strict=True):
                if seen is None or not mirror._matches(*seen):
                    mirror.refresh()


def _add(table: dict[str, list[int]], name: str, row: list[int]) -> None:
    into = table.setdefault(name, [0] * len(OUTCOMES))
    for i, amount in enumerate(row):
        into[i] += amount


def _noop() -> None:
    return None
