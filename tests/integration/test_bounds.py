"""Deadlines are wall-clock bounds: every call ends within its budget, whatever the network.

These tests put a :class:`~tests.faults.FaultProxy` between flexisync and a private
redis-server and make the network hang, refuse or cut, then check that each call
returns or raises within its documented bound, that retries ride out outages shorter
than the deadline, and that a call which must not run twice never does.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

import flexisync
from tests.faults import FaultProxy
from tests.helpers import wait_until

pytestmark = pytest.mark.slow

#: What a bound may overshoot by: one scheduling hiccup on a loaded 2-core CI machine.
SLACK = 1.0


@pytest.fixture
def fast_policy() -> flexisync.RetryPolicy:
    """A 1-second budget, so that a stall test costs about a second."""
    return flexisync.RetryPolicy(deadline=1.0)


@pytest.fixture
def through_proxy(proxy: FaultProxy, fast_policy: flexisync.RetryPolicy
                  ) -> Iterator[flexisync.Coordinator]:
    """A Coordinator whose every connection goes through the fault proxy."""
    with flexisync.connect(proxy.url(), namespace="bounds", retry=fast_policy) as sync:
        yield sync


def _timed(fn: object) -> tuple[BaseException | None, float]:
    start = time.monotonic()
    try:
        fn()  # type: ignore[operator]
    except BaseException as exc:  # the test inspects whatever was raised
        return exc, time.monotonic() - start
    return None, time.monotonic() - start


def test_deadline_bounds_a_call_to_a_hung_server(
        through_proxy: flexisync.Coordinator, proxy: FaultProxy) -> None:
    """A hung server (open socket, no reply) costs the deadline, not the 5 s socket timeout
    per attempt, and the error reports the real attempts and elapsed time."""
    store = through_proxy.state("s")
    store.set("k", 1)  # the connection is established before the stall
    proxy.stall()
    error, took = _timed(lambda: store.get("k"))
    assert isinstance(error, flexisync.BackendUnavailable), error
    assert took < 1.0 + SLACK, f"state.get took {took:.2f}s against a 1.0s deadline"
    assert error.elapsed >= 0.8, f"error says {error.elapsed:.3f}s after {took:.2f}s"
    assert error.elapsed <= took + 0.01
    assert error.attempts >= 1
    assert f"{error.attempts} attempt(s)" in str(error)


def test_a_callers_sooner_deadline_bounds_a_call_on_an_open_connection(
        proxy: FaultProxy) -> None:
    """A deadline passed to a call (as acquire(timeout=) does) that is sooner than the
    policy's caps the socket wait of an already open connection, not only a new one."""
    with flexisync.connect(proxy.url(), namespace="bounds",
                           retry=flexisync.RetryPolicy(deadline=6.0)) as sync:
        backend = sync._ctx.backend
        backend.call("get", lambda c: c.get("k"))  # open and cap the connection at ~6 s
        proxy.stall()
        error, took = _timed(lambda: backend.call(
            "get", lambda c: c.get("k"), deadline=time.monotonic() + 0.5))
    assert isinstance(error, flexisync.BackendUnavailable), error
    assert took < 0.5 + SLACK, f"a 0.5 s deadline took {took:.2f}s"


def test_deadline_bounds_a_call_when_connecting_hangs(
        proxy: FaultProxy, fast_policy: flexisync.RetryPolicy) -> None:
    """A first call whose connection handshake hangs is bounded by the deadline too."""
    proxy.stall()
    with flexisync.connect(proxy.url(), namespace="bounds", retry=fast_policy) as sync:
        error, took = _timed(sync.ping)
    assert isinstance(error, flexisync.BackendUnavailable), error
    assert took < 1.0 + SLACK, f"ping took {took:.2f}s against a 1.0s deadline"


