"""Followers that scale: one reader per stream per Context, fanning entries out.

``stream_append.lua`` PUBLISHes every new id on the stream's wake-up channel. The
Context's :class:`StreamReader` subscribes to that channel once per stream (on the
shared listener, while the stream has followers), and on each wake-up fetches the new
entries ONCE (``stream_read.lua`` after its cursor, on one named daemon thread,
``flexisync-stream-reader``, with the blocking backend) and hands the decoded batch to
every follower of the stream in this process. Followers' replay reads are done on
that thread too (equal ones at once are done once), so N followers of M streams cost
the listener's connection plus one pooled connection, and O(M) reads per append. The
reader also re-fetches after the listener reconnects and, as a safety net, every
:data:`SAFETY_POLL` seconds.

Exactly once, in order, no gap: a follower (:class:`FollowCore`) registers with the
reader BEFORE it replays from its resume point; every batch says which id it follows
(``after``), so a follower takes a batch only when it continues what the follower has
yielded (dropping ids it already has) and otherwise re-reads from its own position
through the resume-point checks (which is also how trimming is detected).

The live path is cheap per follower, since one append may have to reach thousands of
them: a follower waits on its :class:`Member` (threads on a condition, coroutines on a
future); the reader wakes the waiting coroutines of one event loop with ONE
``loop.call_soon_threadsafe`` per batch; a coroutine's timeout is one timer kept across
waits (re-armed only when it would fire too late); :meth:`FollowCore.poll` hands over
what is queued without any plan, step or await; and a batch renders each entry once for
every follower that asks for the same rendering (:meth:`Batch.rendered`: an SSE
frame is encoded once per entry, not once per client).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Protocol

from flexisync._core.plan import Plan, Signal, Sleep, Step, Wait, run
from flexisync._core.streams import (
    BATCH,
    Skipped,
    StreamCore,
    decode_item,
    id_key,
    read_entries,
    text,
)
from flexisync._log import get_logger
from flexisync.errors import BackendError, BackendUnavailable, DecodeError, EventsTrimmed

if TYPE_CHECKING:
    from flexisync._core.context import Context
    from flexisync._core.events import Event
    from flexisync._listener import Registration

__all__ = ["NEEDS_IO", "SAFETY_POLL", "Batch", "FollowCore", "Member", "Render",
           "StreamReader", "reader_of"]

#: Seconds between the reader's safety re-fetches of every followed stream.
SAFETY_POLL = 5.0
#: Entries a follower may have waiting before it is told to re-read from Redis instead.
MEMBER_MAX = 10_000
_FETCH_DEADLINE = 5.0  # seconds one fetch of the reader may take
_WAIT_MAX = 5.0  # seconds a follower waits at most between checks of its own state
_GRACE = 1.0  # seconds a round trip may take beyond a follow() timeout
_STOP_POLL = 1.0  # with a stop event, wait at most this long between checks of it

#: One decoded entry: its id and the event (or why it does not decode).
Item = tuple[str, "Event | DecodeError"]
#: Renders one entry for a follower: ``render(stream name, entry id, event or error)``.
#: Must be a pure function of its arguments (its results are shared by followers).
Render = Callable[[str, str, "Event | DecodeError"], Any]


class _NeedsIO:
    __slots__ = ()

    def __repr__(self) -> str:
        return "NEEDS_IO"


#: What :meth:`FollowCore.poll` returns when the next items need I/O (joining the
#: reader, a replay read, an outage's pause): run :meth:`FollowCore.next_items`.
NEEDS_IO: Final = _NeedsIO()


class _Stop(Protocol):
    def is_set(self) -> bool: ...


class Batch:
    """Entries the reader fetched: every entry with an id after ``after``, in order.

    ``after is None`` means the reader lost continuity (a trim, an outage, an
    overflowing follower): re-read from your own position. One batch is shared by
    every follower of the stream in the process; treat it as immutable.
    """

    __slots__ = ("_memo", "after", "events", "items")

    def __init__(self, after: str | None, items: tuple[Item, ...]) -> None:
        self.after = after
        self.items = items
        self._memo: tuple[Render, tuple[Any, ...]] | None = None
        #: The items' events, when every item decodes (else ``None``).
        self.events: tuple[Event, ...] | None = tuple(
            value for _, value in items if not isinstance(value, DecodeError))
        if len(self.events) != len(items):
            self.events = None

    def rendered(self, render: Render, name: str) -> tuple[Any, ...]:
        """``render(name, id, value)`` of every item, in order, computed once per batch
        for the same ``render`` (racing threads may both compute it: same result)."""
        memo = self._memo
        if memo is not None and memo[0] is render:
            return memo[1]
        out = tuple(render(name, entry_id, value) for entry_id, value in self.items)
        self._memo = (render, out)
        return out


async def _sleep0() -> None:
    """Let the event loop run once (a follower with no place at the reader: the
    caller looks again)."""
    await asyncio.sleep(0)


def _wake(futures: list[asyncio.Future[None]]) -> None:
    """Resolve waiting followers' futures (in their event loop, one callback a batch)."""
    for future in futures:
        if not future.done():
            future.set_result(None)


