"""Server-Sent Events framing of a stream, once, for both shells.

:func:`format_event` makes one frame, :func:`check_args` validates ``event_stream``'s
arguments and :class:`FrameSource` is the frame logic: it follows the stream (events,
``: keepalive`` heartbeats while idle or while Redis is unreachable, an ``id:``-only
frame over an entry that does not decode) and starts over from the oldest retained
event, after a comment saying so, when the client's ``Last-Event-ID`` was never issued
by the stream. :mod:`flexisync.sse` and :mod:`flexisync.aio.sse` only iterate it.

Thousands of clients of one stream in one process cost little per event: an entry's
frame is encoded once, shared by every client (:func:`render_frame` through
:meth:`~flexisync._core.followers.Batch.rendered`), and the frames of entries that
arrive together go out as one ``str``.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from flexisync._core.events import Event
from flexisync._core.followers import FollowCore
from flexisync._core.plan import Plan
from flexisync._core.streams import StreamCore, parse_id
from flexisync._durations import Duration, seconds
from flexisync._log import get_logger
from flexisync.errors import ConfigError, DecodeError, UnknownResumePoint

__all__ = ["HEARTBEAT", "FrameSource", "check_args", "format_event", "render_frame"]

HEARTBEAT = ": keepalive\n\n"

_log = get_logger("sse")


def format_event(event: Event) -> str:
    """One SSE frame for ``event`` (``id``, ``event`` and a single ``data`` line)."""
    data = json.dumps(event.data, separators=(",", ":"), ensure_ascii=False)
    if not data.isascii():
        try:
            data.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate ("\ud800" in foreign JSON)
            data = json.dumps(event.data, separators=(",", ":"))
    return f"id: {event.id}\nevent: {event.type}\ndata: {data}\n\n"


def render_frame(stream: str, entry_id: str, value: Event | DecodeError) -> str:
    """The frame of one stream entry: :func:`format_event`, or for an entry that does
    not decode an ``id:``-only frame (logged as ``sse.entry_skipped``)."""
    if isinstance(value, DecodeError):
        _log.warning("sse.entry_skipped", stream=stream, id=entry_id, error=value.reason)
        return f"id: {entry_id}\n: skipped an entry that is not a valid event\n\n"
    return format_event(value)


def check_args(last_event_id: str | None, heartbeat: Duration,
               until: Callable[[Event], bool] | None, stop: Any,
               stop_types: tuple[type, ...]) -> tuple[str | None, float]:
    """Validate ``event_stream``'s arguments; the resume point and heartbeat (s).

    Raises:
        ConfigError: malformed ``last_event_id``, bad ``heartbeat``, ``until`` not
            callable, or ``stop`` not one of ``stop_types``.
    """
    after = parse_id(last_event_id, "last_event_id") if last_event_id else None
    interval = seconds(heartbeat, "heartbeat")
    if until is not None and not callable(until):
        raise ConfigError(f"until must be callable, not {type(until).__name__}")
    if stop is not None and not isinstance(stop, stop_types):
        names = " or ".join(f"{t.__module__}.{t.__name__}" for t in stop_types)
        raise ConfigError(f"stop must be a {names}, not {type(stop).__name__}")
    return after, interval


class FrameSource:
    """The frames of one ``event_stream``: :meth:`poll`, :meth:`wait`,
    :meth:`wait_async` and the plan :meth:`next_items`, as in
    :class:`~flexisync._core.followers.FollowCore`, with frames (``str``) for items."""

    def __init__(self, core: StreamCore, after: str | None, heartbeat: float,
                 until: Callable[[Event], bool] | None, stop: Any) -> None:
        self._core = core
        self._args = (heartbeat, until, stop)
        self._follow = self._start(after)

    def _start(self, after: str | None) -> FollowCore:
        heartbeat, until, stop = self._args
        return FollowCore(self._core, after, None, until, idle=heartbeat, stop=stop,
                          skip_invalid=True, render=render_frame)

    def close(self) -> None:
        """Free the follower's place at the stream's reader (no I/O)."""
        self._follow.close()

    def poll(self) -> Any:
        """:meth:`FollowCore.poll <flexisync._core.followers.FollowCore.poll>` with the
        live entries ready now as ONE ``str`` of frames."""
        step = self._follow.poll()
        if isinstance(step, list):
            if len(step) == 1:
                return [HEARTBEAT] if step[0] is None else step
            return ["".join([HEARTBEAT if item is None else item for item in step])]
        return step

    def wait(self, seconds: float) -> None:
        """Block for the live tail (as ``FollowCore.wait``)."""
        self._follow.wait(seconds)

    def wait_async(self, seconds: float) -> Awaitable[None]:
        """Await the live tail (as ``FollowCore.wait_async``)."""
        return self._follow.wait_async(seconds)

    def next_items(self) -> Plan[list[str] | None]:
        """Plan: the next frames, one ``str`` each, or ``None`` when the stream is over
        (``until``/stop).

        Raises:
            EventsTrimmed: events right after the resume point were trimmed away.
        """
        try:
            items = yield from self._follow.next_items()
        except UnknownResumePoint as exc:
            _log.warning("sse.unknown_resume_point", stream=self._core.name,
                         after=exc.after, newest=exc.newest)
            self._follow.close()
            self._follow = self._start(None)
            return [f": last_event_id {exc.after} is unknown to this stream; "
                    "starting over from the oldest retained event\n\n"]
        if items is None:
            return None
        return [HEARTBEAT if item is None else item for item in items]
