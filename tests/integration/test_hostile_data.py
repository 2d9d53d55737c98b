"""Foreign data written into flexisync's keys and channels by another program.

Whatever bytes sit in a state key or arrive on an events channel, flexisync answers with
``DecodeError`` (state) or counts the message as ``invalid`` (events): never a raw
``RecursionError``, ``UnicodeDecodeError`` or redis error, never a value JSON cannot
carry, never a silently skipped key. (Stream cases live with the streams tests.)
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from structlog.testing import capture_logs

import flexisync
from flexisync._codec import MAX_DEPTH
from tests.helpers import wait_until

DEEP = b"[" * 100_000 + b"]" * 100_000
DEEP_OBJECT = b'{"a":' * 100_000 + b"1" + b"}" * 100_000

# Bytes another program might leave in a key or publish on a channel.
FOREIGN = {
    "deep-array": DEEP,
    "deep-object": DEEP_OBJECT,
    "not-utf8": b"\xff\xfe{}",
    "nan": b"NaN",
    "infinity": b"[-Infinity]",
    "huge-integer": b"9" * 5000,
    "truncated": b'{"a": [1, 2',
    "empty": b"",
    "pickle": b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00K\x01.",
}


@pytest.fixture
def raw_bytes(flexisync_url: str) -> Iterator[redis.Redis]:
    """A plain redis-py client that returns bytes, for foreign values that are not UTF-8."""
    client = redis.Redis.from_url(flexisync_url)
    yield client
    client.close()


def state_key(sync: flexisync.Coordinator, scope: str, key: str) -> str:
    return f"{sync.namespace}:state:{{{scope}}}:{key}"


def nested(levels: int) -> Any:
    value: Any = 0
    for _ in range(levels):
        value = [value]
    return value


# --- state --------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(FOREIGN))
def test_foreign_bytes_make_get_update_and_items_raise_decode_error(
        sync: flexisync.Coordinator, raw_bytes: redis.Redis, name: str) -> None:
    """get/update/items on any foreign bytes raise DecodeError naming the key."""
    store = sync.state("s")
    raw_bytes.set(state_key(sync, "s", "bad"), FOREIGN[name])
    calls: list[Any] = []
    with pytest.raises(flexisync.DecodeError) as caught:
        store.get("bad")
    assert caught.value.key == "bad"
    with pytest.raises(flexisync.DecodeError, match="'bad'"):
        store.update("bad", calls.append)
    with pytest.raises(flexisync.DecodeError, match="'bad'"):
        store.items()
    assert calls == [], "update() must not call fn on a value it cannot read"
    assert raw_bytes.get(state_key(sync, "s", "bad")) == FOREIGN[name], \
        "the foreign value must be left alone"


def test_nesting_is_limited_to_max_depth_both_ways(sync: flexisync.Coordinator,
                                                    raw: redis.Redis) -> None:
    """512 levels round-trip; 513 are refused by set() (TypeError, nothing written) and,
    written by someone else, by get() (DecodeError): what flexisync writes it can read."""
    store = sync.state("s")
    store.set("ok", nested(MAX_DEPTH))
    assert store.get("ok") == nested(MAX_DEPTH)
    with pytest.raises(TypeError, match="512"):
        store.set("too-deep", nested(MAX_DEPTH + 1))
    assert store.get("too-deep") is None
    with pytest.raises(TypeError, match="JSON-serializable"):
        store.set("recursive", nested(100_000))
    raw.set(state_key(sync, "s", "too-deep"), "[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1))
    with pytest.raises(flexisync.DecodeError, match="513 levels"):
        store.get("too-deep")
    # Brackets inside strings are data, not depth.
    value = {"text": "[" * 10_000 + "{" * 10_000 + '\\"[', "list": ["]]]"] * 1000}
    store.set("brackets", value)
    assert store.get("brackets") == value


def test_keys_and_items_agree_on_a_key_of_another_type(sync: flexisync.Coordinator,
                                                       raw: redis.Redis) -> None:
    """A hash in the scope is listed by keys(); items() and get() raise DecodeError
    naming it instead of skipping it silently (or raising a raw WRONGTYPE)."""
    store = sync.state("s")
    store.set("good", 1)
    raw.hset(state_key(sync, "s", "intruder"), "field", "value")
    assert store.keys() == ["good", "intruder"]
    with pytest.raises(flexisync.DecodeError, match="hash") as caught:
        store.items()
    assert caught.value.key == "intruder"
    with pytest.raises(flexisync.DecodeError, match="hash"):
        store.get("intruder")
    with pytest.raises(flexisync.DecodeError, match="hash"):
        store.update("intruder", lambda v: v)
    assert store.clear() == 2


def test_update_raced_by_a_foreign_type_raises_decode_error(sync: flexisync.Coordinator,
                                                             raw: redis.Redis) -> None:
    """A key turned into a hash between update()'s read and its compare-and-set makes
    the script answer 'wrong type' (not a raw script error): DecodeError, hash kept."""
    store = sync.state("s")
    store.set("k", 1)

    def sabotage(value: int) -> int:
        rkey = state_key(sync, "s", "k")
        raw.delete(rkey)
        raw.hset(rkey, "f", "v")
        return value + 1

    with pytest.raises(flexisync.DecodeError, match="'k'"):
        store.update("k", sabotage)
    assert raw.type(state_key(sync, "s", "k")) == "hash"


def test_items_skips_only_keys_that_expire_between_scan_and_read(
        sync: flexisync.Coordinator, raw: redis.Redis) -> None:
    """A key gone between SCAN and MGET is left out of items(); a hash there is not."""
    store = sync.state("s")
    store.set("stays", 1)
    store.set("goes", 2)
    raw.hset(state_key(sync, "s", "hash"), "f", "v")
    real_scan = store._core._scan

    def scan_then_expire(operation: str) -> Any:
        found = yield from real_scan(operation)
        raw.delete(state_key(sync, "s", "goes"))
        return found

    store._core._scan = scan_then_expire  # type: ignore[method-assign]
    with pytest.raises(flexisync.DecodeError, match="'hash'"):
        store.items()
    raw.delete(state_key(sync, "s", "hash"))
    store.set("goes", 2)
    assert store.items() == {"stays": 1}




@pytest.mark.parametrize("stored", [b"1.5", b'"12"', b'{"a":1}', b"abc", DEEP])
def test_incr_of_a_foreign_non_integer_is_a_clear_error(
        sync: flexisync.Coordinator, raw: redis.Redis, stored: bytes) -> None:
    """incr() over a value that is not an integer says so and leaves it unchanged."""
    store = sync.state("s")
    raw.set(state_key(sync, "s", "n"), stored)
    with pytest.raises(flexisync.BackendError, match="'n' is not an integer"):
        store.incr("n")
    assert raw.get(state_key(sync, "s", "n")) == stored.decode()


def test_incr_of_a_hash_or_past_64_bits_is_a_clear_error(sync: flexisync.Coordinator,
                                                         raw: redis.Redis) -> None:
    """A hash under incr is a DecodeError; an overflowing sum a BackendError saying so;
    an amount beyond 64 bits a ConfigError before Redis is touched."""
    store = sync.state("s")
    raw.hset(state_key(sync, "s", "h"), "f", "1")
    with pytest.raises(flexisync.DecodeError, match="hash"):
        store.incr("h")
    store.set("big", 2**63 - 1)
    with pytest.raises(flexisync.BackendError, match="64-bit"):
        store.incr("big")
    assert store.get("big") == 2**63 - 1
    with pytest.raises(flexisync.ConfigError, match="64 bits"):
        store.incr("n", 2**70)
    assert "n" not in store


# --- events -------------------------------------------------------------------------


def test_foreign_messages_are_counted_invalid_and_delivery_goes_on(
        sync: flexisync.Coordinator, raw: redis.Redis) -> None:
    """Deep, non-UTF-8, NaN and malformed-envelope messages are counted invalid without a
    traceback; valid ones around them are delivered; received == delivered + invalid +
    dropped + queued."""
    sub = sync.events.subscribe("t")
    channel = f"{sync.namespace}:events:t"
    envelopes = [
        b'{"flexisync":1,"id":"x","type":"bad\\ndata: injected","data":1}',  # SSE injection
        b'{"flexisync":1,"id":["not","a","string"],"type":"t","data":1}',
        b'{"flexisync":1,"id":"x","type":{"a":1},"data":1}',
    ]
    hostile = [payload for payload in FOREIGN.values() if payload != b""] + envelopes
    with capture_logs() as logs:
        raw.publish(channel, b"[1]")
        for payload in hostile:
            raw.publish(channel, payload)
        raw.publish(channel, b'{"flexisync":1,"id":"y","type":"ok","time":1e999,"data":2}')
        raw.publish(channel, b'{"flexisync":1,"id":"z","type":"ok","time":1e400,"data":3}')
        wait_until(lambda: sub.stats.received == len(hostile) + 3, message="all received")
        events = [sub.get(timeout=5) for _ in range(3)]
        assert sub.get(timeout=0) is None
    assert [e.data for e in events if e is not None] == [[1], 2, 3]
    assert all(e is not None and math.isfinite(e.time) for e in events)
    stats = sub.stats
    assert stats.invalid == len(hostile)
    assert stats.received == stats.delivered + stats.invalid + stats.dropped + stats.queued
    assert sync._ctx.listener.handler_errors == 0
    assert not [entry for entry in logs if entry["log_level"] in ("error", "critical")]


def test_foreign_messages_do_not_break_callback_subscriptions(
        sync: flexisync.Coordinator, raw: redis.Redis) -> None:
    """A callback subscription skips foreign messages (counted invalid) and keeps going."""
    seen: list[Any] = []
    sub = sync.events.subscribe("cb", seen.append)
    channel = f"{sync.namespace}:events:cb"
    for payload in (DEEP, b"\xff", b"NaN"):
        raw.publish(channel, payload)
    sync.events.publish("cb", "after")
    wait_until(lambda: seen, message="the valid event delivered")
    assert [e.data for e in seen] == ["after"]
    stats = sub.stats
    assert (stats.invalid, stats.delivered, stats.errors) == (3, 1, 0)


def test_publish_refuses_data_nested_beyond_the_limit(sync: flexisync.Coordinator) -> None:
    """publish() raises TypeError for data deeper than 512 levels and sends nothing."""
    sub = sync.events.subscribe("deep")
    with pytest.raises(TypeError, match="512"):
        sync.events.publish("deep", nested(MAX_DEPTH + 1))
    with pytest.raises(TypeError, match="JSON-serializable"):
        sync.events.publish("deep", nested(100_000))
    sync.events.publish("deep", nested(MAX_DEPTH))
    event = sub.get(timeout=5)
    assert event is not None
    assert event.data == nested(MAX_DEPTH)
    assert sub.stats.received == 1
