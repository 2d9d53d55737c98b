"""``AsyncStream``: the durable stream of :mod:`flexisync.streams` for asyncio.

The same names, arguments, errors and guarantees as :class:`flexisync.streams.Stream`;
every I/O method is a coroutine and :meth:`AsyncStream.follow` is an async iterator.
Followers of one stream in one process (sync threads and coroutines of any event loop
alike) share one reader: each new entry is fetched once and handed to every follower,
so thousands of followers hold a constant number of Redis connections. The logic
lives once in :mod:`flexisync._core.streams` and :mod:`flexisync._core.followers`.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable
from typing import TYPE_CHECKING, Any

from flexisync._core.followers import FollowCore
from flexisync._core.plan import arun
from flexisync._core.streams import StreamShell, check_follow
from flexisync._durations import Duration

if TYPE_CHECKING:
    from flexisync._core.context import Context
    from flexisync._core.events import Event

__all__ = ["AsyncStream"]


class AsyncStream(StreamShell):
    """A durable, ordered, resumable log of events; asyncio flavour of ``Stream``.

    Build it with ``coordinator.stream(name, maxlen=..., ttl=...)`` on an
    ``AsyncCoordinator``. Attributes and errors as :class:`flexisync.streams.Stream`.
    """

    async def append(self, data: Any = None, *, type: str = "message") -> str:
        """Append an event; its id. As :meth:`flexisync.streams.Stream.append`.

        Cancelled while the command is on its way, the event may or may not have been
        appended (like a timeout); it is never appended twice.
        """
        return await arun(self._ctx, self._core.append(data, type))

    async def delete(self) -> bool:
        """Delete the stream and all its events; True if it existed."""
        return await arun(self._ctx, self._core.delete())

    async def read_after(self, after: str | None = None, *,
                         count: int | None = None) -> list[Event]:
        """Retained events after ``after``, oldest first; as ``Stream.read_after``."""
        return await arun(self._ctx, self._core.read_after(after, count))

    def follow(self, after: str | None = None, *, timeout: Duration | None = None,
               until: Callable[[Event], bool] | None = None) -> AsyncGenerator[Event, None]:
        """Replay the events after ``after``, then yield new ones live (``async for``).

        As :meth:`flexisync.streams.Stream.follow` (same arguments, guarantees and
        errors; ``ConfigError`` at the call). Waiting holds no connection and no
        thread of its own. ``await it.aclose()``, cancelling the task iterating it, or
        leaving ``async for`` and letting it be collected frees its place at the
        stream's reader.
        """
        start, limit = check_follow(after, timeout, until)
        return aiterate(self._ctx, FollowCore(self._core, start, limit, until))

    async def last_id(self) -> str | None:
        """The id of the newest retained event, or ``None`` when the stream is empty."""
        return await arun(self._ctx, self._core.last_id())

    async def length(self) -> int:
        """How many events the stream retains now."""
        return await arun(self._ctx, self._core.length())


async def aiterate(ctx: Context, source: Any) -> AsyncGenerator[Any, None]:
    """Yield what ``source`` (a ``FollowCore`` or ``FrameSource``) gives, with
    ``await``: the items ``poll()`` has ready (nothing awaited), else ``await
    wait_async()`` or the ``next_items()`` plan, until it says the end (``None``);
    ``source.close()`` when done, closed, cancelled or collected."""
    try:
        while True:
            step = source.poll()
            if isinstance(step, list):
                for item in step:
                    yield item
            elif isinstance(step, float):
                await source.wait_async(step)
            elif step is None or (items := await arun(ctx, source.next_items())) is None:
                return
            else:
                for item in items:
                    yield item
    finally:
        source.close()
