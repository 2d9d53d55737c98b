"""Contract: the state store, in every shell (sync, asyncio; Redis, memory://)."""

from __future__ import annotations

import math
from typing import Any

import pytest

import flexisync
from tests.contract.conftest import Shell


def raw_client(shell: Shell) -> Any:
    """A blocking client on the shell's server (writes 'behind flexisync's back')."""
    return shell.coordinator._ctx.backend.client


def redis_key(shell: Shell, scope: str, key: str) -> str:
    return str(shell.coordinator._ctx.keys.prefix("state", scope)) + key


async def test_set_get_round_trip_json_and_default_when_missing(shell: Shell) -> None:
    """Values come back as the JSON stored; a missing key gives the default."""
    store = shell.coordinator.state("providers")
    value = {"healthy": False, "latency": 1.5, "tags": ["a", "b"], "n": None}
    assert await shell(store.set("openai", value)) is None
    assert await shell(store.get("openai")) == value
    await shell(store.set("tuple", (1, 2)))
    assert await shell(store.get("tuple")) == [1, 2]
    assert await shell(store.get("nope")) is None
    assert await shell(store.get("nope", 7)) == 7


async def test_ttl_rules_for_set_add_and_the_store_default(shell: Shell) -> None:
    """ttl(): inf without expiry, None when missing; the default applies, ttl= wins."""
    store = shell.coordinator.state("s", ttl=60.0)
    plain = shell.coordinator.state("s")
    await shell(plain.set("forever", 1))
    assert await shell(plain.ttl("forever")) == math.inf
    assert await shell(plain.ttl("missing")) is None
    await shell(store.set("d", 1))
    left = await shell(store.ttl("d"))
    assert left is not None
    assert 59.0 < left <= 60.0
    await shell(store.set("short", 1, ttl=30))
    left = await shell(store.ttl("short"))
    assert left is not None
    assert 29.0 < left <= 30.0
    assert await shell(store.add("added", 1)) is True
    left = await shell(store.ttl("added"))
    assert left is not None
    assert 59.0 < left <= 60.0


async def test_add_delete_and_contains(shell: Shell) -> None:
    """add() only when absent; delete() says whether it existed; contains() sees it."""
    store = shell.coordinator.state("s")
    assert await shell(store.add("k", 1)) is True
    assert await shell(store.add("k", 2)) is False
    assert await shell(store.get("k")) == 1
    assert await shell(store.contains("k")) is True
    if not shell.is_async:
        assert "k" in store
    assert await shell(store.delete("k")) is True
    assert await shell(store.delete("k")) is False
    assert await shell(store.contains("k")) is False


async def test_update_applies_fn_and_keeps_the_ttl_unless_given(shell: Shell) -> None:
    """update() writes fn(current) (default when missing); without ttl the key keeps
    the expiry it had; with one, it gets that one."""
    store = shell.coordinator.state("s")
    assert await shell(store.update("n", lambda v: v + 1, default=0)) == 1
    assert await shell(store.update("n", lambda v: v * 10)) == 10
    assert await shell(store.ttl("n")) == math.inf
    await shell(store.set("t", 1, ttl=50))
    await shell(store.update("t", lambda v: v + 1))
    left = await shell(store.ttl("t"))
    assert left is not None
    assert 49.0 < left <= 50.0
    await shell(store.update("t", lambda v: v + 1, ttl=20))
    left = await shell(store.ttl("t"))
    assert left is not None
    assert 19.0 < left <= 20.0
    assert await shell(store.get("t")) == 3


async def test_update_reruns_fn_when_another_writer_got_in_first(shell: Shell) -> None:
    """The compare-and-set loop: a write between fn's read and its write is not lost."""
    store = shell.coordinator.state("s")
    await shell(store.set("n", 0))
    seen: list[Any] = []

    def interfere(value: Any) -> Any:
        seen.append(value)
        if len(seen) == 1:  # another program writes while fn runs
            raw_client(shell).set(redis_key(shell, "s", "n"), "100")
        return value + 1

    assert await shell(store.update("n", interfere)) == 101
    assert seen == [0, 100]


async def test_incr_counts_and_gives_a_ttl_only_on_creation(shell: Shell) -> None:
    """incr(): missing counts as 0; its ttl is set when it creates the key, not after."""
    store = shell.coordinator.state("s")
    assert await shell(store.incr("c")) == 1
    assert await shell(store.incr("c", 5)) == 6
    assert await shell(store.incr("c", -10)) == -4
    assert await shell(store.ttl("c")) == math.inf
    assert await shell(store.incr("w", ttl=40)) == 1
    raw_client(shell).pexpire(redis_key(shell, "s", "w"), 10_000)
    assert await shell(store.incr("w", ttl=40)) == 2
    left = await shell(store.ttl("w"))
    assert left is not None
    assert left <= 10.0


