"""``lock(..., replicas=N)``: an acquire confirmed by ``WAIT`` on N replicas, both shells.

Runs on the test's own master + replica + 3 sentinels (the replica is paused with
SIGSTOP in one test), started once for the module.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

import flexisync
import flexisync.aio
from flexisync.testing import unique_namespace
from tests.integration.test_sentinel import own_setup
from tests.topologies import SentinelSetup


def make_lock(coordinator: Any, name: str, **options: Any) -> Any:
    """``coordinator.lock(name, **options)`` for either shell."""
    return coordinator.lock(name, **options)


@pytest.fixture(scope="module")
def setup() -> Iterator[SentinelSetup]:
    found = own_setup()
    yield found
    found.stop()


@pytest.fixture
def sync(setup: SentinelSetup) -> Iterator[flexisync.Coordinator]:
    with flexisync.connect(setup.url, namespace=unique_namespace()) as coordinator:
        yield coordinator


@contextlib.contextmanager
def replica_paused(setup: SentinelSetup) -> Iterator[None]:
    master = setup.master_port()
    replica = next(s for s in setup.servers if s.running and s.port != master)
    replica.pause()
    try:
        yield
    finally:
        replica.resume()


def _lease(setup: SentinelSetup, coordinator: Any, name: str) -> Any:
    with contextlib.closing(redis.Redis(port=setup.master_port())) as client:
        return client.get(coordinator._ctx.keys.key("lock", name))


@pytest.mark.parametrize("fair", [False, True])
def test_acquire_is_confirmed_by_a_live_replica(setup: SentinelSetup,
                                                sync: flexisync.Coordinator,
                                                fair: bool) -> None:
    lock = make_lock(sync, "job", ttl=10, replicas=1, fair=fair)
    assert lock.acquire(timeout=5)
    assert lock.fencing_token is not None
    master = setup.master_port()
    replica = next(s for s in setup.servers if s.running and s.port != master)
    with contextlib.closing(redis.Redis(port=replica.port)) as client:
        # WAIT returned: the replica has the lease already, no polling needed.
        assert client.get(sync._ctx.keys.key("lock", "job")) is not None
    lock.release()
    with make_lock(sync, "job", ttl=10, replicas=1, fair=fair, timeout=5) as held:
        assert held.fencing_token > 0


def test_acquire_fails_in_time_when_the_replica_is_paused(setup: SentinelSetup,
                                                          sync: flexisync.Coordinator) -> None:
    """The replica is SIGSTOPped: acquire raises LockError after about
    ``replicas_timeout`` and leaves no lease behind."""
    lock = make_lock(sync, "job", ttl=10, replicas=1, replicas_timeout=0.4)
    with replica_paused(setup):
        start = time.monotonic()
        with pytest.raises(flexisync.LockError, match="only 0 of 1 replicas") as info:
            lock.acquire(timeout=5)
        took = time.monotonic() - start
        assert not isinstance(info.value, flexisync.LockTimeout)
        assert 0.4 <= took < 0.4 + 1.0
        assert _lease(setup, sync, "job") is None
        assert not lock.owned()
    assert lock.acquire(timeout=5)  # the replica is back: confirmed again
    lock.release()


def test_more_replicas_than_exist_never_confirm(sync: flexisync.Coordinator) -> None:
    lock = make_lock(sync, "job", ttl=10, replicas=2, replicas_timeout=0.2)
    with pytest.raises(flexisync.LockError, match="only 1 of 2 replicas"):
        lock.acquire(blocking=False)
    assert not lock.locked()


def test_async_acquire_confirmed_and_failing_in_time(setup: SentinelSetup) -> None:
    async def main() -> None:
        async with flexisync.aio.connect(setup.url, namespace=unique_namespace()) as aio:
            lock = make_lock(aio, "job", ttl=10, replicas=1, replicas_timeout=0.4)
            assert await lock.acquire(timeout=5)
            await lock.release()
            with replica_paused(setup):
                start = time.monotonic()
                with pytest.raises(flexisync.LockError, match="only 0 of 1"):
                    await lock.acquire(timeout=5)
                assert time.monotonic() - start < 1.4
                assert not await lock.locked()
            assert await lock.acquire(timeout=5)
            await lock.release()

    asyncio.run(main())


def test_single_node_without_replicas_cannot_confirm(flexisync_url: str) -> None:
    with flexisync.connect(flexisync_url, namespace=unique_namespace()) as single:
        lock = make_lock(single, "job", ttl=10, replicas=1, replicas_timeout=0.1)
        with pytest.raises(flexisync.LockError, match="replicas"):
            lock.acquire(blocking=False)
        assert not lock.locked()


@pytest.mark.parametrize(("options", "match"), [
    ({"replicas": -1}, "replicas must be an int"),
    ({"replicas": True}, "replicas must be an int"),
    ({"replicas": 1.5}, "replicas must be an int"),
    ({"replicas": 1, "replicas_timeout": 0}, "replicas_timeout"),
    ({"replicas": 1, "replicas_timeout": 2.9}, "within the retry policy's deadline"),
])
def test_bad_replicas_arguments_are_config_errors(sync: flexisync.Coordinator,
                                                  options: dict[str, Any], match: str) -> None:
    with pytest.raises(flexisync.ConfigError, match=match):
        make_lock(sync, "job", **options)


def test_memory_and_cluster_refuse_replicas(cluster_url: str) -> None:
    with flexisync.connect("memory://replicas") as memory, \
            pytest.raises(flexisync.ConfigError, match="memory"):
        make_lock(memory, "job", replicas=1)
    with flexisync.connect(cluster_url, namespace=unique_namespace()) as cluster, \
            pytest.raises(flexisync.ConfigError, match="Redis Cluster"):
        make_lock(cluster, "job", replicas=1)
