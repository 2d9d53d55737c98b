"""One pub/sub connection and one daemon thread per Coordinator, shared by everything.

Events subscriptions, lock wake-ups and breaker mirrors all register handlers here, so a
process holds one listener socket however many primitives it uses.

Guarantees:

* :meth:`Listener.subscribe` returns only once Redis has confirmed the subscription on
  the live connection, so a PUBLISH made after it returns is delivered.
* The supervisor loop never dies silently: any error is logged, then it reconnects with
  capped, jittered backoff until :meth:`Listener.close`, resubscribes every channel and
  pattern, and only then runs the reconnect hooks (so a hook that re-reads state cannot
  miss a message published in between).
* A PING with a deadline is sent when the socket has been idle, so a half-open socket
  (server paused, network gone) is detected within ``ping_interval + ping_timeout``.
* After ``fork()`` the child drops the inherited socket without touching it (the parent
  keeps using it), keeps the registrations, and starts its own thread.

Handlers run on the listener thread: they must be quick and must not block (hand work
to another thread). A raising handler is logged and counted; it never stops delivery.

Redis Cluster: :class:`flexisync._cluster_listener.ClusterListener` is a ``Listener`` whose
keys live on several connections ("links", each a ``Listener`` of the sharded or classic
flavour sharing its owner's condition); the hooks below (``_link_of``, ``_place``,
``_unplace``, ``_new_connection``, ``_connection_lost``, ``_redirected``,
``_unsolicited_unsubscribe``, ``_excess_error``) are where it plugs in. A plain
``Listener`` is its own one link.
"""

from __future__ import annotations

import collections
import contextlib
import os
import random
import select
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import redis.exceptions as rexc

from flexisync._connection import Backend
from flexisync._core.plan import Signal
from flexisync._log import get_logger
from flexisync.errors import BackendError, BackendUnavailable

__all__ = ["Handler", "Listener", "Registration", "pubsub_connection"]

# handler(channel, data, pattern): pattern is None for a plain channel subscription.
Handler = Callable[[str, bytes, "str | None"], None]
_Key = tuple[str, str]  # ("channel" | "pattern", name)

_CLASSIC_COMMANDS = ({"channel": "SUBSCRIBE", "pattern": "PSUBSCRIBE"},
                     {"channel": "UNSUBSCRIBE", "pattern": "PUNSUBSCRIBE"})
#: The sharded flavour (Redis Cluster): channels by SSUBSCRIBE in their slot's master.
_SHARDED_COMMANDS = ({"channel": "SSUBSCRIBE", "pattern": "PSUBSCRIBE"},
                     {"channel": "SUNSUBSCRIBE", "pattern": "PUNSUBSCRIBE"})
_SUBSCRIBES = frozenset(("SUBSCRIBE", "PSUBSCRIBE", "SSUBSCRIBE"))


class Registration:
    """A handler's place in the listener; :meth:`close` removes it (idempotent)."""

    __slots__ = ("_closed", "_handler", "_key", "_listener")

    def __init__(self, listener: Listener, key: _Key, handler: Handler) -> None:
        self._listener = listener
        self._key = key
        self._handler = handler
        self._closed = False

    def close(self, *, wait: bool = True) -> None:
        """Stop delivering to this handler; unsubscribes when it was the last one.

        Args:
            wait: when this was the channel's last handler, return only once Redis
                confirmed the unsubscribe (bounded by the listener's
                ``ping_timeout``), so a PUBLISH made afterwards no longer counts this
                process as a receiver. ``False`` sends the unsubscribe and returns at
                once (a lock waiter leaving, where nobody counts receivers).
        """
        if not self._closed:
            self._closed = True
            self._listener._remove(self._key, self._handler, wait=wait)

    async def aclose(self) -> None:
        """:meth:`close` with ``wait=True`` for coroutines: the same guarantee, without
        blocking the event loop. Cancelled while it waits, the handler is removed all the
        same (only the wait for Redis's confirmation is cut short)."""
        if not self._closed:
            self._closed = True
            await self._listener._remove_async(self._key, self._handler)


