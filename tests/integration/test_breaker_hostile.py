"""CircuitBreaker against hostile data: foreign writes into its keys and channel,
out-of-range arguments reaching its scripts, and the lifetime of its record."""

from __future__ import annotations

import math
from typing import Any

import pytest
import redis
from structlog.testing import capture_logs

import flexisync
from flexisync.breaker import MAX_DURATION
from flexisync.breaker._hub import hub_of
from tests.helpers import wait_until

WEEK_MS = 7 * 24 * 3600 * 1000


class ProviderDown(RuntimeError):
    """What the fake dependency raises."""


class RateLimited(RuntimeError):
    """A provider's 429 with an absurd Retry-After."""

    retry_after = 1e14


def fail() -> None:
    raise ProviderDown("down")


def keys(sync: flexisync.Coordinator, name: str = "provider") -> tuple[str, str, str]:
    k = sync._ctx.keys
    return (k.key("breaker", name), k.key("breaker", name, "window"),
            k.key("breaker", name, "probes"))


def dump(raw: redis.Redis, *names: str) -> list[Any]:
    """Everything stored under ``names``: type, content and expiry (ms, -1 = none)."""
    out: list[Any] = []
    for name in names:
        kind = raw.type(name)
        content: Any = None
        if kind == "hash":
            content = raw.hgetall(name)
        elif kind == "zset":
            content = raw.zrange(name, 0, -1, withscores=True)
        elif kind == "string":
            content = raw.get(name)
        ttl = raw.pttl(name)
        out.append((name, kind, content, -1 if ttl == -1 else ttl > 0))
    return out


