"""Contract: live pub/sub events (``coordinator.events``), in every shell."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from typing import Any

import pytest

from flexisync import ConfigError, Event, SubscriptionStats
from tests.contract.conftest import Shell


async def _until(predicate: Callable[[], Any], what: str, timeout: float = 5.0) -> None:
    """Await until ``predicate()`` is true, yielding to the event loop meanwhile (an
    async-shell callback runs on this loop); fail with ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for: {what}")
        await asyncio.sleep(0.002)


def _raw_publish(shell: Shell, topic: str, payload: bytes) -> int:
    """PUBLISH ``payload`` on the topic's channel behind flexisync's back."""
    ctx = shell.coordinator._ctx
    return int(ctx.backend.client.publish(ctx.keys.channel("events", topic), payload))


def _balanced(stats: SubscriptionStats) -> bool:
    return stats.received == stats.delivered + stats.invalid + stats.dropped + stats.queued


# --- delivery -----------------------------------------------------------------------------


async def test_publish_after_subscribe_is_delivered_with_its_envelope(shell: Shell) -> None:
    """subscribe returns once confirmed: the next publish reaches it, with topic, type,
    data, a unique id, the publish time and the publisher's host:pid."""
    bus = shell.coordinator.events
    sub = await shell(bus.subscribe("providers"))
    before = time.time()
    assert await shell(bus.publish("providers", {"name": "openai"},
                                   type="provider.down")) == 1
    await shell(bus.publish("providers", 2))
    first = await shell(sub.get(timeout=5))
    second = await shell(sub.get(timeout=5))
    assert isinstance(first, Event)
    assert isinstance(second, Event)
    assert (first.topic, first.type, first.data) == ("providers", "provider.down",
                                                     {"name": "openai"})
    assert (second.type, second.data) == ("message", 2)
    assert first.id
    assert first.id != second.id
    assert before <= first.time <= time.time()
    assert first.source.endswith(f":{os.getpid()}")
    await shell.close(sub)


async def test_glob_subscription_gets_matching_topics_only(shell: Shell) -> None:
    """A pattern subscription receives matching topics, with the concrete topic."""
    bus = shell.coordinator.events
    sub = await shell(bus.subscribe("jobs.*"))
    assert await shell(bus.publish("other", "no")) == 0
    assert await shell(bus.publish("jobs.42", "yes")) == 1
    event = await shell(sub.get(timeout=5))
    assert event is not None
    assert (event.topic, event.data) == ("jobs.42", "yes")
    assert await shell(sub.get(timeout=0)) is None
    await shell.close(sub)


async def test_get_returns_none_on_timeout(shell: Shell) -> None:
    """get(timeout) with nothing published returns None, for 0 and for a short wait."""
    sub = await shell(shell.coordinator.events.subscribe("quiet"))
    assert await shell(sub.get(timeout=0)) is None
    assert await shell(sub.get(timeout=0.05)) is None
    assert sub.stats.received == 0
    await shell.close(sub)


async def test_iteration_yields_events_in_publish_order(shell: Shell) -> None:
    """`for` / `async for` over a subscription yields the events in order."""
    bus = shell.coordinator.events
    sub = await shell(bus.subscribe("it"))
    for i in range(5):
        await shell(bus.publish("it", i))
    events = await shell.take(sub, 5)
    assert [e.data for e in events] == [0, 1, 2, 3, 4]
    await shell.close(sub)


async def test_iteration_ends_once_the_subscription_is_closed(shell: Shell) -> None:
    """Iteration stops (no hang) when the subscription is closed; get returns None."""
    sub = await shell(shell.coordinator.events.subscribe("ends"))
    await shell.close(sub)
    assert await shell.take(sub, 10) == []
    assert await shell(sub.get(timeout=None)) is None


# --- closing --------------------------------------------------------------------------------


async def test_close_unsubscribes_discards_the_queue_and_is_idempotent(shell: Shell) -> None:
    """After close, publish reaches nobody, queued events count as dropped, close
    again is harmless."""
    bus = shell.coordinator.events
    sub = await shell(bus.subscribe("closing"))
    assert not sub.closed
    await shell(bus.publish("closing", 1))
    await shell(bus.publish("closing", 2))
    await _until(lambda: sub.stats.received == 2, "both events queued")
    await shell.close(sub)
    assert sub.closed
    assert await shell(bus.publish("closing", 3)) == 0, "still subscribed after close"
    stats = sub.stats
    assert (stats.received, stats.dropped, stats.queued) == (2, 2, 0)
    await shell.close(sub)


async def test_context_manager_closes_the_subscription(shell: Shell) -> None:
    """`with` / `async with` leaves the subscription closed and unsubscribed."""
    bus = shell.coordinator.events
    sub = await shell(bus.subscribe("ctx"))
    if shell.is_async:
        async with sub as held:
            assert held is sub
    else:
        with sub as held:
            assert held is sub
    assert sub.closed
    assert await shell(bus.publish("ctx", 1)) == 0


