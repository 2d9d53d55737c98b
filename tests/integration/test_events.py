"""Live pub/sub events inside one process: delivery, backpressure, bad input, threads."""

from __future__ import annotations

import collections
import os
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from structlog.testing import capture_logs

import flexisync
from flexisync import Event
from flexisync._dispatch import pool_of
from tests.helpers import wait_until


@pytest.fixture
def other(flexisync_url: str, namespace: str) -> Iterator[flexisync.Coordinator]:
    """A second Coordinator on the same namespace (a second listener connection)."""
    with flexisync.connect(flexisync_url, namespace=namespace) as coordinator:
        yield coordinator


def channel(sync: flexisync.Coordinator, topic: str) -> str:
    return f"{sync.namespace}:events:{topic}"


# --- delivery -----------------------------------------------------------------------


def test_publish_right_after_subscribe_is_delivered(sync: flexisync.Coordinator,
                                                    other: flexisync.Coordinator) -> None:
    """subscribe() returns once confirmed: the very next publish arrives, no sleep."""
    sub = sync.events.subscribe("providers")
    assert other.events.publish("providers", {"name": "openai"}, type="provider.down") == 1
    event = sub.get(timeout=5)
    assert event is not None
    assert (event.topic, event.type, event.data) == (
        "providers", "provider.down", {"name": "openai"})


def test_event_carries_id_time_and_source(sync: flexisync.Coordinator) -> None:
    """Events have unique ids, the publish time (epoch s) and the publisher's host:pid."""
    sub = sync.events.subscribe("t")
    before = time.time()
    sync.events.publish("t", 1)
    sync.events.publish("t", 2)
    first, second = sub.get(timeout=5), sub.get(timeout=5)
    assert isinstance(first, Event)
    assert isinstance(second, Event)
    assert first.id
    assert second.id
    assert first.id != second.id
    assert before <= first.time <= time.time()
    assert first.source == f"{socket.gethostname()}:{os.getpid()}"
    assert first.type == "message"
    with pytest.raises(AttributeError):
        first.data = 3  # type: ignore[misc]  # frozen


def test_publish_returns_how_many_subscriptions_received_it(
        sync: flexisync.Coordinator, other: flexisync.Coordinator) -> None:
    """The receiver count is 0 with nobody listening, one per process and per pattern."""
    assert sync.events.publish("nobody", {}) == 0
    sync.events.subscribe("jobs.done")
    sync.events.subscribe("jobs.done")  # same process, same channel: one Redis subscriber
    other.events.subscribe("jobs.*")
    assert sync.events.publish("jobs.done", {}) == 2


def test_pattern_subscription_gets_matching_topics_only(sync: flexisync.Coordinator) -> None:
    """A glob subscription receives matching topics, with the concrete topic on the event."""
    sub = sync.events.subscribe("jobs.*")
    sync.events.publish("other", "no")
    sync.events.publish("jobs.42", "yes")
    event = sub.get(timeout=5)
    assert event is not None
    assert (event.topic, event.data) == ("jobs.42", "yes")
    assert sub.get(timeout=0) is None


def test_iteration_yields_events_and_ends_on_close(sync: flexisync.Coordinator) -> None:
    """`for event in sub` yields in order and stops once the subscription is closed."""
    sub = sync.events.subscribe("it")
    for i in range(3):
        sync.events.publish("it", i)
    seen = []
    for event in sub:
        seen.append(event.data)
        if len(seen) == 3:
            sub.close()
    assert seen == [0, 1, 2]


def test_callback_runs_on_a_dispatcher_thread_not_the_listener(
        sync: flexisync.Coordinator) -> None:
    """Callbacks run on a named daemon thread of the Context's dispatch pool."""
    threads: list[threading.Thread] = []
    done = threading.Event()

    def callback(_event: Event) -> None:
        threads.append(threading.current_thread())
        done.set()

    sync.events.subscribe("cb", callback)
    sync.events.publish("cb", None)
    assert done.wait(5)
    assert threads[0].name.startswith("flexisync-dispatch-")
    assert threads[0] in pool_of(sync._ctx)._crew.threads
    assert threads[0].daemon
    assert threads[0] is not sync._ctx.listener._thread


