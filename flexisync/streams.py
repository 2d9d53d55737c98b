"""``Stream``: a durable, ordered log of events that late readers replay from an id.

Where :mod:`flexisync.events` is live and at most once, a stream keeps its events (up
to ``maxlen``, for ``ttl`` seconds after the last append: 7 days unless chosen) so that
a reader that starts late or reconnects resumes after the last event id it saw: it gets
every retained event after that id exactly once, in order, with no gap between the
replay and the live tail. A resume point is checked, never guessed at:

* when an event after it was trimmed away, the reader is told
  (:class:`~flexisync.EventsTrimmed`) instead of silently skipping it, and only then;
* an id the stream never issued that lies beyond its newest one (a fabricated or
  foreign ``Last-Event-ID``) raises :class:`UnknownResumePoint` instead of answering
  "caught up" while withholding every new event.

Following scales: in one process, one reader per stream fetches each new entry once
and hands it to every follower (:mod:`flexisync._core.followers`), so N followers of M
streams hold a constant number of connections. The logic lives once in
:mod:`flexisync._core.streams`; this module only runs it with blocking I/O.

Redis layout: one Redis stream at ``ns:stream:{name}``; each entry has the fields
``type``, ``data`` (JSON), ``time`` (epoch seconds), ``source`` (``host:pid``) and
``prev`` (the id of the entry that was newest when it was appended, ``""`` for the
first: what makes the trimming check exact, since Redis trims whole nodes and keeps no
record of what it removed). The entry id (``"<ms>-<seq>"``, assigned by Redis, strictly
increasing) is the event id.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import TYPE_CHECKING, Any

from flexisync._core.followers import FollowCore
from flexisync._core.plan import run
from flexisync._core.streams import DEFAULT_TTL, StreamShell, check_follow, parse_id
from flexisync._durations import Duration
from flexisync.errors import UnknownResumePoint
from flexisync.events import Event

if TYPE_CHECKING:
    from flexisync._core.context import Context

__all__ = ["DEFAULT_TTL", "Stream", "UnknownResumePoint", "parse_id"]  # re-exported error


class Stream(StreamShell):
    """A durable, ordered, resumable log of events shared by every process.

    Build it with ``coordinator.stream(name, maxlen=..., ttl=...)``. Every method may
    raise :class:`~flexisync.BackendUnavailable` when Redis cannot be reached within the
    retry budget and :class:`~flexisync.BackendError` when Redis rejects a command.

    Attributes:
        name: the stream's name.
        maxlen: about how many events are retained (trimming is approximate, ``MAXLEN
            ~``: never fewer than ``maxlen`` are kept, a few more may be); ``None``
            keeps every event.
        ttl: seconds after the last append at which the whole stream expires
            (:data:`DEFAULT_TTL`, 7 days, unless chosen), or ``None`` for never (only
            when asked for explicitly).
    """

    # --- writing -------------------------------------------------------------------

    def append(self, data: Any = None, *, type: str = "message") -> str:
        """Append an event; returns its id (``"<ms>-<seq>"``), greater than every earlier id.

        Trims the stream to about ``maxlen`` events and, with a ``ttl``, resets the
        stream's expiry, in the same atomic step (which also wakes this stream's
        followers in every process).

        Raises:
            TypeError: ``data`` is not JSON-serializable (nothing is written).
            ConfigError: ``type`` breaks the name rule.
        """
        return run(self._ctx, self._core.append(data, type))

    def delete(self) -> bool:
        """Delete the stream and all its events; True if it existed."""
        return run(self._ctx, self._core.delete())

    # --- reading -------------------------------------------------------------------

    def read_after(self, after: str | None = None, *, count: int | None = None) -> list[Event]:
        """Retained events with an id strictly greater than ``after``, oldest first.

        Args:
            after: the last id the reader has seen; ``None`` (or ``"0-0"``) reads from
                the oldest retained event.
            count: at most this many events (``None``: all).

        Returns:
            The events, oldest first; ``[]`` when ``after`` is the newest id, or the
            stream is empty or does not exist.

        Raises:
            ConfigError: ``after`` is not an id of the form ``"<ms>-<seq>"``, or
                ``count`` is not an int >= 1 (before Redis is touched).
            EventsTrimmed: an event with an id after ``after`` was trimmed away, so
                reading on would skip it. Raised exactly then: a resume point older
                than the oldest retained event is fine when nothing after it was ever
                removed. ``.oldest`` is the oldest retained id.
            UnknownResumePoint: (an ``EventsTrimmed``) ``after`` lies beyond every id
                the stream has issued (for a stream that does not exist: beyond the
                server's clock), so it cannot be a point of this stream.
            DecodeError: an entry has flexisync's fields but its ``data`` is not
                JSON (or nests deeper than 512 levels) or its ``type`` breaks the name
                rule; the error's ``key`` is ``"<stream>#<entry id>"``.
        """
        return run(self._ctx, self._core.read_after(after, count))

    def follow(self, after: str | None = None, *, timeout: Duration | None = None,
               until: Callable[[Event], bool] | None = None) -> Generator[Event, None, None]:
        """Replay the events after ``after``, then wait for new ones and yield them live.

        Every event retained after ``after`` is yielded exactly once, in order, with no
        gap and no duplicate between the replay and the live part. Waiting holds no
        connection of its own: one reader per stream in this process fetches each new
        entry once and hands it to every follower (close the generator, or let it be
        garbage-collected, to leave).

        Redis outages do not end it: while Redis is unreachable it keeps retrying with
        backoff, and once Redis answers again it resumes right after the last event it
        yielded, with no duplicate and no gap. Only when ``timeout`` seconds pass
        without a new event while Redis is still unreachable does it raise.

        Args:
            after: resume point (see :meth:`read_after`); ``None`` starts at the oldest
                retained event.
            timeout: stop when this many seconds pass without a new event (``None``:
                follow forever). A bound: the generator returns or raises within about
                ``timeout`` + 1 s of the last event.
            until: stop right after yielding an event for which ``until(event)`` is true.

        Raises:
            ConfigError: malformed ``after`` or bad ``timeout`` (raised at the call,
                before iteration starts).
            EventsTrimmed: the reader fell behind trimming (while replaying, or while
                following a stream trimmed faster than it reads).
            UnknownResumePoint: ``after`` was never issued by this stream and lies
                beyond its newest id (see :meth:`read_after`).
            DecodeError: an entry that does not decode (see :meth:`read_after`); every
                event before it was yielded; resume after the id in its ``key`` to
                skip it.
            BackendUnavailable: Redis stayed unreachable until ``timeout`` ran out.
        """
        start, limit = check_follow(after, timeout, until)
        return iterate(self._ctx, FollowCore(self._core, start, limit, until))

    def last_id(self) -> str | None:
        """The id of the newest retained event, or ``None`` when the stream is empty."""
        return run(self._ctx, self._core.last_id())

    def length(self) -> int:
        """How many events the stream retains now (as ``len(stream)``)."""
        return run(self._ctx, self._core.length())

    def __len__(self) -> int:
        """How many events the stream retains now."""
        return self.length()


def iterate(ctx: Context, source: Any) -> Generator[Any, None, None]:
    """Yield what ``source`` (a ``FollowCore`` or ``FrameSource``) gives, with blocking
    I/O: the items ``poll()`` has ready, else a blocking ``wait()`` or the
    ``next_items()`` plan, until it says the end (``None``); ``source.close()`` when
    done, closed or garbage-collected."""
    try:
        while True:
            step = source.poll()
            if isinstance(step, list):
                yield from step
            elif isinstance(step, float):
                source.wait(step)
            elif step is None or (items := run(ctx, source.next_items())) is None:
                return
            else:
                yield from items
    finally:
        source.close()