async def test_coordinator_close_closes_its_subscriptions(shell: Shell) -> None:
    """Closing the Coordinator (the last handle on its Context) closes subscriptions."""
    sub = await shell(shell.coordinator.events.subscribe("bye"))
    await shell.close(shell.coordinator)
    assert sub.closed
    assert await shell(sub.get(timeout=1)) is None


# --- callbacks ------------------------------------------------------------------------------


async def test_callback_gets_events_in_order_and_survives_raising(shell: Shell) -> None:
    """A callback subscription delivers in order; a raising call is counted in
    stats.errors and delivery goes on; get() is refused on it."""
    bus = shell.coordinator.events
    seen: list[int] = []

    def callback(event: Event) -> None:
        seen.append(event.data)
        if event.data == 1:
            raise ValueError("boom")

    sub = await shell(bus.subscribe("cb", callback))
    for i in range(4):
        await shell(bus.publish("cb", i))
    await _until(lambda: len(seen) == 4, "four callback calls")
    assert seen == [0, 1, 2, 3]
    await _until(lambda: sub.stats.errors == 1, "the raising call counted")
    assert sub.stats.delivered == 4
    with pytest.raises(RuntimeError, match="callback"):
        await shell(sub.get(timeout=0))
    await shell.close(sub)


# --- accounting -----------------------------------------------------------------------------


async def test_full_queue_keeps_the_newest_and_counts_the_dropped(shell: Shell) -> None:
    """maxsize=2 and 5 unread events: the 2 newest stay, 3 are counted dropped, and
    received == delivered + invalid + dropped + queued throughout."""
    bus = shell.coordinator.events
    sub = await shell(bus.subscribe("bounded", maxsize=2))
    for i in range(5):
        await shell(bus.publish("bounded", i))
    await _until(lambda: sub.stats.received == 5, "five events received")
    assert sub.stats.dropped == 3
    assert _balanced(sub.stats)
    events = [await shell(sub.get(timeout=1)) for _ in range(2)]
    assert [e.data for e in events] == [3, 4]
    assert await shell(sub.get(timeout=0)) is None
    stats = sub.stats
    assert (stats.delivered, stats.dropped, stats.queued) == (2, 3, 0)
    assert _balanced(stats)
    await shell.close(sub)


async def test_foreign_messages_are_delivered_or_counted_invalid(shell: Shell) -> None:
    """Another program's JSON arrives as type "message" with empty id/source; non-JSON
    and malformed envelopes are counted invalid and skipped, never raised."""
    sub = await shell(shell.coordinator.events.subscribe("foreign"))
    assert _raw_publish(shell, "foreign", b"\xff\xfe not json") == 1
    assert _raw_publish(shell, "foreign", b'{"flexisync": 1, "type": "bad type"}') == 1
    assert _raw_publish(shell, "foreign", b'{"flexisync": 1, "id": 5}') == 1
    assert _raw_publish(shell, "foreign", b'{"plain": [1, 2]}') == 1
    event = await shell(sub.get(timeout=5))
    assert event is not None
    assert (event.type, event.data, event.id, event.source) == (
        "message", {"plain": [1, 2]}, "", "")
    stats = sub.stats
    assert (stats.received, stats.invalid, stats.delivered) == (4, 3, 1)
    assert _balanced(stats)
    await shell.close(sub)


# --- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize("topic", ["", "has space", "new\nline", "x" * 201, None])
async def test_bad_topics_raise_config_error(shell: Shell, topic: Any) -> None:
    """publish and subscribe refuse a topic that breaks the name rule, before any I/O;
    publish also refuses glob characters."""
    bus = shell.coordinator.events
    with pytest.raises(ConfigError):
        await shell(bus.publish(topic, 1))
    with pytest.raises(ConfigError):
        await shell(bus.subscribe(topic))
    with pytest.raises(ConfigError):
        await shell(bus.publish("jobs.*", 1))


async def test_bad_arguments_raise_before_any_io(shell: Shell) -> None:
    """A bad type, data, maxsize, max_bytes, timeout or callback is refused."""
    bus = shell.coordinator.events
    with pytest.raises(ConfigError):
        await shell(bus.publish("t", 1, type="two words"))
    with pytest.raises(TypeError):
        await shell(bus.publish("t", object()))
    for kwargs in ({"maxsize": 0}, {"maxsize": True}, {"max_bytes": 0},
                   {"timeout": -1}, {"callback": 3}):
        with pytest.raises(ConfigError):
            await shell(bus.subscribe("t", **kwargs))
    sub = await shell(bus.subscribe("t"))
    with pytest.raises(ConfigError):
        await shell(sub.get(timeout=-1))
    await shell.close(sub)
    assert shell.coordinator._ctx.listener.table_sizes()["handlers"] == 0
