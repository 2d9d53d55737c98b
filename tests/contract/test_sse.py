"""Contract: Server-Sent Events frames of a stream (``flexisync.sse`` and
``flexisync.aio.sse``), in every shell."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

import flexisync
import flexisync.aio.sse
import flexisync.sse
from flexisync._core.followers import reader_of
from tests.contract.conftest import Shell
from tests.contract.test_streams import write_when_followed
from tests.integration.test_sse import parse_frames


def event_stream(shell: Shell, stream: Any, *args: Any, **kwargs: Any) -> Any:
    """The shell's ``event_stream``."""
    module = flexisync.aio.sse if shell.is_async else flexisync.sse
    return module.event_stream(stream, *args, **kwargs)


async def all_frames(shell: Shell, frames: Any) -> list[str]:
    if shell.is_async:
        return [frame async for frame in frames]
    return list(frames)


def is_done(event: flexisync.Event) -> bool:
    return event.type == "done"


async def test_frames_carry_id_type_and_json_data_then_live(shell: Shell) -> None:
    stream = shell.coordinator.stream("frames")
    first = await shell(stream.append({"line": "hello\nworld"}, type="stdout"))
    writer = write_when_followed(shell, "frames", ["live"])
    frames = await all_frames(shell, event_stream(shell, stream, until=is_done))
    writer.join(10)
    assert frames[0] == f'id: {first}\nevent: stdout\ndata: {{"line":"hello\\nworld"}}\n\n'
    parsed = parse_frames("".join(frames))
    assert [(f["event"], f["data"]) for f in parsed] == [
        ("stdout", '{"line":"hello\\nworld"}'), ("message", '"live"'), ("done", "null")]
    assert reader_of(shell.coordinator._ctx).followers() == {}


async def test_resume_after_last_event_id_and_unknown_id_starts_over(shell: Shell) -> None:
    stream = shell.coordinator.stream("resume")
    ids = [await shell(stream.append(i)) for i in range(3)]
    await shell(stream.append(None, type="done"))
    resumed = parse_frames("".join(await all_frames(
        shell, event_stream(shell, stream, ids[0], until=is_done))))
    assert [f["data"] for f in resumed] == ["1", "2", "null"]
    beyond = f"{int(ids[-1].split('-')[0]) + 10**9}-0"
    frames = parse_frames("".join(await all_frames(
        shell, event_stream(shell, stream, beyond, until=is_done))))
    assert "unknown" in frames[0]["comment"]
    assert [f["data"] for f in frames[1:]] == ["0", "1", "2", "null"]


async def test_heartbeat_comment_when_idle(shell: Shell) -> None:
    stream = shell.coordinator.stream("idle")
    last = await shell(stream.append("x"))
    source = event_stream(shell, stream, last, heartbeat=0.05)
    frames = await shell.take(source, 2)
    assert frames == [flexisync.sse.HEARTBEAT, flexisync.sse.HEARTBEAT]
    assert reader_of(shell.coordinator._ctx).followers() == {"idle": 1}
    await shell.close(source)
    assert reader_of(shell.coordinator._ctx).followers() == {}


async def test_bad_arguments_are_refused_at_the_call(shell: Shell) -> None:
    stream = shell.coordinator.stream("args")
    for kwargs in ({"last_event_id": "nope"}, {"heartbeat": 0}, {"until": 5},
                   {"stop": "soon"}):
        with pytest.raises(flexisync.ConfigError):
            event_stream(shell, stream, **kwargs)


async def test_a_foreign_entry_is_passed_over_with_an_id_only_frame(shell: Shell) -> None:
    stream = shell.coordinator.stream("foreign")
    ctx = shell.coordinator._ctx
    bad = ctx.backend.client.xadd(ctx.keys.key("stream", "foreign"),
                                  {"type": "message", "data": "{not json"}).decode()
    await shell(stream.append(None, type="done"))
    frames = await all_frames(shell, event_stream(shell, stream, until=is_done))
    assert frames[0].startswith(f"id: {bad}\n: skipped")
    assert parse_frames(frames[1])[0]["event"] == "done"


async def test_setting_stop_ends_the_frames(shell: Shell) -> None:
    stream = shell.coordinator.stream("stop")
    await shell(stream.append("x"))
    stop: Any = asyncio.Event() if shell.is_async else threading.Event()
    frames = event_stream(shell, stream, heartbeat=30, stop=stop)
    first = await shell.take(frames, 1)
    assert parse_frames(first[0])[0]["data"] == '"x"'
    stop.set()
    assert await all_frames(shell, frames) == []
    assert reader_of(shell.coordinator._ctx).followers() == {}
