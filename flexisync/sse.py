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
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator

from flexisync._durations import Duration, seconds
from flexisync.errors import ConfigError
from flexisync.events import Event
from flexisync.streams import Stream, parse_id

__all__ = ["HEARTBEAT", "event_stream", "format_event"]

HEARTBEAT = ": keepalive\n\n"


def format_event(event: Event) -> str:
    """One SSE frame for ``event`` (``id``, ``event`` and a single ``data`` line)."""
    data = json.dumps(event.data, separators=(",", ":"), ensure_ascii=False)
    return f"id: {event.id}\nevent: {event.type}\ndata: {data}\n\n"


def event_stream(stream: Stream, last_event_id: str | None = None, heartbeat: Duration = 15.0,
                 until: Callable[[Event], bool] | None = None) -> Iterator[str]:
    """SSE frames for every event of ``stream`` after ``last_event_id``, then live.

    Args:
        stream: the stream to serve.
        last_event_id: the ``Last-Event-ID`` request header (or ``None`` / ``""`` to
            start at the oldest retained event).
        heartbeat: seconds without an event after which a ``: keepalive`` comment
            frame is yielded.
        until: stop after the frame of an event for which ``until(event)`` is true
            (e.g. a job's ``"done"`` event); ``None`` follows forever.

    Returns:
        A generator of frames (``str``); close it to release its Redis connection.

    Raises:
        ConfigError: ``last_event_id`` is malformed (answer 400), or ``heartbeat`` is
            not a positive number of seconds. Raised at the call, before iteration.
        EventsTrimmed: (while iterating) the events right after ``last_event_id`` were
            trimmed away; the client has to start over.
    """
    after = parse_id(last_event_id, "last_event_id") if last_event_id else None
    interval = seconds(heartbeat, "heartbeat")
    if until is not None and not callable(until):
        raise ConfigError(f"until must be callable, not {type(until).__name__}")
    return _frames(stream, after, interval, until)


def _frames(stream: Stream, after: str | None, heartbeat: float,
            until: Callable[[Event], bool] | None) -> Iterator[str]:
    events = stream._follow(after, None, until, idle=heartbeat)
    try:
        for event in events:
            yield HEARTBEAT if event is None else format_event(event)
    finally:
        events.close()
