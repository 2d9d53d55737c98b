"""Live pub/sub fanout for asyncio: :mod:`flexisync.events` with coroutines.

The same topics, envelope, queue bounds, drop accounting and errors as the blocking
shell (the logic lives once in :mod:`flexisync._core.events`), and the same listener
connection: sync and asyncio subscriptions of one process share it.

The listener thread never runs user code: it appends the message to the subscription's
bounded queue and wakes whoever awaits it with ``loop.call_soon_threadsafe`` (no thread
per subscription). A subscription is not tied to one event loop: ``get()`` and ``async
for`` work from whichever loop awaits them (``asyncio.run()`` again and again, as test
suites do). A subscription with a callback runs it on the event loop that called
``subscribe()``, in order, one event at a time; the callback may be a plain function or
a coroutine function; a raising callback is logged (``events.callback_failed``) and
counted, and delivery goes on. Close such a subscription before its event loop ends.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from typing import Any

from flexisync._core.events import (
    DEFAULT_MAX_BYTES,
    EMPTY,
    BusCore,
    Event,
    SubscriptionCore,
    SubscriptionStats,
)
from flexisync._core.plan import arun

__all__ = ["AsyncEventBus", "AsyncSubscription", "Event", "SubscriptionStats"]

AsyncCallback = Callable[[Event], "Awaitable[Any] | Any"]


class AsyncEventBus(BusCore):
    """Publish events and subscribe to them from coroutines; ``coordinator.events``.

    Topics follow the name rule (1-200 characters from letters, digits and ``._-:/@``);
    :meth:`subscribe` also accepts the glob characters ``* ? [ ]``.
    """

    async def publish(self, topic: str, data: Any = None, *, type: str = "message") -> int:
        """Send ``data`` to every current subscriber of ``topic``, in every process.

        Args:
            topic: the topic (no glob characters).
            data: any JSON-serializable value.
            type: the event's type, e.g. ``"provider.down"``.

        Returns:
            How many subscriptions Redis delivered it to (one per subscribed process,
            plus one per matching pattern subscription per process).

        Raises:
            ConfigError: bad topic or type (checked before any I/O).
            TypeError: ``data`` is not JSON-serializable or nests deeper than 512 levels.
            BackendUnavailable: Redis could not be reached within the retry policy's
                deadline.
        """
        return await arun(self._ctx, self.publish_plan(topic, data, type))

    async def subscribe(self, topic: str, callback: AsyncCallback | None = None, *,
                        maxsize: int = 1000, max_bytes: int = DEFAULT_MAX_BYTES,
                        timeout: float | None = None) -> AsyncSubscription:
        """Subscribe to a topic or a glob pattern of topics.

        Returns only once Redis has confirmed the subscription: an event published
        after this returns is delivered to it. Cancelled before that, nothing stays
        registered.

        Args:
            topic: a topic, or a pattern with ``*``, ``?``, ``[...]`` (``"jobs.*"``).
            callback: a function or coroutine function called as ``callback(event)``
                on this event loop, one event at a time. ``None``: pull events with
                ``await get()`` or ``async for``.
            maxsize: how many events may wait; past it the oldest is dropped.
            max_bytes: how many bytes of messages (as received) may wait; past it the
                oldest are dropped. Every drop is counted in ``stats.dropped``.
            timeout: seconds to wait for Redis to confirm the subscription; ``None``
                uses the retry policy's deadline.

        Raises:
            ConfigError: bad topic/pattern, ``maxsize`` or ``max_bytes`` not an int
                >= 1, bad ``timeout``, or ``callback`` not callable.
            BackendError: Redis refused the subscription (``NOPERM``...).
            BackendUnavailable: not confirmed within the timeout.
        """
        limit = self._check_subscribe(topic, callback, maxsize, max_bytes, timeout)
        loop = asyncio.get_running_loop()
        sub = AsyncSubscription(self, topic, callback, maxsize, max_bytes)
        try:
            await arun(self._ctx, self.subscribe_plan(sub, limit))
        except BaseException:
            sub._close_local()
            raise
        if callback is not None and not sub.closed:
            sub._task = loop.create_task(sub._dispatch(callback),
                                         name=f"flexisync-events:{topic}")
        return sub

    def on_reconnect(self, hook: Callable[[], Awaitable[Any] | Any]) -> Callable[[], None]:
        """Call ``hook()`` on this event loop after the listener reconnected and
        resubscribed everything (events published during the outage were lost).

        Call it from a coroutine: the hook (a function or a coroutine function) runs on
        that event loop; a raising hook is logged; a hook whose loop has closed is
        skipped.

        Returns:
            A function that removes the hook.

        Raises:
            ConfigError: ``hook`` is not callable.
            RuntimeError: no event loop is running.
        """
        return self._add_user_hook(hook, (asyncio.get_running_loop(), hook))

    def _run_user_hooks(self, hooks: list[Any]) -> None:
        for loop, hook in hooks:
            try:
                loop.call_soon_threadsafe(self._start_hook, hook)
            except RuntimeError:  # that loop is closed
                continue

    def _start_hook(self, hook: Callable[[], Any]) -> None:
        """On the hook's event loop: call it; a coroutine runs as a task."""
        try:
            result = hook()
            if inspect.isawaitable(result):
                task = asyncio.ensure_future(result)
                task.add_done_callback(self._hook_done)
        except Exception:
            self._log.exception("events.reconnect_hook_failed")

    def _hook_done(self, task: asyncio.Future[Any]) -> None:
        if not task.cancelled() and task.exception() is not None:
            self._log.error("events.reconnect_hook_failed", exc_info=task.exception())