def test_one_listener_connection_serves_every_subscription(sync: flexisync.Coordinator,
                                                           raw: redis.Redis) -> None:
    """Many subscriptions, plain and pattern, share the one listener thread and socket."""
    for i in range(4):
        sync.events.subscribe(f"many.{i}", lambda _e: None)
    sync.events.subscribe("many.*")
    assert len([t for t in threading.enumerate() if t.name == "flexisync-listener"]) == 1
    ours = [c for c in raw.client_list() if int(c["sub"]) == 4 and int(c["psub"]) == 1]
    assert len(ours) == 1


# --- failures inside consumers ------------------------------------------------------


def test_raising_callback_is_logged_counted_and_delivery_goes_on(
        sync: flexisync.Coordinator) -> None:
    """A callback that raises is logged as events.callback_failed and counted in errors."""
    seen: list[int] = []
    done = threading.Event()

    def callback(event: Event) -> None:
        if event.data % 2 == 0:
            raise RuntimeError("consumer bug")
        seen.append(event.data)
        if event.data == 5:
            done.set()

    with capture_logs() as logs:
        sub = sync.events.subscribe("boom", callback)
        for i in range(6):
            sync.events.publish("boom", i)
        assert done.wait(5)
    assert seen == [1, 3, 5]
    stats = sub.stats
    assert (stats.received, stats.delivered, stats.errors) == (6, 6, 3)
    assert sum(1 for entry in logs if entry["event"] == "events.callback_failed") == 3


def test_slow_callback_does_not_stall_other_subscriptions(sync: flexisync.Coordinator) -> None:
    """While one callback is blocked, another subscription receives every event."""
    release = threading.Event()
    fast: list[int] = []
    slow: list[int] = []

    def stuck(event: Event) -> None:
        release.wait(30)
        slow.append(event.data)

    sync.events.subscribe("load", stuck)
    sync.events.subscribe("load", lambda e: fast.append(e.data))
    for i in range(50):
        sync.events.publish("load", i)
    wait_until(lambda: len(fast) == 50, message="the fast subscription got all 50")
    assert slow == []
    release.set()
    wait_until(lambda: len(slow) == 50, message="the slow one catches up")
    assert slow == list(range(50))


def test_stalled_consumer_keeps_the_newest_and_counts_the_dropped(
        sync: flexisync.Coordinator) -> None:
    """maxsize=10, nobody reading: the newest 10 stay, 90 are dropped; others unaffected."""
    stalled = sync.events.subscribe("flood", maxsize=10)
    healthy = sync.events.subscribe("flood")
    for i in range(100):
        sync.events.publish("flood", i)
    healthy_seen = [healthy.get(timeout=5) for _ in range(100)]
    assert [e.data for e in healthy_seen if e is not None] == list(range(100))
    wait_until(lambda: stalled.stats.received == 100, message="stalled sub received all")
    assert stalled.stats.dropped == 90
    assert stalled.stats.queued == 10
    kept = [stalled.get(timeout=0) for _ in range(10)]
    assert [e.data for e in kept if e is not None] == list(range(90, 100))
    assert stalled.get(timeout=0) is None
    assert healthy.stats.dropped == 0


