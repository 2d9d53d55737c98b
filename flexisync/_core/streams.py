"""The logic of a durable stream, once, for both shells.

Everything a :class:`~flexisync.streams.Stream` and a
:class:`~flexisync.aio.streams.AsyncStream` do lives here as plans (see
:mod:`flexisync._core.plan`): id parsing, argument checks, the key and wake-up channel,
the resume-point checks of ``stream_read.lua`` (:class:`~flexisync.EventsTrimmed`,
:class:`~flexisync.UnknownResumePoint`) and entry decoding. Following (replay, then the
live tail fanned out by one reader per stream) is in :mod:`flexisync._core.followers`.

Redis layout: one Redis stream at ``ns:stream:{name}``; each entry has the fields
``type``, ``data`` (JSON), ``time`` (epoch seconds), ``source`` (``host:pid``) and
``prev`` (the id of the entry that was newest when it was appended, ``""`` for the
first: what makes the trimming check exact). ``stream_append.lua`` also PUBLISHes the
new id on the wake-up channel ``ns:stream:name`` (a wake-up only).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from flexisync._codec import dumps, loads
from flexisync._core.events import Event, _ids, _type_seen
from flexisync._core.plan import Call, Plan, Script
from flexisync._core.tally import tally_of
from flexisync._durations import Duration, optional_seconds, to_ms
from flexisync._keys import validate_name
from flexisync._log import get_logger
from flexisync.errors import ConfigError, DecodeError, EventsTrimmed, UnknownResumePoint

if TYPE_CHECKING:
    from flexisync._core.context import Context

__all__ = ["BATCH", "DEFAULT_TTL", "Skipped", "StreamCore", "StreamShell", "check_follow",
           "decode_event", "decode_item", "id_key", "parse_id", "read_entries", "text"]

DEFAULT_TTL = 7 * 24 * 3600.0
"""Seconds after its last append at which a stream expires unless told otherwise (7 days)."""

#: Entries read per round trip while replaying or fetching the live tail.
BATCH = 500

_ID = re.compile(r"([0-9]{1,20})-([0-9]{1,20})")
_U64 = 2**64


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


def id_key(value: str | None) -> tuple[int, int]:
    """A normalized id (or ``None``, before every id) as a sortable pair."""
    if value is None:
        return (0, 0)
    ms, _, seq = value.partition("-")
    return (int(ms), int(seq))


def text(value: Any) -> str:
    """``value`` as ``str`` (bytes decoded as UTF-8, errors replaced)."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


@dataclass(frozen=True, slots=True)
class Skipped:
    """An entry that does not decode, passed over by a follower with ``skip_invalid``."""

    id: str
    error: DecodeError


def check_follow(after: str | None, timeout: Duration | None,
                 until: Callable[[Event], bool] | None) -> tuple[str | None, float | None]:
    """Validate ``follow()``'s arguments; the normalized ``after`` and ``timeout`` (s).

    Raises:
        ConfigError: malformed ``after``, bad ``timeout``, or ``until`` not callable.
    """
    start = None if after is None else parse_id(after, "after")
    limit = optional_seconds(timeout, "timeout", allow_zero=True)
    if until is not None and not callable(until):
        raise ConfigError(f"until must be callable, not {type(until).__name__}")
    return start, limit


def read_entries(name: str, key: str, after: str | None, count: int | None,
                 deadline: float | None) -> Plan[list[tuple[Any, Any]]]:
    """The raw entries after ``after`` (validated), through the resume-point checks.

    Raises:
        EventsTrimmed: an entry after ``after`` was removed.
        UnknownResumePoint: ``after`` lies beyond every id the stream issued.
    """
    if after is None or after == "0-0":
        reply = yield Call("stream.read_after",
                           lambda c: c.xrange(key, "-", "+", count=count), deadline=deadline)
        return cast("list[tuple[Any, Any]]", reply)
    status, oldest, entries, newest = yield Script(
        "stream.read_after", "stream_read", [key], [after, count or 0], deadline=deadline)
    if int(status) == 1:
        raise EventsTrimmed(name, after, text(oldest) if oldest else None)
    if int(status) == 2:
        raise UnknownResumePoint(name, after, text(newest) if newest else None)
    return [(entry[0], entry[1]) for entry in entries]


def decode_event(name: str, entry_id: Any, raw_fields: Any) -> Event:
    """An :class:`Event` from one entry (redis-py's dict or a script's flat list).

    Raises:
        DecodeError: the entry has flexisync's ``type`` and ``data`` fields but the
            data is not JSON (or too deep) or the type breaks the name rule; its
            ``key`` is ``"<stream>#<entry id>"``.
    """
    if type(raw_fields) is list and raw_fields and type(raw_fields[0]) is bytes:
        # The common case (a script's flat list of bytes): pair it up in C and look the
        # fields up by their bytes (only b"data" decodes to "data", replacement or not).
        items = iter(raw_fields)
        raw = dict(zip(items, items, strict=False))
        data, kind = raw.get(b"data"), raw.get(b"type")
        if data is not None and kind is not None:
            event_id = entry_id.decode("utf-8", "replace") if type(entry_id) is bytes \
                else text(entry_id)
            return _flexisync_event(name, event_id, data, kind, stamp=raw.get(b"time"),
                                    source=raw.get(b"source"))
    event_id = text(entry_id)
    if isinstance(raw_fields, dict):
        fields = {text(k): v for k, v in raw_fields.items()}
    else:
        items = iter(raw_fields)
        fields = {text(k): v for k, v in zip(items, items, strict=False)}
    data, kind = fields.get("data"), fields.get("type")
    if data is None or kind is None:
        # An entry some other program added: hand over its fields as they are.
        return Event(id=event_id, topic=name, type="message",
                     data={k: text(v) for k, v in fields.items()},
                     time=_stamp_of(event_id), source="")
    return _flexisync_event(name, event_id, data, kind, stamp=fields.get("time"),
                            source=fields.get("source"))