class AsyncSubscription(SubscriptionCore):
    """One subscription to a topic or pattern; build it with ``await bus.subscribe()``.

    Without a callback, pull events with ``await get()`` or ``async for`` (which ends
    once the subscription is closed). An async context manager: leaving the block
    closes it.

    Attributes:
        topic: the topic or pattern subscribed to.
        maxsize: how many messages the queue holds at most.
        max_bytes: how many bytes of messages (as received) the queue holds at most.
    """

    _task: asyncio.Task[None] | None = None

    def _start_local(self) -> None:
        self._task = None  # a forked child does not inherit the parent's dispatcher

    async def get(self, timeout: float | None = None) -> Event | None:
        """The next event, waiting up to ``timeout`` seconds (``None``: until one comes).

        Purely local (it never talks to Redis). Cancelled, it takes nothing off the
        queue. Messages that are not valid events are counted invalid and skipped.

        Returns:
            The oldest queued event, or ``None`` on timeout or once closed.

        Raises:
            ConfigError: ``timeout`` is negative or not a number.
            RuntimeError: the subscription delivers to a callback instead.
        """
        return await self._next(self._deadline(timeout))

    async def _next(self, deadline: float | None) -> Event | None:
        """Run the core's wait plan, awaiting while it waits (on any event loop).

        Fast path: an event already queued is returned without suspending (no plan,
        no future, no timer)."""
        event = self._take_event()
        if event is not EMPTY:
            return event
        pull = self._pull(deadline)
        try:
            while True:
                await self._ready.wait_async(next(pull))
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]

    def __aiter__(self) -> AsyncSubscription:
        return self

    async def __anext__(self) -> Event:
        """The next event; stops once the subscription is closed."""
        event = await self.get()
        if event is None:
            raise StopAsyncIteration
        return event

    async def aclose(self) -> None:
        """Unsubscribe. Idempotent.

        Returns once Redis confirmed the unsubscribe (bounded by the listener's
        ping timeout). Events still queued are discarded (counted in
        ``stats.dropped``); a pending ``get()`` returns ``None``. A callback that is
        running on this loop is given up to 5 seconds to return.
        """
        if self._mark_closed() and self._registration is not None:
            await self._registration.aclose()
        task = self._task
        if task is None or task.done() or task is asyncio.current_task():
            return
        if task.get_loop() is asyncio.get_running_loop():
            await asyncio.wait([task], timeout=5.0)

    async def __aenter__(self) -> AsyncSubscription:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _dispatch(self, callback: AsyncCallback) -> None:
        """The callback's task: events in order, one at a time, until closed."""
        while (event := await self._next(None)) is not None:
            try:
                result = callback(event)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                self._callback_failed(event)
