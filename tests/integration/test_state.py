"""StateStore contract, run against real Redis and against the memory:// backend."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator

import pytest
import redis

import flexisync
from flexisync.testing import unique_namespace


@pytest.fixture(params=["redis", "memory"])
def store_sync(request: pytest.FixtureRequest, flexisync_url: str,
               raw: redis.Redis) -> Iterator[flexisync.Coordinator]:
    """A Coordinator on real Redis, then on memory:// — the same contract for both."""
    ns = unique_namespace()
    url = flexisync_url if request.param == "redis" else f"memory://{ns}"
    with flexisync.connect(url, namespace=ns) as sync:
        yield sync
    if request.param == "redis":
        for key in raw.scan_iter(match=f"{ns}:*"):
            raw.unlink(key)


def test_set_then_get_round_trips_json(store_sync: flexisync.Coordinator) -> None:
    """Values come back as the JSON they were stored as."""
    store = store_sync.state("providers")
    value = {"healthy": False, "latency": 1.5, "tags": ["a", "b"], "n": None}
    store.set("openai", value)
    assert store.get("openai") == value
    store.set("tuple", (1, 2))
    assert store.get("tuple") == [1, 2]


def test_get_missing_returns_default(store_sync: flexisync.Coordinator) -> None:
    """A missing key gives the default (None unless told)."""
    store = store_sync.state("s")
    assert store.get("nope") is None
    assert store.get("nope", default=7) == 7


def test_ttl_reports_inf_none_and_seconds(store_sync: flexisync.Coordinator) -> None:
    """ttl(): math.inf without expiry, None when missing, float seconds otherwise."""
    store = store_sync.state("s")
    store.set("forever", 1)
    assert store.ttl("forever") == math.inf
    assert store.ttl("missing") is None
    store.set("short", 1, ttl=30)
    remaining = store.ttl("short")
    assert remaining is not None
    assert 29.0 < remaining <= 30.0


def test_store_default_ttl_applies_to_writes(store_sync: flexisync.Coordinator) -> None:
    """set/add without ttl use the store default; an explicit ttl overrides it."""
    store = store_sync.state("s", ttl=60.0)
    assert store.default_ttl == 60.0
    store.set("a", 1)
    store.add("b", 1)
    store.set("c", 1, ttl=5)
    assert 59 < (store.ttl("a") or 0) <= 60
    assert 59 < (store.ttl("b") or 0) <= 60
    assert 4 < (store.ttl("c") or 0) <= 5


def test_values_expire_after_their_ttl(store_sync: flexisync.Coordinator) -> None:
    """A value written with a 50 ms TTL is gone after it (the sleep is the TTL itself)."""
    store = store_sync.state("s")
    store.set("blip", "x", ttl=0.05)
    assert store.get("blip") == "x"
    time.sleep(0.12)
    assert store.get("blip") is None
    assert store.ttl("blip") is None


def test_add_sets_only_when_absent(store_sync: flexisync.Coordinator) -> None:
    """add() is SET NX: True the first time, False after, value unchanged."""
    store = store_sync.state("s")
    assert store.add("k", 1) is True
    assert store.add("k", 2) is False
    assert store.get("k") == 1


def test_delete_reports_whether_key_existed(store_sync: flexisync.Coordinator) -> None:
    """delete() is True only when something was deleted."""
    store = store_sync.state("s")
    store.set("k", 1)
    assert store.delete("k") is True
    assert store.delete("k") is False
    assert "k" not in store


def test_update_applies_fn_and_returns_new_value(store_sync: flexisync.Coordinator) -> None:
    """update() passes the current value (or default) and stores the result."""
    store = store_sync.state("s")
    assert store.update("n", lambda v: v + 1, default=41) == 42
    assert store.update("n", lambda v: v * 2) == 84
    assert store.get("n") == 84


def test_update_keeps_existing_ttl_when_none_given(store_sync: flexisync.Coordinator) -> None:
    """A read-modify-write never drops a TTL (walrus's CAS trap)."""
    store = store_sync.state("s")
    store.set("k", 1, ttl=30)
    store.update("k", lambda v: v + 1)
    remaining = store.ttl("k")
    assert remaining is not None
    assert 29 < remaining <= 30
    store.update("k", lambda v: v + 1, ttl=100)
    assert 99 < (store.ttl("k") or 0) <= 100


def test_update_uses_store_default_ttl(store_sync: flexisync.Coordinator) -> None:
    """With a store default, update() writes with it like set() does."""
    store = store_sync.state("s", ttl=50)
    store.update("k", lambda _v: 1, default=0)
    assert 49 < (store.ttl("k") or 0) <= 50


