"""Pub/sub events, the logic both shells share: envelope, ids, queues and accounting.

:mod:`flexisync.events` (threads) and :mod:`flexisync.aio.events` (asyncio) subclass
:class:`BusCore` and :class:`SubscriptionCore` and only add how a consumer waits and
where a callback runs. Everything else is here once:

* the wire format: a JSON envelope ``{"flexisync": 1, "id": ..., "type": ..., "time":
  ..., "source": ..., "data": ...}``; valid JSON that is not such an envelope (another
  program's) is delivered with ``type="message"``; anything else is counted ``invalid``;
* event ids unique across processes (:data:`_ids`, also used by streams);
* topic/pattern validation and the channel layout (``<namespace>:events:<topic>``);
* publishing as a plan (:meth:`BusCore.publish_plan`), subscribing as a plan
  (:meth:`BusCore.subscribe_plan`);
* the bounded per-subscription queue, filled on the listener thread (never blocking,
  never running user code), bounded in events and bytes, dropping the oldest, with the
  invariant ``received == delivered + invalid + dropped + queued``;
* gap counting on listener reconnects and the ``on_reconnect`` hook bookkeeping.
"""

from __future__ import annotations

import collections
import contextlib
import enum
import itertools
import json
import math
import os
import secrets
import socket
import threading
import time
import weakref
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Final, Literal

from flexisync._codec import MAX_DEPTH, dumps, loads
from flexisync._core.plan import Call, Plan, Signal, Subscribe
from flexisync._core.tally import tally_of
from flexisync._durations import optional_seconds
from flexisync._keys import is_pattern, validate_name, validate_pattern
from flexisync._log import get_logger
from flexisync.errors import ConfigError, DecodeError

if TYPE_CHECKING:
    from flexisync._core.context import Context
    from flexisync._listener import Registration

__all__ = ["DEFAULT_MAX_BYTES", "BusCore", "Event", "SubscriptionCore", "SubscriptionStats"]

_ENVELOPE_VERSION = 1
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
"""Default ``max_bytes`` of a subscription's queue: 64 MiB of messages as received."""
_HOST = socket.gethostname()

class _Empty(enum.Enum):
    EMPTY = 0


#: What :meth:`SubscriptionCore._take_event` returns when nothing is queued.
EMPTY: Final = _Empty.EMPTY

#: A message as received: (channel, payload, arrival time); decoded when consumed.
Message = tuple[str, bytes, float]


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
        self.source_json = '""'  # json.dumps(source), for the envelope
        self.counter: Iterator[int] = itertools.count()

    def next(self) -> tuple[str, str]:
        """A fresh ``(event id, "host:pid")``."""
        pid = os.getpid()
        if pid != self.pid:  # first use, or a forked child
            self.pid = pid
            self.prefix = f"{time.time_ns() // 1_000_000:x}{secrets.token_hex(4)}-"
            self.source = f"{_HOST}:{pid}"
            self.source_json = json.dumps(self.source)
            self.counter = itertools.count(1)
        return f"{self.prefix}{next(self.counter):x}", self.source


class _Valid:
    """Names already validated, mapped to what is derived from them (bounded memo).

    ``get(name)`` returns the derived value of a valid ``name`` (a str), raising
    ConfigError like :func:`~flexisync._keys.validate_name` for an invalid one; only
    exact ``str`` instances are remembered, and the memo is emptied when full.
    """

    __slots__ = ("_derive", "_kind", "_memo")

    def __init__(self, kind: str, derive: Callable[[str], str]) -> None:
        self._kind = kind
        self._derive = derive
        self._memo: dict[str, str] = {}

    def get(self, name: object) -> str:
        if type(name) is str:
            found = self._memo.get(name)
            if found is not None:
                return found
        value = self._derive(validate_name(name, self._kind))
        if type(name) is str:
            if len(self._memo) >= _MEMO_SIZE:
                self._memo.clear()
            self._memo[name] = value
        return value


