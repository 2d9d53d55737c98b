"""asyncio streams and SSE: cancellation at each await frees what it held, and followers
scale (N followers of M streams: constant connections, O(M) reads per append)."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest
import redis

import flexisync
import flexisync.aio
import flexisync.aio.sse
from flexisync._core.followers import SAFETY_POLL, reader_of
from flexisync.embedded import EmbeddedRedis
from tests.aio_helpers import other_tasks, until
from tests.faults import FaultProxy


async def _consume(stream: flexisync.aio.AsyncStream, kind: str,
                   got: asyncio.Event | None = None, **kwargs: Any) -> None:
    """Iterate ``stream.follow()`` or its ``event_stream`` to the end; set ``got`` on
    each item (the consumer is then back at its next await)."""
    source: Any = (stream.follow() if kind == "follow"
                   else flexisync.aio.sse.event_stream(stream, **kwargs))
    async for _item in source:
        if got is not None:
            got.set()


async def _assert_released(aio: flexisync.aio.AsyncCoordinator, handlers: int = 0) -> None:
    """No follower left at the reader, the wake-up channels unsubscribed, no task."""
    reader = reader_of(aio._ctx)
    assert reader.followers() == {}
    await until(reader.idle, "the reader has nothing left to (un)subscribe")
    await until(lambda: aio._ctx.listener.table_sizes()["handlers"] == handlers,
                 "the wake-up channel unsubscribed")
    assert other_tasks() == set()


# --- cancellation ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["follow", "event_stream"])
async def test_cancelled_while_waiting_for_live_events_frees_its_place(
        aio: flexisync.aio.AsyncCoordinator, kind: str) -> None:
    stream = aio.stream("live")
    await stream.append("first")
    got = asyncio.Event()
    task = asyncio.create_task(_consume(stream, kind, got, heartbeat=60))
    await asyncio.wait_for(got.wait(), 10)  # then it waits for a live event
    assert reader_of(aio._ctx).followers() == {"live": 1}
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await _assert_released(aio)


@pytest.mark.parametrize("kind", ["follow", "event_stream"])
async def test_cancelled_while_its_wake_up_subscription_is_unconfirmed(
        proxy: FaultProxy, kind: str) -> None:
    """Server stalled while the reader subscribes the stream's wake-up channel: the
    cancelled follower leaves, and once the server answers the subscription is
    dropped again."""
    aio = flexisync.aio.connect(proxy.url(), namespace="aio-streams",
                                retry=flexisync.RetryPolicy(deadline=2.0))
    try:
        stream = aio.stream("held")
        await aio.ping()
        proxy.stall()
        task = asyncio.create_task(_consume(stream, kind))
        await until(lambda: reader_of(aio._ctx).followers() == {"held": 1},
                     "the follower waits for the subscription")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert reader_of(aio._ctx).followers() == {}
        proxy.resume()
        await _assert_released(aio)
    finally:
        proxy.resume()
        await aio.aclose()


@pytest.mark.parametrize("kind", ["follow", "event_stream"])
async def test_cancelled_during_its_replay_read(proxy: FaultProxy, own_server: EmbeddedRedis,
                                                kind: str) -> None:
    """Server stalled while the follower's replay read is out: the cancelled follower
    leaves; the stream's other follower keeps receiving once the server answers."""
    aio = flexisync.aio.connect(proxy.url(), namespace="aio-streams")
    writer = flexisync.connect(own_server.url, namespace="aio-streams")
    try:
        stream = aio.stream("read")
        await stream.append(0)
        seen: list[Any] = []
        first = asyncio.Event()

        async def other() -> None:
            async for event in stream.follow(until=lambda e: e.type == "done"):
                seen.append(event.data)
                first.set()

        keeper = asyncio.create_task(other())
        await asyncio.wait_for(first.wait(), 10)
        proxy.stall()
        task = asyncio.create_task(_consume(stream, kind))
        # Joining needs no I/O (the stream is subscribed): the first await after it is
        # the replay read, held by the stall.
        await until(lambda: reader_of(aio._ctx).followers() == {"read": 2},
                     "the second follower joined")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert reader_of(aio._ctx).followers() == {"read": 1}
        proxy.resume()
        live = writer.stream("read")
        live.append(1)
        live.append(None, type="done")
        await asyncio.wait_for(keeper, 15)
        assert seen == [0, 1, None]
        await _assert_released(aio)
    finally:
        proxy.resume()
        writer.close()
        await aio.aclose()


async def _drain_with_limit(source: Any, limit: float) -> None:
    """``__anext__`` under ``wait_for(limit)`` until it times out (the replayed item
    may come first; then it waits)."""
    while True:
        await asyncio.wait_for(source.__anext__(), limit)


async def test_wait_for_with_tiny_timeouts_frees_the_follower_each_time(
        aio: flexisync.aio.AsyncCoordinator) -> None:
    """asyncio.wait_for() cancelling __anext__ at whatever await it reached."""
    stream = aio.stream("tiny")
    await stream.append("x")
    for limit in (0.0, 0.0005, 0.002, 0.01, 0.05):
        for source in (stream.follow("0-1"), flexisync.aio.sse.event_stream(stream, "0-1")):
            with pytest.raises((asyncio.TimeoutError, StopAsyncIteration)):
                await _drain_with_limit(source, limit)
            await source.aclose()
            assert reader_of(aio._ctx).followers() == {}
    await _assert_released(aio)


