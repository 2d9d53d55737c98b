"""Callback subscriptions on the Context's bounded dispatch pool, with a real Redis."""

from __future__ import annotations

import asyncio
import ctypes
import multiprocessing
import os
import queue
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from structlog.testing import capture_logs

import flexisync
import flexisync.aio
from flexisync import Event
from flexisync._dispatch import pool_of
from tests.helpers import join_all, wait_until
from tests.workers_dispatch import ROUNDS, TOPICS, pool_child

WAIT = 20.0


@pytest.fixture
def one_worker(flexisync_url: str, namespace: str) -> Iterator[flexisync.Coordinator]:
    """A Coordinator whose pool has a single callback thread."""
    with flexisync.connect(flexisync_url, namespace=namespace,
                           callback_threads=1) as coordinator:
        yield coordinator


def _dispatch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("flexisync-dispatch-")]


# --- bounded threads, order ------------------------------------------------------------


def test_thousand_callback_subscriptions_run_on_the_pool_in_order(
        flexisync_url: str, namespace: str) -> None:
    """1,000 callback subscriptions add at most the pool's threads plus the listener
    (1,002 threads before the pool), and each gets its own events in publish order."""
    count, per_topic = 1000, 5
    with flexisync.connect(flexisync_url, namespace=namespace) as sync:
        limit = pool_of(sync._ctx).limit
        assert limit == 4
        before = threading.active_count()
        got: list[list[int]] = [[] for _ in range(count)]
        all_in = threading.Event()
        remaining = [count * per_topic]
        lock = threading.Lock()

        def make(index: int) -> Any:
            def callback(event: Event) -> None:
                got[index].append(event.data)
                with lock:
                    remaining[0] -= 1
                    if remaining[0] == 0:
                        all_in.set()
            return callback

        subs = [sync.events.subscribe(f"t{i}", make(i)) for i in range(count)]
        pipe = sync.client.pipeline(transaction=False)
        for n in range(per_topic):
            for i in range(count):
                pipe.publish(f"{namespace}:events:t{i}", f'{{"flexisync":1,"data":{n}}}')
        pipe.execute()
        assert all_in.wait(WAIT * 3), f"{remaining[0]} events not delivered"
        added = threading.active_count() - before
        assert added <= limit + 1, f"{added} threads for {count} callback subscriptions"
        assert len(_dispatch_threads()) >= 1
        bad = [i for i in range(count) if got[i] != list(range(per_topic))]
        assert not bad, f"out of order or missing for {len(bad)} subscriptions: {got[bad[0]]}"
        assert all(sub.stats.delivered == per_topic for sub in subs)
        assert all(t.daemon for t in _dispatch_threads())


def test_pull_subscriptions_start_no_dispatch_thread(flexisync_url: str,
                                                     namespace: str) -> None:
    """Subscriptions without a callback never start a pool worker."""
    with flexisync.connect(flexisync_url, namespace=namespace) as sync:
        for i in range(20):
            sync.events.subscribe(f"pull{i}")
        assert pool_of(sync._ctx).threads == 0


async def test_thousand_async_callback_subscriptions_start_no_thread(
        aio: flexisync.aio.AsyncCoordinator) -> None:
    """The asyncio shell dispatches with tasks: after the first callback subscription
    (which starts the shared listener, and the loop's resolver thread), 999 more add no
    thread at all, no pool worker exists, and every callback runs on the loop's thread."""
    count = 1000
    threads: set[str] = set()
    received = [0]
    first, done = asyncio.Event(), asyncio.Event()

    async def callback(_event: Event) -> None:
        threads.add(threading.current_thread().name)
        received[0] += 1
        first.set()
        if received[0] == count:
            done.set()

    at_start = set(threading.enumerate())
    subs = [await aio.events.subscribe("a0", callback)]
    await aio.events.publish("a0", 0)
    await asyncio.wait_for(first.wait(), WAIT)
    warmed = set(threading.enumerate())
    started = {t.name for t in warmed - at_start}
    assert not {n for n in started if n.startswith("flexisync-") and
                n != "flexisync-listener"}, started
    subs += [await aio.events.subscribe(f"a{i}", callback) for i in range(1, count)]
    for i in range(1, count):
        await aio.events.publish(f"a{i}", i)
    await asyncio.wait_for(done.wait(), WAIT * 3)
    added = {t.name for t in set(threading.enumerate()) - warmed}
    assert not added, f"999 async callback subscriptions started threads: {added}"
    assert threads == {threading.current_thread().name}
    assert pool_of(aio._ctx).threads == 0
    for sub in subs:
        await sub.aclose()