class Member:
    """One follower's place at the reader: its queued batches, and its waiter.

    A follower waits in :meth:`wait` (a thread) or :meth:`wait_async` (a coroutine)
    until a batch is queued, the place dies, or the timeout passes. :meth:`deliver`
    returns the future of a waiting coroutine instead of waking it, so that the reader
    wakes every coroutine of one event loop with one ``call_soon_threadsafe``.
    """

    __slots__ = ("_batches", "_cond", "_count", "_lock", "_sleepers", "_timer",
                 "_timer_loop", "_waiter", "alive", "entry")

    def __init__(self, entry: _Entry) -> None:
        self.entry = entry
        self.alive = True
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._sleepers = 0  # threads blocked in wait()
        self._waiter: asyncio.Future[None] | None = None  # a coroutine in wait_async()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_loop: asyncio.AbstractEventLoop | None = None
        self._batches: deque[Batch] = deque()
        self._count = 0

    def deliver(self, batch: Batch) -> asyncio.Future[None] | None:
        """Queue ``batch`` (reader thread); past :data:`MEMBER_MAX`, ask for a re-read.

        Wakes a waiting thread; returns a waiting coroutine's future for the caller to
        resolve in its event loop (see :func:`_wake`), else ``None``.
        """
        with self._lock:
            if self._count + len(batch.items) > MEMBER_MAX:
                self._batches.clear()
                self._count = 0
                batch = Batch(None, ())
            self._batches.append(batch)
            self._count += len(batch.items)
            if self._sleepers:
                self._cond.notify_all()
            waiter, self._waiter = self._waiter, None
        return waiter

    def take(self) -> list[Batch]:
        """Every queued batch, oldest first (``[]`` when none)."""
        if not self._batches:  # a batch queued right now is seen by the next wait
            return []
        with self._lock:
            batches = list(self._batches)
            self._batches.clear()
            self._count = 0
        return batches

    def backlog(self) -> tuple[int, str | None]:
        """``(entries queued, id of the oldest queued entry or None)`` (no I/O)."""
        with self._lock:
            first = next((b.items[0][0] for b in self._batches if b.items), None)
            return self._count, first

    def kill(self) -> None:
        """Mark this place gone (Context closed, fork) and wake the follower."""
        with self._lock:
            self.alive = False
            if self._sleepers:
                self._cond.notify_all()
            waiter, self._waiter = self._waiter, None
        if waiter is not None:
            with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits
                waiter.get_loop().call_soon_threadsafe(_wake, [waiter])

    def wait(self, timeout: float) -> None:
        """Block until a batch is queued, the place dies, or ``timeout`` seconds pass
        (may return early: the caller looks again)."""
        with self._cond:
            if self._batches or not self.alive or timeout <= 0:
                return
            self._sleepers += 1
            try:
                self._cond.wait(timeout)
            finally:
                self._sleepers -= 1

    def wait_async(self, timeout: float) -> asyncio.Future[None]:
        """:meth:`wait` for a coroutine: a future to await (done at once when a batch
        is queued or the place died). Its timeout is one timer per member, kept across
        waits (re-armed only when it would fire too late), so it may end early.

        A future, not a coroutine: nothing else stays alive while thousands of
        followers wait. Cancelling the task awaiting it cancels the future, which
        :meth:`deliver` and the timer then pass over: nothing is left behind.
        """
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._lock:
            if self._batches or not self.alive or timeout <= 0:
                future.set_result(None)
                return future
            self._waiter = future
        due = loop.time() + timeout
        timer = self._timer
        if timer is None or timer.when() > due or self._timer_loop is not loop:
            if timer is not None:
                timer.cancel()
            self._timer = loop.call_at(due, self._ring)
            self._timer_loop = loop
        return future

    def _ring(self) -> None:
        """The timer fired (in its loop): wake the coroutine waiting there, if any."""
        self._timer = None
        waiter = self._waiter
        if waiter is not None and not waiter.done() and waiter.get_loop() is self._timer_loop:
            waiter.set_result(None)

    def release(self) -> None:
        """Cancel the timer (the follower left; call it from the timer's loop)."""
        timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()


