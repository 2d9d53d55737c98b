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

Redis layout: one Redis stream at ``ns:stream:{name}``; each entry has the fields
``type``, ``data`` (JSON), ``time`` (epoch seconds), ``source`` (``host:pid``) and
``prev`` (the id of the entry that was newest when it was appended, ``""`` for the
first: what makes the trimming check exact, since Redis trims whole nodes and keeps no
record of what it removed). The entry id (``"<ms>-<seq>"``, assigned by Redis, strictly
increasing) is the event id.
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import redis

from flexisync._codec import dumps, loads
from flexisync._durations import Duration, optional_seconds, to_ms
from flexisync._keys import validate_name
from flexisync._log import get_logger
from flexisync.errors import (
    BackendUnavailable,
    ConfigError,
    DecodeError,
    EventsTrimmed,
    UnknownResumePoint,
)
from flexisync.events import Event, _ids

if TYPE_CHECKING:
    from flexisync.coordinator import Coordinator

__all__ = ["DEFAULT_TTL", "Stream", "UnknownResumePoint", "parse_id"]  # re-exported error

DEFAULT_TTL = 7 * 24 * 3600.0
"""Seconds after its last append at which a stream expires unless told otherwise (7 days)."""

_ID = re.compile(r"([0-9]{1,20})-([0-9]{1,20})")
_U64 = 2**64
_BATCH = 500
_BLOCK_MAX = 5.0  # seconds one XREAD BLOCK may wait; well under the socket timeout
_GRACE = 1.0  # seconds a round trip may take beyond a block or a follow() timeout
_STOP_POLL = 1.0  # with a stop event, block at most this long between checks of it


def parse_id(value: object, what: str = "event id") -> str:
    """Validate a stream event id (``"<ms>-<seq>"``) and return it normalized.

    Raises:
        ConfigError: (a ``ValueError``) ``value`` is not a string of that form (ASCII
            digits only), or a part does not fit in 64 bits.
    """
    if not isinstance(value, str):
        raise ConfigError(f"{what} must be a str like '1700000000000-0', "
                          f"not {type(value).__name__}")
    match = _ID.fullmatch(value)
    if match is None:
        raise ConfigError(f"{what} {value[:60]!r} is malformed; expected '<ms>-<seq>'")
    ms, seq = int(match[1]), int(match[2])
    if ms >= _U64 or seq >= _U64:
        raise ConfigError(f"{what} {value[:60]!r} is out of range")
    return f"{ms}-{seq}"


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


@dataclass(frozen=True)
class _Skipped:
    """Yielded by ``_follow(skip_invalid=True)`` for an entry that does not decode."""

    id: str
    error: DecodeError