_MEMO_SIZE = 1024
#: Messages up to this many bytes are decoded while the queue's lock is held.
_DECODE_HELD = 4096
#: Event types seen valid, as their JSON text (publish) or as themselves (receive).
_type_json = _Valid("event type", json.dumps)
_type_seen = _Valid("event type", str)


_ids = _Ids()


class BusCore:
    """What an event bus of either shell holds: channel layout, subscriptions, hooks.

    Shells implement :meth:`_run_user_hooks` (where ``on_reconnect`` hooks run).
    """

    def __init__(self, ctx: Context) -> None:
        self._ctx = ctx
        self._keys = ctx.keys
        self._prefix = ctx.keys.channel("events", "")
        prefix = self._prefix
        self._channels = _Valid("topic", lambda topic: prefix + topic)
        self._log = get_logger("events", namespace=ctx.keys.namespace)
        self._subs: weakref.WeakSet[SubscriptionCore] = weakref.WeakSet()
        self._subs_lock = threading.Lock()
        self._user_hooks: list[Any] = []
        self._hook_remover: Callable[[], None] | None = None
        ctx.on_fork(self._after_fork)
        ctx.on_close(self._close_all)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} namespace={self._keys.namespace!r}>"

    # --- plans ---------------------------------------------------------------------

    def publish_plan(self, topic: str, data: Any, type: str) -> Plan[int]:
        """Validate and encode at call time, then PUBLISH; the plan returns the count.

        Raises (before any I/O):
            ConfigError: bad topic or event type.
            TypeError: ``data`` is not JSON-serializable or nests too deep.
        """
        channel = self._channels.get(topic)
        kind = _type_json.get(type)
        event_id, _ = _ids.next()
        body = dumps(data, "data")
        message = (f'{{"flexisync":1,"id":"{event_id}","type":{kind},'
                   f'"time":{time.time()!r},"source":{_ids.source_json},"data":{body}}}')
        return self._publish(topic, channel, message)

    def _publish(self, topic: str, channel: str, message: str) -> Plan[int]:
        # PUBLISH is not idempotent: retried only when it cannot have reached Redis.
        count = yield Call("events.publish", partial(_publish, channel, message),
                           idempotent=False)
        tally_of(self._ctx).topic(topic).published += 1
        return int(count)

    def live_subscriptions(self) -> list[SubscriptionCore]:
        """The subscriptions of this bus that are open now (for metrics)."""
        with self._subs_lock:
            return [sub for sub in self._subs if not sub._closed]

    def subscribe_plan(self, sub: SubscriptionCore, timeout: float | None,
                       ) -> Plan[SubscriptionCore]:
        """Register ``sub`` on the shared listener; returns it once Redis confirmed.

        On any failure or cancellation ``sub`` is closed (nothing stays registered).
        """
        self._ensure_reconnect_hook()
        with self._subs_lock:
            self._subs.add(sub)
        kind = "pattern" if is_pattern(sub.topic) else "channel"
        try:
            sub._registration = yield Subscribe(kind, self._prefix + sub.topic,
                                                sub._on_message, timeout)
        except BaseException:  # GeneratorExit included: a cancelled await
            sub._close_local()
            raise
        if sub._closed:  # closed (Coordinator closed) while it was being confirmed
            sub._registration.close(wait=False)
        return sub

    @staticmethod
    def _check_subscribe(topic: str, callback: Any, maxsize: int, max_bytes: int,
                         timeout: float | None) -> float | None:
        """Validate ``subscribe``'s arguments; returns the timeout in seconds (or None).

        Raises:
            ConfigError: bad topic/pattern, ``maxsize``/``max_bytes`` not an int >= 1, bad
                ``timeout``, or ``callback`` neither None nor callable.
        """
        validate_pattern(topic, "topic")
        for label, value in (("maxsize", maxsize), ("max_bytes", max_bytes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{label} must be an int >= 1, got {value!r}")
        limit = optional_seconds(timeout, "timeout")
        if callback is not None and not callable(callback):
            raise ConfigError(f"callback must be callable, not {type(callback).__name__}")
        return limit

    # --- reconnect hooks ---------------------------------------------------------------

    def _add_user_hook(self, hook: Any, entry: Any) -> Callable[[], None]:
        """Remember an ``on_reconnect`` entry for ``hook``; returns its remover.

        Raises:
            ConfigError: ``hook`` is not callable.
        """
        if not callable(hook):
            raise ConfigError(f"hook must be callable, not {type(hook).__name__}")
        self._ensure_reconnect_hook()
        with self._subs_lock:
            self._user_hooks.append(entry)

        def remove() -> None:
            with self._subs_lock, contextlib.suppress(ValueError):
                self._user_hooks.remove(entry)

        return remove

    def _ensure_reconnect_hook(self) -> None:
        with self._subs_lock:
            if self._hook_remover is None:
                self._hook_remover = self._ctx.listener.add_reconnect_hook(
                    self._on_reconnect)

    def _on_reconnect(self) -> None:
        """On the listener thread: count the gap; hand user hooks to the shell."""
        with self._subs_lock:
            subs = list(self._subs)
            hooks = list(self._user_hooks)
        for sub in subs:
            sub._gaps += 1
        if hooks:
            self._run_user_hooks(hooks)

    def _run_user_hooks(self, hooks: list[Any]) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    # --- lifetime ----------------------------------------------------------------------

    def _close_all(self) -> None:
        """Close every subscription without waiting (the Context is closing)."""
        with self._subs_lock:
            subs = list(self._subs)
        for sub in subs:
            sub._shutdown()
        remover, self._hook_remover = self._hook_remover, None
        if remover is not None:
            remover()

    def _forget(self, sub: SubscriptionCore) -> None:
        with self._subs_lock:
            self._subs.discard(sub)

    def _after_fork(self) -> None:
        self._subs_lock = threading.Lock()
        for sub in list(self._subs):
            sub._after_fork()

    def _topic_of(self, channel: str) -> str:
        prefix = self._prefix
        return channel[len(prefix):] if channel.startswith(prefix) else channel


class SubscriptionCore:
    """One subscription's queue and counters, shared by both shells.

    The listener thread calls :meth:`_on_message` (enqueue, never block); a consumer
    runs the wait plan :meth:`_pull` (take, decode outside the lock, or wait on the
    ``_ready`` signal). Shells only wait (blocking or awaiting) and add
    :meth:`_start_local` (a callback worker) after (re)building the queue.

    Attributes:
        topic: the topic or pattern subscribed to.
        maxsize: how many messages the queue holds at most.
        max_bytes: how many bytes of messages (as received) the queue holds at most.
    """

    def __init__(self, bus: BusCore, topic: str, callback: Callable[[Event], Any] | None,
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
        """Queue, lock and counters of this process (fresh after a fork)."""
        # Hot paths take the plain lock (a C context manager); _cond wraps the same lock
        # for code that wants a Condition.
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._queue: collections.deque[Message] = collections.deque()
        self._bytes = 0  # sum of the payload sizes in _queue
        self._in_hand = 0  # taken off the queue, being decoded
        self._received = 0
        self._delivered = 0
        self._dropped = 0
        self._errors = 0
        self._invalid = 0
        self._gen = self._bus._ctx.fork_generation
        # Set after every enqueue and on close; cleared only while the queue is seen
        # empty. Threads wait on it, and coroutines of any event loop await it.
        self._ready = Signal()
        self._start_local()

    def _start_local(self) -> None:
        """Shell hook: start this process's delivery machinery (a callback worker).

        A shell may replace ``_ready`` here with a :class:`Signal` subclass (the sync
        shell's callback subscriptions do: setting it schedules the subscription on
        the dispatch pool). That relies on this class keeping two rules: the listener
        calls ``_ready.set()`` whenever it enqueues into a queue whose signal is clear
        (and close sets it), and ``_ready`` is cleared only under ``_lock`` by a
        consumer that saw the queue empty."""

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<{type(self).__name__} {self.topic!r} {state}>"

    # --- public read-only state ------------------------------------------------------

    @property
    def stats(self) -> SubscriptionStats:
        """A snapshot of this subscription's counters in this process.

        ``received == delivered + invalid + dropped + queued`` holds in every snapshot.
        """
        with self._lock:
            return SubscriptionStats(
                received=self._received, delivered=self._delivered, dropped=self._dropped,
                errors=self._errors, invalid=self._invalid, gaps=self._gaps,
                queued=len(self._queue) + self._in_hand,
            )

    @property
    def queued_bytes(self) -> int:
        """Bytes of messages waiting in the queue now (at most :attr:`max_bytes`)."""
        with self._lock:
            return self._bytes

    @property
    def closed(self) -> bool:
        """True once the subscription was closed."""
        return self._closed

    # --- consuming -------------------------------------------------------------------

    def _deadline(self, timeout: float | None) -> float | None:
        """``get(timeout)``'s monotonic deadline (None: none).

        Raises:
            ConfigError: bad ``timeout``.
            RuntimeError: the subscription delivers to a callback instead.
        """
        if self._callback is not None:
            raise RuntimeError("this subscription delivers to its callback; get() is for "
                               "subscriptions made without one")
        limit = optional_seconds(timeout, "timeout", allow_zero=True)
        return None if limit is None else time.monotonic() + limit

    def _pull(self, deadline: float | None) -> Generator[float | None, None, Event | None]:
        """The next event, as a wait plan: yields how long to wait on ``_ready``
        (None: no limit) whenever the queue is empty; returns the event, or None at the
        deadline or once closed. Invalid messages are counted and skipped."""
        while True:
            event = self._take_event()
            if event is not EMPTY:
                return event
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return None
            yield remaining

    def _take_event(self) -> Event | Literal[_Empty.EMPTY] | None:
        """Without waiting: the next event; None once closed; :data:`EMPTY` when the
        queue is empty (``_ready`` is then clear: the next enqueue sets it). Invalid
        messages are counted and skipped. The fast path of every ``get``."""
        while True:
            with self._lock:
                queue = self._queue
                if not queue:
                    if self._closed:
                        return None
                    self._ready.clear()  # the queue is empty: the next enqueue sets it
                    return EMPTY
                message = queue.popleft()
                size = len(message[1])
                self._bytes -= size
                if size <= _DECODE_HELD:
                    # A small message is decoded under the lock (one acquisition, not
                    # two): it holds the GIL for those few µs anyway, so the listener
                    # could not enqueue meanwhile. The queue was not empty: not closed.
                    event = self._event_of(message)
                    if event is None:
                        self._invalid += 1
                        continue
                    self._delivered += 1
                    return event
                self._in_hand += 1
            event = self._decode(message)
            if event is not None:
                return event

    def _take_ready(self) -> Message | None:
        """The oldest message, or None when the queue is empty; caller holds ``_lock``."""
        if not self._queue:
            return None
        message = self._queue.popleft()
        self._bytes -= len(message[1])
        self._in_hand += 1
        return message

    def _event_of(self, message: Message) -> Event | None:
        """The event a message carries, or None for foreign junk (not counted here)."""
        channel, payload, arrived = message
        topic = self._bus._topic_of(channel)
        try:
            # The envelope adds one level around data that dumps() kept within MAX_DEPTH.
            return _event(topic, loads(payload, topic, max_depth=MAX_DEPTH + 1), arrived)
        except DecodeError:
            return None

    def _decode(self, message: Message) -> Event | None:
        """The event a message carries, or None (counted invalid) for foreign junk."""
        event = self._event_of(message)
        with self._lock:
            self._in_hand -= 1
            if event is None:
                self._invalid += 1
            elif self._closed:  # closed while it was decoded: discarded with the rest
                self._dropped += 1
                return None
            else:
                self._delivered += 1
        return event

    def _callback_failed(self, event: Event) -> None:
        """Count and log a raising callback (call from an ``except`` block)."""
        with self._lock:
            self._errors += 1
        self._bus._log.exception("events.callback_failed", topic=event.topic,
                                 type=event.type)

    # --- closing ---------------------------------------------------------------------

    def _mark_closed(self) -> bool:
        """Close locally: drop the queue (counted), wake waiters; False if already closed."""
        with self._lock:
            if self._closed:
                return False
            self._closed = True
            self._dropped += len(self._queue)
            self._queue.clear()
            self._bytes = 0
            self._retire()
        self._ready.set()
        self._bus._forget(self)
        return True

    def _retire(self) -> None:
        """Fold this closed subscription's counters into its topic's record, so the
        topic's totals never go backwards (caller holds ``_lock``). A message being
        decoded right now is counted as in flight (``received`` minus the rest)."""
        if self._gen != self._bus._ctx.fork_generation:
            return  # counters of the parent process
        record = tally_of(self._bus._ctx).topic(self.topic)
        record.received += self._received
        record.delivered += self._delivered
        record.dropped += self._dropped + self._in_hand
        record.errors += self._errors
        record.invalid += self._invalid
        record.gaps += self._gaps

    def _close_local(self) -> None:
        """Close without waiting for Redis to confirm the unsubscribe."""
        if self._mark_closed() and self._registration is not None:
            self._registration.close(wait=False)

    def _shutdown(self) -> None:
        """Close because the Context closes (shells may wait for their workers)."""
        self._close_local()

    # --- the listener side (runs on the listener thread: enqueue, never block) -------

    def _on_message(self, channel: str, payload: bytes, _pattern: str | None) -> None:
        if self._closed or self._gen != self._bus._ctx.fork_generation:
            return  # closed, or a forked child before its fork hook rebuilt us
        size = len(payload)
        with self._lock:
            if self.closed:  # closed meanwhile (the property: mypy narrows _closed)
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
            # Already set: nobody waits (a waiter returns at once on a set flag) and
            # nobody can clear it before taking this message (clearing needs an empty
            # queue, seen under this lock), so a burst wakes consumers once.
            wake = not oversize and not self._ready.is_set()
        if oversize:
            self._bus._log.warning("events.message_too_large", topic=self.topic,
                                   size=size, max_bytes=self.max_bytes)
        elif wake:
            self._ready.set()

    def _after_fork(self) -> None:
        """In a forked child: new lock and queue, fresh counters."""
        self._gaps = 0
        self._reset_local()


def _publish(channel: str, message: str, client: Any) -> Any:
    return client.publish(channel, message)


def _event(topic: str, doc: Any, arrived: float) -> Event | None:
    """The event a decoded message carries; None for a malformed flexisync envelope."""
    if not (isinstance(doc, dict) and doc.get("flexisync") == _ENVELOPE_VERSION):
        return Event(id="", topic=topic, type="message", data=doc, time=arrived, source="")
    event_id, kind, source = doc.get("id", ""), doc.get("type", "message"), doc.get("source", "")
    if not (isinstance(event_id, str) and isinstance(kind, str) and isinstance(source, str)):
        return None
    try:
        _type_seen.get(kind)  # validated: it becomes an SSE `event:` line
    except ConfigError:
        return None
    stamp = doc.get("time")
    if type(stamp) is not float or not math.isfinite(stamp):
        stamp = _float(stamp, arrived)
    return Event(event_id, topic, kind, doc.get("data"), stamp, source)


def _float(value: Any, default: float) -> float:
    """``value`` as finite float seconds, else ``default`` (foreign envelopes lie)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        with contextlib.suppress(OverflowError):
            number = float(value)
            if math.isfinite(number):
                return number
    return default
