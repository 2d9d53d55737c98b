"""Lock under faults: lost replies, scripts that fail midway, a stalled server (issue 9).

Lost replies are simulated by wrapping the registered script so that it runs on the real
server and then raises a connection error, as when a connection dies after the request
went out: a real server cannot be made to lose exactly one reply on demand. Stalls go
through the fault proxy (``proxy`` fixture), a hung server with open connections.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis
import redis.exceptions as rexc

import flexisync
from flexisync.embedded import EmbeddedRedis
from tests.faults import FaultProxy


class _LostReply:
    """``EVALSHA`` of one script that runs on the server, then loses its reply.

    Stands in for the backend client's ``evalsha`` (other scripts pass through). The
    first ``lose`` calls of the script run it for real, call ``between`` (what happens
    on the server while the client waits) and raise ``ConnectionError``; later calls
    pass.
    """

    def __init__(self, real: Any, sha: str, lose: int,
                 between: Callable[[], Any] = lambda: None) -> None:
        self.real = real
        self.sha = sha
        self.lose = lose
        self.between = between
        self.calls = 0

    def __call__(self, sha: str, numkeys: int, *keys_and_args: Any) -> Any:
        if sha != self.sha:
            return self.real(sha, numkeys, *keys_and_args)
        self.calls += 1
        result = self.real(sha, numkeys, *keys_and_args)
        if self.calls <= self.lose:
            self.between()
            raise rexc.ConnectionError("connection lost after the request was sent")
        return result


def _lose_replies(sync: flexisync.Coordinator, script: str, lose: int,
                  between: Callable[[], Any] = lambda: None) -> _LostReply:
    backend = sync._ctx.backend
    client = backend.client
    registered = backend.script(script)
    if not registered.sha:  # loaded lazily: make sure the hash is the one sent
        registered.sha = client.script_load(registered.script)
    fake = _LostReply(client.evalsha, registered.sha, lose, between)
    client.evalsha = fake  # an instance attribute shadows the method
    return fake


def _restore(sync: flexisync.Coordinator, script: str) -> None:
    del sync._ctx.backend.client.evalsha


_FAST = flexisync.RetryPolicy(attempts=3, initial=0.01, maximum=0.05, deadline=0.5)


# --- release and extend are idempotent per token -------------------------------------


@pytest.mark.parametrize("fair", [False, True], ids=["plain", "fair"])
def test_release_retried_after_a_lost_reply_reports_the_release(
        sync: flexisync.Coordinator, fair: bool) -> None:
    """The first release attempt frees the lock, its reply is lost and a waiter takes the
    lock; the retry reports "released" (no LockNotOwnedError, no on_lost).

    (extend needs no such memory: a retried extend finds its own token and extends.)"""
    calls: list[flexisync.Lock] = []
    lock = sync.lock("lost-release", ttl=30, fair=fair, on_lost=calls.append)
    taker = sync.lock("lost-release", ttl=30, fair=fair)
    assert lock.acquire()
    fake = _lose_replies(sync, "lock_release", 1,
                         between=lambda: taker.acquire(blocking=False))
    lock.release()
    assert fake.calls == 2, "the release was not retried"
    assert not lock.lost
    assert calls == []
    assert taker.owned()  # the retry did not touch the new holder's lease
    _restore(sync, "lock_release")
    taker.release()


# --- an acquire never leaves a lease that nobody holds ----------------------------------


@pytest.mark.parametrize("fair", [False, True], ids=["plain", "fair"])
def test_acquire_whose_replies_are_lost_leaves_no_lease(
        flexisync_url: str, namespace: str, raw: redis.Redis, fair: bool) -> None:
    """Every acquire attempt runs on the server but its reply is lost: acquire raises
    BackendUnavailable and drops the lease it set, so the lock is free at once."""
    with flexisync.connect(flexisync_url, namespace=namespace, retry=_FAST) as sync:
        lock = sync.lock("orphan", ttl=30, fair=fair)
        fake = _lose_replies(sync, "lock_acquire", lose=1_000)
        with pytest.raises(flexisync.BackendUnavailable):
            lock.acquire(blocking=False)
        assert fake.calls >= 1
        assert lock.fencing_token is None
        assert raw.exists(sync._ctx.keys.key("lock", "orphan")) == 0, "an orphaned lease is left"
        _restore(sync, "lock_acquire")
        other = sync.lock("orphan", ttl=30, fair=fair)
        assert other.acquire(blocking=False)
        other.release()


def test_fair_waiter_whose_reply_is_lost_leaves_the_queue(
        flexisync_url: str, namespace: str, raw: redis.Redis) -> None:
    """A fair waiter's attempt queues it, but the reply is lost for good: acquire raises
    and its queue entry is gone at once (not after QUEUE_ENTRY_TTL)."""
    with flexisync.connect(flexisync_url, namespace=namespace, retry=_FAST) as sync:
        holder = sync.lock("orphan-q", ttl=30, fair=True)
        assert holder.acquire()
        waiter = sync.lock("orphan-q", ttl=30, fair=True)
        _lose_replies(sync, "lock_acquire", lose=1_000)
        with pytest.raises(flexisync.BackendUnavailable):
            waiter.acquire(timeout=5)
        _restore(sync, "lock_acquire")
        assert raw.zcard(sync._ctx.keys.key("lock", "orphan-q", "queue")) == 0
        holder.release()


@pytest.mark.parametrize("foreign", ["text", "hash", "huge"])
@pytest.mark.parametrize("fair", [False, True], ids=["plain", "fair"])
def test_acquire_is_all_or_nothing_when_the_fence_counter_holds_foreign_data(
        sync: flexisync.Coordinator, raw: redis.Redis, foreign: str, fair: bool) -> None:
    """A fencing counter another program overwrote makes acquire raise BackendError
    and set no lease (the script used to fail after SET, leaving an orphan)."""
    fence = sync._ctx.keys.key("lock", "foreign", "fence")
    if foreign == "text":
        raw.set(fence, "not a number")
    elif foreign == "huge":
        raw.set(fence, str(2**62))  # beyond an exact token (2^53)
    else:
        raw.hset(fence, "x", "1")
    lock = sync.lock("foreign", ttl=30, fair=fair)
    with pytest.raises(flexisync.BackendError):
        lock.acquire(blocking=False)
    assert raw.exists(sync._ctx.keys.key("lock", "foreign")) == 0, "an orphaned lease is left"
    assert lock.fencing_token is None
    raw.delete(fence)
    assert lock.acquire(blocking=False)
    lock.release()


# --- every timeout is a bound (issue 9, section 1) -------------------------------------

# A long policy deadline: only the call's own timeout can end these calls in time.
_PATIENT = flexisync.RetryPolicy(deadline=6.0)


def _stalled_call(proxy: FaultProxy, call: Callable[[], Any]) -> tuple[float, Any]:
    """Run ``call`` with the server stalled; (seconds it took, result or error)."""
    proxy.stall()
    started = time.monotonic()
    try:
        outcome: Any = call()
    except flexisync.FlexiSyncError as exc:
        outcome = exc
    finally:
        elapsed = time.monotonic() - started
        proxy.resume()
    return elapsed, outcome


@pytest.mark.parametrize("fair", [False, True], ids=["plain", "fair"])
def test_acquire_timeout_bounds_the_call_on_a_stalled_server(
        proxy: FaultProxy, fair: bool) -> None:
    """Server hung (half-open TCP): acquire(timeout=2) ends within 2 + 1.5 s with
    BackendUnavailable, and `with` (timeout=1) within 1 + 1.5 s with LockTimeout or
    BackendUnavailable."""
    with flexisync.connect(proxy.url(), retry=_PATIENT) as sync:
        sync.ping()
        lock = sync.lock("stalled", ttl=30, fair=fair)
        elapsed, outcome = _stalled_call(proxy, lambda: lock.acquire(timeout=2))
        assert elapsed < 3.5, f"acquire(timeout=2) took {elapsed:.1f}s"
        assert isinstance(outcome, flexisync.BackendUnavailable), outcome

        def enter() -> None:
            with sync.lock("stalled", ttl=30, timeout=1, fair=fair):
                pytest.fail("entered a lock on a hung server")

        elapsed, outcome = _stalled_call(proxy, enter)
        assert elapsed < 2.5, f"with lock (timeout=1) took {elapsed:.1f}s"
        assert isinstance(outcome, (flexisync.LockTimeout, flexisync.BackendUnavailable))


@pytest.mark.parametrize("fair", [False, True], ids=["plain", "fair"])
def test_waiting_acquire_timeout_bounds_the_call_when_the_server_stalls_meanwhile(
        proxy: FaultProxy, own_server: EmbeddedRedis, fair: bool) -> None:
    """A waiter asleep on a held lock when the server hangs (and that re-attempts when
    the holder's 1.5 s lease runs out) still returns False or raises BackendUnavailable
    within its timeout + 1.5 s."""
    direct = redis.Redis(port=own_server.port)
    with flexisync.connect(proxy.url(), retry=_PATIENT) as sync:
        holder = sync.lock("stall-wait", ttl=1.5, fair=fair)
        assert holder.acquire()
        waiter = sync.lock("stall-wait", ttl=60, fair=fair)
        outcome: list[Any] = []
        started = [0.0, 0.0]

        def wait() -> None:
            started[0] = time.monotonic()
            try:
                outcome.append(waiter.acquire(timeout=2))
            except flexisync.FlexiSyncError as exc:
                outcome.append(exc)
            started[1] = time.monotonic()

        thread = threading.Thread(target=wait)
        thread.start()
        channel = sync._ctx.keys.object_channel("lock", "stall-wait")
        deadline = time.monotonic() + 5
        while direct.pubsub_numsub(channel)[0][1] == 0 and time.monotonic() < deadline:
            time.sleep(0.005)  # polling until the waiter has subscribed
        proxy.stall()
        thread.join(10)
        proxy.resume()
        assert not thread.is_alive()
        elapsed = started[1] - started[0]
        assert elapsed < 3.5, f"acquire(timeout=2) took {elapsed:.1f}s"
        assert outcome[0] is False or isinstance(outcome[0], flexisync.BackendUnavailable), \
            outcome
    direct.close()


def test_release_and_extend_are_bounded_by_the_policy_deadline_on_a_stalled_server(
        proxy: FaultProxy) -> None:
    """Server hung: release() and extend() raise BackendUnavailable within the retry
    policy's deadline (2 s) + 1.5 s; the released Lock holds nothing afterwards."""
    with flexisync.connect(proxy.url(), retry=flexisync.RetryPolicy(deadline=2.0)) as sync:
        lock = sync.lock("stall-release", ttl=30)
        assert lock.acquire()
        elapsed, outcome = _stalled_call(proxy, lock.extend)
        assert elapsed < 3.5, f"extend() took {elapsed:.1f}s"
        assert isinstance(outcome, flexisync.BackendUnavailable), outcome
        elapsed, outcome = _stalled_call(proxy, lock.release)
        assert elapsed < 3.5, f"release() took {elapsed:.1f}s"
        assert isinstance(outcome, flexisync.BackendUnavailable), outcome
        assert lock.fencing_token is None
