"""The sharded listener's reply bookkeeping, driven with scripted replies (no server).

Covers the races a live cluster produces only rarely: Redis's own ``sunsubscribe`` (the
slot moved) crossing our SUNSUBSCRIBE, the late ``MOVED`` that follows it, and a
``MOVED`` answering an SSUBSCRIBE sent with a stale slot map.
"""

from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Any

import pytest
import redis.exceptions as rexc
from redis.crc import key_slot

from flexisync._cluster_listener import ClusterListener, _Link
from flexisync._connection import RetryPolicy

A, B = "10.0.0.1:7000", "10.0.0.2:7001"


class FakeConn:
    """Records what the listener sends; never touches a socket."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, ...]] = []

    def pack_commands(self, args: list[tuple[str, ...]]) -> list[tuple[str, ...]]:
        return args

    def send_packed_command(self, packed: list[tuple[str, ...]], check_health: bool = True,
                            ) -> None:
        assert check_health is False
        self.sent.extend(packed)

    def disconnect(self) -> None:
        pass


def _backend() -> Any:
    node_a = SimpleNamespace(name=A)
    manager = SimpleNamespace(slots_cache={s: [node_a] for s in range(16384)},
                              nodes_cache={A: node_a})
    return SimpleNamespace(address="cluster", retry=RetryPolicy(deadline=0.5),
                           pid=os.getpid(), client=SimpleNamespace(nodes_manager=manager),
                           check_fork=lambda: None)


@pytest.fixture
def listener(monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setattr(_Link, "_ensure_thread", lambda _self: None)  # no threads, no I/O
    found = ClusterListener(_backend())
    found._fetch_map = lambda **_kw: None  # type: ignore[method-assign]  # no server here
    yield found
    found.close()


def _connect(link: _Link) -> FakeConn:
    conn = FakeConn()
    with link._cond:
        link._conn = conn
        link._reset_connection_state()
        link._send_subscribe(conn, list(link._handlers))
    return conn


def _moved(channel: str, node: str) -> rexc.MovedError:
    return rexc.MovedError(f"{key_slot(channel.encode())} {node}")


def test_unsolicited_sunsubscribe_is_a_move_not_an_answer(listener: Any) -> None:
    got: list[bytes] = []
    channel = "ns:lock:{a}"
    with listener._cond:
        listener._handlers[("channel", channel)] = [lambda _c, d, _p: got.append(d)]
        listener._place(("channel", channel))
    link = listener._links[A]
    conn = _connect(link)
    assert conn.sent == [("SSUBSCRIBE", channel)]
    link._dispatch([b"ssubscribe", channel.encode(), 1])
    assert listener._is_confirmed(("channel", channel))
    link._dispatch([b"smessage", channel.encode(), b"hi"])
    assert got == [b"hi"]
    hooks: list[int] = []
    listener.add_reconnect_hook(lambda: hooks.append(1))
    # The slot moved to B: Redis drops the channel on its own (no command pending).
    listener._slots[key_slot(channel.encode())] = B
    link._dispatch([b"sunsubscribe", channel.encode(), 0])
    assert listener._route[("channel", channel)] is listener._links[B]
    assert link._answered == link._sent  # the FIFO was not touched
    conn_b = _connect(listener._links[B])
    assert conn_b.sent == [("SSUBSCRIBE", channel)]
    assert not hooks
    listener._links[B]._dispatch([b"ssubscribe", channel.encode(), 1])
    assert hooks == [1]  # hooks run once every key is confirmed again
    assert listener.reconnects == 1


def test_sunsubscribe_crossing_ours_then_late_moved(listener: Any) -> None:
    x, y = ("channel", "ns:lock:{x}"), ("channel", "ns:breaker:{y}")
    def handler(_c: str, _d: bytes, _p: str | None) -> None:
        pass

    with listener._cond:
        for key in (x, y):
            listener._handlers[key] = [handler]
            listener._place(key)
    link = listener._links[A]
    _connect(link)
    link._dispatch([b"ssubscribe", b"ns:lock:{x}", 1])
    link._dispatch([b"ssubscribe", b"ns:breaker:{y}", 2])
    with listener._cond:
        found = listener._remove_locked(x, handler)  # sends SUNSUBSCRIBE x
    assert found is not None
    # Redis had dropped x on its own (slot moved) before reading our SUNSUBSCRIBE: its
    # sunsubscribe settles ours, and the MOVED answering ours later is dropped.
    link._dispatch([b"sunsubscribe", b"ns:lock:{x}", 1])
    assert link._answered == link._sent
    link._dispatch(_moved("ns:lock:{x}", B))
    assert link._answered == link._sent
    assert listener._is_confirmed(y)
    assert listener.table_sizes()["refused"] == 0


def test_moved_answer_to_ssubscribe_follows_the_redirect(listener: Any) -> None:
    key = ("channel", "ns:lock:{m}")
    link_a = listener._links.setdefault(A, _Link(listener, A, sharded=True))
    _connect(link_a)
    with listener._cond:
        listener._handlers[key] = [lambda _c, _d, _p: None]
        listener._place(key)  # the map (stale) says A
    link_a._dispatch(_moved(key[1], B))
    assert listener._route[key] is listener._links[B]  # MOVED named B; the map still A
    assert listener._refusal(key) is None
    assert not listener._is_settled(key)
    conn_b = _connect(listener._links[B])
    listener._links[B]._dispatch([b"ssubscribe", key[1].encode(), 1])
    assert conn_b.sent == [("SSUBSCRIBE", key[1])]
    assert listener._is_confirmed(key)
