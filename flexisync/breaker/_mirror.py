"""The mirror of one breaker's shared state, one per Context, name and policy.

Both shells (:class:`~flexisync.CircuitBreaker` and
:class:`~flexisync.aio.AsyncCircuitBreaker`) act on the same :class:`Mirror` (through its
subclass :class:`~flexisync.breaker._core.BreakerCore`), so a transition made by sync code
is seen by asyncio code in the same process at once, and the reverse. Messages arrive on
the Context's one listener thread; the background work (flushes, the periodic refresh,
recovery after an outage) runs on the hub's thread: the refresh is batched there for
all mirrors (:meth:`Hub.refresh_mirrors`), and a mirror reads its record in full only
when the batch found it moved (:meth:`Mirror._matches`, :meth:`Mirror.refresh`).
Every Redis exchange is a plan (:mod:`flexisync._core.plan`): the blocking shell and
the hub thread run it with ``run``, the asyncio shell with ``await arun``.
"""

from __future__ import annotations

import math
import os
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any, NamedTuple, cast

from flexisync._core.context import Context
from flexisync._core.plan import Plan, Signal, Subscribe, run
from flexisync._durations import to_ms
from flexisync._log import get_logger
from flexisync.breaker._hub import FORK_MARK, RECHECK_INTERVAL, MalformedRecord, hub_of
from flexisync.breaker._local import LocalBreaker
from flexisync.breaker._policy import (
    MAX_DURATION,
    STATES,
    BreakerInfo,
    BreakerPolicy,
    State,
)
from flexisync.errors import BackendUnavailable, FlexiSyncError

__all__ = ["EVENTS", "Mirror", "Snapshot", "decode_info", "integer", "keys_of", "snapshot",
           "text"]

_MAX_INT = 10**13  # bound on an integer read back from Redis (breaker_lib.lua's LIMIT)
_MARK = FORK_MARK
#: States in which calls are (mostly) turned away: an open period lasts through them.
_OPENISH = frozenset(("open", "half_open", "forced_open"))
EVENTS = {"closed": "breaker.closed", "open": "breaker.opened",
          "half_open": "breaker.half_opened", "forced_open": "breaker.forced_open",
          "disabled": "breaker.disabled"}


def text(value: Any) -> str:
    """A reply item as text."""
    return value.decode() if isinstance(value, bytes) else str(value)


def integer(value: Any) -> int:
    """An integer from a reply or a message, in the range flexisync writes.

    Raises:
        ValueError: not an integer, or out of range.
    """
    if isinstance(value, bool):
        raise ValueError("not an integer")
    number = value if isinstance(value, int) else int(text(value)[:20])
    if not -_MAX_INT <= number <= _MAX_INT:
        raise ValueError("integer out of range")
    return number


class Snapshot(NamedTuple):
    """What every breaker script replies first (see breaker_lib.lua)."""

    epoch: str
    version: int
    state: State
    remaining_ms: int
    failures: int
    before: str  # the state the script started from


def snapshot(values: Any, *, operation: str, before: bool = True) -> Snapshot:
    """Validate ``[epoch, version, state, remaining_ms, failures(, before)]``.

    Raises:
        MalformedRecord: anything else (never IndexError/ValueError).
    """
    size = 6 if before else 5
    try:
        if not isinstance(values, (list, tuple)) or len(values) < size:
            raise ValueError("wrong shape")
        epoch = text(values[0])
        state = text(values[2])
        if len(epoch) > 64 or " " in epoch:
            raise ValueError("bad epoch")
        if state not in STATES:
            raise ValueError("bad state")
        start = text(values[5]) if before else state
        if start not in STATES:
            raise ValueError("bad state")
        return Snapshot(epoch, integer(values[1]), cast("State", state),
                        integer(values[3]), integer(values[4]), start)
    except (ValueError, TypeError, UnicodeDecodeError) as exc:
        raise MalformedRecord(operation, f"unreadable reply ({exc})") from None


