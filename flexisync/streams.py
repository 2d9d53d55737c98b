"""``Stream``: a durable, ordered log of events that late readers replay from an id.

Where :mod:`flexisync.events` is live and at most once, a stream keeps its events (up
to ``maxlen``, for ``ttl`` seconds after the last append) so that a reader that starts
late or reconnects resumes after the last event id it saw: it gets every retained event
after that id exactly once, in order, with no gap between the replay and the live tail.
When the events right after the resume point were already trimmed away, the reader is
told (:class:`~flexisync.EventsTrimmed`) instead of silently skipping them.

Redis layout: one Redis stream at ``ns:stream:{name}``; each entry has the fields
``type``, ``data`` (JSON), ``time`` (epoch seconds) and ``source`` (``host:pid``). The
entry id (``"<ms>-<seq>"``, assigned by Redis, strictly increasing) is the event id.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections.abc import Callable, Generator, Iterator
from typing import TYPE_CHECKING, Any, cast

import redis

from flexisync._durations import Duration, optional_seconds, to_ms
from flexisync._keys import validate_name
from flexisync.errors import ConfigError, EventsTrimmed
from flexisync.events import Event, _ids, encode_data

if TYPE_CHECKING:
    from flexisync.coordinator import Coordinator

__all__ = ["Stream", "parse_id"]

_ID = re.compile(r"(\d{1,20})-(\d{1,20})")
_U64 = 2**64
_BATCH = 500
_BLOCK_MAX = 5.0  # seconds one XREAD BLOCK may wait; well under the socket timeout


def parse_id(value: object, what: str = "event id") -> str:
    """Validate a stream event id (``"<ms>-<seq>"``) and return it normalized.

    Raises:
        ConfigError: (a ``ValueError``) ``value`` is not a string of that form, or a
            part does not fit in 64 bits.
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
        ttl: seconds after the last append at which the whole stream expires, or
            ``None`` for never.
    """

    def __init__(self, coordinator: Coordinator, name: str, *, maxlen: int | None,
                 ttl: float | None) -> None:
        if maxlen is not None and (isinstance(maxlen, bool) or not isinstance(maxlen, int)
                                   or maxlen < 1):
            raise ConfigError(f"maxlen must be an int >= 1 or None, got {maxlen!r}")
        self._backend = coordinator._backend
        self.name = validate_name(name, "stream name")
        self.maxlen = maxlen
        self.ttl = optional_seconds(ttl, "ttl")
        self._key = coordinator._keys.key("stream", name)

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
        body = encode_data(data)
        _, source = _ids.next()
        fields = {"type": type, "data": body, "time": repr(time.time()), "source": source}
        key, maxlen = self._key, self.maxlen
        # XADD is not idempotent: a blind retry could append twice.
        if self.ttl is None:
            raw = self._backend.call(
                "stream.append",
                lambda c: c.xadd(key, fields, maxlen=maxlen, approximate=True),
                idempotent=False)
        else:
            args: list[Any] = [maxlen or 0, to_ms(self.ttl)]
            for item in fields.items():
                args.extend(item)
            raw = self._backend.run_script("stream.append", "stream_append", [key], args,
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
                ``count`` is not an int >= 1.
            EventsTrimmed: ``after`` is older than the oldest retained event and the
                stream has trimmed events away, so events right after ``after`` may be
                lost. ``.oldest`` is the oldest retained id.
        """
        start = None if after is None else parse_id(after, "after")
        if count is not None and (isinstance(count, bool) or not isinstance(count, int)
                                  or count < 1):
            raise ConfigError(f"count must be an int >= 1 or None, got {count!r}")
        key = self._key
        if start is None or start == "0-0":
            raw = self._backend.call("stream.read_after",
                                     lambda c: c.xrange(key, "-", "+", count=count))
            return [self._event(entry_id, fields) for entry_id, fields in raw]
        if start == f"{_U64 - 1}-{_U64 - 1}":
            return []
        reply = self._backend.run_script("stream.read_after", "stream_read", [key],
                                         [start, count or 0])
        trimmed, oldest, entries = reply
        if int(trimmed):
            raise EventsTrimmed(self.name, start, _text(oldest) if oldest else None)
        return [self._event(entry[0], entry[1]) for entry in entries]

    def follow(self, after: str | None = None, *, timeout: Duration | None = None,
               until: Callable[[Event], bool] | None = None) -> Iterator[Event]:
        """Replay the events after ``after``, then wait for new ones and yield them live.

        Every event retained after ``after`` is yielded exactly once, in order, with no
        gap and no duplicate between the replay and the live part. Waiting uses
        ``XREAD BLOCK`` on a connection of the generator's own (closed when the
        generator is closed or garbage-collected).

        Args:
            after: resume point (see :meth:`read_after`); ``None`` starts at the oldest
                retained event.
            timeout: stop when this many seconds pass without a new event (``None``:
                follow forever).
            until: stop right after yielding an event for which ``until(event)`` is true.

        Raises:
            ConfigError: malformed ``after`` or bad ``timeout`` (raised at the call,
                before iteration starts).
            EventsTrimmed: the reader fell behind trimming (while replaying, or while
                following a stream trimmed faster than it reads).
        """
        start = None if after is None else parse_id(after, "after")
        limit = optional_seconds(timeout, "timeout", allow_zero=True)
        if until is not None and not callable(until):
            raise ConfigError(f"until must be callable, not {type(until).__name__}")
        return cast("Iterator[Event]", self._follow(start, limit, until, idle=None))

    def _follow(self, after: str | None, timeout: float | None,
                until: Callable[[Event], bool] | None, *,
                idle: float | None) -> Generator[Event | None, None, None]:
        """:meth:`follow`, yielding ``None`` every ``idle`` seconds without an event."""
        last = after
        blocker: Any = None
        last_event = last_tick = time.monotonic()
        caught_up = False
        try:
            while True:
                if not caught_up:
                    events = self.read_after(last, count=_BATCH)
                    for event in events:
                        yield event
                        last = event.id
                        if until is not None and until(event):
                            return
                    if events:
                        last_event = last_tick = time.monotonic()
                    caught_up = len(events) < _BATCH
                    continue
                now = time.monotonic()
                wait = _BLOCK_MAX
                if timeout is not None:
                    left = last_event + timeout - now
                    if left <= 0:
                        return
                    wait = min(wait, left)
                if idle is not None:
                    left = last_tick + idle - now
                    if left <= 0:
                        yield None
                        last_tick = time.monotonic()
                        continue
                    wait = min(wait, left)
                if blocker is None:
                    blocker = _blocking_client(self._backend.client)
                # Only a wake-up: the new events are read through the trim check.
                caught_up = not self._wait_for_more(blocker, last or "0-0", wait)
        finally:
            if blocker is not None and blocker is not self._backend.client:
                with contextlib.suppress(redis.RedisError, OSError):
                    blocker.close()

    def _wait_for_more(self, blocker: Any, last: str, wait: float) -> bool:
        """Block up to ``wait`` seconds for an entry after ``last``; True if one exists."""
        key = self._key
        block_ms = max(1, int(wait * 1000))
        reply = self._backend.call(
            "stream.follow", lambda _c: blocker.xread({key: last}, count=1, block=block_ms))
        return bool(reply)

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
        """An :class:`Event` from one entry (redis-py's dict or a script's flat list)."""
        event_id = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
        if isinstance(raw_fields, dict):
            fields = raw_fields
        else:
            items = iter(raw_fields)
            fields = dict(zip(items, items, strict=False))
        data = fields.get(b"data")
        if data is not None:  # the client returns bytes (flexisync's own client)
            kind, stamp, source = fields.get(b"type"), fields.get(b"time"), fields.get(b"source")
        else:
            data = fields.get("data")
            kind, stamp, source = fields.get("type"), fields.get("time"), fields.get("source")
        if data is None or kind is None:
            # An entry some other program added: hand over its fields as they are.
            return Event(id=event_id, topic=self.name, type="message",
                         data={_text(k): _text(v) for k, v in fields.items()},
                         time=int(event_id.split("-", 1)[0]) / 1000, source="")
        try:
            value = json.loads(data)
        except ValueError:
            value = _text(data)
        try:
            when = float(stamp) if stamp is not None else int(event_id.split("-", 1)[0]) / 1000
        except ValueError:
            when = int(event_id.split("-", 1)[0]) / 1000
        return Event(id=event_id, topic=self.name, type=_text(kind), data=value, time=when,
                     source=_text(source) if source is not None else "")


def _blocking_client(client: Any) -> Any:
    """A client with a connection of its own for ``XREAD BLOCK``.

    Blocking on a pooled connection would hold it for the whole wait; the socket
    timeout is set well above the longest block so a wait is never cut short.
    """
    pool = getattr(client, "connection_pool", None)
    kwargs = dict(getattr(pool, "connection_kwargs", {}))
    if pool is None or "server" in kwargs:  # fakeredis (memory://): share the client
        return client
    kwargs["socket_timeout"] = _BLOCK_MAX + 5.0
    return redis.Redis(connection_pool=redis.ConnectionPool(
        connection_class=pool.connection_class, max_connections=1, **kwargs))
