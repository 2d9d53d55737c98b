"""The asyncio shell on a Redis Cluster whose master dies (a cluster of its own).

The asyncio client (``redis.asyncio.RedisCluster``, one per event loop) must find the
promoted replica by itself: its retries are off, so ``AsyncBackend.call``'s next attempt
is what re-reads the slot map.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest
from redis.crc import key_slot

import flexisync
import flexisync.aio
from flexisync.errors import FlexiSyncError
from tests.topologies import Cluster, start_cluster

TAG = "aio-counter"


@pytest.fixture
def own_cluster() -> Iterator[Cluster]:
    found = start_cluster()
    yield found
    found.stop()


def test_async_shell_recovers_from_a_master_killed_mid_run(own_cluster: Cluster) -> None:
    """Lock + INCR in a loop, the slot's master SIGKILLed: the loop works again on the
    promoted replica (each call bounded by its 2 s deadline meanwhile, never hanging),
    the counter continues, and a breaker trip made afterwards reaches the mirror."""
    cluster = own_cluster
    slot = int(key_slot(TAG.encode()))

    async def run() -> tuple[int, int, float, str]:
        policy = flexisync.RetryPolicy(deadline=2.0)
        coordinator = flexisync.aio.connect(cluster.url, namespace="aio", retry=policy)
        try:
            store = coordinator.state(TAG)
            breaker = coordinator.breaker(TAG)
            await breaker.prepare()  # the mirror subscribes
            acked = []
            for _ in range(20):
                async with coordinator.lock(TAG, ttl=3.0, timeout=5.0):
                    acked.append(await store.incr("n"))
            dead = cluster.kill_master_of(slot)
            killed = time.monotonic()
            failures = 0
            while True:
                started = time.monotonic()
                try:
                    async with coordinator.lock(TAG, ttl=3.0, timeout=5.0):
                        acked.append(await store.incr("n"))
                    break
                except FlexiSyncError:
                    failures += 1
                    assert time.monotonic() - started < 5.0 + 2.0 + 1.0  # bounded, not hung
                assert time.monotonic() - killed < 30.0, "no recovery within 30 s"
            recovered = time.monotonic() - killed
            assert cluster.master_of_slot(slot) != dead
            # Default retry policy: another Context, so only pub/sub can tell our mirror.
            with flexisync.connect(cluster.url, namespace="aio") as sync:
                sync.breaker(TAG).trip()
            deadline = time.monotonic() + 10.0
            while breaker.state != "open" and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            return acked[-1], acked[19], recovered, breaker.state
        finally:
            await coordinator.aclose()

    last, before_kill, recovered, state = asyncio.run(run())
    # Replication is asynchronous: the increments acknowledged just before the kill may
    # be lost with the master, so the first value after recovery is at most one more
    # than the last acknowledged before (not necessarily equal to it plus one).
    assert 1 <= last <= before_kill + 1
    assert state == "open"
    print(f"\nasyncio shell working again {recovered:.2f}s after the master's SIGKILL")
