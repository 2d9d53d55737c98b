"""``flexisync dashboard``: the fleet on one live web page, served by flexisync itself.

::

    flexisync dashboard --url redis://... [--namespace NS] [--host 127.0.0.1] [--port 8765]
                        [--interval 0.5] [--allow-write]

A small HTTP/1.1 server on asyncio (the standard library only: no web framework, no
build step, no CDN; the page, its script and its stylesheet ship in
``flexisync/cli/dashboard_static/``):

``GET /``
    the page: every breaker with its state, time left open, trips, failures, recent
    transitions and a sparkline of the fleet's call outcomes; held locks with holder
    and time left; streams with length and last id; semaphores.
``GET /events``
    Server-Sent Events: an ``event: snapshot`` frame (``data:`` the document of
    ``/api/snapshot``, ``id:`` a sequence number) every 0.5 s while someone watches,
    and at once when a breaker of the namespace publishes a transition or a lock is
    released; ``event: unavailable`` (``data: {"error": ...}``) while Redis does not
    answer. One poller serves every client: N browsers cost one snapshot per period.
``GET /api/snapshot``
    :func:`flexisync._fleet.snapshot` as JSON (infinities as ``null``), each breaker
    with ``"transitions"`` (the last ones this dashboard saw: ``{"at", "from", "to"}``,
    Unix seconds, oldest first), plus ``"dashboard": {"namespace", "url" (password
    redacted), "allow_write", "live_transitions"}``. 503 while Redis does not answer.
``POST /api/breaker/open | close | reset``
    JSON body ``{"name": ..., "seconds": N}`` (``seconds`` only for ``open``: without
    it the breaker is forced open until closed). The CLI's ``breaker open|close|reset``.
    Refused (403) unless the dashboard was started with ``--allow-write``, and refused
    (403) without the ``X-FlexiSync-Dashboard`` header the page sends, with a foreign
    ``Origin`` or ``Sec-Fetch-Site``, or with a body that is not ``application/json``:
    another site's page cannot post to it (a form cannot set the header; a script's
    cross-origin request needs a CORS preflight this server never grants).

It binds 127.0.0.1 by default; on a loopback address it also refuses any ``Host`` header
but the loopback names (a DNS-rebinding page cannot read it). Passwords never appear:
the page shows the URL redacted. Ctrl-C or SIGTERM stops it with exit code 0.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import http
import importlib.resources
import ipaddress
import json
import math
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from flexisync._keys import validate_name
from flexisync._log import get_logger
from flexisync.cli._common import (
    CLI_RETRY,
    EXIT_OK,
    EXIT_PROBLEM,
    describe,
    error,
    number_type,
    print_json,
)
from flexisync.cli._inspect import _OPEN_SLACK, MAX_OPEN_SECONDS
from flexisync.errors import ConfigError, FlexiSyncError

if TYPE_CHECKING:
    from flexisync._core.context import Context
    from flexisync._listener import Registration
    from flexisync.aio.coordinator import AsyncCoordinator

__all__ = ["Dashboard", "register_dashboard", "run_dashboard"]

INTERVAL = 0.5  # seconds between snapshots while a client watches
MIN_GAP = 0.1  # seconds: the fastest a burst of transitions makes it snapshot
KEEPALIVE = 15.0  # seconds without a frame before a `: keepalive` comment
MAX_CLIENTS = 64  # concurrent /events streams; more are answered 503
MAX_HEAD = 16 * 1024  # bytes of request line + headers
MAX_BODY = 4096  # bytes of a POST body
READ_TIMEOUT = 10.0  # seconds a client has to send its request
TRANSITIONS_KEPT = 10  # per breaker
WRITE_HEADER = "x-flexisync-dashboard"
STATES = frozenset({"closed", "open", "half_open", "forced_open", "disabled"})
STATIC = {  # path -> (file in dashboard_static/, content type)
    "/": ("index.html", "text/html; charset=utf-8"),
    "/dashboard.js": ("dashboard.js", "text/javascript; charset=utf-8"),
    "/dashboard.css": ("dashboard.css", "text/css; charset=utf-8"),
}
SECURITY_HEADERS = (
    ("Cache-Control", "no-store"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("X-Frame-Options", "DENY"),
    ("Content-Security-Policy",
     "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
     "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"),
)



def _log() -> Any:
    """The ``flexisync.dashboard`` logger, built at each use: the command configures
    structlog after this module is imported (a logger bound at import would miss it)."""
    return get_logger("dashboard")


def register_dashboard(commands: Any, *, common: argparse.ArgumentParser) -> None:
    """Add the ``dashboard`` subcommand to ``commands`` (an argparse subparsers action).

    Args:
        common: the parent parser with ``--url``, ``--namespace`` and ``--json``.
    """
    dashboard = commands.add_parser(
        "dashboard", parents=[common], help="serve a live web page of the fleet's breakers, "
                                            "locks and streams",
        description="Serve a web page showing every breaker (state, time left open, recent "
                    "transitions, call outcomes), held lock and stream of the namespace, "
                    "live over Server-Sent Events. Read-only unless --allow-write. With "
                    "--json the address is printed as one JSON document once listening. "
                    "Ctrl-C or SIGTERM stops it (exit 0).")
    dashboard.add_argument("--host", default="127.0.0.1",
                           help="address to listen on (default: 127.0.0.1, this machine "
                                "only)")
    dashboard.add_argument("--port", type=_port, default=8765,
                           help="TCP port (default 8765; 0 picks a free one)")
    dashboard.add_argument("--interval", type=_interval, default=INTERVAL,
                           help=f"seconds between snapshots while a page is open (default "
                                f"{INTERVAL}; a breaker transition shows at once anyway)")
    dashboard.add_argument("--allow-write", action="store_true",
                           help="enable the page's controls: force open, open for N "
                                "seconds, reset (close) a breaker for the whole fleet")
    dashboard.set_defaults(handler=run_dashboard)


_interval = number_type(False, 0.1, 60, unit="seconds")
_port = number_type(True, 0, 65535)


def run_dashboard(args: argparse.Namespace) -> int:
    """Serve the dashboard until SIGINT/SIGTERM; the exit code.

    Raises:
        BackendUnavailable: Redis does not answer at start-up (exit 3).
        ConfigError: malformed URL or namespace (exit 2).
    """
    import flexisync.aio  # only this command needs the asyncio shell

    coordinator = flexisync.aio.connect(args.url, namespace=args.namespace, retry=CLI_RETRY,
                                        socket_connect_timeout=1.0, socket_timeout=5.0)
    return asyncio.run(_serve(coordinator, args))


async def _serve(coordinator: AsyncCoordinator, args: argparse.Namespace) -> int:
    async with coordinator:
        await coordinator.ping()  # fail fast (exit 3) when nothing answers
        dashboard = Dashboard(coordinator, host=args.host, port=args.port,
                              allow_write=args.allow_write, interval=args.interval,
                              notify=_narrate)
        try:
            await dashboard.start()
        except OSError as exc:
            error(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}")
            return EXIT_PROBLEM
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        try:
            _announce(dashboard, coordinator, args)
            await stop.wait()
        finally:
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(signum)
            await dashboard.close()
    print("dashboard stopped", file=sys.stderr, flush=True)
    return EXIT_OK


def _announce(dashboard: Dashboard, coordinator: AsyncCoordinator,
              args: argparse.Namespace) -> None:
    mode = "controls enabled (--allow-write)" if args.allow_write else "read-only"
    if args.json:
        print_json({"url": dashboard.url, "namespace": coordinator.namespace,
                    "redis": coordinator.url, "allow_write": bool(args.allow_write)})
    print(f"flexisync dashboard on {dashboard.url} (namespace {coordinator.namespace!r} at "
          f"{coordinator.url}; {mode}); Ctrl-C to stop", file=sys.stderr, flush=True)
    if not _is_loopback(args.host):
        print(f"warning: listening on {args.host}: anyone who can reach this port sees the "
              "fleet" + (" and can open or close its breakers" if args.allow_write else ""),
              file=sys.stderr, flush=True)


def _narrate(line: str) -> None:
    stamp = time.strftime("%H:%M:%S")
    print(f"{stamp}  {line}", file=sys.stderr, flush=True)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


async def _fleet_snapshot(ctx: Context) -> dict[str, Any]:
    """:func:`flexisync._fleet.asnapshot`: the reads awaited on the loop (the fleet
    outcomes reader, blocking, in a worker thread)."""
    from flexisync._fleet import asnapshot

    document: dict[str, Any] = await asnapshot(ctx)
    return document


def _finite(value: Any) -> Any:
    """``value`` with every non-finite float as ``None`` (JSON has no infinity)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _json_bytes(value: Any) -> bytes:
    """One line of JSON (never a newline inside: SSE ``data:`` takes one line)."""
    return json.dumps(_finite(value), separators=(",", ":"), allow_nan=False,
                      default=str).encode()