def events(logs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [entry for entry in logs if entry["event"] == name]


# --- the record's lifetime ----------------------------------------------------------


def test_manual_states_last_until_changed(sync: flexisync.Coordinator,
                                          raw: redis.Redis) -> None:
    """force_open() and disable() leave a record with no expiry (they used to wear off
    after 7 days); a trip or a late failure does not bring the expiry back; reset()
    returns to the automatic states, which expire a week after their last change."""
    breaker = sync.breaker("provider", failure_threshold=1)
    state_key = keys(sync)[0]
    breaker.force_open()
    assert raw.pttl(state_key) == -1
    breaker.trip(5)
    assert breaker.info().state == "forced_open"
    assert raw.pttl(state_key) == -1
    breaker.disable()
    with pytest.raises(ProviderDown):
        breaker.call(fail)
    assert breaker.info().state == "disabled"
    assert raw.pttl(state_key) == -1
    breaker.reset()
    assert 0 < raw.pttl(state_key) <= WEEK_MS


def test_a_record_recreated_by_a_probe_still_expires(sync: flexisync.Coordinator,
                                                     raw: redis.Redis) -> None:
    """A record that vanished (expired, evicted) while this process mirrored an open
    breaker is recreated by the next probe with an expiry, never as a key that lives
    forever."""
    breaker = sync.breaker("provider")
    assert breaker.state == "closed"  # mirrored and subscribed
    breaker.trip(0.05)
    wait_until(lambda: breaker.stats().retry_after == 0, message="open period over")
    raw.delete(*keys(sync))
    assert breaker.call(lambda: "served") == "served"
    state_key = keys(sync)[0]
    assert raw.exists(state_key)
    assert 0 < raw.pttl(state_key) <= WEEK_MS


# --- durations and arguments --------------------------------------------------------


def test_trip_beyond_the_bound_changes_nothing_anywhere(sync: flexisync.Coordinator,
                                                        raw: redis.Redis) -> None:
    """trip(retry_after=1e14) raises ConfigError naming the argument and the bound; the
    record is untouched and the process keeps using the shared state."""
    breaker = sync.breaker("provider")
    breaker.trip(30)
    before = dump(raw, *keys(sync))
    with pytest.raises(flexisync.ConfigError, match=r"retry_after.*10 years"):
        breaker.trip(retry_after=1e14)
    assert dump(raw, *keys(sync)) == before
    assert breaker.stats().backend_available
    assert breaker.info().state == "open"


def test_a_provider_retry_after_beyond_the_bound_is_cut_to_it(
        sync: flexisync.Coordinator) -> None:
    """A failure carrying a provider's Retry-After of 1e14 s opens the breaker for the
    bound (10 years) in every process, instead of half-writing the record and dropping
    this process to its local fallback."""
    breaker = sync.breaker("provider")

    def limited() -> None:
        raise RateLimited("429")

    with pytest.raises(RateLimited):
        breaker.call(limited)
    info = breaker.info()
    assert info.state == "open"
    assert MAX_DURATION - 60 < info.retry_after <= MAX_DURATION
    assert breaker.stats().backend_available


@pytest.mark.parametrize(("script", "args"), [
    ("command", ["trip", str(10**17), "30000"]),
    ("command", ["trip", "", "1e33"]),
    ("command", ["explode", "", "30000"]),
    ("record", ["count", "5", "0", "20", "60000", "30000", "0", "1", str(10**17)]),
    ("record", ["count", "5", "0", "20", "60000", "30000", "x", "1", ""]),
    ("record", ["rate", "5", "2", "20", "60000", "30000", "0", "1", ""]),
    ("probe", ["token", "0", "1"]),
    ("probe", ["", "1000", "1"]),
    ("settle", ["token", "maybe", "1", "30000", "60000", ""]),
    ("settle", ["token", "fail", "1", "30000", "60000", "-5"]),
    ("read", ["-1"]),
])
def test_every_script_checks_all_arguments_before_its_first_write(
        sync: flexisync.Coordinator, raw: redis.Redis, script: str,
        args: list[str]) -> None:
    """A script given an out-of-range argument fails with an error and changes nothing
    (it used to write part of the record before failing)."""
    breaker = sync.breaker("provider", failure_threshold=3)
    with pytest.raises(ProviderDown):
        breaker.call(fail)
    breaker.trip(0.001)
    before = dump(raw, *keys(sync))
    with pytest.raises(flexisync.BackendError):
        hub_of(sync).run(script, list(keys(sync)), [breaker._core._channel, *args])
    assert dump(raw, *keys(sync)) == before


# --- foreign data in the record -----------------------------------------------------

REPAIRABLE: list[tuple[str, dict[str, str]]] = [
    ("non-numeric version", {"version": "abc"}),
    ("non-numeric open_until", {"state": "open", "open_until": "soon"}),
    ("not a state", {"state": "exploded"}),
    ("huge number", {"failures": "1e300"}),
    ("very long number", {"open_until": "9" * 400}),
    ("infinite number", {"trips": "inf"}),
    ("epoch with spaces", {"epoch": "a b c"}),
    ("non-numeric period_ms", {"state": "open", "period_ms": "long"}),
]


@pytest.mark.parametrize(("label", "fields"), REPAIRABLE, ids=[r[0] for r in REPAIRABLE])
def test_foreign_fields_in_the_record_are_reported_and_repaired(
        sync: flexisync.Coordinator, raw: redis.Redis, label: str,
        fields: dict[str, str]) -> None:
    """Garbage another program wrote into the breaker's hash never reaches the caller
    (it used to raise a raw IndexError without running the function): the function
    runs, its failure is counted, the record is repaired (logged as
    ``breaker.record_repaired``) and the breaker keeps working for the fleet."""
    breaker = sync.breaker("provider", failure_threshold=2, recovery_timeout=30)
    assert breaker.state == "closed"
    state_key = keys(sync)[0]
    raw.hset(state_key, mapping=fields)
    with capture_logs() as logs:
        for _ in range(2):
            with pytest.raises(ProviderDown):
                breaker.call(fail)
    assert events(logs, "breaker.record_repaired"), label
    assert breaker.stats().backend_available
    info = breaker.info()  # readable again
    assert info.state in ("open", "closed")
    wait_until(lambda: breaker.stats().state == info.state, message="mirror agrees")
    breaker.reset()
    for _ in range(2):
        with pytest.raises(ProviderDown):
            breaker.call(fail)
    assert breaker.info().state == "open"


def test_a_record_missing_its_fields_is_read_with_defaults(
        sync: flexisync.Coordinator, raw: redis.Redis) -> None:
    """A hash holding only ``state=open`` (no epoch, version, open period...) is read
    with the defaults: an open period that is over, so the next call is admitted as a
    probe; its failure reopens the breaker for the fleet as usual."""
    breaker = sync.breaker("provider", failure_threshold=2, recovery_timeout=30)
    assert breaker.state == "closed"
    state_key = keys(sync)[0]
    raw.delete(state_key)
    raw.hset(state_key, "state", "open")
    for _ in range(2):
        with pytest.raises(ProviderDown):
            breaker.call(fail)
    info = breaker.info()
    assert info.state == "open"
    assert 50 < info.retry_after <= 60  # a failed probe doubled the open period
    assert breaker.stats().backend_available


@pytest.mark.parametrize("damage", ["window string", "window garbage", "probes list",
                                    "probes forever"])
def test_foreign_window_and_probe_keys_are_replaced(
        sync: flexisync.Coordinator, raw: redis.Redis, damage: str) -> None:
    """The breaker's own auxiliary keys (failure-rate window, probe leases) holding
    another type or garbage are replaced; failures are still counted."""
    breaker = sync.breaker("provider", failure_rate=0.5, minimum_calls=2, window=60)
    assert breaker.state == "closed"
    _, window_key, probes_key = keys(sync)
    if damage == "window string":
        raw.set(window_key, "x")
    elif damage == "window garbage":
        raw.hset(window_key, "1:f", "many")
    elif damage == "probes list":
        raw.rpush(probes_key, "x")
    else:
        raw.zadd(probes_key, {"zombie": math.inf})
    with capture_logs() as logs:
        for _ in range(2):
            with pytest.raises(ProviderDown):
                breaker.call(fail)
    assert events(logs, "breaker.record_repaired")
    assert breaker.info().state == "open"


def test_a_state_key_of_another_type_is_treated_per_on_backend_error(
        sync: flexisync.Coordinator, raw: redis.Redis) -> None:
    """A string where the breaker's hash belongs may be another program's data: it is
    not overwritten. Calls still run (local fallback, one ``breaker.record_malformed``
    warning), ``breaker_info`` reports a BackendError, and ``reset()`` replaces the key
    so the breaker shares state again."""
    breaker = sync.breaker("provider", failure_threshold=2, refresh_interval=0.2)
    assert breaker.state == "closed"
    state_key = keys(sync)[0]
    raw.delete(state_key)
    raw.set(state_key, "someone else's")
    with capture_logs() as logs:
        for _ in range(2):
            with pytest.raises(ProviderDown):
                breaker.call(fail)
        assert breaker.state == "open"  # the local fallback, per on_backend_error
        with pytest.raises(flexisync.CircuitOpenError):
            breaker.call(fail)
    assert len(events(logs, "breaker.record_malformed")) == 1
    assert not breaker.stats().backend_available
    assert raw.get(state_key) == "someone else's"
    with pytest.raises(flexisync.BackendError, match="malformed"):
        flexisync.breaker.breaker_info(sync, "provider")
    breaker.reset()
    assert raw.type(state_key) == "hash"
    wait_until(lambda: breaker.stats().backend_available, message="shared again")
    assert breaker.state == "closed"


# --- foreign messages on the channel ------------------------------------------------

GARBAGE = [b"", b"\xff\xfe\xfd", b"hello", b"a b c d e f", b"e 1 open x 0",
           b"e 1 exploded 0 0", b"e 99999999999999999999999999 open 1 0",
           b"e 1 open 1 " + b"9" * 5000, b"x" * 100_000, b"e\n1 open 1 0"]


def test_garbage_on_the_channel_never_crashes_the_mirror(
        sync: flexisync.Coordinator, raw: redis.Redis) -> None:
    """Anything published on the breaker's channel that is not a snapshot is reported
    (``breaker.message_malformed``) and ignored: no handler error, and the mirror goes
    on following real transitions."""
    breaker = sync.breaker("provider")
    assert breaker.state == "closed"
    listener = sync._ctx.listener
    errors = listener.handler_errors
    with capture_logs() as logs:
        for payload in GARBAGE:
            raw.publish(breaker._core._channel, payload)
        with flexisync.connect(sync.url, namespace=sync.namespace) as other:
            other.breaker("provider").trip(30)
        wait_until(lambda: breaker.stats().state == "open", message="trip mirrored")
    assert listener.handler_errors == errors
    assert events(logs, "breaker.message_malformed")


def test_a_forged_snapshot_cannot_wedge_the_mirror(sync: flexisync.Coordinator,
                                                   raw: redis.Redis) -> None:
    """A well-formed message with a version the server never issued is believed at
    first (it cannot be told from a real one), but the re-reads of the record win:
    the mirror returns to the shared state instead of ignoring it forever."""
    breaker = sync.breaker("provider", refresh_interval=0.2)
    breaker.trip(0.001)
    breaker.reset()
    assert breaker.state == "closed"
    epoch = raw.hget(keys(sync)[0], "epoch")
    raw.publish(breaker._core._channel, f"{epoch} 999999999 forced_open -1 0")
    wait_until(lambda: breaker.stats().state == "forced_open", message="forged message")
    wait_until(lambda: breaker.stats().state == "closed", timeout=5,
               message="mirror back on the record")
    assert breaker.call(lambda: "served") == "served"
