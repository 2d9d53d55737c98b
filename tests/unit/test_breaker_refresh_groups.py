"""How the batch refresh of breaker mirrors splits its keys into ``breaker_versions``
calls, and how it reads their replies (pure logic, no server)."""

from __future__ import annotations

from typing import Any

import pytest
from redis.crc import key_slot

from flexisync.breaker._hub import MalformedRecord, decode_versions, refresh_groups


def _keys(n: int) -> list[str]:
    return [f"ns:breaker:{{b{i}}}" for i in range(n)]


def test_single_node_batches_are_chunks_in_order() -> None:
    """Off a Cluster, 1,201 keys go in three calls of at most 500, in order."""
    groups = refresh_groups(_keys(1201), cluster=False)
    assert [len(g) for g in groups] == [500, 500, 201]
    assert [i for g in groups for i in g] == list(range(1201))
    assert refresh_groups([], cluster=False) == []


def test_cluster_batches_hold_one_slot_each_and_cover_every_key() -> None:
    """On a Cluster each call holds the keys of one slot (keys sharing a slot share a
    call, chunked at 500), and every key is in exactly one call."""
    keys = _keys(300) + [f"ns:breaker:{{same}}:{i}" for i in range(600)]
    groups = refresh_groups(keys, cluster=True)
    assert sorted(i for g in groups for i in g) == list(range(len(keys)))
    for group in groups:
        assert len({key_slot(keys[i].encode()) for i in group}) == 1
        assert len(group) <= 500
    slots = {key_slot(k.encode()) for k in keys}
    assert len(groups) == len(slots) + 1  # the 600 keys of one slot take two calls


def test_versions_reply_is_decoded_per_key() -> None:
    """Pairs become (epoch, version); version -1 (foreign data) becomes None: that
    mirror reads its record in full."""
    reply: list[Any] = [b"1700.1", 4, b"", 0, b"", -1, "1700.2.r", 9]
    assert decode_versions(reply, 4) == [("1700.1", 4), ("", 0), None, ("1700.2.r", 9)]


@pytest.mark.parametrize("reply", [
    None, [b"e"], [b"e", 1, 0], [b"e", b"x"], [b"e", 10**14], [b"e", True],
    [b"bad epoch", 1], [b"e" * 65, 1], [b"\xff", 1],
])
def test_a_reply_the_script_never_writes_is_rejected(reply: Any) -> None:
    """Wrong length or unreadable items raise MalformedRecord (the hub then reads each
    mirror of that call in full), never IndexError/ValueError."""
    with pytest.raises(MalformedRecord):
        decode_versions(reply, 1)