def test_retries_spread_over_the_deadline_ride_out_a_short_outage(proxy: FaultProxy) -> None:
    """With the default policy (3 s), a 1 s outage delays a call instead of failing it:
    retries keep going until the deadline instead of giving up after 0.2 s."""
    with flexisync.connect(proxy.url(), namespace="bounds") as sync:
        store = sync.state("s")
        store.set("k", 1)
        proxy.refuse(True)
        proxy.cut()
        # The outage's length is what is under test, so a timer ends it.
        ender = threading.Timer(1.0, proxy.refuse, args=(False,))
        ender.start()
        try:
            store.set("k", 2)
        finally:
            ender.join()
        assert store.get("k") == 2


def test_an_outage_longer_than_the_deadline_fails_after_many_attempts(
        through_proxy: flexisync.Coordinator, proxy: FaultProxy) -> None:
    """A refused connection is retried with backoff for the whole deadline, then fails."""
    proxy.refuse(True)
    proxy.cut()
    error, took = _timed(through_proxy.ping)
    assert isinstance(error, flexisync.BackendUnavailable), error
    assert 0.7 < took < 1.0 + SLACK, f"gave up after {took:.2f}s of a 1.0s deadline"
    assert error.attempts >= 4, f"only {error.attempts} attempts in {took:.2f}s"


def test_a_call_that_must_not_run_twice_is_not_retried_once_sent(
        through_proxy: flexisync.Coordinator, proxy: FaultProxy) -> None:
    """An INCR whose reply never came is not sent again: it may have been applied."""
    store = through_proxy.state("s")
    store.set("n", 0)
    proxy.stall()
    error, took = _timed(lambda: store.incr("n"))
    assert isinstance(error, flexisync.BackendUnavailable), error
    assert error.attempts == 1
    assert took < 1.0 + SLACK
    proxy.resume()
    # The held INCR may reach the server once the proxy forwards again; never twice.
    wait_until(lambda: proxy.connections == 0, message="the timed-out socket to close")
    assert store.get("n") in (0, 1)


def test_a_callers_client_keeps_the_same_rules(
        proxy: FaultProxy, fast_policy: flexisync.RetryPolicy) -> None:
    """connect(client=...) with redis-py's own retries and a 5 s socket timeout: a stalled
    INCR is bounded by flexisync's deadline and is never applied twice."""
    theirs = redis.Redis(port=proxy.port, socket_timeout=5.0,
                         retry=Retry(ExponentialBackoff(), 3))
    try:
        with flexisync.connect(client=theirs, namespace="bounds", retry=fast_policy) as sync:
            store = sync.state("c")
            store.set("n", 0)
            proxy.stall()
            error, took = _timed(lambda: store.incr("n"))
            assert isinstance(error, flexisync.BackendUnavailable), error
            assert took < 1.0 + SLACK, f"incr took {took:.2f}s against a 1.0s deadline"
            proxy.resume()
            wait_until(lambda: proxy.connections == 0, message="the timed-out socket to close")
            assert store.get("n") in (0, 1), "a stalled INCR was applied twice"
        # The caller's client is neither closed nor changed.
        proxy.resume()
        assert theirs.ping()
    finally:
        theirs.close()


def test_calls_recover_after_the_network_heals(
        through_proxy: flexisync.Coordinator, proxy: FaultProxy) -> None:
    """After a cut the next call reconnects; nothing stays broken."""
    store = through_proxy.state("s")
    store.set("k", "before")
    proxy.cut()
    assert store.get("k") == "before"
    proxy.stall()
    with pytest.raises(flexisync.BackendUnavailable):
        store.get("k")
    proxy.resume()
    assert store.get("k") == "before"


# --- every public call, one by one, against a hung server ------------------------------

