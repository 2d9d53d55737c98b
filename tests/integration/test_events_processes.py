"""Live pub/sub across real processes: broadcast, ordering, fork, reconnection."""

from __future__ import annotations

import os
import threading
from typing import Any

import pytest
import redis

import flexisync
from flexisync import Event
from flexisync.embedded import EmbeddedRedis
from tests.helpers import join_all, wait_until
from tests.workers_events import (
    inherited_subscription_worker,
    pod_worker,
    publish_worker,
)


def test_cross_pod_broadcast_reaches_every_subscriber(mp: Any, flexisync_url: str,
                                                      namespace: str) -> None:
    """3 pods x 2 subscriptions (plain + pattern) all get one event from a 4th process."""
    ready, out = mp.Queue(), mp.Queue()
    pods = [mp.Process(target=pod_worker, args=(flexisync_url, namespace),
                       kwargs={"topic": "providers", "pattern": "prov*", "ready": ready,
                               "out": out})
            for _ in range(3)]
    for pod in pods:
        pod.start()
    pod_pids = {ready.get(timeout=60) for _ in pods}
    publisher = mp.Process(target=publish_worker,
                           args=(flexisync_url, namespace, "providers", 1, out))
    publisher.start()
    results = [out.get(timeout=60) for _ in range(4)]
    join_all([*pods, publisher], timeout=60)
    published = [r for r in results if r[0] == publisher.pid]
    assert published == [(publisher.pid, [6])], "1 plain + 1 pattern receiver per pod"
    received = {pid: events for pid, events in results if pid != publisher.pid}
    assert set(received) == pod_pids
    for events in received.values():
        assert len(events) == 2
        ids = {e[0] for e in events}
        assert len(ids) == 1, "both subscriptions saw the same event"
        for _id, topic, kind, data, source in events:
            assert (topic, kind, data) == ("providers", "seq", {"i": 0})
            assert source.endswith(f":{publisher.pid}")


def test_per_publisher_order_is_preserved_across_1000_events(
        mp: Any, sync: flexisync.Coordinator, flexisync_url: str, namespace: str) -> None:
    """1000 events from one publisher process arrive complete and in publish order."""
    sub = sync.events.subscribe("ordered", maxsize=2000)
    out = mp.Queue()
    publisher = mp.Process(target=publish_worker,
                           args=(flexisync_url, namespace, "ordered", 1000, out))
    publisher.start()
    events = [sub.get(timeout=30) for _ in range(1000)]
    pid, counts = out.get(timeout=30)
    join_all([publisher], timeout=30)
    # A forked publisher inherits this process's subscription too (that is the fork
    # promise), so it may count itself as a second receiver.
    assert all(c >= 1 for c in counts)
    assert [e.data["i"] for e in events if e is not None] == list(range(1000))
    assert {e.source for e in events if e is not None} == {f"{os.uname().nodename}:{pid}"}
    assert sub.stats.dropped == 0


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_subscription_made_before_fork_keeps_delivering_in_the_child(
        flexisync_url: str, namespace: str) -> None:
    """A forked child inherits working subscriptions: new socket, threads, queue."""
    import multiprocessing
    import queue

    ctx = multiprocessing.get_context("fork")
    called: queue.Queue[Event] = queue.Queue()
    with flexisync.connect(flexisync_url, namespace=namespace) as sync:
        pulled = sync.events.subscribe("inherit")
        sync.events.subscribe("inherit", called.put)
        ready, out = ctx.Event(), ctx.Queue()
        child = ctx.Process(target=inherited_subscription_worker, args=(sync,),
                            kwargs={"pulled": pulled, "called": called,
                                    "probe_topic": "probe", "ready": ready, "out": out})
        child.start()
        assert ready.wait(60), "child did not get ready"
        assert sync.events.publish("inherit", {"to": "both"}) == 2  # parent + child
        pid, from_pull, from_callback, source = out.get(timeout=60)
        join_all([child], timeout=30)
        assert pid == child.pid
        assert from_pull == from_callback == {"to": "both"}
        assert source.endswith(f":{os.getpid()}")
        parent_event = pulled.get(timeout=5)  # the parent's own copy still arrives
        assert parent_event is not None
        assert parent_event.data == {"to": "both"}


def test_subscriptions_resume_after_the_server_is_killed_and_restarted(
        own_server: EmbeddedRedis) -> None:
    """After kill + restart on the same port, subscriptions deliver again on their own;
    the outage is counted in stats.gaps, logged, and reported to on_reconnect hooks."""
    got: list[Any] = []
    hooked = threading.Event()
    with flexisync.connect(own_server.url, namespace="rc") as sync, \
            flexisync.connect(own_server.url, namespace="rc") as publisher:
        sync._ctx.listener.ping_interval = 0.2
        sync.events.on_reconnect(hooked.set)
        pulled = sync.events.subscribe("news")
        sync.events.subscribe("news", lambda e: got.append(e.data))
        assert publisher.events.publish("news", "before") == 1
        assert pulled.get(timeout=5) is not None
        own_server.kill()
        own_server.restart()
        assert hooked.wait(30), "on_reconnect hook not called"
        wait_until(lambda: pulled.stats.gaps >= 1, timeout=10, message="gap counted")
        assert publisher.events.publish("news", "after") == 1
        event = pulled.get(timeout=10)
        assert event is not None
        assert event.data == "after"
        wait_until(lambda: got == ["before", "after"], message="callback resumed")
        assert redis.Redis(port=own_server.port).pubsub_numsub("rc:events:news") == [
            (b"rc:events:news", 1)]
