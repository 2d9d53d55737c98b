"""Contract: durable streams (``coordinator.stream``), in every shell.

Live appends come from a writer thread using the blocking shell on the same Context,
so the same test body follows in a thread-blocking loop (sync shells) and with
``async for`` (asyncio shells).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest

import flexisync
from flexisync._core.followers import reader_of
from flexisync.streams import Stream
from tests.contract.conftest import Shell
from tests.helpers import wait_until


def ids_of(events: list[flexisync.Event]) -> list[str]:
    return [e.id for e in events]


def writer_stream(shell: Shell, name: str) -> Stream:
    """The same stream through the blocking shell (usable from a writer thread)."""
    return Stream(shell.coordinator._ctx, name, maxlen=None)


def write_when_followed(shell: Shell, name: str, datas: list[Any],
                        then: Callable[[], None] | None = None) -> threading.Thread:
    """A thread that appends ``datas`` (and a final ``done``) once a follower of ``name``
    has registered with this process's reader."""
    stream = writer_stream(shell, name)
    reader = reader_of(shell.coordinator._ctx)

    def run() -> None:
        wait_until(lambda: reader.followers().get(name, 0) >= 1, timeout=10,
                   message="a follower registered")
        for data in datas:
            stream.append(data)
        stream.append(None, type="done")
        if then is not None:
            then()

    thread = threading.Thread(target=run, name="test-writer", daemon=True)
    thread.start()
    return thread


async def follow_all(shell: Shell, follower: Any) -> list[Any]:
    """Every item of a (sync or async) follow() until it ends."""
    items: list[Any] = []
    await collect(shell, follower, items)
    return items


async def collect(shell: Shell, follower: Any, into: list[Any]) -> None:
    """Append every item of a (sync or async) follow() to ``into``, until it ends."""
    if shell.is_async:
        async for item in follower:
            into.append(item)
    else:
        into.extend(follower)


# --- append and read -----------------------------------------------------------------------


async def test_append_read_last_id_and_length(shell: Shell) -> None:
    stream = shell.coordinator.stream("log")
    assert await shell(stream.last_id()) is None
    assert await shell(stream.length()) == 0
    ids = [await shell(stream.append({"line": i}, type="stdout")) for i in range(4)]
    assert ids == sorted(ids, key=lambda s: tuple(map(int, s.split("-"))))
    events = await shell(stream.read_after())
    assert ids_of(events) == ids
    assert (events[0].topic, events[0].type, events[0].data) == ("log", "stdout", {"line": 0})
    assert ids_of(await shell(stream.read_after(ids[1]))) == ids[2:]
    assert ids_of(await shell(stream.read_after(ids[0], count=2))) == ids[1:3]
    assert await shell(stream.read_after(ids[-1])) == []
    assert await shell(stream.last_id()) == ids[-1]
    assert await shell(stream.length()) == 4
    if not shell.is_async:
        assert len(stream) == 4
    assert await shell(stream.delete()) is True
    assert await shell(stream.delete()) is False
    assert await shell(stream.read_after()) == []


async def test_trimmed_and_unknown_resume_points_raise(shell: Shell) -> None:
    stream = shell.coordinator.stream("bounded", maxlen=10)
    ids = [await shell(stream.append(i)) for i in range(300)]
    assert 10 <= await shell(stream.length()) < 300
    with pytest.raises(flexisync.EventsTrimmed) as info:
        await shell(stream.read_after(ids[0]))
    assert info.value.after == ids[0]
    assert info.value.oldest == (await shell(stream.read_after()))[0].id
    with pytest.raises(flexisync.EventsTrimmed):
        await shell.take(stream.follow(ids[0], timeout=5), 1)
    beyond = f"{int(ids[-1].split('-')[0]) + 10**9}-0"
    with pytest.raises(flexisync.UnknownResumePoint):
        await shell(stream.read_after(beyond))
    with pytest.raises(flexisync.UnknownResumePoint):
        await shell.take(stream.follow(beyond, timeout=5), 1)