def _stamp_of(event_id: str) -> float:
    """The epoch seconds an entry id carries (its milliseconds part)."""
    return int(event_id.split("-", 1)[0]) / 1000


def _flexisync_event(name: str, event_id: str, data: Any, kind: Any, *, stamp: Any,
                     source: Any) -> Event:
    """The :class:`Event` of an entry with flexisync's fields (DecodeError: see
    :func:`decode_event`)."""
    try:
        value = loads(data, name)
    except DecodeError as exc:  # named after the entry (built only when needed)
        raise DecodeError(f"{name}#{event_id}", exc.reason) from None
    kind_text = kind.decode("utf-8", "replace") if type(kind) is bytes else text(kind)
    try:
        _type_seen.get(kind_text)  # validate_name, remembered
    except ConfigError as exc:  # it becomes an SSE "event:" line: no newlines
        raise DecodeError(f"{name}#{event_id}", str(exc)) from None
    try:
        when = float(stamp) if stamp is not None else _stamp_of(event_id)
    except ValueError:
        when = _stamp_of(event_id)
    if source is None:
        source = ""
    elif type(source) is bytes:
        source = source.decode("utf-8", "replace")
    else:
        source = text(source)
    return Event(event_id, name, kind_text, value, when, source)


def decode_item(name: str, entry_id: Any, raw_fields: Any) -> Event | DecodeError:
    """:func:`decode_event`, returning the :class:`DecodeError` instead of raising it."""
    try:
        return decode_event(name, entry_id, raw_fields)
    except DecodeError as exc:
        return exc


class StreamCore:
    """One stream's validated settings, key, channel and operations as plans."""

    __slots__ = ("channel", "ctx", "key", "log", "maxlen", "name", "ttl")

    def __init__(self, ctx: Context, name: str, *, maxlen: int | None,
                 ttl: Duration | None = DEFAULT_TTL) -> None:
        if maxlen is not None and (isinstance(maxlen, bool) or not isinstance(maxlen, int)
                                   or maxlen < 1):
            raise ConfigError(f"maxlen must be an int >= 1 or None, got {maxlen!r}")
        self.ctx = ctx
        self.name = validate_name(name, "stream name")
        self.maxlen = maxlen
        self.ttl = optional_seconds(ttl, "ttl")
        self.key = ctx.keys.key("stream", self.name)
        self.channel = ctx.keys.object_channel("stream", self.name)
        self.log = get_logger("streams", stream=self.name)

    def describe(self, cls: str) -> str:
        """The ``repr`` of a shell object of class ``cls`` over this stream."""
        return f"<{cls} {self.name!r} maxlen={self.maxlen} ttl={self.ttl}>"

    def append(self, data: Any, type: str) -> Plan[str]:
        """Plan: append one event; its id. ``TypeError``/``ConfigError`` before I/O."""
        validate_name(type, "event type")
        body = dumps(data, "data")
        _, source = _ids.next()
        args: list[Any] = [self.maxlen or 0, 0 if self.ttl is None else to_ms(self.ttl),
                           self.channel, "type", type, "data", body,
                           "time", repr(time.time()), "source", source]
        # XADD is not idempotent: a blind retry could append twice.
        raw = yield Script("stream.append", "stream_append", [self.key], args,
                           idempotent=False)
        tally_of(self.ctx).stream(self.name).appends += 1
        return text(raw)

    def delete(self) -> Plan[bool]:
        """Plan: delete the stream; whether it existed."""
        key = self.key
        return bool((yield Call("stream.delete", lambda c: c.delete(key))))

    def read_after(self, after: str | None, count: int | None) -> Plan[list[Event]]:
        """Plan: the events after ``after`` (see ``Stream.read_after``)."""
        start = None if after is None else parse_id(after, "after")
        if count is not None and (isinstance(count, bool) or not isinstance(count, int)
                                  or count < 1):
            raise ConfigError(f"count must be an int >= 1 or None, got {count!r}")
        entries = yield from read_entries(self.name, self.key, start, count, None)
        return [decode_event(self.name, entry_id, fields) for entry_id, fields in entries]

    def last_id(self) -> Plan[str | None]:
        """Plan: the newest retained id, or ``None``."""
        key = self.key
        raw = yield Call("stream.last_id", lambda c: c.xrevrange(key, "+", "-", count=1))
        return text(raw[0][0]) if raw else None

    def length(self) -> Plan[int]:
        """Plan: how many events the stream retains now."""
        key = self.key
        return int((yield Call("stream.len", lambda c: c.xlen(key))))


class StreamShell:
    """What both shells' stream classes share: the core and the public attributes."""

    def __init__(self, ctx: Context, name: str, *, maxlen: int | None,
                 ttl: Duration | None = DEFAULT_TTL) -> None:
        self._core = StreamCore(ctx, name, maxlen=maxlen, ttl=ttl)
        self._ctx = ctx
        self.name = self._core.name
        self.maxlen = self._core.maxlen
        self.ttl = self._core.ttl

    def __repr__(self) -> str:
        return self._core.describe(type(self).__name__)