class Stream:
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

    def __init__(self, coordinator: Coordinator, name: str, *, maxlen: int | None,
                 ttl: Duration | None = DEFAULT_TTL) -> None:
        if maxlen is not None and (isinstance(maxlen, bool) or not isinstance(maxlen, int)
                                   or maxlen < 1):
            raise ConfigError(f"maxlen must be an int >= 1 or None, got {maxlen!r}")
        self._backend = coordinator._backend
        self.name = validate_name(name, "stream name")
        self.maxlen = maxlen
        self.ttl = optional_seconds(ttl, "ttl")
        self._key = coordinator._keys.key("stream", name)
        self._log = get_logger("streams", stream=self.name)

    def __repr__(self) -> str:
        return f"<Stream {self.name!r} maxlen={self.maxlen} ttl={self.ttl}>"

    # --- writing -------------------------------------------------------------------

    def append(self, data: Any = None, *, type: str = "message") -> str:
        """Append an event; returns its id (``"<ms>-<seq>"``), greater than every earlier id.

        Trims the stream to about ``maxlen`` events and, with a ``ttl``, resets the
        stream's expiry, in the same atomic step.

        Raises:
            TypeError: ``data`` is not JSON-serializable (nothing is written).
            ConfigError: ``type`` breaks the name rule.
        """
        validate_name(type, "event type")
        body = dumps(data, "data")
        _, source = _ids.next()
        args: list[Any] = [self.maxlen or 0, 0 if self.ttl is None else to_ms(self.ttl),
                           "type", type, "data", body, "time", repr(time.time()),
                           "source", source]
        # XADD is not idempotent: a blind retry could append twice.
        raw = self._backend.run_script("stream.append", "stream_append", [self._key], args,
                                       idempotent=False)
        return _text(raw)

    def delete(self) -> bool:
        """Delete the stream and all its events; True if it existed."""
        key = self._key
        return bool(self._backend.call("stream.delete", lambda c: c.delete(key)))

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
        start = None if after is None else parse_id(after, "after")
        if count is not None and (isinstance(count, bool) or not isinstance(count, int)
                                  or count < 1):
            raise ConfigError(f"count must be an int >= 1 or None, got {count!r}")
        return [self._event(entry_id, fields)
                for entry_id, fields in self._read(start, count, None)]

    def _read(self, after: str | None, count: int | None,
              deadline: float | None) -> list[tuple[Any, Any]]:
        """The raw entries after ``after`` (validated), with the resume-point checks."""
        key = self._key
        if after is None or after == "0-0":
            return cast("list[tuple[Any, Any]]", self._backend.call(
                "stream.read_after", lambda c: c.xrange(key, "-", "+", count=count),
                deadline=deadline))
        status, oldest, entries, newest = self._backend.run_script(
            "stream.read_after", "stream_read", [key], [after, count or 0],
            deadline=deadline)
        if int(status) == 1:
            raise EventsTrimmed(self.name, after, _text(oldest) if oldest else None)
        if int(status) == 2:
            raise UnknownResumePoint(self.name, after, _text(newest) if newest else None)
        return [(entry[0], entry[1]) for entry in entries]

    def follow(self, after: str | None = None, *, timeout: Duration | None = None,
               until: Callable[[Event], bool] | None = None) -> Generator[Event, None, None]:
        """Replay the events after ``after``, then wait for new ones and yield them live.

        Every event retained after ``after`` is yielded exactly once, in order, with no
        gap and no duplicate between the replay and the live part. Waiting uses
        ``XREAD BLOCK`` on a connection of the generator's own (closed when the
        generator is closed or garbage-collected).

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
        start = None if after is None else parse_id(after, "after")
        limit = optional_seconds(timeout, "timeout", allow_zero=True)
        if until is not None and not callable(until):
            raise ConfigError(f"until must be callable, not {type(until).__name__}")
        return cast("Generator[Event, None, None]",
                    self._follow(start, limit, until, idle=None))

    def _follow(self, after: str | None, timeout: float | None,
                until: Callable[[Event], bool] | None, *, idle: float | None,
                stop: threading.Event | None = None, skip_invalid: bool = False,
                ) -> Generator[Event | _Skipped | None, None, None]:
        """:meth:`follow`, yielding ``None`` every ``idle`` seconds without an event.

        With ``stop``, it returns within about :data:`_STOP_POLL` s once ``stop`` is
        set. With ``skip_invalid``, an entry that does not decode is yielded as a
        :class:`_Skipped` and passed over instead of raising.
        """
        return _Follower(self, after, timeout, until, idle=idle, stop=stop,
                         skip_invalid=skip_invalid).run()

    def last_id(self) -> str | None:
        """The id of the newest retained event, or ``None`` when the stream is empty."""
        key = self._key
        raw = self._backend.call("stream.last_id", lambda c: c.xrevrange(key, "+", "-", count=1))
        return _text(raw[0][0]) if raw else None

    def __len__(self) -> int:
        """How many events the stream retains now."""
        key = self._key
        return int(self._backend.call("stream.len", lambda c: c.xlen(key)))

    # --- decoding ------------------------------------------------------------------

    def _event(self, entry_id: Any, raw_fields: Any) -> Event:
        """An :class:`Event` from one entry (redis-py's dict or a script's flat list).

        Raises:
            DecodeError: the entry has flexisync's ``type`` and ``data`` fields but the
                data is not JSON (or too deep) or the type breaks the name rule.
        """
        event_id = _text(entry_id)
        if isinstance(raw_fields, dict):
            fields = {_text(k): v for k, v in raw_fields.items()}
        else:
            items = iter(raw_fields)
            fields = {_text(k): v for k, v in zip(items, items, strict=False)}
        data, kind = fields.get("data"), fields.get("type")
        if data is None or kind is None:
            # An entry some other program added: hand over its fields as they are.
            return Event(id=event_id, topic=self.name, type="message",
                         data={k: _text(v) for k, v in fields.items()},
                         time=int(event_id.split("-", 1)[0]) / 1000, source="")
        what = f"{self.name}#{event_id}"
        value = loads(data, what)
        kind_text = _text(kind)
        try:
            validate_name(kind_text, "event type")
        except ConfigError as exc:  # it becomes an SSE "event:" line: no newlines
            raise DecodeError(what, str(exc)) from None
        stamp, source = fields.get("time"), fields.get("source")
        try:
            when = float(stamp) if stamp is not None else int(event_id.split("-", 1)[0]) / 1000
        except ValueError:
            when = int(event_id.split("-", 1)[0]) / 1000
        return Event(id=event_id, topic=self.name, type=kind_text, data=value, time=when,
                     source=_text(source) if source is not None else "")


class _Follower:
    """One :meth:`Stream.follow`: where it is, its blocking connection, its outage."""

    def __init__(self, stream: Stream, after: str | None, timeout: float | None,
                 until: Callable[[Event], bool] | None, *, idle: float | None,
                 stop: threading.Event | None, skip_invalid: bool) -> None:
        self.stream = stream
        self.last = after
        self.timeout = timeout
        self.until = until
        self.idle = idle
        self.stop = stop
        self.skip_invalid = skip_invalid
        policy = stream._backend.retry
        self.policy = policy
        self.block_cap = min(_BLOCK_MAX, max(policy.deadline / 2, 0.01))
        if stop is not None:
            self.block_cap = min(self.block_cap, _STOP_POLL)
        self.grace = min(_GRACE, policy.deadline / 2)
        self.last_event = self.last_tick = time.monotonic()
        self.caught_up = False
        self.done = False
        self.failure: BackendUnavailable | None = None
        self.retries = 0
        self.blocker: Any = None

    def ends(self) -> float | None:
        """When the ``timeout`` runs out (``time.monotonic()``), or ``None``."""
        return None if self.timeout is None else self.last_event + self.timeout

    def run(self) -> Generator[Event | _Skipped | None, None, None]:
        """The generator: replay, then block for more, riding out outages."""
        try:
            while not self.done:
                if self.stop is not None and self.stop.is_set():
                    return
                now = time.monotonic()
                if self.idle is not None and now >= self.last_tick + self.idle:
                    yield None
                    self.last_tick = time.monotonic()
                    continue
                ends = self.ends()
                if ends is not None and now >= ends \
                        and (self.caught_up or self.failure is not None):
                    if self.failure is not None:
                        raise self.failure
                    return
                try:
                    if self.caught_up:
                        self.caught_up = not self.wait_for_more(now, ends)
                    else:
                        yield from self.replay(now, ends)
                except BackendUnavailable as exc:
                    self.outage(exc)
        finally:
            blocker = self.blocker
            if blocker is not None and blocker is not self.stream._backend.client:
                with contextlib.suppress(redis.RedisError, OSError):
                    blocker.close()

    def replay(self, now: float, ends: float | None,
               ) -> Generator[Event | _Skipped | None, None, None]:
        """Read and yield one batch after ``last``, through the resume-point checks."""
        stream = self.stream
        deadline = None if ends is None else max(ends, now + self.grace)
        entries = stream._read(self.last, _BATCH, deadline)
        if self.failure is not None:
            stream._log.info("stream.follow.resumed", after=self.last, attempts=self.retries)
            self.failure, self.retries = None, 0
        for entry_id, fields in entries:
            try:
                event = stream._event(entry_id, fields)
            except DecodeError as exc:
                if not self.skip_invalid:
                    raise
                self.last = _text(entry_id)
                yield _Skipped(self.last, exc)
                continue
            yield event
            self.last = event.id
            if self.until is not None and self.until(event):
                self.done = True
                return
        if entries:
            self.last_event = self.last_tick = time.monotonic()
        self.caught_up = len(entries) < _BATCH

    def wait_for_more(self, now: float, ends: float | None) -> bool:
        """Block until an entry after ``last`` may exist; True if one does.

        Only a wake-up: the new entries are then read by :meth:`replay`. The call's
        deadline covers the block time plus ``grace`` for the round trip, so a hung
        server is noticed that long after the block would have ended.
        """
        wait = self.block_cap
        if ends is not None:
            wait = min(wait, ends - now)
        if self.idle is not None:
            wait = min(wait, self.last_tick + self.idle - now)
        if self.blocker is None:
            self.blocker = _blocking_client(self.stream._backend.client)
        blocker, key, last = self.blocker, self.stream._key, self.last or "0-0"
        block_ms = max(1, int(wait * 1000))
        reply = self.stream._backend.call(
            "stream.follow", lambda _c: blocker.xread({key: last}, count=1, block=block_ms),
            deadline=time.monotonic() + block_ms / 1000 + self.grace)
        return bool(reply)

    def outage(self, exc: BackendUnavailable) -> None:
        """Note a failed call and back off; the next read resumes after ``last``."""
        if self.failure is None:
            self.stream._log.warning("stream.follow.interrupted", after=self.last,
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
            self.stop.wait(pause)
        else:
            time.sleep(pause)


def _blocking_client(client: Any) -> Any:
    """A client with a connection of its own for ``XREAD BLOCK``.

    Blocking on a pooled connection would hold it for the whole wait; the socket
    timeout is set well above the longest block (each call's deadline narrows it).
    """
    pool = getattr(client, "connection_pool", None)
    kwargs = dict(getattr(pool, "connection_kwargs", {}))
    if pool is None or "server" in kwargs:  # fakeredis (memory://): share the client
        return client
    kwargs["socket_timeout"] = _BLOCK_MAX + 5.0
    return redis.Redis(connection_pool=redis.ConnectionPool(
        connection_class=pool.connection_class, max_connections=1, **kwargs))
