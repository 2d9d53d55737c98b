"""Serve a flexisync Stream to browsers over Server-Sent Events (Starlette + uvicorn).

The thread-pool SSE example as it was before the asyncio rewrite (a sync generator per
client, iterated on Starlette's thread pool), kept for ``benchmarks/sse.py`` to measure
next to ``examples/sse_server.py``. Only the page's path changed.

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

Run as many server processes as you like (under gunicorn with uvicorn workers, or
several pods): the stream lives in Redis, so every process serves the same events and a
browser that reconnects to another process resumes without loss or duplicates.

Shutting down (SIGTERM, Ctrl-C) ends every open event stream within about a second:
the server sets a ``threading.Event`` that ``event_stream(stop=...)`` watches, so
uvicorn's graceful shutdown is not held up by clients that never hang up, and the
browsers reconnect (to another process, or to this one restarted) where they left off.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

import flexisync
from flexisync.sse import event_stream

PAGE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "sse_page.html"


def build_app(sync: flexisync.Coordinator, stream_name: str, *,
              heartbeat: float = 15.0, stopping: threading.Event | None = None) -> Starlette:
    """The Starlette app serving ``stream_name`` of ``sync``.

    ``stopping``, once set (at server shutdown), ends every open event stream.
    """
    stream = sync.stream(stream_name, maxlen=10_000)

    def frames(last_event_id: str | None, until: str | None) -> Iterator[str]:
        done = (lambda event: event.type == until) if until else None
        after = last_event_id
        while True:
            try:
                yield from event_stream(stream, after, heartbeat=heartbeat, until=done,
                                        stop=stopping)
                return
            except flexisync.EventsTrimmed as exc:
                # The client was away longer than the stream retains: say so, and go on
                # from the oldest event still there.
                yield f"event: trimmed\ndata: {json.dumps({'oldest': exc.oldest})}\n\n"
                after = None

    async def events(request: Request) -> Response:
        last_event_id = (request.headers.get("last-event-id")
                         or request.query_params.get("last_event_id") or None)
        try:
            event_stream(stream, last_event_id, heartbeat=heartbeat).close()  # validate
        except flexisync.ConfigError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        # A sync generator: Starlette iterates it in its thread pool.
        return StreamingResponse(
            frames(last_event_id, request.query_params.get("until")),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def publish(request: Request) -> Response:
        try:
            data: Any = await request.json()
        except ValueError:
            return JSONResponse({"error": "body must be JSON"}, status_code=400)
        try:
            event_id = stream.append(data, type=request.query_params.get("type", "message"))
        except flexisync.ConfigError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        return JSONResponse({"id": event_id})

    async def page(_request: Request) -> Response:
        return HTMLResponse(PAGE.read_text("utf-8"))

    async def health(_request: Request) -> Response:
        return JSONResponse({"ok": True})

    return Starlette(routes=[
        Route("/", page),
        Route("/events", events),
        Route("/publish", publish, methods=["POST"]),
        Route("/health", health),
    ])


class Server(uvicorn.Server):
    """uvicorn's server, which also tells the open event streams that it is stopping.

    uvicorn's graceful shutdown waits for every response to finish, and an event stream
    never finishes by itself: ``stopping`` makes them end.
    """

    def __init__(self, config: uvicorn.Config, stopping: threading.Event) -> None:
        super().__init__(config)
        self.stopping = stopping

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.stopping.set()
        super().handle_exit(sig, frame)


def _exit_cleanly(_sig: int, _frame: FrameType | None) -> None:
    # uvicorn re-raises the signal it handled once it has shut down; ending by
    # SystemExit (not by the default handler) lets the ExitStack close the Coordinator
    # and stop a throwaway redis-server.
    raise SystemExit(0)


def produce(sync: flexisync.Coordinator, stream_name: str, every: float,
            stop: threading.Event) -> None:
    """Append a ``tick`` event every ``every`` seconds until ``stop`` is set."""
    stream = sync.stream(stream_name, maxlen=10_000)
    n = 0
    while not stop.wait(every):
        n += 1
        stream.append({"n": n, "pid": os.getpid()}, type="tick")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--namespace", default="sse-demo")
    parser.add_argument("--stream", default="demo")
    parser.add_argument("--heartbeat", type=float, default=15.0,
                        help="seconds without an event before a keepalive comment")
    parser.add_argument("--produce", type=float, default=1.0,
                        help="append a tick event every N seconds (0: off)")
    args = parser.parse_args()

    with contextlib.ExitStack() as stack:
        url = os.environ.get("FLEXISYNC_URL")
        if not url:
            from flexisync.embedded import start

            redis_server = stack.enter_context(start())
            url = redis_server.url
            print(f"no FLEXISYNC_URL: started a throwaway redis-server at {url}", flush=True)
        sync = stack.enter_context(flexisync.connect(url, namespace=args.namespace))
        stop = threading.Event()
        stack.callback(stop.set)
        if args.produce > 0:
            threading.Thread(target=produce, args=(sync, args.stream, args.produce, stop),
                             name="producer", daemon=True).start()
        stopping = threading.Event()
        stack.callback(stopping.set)
        app = build_app(sync, args.stream, heartbeat=args.heartbeat, stopping=stopping)
        config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                                timeout_graceful_shutdown=5)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, _exit_cleanly)
        print(f"serving stream {args.stream!r} on http://{args.host}:{args.port}/", flush=True)
        Server(config, stopping).run()


if __name__ == "__main__":
    main()
