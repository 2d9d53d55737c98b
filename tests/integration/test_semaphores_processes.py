"""Semaphore across real processes (fork and spawn): the limit holds fleet-wide, a
SIGKILLed holder's slot comes back after its lease, waiters are served in arrival order."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from typing import Any

import pytest
import redis

import flexisync
from flexisync._core.semaphores import QUEUE_ENTRY_TTL
from tests.helpers import join_all, start_queued_in_order, wait_until

LIMIT = 3


# --- workers (module level: importable under spawn) ------------------------------------


def hammer_worker(url: str, namespace: str, barrier: Any, rounds: int, out: Any) -> None:
    """``rounds`` x (take a slot; INCR the in-use counter; work a little; DECR; give it
    back) on one shared semaphore; report the highest count seen and rounds done."""
    with flexisync.connect(url, namespace=namespace) as sync:
        client = sync.client
        counter = f"{namespace}:in-use"
        sem = sync.semaphore("hammer", LIMIT, lease=30, timeout=60)
        peak = done = 0
        barrier.wait(60)
        for i in range(rounds):
            with sem:
                peak = max(peak, int(client.incr(counter)))
                if i % 4 == 0:
                    time.sleep(0.002)  # hold a little, so holders overlap
                client.decr(counter)
                done += 1
        out.put((peak, done))


def provider_worker(url: str, namespace: str, base_url: str, barrier: Any, out: Any, *,
                    calls: int) -> None:
    """``calls`` x (take a slot; one chat completion through the real ``openai`` SDK
    against the fake provider; give it back); report the calls made."""
    import openai  # test-only dependency, imported in the worker

    client = openai.OpenAI(base_url=base_url, api_key="sk-fake", max_retries=0,
                           timeout=30.0)
    with flexisync.connect(url, namespace=namespace) as sync:
        sem = sync.semaphore("provider", LIMIT, lease=30, timeout=60)
        barrier.wait(60)
        made = 0
        for _ in range(calls):
            with sem:
                client.chat.completions.create(
                    model="fake", messages=[{"role": "user", "content": "hi"}])
                made += 1
    client.close()
    out.put(made)


def holder_worker(url: str, namespace: str, name: str, acquired: Any, *,
                  lease: float) -> None:
    """Take one slot of ``name`` (limit 2), say so, then hang until killed."""
    with flexisync.connect(url, namespace=namespace) as sync:
        sem = sync.semaphore(name, 2, lease=lease)
        assert sem.acquire(timeout=30)
        acquired.set()
        time.sleep(600)


def fifo_worker(url: str, namespace: str, index: int, order_key: str) -> None:
    """Wait for the one slot of ``fifo``; RPUSH ``index`` to ``order_key``; give it back."""
    with flexisync.connect(url, namespace=namespace) as sync:
        sem = sync.semaphore("fifo", 1, lease=30)
        assert sem.acquire(timeout=60)
        sync.client.rpush(order_key, index)
        sem.release()


# --- tests -----------------------------------------------------------------------------


def test_8_processes_never_exceed_the_limit(
        mp: Any, sync: flexisync.Coordinator, flexisync_url: str, raw: redis.Redis) -> None:
    """8 processes x 60 rounds on a semaphore of limit 3: the in-use counter (INCR on
    entry, DECR on exit) never goes above 3, every round completes, nothing is left."""
    rounds = 60
    barrier, out = mp.Barrier(8), mp.Queue()
    workers = [mp.Process(target=hammer_worker,
                          args=(flexisync_url, sync.namespace, barrier, rounds, out))
               for _ in range(8)]
    for worker in workers:
        worker.start()
    results = [out.get(timeout=150) for _ in workers]
    join_all(workers, timeout=30)
    peaks = [peak for peak, _ in results]
    assert max(peaks) <= LIMIT, f"{max(peaks)} holders at once with limit {LIMIT}"
    assert max(peaks) >= 2, "the semaphore never let two holders in at once"
    assert sum(done for _, done in results) == 8 * rounds
    assert int(raw.get(f"{sync.namespace}:in-use") or 0) == 0
    assert sync.semaphore("hammer", LIMIT).info().holders == 0
    assert raw.exists(sync._ctx.keys.key("sem", "hammer", "queue")) == 0


def test_8_processes_never_exceed_the_limit_at_the_provider(
        sync: flexisync.Coordinator, flexisync_url: str) -> None:
    """8 processes x 10 calls through the real ``openai`` SDK, each inside a slot of a
    semaphore of limit 3, to a fake provider answering after 20 ms: the provider never
    sees more than 3 requests in flight, and sees every call."""
    pytest.importorskip("openai")
    from tests.fake_provider import ok, start_fake_provider

    mp = multiprocessing.get_context("fork")
    calls = 10
    with start_fake_provider() as provider:
        provider.script(default=ok(delay=0.02))
        barrier, out = mp.Barrier(8), mp.Queue()
        workers = [mp.Process(target=provider_worker,
                              args=(flexisync_url, sync.namespace, provider.openai_base,
                                    barrier, out), kwargs={"calls": calls})
                   for _ in range(8)]
        for worker in workers:
            worker.start()
        made = [out.get(timeout=150) for _ in workers]
        join_all(workers, timeout=30)
        stats = provider.stats()
    assert sum(made) == 8 * calls
    assert stats["requests"] == 8 * calls
    assert stats["max_in_flight"] <= LIMIT, stats
    assert stats["max_in_flight"] >= 2, "the semaphore never let two calls overlap"


def test_slot_of_a_sigkilled_holder_comes_back_after_its_lease(
        mp: Any, sync: flexisync.Coordinator, flexisync_url: str) -> None:
    """limit 2, one slot held here, one by a process killed with SIGKILL (lease 1 s): a
    waiter gets the dead process's slot once its lease ran out, with no release."""
    acquired = mp.Event()
    holder = mp.Process(target=holder_worker,
                        args=(flexisync_url, sync.namespace, "crash", acquired),
                        kwargs={"lease": 1.0})
    holder.start()
    assert acquired.wait(60)
    mine = sync.semaphore("crash", 2, lease=30)
    assert mine.acquire(blocking=False)
    waiter = sync.semaphore("crash", 2, lease=30)
    assert not waiter.acquire(blocking=False)
    os.kill(holder.pid, signal.SIGKILL)
    holder.join(10)
    assert waiter.acquire(timeout=30)
    assert mine.info().holders == 2
    waiter.release()
    mine.release()


