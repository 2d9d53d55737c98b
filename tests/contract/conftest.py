"""The contract suite: one test body, run over every shell.

``shell`` is parametrized over the blocking shell and the asyncio shell, each on the
test Redis and on ``memory://`` (fakeredis). Tests are ``async def`` and await every
call through ``shell``, which awaits coroutines and passes plain values through::

    async def test_set_then_get(shell: Shell) -> None:
        store = shell.coordinator.state("s")
        await shell(store.set("k", 1))
        assert await shell(store.get("k")) == 1

``shell.is_async`` tells the shells apart where the API differs in form (``close`` vs
``aclose``, ``for`` vs ``async for``): use ``shell.close(obj)`` and
``shell.take(iterable, n)`` for those.
"""

from __future__ import annotations

import inspect
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

import flexisync
import flexisync.aio
from tests import conftest as root


class Shell:
    """One shell (sync or asyncio) on one backend (Redis or memory://)."""

    def __init__(self, kind: str, coordinator: Any) -> None:
        self.kind = kind
        self.is_async = kind.startswith("async")
        self.coordinator = coordinator

    def __repr__(self) -> str:
        return f"<Shell {self.kind}>"

    async def __call__(self, value: Any) -> Any:
        """``await value`` when it is awaitable, else ``value``."""
        if inspect.isawaitable(value):
            return await value
        return value

    async def close(self, obj: Any) -> None:
        """``await obj.aclose()`` or ``obj.close()``."""
        if self.is_async:
            await obj.aclose()
        else:
            obj.close()

    async def take(self, iterable: Any, n: int) -> list[Any]:
        """The first ``n`` items of a (sync or async) iterable."""
        items: list[Any] = []
        if hasattr(iterable, "__aiter__"):
            async for item in iterable:
                items.append(item)
                if len(items) >= n:
                    break
        else:
            for item in iterable:
                items.append(item)
                if len(items) >= n:
                    break
        return items


SHELLS = ["sync", "async", "sync-memory", "async-memory", "sync-cluster", "async-cluster",
          "sync-sentinel", "async-sentinel"]


@pytest.fixture(params=SHELLS)
def shell(request: pytest.FixtureRequest, flexisync_url: str, namespace: str,
          ) -> Iterator[Shell]:
    """Each shell in turn; the asyncio ones are closed inside the test's event loop.

    ``-cluster`` and ``-sentinel`` run on a private Redis Cluster (3 masters + 3
    replicas) and a private master + replica + 3 sentinels, started once per session
    (per xdist worker) from the binaries on PATH."""
    kind = request.param
    if kind.endswith("memory"):
        url = f"memory://contract-{uuid.uuid4().hex}"
    elif kind.endswith("cluster"):
        url = request.getfixturevalue("cluster_url")
    elif kind.endswith("sentinel"):
        url = request.getfixturevalue("sentinel_url")
    else:
        url = flexisync_url
    if kind.startswith("async"):
        coordinator: Any = flexisync.aio.connect(url, namespace=namespace)
        root._closers.append(coordinator.aclose)
        yield Shell(kind, coordinator)
    else:
        with flexisync.connect(url, namespace=namespace) as sync:
            yield Shell(kind, sync)