#: name -> (setup, call, bound in seconds on top of the 1 s policy deadline). ``setup``
#: runs before the stall (so a held lock, a subscription, a stream exist); ``call``
#: receives the Coordinator and whatever setup returned.
_CALLS: dict[str, tuple[object, object, float]] = {
    "ping": (None, lambda s, _: s.ping(), 0.0),
    "state.get": (None, lambda s, _: s.state("b").get("k"), 0.0),
    "state.set": (None, lambda s, _: s.state("b").set("k", 1), 0.0),
    "state.add": (None, lambda s, _: s.state("b").add("k", 1), 0.0),
    "state.delete": (None, lambda s, _: s.state("b").delete("k"), 0.0),
    "state.ttl": (None, lambda s, _: s.state("b").ttl("k"), 0.0),
    "state.update": (None, lambda s, _: s.state("b").update("k", lambda _v: 1), 0.0),
    "state.incr": (None, lambda s, _: s.state("b").incr("n"), 0.0),
    "state.keys": (None, lambda s, _: s.state("b").keys(), 0.0),
    "state.items": (None, lambda s, _: s.state("b").items(), 0.0),
    "state.clear": (None, lambda s, _: s.state("b").clear(), 0.0),
    "lock.acquire(timeout=1.5)": (
        lambda s: s.lock("held", ttl=30).acquire(),
        lambda s, _: s.lock("other", ttl=30).acquire(timeout=1.5), 1.5),
    "lock.acquire(held elsewhere, timeout=1.5)": (
        lambda s: s.lock("held", ttl=30).acquire(),
        lambda s, _: s.lock("held", ttl=30).acquire(timeout=1.5), 1.5),
    "lock.release": (
        lambda s: _held(s.lock("mine", ttl=30)),
        lambda _s, lock: lock.release(), 0.0),
    "lock.extend": (
        lambda s: _held(s.lock("mine", ttl=30)),
        lambda _s, lock: lock.extend(), 0.0),
    "lock.locked": (None, lambda s, _: s.lock("x").locked(), 0.0),
    "events.publish": (None, lambda s, _: s.events.publish("t", {"a": 1}), 0.0),
    "events.subscribe": (None, lambda s, _: s.events.subscribe("new-topic"), 0.0),
    "stream.append": (None, lambda s, _: s.stream("st").append({"a": 1}), 0.0),
    "stream.read_after": (None, lambda s, _: s.stream("st").read_after(None), 0.0),
    "stream.last_id": (None, lambda s, _: s.stream("st").last_id(), 0.0),
    "stream.len": (None, lambda s, _: len(s.stream("st")), 0.0),
    "stream.follow(timeout=1.5)": (
        None, lambda s, _: list(s.stream("st").follow(timeout=1.5)), 1.5),
    "breaker failing call": (
        None, lambda s, _: s.breaker("br", on_backend_error="allow").call(_fail), 0.0),
}


def _held(lock: flexisync.Lock) -> flexisync.Lock:
    assert lock.acquire()
    return lock


def _fail() -> None:
    raise RuntimeError("provider down")


@pytest.mark.parametrize("name", sorted(_CALLS))
def test_every_public_call_returns_or_raises_within_its_bound_on_a_hung_server(
        name: str, through_proxy: flexisync.Coordinator, proxy: FaultProxy) -> None:
    """With the server hung mid-connection, each public call ends within the policy's
    deadline (plus its own timeout where it has one) with a flexisync error or a result,
    never a raw redis error and never the 5 s socket timeout per attempt."""
    setup, call, extra = _CALLS[name]
    through_proxy.ping()
    through_proxy.state("b").set("k", 1)  # warm the pool and the scripts
    held = setup(through_proxy) if setup is not None else None  # type: ignore[operator]
    proxy.stall()
    error, took = _timed(lambda: call(through_proxy, held))  # type: ignore[operator]
    bound = 1.0 + extra + SLACK
    assert took < bound, f"{name} took {took:.2f}s; its bound is {bound - SLACK:.1f}s"
    assert error is None or isinstance(error, (flexisync.FlexiSyncError, RuntimeError)), (
        f"{name} raised {type(error).__name__}: {error}")