def test_garbage_on_the_channel_is_counted_not_fatal(sync: flexisync.Coordinator,
                                                     raw: redis.Redis) -> None:
    """Non-JSON is counted invalid and dropped; foreign JSON is delivered as 'message'."""
    sub = sync.events.subscribe("mixed")
    raw.publish(channel(sync, "mixed"), "not json {")
    raw.publish(channel(sync, "mixed"), b"\xff\xfe binary")
    raw.publish(channel(sync, "mixed"), '{"plain": true}')
    raw.publish(channel(sync, "mixed"), "[1, 2]")
    sync.events.publish("mixed", "ours", type="kind")
    got = [sub.get(timeout=5) for _ in range(3)]
    assert [(e.type, e.data, e.id, e.topic) for e in got if e is not None] == [
        ("message", {"plain": True}, "", "mixed"),
        ("message", [1, 2], "", "mixed"),
        ("kind", "ours", got[2].id if got[2] else None, "mixed"),
    ]
    stats = sub.stats
    assert (stats.received, stats.invalid, stats.delivered) == (5, 2, 3)


# --- closing --------------------------------------------------------------------------


def test_unsubscribe_while_publishing(sync: flexisync.Coordinator,
                                      other: flexisync.Coordinator) -> None:
    """close() during a publish storm: no call after close returns; others keep going."""
    calls: list[int] = []
    keep: list[int] = []
    stop = threading.Event()
    sub = sync.events.subscribe("storm", lambda e: calls.append(e.data))
    sync.events.subscribe("storm", lambda e: keep.append(e.data), maxsize=1_000_000)

    def publisher() -> None:
        i = 0
        while not stop.is_set():
            other.events.publish("storm", i)
            i += 1

    thread = threading.Thread(target=publisher)
    thread.start()
    try:
        wait_until(lambda: len(calls) >= 20, message="callbacks under load")
        sub.close()
        frozen = len(calls)
        mark = len(keep)
        wait_until(lambda: len(keep) > mark + 50, message="survivor keeps receiving")
    finally:
        stop.set()
        thread.join(10)
    assert len(calls) == frozen
    assert sub.closed
    assert keep == list(range(len(keep)))


def test_close_wakes_a_blocked_get(sync: flexisync.Coordinator) -> None:
    """A get() blocked without timeout returns None once another thread closes it."""
    sub = sync.events.subscribe("idle")
    result: list[Event | None] = []
    waiter = threading.Thread(target=lambda: result.append(sub.get()))
    waiter.start()
    sub.close()
    waiter.join(5)
    assert not waiter.is_alive()
    assert result == [None]
    sub.close()  # idempotent


def test_context_manager_unsubscribes(sync: flexisync.Coordinator) -> None:
    """Leaving the with-block closes the subscription: nobody receives later publishes."""
    with sync.events.subscribe("ctx") as sub:
        assert sync.events.publish("ctx", 1) == 1
    assert sub.closed
    assert sync.events.publish("ctx", 2) == 0


def test_coordinator_close_stops_dispatcher_threads(flexisync_url: str,
                                                    namespace: str) -> None:
    """Closing the Coordinator closes its subscriptions and joins the pool's threads."""
    sync = flexisync.connect(flexisync_url, namespace=namespace)
    sub = sync.events.subscribe("bye", lambda _e: None)
    threads = list(pool_of(sync._ctx)._crew.threads)
    assert threads
    assert all(thread.is_alive() for thread in threads)
    sync.close()
    assert sub.closed
    assert not any(thread.is_alive() for thread in threads)
    with pytest.raises(flexisync.BackendUnavailable):
        sync.events.publish("bye", 1)


# --- bad input ---------------------------------------------------------------------


@pytest.mark.parametrize("topic", ["", "has space", "x" * 201, "new\nline", "é", "a*", 7, None])
def test_publish_rejects_bad_topics(sync: flexisync.Coordinator, topic: object) -> None:
    """Bad topics (and glob characters) raise ConfigError, a ValueError, before Redis."""
    with pytest.raises(flexisync.ConfigError) as info:
        sync.events.publish(topic, {})  # type: ignore[arg-type]
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("topic", ["", "has space", "x" * 201, "{brace}", 3])
def test_subscribe_rejects_bad_topics(sync: flexisync.Coordinator, topic: object) -> None:
    """subscribe() validates topics and patterns before touching Redis."""
    with pytest.raises(flexisync.ConfigError):
        sync.events.subscribe(topic)  # type: ignore[arg-type]


