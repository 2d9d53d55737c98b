"""Server-Sent Events framing of a :class:`~flexisync.streams.Stream`.

:func:`event_stream` is a plain generator of ``str`` frames, so any web framework can
serve it as a ``text/event-stream`` body (Starlette's ``StreamingResponse``, Flask's
``Response``, Django's ``StreamingHttpResponse``). Each event becomes::

    id: <stream entry id>
    event: <event type>
    data: <event data as one line of JSON>

The ``id:`` line makes a browser's ``EventSource`` send ``Last-Event-ID`` when it
reconnects; pass that header back as ``last_event_id`` and the stream resumes right
after the last event the browser saw, with nothing lost and nothing repeated.
A comment frame (``: keepalive``) is sent after ``heartbeat`` seconds without an event,
so proxies keep the connection open and a vanished client is noticed by the server.

The frames go on through Redis outages (heartbeats included) and resume after the last
event sent once Redis answers again. A ``Last-Event-ID`` the stream never issued (a
fabricated one, or one from another stream) starts the client afresh from the oldest
retained event, after a comment saying so. An entry that is not a valid flexisync
event (foreign bytes) is passed over with an ``id:``-only frame, so the browser's
resume point moves past it. Give ``stop`` (a ``threading.Event`` set when the server
shuts down) and the generator ends within about a second of it being set.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Generator

from flexisync._durations import Duration, seconds
from flexisync._log import get_logger
from flexisync.errors import ConfigError
from flexisync.events import Event
from flexisync.streams import Stream, UnknownResumePoint, _Skipped, parse_id

__all__ = ["HEARTBEAT", "event_stream", "format_event"]

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


def event_stream(stream: Stream, last_event_id: str | None = None, heartbeat: Duration = 15.0,
                 until: Callable[[Event], bool] | None = None, *,
                 stop: threading.Event | None = None) -> Generator[str, None, None]:
    """SSE frames for every event of ``stream`` after ``last_event_id``, then live.

    Args:
        stream: the stream to serve.
        last_event_id: the ``Last-Event-ID`` request header (or ``None`` / ``""`` to
            start at the oldest retained event). An id the stream never issued (one
            beyond its newest) does not stall the client: the frames start over from
            the oldest retained event, after a ``: last_event_id ... unknown`` comment.
        heartbeat: seconds without an event after which a ``: keepalive`` comment
            frame is yielded (also while Redis is unreachable).
        until: stop after the frame of an event for which ``until(event)`` is true
            (e.g. a job's ``"done"`` event); ``None`` follows forever.
        stop: when set (e.g. by the server's shutdown), the generator ends within
            about a second, so a graceful shutdown is not held up by open streams.

    Returns:
        A generator of frames (``str``); close it to release its Redis connection.

    Raises:
        ConfigError: ``last_event_id`` is malformed (answer 400), ``heartbeat`` is not
            a positive number of seconds, or ``until``/``stop`` has the wrong type.
            Raised at the call, before iteration.
        EventsTrimmed: (while iterating) events right after ``last_event_id`` were
            trimmed away; the client has to start over.
    """
    after = parse_id(last_event_id, "last_event_id") if last_event_id else None
    interval = seconds(heartbeat, "heartbeat")
    if until is not None and not callable(until):
        raise ConfigError(f"until must be callable, not {type(until).__name__}")
    if stop is not None and not isinstance(stop, threading.Event):
        raise ConfigError(f"stop must be a threading.Event, not {type(stop).__name__}")
    return _frames(stream, after, interval, until, stop)


def _frames(stream: Stream, after: str | None, heartbeat: float,
            until: Callable[[Event], bool] | None,
            stop: threading.Event | None) -> Generator[str, None, None]:
    while True:
        events = stream._follow(after, None, until, idle=heartbeat, stop=stop,
                                skip_invalid=True)
        try:
            for item in events:
                if item is None:
                    yield HEARTBEAT
                elif isinstance(item, _Skipped):
                    _log.warning("sse.entry_skipped", stream=stream.name, id=item.id,
                                 error=item.error.reason)
                    yield f"id: {item.id}\n: skipped an entry that is not a valid event\n\n"
                else:
                    yield format_event(item)
            return
        except UnknownResumePoint as exc:
            _log.warning("sse.unknown_resume_point", stream=stream.name, after=exc.after,
                         newest=exc.newest)
            yield (f": last_event_id {exc.after} is unknown to this stream; "
                   "starting over from the oldest retained event\n\n")
            after = None
        finally:
            events.close()