class Listener:
    """The Coordinator's pub/sub listener. Internal; see the module docstring.

    Bookkeeping is per connection and bounded by what is live, never by the names ever
    used: every (P)(UN)SUBSCRIBE and PING goes out as its own command with a sequence
    number and is remembered in a FIFO until Redis answers it (Redis answers in order,
    one reply each), so an error reply names the command it refuses. Per key, only
    keys that still have handlers are remembered.
    """

    def __init__(self, backend: Backend, *, name: str = "flexisync-listener",
                 ping_interval: float = 2.0, ping_timeout: float = 2.0,
                 poll: float = 0.25, backoff_max: float = 2.0, sharded: bool = False) -> None:
        self._backend = backend
        self._sharded = sharded
        self._subscribe_commands, self._unsubscribe_commands = (
            _SHARDED_COMMANDS if sharded else _CLASSIC_COMMANDS)
        self._name = name
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self._poll = poll
        self._backoff_max = backoff_max
        self._log = get_logger("events", address=backend.address)
        self._handlers: dict[_Key, list[Handler]] = {}
        self._hooks: list[Callable[[], None]] = []
        self.reconnects = 0
        self.handler_errors = 0
        self._reset_runtime()

    def _reset_runtime(self) -> None:
        self._cond = threading.Condition()
        self._write_lock = threading.Lock()
        self._conn: Any = None
        self._gen = 0
        self._reset_connection_state()
        self._waiting: dict[_Key, int] = {}  # threads in _add waiting on a key
        self._signals: set[Signal] = set()  # coroutines in subscribe_async
        self._hooks_due = False
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._retry_now = threading.Event()  # reconnect()/close(): cut a backoff short
        self._closed = False

    def _reset_connection_state(self) -> None:
        """Forget what was sent on the previous connection; caller holds ``_cond``."""
        self._sent = 0  # commands sent on this connection
        self._answered = 0  # ... and answered, in order
        self._pending: collections.deque[tuple[str, _Key | None]] = collections.deque()
        self._sub_seq: dict[_Key, int] = {}  # key -> number of its latest (P)SUBSCRIBE
        self._refused: dict[_Key, str] = {}  # key -> why Redis refused that (P)SUBSCRIBE

    # --- public (internal API) -----------------------------------------------------

    def subscribe(self, channel: str, handler: Handler, *, timeout: float | None = None,
                  ) -> Registration:
        """Deliver messages on ``channel`` to ``handler``; returns once Redis confirmed.

        Raises:
            BackendError: Redis refused the subscription (an ACL without the channel:
                NOPERM); the listener stays connected for everything else.
            BackendUnavailable: not confirmed within ``timeout`` seconds (default:
                the retry policy's deadline).
        """
        return self._add(("channel", channel), handler, timeout)

    def psubscribe(self, pattern: str, handler: Handler, *, timeout: float | None = None,
                   ) -> Registration:
        """Deliver messages on channels matching the glob ``pattern`` to ``handler``.

        Raises:
            BackendError, BackendUnavailable: as :meth:`subscribe`.
        """
        return self._add(("pattern", pattern), handler, timeout)

    def add_reconnect_hook(self, hook: Callable[[], None]) -> Callable[[], None]:
        """Call ``hook()`` on the listener thread after every reconnect + resubscribe.

        Returns a function that removes the hook.
        """
        with self._cond:
            self._hooks.append(hook)

        def remove() -> None:
            with self._cond:
                if hook in self._hooks:
                    self._hooks.remove(hook)

        return remove

    @property
    def connected(self) -> bool:
        """True while the listener holds a live, subscribed connection."""
        return self._conn is not None

    @property
    def generation(self) -> int:
        """Connections made so far; grows by one on every reconnect."""
        return self._gen

    def table_sizes(self) -> dict[str, int]:
        """How many entries each internal table holds (tests check they stay bounded)."""
        with self._cond:
            return {"handlers": len(self._handlers), "pending": len(self._pending),
                    "sub_seq": len(self._sub_seq), "refused": len(self._refused),
                    "waiting": len(self._waiting), "hooks": len(self._hooks)}

    def close(self) -> None:
        """Stop the thread and close the socket. Registrations are dropped."""
        with self._cond:
            self._closed = True
            self._stop.set()
            self._retry_now.set()
            conn, self._conn = self._conn, None
            self._handlers.clear()
            self._reset_connection_state()
            self._notify_all()
        if conn is not None:
            _disconnect(conn)
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5.0)

    def reconnect(self) -> None:
        """Drop the live connection now (e.g. the master moved): the supervisor loop
        reconnects at once, resubscribes everything and then runs the reconnect hooks.
        A no-op when not connected."""
        with self._cond:
            conn = self._conn
        self._retry_now.set()  # also when not connected: retry now, not after the backoff
        if conn is not None:
            _disconnect(conn)  # wakes the reader with EOF; _run reconnects

    def after_fork(self) -> None:
        """In a forked child: forget the parent's socket and thread, keep registrations."""
        handlers, hooks = self._handlers, self._hooks
        closed = self._closed
        self._reset_runtime()  # new Condition: the parent's may have been held at fork
        self._handlers, self._hooks, self._closed = handlers, hooks, closed
        if self._handlers and not closed:
            self._ensure_thread()

    # --- registration ------------------------------------------------------------

    def _notify_all(self) -> None:
        """Wake every waiter: threads on ``_cond``, coroutines on their signals.
        Caller holds ``_cond``."""
        self._cond.notify_all()
        if self._signals:
            for signal in self._signals:
                signal.set()

    def _add(self, key: _Key, handler: Handler, timeout: float | None) -> Registration:
        start = time.monotonic()
        self._check_fork()
        with self._cond:
            registration, deadline, limit = self._register(key, handler, timeout, start)
            try:
                while not self._settle_wait(key, handler, start, deadline, limit):
                    self._cond.wait(deadline - time.monotonic())
            finally:
                self._unwait(key)
            return registration

    async def subscribe_async(self, key: _Key, handler: Handler, *,
                              timeout: float | None = None) -> Registration:
        """:meth:`subscribe` (``key = ("channel", name)``) or :meth:`psubscribe`
        (``("pattern", glob)``) for coroutines: the same guarantees and errors, without
        blocking the event loop. Cancelled while it waits, the handler is removed."""
        start = time.monotonic()
        signal = Signal()
        self._check_fork()
        with self._cond:
            registration, deadline, limit = self._register(key, handler, timeout, start)
            self._signals.add(signal)
        try:
            while True:
                with self._cond:
                    signal.clear()
                    if self._settle_wait(key, handler, start, deadline, limit):
                        return registration
                await signal.wait_async(deadline - time.monotonic())
        except BaseException:
            registration.close(wait=False)
            raise
        finally:
            with self._cond:
                self._signals.discard(signal)
                self._unwait(key)

    def _check_fork(self) -> None:
        """In a child forked without Python's hooks (uWSGI), reset the Context (this
        listener included: a new ``_cond``) before taking any of its locks."""
        if self._backend.pid != os.getpid():
            self._backend.check_fork()

    def _register(self, key: _Key, handler: Handler, timeout: float | None,
                  start: float) -> tuple[Registration, float, float]:
        """Add ``handler`` and send the (P)SUBSCRIBE if it is the key's first; caller
        holds ``_cond`` and ran :meth:`_check_fork` before taking it. Returns the
        registration, the deadline and the limit."""
        limit = timeout if timeout is not None else self._backend.retry.deadline
        if self._closed:
            raise BackendUnavailable(self._backend.address, reason="the Coordinator is closed")
        handlers = self._handlers.setdefault(key, [])
        handlers.append(handler)
        if len(handlers) == 1:
            self._place(key)
        self._ensure_thread()
        self._waiting[key] = self._waiting.get(key, 0) + 1
        return Registration(self, key, handler), start + limit, limit

    def _unwait(self, key: _Key) -> None:
        left = self._waiting.get(key, 0) - 1
        if left > 0:
            self._waiting[key] = left
        else:
            self._waiting.pop(key, None)

    def _settle_wait(self, key: _Key, handler: Handler, start: float, deadline: float,
                     limit: float) -> bool:
        """True once ``key`` is confirmed; raises when refused, closed or out of time
        (removing ``handler``). Caller holds ``_cond``."""
        if self._is_confirmed(key):
            return True
        refused = self._refusal(key) if self._is_settled(key) else None
        if refused is not None:
            self._remove_locked(key, handler)
            command = "subscribe" if key[0] == "channel" else "psubscribe"
            raise BackendError(f"{command} {key[1]!r}", refused)
        if deadline - time.monotonic() <= 0 or self._closed:
            self._remove_locked(key, handler)
            reason = "the Coordinator is closed" if self._closed else (
                f"subscription to {key[1]!r} was not confirmed within {limit:.3f}s")
            raise BackendUnavailable(self._backend.address,
                                     elapsed=time.monotonic() - start, reason=reason)
        return False

    def _is_settled(self, key: _Key) -> bool:
        """Redis answered the latest (P)SUBSCRIBE of ``key`` on the live connection."""
        link = self._link_of(key)
        if link is None:
            return False
        seq = link._sub_seq.get(key)
        return link._conn is not None and seq is not None and link._answered >= seq

    def _is_confirmed(self, key: _Key) -> bool:
        return self._is_settled(key) and self._refusal(key) is None

    def _refusal(self, key: _Key) -> str | None:
        """Why Redis refused ``key``'s latest subscribe, if it did."""
        link = self._link_of(key)
        return None if link is None else link._refused.get(key)

    # --- where a key lives (a cluster listener spreads keys over several links) -----------

    def _link_of(self, key: _Key) -> Listener | None:  # noqa: ARG002
        """The listener whose connection carries ``key``'s subscription (caller holds
        ``_cond``); ``None`` while it has none (a cluster key between two nodes)."""
        return self

    def _place(self, key: _Key) -> None:
        """``key`` got its first handler: subscribe it (caller holds ``_cond``)."""
        if self._conn is not None:
            self._send_subscribe(self._conn, [key])

    def _unplace(self, key: _Key) -> tuple[Listener, int] | None:
        """``key`` lost its last handler: forget it and send the unsubscribe (caller
        holds ``_cond``). Returns the link and the number of the unsubscribe to await."""
        self._sub_seq.pop(key, None)
        refused = self._refused.pop(key, None)
        conn = self._conn
        if conn is None or refused is not None:
            return None  # nothing to undo on the server
        return self, self._send(conn, [(self._unsubscribe_commands[key[0]], key)])

    def _on_listener_thread(self) -> bool:
        """True on a thread that reads this listener's replies (it must never wait
        for one)."""
        return threading.current_thread() is self._thread

    def _remove(self, key: _Key, handler: Handler, *, wait: bool = False) -> None:
        with self._cond:
            found = self._remove_locked(key, handler)
            if not wait or found is None or self._on_listener_thread():
                return
            link, target = found
            gen = link._gen
            deadline = time.monotonic() + self.ping_timeout
            while (link._gen == gen and link._conn is not None and not self._closed
                   and link._answered < target):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return  # delivery already stopped here; only the server lags
                self._cond.wait(remaining)

    async def _remove_async(self, key: _Key, handler: Handler) -> None:
        """:meth:`_remove` with ``wait=True``, awaiting the UNSUBSCRIBE's answer."""
        signal = Signal()
        with self._cond:
            found = self._remove_locked(key, handler)
            if found is None:
                return
            link, target = found
            gen = link._gen
            deadline = time.monotonic() + self.ping_timeout
            self._signals.add(signal)
        try:
            while True:
                with self._cond:
                    signal.clear()
                    if (link._gen != gen or link._conn is None or self._closed
                            or link._answered >= target):
                        return
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return  # delivery already stopped here; only the server lags
                await signal.wait_async(remaining)
        finally:
            with self._cond:
                self._signals.discard(signal)

    def _remove_locked(self, key: _Key, handler: Handler) -> tuple[Listener, int] | None:
        """Drop ``handler``; returns the link and the number of the UNSUBSCRIBE to
        await, if one was sent."""
        handlers = self._handlers.get(key)
        if not handlers or handler not in handlers:
            return None
        handlers.remove(handler)
        if handlers:
            return None
        del self._handlers[key]
        return self._unplace(key)

    def _send_subscribe(self, conn: Any, keys: list[_Key]) -> None:
        """Send one (P)SUBSCRIBE per key, in one write; caller holds ``_cond``.

        One command per key so that a refusal (one error reply for the whole command)
        is pinned on exactly the key Redis refused.
        """
        commands = [(self._subscribe_commands[key[0]], key) for key in keys]
        last = self._send(conn, commands)
        for offset, key in enumerate(keys):
            self._sub_seq[key] = last - len(keys) + 1 + offset
            self._refused.pop(key, None)

    def _send(self, conn: Any, commands: Sequence[tuple[str, _Key | None]]) -> int:
        """Send ``commands``, each awaiting one reply; caller holds ``_cond``.

        Returns the sequence number of the last one.
        """
        for command, key in commands:
            self._sent += 1
            self._pending.append((command, key))
        args = [(command,) if key is None else (command, key[1]) for command, key in commands]
        try:
            with self._write_lock:
                conn.send_packed_command(conn.pack_commands(args), check_health=False)
        except (rexc.RedisError, OSError):
            # The reader notices the broken socket and reconnects; the reconnect
            # resubscribes everything registered, so nothing is lost here.
            pass
        return self._sent

    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
            self._thread.start()

    # --- the supervisor loop -----------------------------------------------------------

    def _run(self) -> None:
        failures = 0
        outage_logged = False
        while not self._stop.is_set():
            try:
                conn = self._connect()
                if outage_logged:
                    self._log.info("events.reconnected", attempts=failures)
                failures = 0
                outage_logged = False
                self._serve(conn)
            except Exception as exc:
                if self._stop.is_set():
                    break
                with self._cond:
                    conn, self._conn = self._conn, None
                    self._notify_all()
                if conn is not None:
                    _disconnect(conn)
                failures += 1
                if not outage_logged:
                    self._log.warning("events.disconnected", error=f"{type(exc).__name__}: {exc}")
                    outage_logged = True
                try:
                    self._connection_lost()
                except Exception:
                    self._log.exception("events.reroute_failed")
                delay = min(self._backoff_max, 0.05 * 2 ** min(failures - 1, 10))
                self._retry_now.wait(random.uniform(delay / 2, delay))
                self._retry_now.clear()

    def _new_connection(self) -> Any:
        """A fresh pub/sub connection (not yet connected, or connected)."""
        return _make_connection(self._backend.client)

    def _connection_lost(self) -> None:
        """Called on the listener thread after each failed connection or attempt."""

    def _connect(self) -> Any:
        conn = self._new_connection()
        conn.connect()
        with self._cond:
            if self._stop.is_set():
                _disconnect(conn)
                return conn
            self._gen += 1
            if self._gen > 1:
                self.reconnects += 1
            self._conn = conn
            self._reset_connection_state()
            if self._handlers:
                self._send_subscribe(conn, list(self._handlers))
            self._hooks_due = self._gen > 1
            self._notify_all()
        return conn

    def _serve(self, conn: Any) -> None:
        last_heard = time.monotonic()
        ping_sent: float | None = None
        self._maybe_run_hooks()
        read = _fast_reader(conn) or _slow_reader(conn)
        while not self._stop.is_set():
            reply = read(self._poll)
            if reply is not _NOTHING:
                last_heard = time.monotonic()
                ping_sent = None
                self._dispatch(reply)
                continue
            now = time.monotonic()
            if ping_sent is not None:
                if now - ping_sent > self.ping_timeout:
                    raise TimeoutError(f"no PONG within {self.ping_timeout}s (half-open socket?)")
            elif now - last_heard >= self.ping_interval:
                with self._cond:
                    self._send(conn, [("PING", None)])
                ping_sent = now

    def _dispatch(self, reply: Any) -> None:
        if type(reply) is list and len(reply) == 3 and reply[0] == b"message":
            # The common case first: a message on a channel (hiredis gives bytes).
            name = reply[1]
            channel = name.decode("utf-8", "replace") if type(name) is bytes else str(name)
            self._deliver(("channel", channel), channel, reply[2], None)
            return
        if isinstance(reply, rexc.ResponseError):
            if not self._excess_error(reply):
                self._answer(None, reply)
            return
        if not isinstance(reply, list) or not reply:
            # A plain reply (b"PONG" once no subscription is left) answers a command too.
            self._answer(_text(reply), None)
            return
        kind = _text(reply[0])
        if kind in ("message", "smessage"):
            self._deliver(("channel", _text(reply[1])), _text(reply[1]), reply[2], None)
        elif kind == "pmessage":
            pattern = _text(reply[1])
            self._deliver(("pattern", pattern), _text(reply[2]), reply[3], pattern)
        elif kind == "sunsubscribe" and not self._answers_head(
                "SUNSUBSCRIBE", ("channel", _text(reply[1]))):
            # Not the answer to our SUNSUBSCRIBE: Redis dropped the channel because its
            # slot moved to another node (cluster resharding or failover).
            self._unsolicited_unsubscribe(_text(reply[1]))
        elif kind in ("subscribe", "psubscribe", "unsubscribe", "punsubscribe", "pong",
                      "ssubscribe", "sunsubscribe"):
            self._answer(kind, None)

    def _answers_head(self, command: str, key: _Key) -> bool:
        """True when the oldest command awaiting its reply is ``command`` on ``key``."""
        with self._cond:
            return bool(self._pending) and self._pending[0] == (command, key)

    def _unsolicited_unsubscribe(self, channel: str) -> None:
        """Redis dropped ``channel`` on its own (sharded: the slot moved away)."""
        self._log.warning("events.unexpected_reply", kind="sunsubscribe", channel=channel)

    def _excess_error(self, error: rexc.ResponseError) -> bool:  # noqa: ARG002
        """True for an error reply that answers no pending command (dropped)."""
        return False

    def _redirected(self, command: str, key: _Key | None,  # noqa: ARG002
                    error: rexc.ResponseError) -> bool:  # noqa: ARG002
        """Handle a cluster redirection (MOVED...) answering ``command``; caller holds
        ``_cond``. True when handled (neither a refusal nor worth a warning)."""
        return False

    def _answer(self, kind: str | None, error: rexc.ResponseError | None) -> None:
        """Redis answered the oldest command still pending: a reply or an error."""
        with self._cond:
            if not self._pending:
                self._log.warning("events.unexpected_reply", kind=kind, error=str(error))
                return
            command, key = self._pending.popleft()
            self._answered += 1
            if error is not None and self._redirected(command, key, error):
                pass
            elif error is not None and key is not None and command in _SUBSCRIBES \
                    and self._sub_seq.get(key) == self._answered:
                reason = str(error)
                if isinstance(error, rexc.NoPermissionError):
                    reason = f"NOPERM {reason}"
                self._refused[key] = reason
                if not self._waiting.get(key):  # nobody to raise to: say it once here
                    self._log.warning("events.subscribe_refused", channel=key[1],
                                      error=reason)
            elif error is not None:
                self._log.warning("events.command_refused", command=command,
                                  error=str(error))
            self._notify_all()
        if command.endswith("SUBSCRIBE"):
            self._maybe_run_hooks()

    def _deliver(self, key: _Key, channel: str, data: Any, pattern: str | None) -> None:
        handlers = self._handlers.get(key)
        if not handlers:
            return
        payload = data if type(data) is bytes or isinstance(data, bytes) else str(data).encode()
        if len(handlers) == 1:
            handler = handlers[0]
            try:
                handler(channel, payload, pattern)
            except Exception:
                self.handler_errors += 1
                self._log.exception("events.handler_failed", channel=channel)
            return
        for handler in tuple(handlers):
            try:
                handler(channel, payload, pattern)
            except Exception:
                self.handler_errors += 1
                self._log.exception("events.handler_failed", channel=channel)

    def _maybe_run_hooks(self) -> None:
        with self._cond:
            if not self._hooks_due or not all(self._is_settled(k) for k in self._handlers):
                return
            self._hooks_due = False
            hooks = list(self._hooks)
        for hook in hooks:
            try:
                hook()
            except Exception:
                self._log.exception("events.reconnect_hook_failed")