@pytest.mark.parametrize("data", [object(), {1, 2}, float("nan"), {"k": b"bytes"}])
def test_non_json_data_raises_type_error_and_sends_nothing(sync: flexisync.Coordinator,
                                                           data: object) -> None:
    """publish() refuses data JSON cannot carry, before anything is sent."""
    sub = sync.events.subscribe("strict")
    with pytest.raises(TypeError):
        sync.events.publish("strict", data)
    sync.events.publish("strict", "sentinel")
    event = sub.get(timeout=5)
    assert event is not None
    assert event.data == "sentinel"


@pytest.mark.parametrize("maxsize", [0, -1, True, 1.5, "10", None])
def test_subscribe_rejects_bad_maxsize(sync: flexisync.Coordinator, maxsize: object) -> None:
    """maxsize must be an int >= 1."""
    with pytest.raises(flexisync.ConfigError, match="maxsize"):
        sync.events.subscribe("t", maxsize=maxsize)  # type: ignore[arg-type]


def test_other_bad_arguments(sync: flexisync.Coordinator) -> None:
    """Bad callback, event type and get() timeout raise; get() on a callback sub too."""
    with pytest.raises(flexisync.ConfigError, match="callable"):
        sync.events.subscribe("t", callback="nope")  # type: ignore[arg-type]
    with pytest.raises(flexisync.ConfigError, match="event type"):
        sync.events.publish("t", 1, type="two words")
    with pytest.raises(flexisync.ConfigError, match="timeout"):
        sync.events.subscribe("t").get(timeout=-1)
    with pytest.raises(RuntimeError, match="callback"):
        sync.events.subscribe("t", lambda _e: None).get(timeout=0)


# --- memory bounded in bytes (issue 9, section 4) -----------------------------------------


def test_unread_queue_is_bounded_in_bytes_dropping_the_oldest(
        sync: flexisync.Coordinator) -> None:
    """40 messages of ~1 MB into an unread subscription with max_bytes=4 MiB: at most
    4 MiB stays queued (the newest), the rest is counted dropped; others unaffected."""
    stalled = sync.events.subscribe("big", max_bytes=4 * 1024 * 1024)
    counter = sync.events.subscribe("big", lambda _e: None)
    blob = "x" * 1_000_000
    for i in range(40):
        sync.events.publish("big", {"i": i, "blob": blob})
    wait_until(lambda: stalled.stats.received == 40, message="all 40 received")
    stats = stalled.stats
    assert stalled.queued_bytes <= 4 * 1024 * 1024
    assert stats.queued == 4
    assert stats.dropped == 36
    assert stats.received == stats.delivered + stats.invalid + stats.dropped + stats.queued
    kept = [stalled.get(timeout=0) for _ in range(4)]
    assert [e.data["i"] for e in kept if e is not None] == [36, 37, 38, 39]
    assert stalled.queued_bytes == 0
    wait_until(lambda: counter.stats.delivered == 40, message="the reading subscription")
    assert counter.stats.dropped == 0


def test_message_larger_than_max_bytes_is_dropped_and_logged_once(
        sync: flexisync.Coordinator) -> None:
    """A message that could never fit is dropped on arrival (counted, one warning)."""
    sub = sync.events.subscribe("huge", max_bytes=1000)
    with capture_logs() as logs:
        sync.events.publish("huge", "y" * 2000)
        sync.events.publish("huge", "y" * 2000)
        sync.events.publish("huge", "small")
        event = sub.get(timeout=5)
    assert event is not None
    assert event.data == "small"
    assert (sub.stats.received, sub.stats.dropped, sub.stats.delivered) == (3, 2, 1)
    assert [e["event"] for e in logs].count("events.message_too_large") == 1


def test_default_byte_bound_is_64_mib(sync: flexisync.Coordinator) -> None:
    """Without max_bytes a subscription holds at most 64 MiB of messages."""
    assert sync.events.subscribe("t").max_bytes == 64 * 1024 * 1024


