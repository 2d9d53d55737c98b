"""The asyncio state store: cancellation at each await, and several event loops.

The behaviour shared with the blocking store is pinned by ``tests/contract/test_state.py``.
Here a :class:`ReadProbe` says when a call reached the socket read of its command
(the await where it waits for Redis), and the ``proxy`` fixture holds the reply back
there, so each cancellation lands at a known await.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import redis.asyncio.connection as aconnection

import flexisync
import flexisync.aio
from flexisync.aio.state import AsyncStateStore
from flexisync.testing import unique_namespace
from tests.faults import FaultProxy


class ReadProbe:
    """Sets ``at_read`` when a command reaches its socket read while ``armed``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.armed = False
        self.at_read = asyncio.Event()
        original = aconnection.AbstractConnection.read_response
        probe = self

        async def read_response(conn: Any, *args: Any, **kwargs: Any) -> Any:
            if probe.armed:
                probe.at_read.set()
            return await original(conn, *args, **kwargs)

        monkeypatch.setattr(aconnection.AbstractConnection, "read_response", read_response)


@asynccontextmanager
async def through(proxy: FaultProxy) -> AsyncIterator[flexisync.aio.AsyncCoordinator]:
    """An AsyncCoordinator on the proxy's server, under a namespace of its own."""
    coordinator = flexisync.aio.connect(proxy.url(), namespace=unique_namespace())
    try:
        yield coordinator
    finally:
        proxy.resume()
        await coordinator.aclose()


def in_use(coordinator: flexisync.aio.AsyncCoordinator) -> int:
    """Connections of this event loop's pool that a call still holds."""
    pool = coordinator._ctx.abackend.client().connection_pool
    return len(list(pool._get_in_use_connections()))


async def cancel_at_read(probe: ReadProbe, call: Awaitable[Any]) -> asyncio.Task[Any]:
    """Run ``call`` until it waits on the socket (stalled), cancel it, let it finish."""
    task = asyncio.ensure_future(call)
    await probe.at_read.wait()
    probe.armed = False
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    return task


async def test_cancelled_get_at_the_socket_frees_its_connection(
        proxy: FaultProxy, monkeypatch: pytest.MonkeyPatch) -> None:
    """A get cancelled while Redis has not answered propagates CancelledError, holds no
    connection, and the next call reads its own reply (no stale one left behind)."""
    async with through(proxy) as aio:
        store = aio.state("s")
        await store.set("k", {"v": 1})
        probe = ReadProbe(monkeypatch)
        proxy.stall()
        probe.armed = True
        task = await cancel_at_read(probe, store.get("k"))
        assert task.cancelled()
        assert in_use(aio) == 0
        proxy.resume()
        assert await store.get("k") == {"v": 1}
        assert await store.contains("k") is True


async def test_update_cancelled_at_its_read_writes_nothing(
        proxy: FaultProxy, monkeypatch: pytest.MonkeyPatch) -> None:
    """Cancelled while reading the current value, update() never calls fn and the value
    is unchanged."""
    async with through(proxy) as aio:
        store = aio.state("s")
        await store.set("n", 1, ttl=60)
        calls: list[Any] = []
        probe = ReadProbe(monkeypatch)
        proxy.stall()
        probe.armed = True
        await cancel_at_read(probe, store.update("n", lambda v: calls.append(v) or v + 1))
        assert in_use(aio) == 0
        proxy.resume()
        assert calls == []
        assert await store.get("n") == 1
        assert await store.update("n", lambda v: v + 1) == 2


async def test_update_cancelled_during_its_cas_script_leaves_a_whole_value(
        proxy: FaultProxy, monkeypatch: pytest.MonkeyPatch) -> None:
    """Cancelled while its compare-and-set script is in flight, update() either wrote
    the new value whole or nothing; no connection is held and later updates count on
    from whichever it is."""
    async with through(proxy) as aio:
        store = aio.state("s")
        await store.update("n", lambda _: 1, ttl=60)  # the script is loaded on the server
        probe = ReadProbe(monkeypatch)

        def stall_before_the_script(value: Any) -> Any:
            proxy.stall()
            probe.armed = True  # the next read is the script's reply
            return value + 1

        await cancel_at_read(probe, store.update("n", stall_before_the_script))
        assert in_use(aio) == 0
        proxy.resume()
        value = await store.get("n")
        assert value in (1, 2)
        left = await store.ttl("n")
        assert left is not None
        assert 0 < left <= 60
        after = await store.update("n", lambda v: v + 10)
        assert after in (11, 12)
        assert after >= value + 10


async def test_a_cancelled_incr_may_have_been_applied(
        proxy: FaultProxy, monkeypatch: pytest.MonkeyPatch) -> None:
    """Documented: an incr cancelled while its script is in flight may have counted
    (it is not undone); it never counts twice and holds no connection."""
    async with through(proxy) as aio:
        store = aio.state("s")
        assert await store.incr("c") == 1  # the script is loaded on the server
        probe = ReadProbe(monkeypatch)
        proxy.stall()
        probe.armed = True
        await cancel_at_read(probe, store.incr("c"))
        assert in_use(aio) == 0
        proxy.resume()
        after = await store.incr("c")
        assert after in (2, 3)


async def test_sync_and_async_stores_see_the_same_values(
        sync: flexisync.Coordinator, aio: flexisync.aio.AsyncCoordinator) -> None:
    """One truth: what one shell writes, the other reads, under the same keys."""
    astore, store = aio.state("s"), sync.state("s")
    await astore.set("a", [1, 2])
    assert store.get("a") == [1, 2]
    store.set("b", {"x": 1})
    assert await astore.get("b") == {"x": 1}
    assert await astore.keys() == store.keys() == ["a", "b"]
    assert isinstance(astore, AsyncStateStore)
    assert repr(astore) == "<AsyncStateStore 's' ttl=None>"


def test_one_store_works_across_event_loops_in_a_row(flexisync_url: str,
                                                     namespace: str) -> None:
    """asyncio.run() again and again with the same store: no 'different loop' errors."""
    aio = flexisync.aio.connect(flexisync_url, namespace=namespace)
    store = aio.state("s")
    try:
        for i in range(3):
            assert asyncio.run(store.incr("runs")) == i + 1
            assert asyncio.run(store.update("list", lambda v, i=i: [*v, i], default=[])) \
                == list(range(i + 1))
    finally:
        asyncio.run(aio.aclose())
    assert aio.closed