class _Read:
    """A follower's replay read, done by the reader thread (coalesced with equal ones)."""

    __slots__ = ("after", "count", "deadline", "error", "key", "name", "result", "signal")

    def __init__(self, core: StreamCore, after: str | None, count: int,
                 deadline: float | None) -> None:
        self.name = core.name
        self.key = core.key
        self.after = after
        self.count = count
        self.deadline = deadline
        self.signal = Signal()
        self.result: list[tuple[Any, Any]] = []
        self.error: BaseException | None = None

    def finish(self, result: list[tuple[Any, Any]], error: BaseException | None) -> None:
        self.result, self.error = result, error
        self.signal.set()

    def outcome(self) -> list[tuple[Any, Any]]:
        if self.error is not None:
            raise self.error
        return self.result


@dataclass(slots=True, eq=False)
class ReadStep(Step):
    """Replay-read through the Context's reader: followers hold no connection of their
    own, however many there are, and equal reads made at once are done once."""

    request: _Read

    def run(self, ctx: Context) -> list[tuple[Any, Any]]:
        reader_of(ctx).submit(self.request)
        self.request.signal.wait(None)
        return self.request.outcome()

    async def arun(self, ctx: Context) -> list[tuple[Any, Any]]:
        reader_of(ctx).submit(self.request)
        await self.request.signal.wait_async(None)  # cancelled: the result is dropped
        return self.request.outcome()


class _Entry:
    """One followed stream at the reader: its followers, subscription and cursor."""

    def __init__(self, reader: StreamReader, core: StreamCore) -> None:
        self.name = core.name
        self.key = core.key
        self.channel = core.channel
        self.members: set[Member] = set()
        self.ready = Signal()
        self.error: BaseException | None = None
        self.registration: Registration | None = None
        self.cursor: str | None = None

        def wake(_channel: str, _data: bytes, _pattern: str | None) -> None:
            reader.mark(self)

        self.handler = wake


