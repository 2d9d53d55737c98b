"""Serve a flexisync Stream to browsers over Server-Sent Events (asyncio: Starlette + uvicorn).

Run it, then open http://127.0.0.1:8000/ in a browser::

    python examples/sse_server.py                 # FLEXISYNC_URL, else a throwaway redis-server
    python examples/sse_server.py --port 8001 --stream jobs:42 --produce 0.5

Endpoints:

``GET /``           the demo page (``sse_page.html``): shows the events live with EventSource
``GET /events``     ``text/event-stream`` of the stream. Resumes right after the standard
                    ``Last-Event-ID`` header (sent by ``EventSource`` when it reconnects) or
                    ``?last_event_id=``; ``?until=TYPE`` ends the response after an event of
                    that type (e.g. a job's ``done``)
``POST /publish``   append the JSON body as an event; ``?type=TYPE``; answers ``{"id": ...}``
``GET /health``     ``{"ok": true}`` once the server is up

Every client is an async generator on the event loop (no thread per client): the
process's clients of one stream share the stream's reader, so thousands of browsers
cost a handful of Redis connections. Run as many server processes as you like (under
gunicorn with uvicorn workers, or several pods): the stream lives in Redis, so every
process serves the same events and a browser that reconnects to another process resumes
without loss or duplicates.

Shutting down (SIGTERM, Ctrl-C) ends every open event stream at once, each with a
complete HTTP response, so uvicorn's graceful shutdown is not held up by clients that
never hang up, and the browsers reconnect (to another process, or to this one
restarted) where they left off.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import pathlib
import signal
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from types import FrameType
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

import flexisync
import flexisync.aio
from flexisync.aio.sse import event_stream

PAGE = pathlib.Path(__file__).with_name("sse_page.html")
MAXLEN = 10_000


class EventStreamResponse(StreamingResponse):
    """A ``text/event-stream`` response that ends, complete, once ``stopping`` is set.

    Starlette stops iterating a streaming body when the client disconnects; this
    response also treats ``stopping`` (set at server shutdown) as a disconnect, then
    finishes the HTTP response properly. One watcher per response, none per frame.
    """

    media_type = "text/event-stream"

    def __init__(self, frames: AsyncGenerator[str, None], stopping: asyncio.Event) -> None:
        super().__init__(frames, headers={"Cache-Control": "no-cache",
                                          "X-Accel-Buffering": "no"})
        self.stopping = stopping

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        stopped = started = False

        async def receive_or_stop() -> Message:
            nonlocal stopped
            message = asyncio.ensure_future(receive())
            stop = asyncio.ensure_future(self.stopping.wait())
            try:
                await asyncio.wait({message, stop}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stop.cancel()
                message.cancel()  # no effect once done
            if message.done() and not message.cancelled():
                return message.result()
            stopped = True
            return {"type": "http.disconnect"}

        async def send_noting_start(message: Message) -> None:
            nonlocal started
            await send(message)
            started = started or message["type"] == "http.response.start"

        await super().__call__(scope, receive_or_stop, send_noting_start)
        if stopped and started:
            await send({"type": "http.response.body", "body": b"", "more_body": False})


def build_app(sync: flexisync.aio.AsyncCoordinator, stream_name: str, *,
              heartbeat: float = 15.0, reconnect: float = 1.0, produce: float = 0.0,
              stopping: asyncio.Event | None = None) -> Starlette:
    """The Starlette app serving ``stream_name`` of ``sync``; it closes ``sync`` when the
    server shuts down.

    ``reconnect`` (seconds) is the delay a browser waits before reconnecting (the SSE
    ``retry:`` field); ``produce`` > 0 appends a ``tick`` event every ``produce``
    seconds. ``stopping``, once set (at server shutdown), ends every open event stream.
    """
    stream = sync.stream(stream_name, maxlen=MAXLEN)
    stopping = stopping or asyncio.Event()
    retry = f"retry: {round(reconnect * 1000)}\n\n"

    async def frames(first: AsyncGenerator[str, None],
                     until: Callable[[flexisync.Event], bool] | None,
                     ) -> AsyncGenerator[str, None]:
        yield retry
        current = first
        while True:
            try:
                async for frame in current:
                    yield frame
                return
            except flexisync.EventsTrimmed as exc:
                # The client was away longer than the stream retains: say so, and go on
                # from the oldest event still there.
                oldest = exc.oldest
            finally:
                await current.aclose()
            yield f"event: trimmed\ndata: {json.dumps({'oldest': oldest})}\n\n"
            current = event_stream(stream, None, heartbeat=heartbeat, until=until)

    async def events(request: Request) -> Response:
        if stopping.is_set():
            return JSONResponse({"error": "shutting down"}, status_code=503)
        last_event_id = (request.headers.get("last-event-id")
                         or request.query_params.get("last_event_id") or None)
        until_type = request.query_params.get("until")
        until = (lambda event: event.type == until_type) if until_type else None
        try:  # a malformed Last-Event-ID is refused here, before any frame
            first = event_stream(stream, last_event_id, heartbeat=heartbeat, until=until)
        except flexisync.ConfigError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        return EventStreamResponse(frames(first, until), stopping)

    async def publish(request: Request) -> Response:
        try:
            data: Any = await request.json()
        except ValueError:
            return JSONResponse({"error": "body must be JSON"}, status_code=400)
        try:
            event_id = await stream.append(data, type=request.query_params.get("type",
                                                                               "message"))
        except flexisync.ConfigError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        return JSONResponse({"id": event_id})

    async def page(_request: Request) -> Response:
        return HTMLResponse(PAGE.read_text("utf-8"))

    async def health(_request: Request) -> Response:
        return JSONResponse({"ok": True})

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        async with sync:  # runs in the server's event loop; closed after the last response
            producer = asyncio.create_task(tick(stream, produce)) if produce > 0 else None
            try:
                yield
            finally:
                stopping.set()
                if producer is not None:
                    producer.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await producer

    return Starlette(routes=[
        Route("/", page),
        Route("/events", events),
        Route("/publish", publish, methods=["POST"]),
        Route("/health", health),
    ], lifespan=lifespan)


class Server(uvicorn.Server):
    """uvicorn's server, which also tells the open event streams that it is stopping.

    uvicorn's graceful shutdown waits for every response to finish, and an event stream
    never finishes by itself: ``stopping`` makes them end.
    """

    def __init__(self, config: uvicorn.Config, stopping: asyncio.Event) -> None:
        super().__init__(config)
        self.stopping = stopping
        self._loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets: Any = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._loop is not None:  # in a signal handler: wake the loop to set the event
            with contextlib.suppress(RuntimeError):  # the loop is closed
                self._loop.call_soon_threadsafe(self.stopping.set)
        super().handle_exit(sig, frame)


def _exit_cleanly(_sig: int, _frame: FrameType | None) -> None:
    # uvicorn re-raises the signal it handled once it has shut down; ending by
    # SystemExit (not by the default handler) closes the AsyncCoordinator and stops a
    # throwaway redis-server on the way out.
    raise SystemExit(0)


async def tick(stream: flexisync.aio.AsyncStream, every: float) -> None:
    """Append a ``tick`` event every ``every`` seconds, until cancelled."""
    n = 0
    while True:
        await asyncio.sleep(every)
        n += 1
        with contextlib.suppress(flexisync.BackendUnavailable):  # try again next tick
            await stream.append({"n": n, "pid": os.getpid()}, type="tick")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--namespace", default="sse-demo")
    parser.add_argument("--stream", default="demo")
    parser.add_argument("--heartbeat", type=float, default=15.0,
                        help="seconds without an event before a keepalive comment")
    parser.add_argument("--reconnect", type=float, default=1.0,
                        help="seconds a browser waits before reconnecting (SSE retry:)")
    parser.add_argument("--produce", type=float, default=1.0,
                        help="append a tick event every N seconds (0: off)")
    args = parser.parse_args()
    # Thousands of open event streams make a large heap that lives as long as they
    # do, and each event leaves every stream a fresh waiter until the next one. With
    # CPython's default thresholds (700, 10, 10) those waiters reach the oldest
    # generation, whose full collections (hundreds of ms with 5,000 clients) stall
    # every stream at once. Fewer, larger young collections let them die young.
    gc.set_threshold(50_000, 20, 20)

    with contextlib.ExitStack() as stack:
        url = os.environ.get("FLEXISYNC_URL")
        if not url:
            from flexisync.embedded import start

            redis_server = stack.enter_context(start())
            url = redis_server.url
            print(f"no FLEXISYNC_URL: started a throwaway redis-server at {url}", flush=True)
        stopping = asyncio.Event()
        app = build_app(flexisync.aio.connect(url, namespace=args.namespace), args.stream,
                        heartbeat=args.heartbeat, reconnect=args.reconnect,
                        produce=args.produce, stopping=stopping)
        # uvicorn picks uvloop and httptools when they are installed (uvicorn[standard]):
        # with thousands of clients most of the time goes to the event loop and HTTP.
        config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                                timeout_graceful_shutdown=5)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, _exit_cleanly)
        print(f"serving stream {args.stream!r} on http://{args.host}:{args.port}/", flush=True)
        Server(config, stopping).run()


if __name__ == "__main__":
    main()
