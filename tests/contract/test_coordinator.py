"""Contract: the Coordinator handle, in every shell."""

from __future__ import annotations

import asyncio

import flexisync
import flexisync.aio
from tests.contract.conftest import Shell


async def test_ping_measures_a_round_trip(shell: Shell) -> None:
    rtt = await shell(shell.coordinator.ping())
    assert 0 < rtt < 5


async def test_namespace_is_reported(shell: Shell, namespace: str) -> None:
    assert shell.coordinator.namespace == namespace


def test_both_shells_report_the_url_without_its_password() -> None:
    """No I/O: connect() opens nothing, and the password never shows."""
    url = "redis://app:s3cr3t-pw@localhost:6379/0"
    sync = flexisync.connect(url, namespace="redact")
    aio = flexisync.aio.connect(url, namespace="redact")
    try:
        for shown in (sync.url, aio.url, repr(sync), repr(aio)):
            assert "s3cr3t" not in shown
            assert "***" in shown
    finally:
        sync.close()
        asyncio.run(aio.aclose())


def test_sync_and_async_coordinators_share_one_context(flexisync_url: str,
                                                       namespace: str) -> None:
    """One process, one truth: the same settings give the same shared machinery."""
    sync = flexisync.connect(flexisync_url, namespace=namespace)
    aio = flexisync.aio.connect(flexisync_url, namespace=namespace)
    try:
        assert aio._ctx is sync._ctx
        other = flexisync.aio.connect(flexisync_url, namespace=namespace + "x")
        assert other._ctx is not sync._ctx
        asyncio.run(other.aclose())
    finally:
        sync.close()
        assert not aio._ctx.closed  # still used by the asyncio one
        asyncio.run(aio.aclose())
        assert aio._ctx.closed


def test_async_coordinator_works_across_event_loops(flexisync_url: str, namespace: str) -> None:
    """asyncio.run() again and again, as test suites do: no 'different loop' errors."""
    aio = flexisync.aio.connect(flexisync_url, namespace=namespace)
    for _ in range(3):
        assert asyncio.run(aio.ping()) > 0
    asyncio.run(aio.aclose())
    assert aio.closed