class _Transitions:
    """The last :data:`TRANSITIONS_KEPT` state changes seen per breaker (bounded: at most
    ``limit`` breakers, the least recently changed forgotten first)."""

    def __init__(self, limit: int = 1000) -> None:
        self._states: collections.OrderedDict[str, str] = collections.OrderedDict()
        self._recent: dict[str, collections.deque[dict[str, Any]]] = {}
        self._limit = limit

    def observe(self, name: str, state: str, at: float, *, record: bool = True) -> None:
        """``name`` is in ``state`` as of ``at`` (Unix s); a change is recorded when
        ``record``, else only remembered as the starting point."""
        before = self._states.get(name)
        self._states[name] = state
        self._states.move_to_end(name)
        if before is not None and before != state and record:
            kept = self._recent.setdefault(name, collections.deque(maxlen=TRANSITIONS_KEPT))
            kept.append({"at": at, "from": before, "to": state})
        while len(self._states) > self._limit:
            gone, _ = self._states.popitem(last=False)
            self._recent.pop(gone, None)

    def known(self, name: str) -> bool:
        return name in self._states

    def recent(self, name: str) -> list[dict[str, Any]]:
        return list(self._recent.get(name, ()))


@dataclasses.dataclass
class _Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    peer: str


class _HTTPError(Exception):
    """Answer the request with ``status`` and ``{"error": message}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Dashboard:
    """The dashboard server over one :class:`~flexisync.aio.AsyncCoordinator`.

    :meth:`start` binds and returns once listening (``url`` then holds the real port);
    :meth:`close` stops the server, every open event stream and the poller.
    Everything runs on the event loop (Redis reads are awaited), except the blocking
    pattern subscription at start and the fleet outcomes reader, in worker threads.

    Args:
        interval: seconds between snapshots while a client watches ``/events``.
        notify: called with one line of text for each control action (a log of
            operator changes; the command prints it on stderr).
        snapshot: the snapshot coroutine function (default
            :func:`flexisync._fleet.asnapshot`).
    """

    def __init__(self, coordinator: AsyncCoordinator, *, host: str = "127.0.0.1",
                 port: int = 8765, allow_write: bool = False, interval: float = INTERVAL,
                 notify: Callable[[str], None] | None = None,
                 snapshot: Callable[[Context], Awaitable[dict[str, Any]]] = _fleet_snapshot,
                 ) -> None:
        self._coordinator = coordinator
        self._ctx: Context = coordinator._ctx
        self._host = host
        self._port = port
        self._allow_write = allow_write
        self._interval = interval
        self._notify = notify
        self._snapshot_fn = snapshot
        self._static = {path: (_read_static(name), kind)
                        for path, (name, kind) in STATIC.items()}
        self._transitions = _Transitions()
        self._server: asyncio.AbstractServer | None = None
        self._poller: asyncio.Task[None] | None = None
        self._connections: dict[asyncio.Task[Any], asyncio.StreamWriter] = {}
        self._clients: set[asyncio.Queue[bytes]] = set()
        self._registrations: list[Registration] = []
        self._live_transitions = False
        self._wake = asyncio.Event()
        self._wanted = asyncio.Event()
        self._refreshing = asyncio.Lock()
        self._seq = 0
        self._frame: bytes | None = None
        self._document: dict[str, Any] = {}
        self._error = ""
        self._allowed_hosts: frozenset[str] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped = asyncio.Event()

    @property
    def url(self) -> str:
        """``http://host:port/`` of the page (the real port once started)."""
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self._port}/"

    async def start(self) -> None:
        """Listen, and subscribe to the namespace's breaker and lock channels.

        Raises:
            OSError: the address is taken or cannot be bound.
        """
        self._loop = asyncio.get_running_loop()
        self._server = await asyncio.start_server(self._connection, self._host, self._port,
                                                  limit=MAX_HEAD)
        self._port = int(self._server.sockets[0].getsockname()[1])
        if _is_loopback(self._host):
            names = {"127.0.0.1", "localhost", "[::1]", self._host}
            self._allowed_hosts = frozenset(
                {f"{n}:{self._port}" for n in names}
                | (names if self._port == 80 else set()))
        self._poller = asyncio.create_task(self._poll(), name="flexisync-dashboard-poller")
        await asyncio.to_thread(self._subscribe)
        _log().info("dashboard.started", url=self.url, namespace=self._coordinator.namespace,
                  allow_write=self._allow_write)

    async def close(self) -> None:
        """Stop serving: stop listening, end every event stream (each client gets its
        connection closed cleanly; one that does not read is dropped after 2 s), stop
        the poller and the subscriptions."""
        if self._server is not None:
            self._server.close()
        for queue in self._clients:
            if queue.full():
                queue.get_nowait()
            queue.put_nowait(b"")  # "the end" to each event stream
        self._stopped.set()  # the poller stops even if a cancel gets swallowed
        self._wanted.set()
        self._wake.set()
        if self._poller is not None:
            self._poller.cancel()
            await asyncio.wait([self._poller], timeout=5.0)
        if self._connections:
            await asyncio.wait(list(self._connections), timeout=2.0)
        for task, writer in list(self._connections.items()):
            writer.transport.abort()
            task.cancel()
        if self._connections:
            await asyncio.wait(list(self._connections), timeout=1.0)
        for registration in self._registrations:
            registration.close(wait=False)
        self._registrations.clear()

    # --- live changes ----------------------------------------------------------------

    def _subscribe(self) -> None:
        """PSUBSCRIBE the namespace's breaker transitions and lock releases (blocking:
        waits for Redis to confirm; run in a worker thread). On Redis Cluster these are
        sharded channels a pattern does not see; the 0.5 s poll still shows them."""
        namespace = self._coordinator.namespace
        listener = self._ctx.listener
        try:
            self._registrations.append(
                listener.psubscribe(f"{namespace}:breaker:{{*", self._on_breaker))
            self._registrations.append(
                listener.psubscribe(f"{namespace}:lock:{{*", self._on_other))
        except FlexiSyncError as exc:
            _log().warning("dashboard.no_live_transitions", error=str(exc))
            return
        self._live_transitions = not self._ctx.backend.is_cluster

    def _on_breaker(self, channel: str, data: bytes,
                    pattern: str | None) -> None:  # noqa: ARG002  (a listener Handler)
        """Listener thread: a breaker published a change; hand it to the loop."""
        self._hand_over(self._breaker_message, channel, data, time.time())

    def _on_other(self, channel: str, data: bytes,  # noqa: ARG002  (a listener Handler)
                  pattern: str | None) -> None:  # noqa: ARG002
        """Listener thread: a lock was released; snapshot sooner."""
        self._hand_over(self._wake.set)

    def _hand_over(self, callback: Callable[..., None], *args: Any) -> None:
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closing
                loop.call_soon_threadsafe(callback, *args)

    def _breaker_message(self, channel: str, data: bytes, at: float) -> None:
        prefix = f"{self._coordinator.namespace}:breaker:{{"
        if channel.startswith(prefix) and channel.endswith("}"):
            fields = bytes(data).decode("utf-8", "replace").split()
            # "<epoch> <version> <state> <remaining_ms> <failures>" (breaker_lib.lua)
            if len(fields) >= 3 and fields[2] in STATES:
                self._transitions.observe(channel[len(prefix):-1], fields[2], at)
        self._wake.set()

    # --- snapshots -------------------------------------------------------------------

    async def _poll(self) -> None:
        """While someone watches: a snapshot every ``interval``, sooner on a change."""
        loop = asyncio.get_running_loop()
        while not self._stopped.is_set():
            await self._wanted.wait()
            if self._stopped.is_set():
                return
            self._wake.clear()
            started = loop.time()
            frame = await self._refresh()
            for queue in self._clients:
                if queue.full():
                    queue.get_nowait()  # a slow client gets the newest, not a backlog
                queue.put_nowait(frame)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(),
                                       max(0.0, started + self._interval - loop.time()))
            await asyncio.sleep(max(0.0, started + MIN_GAP - loop.time()))

    async def _refresh(self) -> bytes:
        """Take one snapshot; the SSE frame that carries it (or says Redis is away)."""
        async with self._refreshing:
            try:
                raw = await self._snapshot_fn(self._ctx)
            except FlexiSyncError as exc:
                return self._unavailable(describe(exc)[0])
            except Exception as exc:  # a bug must not kill the page: show it, log it
                _log().error("dashboard.snapshot_failed", error=repr(exc), exc_info=True)
                return self._unavailable(f"snapshot failed ({type(exc).__name__})")
            document = self._decorate(raw)
            self._seq += 1
            self._document = document
            self._frame = (f"id: {self._seq}\nevent: snapshot\ndata: ".encode()
                           + _json_bytes(document) + b"\n\n")
            return self._frame

    def _unavailable(self, message: str) -> bytes:
        self._error = message
        return b"event: unavailable\ndata: " + _json_bytes({"error": message}) + b"\n\n"

    def _decorate(self, raw: dict[str, Any]) -> dict[str, Any]:
        """The snapshot with each breaker's recent transitions and the dashboard's info."""
        taken_at = raw.get("taken_at") or time.time()
        breakers = []
        for item in raw.get("breakers", []):
            name, state = str(item.get("name")), str(item.get("state"))
            changed = item.get("changed_at")
            at = changed if isinstance(changed, (int, float)) else taken_at
            # With live transitions the channel records changes; the snapshot only
            # seeds a breaker seen for the first time (no spurious reversals when a
            # snapshot taken before a message is processed after it).
            if not self._live_transitions or not self._transitions.known(name):
                self._transitions.observe(name, state, float(at),
                                          record=not self._live_transitions)
            breakers.append({**item, "transitions": self._transitions.recent(name)})
        return {**raw, "breakers": breakers,
                "dashboard": {"namespace": self._coordinator.namespace,
                              "url": self._coordinator.url,
                              "allow_write": self._allow_write,
                              "live_transitions": self._live_transitions}}

    # --- HTTP ------------------------------------------------------------------------

    async def _connection(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._connections[task] = writer
        try:
            request = await self._read(reader, writer)
            if request is not None:
                await self._route(request, writer)
        except _HTTPError as exc:
            await _answer_error(writer, exc.status, exc.message)
        except FlexiSyncError as exc:  # Redis went away during a control action
            await _answer_error(writer, 503, describe(exc)[0])
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except Exception as exc:  # a bug: answer 500, log it, keep serving
            _log().error("dashboard.request_failed", error=repr(exc), exc_info=True)
            await _answer_error(writer, 500, f"internal error ({type(exc).__name__})")
        finally:
            if task is not None:
                self._connections.pop(task, None)
            writer.close()
            try:  # a client that reads nothing would hold the close forever
                await asyncio.wait_for(writer.wait_closed(), 2.0)
            except (ConnectionError, asyncio.TimeoutError):
                writer.transport.abort()

    async def _read(self, reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter) -> _Request | None:
        """One request (line, headers, body), or ``None`` when the client left.

        Raises:
            _HTTPError: malformed, too large or too slow.
        """
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT)
        except asyncio.LimitOverrunError:
            raise _HTTPError(431, "request headers too large") from None
        except asyncio.IncompleteReadError:
            return None
        except asyncio.TimeoutError:
            raise _HTTPError(408, "request not received in time") from None
        method, target, headers = _parse_head(head)
        if "transfer-encoding" in headers:
            raise _HTTPError(501, "chunked request bodies are not accepted")
        body = b""
        length_text = headers.get("content-length", "0")
        if not length_text.isdigit():
            raise _HTTPError(400, "malformed Content-Length")
        length = int(length_text)
        if length > MAX_BODY:
            raise _HTTPError(413, f"request body over {MAX_BODY} bytes")
        if length:
            try:
                body = await asyncio.wait_for(reader.readexactly(length), READ_TIMEOUT)
            except asyncio.TimeoutError:
                raise _HTTPError(408, "request body not received in time") from None
        peer = writer.get_extra_info("peername")
        return _Request(method, urlsplit(target).path, headers, body,
                        f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "?")

    async def _route(self, request: _Request, writer: asyncio.StreamWriter) -> None:
        host = request.headers.get("host")
        if host is None:
            raise _HTTPError(400, "missing Host header")
        if self._allowed_hosts is not None and host.lower() not in self._allowed_hosts:
            raise _HTTPError(403, f"unexpected Host header {host!r} (this dashboard "
                                  "answers only to its loopback address)")
        path, method = request.path, request.method
        if path in STATIC or path in {"/events", "/api/snapshot"}:
            if method not in ({"GET", "HEAD"} if path in STATIC else {"GET"}):
                raise _HTTPError(405, f"{method} not allowed on {path}")
            if path == "/events":
                await self._events(writer)
            elif path == "/api/snapshot":
                await self._snapshot(writer)
            else:
                body, kind = self._static[path]
                await _respond(writer, 200, body, kind, head_only=method == "HEAD")
        elif path.startswith("/api/breaker/") and path.count("/") == 3:
            action = path.rsplit("/", 1)[1]
            if action not in {"open", "close", "reset"}:
                raise _HTTPError(404, f"no such action {action!r}")
            if method != "POST":
                raise _HTTPError(405, f"{method} not allowed on {path}: POST")
            await self._breaker_action(request, action, writer)
        else:
            raise _HTTPError(404, f"nothing at {path}")

    async def _snapshot(self, writer: asyncio.StreamWriter) -> None:
        frame = await self._refresh()
        if frame.startswith(b"event: unavailable"):
            raise _HTTPError(503, self._error)
        await _respond(writer, 200, _json_bytes(self._document) + b"\n")

    async def _events(self, writer: asyncio.StreamWriter) -> None:
        if len(self._clients) >= MAX_CLIENTS:
            raise _HTTPError(503, f"at most {MAX_CLIENTS} live pages at once")
        queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=1)
        writer.write(_head(200, "text/event-stream; charset=utf-8", None,
                           (("X-Accel-Buffering", "no"),)) + b"retry: 1000\n\n")
        if self._frame is not None:
            writer.write(self._frame)  # the last picture at once; a fresh one follows
        await writer.drain()
        self._clients.add(queue)
        self._wanted.set()
        self._wake.set()
        try:
            while True:
                try:
                    frame = await asyncio.wait_for(queue.get(), KEEPALIVE)
                except asyncio.TimeoutError:
                    frame = b": keepalive\n\n"
                if not frame:  # the dashboard is closing
                    return
                writer.write(frame)
                await writer.drain()
        finally:
            self._clients.discard(queue)
            if not self._clients:
                self._wanted.clear()

    async def _breaker_action(self, request: _Request, action: str,
                              writer: asyncio.StreamWriter) -> None:
        if not self._allow_write:
            raise _HTTPError(403, "this dashboard is read-only: start it with "
                                  "--allow-write to use the controls")
        self._check_same_origin(request)
        name, seconds = _action_arguments(request.body, action)
        key = self._ctx.keys.key("breaker", name)
        if not await self._ctx.abackend.call("dashboard.breaker_exists",
                                             lambda c: c.exists(key)):
            raise _HTTPError(404, f"no breaker {name!r} in namespace "
                                  f"{self._coordinator.namespace!r}")
        breaker = self._coordinator.breaker(name)
        if action != "open":
            await breaker.reset()
        elif seconds is None:
            await breaker.force_open()
        else:  # as `flexisync breaker open --for`: exactly `seconds` from now
            await breaker.trip(retry_after=seconds)
            info = await breaker.info()
            if info.state != "open" or info.retry_after > seconds + _OPEN_SLACK:
                await breaker.reset()
                await breaker.trip(retry_after=seconds)
        info = await breaker.info()
        self._wake.set()
        what = "forced open" if action == "open" and seconds is None else (
            f"opened for {seconds:g}s" if action == "open" else "reset (closed)")
        _log().warning("dashboard.breaker_changed", breaker=name, action=action,
                     seconds=seconds, client=request.peer, state=info.state)
        if self._notify is not None:
            self._notify(f"{request.peer} {what} breaker {name!r}: now {info.state}")
        await _respond(writer, 200, _json_bytes({"action": action, "name": name,
                                                 "breaker": dataclasses.asdict(info)}))

    def _check_same_origin(self, request: _Request) -> None:
        """Refuse a write another site could have sent (CSRF)."""
        headers = request.headers
        if headers.get(WRITE_HEADER) != "1":
            raise _HTTPError(403, "missing X-FlexiSync-Dashboard: 1 header (the page "
                                  "sends it; other sites cannot)")
        if headers.get("content-type", "").split(";")[0].strip().lower() != \
                "application/json":
            raise _HTTPError(403, "expected Content-Type: application/json")
        origin = headers.get("origin")
        if origin is not None and origin.lower() != f"http://{headers['host']}".lower():
            raise _HTTPError(403, f"cross-origin request from {origin!r} refused")
        site = headers.get("sec-fetch-site")
        if site is not None and site not in {"same-origin", "none"}:
            raise _HTTPError(403, f"cross-site request ({site}) refused")


