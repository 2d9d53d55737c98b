"""Sentinel in the asyncio shell: connect, follow a failover, resume subscriptions.

The asyncio clients (one per event loop) share the Context's master address, so they
follow the watcher thread's switch: each command checks it before it is sent, and
connections still on the old master are aborted on their own loop.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest

import flexisync
import flexisync.aio
from flexisync import _sentinel
from flexisync.testing import unique_namespace
from tests.integration.test_sentinel import (
    ANNOUNCEMENT_SKEW,
    FOLLOW_TARGET,
    SwitchObserver,
    own_setup,
)
from tests.topologies import SentinelSetup


@pytest.fixture
def setup() -> Iterator[SentinelSetup]:
    found = own_setup()
    yield found
    found.stop()


def _probe(key: str, sent: float, client: Any) -> Any:
    pipe = client.pipeline(transaction=False)
    pipe.set(key, repr(sent))
    pipe.config_get("port")
    return pipe.execute()


@pytest.mark.slow
def test_async_writers_follow_a_planned_failover(setup: SentinelSetup) -> None:
    """Three tasks write continuously through SENTINEL FAILOVER: all are on the new
    master within 2 s of the announcement and none writes to the old one after it."""
    observer = SwitchObserver(setup)
    records: list[tuple[float, float, int | None]] = []

    async def writer(aio: Any, index: int, stop: asyncio.Event) -> None:
        backend = aio._ctx.abackend
        seq = 0
        while not stop.is_set():
            seq += 1
            sent = time.time()
            try:
                replies = await backend.call("test.probe", lambda c, s=seq, t=sent: _probe(
                    f"{aio.namespace}:probe:{index}:{s}", t, c))
                port: int | None = int(replies[1]["port"])
            except flexisync.FlexiSyncError:
                port = None
            records.append((sent, time.time(), port))
            await asyncio.sleep(0.003)

    async def main() -> tuple[int, int, float]:
        async with flexisync.aio.connect(setup.url, namespace=unique_namespace()) as aio:
            assert aio._ctx.backend.topology == "sentinel"
            stop = asyncio.Event()
            tasks = [asyncio.create_task(writer(aio, i, stop)) for i in range(3)]
            while not any(r[2] for r in records):
                await asyncio.sleep(0.01)
            old, new = await asyncio.to_thread(setup.failover)
            announced = await asyncio.to_thread(observer.wait, new)
            while not [r for r in records if r[0] > announced + 0.5 and r[2] == new]:
                await asyncio.sleep(0.01)
            stop.set()
            await asyncio.gather(*tasks)
            return old, new, announced

    try:
        old, new, announced = asyncio.run(main())
    finally:
        observer.close()
    on_new = [r for r in records if r[2] == new and r[0] >= announced]
    follow = on_new[0][1] - announced
    late = [r for r in records if r[2] == old and r[0] > announced]
    skew = max((r[0] - announced for r in late), default=0.0)
    print(f"\nasyncio planned failover: on the new master {follow:.3f}s after the "
          f"announcement; {len(late)} write(s) to the old master after it")
    assert follow <= FOLLOW_TARGET
    assert skew <= ANNOUNCEMENT_SKEW, late


@pytest.mark.slow
def test_async_subscription_and_lock_work_after_failover(setup: SentinelSetup) -> None:
    async def main() -> None:
        namespace = unique_namespace()
        async with flexisync.aio.connect(setup.url, namespace=namespace) as aio:
            sub = await aio.events.subscribe("ticks")
            listener = aio._ctx.listener
            generation = listener.generation
            master = _sentinel.master_of(aio._ctx.backend.client)
            _old, new = await asyncio.to_thread(setup.failover)
            deadline = time.monotonic() + 10
            while not (listener.generation > generation and listener.connected
                       and master.address is not None and master.address[1] == new):
                assert time.monotonic() < deadline, "the listener did not follow"
                await asyncio.sleep(0.01)
            for n in range(5):
                await aio.events.publish("ticks", n)
            got = [await sub.get(timeout=5) for _ in range(5)]
            assert [e.data for e in got if e is not None] == list(range(5))
            async with aio.lock("job", ttl=5, timeout=5) as held:
                assert held.fencing_token is not None
            await sub.aclose()

    asyncio.run(main())
