"""Live pub/sub fanout: every process subscribed to a topic hears an event now.

Delivery is *at most once* and *live*: an event reaches the subscriptions that exist
when it is published; one published while a process's listener was disconnected is
lost for that process (the loss is counted in :attr:`SubscriptionStats.gaps` and logged
as ``events.disconnected`` / ``events.reconnected``). Use a
:class:`~flexisync.streams.Stream` when a late or reconnecting reader must replay.

How it works, and why:

* Every subscription of a process shares the Coordinator's one listener connection and
  one listener thread (:mod:`flexisync._listener`). That thread only decodes a message
  and appends it to the subscription's bounded queue: it never blocks and never runs
  user code, so it keeps draining the socket (Redis disconnects a pub/sub client whose
  output buffer overflows).
* Each subscription has its own queue, bounded in events (``maxsize``) and in bytes
  (``max_bytes``, default 64 MiB); when either bound is passed the *oldest* events are
  dropped and counted, so a stalled consumer sees the newest events and costs bounded
  memory. The queue holds the messages as received (bytes): they are decoded when
  consumed, so ``max_bytes`` bounds what the queue holds, whatever the JSON decodes to.
* A subscription with a callback has its own dispatcher thread, so a slow or raising
  callback never delays another subscription. A raising callback is logged
  (``events.callback_failed``) and counted; delivery goes on.

Wire format: the message is JSON, ``{"flexisync": 1, "id": ..., "type": ..., "time": ...,
"source": ..., "data": ...}``. Valid JSON that is not such an envelope (published by
another program) is delivered with ``type="message"``, ``data`` = the parsed JSON, an
empty ``id`` / ``source`` and ``time`` = when it arrived. A message that is not UTF-8
JSON, nests deeper than 512 levels, or is an envelope with malformed fields (a ``type``
that breaks the name rule...) is counted as ``invalid`` and dropped; foreign data never
raises, never logs a traceback, and never stops delivery.

Accounting, per subscription and process: ``received == delivered + invalid + dropped
+ queued`` at every moment (``queued`` includes a message being decoded).
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import json
import math
import os
import secrets
import socket
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from flexisync._codec import MAX_DEPTH, dumps, loads
from flexisync._durations import optional_seconds
from flexisync._keys import is_pattern, validate_name, validate_pattern
from flexisync._listener import Registration
from flexisync._log import get_logger
from flexisync.errors import ConfigError, DecodeError

if TYPE_CHECKING:
    from flexisync.coordinator import Coordinator

__all__ = ["DEFAULT_MAX_BYTES", "Event", "EventBus", "Subscription", "SubscriptionStats"]

Callback = Callable[["Event"], Any]

_ENVELOPE_VERSION = 1
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
"""Default ``max_bytes`` of a subscription's queue: 64 MiB of messages as received."""
_HOST = socket.gethostname()


@dataclass(frozen=True, slots=True)
class Event:
    """One event, from pub/sub or from a stream.

    Attributes:
        id: unique id of the event. For pub/sub, unique across processes (empty when
            the message was not published by flexisync); for a stream, the stream
            entry id (``"<ms>-<seq>"``), usable as a resume point.
        topic: the topic (pub/sub) or the stream name.
        type: the event type given to ``publish``/``append`` (default ``"message"``).
        data: the JSON payload, decoded.
        time: when it was published, epoch seconds (the publisher's clock).
        source: ``"host:pid"`` of the publishing process (empty when unknown).
    """

    id: str
    topic: str
    type: str
    data: Any
    time: float
    source: str


@dataclass(frozen=True, slots=True)
class SubscriptionStats:
    """Counters of one subscription, in this process.

    Attributes:
        received: messages that arrived for this subscription (including invalid ones).
        delivered: events handed to the callback or returned by ``get``/iteration.
        dropped: events discarded because the queue was full (the oldest go first).
        errors: callback calls that raised.
        invalid: messages that were not JSON (dropped).
        gaps: times the listener reconnected while this subscription was live; events
            published during each outage were not delivered.
        queued: events waiting in the queue now.
    """

    received: int
    delivered: int
    dropped: int
    errors: int
    invalid: int
    gaps: int
    queued: int


