"""Fixtures shared by the whole suite.

The Redis comes from flexisync's own pytest plugin (``flexisync.testing``): see its
docstring for how ``FLEXISYNC_TEST_URL`` picks it. Every test works under a namespace of
its own and deletes only that namespace's keys.
"""

from __future__ import annotations

import asyncio
import inspect
import multiprocessing
from collections.abc import Iterator
from typing import Any

import pytest
import redis

import flexisync
import flexisync.aio
from flexisync.embedded import EmbeddedRedis, start
from flexisync.testing import delete_namespace, unique_namespace
from tests.faults import FaultProxy
from tests.topology_cluster import cluster, cluster_url  # noqa: F401  (fixtures)
from tests.topology_sentinel import sentinel_setup, sentinel_url  # noqa: F401  (fixtures)


@pytest.fixture
def namespace(flexisync_url: str, raw: redis.Redis) -> Iterator[str]:
    """A fresh namespace; every key under it is deleted after the test."""
    ns = unique_namespace()
    yield ns
    delete_namespace(raw, ns)


@pytest.fixture
def sync(flexisync_url: str, namespace: str) -> Iterator[flexisync.Coordinator]:
    """A Coordinator on the test Redis under the test's namespace."""
    with flexisync.connect(flexisync_url, namespace=namespace) as coordinator:
        yield coordinator


@pytest.fixture
def raw(flexisync_url: str) -> Iterator[redis.Redis]:
    """A plain redis-py client on the test Redis, for assertions behind flexisync's back."""
    client = redis.Redis.from_url(flexisync_url, decode_responses=True)
    yield client
    client.close()


@pytest.fixture
def own_server() -> Iterator[EmbeddedRedis]:
    """A redis-server of this test's own, for fault injection (kill, pause, restart)."""
    server = start()
    yield server
    server.stop()


@pytest.fixture(params=["fork", "spawn"])
def mp(request: pytest.FixtureRequest) -> Any:
    """A multiprocessing context, once with fork and once with spawn."""
    return multiprocessing.get_context(request.param)


@pytest.fixture
def direct(own_server: EmbeddedRedis) -> Iterator[redis.Redis]:
    """A client on ``own_server`` that bypasses the fault proxy (for assertions)."""
    client = redis.Redis(port=own_server.port, decode_responses=True)
    yield client
    client.close()


@pytest.fixture
def proxy(own_server: EmbeddedRedis) -> Iterator[FaultProxy]:
    """A :class:`~tests.faults.FaultProxy` in front of a private redis-server.

    Connect through ``proxy.url()``; ``stall()``, ``delay()``, ``cut()`` and ``refuse()``
    make the network misbehave, and ``own_server`` is still there to kill or pause.
    """
    with FaultProxy(own_server.port) as fault_proxy:
        yield fault_proxy


@pytest.fixture
def aio(flexisync_url: str, namespace: str) -> flexisync.aio.AsyncCoordinator:
    """An AsyncCoordinator on the test Redis under the test's namespace (for ``async def``
    tests; it is closed inside the test's event loop)."""
    coordinator = flexisync.aio.connect(flexisync_url, namespace=namespace)
    _closers.append(coordinator.aclose)
    return coordinator


_closers: list[Any] = []


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    """Run ``async def`` tests with ``asyncio.run``; async fixtures' closers run at the
    end, inside the same event loop."""
    if not inspect.iscoroutinefunction(pyfuncitem.obj):
        return None
    kwargs = {name: pyfuncitem.funcargs[name] for name in pyfuncitem._fixtureinfo.argnames}

    async def main() -> None:
        try:
            await pyfuncitem.obj(**kwargs)
        finally:
            closers = list(_closers)
            _closers.clear()
            for close in reversed(closers):
                await close()

    asyncio.run(main())
    return True
