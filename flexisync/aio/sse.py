"""Server-Sent Events framing of an :class:`~flexisync.aio.streams.AsyncStream`.

:func:`event_stream` is an async generator of ``str`` frames, for asyncio servers
(Starlette's or FastAPI's ``StreamingResponse``): no thread per client, and thousands
of clients of one stream share one reader (one fetch per new event in the process).
The frames, the heartbeats, the resume with ``Last-Event-ID`` and the handling of an
unknown resume point or a foreign entry are those of :mod:`flexisync.sse`::

    @app.get("/jobs/{job}/events")
    async def events(job: str, request: Request) -> StreamingResponse:
        log = sync.stream(f"job:{job}")
        frames = flexisync.aio.sse.event_stream(
            log, request.headers.get("last-event-id"), until=lambda e: e.type == "done")
        return StreamingResponse(frames, media_type="text/event-stream")

Cancelling the task that iterates it (the client went away) or ``aclose()`` frees
everything it held.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncGenerator, Callable

from flexisync._core.events import Event
from flexisync._core.sse import HEARTBEAT, FrameSource, check_args, format_event
from flexisync._durations import Duration
from flexisync.aio.streams import AsyncStream, aiterate

__all__ = ["HEARTBEAT", "event_stream", "format_event"]


def event_stream(stream: AsyncStream, last_event_id: str | None = None,
                 heartbeat: Duration = 15.0, until: Callable[[Event], bool] | None = None,
                 *, stop: asyncio.Event | threading.Event | None = None,
                 ) -> AsyncGenerator[str, None]:
    """SSE frames for every event of ``stream`` after ``last_event_id``, then live.

    The arguments, frames and errors of :func:`flexisync.sse.event_stream`
    (``ConfigError`` at the call, before iteration; ``EventsTrimmed`` while iterating
    when the client has to start over); ``stop`` may also be an ``asyncio.Event``.
    Iterate it with ``async for``; ``aclose()`` or cancelling frees it.
    """
    after, interval = check_args(last_event_id, heartbeat, until, stop,
                                 (asyncio.Event, threading.Event))
    return aiterate(stream._ctx, FrameSource(stream._core, after, interval, until, stop))