def test_incr_counts_and_sets_ttl_only_on_creation(store_sync: flexisync.Coordinator) -> None:
    """incr() adds; its TTL is set when the key is created and kept afterwards."""
    store = store_sync.state("s")
    assert store.incr("hits", ttl=30) == 1
    assert store.incr("hits", 5, ttl=300) == 6
    assert 29 < (store.ttl("hits") or 0) <= 30
    assert store.get("hits") == 6
    assert store.incr("plain", -2) == -2
    assert store.ttl("plain") == math.inf


def test_incr_on_a_non_integer_value_is_a_backend_error(
        store_sync: flexisync.Coordinator) -> None:
    """incr() of a JSON object raises BackendError, not a raw redis error."""
    store = store_sync.state("s")
    store.set("obj", {"a": 1})
    with pytest.raises(flexisync.BackendError, match="not an integer"):
        store.incr("obj")
    assert store.get("obj") == {"a": 1}


def test_keys_items_and_clear_cover_only_this_scope(store_sync: flexisync.Coordinator) -> None:
    """Scope listing sees its own keys only; clear() deletes them and counts."""
    mine, other = store_sync.state("mine"), store_sync.state("other")
    for i in range(3):
        mine.set(f"k{i}", i)
    other.set("k0", "other")
    assert mine.keys() == ["k0", "k1", "k2"]
    assert mine.items() == {"k0": 0, "k1": 1, "k2": 2}
    assert mine.clear() == 3
    assert mine.keys() == []
    assert other.items() == {"k0": "other"}


def test_state_survives_a_new_coordinator(store_sync: flexisync.Coordinator) -> None:
    """A second Coordinator on the same URL and namespace reads the same values."""
    store_sync.state("s").set("persist", {"v": 1})
    with flexisync.connect(store_sync.url, namespace=store_sync.namespace) as again:
        assert again.state("s").get("persist") == {"v": 1}


@pytest.mark.parametrize("value", [object(), {1, 2}, b"bytes", math.nan, {"x": math.inf}])
def test_non_json_values_raise_type_error_and_write_nothing(
        store_sync: flexisync.Coordinator, value: object) -> None:
    """set/add/update with a non-JSON value raise TypeError before anything is written."""
    store = store_sync.state("s")
    store.set("k", "before")
    with pytest.raises(TypeError, match="not JSON-serializable"):
        store.set("k", value)
    with pytest.raises(TypeError):
        store.add("new", value)
    with pytest.raises(TypeError):
        store.update("k", lambda _v: value)
    assert store.get("k") == "before"
    assert "new" not in store


@pytest.mark.parametrize("ttl", [0, -1, -0.5, "10", math.nan])
def test_bad_ttl_raises_config_error_and_writes_nothing(
        store_sync: flexisync.Coordinator, ttl: object) -> None:
    """A TTL <= 0 (or not a number) is refused on the store and on each write."""
    with pytest.raises(flexisync.ConfigError):
        store_sync.state("s", ttl=ttl)  # type: ignore[arg-type]
    store = store_sync.state("s")
    with pytest.raises(flexisync.ConfigError):
        store.set("k", 1, ttl=ttl)  # type: ignore[arg-type]
    with pytest.raises(flexisync.ConfigError):
        store.incr("k", ttl=ttl)  # type: ignore[arg-type]
    assert store.keys() == []


@pytest.mark.parametrize("bad", ["", "with space", "a{b}", "x" * 201, 5])
def test_bad_scope_and_key_names_raise_config_error(
        store_sync: flexisync.Coordinator, bad: object) -> None:
    """Bad scopes and keys are refused before Redis is touched."""
    with pytest.raises(flexisync.ConfigError):
        store_sync.state(bad)  # type: ignore[arg-type]
    store = store_sync.state("s")
    with pytest.raises(flexisync.ConfigError):
        store.set(bad, 1)  # type: ignore[arg-type]
    with pytest.raises(flexisync.ConfigError):
        store.get(bad)  # type: ignore[arg-type]
    assert store.keys() == []


def test_bad_update_and_incr_arguments(store_sync: flexisync.Coordinator) -> None:
    """update() needs a callable; incr() needs an int amount."""
    store = store_sync.state("s")
    with pytest.raises(flexisync.ConfigError, match="callable"):
        store.update("k", 5)  # type: ignore[arg-type]
    with pytest.raises(flexisync.ConfigError, match="int"):
        store.incr("k", 1.5)  # type: ignore[arg-type]
    with pytest.raises(flexisync.ConfigError, match="int"):
        store.incr("k", True)
    assert store.keys() == []


def test_garbage_written_behind_our_back_raises_decode_error(
        sync: flexisync.Coordinator, raw: redis.Redis) -> None:
    """A non-JSON value under a state key raises DecodeError naming the key."""
    store = sync.state("s")
    raw.set(f"{sync.namespace}:state:{{s}}:bad", b"\xff not json")
    with pytest.raises(flexisync.DecodeError, match="'bad'"):
        store.get("bad")