class _Ids:
    """Cheap event ids unique across processes: a per-process random prefix + counter."""

    def __init__(self) -> None:
        self.pid = -1
        self.prefix = ""
        self.source = ""
        self.counter: Iterator[int] = itertools.count()

    def next(self) -> tuple[str, str]:
        pid = os.getpid()
        if pid != self.pid:  # first use, or a forked child
            self.pid = pid
            self.prefix = f"{time.time_ns() // 1_000_000:x}{secrets.token_hex(4)}-"
            self.source = f"{_HOST}:{pid}"
            self.counter = itertools.count(1)
        return f"{self.prefix}{next(self.counter):x}", self.source


_ids = _Ids()


class EventBus:
    """Publish events to topics and subscribe to them; reach it as ``coordinator.events``.

    Topics follow the name rule (1-200 characters from letters, digits and ``._-:/@``);
    :meth:`subscribe` also accepts the glob characters ``* ? [ ]``.
    """

    def __init__(self, coordinator: Coordinator) -> None:
        self._coordinator = coordinator
        self._backend = coordinator._backend
        self._keys = coordinator._keys
        self._prefix = self._keys.channel("events", "")
        self._log = get_logger("events", namespace=self._keys.namespace)
        self._subs: weakref.WeakSet[Subscription] = weakref.WeakSet()
        self._subs_lock = threading.Lock()
        self._user_hooks: list[Callable[[], None]] = []
        self._hook_remover: Callable[[], None] | None = None
        coordinator._on_fork(self._after_fork)
        coordinator._on_close(self.close)

    def __repr__(self) -> str:
        return f"<EventBus namespace={self._keys.namespace!r}>"

    # --- publishing ----------------------------------------------------------------

    def publish(self, topic: str, data: Any = None, *, type: str = "message") -> int:
        """Send ``data`` to every current subscriber of ``topic``, in every process.

        Args:
            topic: the topic (no glob characters).
            data: any JSON-serializable value.
            type: the event's type, e.g. ``"provider.down"``.

        Returns:
            How many subscriptions Redis delivered it to: one per process subscribed
            to the topic, plus one per matching pattern subscription per process.

        Raises:
            ConfigError: bad topic, or a type that breaks the name rule (it becomes
                an SSE ``event:`` line, so it may not hold spaces or newlines).
            TypeError: ``data`` is not JSON-serializable or nests deeper than 512
                levels (nothing is sent).
            BackendUnavailable: Redis could not be reached within the retry policy's
                deadline (a stalled server included: the call is bounded by it).
        """
        channel = self._prefix + validate_name(topic, "topic")
        validate_name(type, "event type")
        event_id, source = _ids.next()
        body = dumps(data, "data")
        message = (f'{{"flexisync":1,"id":"{event_id}","type":{json.dumps(type)},'
                   f'"time":{time.time()!r},"source":{json.dumps(source)},"data":{body}}}')
        # PUBLISH is not idempotent: retried only when it cannot have reached Redis.
        return int(self._backend.call("events.publish",
                                      lambda c: c.publish(channel, message),
                                      idempotent=False))

    # --- subscribing ---------------------------------------------------------------

    def subscribe(self, topic: str, callback: Callback | None = None, *,
                  maxsize: int = 1000, max_bytes: int = DEFAULT_MAX_BYTES,
                  timeout: float | None = None) -> Subscription:
        """Subscribe to a topic or a glob pattern of topics.

        Returns only once Redis has confirmed the subscription: an event published
        after this returns is delivered to it.

        Args:
            topic: a topic, or a pattern with ``*``, ``?``, ``[...]`` (``"jobs.*"``).
            callback: called as ``callback(event)`` on the subscription's own
                dispatcher thread. ``None``: pull events with ``get()`` or iteration.
            maxsize: how many events may wait; past it the oldest is dropped.
            max_bytes: how many bytes of messages (as received, before decoding) may
                wait; past it the oldest are dropped. A single message larger than
                this is dropped on arrival. Every drop is counted in ``stats.dropped``.
            timeout: seconds to wait for Redis to confirm the subscription; ``None``
                uses the retry policy's deadline.

        Raises:
            ConfigError: bad topic/pattern, ``maxsize`` or ``max_bytes`` not an int
                >= 1, bad ``timeout``, or ``callback`` not callable.
            BackendError: Redis refused the subscription, e.g. ``NOPERM`` from an ACL
                that does not allow the channel (other subscriptions are unaffected).
            BackendUnavailable: the subscription was not confirmed within the timeout
                (Redis down or stalled).
        """
        validate_pattern(topic, "topic")
        if isinstance(maxsize, bool) or not isinstance(maxsize, int) or maxsize < 1:
            raise ConfigError(f"maxsize must be an int >= 1, got {maxsize!r}")
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1:
            raise ConfigError(f"max_bytes must be an int >= 1, got {max_bytes!r}")
        limit = optional_seconds(timeout, "timeout")
        if callback is not None and not callable(callback):
            raise ConfigError(f"callback must be callable, not {type(callback).__name__}")
        listener = self._coordinator._listener
        self._ensure_reconnect_hook()
        sub = Subscription(self, topic, callback, maxsize, max_bytes)
        with self._subs_lock:
            self._subs.add(sub)
        channel = self._prefix + topic
        try:
            if is_pattern(topic):
                sub._registration = listener.psubscribe(channel, sub._on_message,
                                                        timeout=limit)
            else:
                sub._registration = listener.subscribe(channel, sub._on_message,
                                                       timeout=limit)
        except BaseException:
            sub.close()
            raise
        return sub

    def on_reconnect(self, hook: Callable[[], None]) -> Callable[[], None]:
        """Call ``hook()`` after the listener reconnected and resubscribed everything.

        Events published during the outage were lost; use this to re-read whatever
        state those events would have told you about. Hooks run one after another on a
        short-lived thread (not the listener thread); a raising hook is logged.

        Returns:
            A function that removes the hook.
        """
        if not callable(hook):
            raise ConfigError(f"hook must be callable, not {type(hook).__name__}")
        self._ensure_reconnect_hook()
        with self._subs_lock:
            self._user_hooks.append(hook)

        def remove() -> None:
            with self._subs_lock, contextlib.suppress(ValueError):
                self._user_hooks.remove(hook)

        return remove

    def close(self) -> None:
        """Close every subscription of this bus (called by ``Coordinator.close()``)."""
        with self._subs_lock:
            subs = list(self._subs)
        for sub in subs:
            sub.close()
        remover, self._hook_remover = self._hook_remover, None
        if remover is not None:
            remover()

    # --- internals -----------------------------------------------------------------

    def _ensure_reconnect_hook(self) -> None:
        with self._subs_lock:
            if self._hook_remover is None:
                self._hook_remover = self._coordinator._listener.add_reconnect_hook(
                    self._on_reconnect)

    def _on_reconnect(self) -> None:
        """On the listener thread: count the gap; run user hooks on another thread."""
        with self._subs_lock:
            subs = list(self._subs)
            hooks = list(self._user_hooks)
        for sub in subs:
            sub._gaps += 1
        if hooks:
            threading.Thread(target=self._run_hooks, args=(hooks,),
                             name="flexisync-events-reconnect", daemon=True).start()

    def _run_hooks(self, hooks: list[Callable[[], None]]) -> None:
        for hook in hooks:
            try:
                hook()
            except Exception:
                self._log.exception("events.reconnect_hook_failed")

    def _forget(self, sub: Subscription) -> None:
        with self._subs_lock:
            self._subs.discard(sub)

    def _after_fork(self) -> None:
        self._subs_lock = threading.Lock()
        for sub in list(self._subs):
            sub._after_fork()

    def _topic_of(self, channel: str) -> str:
        prefix = self._prefix
        return channel[len(prefix):] if channel.startswith(prefix) else channel