class StreamReader:
    """The Context's one reader of every followed stream; see the module docstring."""

    def __init__(self, ctx: Context) -> None:
        self._ctx = ctx
        self._log = get_logger("streams")
        self._init_runtime()
        self._unhook = ctx.listener.add_reconnect_hook(self._on_reconnect)
        ctx.on_close(self.close)
        ctx.on_fork(self._after_fork)

    def _init_runtime(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._entries: dict[str, _Entry] = {}
        self._subs: list[_Entry] = []
        self._unsubs: list[Registration] = []
        self._dirty: set[_Entry] = set()
        self._reads: list[_Read] = []
        self._thread: threading.Thread | None = None
        self._stopped = False
        self.fetches = 0

    # --- followers' side (any thread, no I/O) ------------------------------------------

    def join(self, core: StreamCore) -> Member:
        """A new follower of ``core``'s stream; subscribes the stream when it is new.

        Raises:
            BackendUnavailable: the Context is closed.
        """
        with self._cond:
            if self._stopped or self._ctx.closed:
                raise BackendUnavailable(self._ctx.address,
                                         reason="the Coordinator is closed")
            entry = self._entries.get(core.key)
            if entry is None:
                entry = self._entries[core.key] = _Entry(self, core)
                self._subs.append(entry)
                self._cond.notify()
            member = Member(entry)
            entry.members.add(member)
            self._ensure_thread()
        return member

    def leave(self, member: Member) -> None:
        """Remove a follower; the stream's last one unsubscribes it (on the reader)."""
        with self._cond:
            member.alive = False
            entry = member.entry
            entry.members.discard(member)
            if entry.members or self._entries.get(entry.key) is not entry:
                return
            del self._entries[entry.key]
            self._dirty.discard(entry)
            if entry.registration is not None:
                self._unsubs.append(entry.registration)
                entry.registration = None
                self._ensure_thread()
                self._cond.notify()

    def mark(self, entry: _Entry) -> None:
        """Ask for a fetch of ``entry`` (the listener thread, on a wake-up)."""
        with self._cond:
            if self._entries.get(entry.key) is entry:
                self._dirty.add(entry)
                self._cond.notify()

    def submit(self, request: _Read) -> None:
        """Queue a replay read for the reader thread; fails it when closed."""
        with self._cond:
            if not self._stopped:
                self._reads.append(request)
                self._ensure_thread()
                self._cond.notify()
                return
        request.finish([], BackendUnavailable(self._ctx.address,
                                              reason="the Coordinator is closed"))

    def followers(self) -> dict[str, int]:
        """Followers per followed stream name, now (for tests and inspection)."""
        with self._cond:
            return {e.name: len(e.members) for e in self._entries.values()}

    def lag(self) -> dict[str, tuple[int, int, float]]:
        """Per followed stream name: ``(followers, entries, seconds)`` where
        ``entries`` is how many fetched entries the slowest follower in this process
        has not taken yet, and ``seconds`` how much older (by entry id, i.e. the
        server's clock: no clock skew) the oldest of them is than the newest entry
        fetched. No I/O (for :mod:`flexisync.metrics`)."""
        with self._cond:
            entries = [(e.name, e.cursor, tuple(e.members)) for e in self._entries.values()]
        out: dict[str, tuple[int, int, float]] = {}
        for name, cursor, members in entries:
            worst, oldest = 0, None
            for member in members:
                count, first = member.backlog()
                worst = max(worst, count)
                if first is not None and (oldest is None or id_key(first) < id_key(oldest)):
                    oldest = first
            seconds = 0.0
            if oldest is not None and cursor is not None:
                seconds = max(0.0, (id_key(cursor)[0] - id_key(oldest)[0]) / 1000.0)
            followers, entries_behind, behind = out.get(name, (0, 0, 0.0))
            out[name] = (followers + len(members), max(entries_behind, worst),
                         max(behind, seconds))
        return out

    def idle(self) -> bool:
        """True when nothing is followed and no (un)subscription is pending."""
        with self._cond:
            return not (self._entries or self._subs or self._unsubs)

    # --- lifetime ----------------------------------------------------------------------

    def close(self) -> None:
        """Stop the thread and wake every follower (they find the Context closed)."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
            thread = self._thread
            members = [m for e in self._entries.values() for m in e.members]
            reads, self._reads = self._reads, []
        for member in members:
            member.kill()
        closed = BackendUnavailable(self._ctx.address, reason="the Coordinator is closed")
        for request in reads:
            request.finish([], closed)
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=_FETCH_DEADLINE + 1.0)
        self._unhook()

    def _after_fork(self) -> None:
        entries = list(self._entries.values())
        reads = self._reads
        self._init_runtime()
        gone = BackendUnavailable(self._ctx.address, reason="the process forked")
        for request in reads:
            request.finish([], gone)
        for entry in entries:
            if entry.registration is not None:
                entry.registration.close(wait=False)
            for member in entry.members:
                member.kill()

    def _on_reconnect(self) -> None:
        with self._cond:
            self._dirty.update(e for e in self._entries.values() if e.registration)
            self._cond.notify()

    def _ensure_thread(self) -> None:
        """Start the reader thread if it is not running; caller holds ``_cond``."""
        if self._thread is None and not self._stopped:
            self._thread = threading.Thread(target=self._run, name="flexisync-stream-reader",
                                            daemon=True)
            self._thread.start()

    # --- the reader thread -------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._stopped or self._subs or self._unsubs or self._dirty
                           or self._reads):
                    if not self._cond.wait(SAFETY_POLL):
                        if not self._entries:  # nothing followed: the thread ends
                            self._thread = None
                            return
                        self._dirty.update(e for e in self._entries.values()
                                           if e.registration is not None)
                if self._stopped:
                    self._thread = None
                    return
                subs, self._subs = self._subs, []
                unsubs, self._unsubs = self._unsubs, []
                dirty, self._dirty = self._dirty, set()
                reads, self._reads = self._reads, []
            try:
                for registration in unsubs:
                    registration.close()
                for entry in subs:
                    self._subscribe(entry)
                self._serve_reads(reads)
                for entry in dirty:
                    self._fetch(entry)
            except Exception:  # never dies silently; the next wake-up or poll retries
                self._log.exception("stream.reader_failed")

    def _serve_reads(self, reads: list[_Read]) -> None:
        """Do the queued replay reads, each distinct (stream, after, count) once."""
        groups: dict[tuple[str, str | None, int], list[_Read]] = {}
        for request in reads:
            groups.setdefault((request.key, request.after, request.count), []).append(request)
        for group in groups.values():
            first = group[0]
            deadlines = [r.deadline for r in group]
            deadline = None if None in deadlines else max(d for d in deadlines if d)
            result: list[tuple[Any, Any]] = []
            error: BaseException | None = None
            self.fetches += 1
            try:
                result = run(self._ctx, read_entries(first.name, first.key, first.after,
                                                     first.count, deadline))
            except Exception as exc:  # handed to each follower, which raises it
                error = exc
            for request in group:
                request.finish(result, error)

    def _subscribe(self, entry: _Entry) -> None:
        try:
            registration = self._ctx.listener.subscribe(entry.channel, entry.handler)
        except (BackendError, BackendUnavailable) as exc:
            with self._cond:
                entry.error = exc
                if self._entries.get(entry.key) is entry:
                    del self._entries[entry.key]
                members = list(entry.members)
            for member in members:
                member.alive = False
            entry.ready.set()
            return
        with self._cond:
            abandoned = self._entries.get(entry.key) is not entry
            if not abandoned:
                entry.registration = registration
        if abandoned:
            registration.close()
        else:
            self._init_cursor(entry)
        entry.ready.set()

    def _init_cursor(self, entry: _Entry) -> None:
        """Set the cursor to the newest id now (before any follower of it replays)."""
        key = entry.key
        try:
            newest = self._ctx.backend.call(
                "stream.follow", lambda c: c.xrevrange(key, "+", "-", count=1),
                deadline=time.monotonic() + _FETCH_DEADLINE)
        except BackendUnavailable:
            entry.cursor = None
            return
        entry.cursor = text(newest[0][0]) if newest else "0-0"

    def _fetch(self, entry: _Entry) -> None:
        """Read what follows the cursor once; hand it to every follower of ``entry``."""
        cursor = entry.cursor
        if cursor is None:  # lost continuity: start over from the newest id
            self._init_cursor(entry)
            self._fan_out(entry, Batch(None, ()))
            return
        self.fetches += 1
        try:
            entries = run(self._ctx, read_entries(
                entry.name, entry.key, cursor, BATCH, time.monotonic() + _FETCH_DEADLINE))
        except EventsTrimmed:  # UnknownResumePoint too: the stream was deleted or reset
            entry.cursor = None
            self.mark(entry)
            return
        except BackendUnavailable as exc:
            self._log.info("stream.reader_interrupted", stream=entry.name, error=str(exc))
            return  # the listener's reconnect hook or the safety poll fetches again
        if not entries:
            return
        items = tuple((text(entry_id), decode_item(entry.name, entry_id, fields))
                      for entry_id, fields in entries)
        entry.cursor = items[-1][0]
        self._fan_out(entry, Batch(cursor, items))
        if len(entries) >= BATCH:
            self.mark(entry)

    def _fan_out(self, entry: _Entry, batch: Batch) -> None:
        """Queue ``batch`` for every follower of ``entry``; wake the waiting coroutines
        of each event loop with one ``call_soon_threadsafe``."""
        with self._cond:
            members = tuple(entry.members)
        wake: dict[asyncio.AbstractEventLoop, list[asyncio.Future[None]]] = {}
        for member in members:
            future = member.deliver(batch)
            if future is not None:
                loop = future.get_loop()
                futures = wake.get(loop)
                if futures is None:
                    wake[loop] = [future]
                else:
                    futures.append(future)
        for loop, futures in wake.items():
            with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits
                loop.call_soon_threadsafe(_wake, futures)


def reader_of(ctx: Context) -> StreamReader:
    """The Context's one :class:`StreamReader` (built on first use)."""
    return ctx.extension("streams.reader", StreamReader)


#: What a follower yields: an event, a skipped entry, or ``None`` (an idle tick).
FollowItem = Any


class FollowCore:
    """One ``follow()``: its position, its place at the reader, its outage.

    Driven by a shell in a loop: :meth:`poll` (no I/O, nothing awaited) returns the
    next non-empty list of items to yield (events; :class:`Skipped` entries with
    ``skip_invalid``, or what ``render`` makes of each entry; ``None`` after ``idle``
    seconds without one), ``None`` when the follow is over, a number of seconds to
    :meth:`wait` / :meth:`wait_async` for the live tail, or :data:`NEEDS_IO`: then the
    plan :meth:`next_items` (which loops on :meth:`poll` itself) gives the next items.
    :meth:`close` (no I/O, safe anywhere) frees the follower's place at the reader.
    """

    def __init__(self, core: StreamCore, after: str | None, timeout: float | None,
                 until: Callable[[Event], bool] | None, *, idle: float | None = None,
                 stop: _Stop | None = None, skip_invalid: bool = False,
                 render: Render | None = None) -> None:
        self.core = core
        self.last = after
        self.timeout = timeout
        self.until = until
        self.idle = idle
        self.stop = stop
        self.skip_invalid = skip_invalid
        self.render = render
        self.policy = core.ctx.backend.retry
        self.grace = min(_GRACE, self.policy.deadline / 2)
        self.last_event = self.last_tick = time.monotonic()
        self.member: Member | None = None
        self.caught_up = False
        self.verified = False
        self.done = False
        self.pending: DecodeError | None = None
        self.failure: BackendUnavailable | None = None
        self.retries = 0

    def close(self) -> None:
        """Leave the reader (idempotent, no I/O)."""
        member, self.member = self.member, None
        if member is not None:
            member.release()
            reader_of(self.core.ctx).leave(member)

    def ends(self) -> float | None:
        """When the ``timeout`` runs out (``time.monotonic()``), or ``None``."""
        return None if self.timeout is None else self.last_event + self.timeout

    def poll(self) -> list[FollowItem] | float | _NeedsIO | None:
        """The next step, without I/O: items to yield now, seconds to wait for the live
        tail, :data:`NEEDS_IO`, or ``None`` (the follow is over).

        Raises what ``Stream.follow`` documents (a pending decode error; the outage a
        timeout ran out in).
        """
        while not self.done:
            now = time.monotonic()
            if ((self.pending is not None or self.stop is not None
                 or self.timeout is not None) and self._over(now)):
                return None
            if self.idle is not None and now >= self.last_tick + self.idle:
                self.last_tick = now
                return [None]
            member = self.member
            items = (None if member is None or not member.alive or not self.caught_up
                     else self._take_live(member))
            if items is None:
                return NEEDS_IO
            if items:
                return items
            if self.pending is None:
                return self._wait_time(now, self.ends())
            # else: _over raises it, now that nothing comes before it
        return None

    def wait(self, seconds: float) -> None:
        """Block for the live tail (:meth:`poll` said how long; may return early)."""
        member = self.member
        if member is not None:
            member.wait(seconds)

    def wait_async(self, seconds: float) -> Awaitable[None]:
        """Await the live tail (:meth:`poll` said how long; may return early)."""
        member = self.member
        return _sleep0() if member is None else member.wait_async(seconds)

    def next_items(self) -> Plan[list[FollowItem] | None]:
        """Plan: the next items to yield, or ``None`` when the follow is over.

        Raises what ``Stream.follow`` documents.
        """
        while True:
            step = self.poll()
            if step is None or isinstance(step, list):
                return step
            if isinstance(step, float):
                yield _Idle(self, step)
                continue
            now = time.monotonic()
            try:
                member = self.member
                if member is None or not member.alive:
                    yield from self._join()
                    continue
                items = yield from self._replay(now, self.ends())
            except BackendUnavailable as exc:
                yield from self._outage(exc)
                continue
            if items:
                return items

    def _over(self, now: float) -> bool:
        """Whether the follow ends now (stop set, or timed out with Redis answering);
        raises a pending decode error, or the outage a timeout ran out in."""
        if self.pending is not None:
            error, self.pending = self.pending, None
            self.done = True
            raise error
        if self.stop is not None and self.stop.is_set():
            return True
        ends = self.ends()
        if ends is not None and now >= ends and (self.caught_up or self.failure):
            if self.failure is not None:
                raise self.failure
            if self.verified:
                return True
            self.caught_up = False  # one last read from Redis before giving up
        return False

    def _join(self) -> Plan[None]:
        """Register with the reader and wait until the stream's wake-ups are live."""
        self.close()
        member = self.member = reader_of(self.core.ctx).join(self.core)
        self.caught_up = False
        entry = member.entry
        while not entry.ready.is_set():
            yield Wait(entry.ready, _STOP_POLL)
            if self.stop is not None and self.stop.is_set():
                return
        if entry.error is not None:
            self.close()
            raise entry.error

    def _replay(self, now: float, ends: float | None) -> Plan[list[FollowItem]]:
        """Read one batch after ``last`` from Redis, through the resume-point checks."""
        core = self.core
        deadline = None if ends is None else max(ends, now + self.grace)
        entries = yield ReadStep(_Read(core, self.last, BATCH, deadline))
        if self.failure is not None:
            core.log.info("stream.follow.resumed", after=self.last, attempts=self.retries)
            self.failure, self.retries = None, 0
        items: list[FollowItem] = []
        for entry_id, fields in entries:
            self._accept(text(entry_id), decode_item(core.name, entry_id, fields), items)
            if self.done or self.pending is not None:
                break
        if entries:
            self.last_event = self.last_tick = time.monotonic()
        self.caught_up = len(entries) < BATCH
        # A read made once the timeout ran out: Redis answered, nothing new; done.
        self.verified = self.caught_up and ends is not None and now >= ends
        return items

    def _take_live(self, member: Member) -> list[FollowItem] | None:
        """What the reader fetched since, continuing exactly after ``last``; ``None``
        when that is nothing and what was queued does not continue ``last`` (then
        ``caught_up`` is cleared: re-read from Redis)."""
        items: list[FollowItem] = []
        for batch in member.take():
            start = self._start_of(batch)
            if start is None:
                self.caught_up = False  # not a continuation: re-read from Redis
                break
            rendered = (None if self.render is None
                        else batch.rendered(self.render, self.core.name))
            whole = self._whole(batch, rendered)
            if whole is not None:  # the common case: no call per entry
                if start < len(batch.items):
                    items.extend(whole[start:] if start else whole)
                    self.last = batch.items[-1][0]
                continue
            for index in range(start, len(batch.items)):
                entry_id, value = batch.items[index]
                self._accept(entry_id, value, items,
                             None if rendered is None else rendered[index])
                if self.done or self.pending is not None:
                    break
            if self.done or self.pending is not None:
                break
        if items:
            self.last_event = self.last_tick = time.monotonic()
            self.verified = False
        elif not self.caught_up:
            return None
        return items

    def _start_of(self, batch: Batch) -> int | None:
        """Index of ``batch``'s first item after ``last`` (``None``: it does not
        continue ``last``: there may be a gap)."""
        after = batch.after
        if after == self.last:
            return 0
        if after is None or id_key(self.last) < id_key(after):
            return None
        last = id_key(self.last)
        start = 0
        while start < len(batch.items) and id_key(batch.items[start][0]) <= last:
            start += 1  # already yielded (by the replay)
        return start

    def _whole(self, batch: Batch, rendered: tuple[Any, ...] | None,
               ) -> tuple[Any, ...] | None:
        """Every item of ``batch`` as this follower yields it, when no entry needs a
        look of its own (no ``until``; nothing to raise); else ``None``."""
        if self.until is not None:
            return None
        if rendered is None:
            return batch.events
        return rendered if self.skip_invalid or batch.events is not None else None

    def _accept(self, entry_id: str, value: Event | DecodeError,
                items: list[FollowItem], rendered: Any = None) -> None:
        """Take one entry after ``last``: append it (or ``rendered``, or its rendering)
        to ``items``, or note the decode error to raise once ``items`` are yielded."""
        if isinstance(value, DecodeError) and not self.skip_invalid:
            self.pending = value  # raised once the items before it are yielded
            return
        if self.render is not None:
            items.append(self.render(self.core.name, entry_id, value)
                         if rendered is None else rendered)
        elif isinstance(value, DecodeError):
            items.append(Skipped(entry_id, value))
        else:
            items.append(value)
        self.last = entry_id
        if (self.until is not None and not isinstance(value, DecodeError)
                and self.until(value)):
            self.done = True

    def _wait_time(self, now: float, ends: float | None) -> float:
        wait = _WAIT_MAX
        if ends is not None:
            wait = min(wait, ends - now)
        if self.idle is not None:
            wait = min(wait, self.last_tick + self.idle - now)
        if self.stop is not None:
            wait = min(wait, _STOP_POLL)
        return max(wait, 0.0)

    def _outage(self, exc: BackendUnavailable) -> Plan[None]:
        """Note a failed call and back off; the next read resumes after ``last``."""
        if self.core.ctx.closed:
            raise exc
        if self.failure is None:
            self.core.log.warning("stream.follow.interrupted", after=self.last,
                                  error=str(exc))
        self.failure, self.caught_up = exc, False
        self.retries += 1
        pause = self.policy.backoff(self.retries)
        now = time.monotonic()
        ends = self.ends()
        if ends is not None:
            pause = min(pause, max(0.0, ends - now))
        if self.idle is not None:
            pause = min(pause, max(0.0, self.last_tick + self.idle - now))
        if self.stop is not None:
            pause = min(pause, _STOP_POLL)
        yield Sleep(pause)


@dataclass(slots=True, eq=False)
class _Idle(Step):
    """Wait for the live tail of ``follow`` up to ``seconds`` (may end early)."""

    follow: FollowCore
    seconds: float

    def run(self, ctx: Context) -> None:  # noqa: ARG002
        self.follow.wait(self.seconds)

    async def arun(self, ctx: Context) -> None:  # noqa: ARG002
        await self.follow.wait_async(self.seconds)
