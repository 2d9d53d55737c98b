"""Deadlines in the asyncio shell: every awaited call ends within its budget, whatever the
network, with the retry decisions of the blocking shell (see test_bounds.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable

import pytest

import flexisync
import flexisync.aio
from tests.faults import FaultProxy

pytestmark = pytest.mark.slow

SLACK = 1.0  # one scheduling hiccup on a loaded 2-core CI machine
POLICY = flexisync.RetryPolicy(deadline=1.0)


async def _timed(call: Awaitable[object]) -> tuple[BaseException | None, float]:
    start = time.monotonic()
    try:
        await call
    except Exception as exc:  # the test inspects whatever was raised
        return exc, time.monotonic() - start
    return None, time.monotonic() - start


async def test_deadline_bounds_an_awaited_call_to_a_hung_server(proxy: FaultProxy) -> None:
    """A hung server (open socket, no reply) costs the deadline, not a socket timeout."""
    async with flexisync.aio.connect(proxy.url(), namespace="bounds", retry=POLICY) as sync:
        store = sync.state("s")
        await store.set("k", 1)  # the connection is open before the stall
        proxy.stall()
        error, took = await _timed(store.get("k"))
    assert isinstance(error, flexisync.BackendUnavailable), error
    assert took < 1.0 + SLACK, f"get took {took:.2f}s against a 1.0s deadline"
    assert error.attempts >= 1
    assert 0.8 <= error.elapsed <= took + 0.01


async def test_deadline_bounds_an_awaited_call_when_connecting_hangs(proxy: FaultProxy) -> None:
    proxy.stall()
    async with flexisync.aio.connect(proxy.url(), namespace="bounds", retry=POLICY) as sync:
        error, took = await _timed(sync.ping())
    assert isinstance(error, flexisync.BackendUnavailable), error
    assert took < 1.0 + SLACK, f"ping took {took:.2f}s against a 1.0s deadline"


async def test_a_refused_server_is_retried_for_the_whole_deadline(proxy: FaultProxy) -> None:
    proxy.refuse(True)
    proxy.cut()
    async with flexisync.aio.connect(proxy.url(), namespace="bounds", retry=POLICY) as sync:
        error, took = await _timed(sync.ping())
    assert isinstance(error, flexisync.BackendUnavailable), error
    assert 0.7 < took < 1.0 + SLACK, f"gave up after {took:.2f}s of a 1.0s deadline"
    assert error.attempts >= 4


async def test_an_awaited_incr_is_not_sent_twice(proxy: FaultProxy) -> None:
    """An INCR whose reply never came is not retried: it may have been applied."""
    async with flexisync.aio.connect(proxy.url(), namespace="bounds", retry=POLICY) as sync:
        store = sync.state("s")
        await store.set("n", 0)
        proxy.stall()
        error, _took = await _timed(store.incr("n"))
        assert isinstance(error, flexisync.BackendUnavailable), error
        assert error.attempts == 1
        proxy.resume()
        loop = asyncio.get_running_loop()
        end = loop.time() + 10
        while proxy.connections and loop.time() < end:  # the timed-out socket closes
            await asyncio.sleep(0.01)
        assert await store.get("n") in (0, 1)


async def test_many_concurrent_calls_share_a_bounded_pool(flexisync_url: str,
                                                          namespace: str) -> None:
    """A burst of 500 concurrent calls waits for one of at most 100 connections per event
    loop instead of failing with MaxConnectionsError."""
    async with flexisync.aio.connect(flexisync_url, namespace=namespace) as sync:
        store = sync.state("burst")
        results = await asyncio.gather(*(store.incr("n") for _ in range(500)))
        assert sorted(results) == list(range(1, 501))
        client = sync._ctx.abackend.client()
        assert len(client.connection_pool._available_connections) <= 100
