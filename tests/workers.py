"""Functions run inside multiprocessing workers (importable under spawn)."""

from __future__ import annotations

from typing import Any

import flexisync


def state_update_worker(url: str, namespace: str, barrier: Any, n: int) -> None:
    """Increment state 'counter' n times through update()."""
    with flexisync.connect(url, namespace=namespace) as sync:
        store = sync.state("shared")
        barrier.wait(30)
        for _ in range(n):
            store.update("counter", lambda v: v + 1, default=0)


def state_incr_worker(url: str, namespace: str, barrier: Any, n: int) -> None:
    """Increment state 'hits' n times through incr()."""
    with flexisync.connect(url, namespace=namespace) as sync:
        store = sync.state("shared")
        barrier.wait(30)
        for _ in range(n):
            store.incr("hits")


def state_reader_worker(url: str, namespace: str, ready: Any, out: Any) -> None:
    """Wait until told, then report what state 'shared'/'config' holds."""
    with flexisync.connect(url, namespace=namespace) as sync:
        ready.wait(30)
        out.put(sync.state("shared").get("config"))


def inherited_coordinator_worker(sync: flexisync.Coordinator, out: Any) -> None:
    """Use a Coordinator created in the parent before fork()."""
    store = sync.state("shared")
    store.set("child", {"pid": __import__("os").getpid()})
    out.put((store.get("parent"), sync.ping() > 0))