def decode_info(name: str, reply: list[Any]) -> BreakerInfo:
    """A ``breaker_read`` reply as a :class:`BreakerInfo`.

    Raises:
        MalformedRecord: the reply is not one flexisync's script writes.
    """
    snap = snapshot(reply, operation="breaker.read")
    try:
        trips, probes, _probe_ok, open_ms, calls, fails, changed = (
            integer(v) for v in reply[6:13])
    except (ValueError, TypeError) as exc:
        raise MalformedRecord("breaker.read", f"unreadable reply ({exc})") from None
    state = snap.state
    remaining = snap.remaining_ms
    return BreakerInfo(
        name=name, state=state, version=snap.version, failures=snap.failures,
        retry_after=math.inf if remaining < 0 else remaining / 1000.0,
        trips=trips, probes_in_flight=probes,
        open_period=open_ms / 1000.0 if open_ms and state != "closed" else None,
        window_calls=calls, window_failures=fails,
        changed_at=changed / 1000.0 if changed else None)


def keys_of(ctx: Context, name: str) -> list[str]:
    """The record, window and probe keys of breaker ``name`` (one hash tag)."""
    keys = ctx.keys
    return [keys.key("breaker", name), keys.key("breaker", name, "window"),
            keys.key("breaker", name, "probes")]


class _Subscription:
    """A mirror's pub/sub registration, closable after the mirror itself is gone."""

    __slots__ = ("registration",)

    def __init__(self) -> None:
        self.registration: Any = None

    def adopt(self, registration: Any) -> None:
        """Keep ``registration``, or close it if another caller subscribed meanwhile
        (asyncio preparation takes no lock)."""
        if self.registration is None:
            self.registration = registration
        else:
            registration.close()

    def close(self) -> None:
        registration, self.registration = self.registration, None
        if registration is not None:
            registration.close()


def _message_handler(ref: weakref.ref[Mirror]) -> Callable[[str, bytes, str | None], None]:
    """A listener handler that does not keep the mirror alive."""

    def handle(channel: str, data: bytes, pattern: str | None) -> None:
        mirror = ref()
        if mirror is not None:
            mirror._on_message(channel, data, pattern)

    return handle