class Subscription:
    """One subscription to a topic or pattern; build it with ``EventBus.subscribe``.

    With a callback, events are delivered on the subscription's own dispatcher thread.
    Without one, pull them with :meth:`get` or by iterating (which ends once the
    subscription is closed). A context manager: leaving the block closes it.

    Attributes:
        topic: the topic or pattern subscribed to.
        maxsize: how many messages the queue holds at most.
        max_bytes: how many bytes of messages (as received) the queue holds at most.
    """

    def __init__(self, bus: EventBus, topic: str, callback: Callback | None,
                 maxsize: int, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self._bus = bus
        self.topic = topic
        self.maxsize = maxsize
        self.max_bytes = max_bytes
        self._callback = callback
        self._registration: Registration | None = None
        self._closed = False
        self._gaps = 0
        self._oversize_logged = False
        self._reset_local()

    def _reset_local(self) -> None:
        """Queue, lock, counters and thread of this process (fresh after a fork)."""
        self._cond = threading.Condition(threading.Lock())
        # Messages as received: (channel, payload, arrival time); decoded when consumed.
        self._queue: collections.deque[tuple[str, bytes, float]] = collections.deque()
        self._bytes = 0  # sum of the payload sizes in _queue
        self._in_hand = 0  # taken off the queue, being decoded
        self._received = 0
        self._delivered = 0
        self._dropped = 0
        self._errors = 0
        self._invalid = 0
        self._gen = self._bus._coordinator.fork_generation
        self._thread: threading.Thread | None = None
        if self._callback is not None and not self._closed:
            self._thread = threading.Thread(
                target=self._dispatch, name=f"flexisync-events:{self.topic}", daemon=True)
            self._thread.start()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<Subscription {self.topic!r} {state}>"

    # --- consuming -----------------------------------------------------------------

    def get(self, timeout: float | None = None) -> Event | None:
        """The next event, waiting up to ``timeout`` seconds (``None``: until one comes).

        Purely local (it never talks to Redis), so ``timeout`` bounds it whatever the
        server does. Messages that turn out not to be valid events are counted in
        ``stats.invalid`` and skipped.

        Returns:
            The oldest queued event, or ``None`` on timeout or once the subscription
            is closed.

        Raises:
            ConfigError: ``timeout`` is negative or not a number.
            RuntimeError: the subscription delivers to a callback instead.
        """
        if self._callback is not None:
            raise RuntimeError("this subscription delivers to its callback; get() is for "
                               "subscriptions made without one")
        limit = optional_seconds(timeout, "timeout", allow_zero=True)
        deadline = None if limit is None else time.monotonic() + limit
        cond, queue = self._cond, self._queue
        while True:
            with cond:
                while not queue:
                    if self._closed:
                        return None
                    if deadline is None:
                        cond.wait()
                    else:
                        remaining = deadline - time.monotonic()
                        if remaining <= 0:
                            return None
                        cond.wait(remaining)
                message = self._take()
            event = self._decode(message)
            if event is not None:
                return event

    def __iter__(self) -> Iterator[Event]:
        """Yield events as they come; ends when the subscription is closed."""
        while True:
            event = self.get()
            if event is None:
                return
            yield event

    @property
    def stats(self) -> SubscriptionStats:
        """A snapshot of this subscription's counters in this process.

        ``received == delivered + invalid + dropped + queued`` holds in every snapshot.
        """
        with self._cond:
            return SubscriptionStats(
                received=self._received, delivered=self._delivered, dropped=self._dropped,
                errors=self._errors, invalid=self._invalid, gaps=self._gaps,
                queued=len(self._queue) + self._in_hand,
            )

    @property
    def queued_bytes(self) -> int:
        """Bytes of messages waiting in the queue now (at most :attr:`max_bytes`)."""
        with self._cond:
            return self._bytes

    @property
    def closed(self) -> bool:
        """True once :meth:`close` has run."""
        return self._closed

    def close(self) -> None:
        """Unsubscribe. Idempotent.

        Events still queued are discarded (counted in ``stats.dropped``) and the
        callback is not called again. It waits up to 5 seconds for a callback that is
        running to return (not at all when called from the callback itself). A
        blocked ``get()`` returns ``None``.
        """
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._dropped += len(self._queue)
            self._queue.clear()
            self._bytes = 0
            self._cond.notify_all()
        if self._registration is not None:
            self._registration.close()
        self._bus._forget(self)
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5.0)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- decoding (on the consuming thread, outside the lock) ------------------------

    def _take(self) -> tuple[str, bytes, float]:
        """Pop the oldest message; caller holds ``_cond`` and saw the queue non-empty."""
        message = self._queue.popleft()
        self._bytes -= len(message[1])
        self._in_hand += 1
        return message

    def _decode(self, message: tuple[str, bytes, float]) -> Event | None:
        """The event a message carries, or None (counted invalid) for foreign junk."""
        channel, payload, arrived = message
        topic = self._bus._topic_of(channel)
        try:
            # The envelope adds one level around data that dumps() kept within MAX_DEPTH.
            event = _event(topic, loads(payload, topic, max_depth=MAX_DEPTH + 1), arrived)
        except DecodeError:
            event = None
        with self._cond:
            self._in_hand -= 1
            if event is None:
                self._invalid += 1
            elif self.closed:  # close() ran while it was decoded: discarded with the rest
                self._dropped += 1
                return None
            else:
                self._delivered += 1
        return event

    # --- the listener side (runs on the listener thread: enqueue, never block) -------

    def _on_message(self, channel: str, payload: bytes, _pattern: str | None) -> None:
        if self._closed or self._gen != self._bus._coordinator.fork_generation:
            return  # closed, or a forked child before its fork hook rebuilt us
        size = len(payload)
        with self._cond:
            if self.closed:  # close() ran meanwhile
                return
            self._received += 1
            if size > self.max_bytes:  # could never fit: drop it now, say so once
                self._dropped += 1
                oversize = not self._oversize_logged
                self._oversize_logged = True
            else:
                oversize = False
                queue = self._queue
                queue.append((channel, payload, time.time()))
                self._bytes += size
                while len(queue) > self.maxsize or self._bytes > self.max_bytes:
                    self._bytes -= len(queue.popleft()[1])
                    self._dropped += 1
                self._cond.notify()
        if oversize:
            self._bus._log.warning("events.message_too_large", topic=self.topic,
                                   size=size, max_bytes=self.max_bytes)

    # --- the dispatcher (callback subscriptions) --------------------------------------

    def _dispatch(self) -> None:
        callback = self._callback
        assert callback is not None
        cond, queue = self._cond, self._queue
        log = self._bus._log
        while True:
            with cond:
                while not queue and not self._closed:
                    cond.wait()
                if self._closed:
                    return
                message = self._take()
            event = self._decode(message)
            if event is None:
                continue
            try:
                callback(event)
            except Exception:
                with cond:
                    self._errors += 1
                log.exception("events.callback_failed", topic=event.topic, type=event.type)

    def _after_fork(self) -> None:
        """In a forked child: new lock and queue, fresh counters, a new dispatcher."""
        self._gaps = 0
        self._reset_local()


def _event(topic: str, doc: Any, arrived: float) -> Event | None:
    """The event a decoded message carries; None for a malformed flexisync envelope."""
    if not (isinstance(doc, dict) and doc.get("flexisync") == _ENVELOPE_VERSION):
        return Event(id="", topic=topic, type="message", data=doc, time=arrived, source="")
    event_id, kind, source = doc.get("id", ""), doc.get("type", "message"), doc.get("source", "")
    if not (isinstance(event_id, str) and isinstance(kind, str) and isinstance(source, str)):
        return None
    try:
        validate_name(kind, "event type")  # it becomes an SSE `event:` line
    except ConfigError:
        return None
    return Event(id=event_id, topic=topic, type=kind, data=doc.get("data"),
                 time=_float(doc.get("time"), arrived), source=source)


def _float(value: Any, default: float) -> float:
    """``value`` as finite float seconds, else ``default`` (foreign envelopes lie)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        with contextlib.suppress(OverflowError):
            number = float(value)
            if math.isfinite(number):
                return number
    return default