async def test_keys_items_and_clear_cover_only_this_scope(shell: Shell) -> None:
    """keys() sorted, items() all values, clear() deletes them: only this scope's."""
    store = shell.coordinator.state("a")
    other = shell.coordinator.state("b")
    for i in range(3):
        await shell(store.set(f"k{i}", i))
    await shell(other.set("x", "other"))
    assert await shell(store.keys()) == ["k0", "k1", "k2"]
    assert await shell(store.items()) == {"k0": 0, "k1": 1, "k2": 2}
    assert await shell(store.clear()) == 3
    assert await shell(store.keys()) == []
    assert await shell(store.items()) == {}
    assert await shell(other.get("x")) == "other"


async def test_keys_pages_through_a_scope_larger_than_one_scan(shell: Shell) -> None:
    """More keys than one SCAN page: every one is listed, read and cleared once."""
    store = shell.coordinator.state("big")
    client = raw_client(shell)
    prefix = redis_key(shell, "big", "")
    client.mset({f"{prefix}k{i:04d}": str(i) for i in range(1200)})
    keys = await shell(store.keys())
    assert keys == [f"k{i:04d}" for i in range(1200)]
    items = await shell(store.items())
    assert len(items) == 1200
    assert items["k0999"] == 999
    assert await shell(store.clear()) == 1200


async def test_foreign_data_raises_decode_error_naming_the_key(shell: Shell) -> None:
    """Bytes that are not JSON, or a key of another Redis type: DecodeError naming the
    key from get/update/items/incr; nothing is overwritten; keys() and clear() still
    list and delete such keys."""
    store = shell.coordinator.state("s")
    client = raw_client(shell)
    client.set(redis_key(shell, "s", "garbage"), b"\xff not json")
    client.hset(redis_key(shell, "s", "hash"), "f", "v")
    with pytest.raises(flexisync.DecodeError, match="'garbage'"):
        await shell(store.get("garbage"))
    with pytest.raises(flexisync.DecodeError, match=r"'hash'.*hash"):
        await shell(store.get("hash"))
    with pytest.raises(flexisync.DecodeError, match="'hash'"):
        await shell(store.update("hash", lambda _: 1))
    with pytest.raises(flexisync.DecodeError, match="'garbage'"):
        await shell(store.update("garbage", lambda _: 1))
    with pytest.raises(flexisync.DecodeError, match="'hash'"):
        await shell(store.incr("hash"))
    with pytest.raises(flexisync.DecodeError, match="'garbage'"):
        await shell(store.items())
    assert client.type(redis_key(shell, "s", "hash")) in ("hash", b"hash")
    assert await shell(store.keys()) == ["garbage", "hash"]
    client.delete(redis_key(shell, "s", "garbage"))
    with pytest.raises(flexisync.DecodeError, match="'hash'"):
        await shell(store.items())
    assert await shell(store.clear()) == 1


async def test_incr_of_a_non_integer_is_a_backend_error_and_changes_nothing(
        shell: Shell) -> None:
    """incr() over a float, or past 64 bits: BackendError saying which; value unchanged."""
    store = shell.coordinator.state("s")
    await shell(store.set("f", 1.5))
    with pytest.raises(flexisync.BackendError, match="not an integer"):
        await shell(store.incr("f"))
    assert await shell(store.get("f")) == 1.5
    await shell(store.set("big", 2**63 - 1))
    with pytest.raises(flexisync.BackendError, match="64-bit"):
        await shell(store.incr("big"))
    assert await shell(store.get("big")) == 2**63 - 1


async def test_bad_input_raises_before_anything_is_written(shell: Shell) -> None:
    """Bad keys, ttl, amounts, fn and unserializable values: ConfigError/TypeError, and
    the store is untouched."""
    store = shell.coordinator.state("s")
    with pytest.raises(flexisync.ConfigError):
        await shell(store.set("bad key!", 1))
    with pytest.raises(flexisync.ConfigError):
        await shell(store.get(""))
    with pytest.raises(flexisync.ConfigError):
        await shell(store.set("k", 1, ttl=0))
    with pytest.raises(flexisync.ConfigError):
        await shell(store.add("k", 1, ttl=-1))
    with pytest.raises(TypeError):
        await shell(store.set("k", object()))
    with pytest.raises(TypeError):
        await shell(store.update("k", lambda _: {1, 2}))
    with pytest.raises(flexisync.ConfigError, match="callable"):
        await shell(store.update("k", 5))  # type: ignore[arg-type]
    with pytest.raises(flexisync.ConfigError, match="int"):
        await shell(store.incr("k", 1.5))  # type: ignore[arg-type]
    with pytest.raises(flexisync.ConfigError, match="int"):
        await shell(store.incr("k", True))
    with pytest.raises(flexisync.ConfigError, match="64 bits"):
        await shell(store.incr("k", 2**63))
    with pytest.raises(flexisync.ConfigError):
        shell.coordinator.state("bad scope!")
    assert await shell(store.keys()) == []
