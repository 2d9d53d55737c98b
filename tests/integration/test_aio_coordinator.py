"""The asyncio shell's Coordinator: connect, sharing, event loops, fork, closing."""

from __future__ import annotations

import asyncio
import multiprocessing
import subprocess
import sys
from typing import Any

import pytest
import redis.asyncio

import flexisync
import flexisync.aio
from flexisync.errors import BackendUnavailable, ConfigError


def test_import_and_connect_open_no_socket_and_start_no_thread() -> None:
    code = (
        "import socket, threading\n"
        "opened = []\n"
        "orig = socket.socket.connect\n"
        "socket.socket.connect = lambda self, *a: opened.append(a) or orig(self, *a)\n"
        "import flexisync.aio\n"
        "sync = flexisync.aio.connect('redis://127.0.0.1:1/0')\n"
        "sync.state('s'); sync.lock('l'); sync.stream('s')\n"
        "assert threading.active_count() == 1, threading.enumerate()\n"
        "assert not opened, opened\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.stdout.strip() == "ok", result.stderr


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"namespace": "bad name"}, "namespace"),
    ({"url": "http://x"}, "scheme"),
    ({"url": "redis://localhost", "client": object()}, "either client"),
    ({"url": "redis://localhost", "sockettimeout": 1}, "socket_timeout"),
    ({"retry": 3}, "RetryPolicy"),
])
def test_connect_rejects_what_the_sync_connect_rejects(kwargs: dict[str, Any],
                                                       message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        flexisync.aio.connect(**kwargs)
    with pytest.raises(ConfigError, match=message):
        flexisync.connect(**kwargs)


async def test_a_closed_coordinator_says_so(flexisync_url: str, namespace: str) -> None:
    sync = flexisync.aio.connect(flexisync_url, namespace=namespace)
    await sync.ping()
    await sync.aclose()
    await sync.aclose()  # idempotent
    assert sync.closed
    with pytest.raises(BackendUnavailable, match="closed"):
        await sync.ping()


async def test_client_may_be_a_redis_asyncio_client(flexisync_url: str, namespace: str) -> None:
    given = redis.asyncio.Redis.from_url(flexisync_url)
    try:
        async with flexisync.aio.connect(client=given, namespace=namespace) as sync:
            await sync.state("s").set("k", 1)
            assert await sync.state("s").get("k") == 1
        assert await given.ping()  # the user's client is left untouched
    finally:
        await given.aclose()


def test_sync_and_async_share_one_listener(flexisync_url: str, namespace: str) -> None:
    with flexisync.connect(flexisync_url, namespace=namespace) as sync:
        aio = flexisync.aio.connect(flexisync_url, namespace=namespace)
        assert aio._ctx is sync._ctx
        assert aio._ctx.listener is sync._ctx.listener
        asyncio.run(aio.aclose())


def _child_uses_inherited(aio: flexisync.aio.AsyncCoordinator, queue: Any) -> None:
    async def main() -> tuple[float, Any]:
        store = aio.state("fork")
        await store.set("child", 2)
        return await aio.ping(), await store.get("parent")

    try:
        queue.put(asyncio.run(main()))
    except BaseException as exc:  # reported to the parent
        queue.put(repr(exc))


def test_an_async_coordinator_keeps_working_in_a_forked_child(flexisync_url: str,
                                                              namespace: str) -> None:
    aio = flexisync.aio.connect(flexisync_url, namespace=namespace)

    async def parent() -> None:
        await aio.state("fork").set("parent", 1)

    asyncio.run(parent())  # the parent has a client (and a socket) for that loop
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child_uses_inherited, args=(aio, queue))
    child.start()
    reply = queue.get(timeout=30)
    child.join(30)
    assert child.exitcode == 0
    assert isinstance(reply, tuple), reply
    assert reply[1] == 1

    async def check() -> Any:
        value = await aio.state("fork").get("child")
        await aio.aclose()
        return value

    assert asyncio.run(check()) == 2


def test_the_janitor_is_one_named_daemon_stopped_by_close(flexisync_url: str,
                                                          namespace: str) -> None:
    """Compensating work runs on one named daemon thread, in order, finished by close()."""
    import threading

    from flexisync._core.plan import Call

    sync = flexisync.connect(flexisync_url, namespace=namespace)
    ctx = sync._ctx
    key = f"{namespace}:janitor"

    def write(value: int) -> Any:
        yield Call("test.janitor", lambda c: c.rpush(key, value))

    for value in range(3):
        ctx.janitor(write(value))
    assert ctx.settle(10.0)
    janitors = [t for t in threading.enumerate() if t.name == "flexisync-janitor"]
    assert len(janitors) == 1
    assert janitors[0].daemon
    ctx.janitor(write(3))  # queued before close(): close() lets it finish first
    sync.close()
    assert not janitors[0].is_alive()
    with flexisync.connect(flexisync_url, namespace=namespace + "x") as other:
        assert other._ctx.backend.client.lrange(key, 0, -1) == [b"0", b"1", b"2", b"3"]
        other._ctx.backend.client.delete(key)