def test_waiting_processes_are_served_in_arrival_order(
        mp: Any, sync: flexisync.Coordinator, flexisync_url: str, raw: redis.Redis) -> None:
    """4 processes queue one after another behind the holder of a 1-slot semaphore;
    they get the slot in that order."""
    holder = sync.semaphore("fifo", 1, lease=30)
    assert holder.acquire()
    queue_key = sync._ctx.keys.key("sem", "fifo", "queue")
    order_key = f"{sync.namespace}:order"
    waiters = start_queued_in_order(
        mp, fifo_worker, lambda index: (flexisync_url, sync.namespace, index, order_key), 4,
        lambda: raw.zcard(queue_key))
    holder.release()
    join_all(waiters, timeout=60)
    assert raw.lrange(order_key, 0, -1) == ["0", "1", "2", "3"]
    assert raw.zcard(queue_key) == 0


@pytest.mark.slow
def test_a_dead_waiter_stops_blocking_the_queue(
        sync: flexisync.Coordinator, flexisync_url: str, raw: redis.Redis) -> None:
    """A queued waiter killed with SIGKILL is skipped once its queue entry expired
    (QUEUE_ENTRY_TTL): the waiter behind it gets the slot."""
    ctx = multiprocessing.get_context("fork")
    holder = sync.semaphore("fifo", 1, lease=30)
    assert holder.acquire()
    queue_key = sync._ctx.keys.key("sem", "fifo", "queue")
    order_key = f"{sync.namespace}:order"
    doomed = ctx.Process(target=fifo_worker, args=(flexisync_url, sync.namespace, 0,
                                                   order_key))
    doomed.start()
    wait_until(lambda: raw.zcard(queue_key) == 1, timeout=60, message="doomed queued")
    survivor = ctx.Process(target=fifo_worker, args=(flexisync_url, sync.namespace, 1,
                                                     order_key))
    survivor.start()
    wait_until(lambda: raw.zcard(queue_key) == 2, timeout=60, message="survivor queued")
    os.kill(doomed.pid, signal.SIGKILL)
    doomed.join(10)
    holder.release()  # names the dead head; its entry expires, then the survivor goes
    join_all([survivor], timeout=QUEUE_ENTRY_TTL + 30)
    assert raw.lrange(order_key, 0, -1) == ["1"]


def _fork_child(sem: Any, out: Any) -> None:
    report: dict[str, Any] = {"held": sem.held}
    try:
        sem.release()
    except flexisync.SemaphoreNotHeldError as exc:
        report["release"] = str(exc)
    report["child_acquired"] = sem.acquire(blocking=False)
    sem.release()
    out.put(report)


def test_forked_child_holds_none_of_the_parents_slots(sync: flexisync.Coordinator) -> None:
    """After fork the child's inherited semaphore holds nothing and cannot give back the
    parent's slot; it can take slots of its own; the parent's slot survives."""
    ctx = multiprocessing.get_context("fork")
    sem = sync.semaphore("forked", 2, lease=30)
    assert sem.acquire()
    out = ctx.Queue()
    child = ctx.Process(target=_fork_child, args=(sem, out))
    child.start()
    report = out.get(timeout=30)
    join_all([child])
    assert report["held"] == 0
    assert "fork" in report["release"]
    assert report["child_acquired"] is True
    assert sem.held == 1
    assert sem.info().holders == 1  # the parent's slot survived the child
    sem.release()
