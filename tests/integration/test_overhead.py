"""The fast paths of issue 13's per-operation overhead work keep every promise.

Each shortcut taken on the common path (the C JSON encoder called directly, a scan
without the decoder's wrapper, INCRBY without a script when no TTL applies, EVALSHA
without redis-py's ``Script`` wrapper, small messages decoded under the queue's lock,
stream entries paired up in C) must behave exactly like the general path it skips.
"""

from __future__ import annotations

import json
import threading
import uuid
from typing import Any

import pytest
import redis

import flexisync
from flexisync._codec import MAX_DEPTH, dumps, loads
from flexisync._core.events import _DECODE_HELD
from flexisync.errors import DecodeError

VALUES: list[Any] = [
    None, True, False, 0, -1, 2**70, 1.5, -0.0, 1e300, "", "é\n\t\"\\\u2028", "\U0001f600",
    [], {}, [1, [2, [3]]], {"a": {"b": [None, 1.25, "x"]}, "z": []},
    {"unicode-ключ": "значение"}, list(range(50)), ("tuple", 1),
]


@pytest.mark.parametrize("value", VALUES, ids=repr)
def test_dumps_writes_exactly_what_the_json_module_writes(value: Any) -> None:
    """The direct C encoder builds the same text as ``json.dumps`` with flexisync's
    settings, and loads() reads it back to the JSON form of the value."""
    expected = json.dumps(value, separators=(",", ":"), allow_nan=False)
    assert dumps(value) == expected
    assert loads(expected.encode(), "k") == json.loads(expected)


@pytest.mark.parametrize(("value", "reason"), [
    (float("nan"), "Out of range float"), (float("inf"), "Out of range float"),
    ({1j: 1}, "keys must be str"), (object(), "not JSON serializable"),
])
def test_dumps_refuses_what_json_refuses_with_a_type_error(value: Any, reason: str) -> None:
    """Unsupported values raise TypeError naming the problem, as before."""
    with pytest.raises(TypeError, match=reason):
        dumps(value, "data")


def test_dumps_reports_a_circular_reference_not_a_depth_error() -> None:
    """A cycle is detected by the encoder (a fresh markers dict per call)."""
    cycle: list[Any] = []
    cycle.append(cycle)
    with pytest.raises(TypeError, match="Circular reference"):
        dumps(cycle)
    assert dumps([cycle[:0], cycle[:0]]) == "[[],[]]"  # a shared non-cyclic value is fine


def test_dumps_called_from_inside_dumps_uses_its_own_encoder() -> None:
    """A mapping whose items() calls dumps on itself is no false circular reference
    (each call takes its own encoder and cycle markers)."""
    nested: list[str] = []
    started: list[bool] = []

    class Sneaky(dict[str, Any]):
        def items(self) -> Any:
            if not started:
                started.append(True)
                nested.append(dumps({"again": self}))
            return super().items()

    assert dumps(Sneaky(a=1)) == '{"a":1}'
    assert nested == ['{"again":{"a":1}}']
    assert dumps({"b": 2}) == '{"b":2}'


@pytest.mark.parametrize("raw", [b" {\"a\": 1} ", b"\n[1]\n", b"\t1", b"2 "])
def test_loads_reads_documents_with_surrounding_whitespace(raw: bytes) -> None:
    """Whitespace around the document (another program's JSON) still parses."""
    assert loads(raw, "k") == json.loads(raw)


@pytest.mark.parametrize(("raw", "message"), [
    (b'{"a":1} x', "Extra data"), (b"[1] [2]", "Extra data"), (b"", "Expecting value"),
    (b"NaN", "NaN is not valid JSON"), (b"[Infinity]", "Infinity is not valid JSON"),
    (b'{"a":', "Expecting value"), (b"\xff", "not UTF-8"), (b"tru", "Expecting value"),
])
def test_loads_refuses_junk_with_a_decode_error_naming_it(raw: bytes, message: str) -> None:
    """Everything the fast scan cannot take goes through the full decoder, whose
    message the DecodeError carries."""
    with pytest.raises(DecodeError, match=message) as caught:
        loads(raw, "the-key")
    assert caught.value.key == "the-key"


def test_loads_still_checks_depth_before_parsing() -> None:
    """Short documents skip the bracket count, long deep ones are still refused."""
    deep = "[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1)
    with pytest.raises(DecodeError, match="nested"):
        loads(deep.encode(), "k")
    ok = "[" * MAX_DEPTH + "]" * MAX_DEPTH
    assert isinstance(loads(ok, "k"), list)