@pytest.mark.parametrize("max_bytes", [0, -1, True, 1.5, "10", None])
def test_subscribe_rejects_bad_max_bytes(sync: flexisync.Coordinator,
                                         max_bytes: object) -> None:
    """max_bytes must be an int >= 1; nothing is subscribed otherwise."""
    with pytest.raises(flexisync.ConfigError, match="max_bytes"):
        sync.events.subscribe("t", max_bytes=max_bytes)  # type: ignore[arg-type]


# --- steady state does not grow with the names ever used (issue 9, section 6) ---------


def _listener_entries(sync: flexisync.Coordinator) -> int:
    """Entries in every table the listener holds (dicts, lists, sets, deques)."""
    return sum(len(value) for value in vars(sync._ctx.listener).values()
               if isinstance(value, (dict, list, set, collections.deque)))


def test_listener_tables_return_to_their_size_after_subscribe_close_cycles(
        sync: flexisync.Coordinator) -> None:
    """2,000 subscribe/close cycles on distinct topics leave the listener's tables as
    they were: entries go when Redis confirms the unsubscribe. Replies stay matched to
    their commands (a later subscribe is confirmed) after idle PINGs."""
    keep = sync.events.subscribe("keep")
    baseline = _listener_entries(sync)
    for i in range(2000):
        sync.events.subscribe(f"cycle.{i}").close()
    with sync.events.subscribe("cycle.*"):
        pass
    wait_until(lambda: _listener_entries(sync) == baseline,
               message=f"listener tables back to {baseline} (now {_listener_entries(sync)})")
    sync.events.publish("keep", 1)
    assert keep.get(timeout=5) is not None
    # With nothing subscribed, PINGs get plain replies; they are accounted for too.
    keep.close()
    listener = sync._ctx.listener
    sent, listener.ping_interval = listener._sent, 0.01
    wait_until(lambda: listener._sent >= sent + 3 and not listener._pending,
               message="idle PINGs answered")
    again = sync.events.subscribe("again", timeout=3)
    sync.events.publish("again", 2)
    assert again.get(timeout=5) is not None


# --- a channel the ACL refuses (issue 9, section 6) --------------------------------------


@pytest.fixture
def acl_server(own_server: Any) -> Iterator[tuple[Any, redis.Redis]]:
    """A private server with user ``limited`` (password ``pw``) allowed every command
    but only the channels ``acl:events:ok*``."""
    admin = redis.Redis(port=own_server.port)
    admin.execute_command("ACL", "SETUSER", "limited", "on", ">pw", "~*", "+@all",
                          "resetchannels", "&acl:events:ok*")
    yield own_server, admin
    admin.close()


def _limited(server: Any) -> flexisync.Coordinator:
    return flexisync.connect(f"redis://limited:pw@127.0.0.1:{server.port}/0", namespace="acl")


def test_refused_channel_raises_noperm_and_the_listener_keeps_serving(
        acl_server: tuple[Any, redis.Redis]) -> None:
    """subscribe() of a channel the ACL refuses raises BackendError naming NOPERM at once;
    the listener stays on its connection (no reconnect, no warning flood) and the
    healthy subscription keeps receiving."""
    server, _admin = acl_server
    with _limited(server) as sync:
        healthy = sync.events.subscribe("ok.1")
        generation = sync._ctx.listener.generation
        with capture_logs() as logs:
            started = time.monotonic()
            with pytest.raises(flexisync.BackendError, match="NOPERM"):
                sync.events.subscribe("secret", timeout=3.0)
            with pytest.raises(flexisync.BackendError, match="NOPERM"):
                sync.events.subscribe("sec*", timeout=3.0)
            assert time.monotonic() - started < 2.0, "the refusal must not wait for a timeout"
            sync.events.publish("ok.1", "still here")
            event = healthy.get(timeout=5)
            also = sync.events.subscribe("ok.2")
            sync.events.publish("ok.2", "new")
            assert also.get(timeout=5) is not None
        assert event is not None
        assert event.data == "still here"
        assert sync._ctx.listener.generation == generation, "the listener reconnected"
        assert [e for e in logs if e["log_level"] in ("warning", "error")] == []
        assert healthy.stats.gaps == 0