class Mirror:
    """This process's copy of one breaker's shared state, and its upkeep.

    Internal. Attributes read by the shells' hot paths: ``_fast`` (closed, mirrored,
    healthy: no round trip needed), ``_ok`` (successes seen, flushed in the background).
    """

    def __init__(self, ctx: Context, name: str, policy: BreakerPolicy) -> None:
        self.policy = policy
        self.name = name
        self.ctx = ctx
        self._keys = keys_of(ctx, name)
        self._channel = ctx.keys.object_channel("breaker", name)
        self._hub = hub_of(ctx)
        self._log = get_logger("breaker", breaker=name, namespace=ctx.namespace)
        self._mode = "count" if policy.failure_rate is None else "rate"
        self._slow = policy.slow_call_duration
        self._callbacks: list[Callable[[str, str, str], None]] = []
        self._subscription = _Subscription()
        self._handler = _message_handler(weakref.ref(self))
        weakref.finalize(self, self._hub.release, self._subscription)
        self._zero_counters()
        self._garbage_logged_at = -math.inf
        self._init_runtime()

    def _zero_counters(self) -> None:
        """This process's call counters (read by :mod:`flexisync.metrics`): plain ints,
        bumped where the outcome is decided; the closed path only bumps ``_ok``."""
        self._ok = 0  # successes seen on the hot path (flushed as a delta)
        self._ok_local = 0  # successes decided by the local fallback (Redis down)
        self._failed = 0  # failures of calls that were not probes
        self._ignored = 0  # calls that counted as nothing (ignore, outcome_of, cancel)
        self._rejected = 0
        self._probe_ok = 0  # half-open probes (shared or local) by result
        self._probe_failed = 0
        self._probe_ignored = 0
        self._local_failures = 0  # every failure, probes included (BreakerStats)
        self._transitions: dict[str, int] = {}  # made by this process's scripts, by state
        self._open_seconds = 0.0  # open periods this process's scripts ended
        #: (success, failure, rejected, ignored, probe) already added to the fleet stats.
        self.fleet_sent = (0, 0, 0, 0, 0)

    def outcome_totals(self) -> tuple[int, int, int, int, int]:
        """This process's calls so far: (success, failure, rejected, ignored, probe)."""
        return (self._ok + self._ok_local, self._failed, self._rejected, self._ignored,
                self._probe_ok + self._probe_failed + self._probe_ignored)

    def __del__(self) -> None:
        # Counters must not go backwards when a core nobody uses is collected: hand
        # them to the hub (a deque append: no lock, safe whenever the GC runs this).
        try:
            if self._pid == os.getpid():
                self._hub.graveyard.append((self.name, self.counts()))
        except Exception:  # noqa: S110 - interpreter shutdown: nothing to keep
            pass

    def counts(self) -> dict[str, Any]:
        """Every counter of this core, by name (see :class:`BreakerTally`)."""
        return {"success": self._ok + self._ok_local, "failure": self._failed,
                "ignored": self._ignored, "rejected": self._rejected,
                "probe_success": self._probe_ok, "probe_failure": self._probe_failed,
                "probe_ignored": self._probe_ignored, "open_seconds": self._open_seconds,
                "transitions": dict(self._transitions), "fleet_sent": self.fleet_sent}

    def _init_runtime(self) -> None:
        self._mirror_lock = threading.Lock()
        self._prepare_lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._flush_idle = Signal()  # cleared while a flush is in flight
        self._flush_idle.set()
        self._state: State = "closed"
        self._epoch: str | None = None
        self._version = -1
        self._behind = 0  # consecutive reads older than the mirror (see _apply)
        self._shared_failures = 0
        self._open_until = 0.0
        self._ask_after = 0.0
        self._ready = False
        self._down = False
        self._prepare_queued = False  # prepare_soon() handed it to the hub thread
        self._fast = False  # closed, mirrored and healthy: the zero-round-trip path
        self._ok_sent = self._ok
        self._reporting = 0  # failure reports of this process in flight (_flush_lock)
        self._refresh_due = 0.0
        self._recheck_at = 0.0
        self._local = LocalBreaker(self.name, self.policy)
        self._open_watchers: set[Signal] = set()  # set when the mirror turns open
        self._pid = os.getpid()
        self._left_closed_at: float | None = None  # monotonic: mirror saw it open
        #: (epoch, version, seconds open) of the last open period the mirror saw end.
        self._closed_span: tuple[str, int, float | None] | None = None

    # --- Redis (plans) ------------------------------------------------------------------

    def _script(self, op: str, args: list[Any], *, force: bool = False,
                fail_fast: bool = True, undo: Callable[[], Plan[Any]] | None = None,
                ) -> Plan[list[Any]]:
        """Run a breaker script; a damaged record is repaired (and reported) first.

        Args:
            force: repair even a state key of another type (an explicit reset).
            fail_fast: fail at once while Redis is known to be down (protected calls
                and background work); False for explicit commands and reads.

        Raises:
            MalformedRecord: the record cannot be repaired without ``force`` (a key of
                another type: maybe another program's data).
            BackendUnavailable, BackendError: as :meth:`Hub.script`.
        """
        try:
            return (yield from self._hub.script(op, self._keys, args, fail_fast=fail_fast,
                                                undo=undo))
        except MalformedRecord as exc:
            found = exc
        reply = yield from self._hub.script(
            "repair", self._keys, [self._channel, "force" if force else ""], fail_fast=False)
        snap = snapshot(reply, operation="breaker.repair")
        defects = [text(item) for item in reply[6:]] or [found.defects]
        self._log.warning("breaker.record_repaired", defects=defects, state=snap.state)
        self._apply(snap, time.monotonic(), authoritative=True)
        return (yield from self._hub.script(op, self._keys, args, fail_fast=fail_fast,
                                            undo=undo))

    def read_plan(self, *, fail_fast: bool = True) -> Plan[list[Any]]:
        """Read the record into the mirror; the raw reply (see :func:`decode_info`)."""
        window_ms = to_ms(self.policy.window) if self._mode == "rate" else 0
        reply = yield from self._script("read", [self._channel, window_ms],
                                        fail_fast=fail_fast)
        self._apply(snapshot(reply, operation="breaker.read"), time.monotonic(),
                    authoritative=True)
        return reply

    def _subscribe_plan(self) -> Plan[None]:
        if self._subscription.registration is not None:
            return
        registration = yield Subscribe("channel", self._channel, self._handler, 2.0)
        self._subscription.adopt(registration)

    def prepare_plan(self) -> Plan[None]:
        """Subscribe (confirmed), then read: before the first decision of this mirror.

        Never raises a FlexiSyncError: a failure puts the mirror in its
        ``on_backend_error`` mode instead.
        """
        if self._ready or self._down:
            return
        try:
            yield from self.read_plan()  # fails fast when Redis is down
            yield from self._subscribe_plan()
            yield from self.read_plan()  # anything published before the subscription
        except FlexiSyncError as exc:
            self._go_down(exc)
        else:
            self._refresh_due = time.monotonic() + self.policy.refresh_interval
            self._hub.refresh_by(self._refresh_due)
            self._ready = True
            self._update_fast()
            if self._wants_tick():
                self._hub.activate(self)  # type: ignore[arg-type]
        self._hub.register(self)  # type: ignore[arg-type]

    def ensure_ready(self) -> None:
        """:meth:`prepare_plan` with blocking I/O, once (threads wait for each other)."""
        if not _MARK[0]:
            from flexisync.breaker._hub import detect_fork  # noqa: PLC0415

            detect_fork()
        if self._ready or self._down:
            return
        with self._prepare_lock:
            try:
                run(self.ctx, self.prepare_plan())
            finally:
                self._prepare_queued = False

    def prepare_soon(self) -> None:
        """Have the hub thread prepare the mirror (for callers that must not block)."""
        if not (self._ready or self._down or self._prepare_queued):
            self._prepare_queued = True
            self._hub.notify(self.ensure_ready)

    # --- the mirror -----------------------------------------------------------------

    def _on_message(self, _channel: str, data: bytes, _pattern: str | None) -> None:
        try:
            raw = data.decode("utf-8")
            parts = raw.split(" ")
            if len(parts) != 5 or len(raw) > 200:
                raise ValueError("not five fields")
            snap = snapshot(parts, operation="breaker.message", before=False)
        except (ValueError, MalformedRecord):
            self._garbage(data)
            return
        old = self._apply(snap, time.monotonic())
        if old is not None:
            self._log.debug("breaker.mirrored", old=old, new=snap.state,
                            version=snap.version)

    def _garbage(self, data: bytes) -> None:
        """Something else published on this breaker's channel: report, re-read soon."""
        now = time.monotonic()
        self._refresh_soon(now + 0.2)
        log = self._log.debug
        if now - self._garbage_logged_at > 60.0:  # at most one warning a minute
            self._garbage_logged_at = now
            log = self._log.warning
        log("breaker.message_malformed", size=len(data), channel=self._channel)

    def _apply_reply(self, reply: Any, operation: str) -> Snapshot:
        """Mirror a script's reply; log a transition this process's script made.

        Only the process that made a transition logs it under its event name
        (``breaker.opened`` at warning...); mirrors log ``breaker.mirrored`` at debug.
        """
        snap = snapshot(reply, operation=f"breaker.{operation}")
        old = self._apply(snap, time.monotonic())
        if snap.before != snap.state:
            state = snap.state
            self._transitions[state] = self._transitions.get(state, 0) + 1
            span = self._closed_span
            if (snap.before in _OPENISH and state not in _OPENISH and span is not None
                    and span[:2] == (snap.epoch, snap.version) and span[2] is not None):
                self._open_seconds += span[2]
            log = self._log.warning if state in ("open", "forced_open") else self._log.info
            log(EVENTS[state], old=snap.before, new=state, version=snap.version,
                retry_after=None if snap.remaining_ms <= 0 else snap.remaining_ms / 1000.0)
        elif old is not None:
            self._log.debug("breaker.mirrored", old=old, new=snap.state,
                            version=snap.version)
        return snap

    def _apply(self, snap: Snapshot, at: float, *, authoritative: bool = False,
               ) -> str | None:
        """Take ``snap`` into the mirror if it is newer than the snapshot held; ``at`` is
        when it was received (monotonic). Returns the old state when the state changed.

        ``authoritative`` (a read of the record): a read older than the mirror, within
        one epoch, is normally a reply overtaken by a message; twice in a row it means
        the mirror holds a version the server never had (something else published on
        our channel), and the server's record wins.
        """
        with self._mirror_lock:
            if snap.epoch == self._epoch and snap.version <= self._version:
                if not authoritative:
                    return None  # an older (out-of-order) or duplicate snapshot
                if snap.version == self._version:
                    self._behind = 0  # the record agrees with the mirror
                    return None
                self._behind += 1
                if self._behind < 2:
                    self._refresh_soon(at + 0.2)
                    return None
            self._behind = 0
            old = self._state
            pending = (self._mode == "count" and self._shared_failures == 0
                       and snap.failures != 0)
            self._epoch, self._version = snap.epoch, snap.version
            self._state = snap.state
            self._shared_failures = snap.failures
            remaining_ms = snap.remaining_ms
            self._open_until = math.inf if remaining_ms < 0 else at + remaining_ms / 1000.0
            self._ask_after = 0.0
            self._update_fast()
            if old != snap.state:
                if snap.state in _OPENISH and old not in _OPENISH:
                    self._left_closed_at = at
                elif old in _OPENISH and snap.state not in _OPENISH:
                    started, self._left_closed_at = self._left_closed_at, None
                    self._closed_span = (snap.epoch, snap.version,
                                         None if started is None else max(0.0, at - started))
        if pending:
            self._failures_pending()
        if old == snap.state:
            return None
        if snap.state in ("open", "forced_open"):
            self._wake_open_watchers()
        if self._callbacks:
            self._hub.notify(self._fire, old, snap.state)
        return old

    def watch_open(self) -> Signal:
        """A Signal set when this mirror next turns open or forced_open (or now, if it
        is); give it back with :meth:`unwatch_open`."""
        signal = Signal()
        with self._mirror_lock:
            self._open_watchers.add(signal)
            if self._state in ("open", "forced_open"):
                signal.set()
        return signal

    def unwatch_open(self, signal: Signal) -> None:
        with self._mirror_lock:
            self._open_watchers.discard(signal)

    def _wake_open_watchers(self) -> None:
        with self._mirror_lock:
            watchers = list(self._open_watchers)
        for signal in watchers:
            signal.set()

    def _update_fast(self) -> None:
        self._fast = (self._ready and not self._down and self._state == "closed"
                      and self._slow is None)

    def _fire(self, old: str, new: str) -> None:
        for callback in list(self._callbacks):
            try:
                callback(self.name, old, new)
            except Exception:
                self._log.exception("breaker.callback_failed", old=old, new=new)

    # --- background work (the hub thread) ------------------------------------------

    def _wants_tick(self) -> bool:
        """Whether the hub's 100 ms tick has work for this mirror: it is cut off from
        Redis (:meth:`_recover`), or its successes are flushed (failure-rate mode
        always; consecutive-failure mode while failures are pending, when a success
        resets them). Other mirrors cost the tick nothing."""
        return self._down or self._mode == "rate" or self._shared_failures != 0

    def _failures_pending(self) -> None:
        """A consecutive-failure count became non-zero: from now on successes are
        flushed (the hub ticks this mirror). Those aggregated before it are dropped, as
        a tick while no failure was pending drops them (they would otherwise reset
        the new count) - unless a failure report of this process is in flight: the
        successes made during it are later than that failure, and flushed."""
        with self._flush_lock:
            if self._reporting == 0:
                self._ok_sent = self._ok
        self._hub.activate(self)  # type: ignore[arg-type]

    def _refresh_soon(self, at: float) -> None:
        """Have the hub's batch refresh this mirror by ``at`` (monotonic seconds)."""
        self._refresh_due = min(self._refresh_due, at)
        self._hub.refresh_by(at)

    def _matches(self, epoch: str, version: int) -> bool:
        """Whether the record's ``(epoch, version)``, as ``breaker_versions`` found it,
        is the one mirrored; False: the mirror must read the record (:meth:`refresh`).

        What a read would change otherwise is nothing: :meth:`_apply` takes a record
        only with another (epoch, version), and every change a mirror acts on bumps
        the version (``failures`` turning zero or non-zero included; a count moving
        between non-zero values is not mirrored, now as before)."""
        with self._mirror_lock:
            return epoch == self._epoch and version == self._version

    def refresh(self) -> None:
        """Read the record in full now (blocking: the hub thread). Never raises a
        FlexiSyncError: a failure puts the mirror on its ``on_backend_error`` fallback
        (a record with foreign data is repaired or reported first, see :meth:`_script`)."""
        if self._down or not self._ready:
            return
        try:
            run(self.ctx, self.read_plan())
        except FlexiSyncError as exc:
            self._go_down(exc)

    def _tick(self, now: float) -> None:
        """The hub's 100 ms tick, while :meth:`_wants_tick`."""
        if self._down:
            if not self._hub.down and now >= self._recheck_at:
                self._recover()
            return
        if not self._ready:
            return
        try:
            self._flush()
        except FlexiSyncError as exc:
            self._go_down(exc)

    def _record_args(self, successes: int, failures: int, retry_ms: str) -> list[Any]:
        pol = self.policy
        return [self._channel, self._mode, pol.failure_threshold, pol.failure_rate or 0,
                pol.minimum_calls, to_ms(pol.window), to_ms(pol.recovery_timeout),
                successes, failures, retry_ms]

    def _flush(self) -> None:
        if self._ok == self._ok_sent:
            return
        if self._mode == "count" and (self._shared_failures == 0 or self._state != "closed"):
            with self._flush_lock:
                self._take_successes()  # no failure pending: nothing to reset
            return
        with self._flush_lock:
            successes = self._take_successes()
            if not successes:
                return
            self._flush_idle.clear()
        try:
            reply = run(self.ctx, self._script("record", self._record_args(successes, 0, "")))
        finally:
            self._flush_idle.set()
        self._apply_reply(reply, "record")

    def _take_successes(self) -> int:
        """Successes not yet reported, now marked reported; caller holds the flush lock."""
        ok = self._ok
        count = ok - self._ok_sent
        self._ok_sent = ok
        return count

    def _go_down(self, exc: BaseException) -> None:
        """Stop using Redis for this breaker: ``on_backend_error`` applies until
        :meth:`_recover` succeeds (after the hub's check for an outage; after
        ``refresh_interval`` for a record that cannot be used)."""
        unavailable = isinstance(exc, BackendUnavailable)
        with self._mirror_lock:
            if self._down:
                return
            self._down = True
            self._fast = False
            self._recheck_at = time.monotonic() + (
                RECHECK_INTERVAL if unavailable else self.policy.refresh_interval)
            self._local.seed(self._state, self._open_until)
        self._hub.activate(self)  # type: ignore[arg-type]
        mode = self.policy.on_backend_error
        if isinstance(exc, MalformedRecord):
            self._log.warning("breaker.record_malformed", mode=mode, defects=exc.defects)
        elif unavailable:
            self._log.warning("breaker.backend_unavailable", mode=mode,
                              error=f"{type(exc).__name__}: {exc}")
        else:
            self._log.warning("breaker.backend_error", mode=mode,
                              error=f"{type(exc).__name__}: {exc}")
        self._hub.register(self)  # type: ignore[arg-type]

    def _recover(self) -> None:
        """Redis may be back: reconcile the local fallback, re-read, resume sharing."""
        self._recheck_at = time.monotonic() + RECHECK_INTERVAL
        try:
            run(self.ctx, self._recover_plan())
        except MalformedRecord:
            self._recheck_at = time.monotonic() + self.policy.refresh_interval
            return
        except FlexiSyncError:
            return
        with self._mirror_lock:
            self._down = False
            self._ready = True
            self._refresh_due = time.monotonic() + self.policy.refresh_interval
            self._ok_sent = self._ok  # calls made while down were counted locally
            self._update_fast()
        self._hub.refresh_by(self._refresh_due)
        self._log.info("breaker.backend_restored", state=self._state)

    def _recover_plan(self) -> Plan[None]:
        if self.policy.on_backend_error == "local" and self._local.state == "open":
            remaining = self._local.remaining()
            if remaining > 0:
                reply = yield from self._script("command", [
                    self._channel, "trip", to_ms(min(remaining, MAX_DURATION)),
                    to_ms(self.policy.recovery_timeout)])
                self._apply_reply(reply, "command")
        yield from self.read_plan()
        if self._subscription.registration is None:
            yield from self._subscribe_plan()
            yield from self.read_plan()

    def _after_fork(self) -> None:
        """In a forked child: fresh locks and counters, no inherited subscription,
        re-read on use."""
        self._zero_counters()
        self._init_runtime()
        self._subscription.close()
