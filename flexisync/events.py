"""Live pub/sub fanout: every process subscribed to a topic hears an event now.

Delivery is *at most once* and *live*: an event reaches the subscriptions that exist
when it is published; one published while a process's listener was disconnected is
lost for that process (the loss is counted in :attr:`SubscriptionStats.gaps` and logged
as ``events.disconnected`` / ``events.reconnected``). Use a
:class:`~flexisync.streams.Stream` when a late or reconnecting reader must replay.

How it works, and why:

* Every subscription of a process shares the Context's one listener connection and
  one listener thread (:mod:`flexisync._listener`), with the asyncio shell
  (:mod:`flexisync.aio.events`) too. That thread only decodes a message and appends it
  to the subscription's bounded queue: it never blocks and never runs user code, so it
  keeps draining the socket (Redis disconnects a pub/sub client whose output buffer
  overflows).
* Each subscription has its own queue, bounded in events (``maxsize``) and in bytes
  (``max_bytes``, default 64 MiB); when either bound is passed the *oldest* events are
  dropped and counted, so a stalled consumer sees the newest events and costs bounded
  memory. The queue holds the messages as received (bytes): they are decoded when
  consumed, so ``max_bytes`` bounds what the queue holds, whatever the JSON decodes to.
* Callbacks run on the Context's bounded dispatch pool (:mod:`flexisync._dispatch`):
  at most ``callback_threads`` threads (``flexisync.connect(..., callback_threads=4)``)
  named ``flexisync-dispatch-<n>``, however many callback subscriptions there are. A
  subscription is put in the pool's line when its queue goes from empty to non-empty;
  a worker delivers up to 64 of its events (or about 5 ms' worth) in order, then puts
  it back at the end of the line if more wait, so a busy subscription cannot starve
  the others and one subscription's callback never runs on two threads at once. A
  raising callback is logged (``events.callback_failed``) and counted; delivery goes
  on. A slow callback holds one worker while it runs: with N workers, N callbacks
  blocked at once hold up every other callback subscription of the process until one
  returns (their events wait in their queues, bounded as above). For slow work, raise
  ``callback_threads``, pull with ``get()`` on a thread of your own, or use the asyncio
  shell (no threads: one task per callback subscription).

Wire format: the message is JSON, ``{"flexisync": 1, "id": ..., "type": ..., "time": ...,
"source": ..., "data": ...}``. Valid JSON that is not such an envelope (published by
another program) is delivered with ``type="message"``, ``data`` = the parsed JSON, an
empty ``id`` / ``source`` and ``time`` = when it arrived. A message that is not UTF-8
JSON, nests deeper than 512 levels, or is an envelope with malformed fields (a ``type``
that breaks the name rule...) is counted as ``invalid`` and dropped; foreign data never
raises, never logs a traceback, and never stops delivery.

Accounting, per subscription and process: ``received == delivered + invalid + dropped
+ queued`` at every moment (``queued`` includes a message being decoded).

The logic lives once in :mod:`flexisync._core.events`; this module only waits with
threads and hands callback subscriptions to the dispatch pool.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from flexisync._core.events import (
    DEFAULT_MAX_BYTES,
    EMPTY,
    BusCore,
    Event,
    SubscriptionCore,
    SubscriptionStats,
)
from flexisync._core.events import _ids as _ids  # noqa: PLC0414  (streams import it here)
from flexisync._core.plan import Signal, run
from flexisync._dispatch import BATCH_EVENTS, BATCH_SECONDS, CLOSE_TIMEOUT, Lane, pool_of

if TYPE_CHECKING:
    from flexisync._core.context import Context

__all__ = ["DEFAULT_MAX_BYTES", "Event", "EventBus", "Subscription", "SubscriptionStats"]

Callback = Callable[[Event], Any]


class EventBus(BusCore):
    """Publish events to topics and subscribe to them; reach it as ``coordinator.events``.

    Topics follow the name rule (1-200 characters from letters, digits and ``._-:/@``);
    :meth:`subscribe` also accepts the glob characters ``* ? [ ]``.
    """

    def __init__(self, ctx: Context) -> None:
        # The pool first: Context hooks run in order at fork (the pool renews its
        # workers before subscriptions rebuild their lanes) and in reverse at close
        # (subscriptions close, waiting for running callbacks, before the pool stops).
        pool_of(ctx)
        super().__init__(ctx)

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
        return run(self._ctx, self.publish_plan(topic, data, type))

    def subscribe(self, topic: str, callback: Callback | None = None, *,
                  maxsize: int = 1000, max_bytes: int = DEFAULT_MAX_BYTES,
                  timeout: float | None = None) -> Subscription:
        """Subscribe to a topic or a glob pattern of topics.

        Returns only once Redis has confirmed the subscription: an event published
        after this returns is delivered to it.

        Args:
            topic: a topic, or a pattern with ``*``, ``?``, ``[...]`` (``"jobs.*"``).
            callback: called as ``callback(event)`` on a thread of the Context's
                dispatch pool (``callback_threads`` of them, shared by every callback
                subscription), one event at a time and in order. ``None``: pull
                events with ``get()`` or iteration.
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
        limit = self._check_subscribe(topic, callback, maxsize, max_bytes, timeout)
        sub = Subscription(self, topic, callback, maxsize, max_bytes)
        try:
            run(self._ctx, self.subscribe_plan(sub, limit))
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

        Raises:
            ConfigError: ``hook`` is not callable.
        """
        return self._add_user_hook(hook, hook)

    def close(self) -> None:
        """Close every subscription of this bus (called by ``Coordinator.close()``)."""
        self._close_all()

    def _run_user_hooks(self, hooks: list[Any]) -> None:
        threading.Thread(target=self._run_hooks, args=(hooks,),
                         name="flexisync-events-reconnect", daemon=True).start()

    def _run_hooks(self, hooks: list[Callable[[], None]]) -> None:
        for hook in hooks:
            try:
                hook()
            except Exception:
                self._log.exception("events.reconnect_hook_failed")


class Subscription(SubscriptionCore):
    """One subscription to a topic or pattern; build it with ``EventBus.subscribe``.

    With a callback, events are delivered on the Context's dispatch pool, in order and
    one at a time (see the module docstring for how a slow callback delays others).
    Without one, pull them with :meth:`get` or by iterating (which ends once the
    subscription is closed). A context manager: leaving the block closes it.

    Attributes:
        topic: the topic or pattern subscribed to.
        maxsize: how many messages the queue holds at most.
        max_bytes: how many bytes of messages (as received) the queue holds at most.
    """

    _lane: Lane | None = None

    def _start_local(self) -> None:
        """A callback subscription becomes a lane of the pool (again after a fork), and
        its ready signal the lane's doorbell."""
        self._lane = None
        if self._callback is not None and not self._closed:
            lane = pool_of(self._bus._ctx).lane(self._drain, self.topic)
            self._lane = lane
            self._ready = _Doorbell(lane)

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
        return self._next(self._deadline(timeout))

    def _next(self, deadline: float | None) -> Event | None:
        """Run the core's wait plan, blocking this thread while it waits."""
        pull = self._pull(deadline)
        try:
            while True:
                self._ready.wait(next(pull))
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]

    def __iter__(self) -> Iterator[Event]:
        """Yield events as they come; ends when the subscription is closed."""
        while True:
            event = self.get()
            if event is None:
                return
            yield event

    def close(self) -> None:
        """Unsubscribe. Idempotent.

        Events still queued are discarded (counted in ``stats.dropped``) and the
        callback is not called again: once ``close()`` returns, no call of it runs,
        unless a running one did not return within 5 seconds (``close()`` waits that
        long) or ``close()`` was called from the callback itself (it then returns at
        once; that call finishes normally). A blocked ``get()`` returns ``None``.
        """
        closing = self._mark_closed()
        if closing and self._registration is not None:
            self._registration.close()
        lane = self._lane
        if lane is not None:
            lane.close(CLOSE_TIMEOUT)

    _shutdown = close

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _drain(self) -> bool:
        """One turn on a pool worker: call the callback for up to a batch of queued
        events, in order. Returns False once the queue was seen empty (the ready signal
        is then clear, so the next enqueue schedules the lane again) or the
        subscription closed; True when the batch ran out first (the lane goes to the
        back of the line)."""
        callback = self._callback
        assert callback is not None
        take = self._take_event
        end = time.monotonic() + BATCH_SECONDS
        for _ in range(BATCH_EVENTS):
            event = take()
            if event is None or event is EMPTY:
                return False
            try:
                callback(event)
            except Exception:
                self._callback_failed(event)
            if time.monotonic() >= end:
                break
        return True


class _Doorbell(Signal):
    """A callback subscription's ready signal: the listener sets it when the queue goes
    from empty to non-empty (and close sets it); setting it also schedules the lane."""

    __slots__ = ("_lane",)

    def __init__(self, lane: Lane) -> None:
        super().__init__()
        self._lane = lane

    def set(self) -> None:
        """Set the flag, then have a pool worker drain the subscription.

        Nobody waits on this signal (``get()`` refuses on a callback subscription), so
        there is no waiter to wake: the flag alone, then the lane."""
        self._flag = True
        self._lane.schedule()
