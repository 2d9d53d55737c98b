"""Lock across real processes (fork and spawn): exclusion, fencing, handoff, fairness."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import redis

import flexisync
from tests.helpers import join_all, start_queued_in_order, wait_until
from tests.workers_locks import (
    fair_waiter_worker,
    fork_child_worker,
    handoff_waiter_worker,
    holder_worker,
    increment_worker,
)

ROOT = Path(__file__).resolve().parents[2]


def _run_incrementers(mp: Any, url: str, namespace: str, n: int,
                      **options: Any) -> list[list[tuple[int, int]]]:
    barrier, out = mp.Barrier(8), mp.Queue()
    sleepy = options.pop("sleep_first", 0.0)
    workers = [
        mp.Process(target=increment_worker, args=(url, namespace, barrier, n, out),
                   kwargs={**options, "sleep_first": sleepy if i == 0 else 0.0})
        for i in range(8)
    ]
    for worker in workers:
        worker.start()
    results = [out.get(timeout=150) for _ in workers]
    join_all(workers, timeout=30)
    return results


def _assert_exclusive_and_fenced(results: list[list[tuple[int, int]]], total: int) -> None:
    for per_worker in results:
        fences = [fence for fence, _ in per_worker]
        assert fences == sorted(set(fences)), "a worker's fencing tokens did not increase"
    everything = sorted(pair for per_worker in results for pair in per_worker)
    fences = [fence for fence, _ in everything]
    assert len(set(fences)) == total, "two acquisitions got the same fencing token"
    # Under mutual exclusion, the value each holder read rises by one per fencing token.
    assert [value for _, value in everything] == list(range(total)), \
        "read-modify-writes overlapped, or tokens are not in acquisition order"


@pytest.mark.slow
def test_8_processes_x_200_unprotected_increments_end_at_1600(
        mp: Any, sync: flexisync.Coordinator, flexisync_url: str, raw: redis.Redis) -> None:
    """GET-then-SET of a plain key under the lock, 8 x 200 times: exactly 1600, and the
    fencing tokens order the increments across all workers."""
    results = _run_incrementers(mp, flexisync_url, sync.namespace, 200)
    assert int(raw.get(f"{sync.namespace}:plain-counter") or 0) == 1600
    _assert_exclusive_and_fenced(results, 1600)


@pytest.mark.slow
def test_short_ttl_with_auto_renew_keeps_a_slow_holder_exclusive(
        mp: Any, sync: flexisync.Coordinator, flexisync_url: str, raw: redis.Redis) -> None:
    """ttl 1 s + auto_renew, one holder sleeping 2.5 s mid-increment: still exactly 1600."""
    results = _run_incrementers(mp, flexisync_url, sync.namespace, 200, ttl=1.0,
                                auto_renew=True, sleep_first=2.5)
    assert int(raw.get(f"{sync.namespace}:plain-counter") or 0) == 1600
    _assert_exclusive_and_fenced(results, 1600)


@pytest.mark.slow
def test_lock_of_a_sigkilled_holder_passes_on_after_its_ttl(
        mp: Any, sync: flexisync.Coordinator, flexisync_url: str) -> None:
    """A holder killed with SIGKILL: a waiter gets the lock within ttl + one handoff."""
    acquired, out = mp.Event(), mp.Queue()
    holder = mp.Process(target=holder_worker,
                        args=(flexisync_url, sync.namespace, "crash", acquired, out),
                        kwargs={"ttl": 1.0})
    holder.start()
    assert acquired.wait(60)
    holder_fence = out.get(timeout=10)
    waiter = sync.lock("crash", ttl=5)
    assert not waiter.acquire(blocking=False)
    os.kill(holder.pid, signal.SIGKILL)
    killed = time.monotonic()
    assert waiter.acquire(timeout=30)
    waited = time.monotonic() - killed
    holder.join(10)
    assert waited < 1.0 + 3.0, f"took {waited:.3f}s after the kill (ttl 1 s)"
    assert waiter.fencing_token is not None
    assert waiter.fencing_token > holder_fence
    waiter.release()


def test_release_wakes_a_waiting_process_without_polling(
        mp: Any, sync: flexisync.Coordinator, flexisync_url: str) -> None:
    """The waiting process makes 3 attempts (fast path, final before sleeping, after the
    wake-up) and gets the lock long before any re-check (holder ttl 60 s)."""
    holder = sync.lock("handoff", ttl=60)
    assert holder.acquire()
    ready, out = mp.Event(), mp.Queue()
    waiter = mp.Process(target=handoff_waiter_worker,
                        args=(flexisync_url, sync.namespace, "handoff", ready, out))
    waiter.start()
    assert ready.wait(60)
    released = time.monotonic()
    holder.release()
    acquired_at, attempts = out.get(timeout=30)
    join_all([waiter])
    assert attempts == 3
    assert acquired_at - released < 4.0  # the re-check would come only after 5 s


def test_fair_lock_serves_waiting_processes_in_arrival_order(
        mp: Any, sync: flexisync.Coordinator, flexisync_url: str, raw: redis.Redis) -> None:
    """4 processes queue one after another behind a holder; they get the lock in order."""
    holder = sync.lock("fair", ttl=30, fair=True)
    assert holder.acquire()
    queue_key = sync._ctx.keys.key("lock", "fair", "queue")
    order_key = f"{sync.namespace}:order"
    waiters = start_queued_in_order(
        mp, fair_waiter_worker, lambda index: (flexisync_url, sync.namespace, index, order_key), 4,
        lambda: raw.zcard(queue_key))
    holder.release()
    join_all(waiters, timeout=60)
    assert raw.lrange(order_key, 0, -1) == ["0", "1", "2", "3"]
    assert raw.zcard(queue_key) == 0


@pytest.mark.slow
def test_dead_fair_waiter_leaves_the_queue(
        sync: flexisync.Coordinator, flexisync_url: str, raw: redis.Redis) -> None:
    """A queued waiter killed with SIGKILL stops blocking the queue once its entry expires."""
    ctx = multiprocessing.get_context("fork")
    holder = sync.lock("fair", ttl=30, fair=True)
    assert holder.acquire()
    queue_key = sync._ctx.keys.key("lock", "fair", "queue")
    order_key = f"{sync.namespace}:order"
    doomed = ctx.Process(target=fair_waiter_worker,
                         args=(flexisync_url, sync.namespace, 0, order_key))
    doomed.start()
    wait_until(lambda: raw.zcard(queue_key) == 1, timeout=60, message="doomed queued")
    survivor = ctx.Process(target=fair_waiter_worker,
                           args=(flexisync_url, sync.namespace, 1, order_key))
    survivor.start()
    wait_until(lambda: raw.zcard(queue_key) == 2, timeout=60, message="survivor queued")
    os.kill(doomed.pid, signal.SIGKILL)
    doomed.join(10)
    holder.release()  # names the dead head; its entry expires, then the survivor goes
    join_all([survivor], timeout=30)
    assert raw.lrange(order_key, 0, -1) == ["1"]


def test_forked_child_holds_nothing_and_runs_no_inherited_watchdog(
        sync: flexisync.Coordinator, raw: redis.Redis) -> None:
    """After fork the child's inherited Lock is not owned, cannot release the parent's
    lease, has no watchdog thread; the child can take locks of its own."""
    ctx = multiprocessing.get_context("fork")
    lock = sync.lock("parent-lock", ttl=5, auto_renew=True)
    assert lock.acquire()
    out = ctx.Queue()
    child = ctx.Process(target=fork_child_worker, args=(sync, lock, out))
    child.start()
    report = out.get(timeout=30)
    join_all([child])
    assert report["owned"] is False
    assert report["fencing_token"] is None
    assert report["watchdogs"] == []
    assert "fork" in report["release"]
    assert report["child_acquired"] is True
    assert report["child_fence"] == int(raw.get(sync._ctx.keys.key("lock", "child-lock", "fence")))
    assert lock.owned()  # the parent's lease survived the child
    assert not lock.lost
    lock.release()


@pytest.mark.slow
def test_one_worker_job_example_runs_standalone(flexisync_url: str) -> None:
    """examples/one_worker_job.py runs as a program and exits 0."""
    env = {**os.environ, "FLEXISYNC_URL": flexisync_url}
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "one_worker_job.py")],
                            capture_output=True, text=True, timeout=120, env=env,
                            check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "rejected stale write" in result.stdout