async def test_aclose_of_a_follow_frees_its_place(aio: flexisync.aio.AsyncCoordinator) -> None:
    stream = aio.stream("closed")
    await stream.append(1)
    follower = stream.follow()
    assert (await follower.__anext__()).data == 1
    assert reader_of(aio._ctx).followers() == {"closed": 1}
    await follower.aclose()
    await _assert_released(aio)


# --- scaling ----------------------------------------------------------------------------------

STREAMS = ("s0", "s1", "s2")
SYNC_FOLLOWERS = 300
ASYNC_FOLLOWERS = 1000
EVENTS = 20


def _calls(stats: dict[str, Any], command: str) -> int:
    return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))


class _Crowd:
    """Follower threads (blocking shell) and coroutines, each recording what it saw."""

    def __init__(self, sync: flexisync.Coordinator,
                 aio: flexisync.aio.AsyncCoordinator) -> None:
        self.seen: dict[int, list[Any]] = {}
        self.errors: list[BaseException] = []
        self.threads = [threading.Thread(target=self._follow_sync, args=(sync, i),
                                         daemon=True, name=f"test-follower-{i}")
                        for i in range(SYNC_FOLLOWERS)]
        for thread in self.threads:
            thread.start()
        self.tasks = [asyncio.create_task(self._follow_async(aio, i))
                      for i in range(SYNC_FOLLOWERS, SYNC_FOLLOWERS + ASYNC_FOLLOWERS)]

    def _follow_sync(self, sync: flexisync.Coordinator, i: int) -> None:
        got = self.seen[i] = []
        try:
            for event in sync.stream(STREAMS[i % 3], maxlen=None).follow(
                    timeout=120, until=lambda e: e.type == "done"):
                got.append(event.data)
        except BaseException as exc:  # the test asserts there is none
            self.errors.append(exc)

    async def _follow_async(self, aio: flexisync.aio.AsyncCoordinator, i: int) -> None:
        got = self.seen[i] = []
        async for event in aio.stream(STREAMS[i % 3], maxlen=None).follow(
                timeout=120, until=lambda e: e.type == "done"):
            got.append(event.data)

    def all_got_something(self) -> bool:
        return all(self.seen.get(i) for i in range(SYNC_FOLLOWERS + ASYNC_FOLLOWERS))

    async def finish(self) -> None:
        await asyncio.wait_for(asyncio.gather(*self.tasks), 120)
        for thread in self.threads:
            await asyncio.to_thread(thread.join, 60)


@pytest.mark.slow
async def test_followers_scale_constant_connections_and_o_m_reads_per_append(
        own_server: EmbeddedRedis) -> None:
    """300 follower threads and 1,000 follower coroutines of 3 streams in one process:
    every follower gets every event exactly once, in order; the process holds at most
    4 connections, and each append costs the server O(M) reads, not O(N)."""
    admin = redis.Redis.from_url(own_server.url, decode_responses=True)
    sync = flexisync.connect(own_server.url, namespace="scale")
    aio = flexisync.aio.connect(own_server.url, namespace="scale")
    try:
        admin_id = admin.client_id()
        streams = [aio.stream(name, maxlen=None) for name in STREAMS]
        crowd = _Crowd(sync, aio)
        reader = reader_of(aio._ctx)
        await until(lambda: sum(reader.followers().values())
                     == SYNC_FOLLOWERS + ASYNC_FOLLOWERS, "every follower registered",
                     timeout=60)
        # A first event everyone must get: afterwards every follower is live.
        for stream in streams:
            await stream.append("warm")
        await until(crowd.all_got_something, "everyone got 'warm'", timeout=60)

        admin.config_resetstat()
        fetches = reader.fetches
        started = time.monotonic()
        for n in [*range(EVENTS), None]:
            for stream in streams:
                await stream.append(n, type="done" if n is None else "message")
        appends = len(STREAMS) * (EVENTS + 1)
        await crowd.finish()
        elapsed = time.monotonic() - started
        stats = admin.info("commandstats")
        clients = [c for c in admin.client_list() if int(c["id"]) != admin_id]

        assert crowd.errors == []
        expected = ["warm", *range(EVENTS), None]
        wrong = {i: got for i, got in crowd.seen.items() if got != expected}
        assert wrong == {}, f"{len(wrong)} followers saw something else"
        assert len(clients) <= 4, [c["name"] or c["cmd"] for c in clients]
        polls = len(STREAMS) * (int(elapsed / SAFETY_POLL) + 2)
        # Every read the reader makes is one EVALSHA of stream_read.lua (the appends
        # are EVALSHAs too); commands inside scripts are counted by their own names.
        reads = _calls(stats, "evalsha") - appends
        assert 0 < reads <= appends + polls, (reads, appends)
        assert reader.fetches - fetches <= reads + len(STREAMS)
        assert _calls(stats, "xread") == 0
        for command in ("xrange", "xrevrange", "publish"):
            assert _calls(stats, command) <= 2 * (appends + polls), (command, stats)
    finally:
        admin.close()
        sync.close()
        await aio.aclose()
