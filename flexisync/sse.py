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

For asyncio servers use :func:`flexisync.aio.sse.event_stream` (an async generator,
no thread per client). The framing logic lives once in :mod:`flexisync._core.sse`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Generator

from flexisync._core.sse import HEARTBEAT, FrameSource, check_args, format_event
from flexisync._durations import Duration
from flexisync.events import Event
from flexisync.streams import Stream, iterate

__all__ = ["HEARTBEAT", "event_stream", "format_event"]


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
        A generator of frames (``str``); close it to leave the stream's reader.

    Raises:
        ConfigError: ``last_event_id`` is malformed (answer 400), ``heartbeat`` is not
            a positive number of seconds, or ``until``/``stop`` has the wrong type.
            Raised at the call, before iteration.
        EventsTrimmed: (while iterating) events right after ``last_event_id`` were
            trimmed away; the client has to start over.
    """
    after, interval = check_args(last_event_id, heartbeat, until, stop, (threading.Event,))
    return iterate(stream._ctx, FrameSource(stream._core, after, interval, until, stop))