_NOTHING: Any = object()  # a reader's "nothing arrived within the poll interval"


def _slow_reader(conn: Any) -> Callable[[float], Any]:
    """Read replies through redis-py (any parser, any platform)."""

    def read(timeout: float) -> Any:
        if not conn.can_read(timeout=timeout):
            return _NOTHING
        try:
            return conn.read_response(disconnect_on_error=False)
        except rexc.ResponseError as exc:  # an error reply: the socket is fine
            return exc

    return read


def _fast_reader(conn: Any) -> Callable[[float], Any] | None:
    """Read replies straight off the socket with a hiredis reader of our own.

    Latency: a message costs one ``poll`` and one ``read`` (two releases of the GIL)
    instead of redis-py's four to six syscalls per reply (``can_read`` polls twice and
    peeks; the socket timeout adds a poll before each ``recv``), each a point where the
    thread waiting for this message (an event loop, a lock waiter) and this thread hand
    the GIL back and forth: measured, ~30 µs less per async publish -> receive. Used on
    a fresh real socket with redis-py's hiredis parser holding no buffered data (right
    after ``connect()``); None otherwise (memory://, no hiredis, no ``poll``): then
    :func:`_slow_reader`.
    """
    try:
        import hiredis  # noqa: PLC0415  (redis[hiredis] is a dependency; stay optional)
    except ImportError:  # pragma: no cover - hiredis is installed with flexisync
        return None
    from redis._parsers import _HiredisParser  # noqa: PLC0415

    sock = getattr(conn, "_sock", None)
    parser = getattr(conn, "_parser", None)
    if not (isinstance(sock, socket.socket) and isinstance(parser, _HiredisParser)
            and hasattr(select, "poll")):
        return None  # a fake socket (memory://), the pure-Python parser, no poll()
    buffered = getattr(getattr(parser, "_reader", None), "has_data", None)
    if buffered is None or buffered():
        return None  # data already buffered in redis-py's reader: let it parse
    reader = hiredis.Reader(protocolError=rexc.InvalidResponse,
                            replyError=getattr(parser, "parse_error", rexc.ResponseError))
    buffer = bytearray(65536)
    fd = sock.fileno()
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    pending = getattr(sock, "pending", None)  # TLS: decrypted bytes above the socket
    readv = getattr(os, "readv", None)
    if pending is not None or readv is None:  # TLS, or no readv: through the socket
        def fill() -> int:
            return int(sock.recv_into(buffer))
    else:  # a plain socket: one read(2), not the socket timeout's poll + recv
        def fill() -> int:
            return readv(fd, [buffer])  # type: ignore[no-any-return]

    def read(timeout: float) -> Any:
        reply = reader.gets()
        if reply is not False:
            return reply
        # The fd is checked while this thread holds the GIL, so a close() from another
        # thread (which needs the GIL) cannot slip in before the syscall; a close
        # during it shuts the socket down first, which wakes poll and read with EOF.
        if sock.fileno() != fd:
            raise ConnectionError("the listener connection was closed")
        if not (pending is not None and pending()) and not poller.poll(timeout * 1000):
            return _NOTHING
        if sock.fileno() != fd:
            raise ConnectionError("the listener connection was closed")
        size = fill()
        if not size:
            raise ConnectionError("Redis closed the listener connection")
        reader.feed(buffer, 0, size)  # type: ignore[arg-type]  # any buffer works
        reply = reader.gets()
        return _NOTHING if reply is False else reply

    return read


def _make_connection(client: Any) -> Any:
    """A fresh connection outside the pool, set up for pub/sub reading."""
    from flexisync._connection import topology_of  # noqa: PLC0415

    if topology_of(client) == "sentinel":
        from flexisync import _sentinel  # noqa: PLC0415

        return _sentinel.pubsub_connection(client)
    return pubsub_connection(client.connection_pool)


def pubsub_connection(pool: Any, **overrides: Any) -> Any:
    """A fresh connection like ``pool``'s (``overrides`` on top: another host, port),
    outside the pool, set up for pub/sub reading."""
    kwargs = dict(pool.connection_kwargs)
    kwargs.update(overrides)
    kwargs["decode_responses"] = False
    kwargs["health_check_interval"] = 0
    kwargs["protocol"] = 2  # RESP2: confirmations and messages come back as replies
    # Reads only follow can_read(); this bounds a stall.
    kwargs["socket_timeout"] = overrides.get("socket_timeout", 10.0)
    return pool.connection_class(**kwargs)


def _disconnect(conn: Any) -> None:
    with contextlib.suppress(rexc.RedisError, OSError):
        conn.disconnect()


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
