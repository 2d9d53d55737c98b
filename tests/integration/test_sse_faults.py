"""SSE through network faults: frames (heartbeats included) go on while Redis is
unreachable, and the events appended meanwhile follow once it answers, exactly once."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

import flexisync
from flexisync.embedded import EmbeddedRedis
from flexisync.sse import HEARTBEAT, event_stream
from tests.faults import FaultProxy
from tests.helpers import wait_until
from tests.integration.test_sse import parse_frames
from tests.integration.test_streams_faults import take_down

pytestmark = pytest.mark.slow


@pytest.fixture
def reader(proxy: FaultProxy, namespace: str) -> Iterator[flexisync.Coordinator]:
    """A Coordinator through the fault proxy, with a 0.5 s retry budget."""
    with flexisync.connect(proxy.url(), namespace=namespace,
                           retry=flexisync.RetryPolicy(deadline=0.5)) as sync:
        yield sync


@pytest.fixture
def writer(own_server: EmbeddedRedis, namespace: str) -> Iterator[flexisync.Coordinator]:
    """A Coordinator on the same server, around the proxy."""
    with flexisync.connect(own_server.url, namespace=namespace) as sync:
        yield sync


def test_sse_keeps_the_connection_alive_through_an_outage_and_resumes_without_gap(
        reader: flexisync.Coordinator, writer: flexisync.Coordinator,
        proxy: FaultProxy) -> None:
    """Redis unreachable for several retry budgets: the generator keeps yielding
    heartbeats (so the browser stays connected), then delivers the events appended
    during and after the outage, each once, in order."""
    out = writer.stream("web", maxlen=None)
    ids = [out.append(0)]
    frames: list[str] = []
    errors: list[BaseException] = []
    generator = event_stream(reader.stream("web", maxlen=None), heartbeat=0.2,
                             until=lambda e: e.type == "done")

    def consume() -> None:
        try:
            frames.extend(generator)
        except BaseException as exc:  # the test asserts on it
            errors.append(exc)

    thread = threading.Thread(target=consume, name="test-sse-consumer", daemon=True)
    thread.start()
    wait_until(lambda: any(f.startswith("id: ") for f in frames), timeout=10,
               message="the first event frame")
    take_down(proxy)
    before = frames.count(HEARTBEAT)
    ids += [out.append(i) for i in (1, 2)]
    # Alive through the outage: heartbeats keep coming while every call fails.
    wait_until(lambda: frames.count(HEARTBEAT) >= before + 3 or errors, timeout=15,
               message="heartbeats during the outage")
    assert errors == [], f"the frames ended with {errors!r}"
    proxy.resume()
    ids += [out.append(3), out.append(None, type="done")]
    thread.join(15)
    assert not thread.is_alive(), "the frames did not end on done"
    assert errors == []
    assert [f["id"] for f in parse_frames("".join(frames)) if "id" in f] == ids