def _parse_head(head: bytes) -> tuple[str, str, dict[str, str]]:
    """``(method, target, headers)`` of a request head (header names lower-cased).

    Raises:
        _HTTPError: 400 for a malformed request line or header.
    """
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1.") or not parts[1].startswith("/"):
        raise _HTTPError(400, "malformed request line")
    method, target, _ = parts
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip():
            raise _HTTPError(400, "malformed header")
        name = name.lower()
        if name in headers and name in {"host", "content-length", "origin"}:
            raise _HTTPError(400, f"repeated {name} header")
        headers[name] = value.strip()
    return method, target, headers


def _action_arguments(body: bytes, action: str) -> tuple[str, float | None]:
    """``(name, seconds)`` from a control request's JSON body.

    Raises:
        _HTTPError: 400 for a body that is not ``{"name": NAME[, "seconds": N]}``.
    """
    try:
        payload = json.loads(body or b"null")
    except ValueError:
        raise _HTTPError(400, "the body must be JSON: {\"name\": ...}") from None
    if not isinstance(payload, dict):
        raise _HTTPError(400, "the body must be a JSON object: {\"name\": ...}")
    try:
        name = validate_name(payload.get("name"), "breaker name")
    except ConfigError as exc:
        raise _HTTPError(400, str(exc)) from None
    seconds = payload.get("seconds")
    if seconds is None:
        return name, None
    if action != "open":
        raise _HTTPError(400, f"{action} takes no seconds")
    if (isinstance(seconds, bool) or not isinstance(seconds, (int, float))
            or not math.isfinite(seconds) or not 0 < seconds <= MAX_OPEN_SECONDS):
        raise _HTTPError(400, f"seconds must be a number from 0 to {MAX_OPEN_SECONDS:.0f}")
    return name, float(seconds)


def _read_static(name: str) -> bytes:
    return (importlib.resources.files("flexisync.cli.dashboard_static") / name).read_bytes()


def _head(status: int, content_type: str, length: int | None,
          extra: tuple[tuple[str, str], ...] = ()) -> bytes:
    reason = http.HTTPStatus(status).phrase
    lines = [f"HTTP/1.1 {status} {reason}", f"Content-Type: {content_type}",
             *(f"{k}: {v}" for k, v in (*SECURITY_HEADERS, *extra)), "Connection: close"]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def _respond(writer: asyncio.StreamWriter, status: int, body: bytes,
                   content_type: str = "application/json", *, head_only: bool = False,
                   ) -> None:
    writer.write(_head(status, content_type, len(body)) + (b"" if head_only else body))
    await writer.drain()


async def _answer_error(writer: asyncio.StreamWriter, status: int, message: str) -> None:
    """Answer ``{"error": message}`` with ``status``; a client already gone is ignored."""
    with contextlib.suppress(ConnectionError):
        await _respond(writer, status, _json_bytes({"error": message}))
