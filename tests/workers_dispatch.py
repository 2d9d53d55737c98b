"""Child-process bodies for tests/integration/test_dispatch_pool.py (importable by spawn)."""

from __future__ import annotations

import os
import queue
import threading
from typing import Any

import flexisync
from flexisync._dispatch import pool_of

WAIT = 20.0
TOPICS = 30
ROUNDS = 3


def pool_child(url: str, namespace: str, inherited: flexisync.Coordinator | None,
               inherited_got: queue.Queue[Any] | None, out: Any) -> None:
    """Callback subscriptions of the child's own (and, forked, one inherited from the
    parent, delivering to ``inherited_got``) receive events published here; report
    (pid, the pool state's pid, dispatch thread names, what each callback saw)."""
    sync = inherited or flexisync.connect(url, namespace=namespace, callback_threads=2)
    got: queue.Queue[tuple[str, Any, str]] = queue.Queue()
    subs = [sync.events.subscribe(f"child{i}", lambda e: got.put(
        (e.topic, e.data, threading.current_thread().name))) for i in range(TOPICS)]
    for n in range(ROUNDS):
        for i in range(TOPICS):
            sync.events.publish(f"child{i}", n)
    seen = [got.get(timeout=WAIT) for _ in range(TOPICS * ROUNDS)]
    from_parent = None
    if inherited is not None and inherited_got is not None:
        sync.events.publish("parent", "to-child")
        from_parent = inherited_got.get(timeout=WAIT)
    workers = sorted(t.name for t in threading.enumerate()
                     if t.name.startswith("flexisync-dispatch-"))
    crew_pid = pool_of(sync._ctx)._crew.pid
    out.put((os.getpid(), crew_pid, workers, seen, from_parent))
    for sub in subs:
        sub.close()
    if inherited is None:
        sync.close()