@pytest.mark.parametrize("ttl", [None, 60.0], ids=["no-ttl (INCRBY)", "ttl (script)"])
def test_incr_reports_the_same_errors_with_and_without_a_ttl(
        sync: flexisync.Coordinator, raw: redis.Redis, ttl: float | None) -> None:
    """Both incr paths: a hash is a DecodeError naming its type, a non-integer and an
    overflow are BackendErrors saying which, and nothing changes."""
    store = sync.state("s")
    key = f"{sync.namespace}:state:{{s}}:"
    raw.hset(key + "h", "f", "1")
    with pytest.raises(flexisync.DecodeError, match="hash"):
        store.incr("h", ttl=ttl)
    raw.set(key + "f", b"1.5")
    with pytest.raises(flexisync.BackendError, match="'f' is not an integer"):
        store.incr("f", ttl=ttl)
    assert raw.get(key + "f") == "1.5"  # the raw fixture decodes replies
    store.set("big", 2**63 - 1)
    with pytest.raises(flexisync.BackendError, match="64-bit integer range"):
        store.incr("big", ttl=ttl)
    assert store.get("big") == 2**63 - 1
    assert store.incr("n", 5, ttl=ttl) == 5
    assert store.incr("n", -7, ttl=ttl) == -2


def test_incr_without_a_ttl_keeps_an_existing_expiry(sync: flexisync.Coordinator) -> None:
    """The INCRBY path never touches the TTL: a counter made with one keeps it."""
    store = sync.state("s")
    store.incr("w", ttl=60.0)
    store.incr("w")
    left = store.ttl("w")
    assert left is not None
    assert 0 < left <= 60.0
    store.incr("forever")
    assert store.ttl("forever") == float("inf")


def test_a_script_runs_again_after_the_server_forgot_it() -> None:
    """NOSCRIPT (a restarted server) loads the script and runs it, with no error."""
    with flexisync.connect(f"memory://overhead-{uuid.uuid4().hex}", namespace="o") as sync:
        store = sync.state("s")
        assert store.incr("n", ttl=60.0) == 1
        sync.client.script_flush()
        assert store.incr("n", ttl=60.0) == 2
        assert store.update("u", lambda v: (v or 0) + 1) == 1
        sync.client.script_flush()
        assert store.update("u", lambda v: v + 1) == 2


@pytest.mark.parametrize("size", [10, _DECODE_HELD + 1000], ids=["small", "large"])
def test_events_small_and_large_are_delivered_and_counted(sync: flexisync.Coordinator,
                                                          size: int) -> None:
    """Small messages (decoded under the queue's lock) and large ones (decoded outside
    it) arrive whole; invalid ones of both sizes are counted, and the counters add up."""
    sub = sync.events.subscribe("t", maxsize=100)
    data = {"blob": "x" * size}
    sync.events.publish("t", data, type="big.one")
    sync.client.publish(f"{sync.namespace}:events:t", b"\xff" + b"y" * size)  # junk
    sync.events.publish("t", [size], type="after")
    first, second = sub.get(timeout=10), sub.get(timeout=10)
    assert first is not None
    assert (first.data, first.type) == (data, "big.one")
    assert second is not None
    assert (second.data, second.type) == ([size], "after")
    stats = sub.stats
    assert (stats.received, stats.delivered, stats.invalid, stats.queued) == (3, 2, 1, 0)
    sub.close()


def test_callback_subscription_gets_events_in_order(sync: flexisync.Coordinator) -> None:
    """The listener's fast path for channel messages keeps order and content."""
    got: list[int] = []
    done = threading.Event()

    def callback(event: flexisync.Event) -> None:
        got.append(event.data)
        if len(got) == 200:
            done.set()

    sub = sync.events.subscribe("order", callback, maxsize=1000)
    for i in range(200):
        sync.events.publish("order", i)
    assert done.wait(30), f"only {len(got)} of 200 events arrived"
    assert got == list(range(200))
    sub.close()


def test_stream_entries_decode_the_same_whoever_wrote_them(sync: flexisync.Coordinator,
                                                          raw: redis.Redis) -> None:
    """flexisync's entries take the paired-up fast path; a foreign entry (bytes keys,
    no type/data) is still handed over as its fields, a bad one still a DecodeError."""
    stream = sync.stream("s")
    first = stream.append({"a": [1, 2]}, type="made")
    key = f"{sync.namespace}:stream:{{s}}"
    raw.xadd(key, {"color": "blue", b"n\xff": b"1"})
    raw.xadd(key, {"type": "ok", "data": "{bad json", "time": "1.5"})
    events = stream.read_after(None, count=2)
    assert [e.type for e in events] == ["made", "message"]
    assert (events[0].data, events[0].id) == ({"a": [1, 2]}, first)
    assert events[0].source
    assert events[0].time > 0
    assert events[1].data == {"color": "blue", "n\ufffd": "1"}
    with pytest.raises(DecodeError, match="#"):
        stream.read_after(events[1].id)