# --- slow and raising callbacks -------------------------------------------------------------


def _slow_and_fast(sync: flexisync.Coordinator) -> tuple[
        threading.Event, threading.Event, queue.Queue[int], flexisync.Subscription]:
    """Subscribe "slow" (its callback sets ``started``, then blocks until ``release``)
    and "fast" (its events go to the queue); returns (started, release, queue, fast)."""
    started, release = threading.Event(), threading.Event()
    others: queue.Queue[int] = queue.Queue()

    def slow(_event: Event) -> None:
        started.set()
        release.wait(WAIT)

    sync.events.subscribe("slow", slow)
    fast = sync.events.subscribe("fast", lambda e: others.put(e.data))
    return started, release, others, fast


def test_blocked_callback_does_not_stop_others_while_workers_are_free(
        sync: flexisync.Coordinator) -> None:
    """With the default pool (4 workers), a callback blocked on an Event leaves the
    other subscriptions' deliveries going, in order."""
    started, release, others, _fast = _slow_and_fast(sync)
    try:
        sync.events.publish("slow", 0)
        assert started.wait(WAIT)
        for i in range(10):
            sync.events.publish("fast", i)
        assert [others.get(timeout=WAIT) for _ in range(10)] == list(range(10))
    finally:
        release.set()


def test_one_worker_blocked_holds_others_until_it_returns(
        one_worker: flexisync.Coordinator) -> None:
    """callback_threads=1 (the documented limit): while the only worker is in a
    blocked callback, another subscription's events wait queued; they are delivered,
    in order, as soon as the callback returns."""
    sync = one_worker
    assert pool_of(sync._ctx).limit == 1
    started, release, others, fast = _slow_and_fast(sync)
    try:
        sync.events.publish("slow", 0)
        assert started.wait(WAIT)
        for i in range(3):
            sync.events.publish("fast", i)
        wait_until(lambda: fast.stats.received == 3, timeout=WAIT,
                   message="the events reached the subscription's queue")
        assert fast.stats.delivered == 0
        assert others.empty(), "delivered while the only worker was blocked"
        assert pool_of(sync._ctx).threads == 1
    finally:
        release.set()
    assert [others.get(timeout=WAIT) for _ in range(3)] == [0, 1, 2]


def test_raising_callback_is_logged_and_later_events_arrive(
        sync: flexisync.Coordinator) -> None:
    """A callback raising on one event is logged (events.callback_failed), counted in
    stats.errors, and the next events still reach it and the other subscriptions."""
    got: queue.Queue[int] = queue.Queue()
    other: queue.Queue[int] = queue.Queue()

    def callback(event: Event) -> None:
        if event.data == 1:
            raise ValueError("boom")
        got.put(event.data)

    with capture_logs() as logs:
        sub = sync.events.subscribe("raise", callback)
        sync.events.subscribe("raise", lambda e: other.put(e.data))
        for i in range(4):
            sync.events.publish("raise", i)
        assert [got.get(timeout=WAIT) for _ in range(3)] == [0, 2, 3]
        assert [other.get(timeout=WAIT) for _ in range(4)] == [0, 1, 2, 3]
    assert sub.stats.errors == 1
    failed = [e for e in logs if e["event"] == "events.callback_failed"]
    assert len(failed) == 1
    assert failed[0]["topic"] == "raise"


