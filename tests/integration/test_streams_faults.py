"""Stream.follow() through network faults: it rides out outages shorter than its own
timeout and resumes right after the last event it yielded, with no duplicate and no gap.

The follower talks to a private redis-server through a :class:`~tests.faults.FaultProxy`
with a short retry budget (0.5 s); the writer talks to the server directly, so it keeps
appending while the follower's network is down or hung.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

import flexisync
from flexisync.embedded import EmbeddedRedis
from tests.faults import FaultProxy
from tests.helpers import wait_until

pytestmark = pytest.mark.slow

#: How long an outage lasts: well past the follower's 0.5 s retry budget, so that only
#: follow()'s own retrying can carry it through. The outage's length is what is tested.
OUTAGE = 1.5


@pytest.fixture
def policy() -> flexisync.RetryPolicy:
    return flexisync.RetryPolicy(deadline=0.5)


@pytest.fixture
def reader(proxy: FaultProxy, namespace: str, policy: flexisync.RetryPolicy,
           ) -> Iterator[flexisync.Coordinator]:
    """A Coordinator whose every connection goes through the fault proxy."""
    with flexisync.connect(proxy.url(), namespace=namespace, retry=policy) as sync:
        yield sync


@pytest.fixture
def writer(own_server: EmbeddedRedis, namespace: str) -> Iterator[flexisync.Coordinator]:
    """A Coordinator on the same server, around the proxy."""
    with flexisync.connect(own_server.url, namespace=namespace) as sync:
        yield sync


def take_down(proxy: FaultProxy) -> None:
    """Refuse new connections and cut the open ones: Redis is unreachable.

    A connection the proxy was accepting at the moment refuse() landed may still get
    through, so cut only once a probe connection is seen refused.
    """
    proxy.refuse(True)

    def probe_refused() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", proxy.port), timeout=2) as probe:
                probe.settimeout(0.5)
                return probe.recv(1) == b""  # closed at once: refused
        except TimeoutError:
            return False  # forwarded to Redis, which says nothing first
        except OSError:
            return True  # reset: refused

    wait_until(probe_refused, timeout=5, message="the proxy refuses connections")
    proxy.cut()


class Followed:
    """What a follower thread saw: the event data, the error it ended with, and when."""

    def __init__(self) -> None:
        self.first = threading.Event()
        self.seen: list[Any] = []
        self.errors: list[BaseException] = []
        self.times: list[float] = []


def _follow_in_thread(stream: flexisync.Stream, timeout: float,
                      followed: Followed) -> threading.Thread:
    first, seen, errors, times = (followed.first, followed.seen, followed.errors,
                                  followed.times)

    def run() -> None:
        try:
            for event in stream.follow(timeout=timeout, until=lambda e: e.type == "done"):
                seen.append(event.data)
                times.append(time.monotonic())
                first.set()
        except BaseException as exc:  # the test asserts on it
            times.append(time.monotonic())
            errors.append(exc)

    thread = threading.Thread(target=run, name="test-follower", daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("fault", ["stall", "down"])
def test_follow_rides_out_an_outage_and_resumes_exactly_after_the_last_event(
        reader: flexisync.Coordinator, writer: flexisync.Coordinator, proxy: FaultProxy,
        fault: str) -> None:
    """A hung server (stall) or a dead one (connections cut and refused) for longer than
    the retry budget does not end follow(): events appended before, during and after the
    outage each arrive exactly once, in order."""
    out = writer.stream("out", maxlen=None)
    out.append(0)
    followed = Followed()
    thread = _follow_in_thread(reader.stream("out", maxlen=None), 15.0, followed)
    assert followed.first.wait(10), "the follower got the first event"
    if fault == "stall":
        proxy.stall()
    else:
        take_down(proxy)
    for i in (1, 2, 3):
        out.append(i)
    time.sleep(OUTAGE)
    proxy.resume()
    for i in (4, 5):
        out.append(i)
    out.append(None, type="done")
    thread.join(15)
    assert not thread.is_alive(), "follow() did not finish"
    assert followed.errors == [], f"follow() ended with {followed.errors!r}"
    assert followed.seen == [0, 1, 2, 3, 4, 5, None]


def test_follow_raises_backend_unavailable_once_its_own_timeout_passes_in_an_outage(
        reader: flexisync.Coordinator, writer: flexisync.Coordinator,
        proxy: FaultProxy) -> None:
    """An outage longer than follow()'s timeout: it keeps retrying past the retry budget
    (0.5 s) until its own timeout (2 s) has passed without an event, then raises
    BackendUnavailable, within the timeout plus about a second."""
    writer.stream("gone", maxlen=None).append("only")
    followed = Followed()
    thread = _follow_in_thread(reader.stream("gone", maxlen=None), 2.0, followed)
    assert followed.first.wait(10), "the follower got the first event"
    take_down(proxy)
    thread.join(15)
    assert not thread.is_alive()
    assert followed.seen == ["only"]
    assert len(followed.errors) == 1, followed.errors
    assert isinstance(followed.errors[0], flexisync.BackendUnavailable), followed.errors
    took = followed.times[-1] - followed.times[0]
    assert took >= 1.9, f"gave up after {took:.2f}s, before its 2 s timeout"
    assert took <= 2.0 + 1.5, f"raised {took:.2f}s after the last event (timeout 2 s)"
