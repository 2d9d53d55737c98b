"""Lock test workers, run in real processes (importable under spawn)."""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import flexisync


def increment_worker(url: str, namespace: str, barrier: Any, n: int, out: Any, *,
                     ttl: float = 10.0, auto_renew: bool = False,
                     sleep_first: float = 0.0) -> None:
    """n x (lock; GET plain key; SET +1; unlock); report [(fence, value read)].

    With ``sleep_first``, the first hold sleeps that long between GET and SET (past a
    short ttl: only renewal keeps the lock).
    """
    with flexisync.connect(url, namespace=namespace) as sync:
        client = sync.client
        key = f"{namespace}:plain-counter"
        seen: list[tuple[int, int]] = []
        barrier.wait(60)
        for i in range(n):
            with sync.lock("counter", ttl=ttl, timeout=60, auto_renew=auto_renew) as lock:
                value = int(client.get(key) or 0)
                if i == 0 and sleep_first:
                    time.sleep(sleep_first)
                lock.ensure_held()
                client.set(key, value + 1)
                assert lock.fencing_token is not None
                seen.append((lock.fencing_token, value))
        out.put(seen)


def holder_worker(url: str, namespace: str, name: str, acquired: Any, out: Any, *,
                  ttl: float) -> None:
    """Acquire ``name``, report its fencing token, then hang until killed."""
    with flexisync.connect(url, namespace=namespace) as sync:
        lock = sync.lock(name, ttl=ttl)
        assert lock.acquire(timeout=30)
        out.put(lock.fencing_token)
        acquired.set()
        time.sleep(600)


def handoff_waiter_worker(url: str, namespace: str, name: str, ready: Any,
                          out: Any) -> None:
    """Block in acquire(); report (monotonic time acquired, attempts made)."""
    with flexisync.connect(url, namespace=namespace) as sync:
        lock = sync.lock(name, ttl=10)
        attempts = 0
        original = lock._attempt

        def counting(token: str, waiting: bool, deadline: float | None = None) -> Any:
            nonlocal attempts
            attempts += 1
            result = yield from original(token, waiting, deadline)
            if not result[0] and attempts == 2:
                ready.set()  # subscribed, final attempt failed: now asleep
            return result

        lock._attempt = counting  # type: ignore[method-assign]
        assert lock.acquire(timeout=60)
        out.put((time.monotonic(), attempts))
        lock.release()


def fair_waiter_worker(url: str, namespace: str, index: int, order_key: str) -> None:
    """Wait for the fair lock 'fair'; append ``index`` to ``order_key`` while holding it."""
    with flexisync.connect(url, namespace=namespace) as sync, \
            sync.lock("fair", ttl=10, timeout=60, fair=True):
        sync.client.rpush(order_key, index)


def fork_child_worker(sync: flexisync.Coordinator, lock: flexisync.Lock, out: Any) -> None:
    """In a forked child: report what the inherited, parent-held lock looks like."""
    report: dict[str, Any] = {
        "owned": lock.owned(),
        "fencing_token": lock.fencing_token,
        "watchdogs": [t.name for t in threading.enumerate()
                      if t.name == "flexisync-lock-watchdog"],
    }
    try:
        lock.release()
        report["release"] = "released"
    except flexisync.LockNotOwnedError as exc:
        report["release"] = str(exc)
    own = sync.lock("child-lock", ttl=5, auto_renew=True)
    report["child_acquired"] = own.acquire(timeout=10)
    report["child_fence"] = own.fencing_token
    own.release()
    report["pid"] = os.getpid()
    out.put(report)