def test_busy_subscription_does_not_starve_another_on_one_worker(
        one_worker: flexisync.Coordinator) -> None:
    """With one worker, a subscription with thousands of queued events yields after a
    batch: an event for another subscription is delivered before the busy one drains."""
    sync = one_worker
    gate, release = threading.Event(), threading.Event()
    busy_count = [0]
    order: list[str] = []
    other_done = threading.Event()
    total = 2000

    def busy(event: Event) -> None:
        if event.data == -1:
            gate.set()
            release.wait(WAIT)
            return
        busy_count[0] += 1
        if busy_count[0] == total:
            order.append("busy-done")

    def quick(_event: Event) -> None:
        order.append("other")
        other_done.set()

    busy_sub = sync.events.subscribe("busy", busy, maxsize=total + 10)
    quick_sub = sync.events.subscribe("quick", quick)
    try:
        sync.events.publish("busy", -1)
        assert gate.wait(WAIT)
        pipe = sync.client.pipeline(transaction=False)
        for i in range(total):
            pipe.publish(f"{sync.namespace}:events:busy", f'{{"flexisync":1,"data":{i}}}')
        pipe.execute()
        wait_until(lambda: busy_sub.stats.received == total + 1, timeout=WAIT)
        sync.events.publish("quick", 1)
        wait_until(lambda: quick_sub.stats.received == 1, timeout=WAIT)
    finally:
        release.set()
    assert other_done.wait(WAIT)
    wait_until(lambda: busy_count[0] == total, timeout=WAIT)
    assert order == ["other", "busy-done"], "the busy subscription held the only worker"


# --- close ---------------------------------------------------------------------------------


def test_close_waits_for_the_running_callback_and_none_runs_after(
        sync: flexisync.Coordinator) -> None:
    """close() from another thread returns only after the callback in progress
    returned; no call of that callback starts after close() returned."""
    started, release = threading.Event(), threading.Event()
    calls: list[int] = []
    returned: list[int] = []

    def callback(event: Event) -> None:
        calls.append(event.data)
        if event.data == 0:
            started.set()
            release.wait(WAIT)
        returned.append(event.data)

    sub = sync.events.subscribe("closing", callback)
    for i in range(5):
        sync.events.publish("closing", i)
    assert started.wait(WAIT)
    wait_until(lambda: sub.stats.received == 5, timeout=WAIT)
    closer = threading.Thread(target=sub.close, name="closer")
    closer.start()
    wait_until(lambda: sub.closed, timeout=WAIT)
    assert closer.is_alive(), "close() returned while the callback was running"
    release.set()
    closer.join(WAIT)
    assert not closer.is_alive()
    assert calls == [0]
    assert returned == [0]
    after = sub.stats
    assert after.delivered == 1
    assert after.dropped == 4  # the queued ones were discarded, counted
    sync.events.publish("closing", 99)
    probe: queue.Queue[int] = queue.Queue()
    sync.events.subscribe("closing", lambda e: probe.put(e.data))
    sync.events.publish("closing", 100)
    assert probe.get(timeout=WAIT) == 100
    assert calls == [0], "the closed subscription's callback ran again"


def test_close_from_inside_the_callback_returns_and_stops_delivery(
        one_worker: flexisync.Coordinator) -> None:
    """A callback closing its own subscription does not deadlock (even on a single
    worker), is not called again, and the worker goes on serving others."""
    sync = one_worker
    calls: list[int] = []
    closed = threading.Event()
    holder: list[flexisync.Subscription] = []

    def callback(event: Event) -> None:
        calls.append(event.data)
        holder[0].close()
        closed.set()

    holder.append(sync.events.subscribe("self", callback))
    for i in range(3):
        sync.events.publish("self", i)
    assert closed.wait(WAIT)
    probe: queue.Queue[int] = queue.Queue()
    sync.events.subscribe("after", lambda e: probe.put(e.data))
    sync.events.publish("after", 7)
    assert probe.get(timeout=WAIT) == 7
    assert calls == [0]


