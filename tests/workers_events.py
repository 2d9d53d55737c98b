"""Worker functions for the events and streams tests (importable under spawn)."""

from __future__ import annotations

import os
import queue
from typing import Any

import flexisync

WAIT = 30.0  # hang guard for every blocking step inside a worker


def pod_worker(url: str, namespace: str, *, topic: str, pattern: str, ready: Any,
               out: Any) -> None:
    """A "pod": one Coordinator, two subscriptions (callback on ``topic``, pull on
    ``pattern``); reports the first event each of them receives."""
    got: queue.Queue[flexisync.Event] = queue.Queue()
    with flexisync.connect(url, namespace=namespace) as sync:
        sync.events.subscribe(topic, got.put)
        pulled = sync.events.subscribe(pattern)
        ready.put(os.getpid())
        first = got.get(timeout=WAIT)
        second = pulled.get(timeout=WAIT)
        assert second is not None, "pattern subscription got nothing"
        out.put((os.getpid(), [(e.id, e.topic, e.type, e.data, e.source)
                               for e in (first, second)]))


def publish_worker(url: str, namespace: str, topic: str, n: int, out: Any) -> None:
    """Publish ``n`` events ``{"i": 0..n-1}`` to ``topic``; report pid and receiver counts."""
    with flexisync.connect(url, namespace=namespace) as sync:
        counts = [sync.events.publish(topic, {"i": i}, type="seq") for i in range(n)]
        out.put((os.getpid(), counts))


def inherited_subscription_worker(sync: flexisync.Coordinator, *, pulled: Any, called: Any,
                                  probe_topic: str, ready: Any, out: Any) -> None:
    """(fork only) Use subscriptions made by the parent before the fork."""
    # Subscriptions are resent in registration order on the child's new connection, so
    # once this newer one is confirmed the inherited ones are live too.
    sync.events.subscribe(probe_topic)
    ready.set()
    event = pulled.get(timeout=WAIT)
    assert event is not None, "inherited pull subscription got nothing"
    from_callback = called.get(timeout=WAIT)
    out.put((os.getpid(), event.data, from_callback.data, event.source))


def stream_writer(url: str, namespace: str, *, name: str, n: int, started: Any,
                  resume: Any) -> None:
    """Append ``{"i": 0..n-1}`` then a ``done`` event; after the 50th, set ``started``
    and wait for ``resume`` (so the rest is appended while readers follow)."""
    with flexisync.connect(url, namespace=namespace) as sync:
        stream = sync.stream(name, maxlen=None)
        for i in range(n):
            stream.append({"i": i}, type="item")
            if i == 49:
                started.set()
                assert resume.wait(WAIT), "never told to resume"
        stream.append(None, type="done")


def stream_follower(url: str, namespace: str, *, name: str, after: str | None,
                    following: Any, out: Any) -> None:
    """Replay then follow the stream until ``done``; report the ``i`` values seen.

    Puts ``after`` on ``following`` once the first event arrived."""
    with flexisync.connect(url, namespace=namespace) as sync:
        stream = sync.stream(name, maxlen=None)
        seen: list[Any] = []
        for event in stream.follow(after, timeout=WAIT, until=lambda e: e.type == "done"):
            seen.append(event.data["i"] if event.type == "item" else "done")
            if len(seen) == 1:
                following.put(after)
        out.put((after, seen))
