"""Streams across real processes: late readers replay and follow a live writer."""

from __future__ import annotations

from typing import Any

import flexisync
from tests.helpers import join_all
from tests.workers_events import stream_follower, stream_writer

N = 400


def test_late_readers_see_every_event_once_in_order_while_the_writer_appends(
        mp: Any, sync: flexisync.Coordinator, flexisync_url: str, namespace: str) -> None:
    """Readers that join mid-stream (from the start, and from a middle id) replay, then
    follow live: each sees every event after its resume point exactly once, in order."""
    started, resume, following, out = mp.Event(), mp.Event(), mp.Queue(), mp.Queue()
    writer = mp.Process(target=stream_writer, args=(flexisync_url, namespace),
                        kwargs={"name": "job", "n": N, "started": started, "resume": resume})
    writer.start()
    assert started.wait(60), "writer did not start"
    stream = sync.stream("job", maxlen=None)
    middle = stream.read_after(count=20)[-1]  # the event with i == 19
    assert middle.data == {"i": 19}
    readers = [mp.Process(target=stream_follower, args=(flexisync_url, namespace),
                          kwargs={"name": "job", "after": after, "following": following,
                                  "out": out})
               for after in (None, middle.id)]
    for reader in readers:
        reader.start()
    for _ in readers:  # both are reading before the writer appends the rest
        following.get(timeout=60)
    resume.set()
    results = dict(out.get(timeout=60) for _ in readers)
    join_all([writer, *readers], timeout=60)
    assert results[None] == [*range(N), "done"]
    assert results[middle.id] == [*range(20, N), "done"]