def test_coordinator_close_stops_the_pool_threads(flexisync_url: str,
                                                  namespace: str) -> None:
    """Closing the Coordinator closes the subscriptions and joins the pool's workers."""
    sync = flexisync.connect(flexisync_url, namespace=namespace, callback_threads=2)
    release = threading.Event()
    started = threading.Barrier(3, timeout=WAIT)

    def blocking(_event: Event) -> None:
        started.wait()
        release.wait(WAIT)

    subs = [sync.events.subscribe(f"c{i}", blocking) for i in range(2)]
    for i in range(2):
        sync.events.publish(f"c{i}", i)
    started.wait()
    workers = list(pool_of(sync._ctx)._crew.threads)
    assert len(workers) == 2
    release.set()
    sync.close()
    assert all(sub.closed for sub in subs)
    assert not any(t.is_alive() for t in workers)
    assert pool_of(sync._ctx).threads == 0


def test_coordinator_closed_from_a_callback_does_not_deadlock(flexisync_url: str,
                                                             namespace: str) -> None:
    """Closing the whole Coordinator from inside a callback (on a pool worker) returns,
    closes every subscription and leaves no worker running."""
    sync = flexisync.connect(flexisync_url, namespace=namespace, callback_threads=2)
    finished = threading.Event()
    subs: list[flexisync.Subscription] = []

    def callback(_event: Event) -> None:
        sync.close()
        finished.set()

    subs.append(sync.events.subscribe("shutdown", callback))
    subs.append(sync.events.subscribe("bystander", lambda _e: None))
    workers = list(pool_of(sync._ctx)._crew.threads)
    sync.events.publish("shutdown", 1)
    assert finished.wait(WAIT), "close() from a callback did not return"
    assert all(sub.closed for sub in subs)
    for thread in workers:
        thread.join(WAIT)
    assert not any(thread.is_alive() for thread in workers)


# --- configuration ------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [0, -2, 2.5, True, "4", None])
def test_connect_rejects_bad_callback_threads(flexisync_url: str, namespace: str,
                                              bad: object) -> None:
    """callback_threads must be an int >= 1: ConfigError (a ValueError) saying so."""
    with pytest.raises(flexisync.ConfigError,
                       match="callback_threads must be an int >= 1") as info:
        flexisync.connect(flexisync_url, namespace=namespace,
                          callback_threads=bad)  # type: ignore[arg-type]
    assert isinstance(info.value, ValueError)


def test_aio_connect_refuses_callback_threads(flexisync_url: str, namespace: str) -> None:
    """The asyncio shell runs callbacks as tasks: callback_threads is refused with a
    ConfigError that says why (not as an unknown redis option)."""
    import flexisync.aio

    with pytest.raises(flexisync.ConfigError, match="asyncio callbacks run as tasks"):
        flexisync.aio.connect(flexisync_url, namespace=namespace, callback_threads=2)


def test_coordinators_sharing_a_connection_share_the_largest_pool(
        flexisync_url: str, namespace: str) -> None:
    """Two Coordinators of one URL and namespace share one pool sized by the largest
    callback_threads asked for."""
    with flexisync.connect(flexisync_url, namespace=namespace, callback_threads=2) as a, \
            flexisync.connect(flexisync_url, namespace=namespace, callback_threads=6) as b:
        assert a._ctx is b._ctx
        assert pool_of(a._ctx).limit == 6


# --- processes -----------------------------------------------------------------------------