def test_channel_refused_after_a_reconnect_does_not_stop_hooks_or_hide_gaps(
        acl_server: tuple[Any, redis.Redis]) -> None:
    """When the ACL revokes a subscribed channel, Redis drops the connection; the
    listener reconnects once, resubscribes the rest, counts the gap on the healthy
    subscription, runs the reconnect hooks, and warns once, without a reconnect loop."""
    server, admin = acl_server
    with _limited(server) as sync:
        healthy = sync.events.subscribe("ok.1")
        doomed = sync.events.subscribe("ok.doomed")
        hooks = threading.Event()
        sync.events.on_reconnect(hooks.set)
        generation = sync._ctx.listener.generation
        with capture_logs() as logs:
            admin.execute_command("ACL", "SETUSER", "limited", "resetchannels",
                                  "&acl:events:ok.1")
            assert hooks.wait(10), "the reconnect hooks did not run"
            wait_until(lambda: healthy.stats.gaps == 1, message="the gap is counted")
            sync.events.publish("ok.1", "after")
            event = healthy.get(timeout=5)
        assert event is not None
        assert event.data == "after"
        assert sync._ctx.listener.generation == generation + 1, "one reconnect, not a loop"
        refusals = [e for e in logs if e["event"] == "events.subscribe_refused"]
        assert len(refusals) == 1
        assert "NOPERM" in refusals[0]["error"]
        doomed.close()


# --- bounded under a stalled server (issue 9, section 1) ---------------------------------


@pytest.fixture
def stalled(proxy: Any) -> Iterator[tuple[flexisync.Coordinator, Any]]:
    """A Coordinator through the fault proxy with a 1 s retry deadline, one live
    subscription, then the proxy stalled (a hung server)."""
    retry = flexisync.RetryPolicy(deadline=1.0)
    with flexisync.connect(proxy.url(), namespace="stall", retry=retry) as sync:
        sub = sync.events.subscribe("live")
        proxy.stall()
        yield sync, sub
        proxy.resume()


def test_subscribe_under_a_stalled_server_raises_within_its_timeout(
        stalled: tuple[flexisync.Coordinator, Any]) -> None:
    """subscribe(timeout=1) raises BackendUnavailable within 1 s (+ margin) when the
    server hangs, reporting the time it waited; the default waits the policy deadline.
    get(timeout=) and close() of the live subscription stay bounded too."""
    sync, sub = stalled
    started = time.monotonic()
    with pytest.raises(flexisync.BackendUnavailable, match="not confirmed") as caught:
        sync.events.subscribe("new", timeout=1.0)
    elapsed = time.monotonic() - started
    assert elapsed < 1.0 + 1.5
    assert caught.value.elapsed >= 0.9
    started = time.monotonic()
    with pytest.raises(flexisync.BackendUnavailable):
        sync.events.subscribe("other")
    assert time.monotonic() - started < 1.0 + 1.5
    started = time.monotonic()
    assert sub.get(timeout=0.5) is None
    assert time.monotonic() - started < 0.5 + 1.5
    started = time.monotonic()
    sub.close()  # Redis never confirms the UNSUBSCRIBE: bounded by the ping timeout
    assert time.monotonic() - started < sync._ctx.listener.ping_timeout + 1.5


def test_publish_under_a_stalled_server_is_bounded_by_the_deadline(
        stalled: tuple[flexisync.Coordinator, Any]) -> None:
    """publish() raises BackendUnavailable within the retry deadline (+ margin)."""
    sync, _sub = stalled
    started = time.monotonic()
    with pytest.raises(flexisync.BackendUnavailable):
        sync.events.publish("live", 1)
    assert time.monotonic() - started < 1.0 + 1.5