@pytest.mark.parametrize("bad", ["abc", "1-", "1-2-3", "", 17])
async def test_malformed_ids_and_arguments_raise_config_error_before_io(
        shell: Shell, bad: Any) -> None:
    stream = shell.coordinator.stream("bad")
    with pytest.raises(flexisync.ConfigError):
        await shell(stream.read_after(bad))
    with pytest.raises(flexisync.ConfigError):
        stream.follow(bad)  # raised at the call, before iteration
    with pytest.raises(flexisync.ConfigError):
        stream.follow(timeout=-1)
    with pytest.raises(flexisync.ConfigError):
        stream.follow(until=3)  # type: ignore[arg-type]
    with pytest.raises(flexisync.ConfigError):
        shell.coordinator.stream("bad", maxlen=0)
    with pytest.raises(TypeError):
        await shell(stream.append(object()))
    assert await shell(stream.length()) == 0


# --- follow ---------------------------------------------------------------------------------


async def test_follow_replays_then_yields_live_events_until(shell: Shell) -> None:
    stream = shell.coordinator.stream("live")
    first = await shell(stream.append(0))
    await shell(stream.append(1))
    writer = write_when_followed(shell, "live", [2, 3, 4])
    events = await follow_all(shell, stream.follow(timeout=30,
                                                   until=lambda e: e.type == "done"))
    writer.join(10)
    assert [e.data for e in events] == [0, 1, 2, 3, 4, None]
    assert events[-1].type == "done"
    resumed = await follow_all(shell, stream.follow(first, timeout=0.05))
    assert [e.data for e in resumed] == [1, 2, 3, 4, None]
    assert reader_of(shell.coordinator._ctx).followers() == {}


async def test_follow_ends_after_timeout_without_events(shell: Shell) -> None:
    stream = shell.coordinator.stream("quiet")
    last = await shell(stream.append("x"))
    assert await follow_all(shell, stream.follow(last, timeout=0.2)) == []
    assert reader_of(shell.coordinator._ctx).followers() == {}


async def test_replay_then_live_is_exactly_once_under_concurrent_appends(
        shell: Shell) -> None:
    """Appends race the follower's registration and replay: each event arrives once,
    in order, with no gap."""
    stream = shell.coordinator.stream("race")
    writer = writer_stream(shell, "race")
    started = threading.Event()

    def run() -> None:
        for i in range(300):
            writer.append(i)
            if i == 20:
                started.set()
        writer.append(None, type="done")

    thread = threading.Thread(target=run, name="test-writer", daemon=True)
    thread.start()
    assert started.wait(10)
    events = await follow_all(shell, stream.follow(timeout=30,
                                                   until=lambda e: e.type == "done"))
    thread.join(10)
    assert [e.data for e in events] == [*range(300), None]
    assert ids_of(events) == ids_of(await shell(stream.read_after()))


async def test_two_followers_of_one_stream_share_one_reader_registration(
        shell: Shell) -> None:
    stream = shell.coordinator.stream("shared")
    first = shell.coordinator.stream("shared").follow(timeout=30)
    second = stream.follow(timeout=30)
    writer = write_when_followed(shell, "shared", ["a", "b"])
    got_first = await shell.take(first, 3)
    got_second = await shell.take(second, 3)
    writer.join(10)
    assert [e.data for e in got_first] == [e.data for e in got_second] == ["a", "b", None]
    listener = shell.coordinator._ctx.listener
    await shell.close(first)
    await shell.close(second)
    assert reader_of(shell.coordinator._ctx).followers() == {}
    wait_until(lambda: listener.table_sizes()["handlers"] == 0,
               message="wake-up channel unsubscribed")


async def test_a_foreign_entry_raises_decode_error_after_the_events_before_it(
        shell: Shell) -> None:
    stream = shell.coordinator.stream("foreign")
    good = await shell(stream.append("ok"))
    ctx = shell.coordinator._ctx
    key = ctx.keys.key("stream", "foreign")
    bad = ctx.backend.client.xadd(key, {"type": "message", "data": "{not json"})
    seen: list[Any] = []
    with pytest.raises(flexisync.DecodeError) as info:
        await collect(shell, stream.follow(timeout=5), seen)
    assert [e.id for e in seen] == [good]
    assert info.value.key == f"foreign#{bad.decode()}"