def _check_child(result: tuple[Any, ...], pid: int | None, limit: int,
                 inherited: bool) -> None:
    child_pid, crew_pid, workers, seen, from_parent = result
    assert child_pid == pid
    assert crew_pid == pid, "the child used the parent's pool state"
    assert 1 <= len(workers) <= limit, workers
    assert all(name.startswith("flexisync-dispatch-") for _t, _d, name in seen)
    per_topic: dict[str, list[Any]] = {}
    for topic, data, _name in seen:
        per_topic.setdefault(topic, []).append(data)
    assert per_topic == {f"child{i}": list(range(ROUNDS)) for i in range(TOPICS)}
    assert from_parent == ("to-child" if inherited else None)


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_child_process_gets_a_working_pool_of_its_own(flexisync_url: str, namespace: str,
                                                      method: str) -> None:
    """A forked child (its parent's pool running at the fork, a callback subscription
    inherited) and a spawned child each run callbacks on workers of their own, within
    their limit, in order per subscription; the parent's pool goes on serving."""
    mp = multiprocessing.get_context(method)
    with flexisync.connect(flexisync_url, namespace=namespace,
                           callback_threads=2) as sync:
        parent_got: queue.Queue[Any] = queue.Queue()
        sync.events.subscribe("parent", lambda e: parent_got.put(e.data))
        sync.events.publish("parent", "warm-up")  # the parent's pool has a worker
        assert parent_got.get(timeout=WAIT) == "warm-up"
        assert pool_of(sync._ctx).threads >= 1
        out = mp.Queue()
        forked = method == "fork"
        child = mp.Process(target=pool_child,
                           args=(flexisync_url, namespace, sync if forked else None,
                                 parent_got if forked else None, out))
        child.start()
        result = out.get(timeout=WAIT * 3)
        join_all([child], timeout=WAIT * 3)
        _check_child(result, child.pid, 2, inherited=forked)
        sync.events.publish("parent", "still-here")
        seen = [parent_got.get(timeout=WAIT) for _ in range(2 if forked else 1)]
        assert seen == (["to-child", "still-here"] if forked else ["still-here"])


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_child_forked_without_python_hooks_rebuilds_its_pool(flexisync_url: str,
                                                             namespace: str) -> None:
    """A child forked from C (no at-fork hooks: uWSGI) notices the fork on its first
    Redis call and dispatches on a fresh pool of its own: an inherited callback
    subscription and a new one both get events there."""
    with flexisync.connect(flexisync_url, namespace=namespace,
                           callback_threads=2) as sync:
        parent_got: queue.Queue[Any] = queue.Queue()
        sync.events.subscribe("inherited", lambda e: parent_got.put(e.data))
        sync.events.publish("inherited", "warm-up")
        assert parent_got.get(timeout=WAIT) == "warm-up"
        read, write = os.pipe()
        pid = int(ctypes.PyDLL(None).fork())
        if pid == 0:  # pragma: no cover - the child reports through the pipe
            report = b"child failed"
            try:
                # The very first call is a subscribe: it notices the fork (and resets
                # the listener) before it takes any of the listener's locks.
                fresh: queue.Queue[Any] = queue.Queue()
                # Confirmed after the inherited subscription was resent: both are live.
                sync.events.subscribe("fresh", lambda e: fresh.put(e.data))
                sync.events.publish("fresh", "new")
                sync.events.publish("inherited", "old")
                new = fresh.get(timeout=WAIT)
                old = parent_got.get(timeout=WAIT)
                crew = pool_of(sync._ctx)._crew
                ok = (new == "new" and old == "old" and crew.pid == os.getpid()
                      and 1 <= len(crew.threads) <= 2)
                report = b"ok" if ok else repr((new, old, crew.pid,
                                                len(crew.threads))).encode()
            except BaseException as exc:
                report = repr(exc).encode()
            finally:
                os.write(write, report[:200])
                os._exit(0)
        os.close(write)  # a child that dies without writing gives EOF, not a hang
        try:
            answer = os.read(read, 200)
        finally:
            _, status = os.waitpid(pid, 0)
            os.close(read)
        assert answer == b"ok", answer
        assert os.waitstatus_to_exitcode(status) == 0
        sync.events.publish("inherited", "parent-again")
        seen = [parent_got.get(timeout=WAIT) for _ in range(2)]
        assert seen == ["old", "parent-again"]  # the child's publish reached us too
