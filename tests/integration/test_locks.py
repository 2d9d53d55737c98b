"""Lock in one process: contract, fencing, lost-lock detection, bad input, faults."""

from __future__ import annotations

import socket
import threading
import time
from datetime import timedelta
from typing import Any

import pytest
import redis
from structlog.testing import capture_logs

import flexisync
from flexisync.embedded import EmbeddedRedis
from flexisync.locks import list_locks
from tests.helpers import wait_until


def _dead_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"redis://127.0.0.1:{sock.getsockname()[1]}/0"


def _lease_key(sync: flexisync.Coordinator, name: str) -> str:
    return sync._ctx.keys.key("lock", name)


# --- the basic contract ------------------------------------------------------------------


def test_acquire_release_and_inspection(sync: flexisync.Coordinator,
                                        raw: redis.Redis) -> None:
    """acquire sets a lease with the ttl; locked/owned reflect Redis; release frees it."""
    lock = sync.lock("job", ttl=5.0)
    assert not lock.locked()
    assert not lock.owned()
    assert lock.fencing_token is None
    assert lock.acquire() is True
    assert lock.locked()
    assert lock.owned()
    assert 4000 < raw.pttl(_lease_key(sync, "job")) <= 5000
    other = sync.lock("job", ttl=5.0)
    assert other.acquire(blocking=False) is False
    assert other.locked()
    assert not other.owned()
    lock.release()
    assert not lock.locked()
    assert lock.fencing_token is None
    assert other.acquire(blocking=False) is True
    other.release()


def test_fencing_tokens_strictly_increase_across_objects_and_expiry(
        sync: flexisync.Coordinator) -> None:
    """Every acquisition gets a larger token, also after a lease expired unreleased."""
    tokens = []
    for _ in range(5):
        lock = sync.lock("fenced", ttl=5.0)
        assert lock.acquire()
        tokens.append(lock.fencing_token)
        lock.release()
    expiring = sync.lock("fenced", ttl=0.05)
    assert expiring.acquire()
    tokens.append(expiring.fencing_token)
    time.sleep(0.1)  # the subject: the lease runs out
    after = sync.lock("fenced", ttl=5.0)
    assert after.acquire(blocking=False)
    tokens.append(after.fencing_token)
    after.release()
    assert all(isinstance(t, int) for t in tokens)
    assert tokens == sorted(set(tokens)), tokens  # type: ignore[type-var]


def test_acquire_script_is_idempotent_for_the_same_owner(sync: flexisync.Coordinator) -> None:
    """A retried acquire (same token, first reply lost) gets its own fence back, no new one."""
    lock = sync.lock("retry", ttl=5.0)
    backend = sync._ctx.backend
    args = ["tok:host:1", 5000, 60_000]
    keys = lock._acquire_keys("tok:host:1")
    first = backend.run_script("t", "lock_acquire", keys, args)
    again = backend.run_script("t", "lock_acquire", keys, args)
    assert int(first[0]) == 1
    assert [int(x) for x in again] == [int(x) for x in first]
    assert int(first[1]) == _fence_counter(sync, "retry")
    other = backend.run_script("t", "lock_acquire", lock._acquire_keys("x:h:2"),
                               ["x:h:2", 5000, 60_000])
    assert int(other[0]) == 0
    assert 0 < int(other[1]) <= 5000


def test_context_manager_yields_the_lock_and_times_out(sync: flexisync.Coordinator) -> None:
    """`with lock as held` gives the Lock; a lock held elsewhere raises LockTimeout."""
    with sync.lock("cm", ttl=5, timeout=1) as held:
        assert isinstance(held, flexisync.Lock)
        assert held.owned()
        started = time.monotonic()
        with pytest.raises(flexisync.LockTimeout) as info, \
                sync.lock("cm", ttl=5, timeout=0.2):
            pytest.fail("entered a lock held by someone else")
        assert time.monotonic() - started >= 0.2
        assert info.value.name == "cm"
        assert info.value.timeout == 0.2
        assert isinstance(info.value, TimeoutError)
    assert not held.locked()


def test_acquire_is_not_reentrant(sync: flexisync.Coordinator) -> None:
    """A second acquire on a Lock object that holds the lock raises instead of deadlocking."""
    lock = sync.lock("once", ttl=5)
    assert lock.acquire()
    with pytest.raises(flexisync.LockError, match="not reentrant"):
        lock.acquire(timeout=0)
    lock.release()


def _fence_counter(sync: flexisync.Coordinator, name: str) -> int:
    """The current value of the lock's fencing counter."""
    return int(sync.client.get(sync._ctx.keys.key("lock", name, "fence")))


def test_waiter_thread_is_woken_by_release(sync: flexisync.Coordinator) -> None:
    """A thread asleep in acquire() is woken by release: 3 attempts, no polling."""
    holder = sync.lock("wake", ttl=60)
    assert holder.acquire()
    waiter = sync.lock("wake", ttl=60)
    asleep, got = threading.Event(), threading.Event()
    attempts: list[bool] = []
    original = waiter._attempt

    def counting(token: str, waiting: bool, deadline: float | None = None) -> Any:
        result = yield from original(token, waiting, deadline)
        attempts.append(result[0])
        if len(attempts) == 2:
            asleep.set()  # subscribed and the final attempt failed: it sleeps next
        return result

    waiter._attempt = counting  # type: ignore[method-assign]
    thread = threading.Thread(target=lambda: waiter.acquire(timeout=30) and got.set())
    thread.start()
    assert asleep.wait(30)
    released = time.monotonic()
    holder.release()
    assert got.wait(30)
    # Without the wake-up it would re-check only after 5 s (the holder's ttl is 60 s).
    assert time.monotonic() - released < 4.0
    assert attempts == [False, False, True]
    thread.join(5)
    assert waiter.fencing_token == _fence_counter(sync, "wake")
    waiter.release()


def test_waiter_gets_a_lock_whose_holder_never_released_after_its_ttl(
        sync: flexisync.Coordinator) -> None:
    """No release message: the waiter re-attempts when the holder's lease runs out."""
    holder = sync.lock("expire", ttl=0.3)
    assert holder.acquire()
    waiter = sync.lock("expire", ttl=5)
    started = time.monotonic()
    assert waiter.acquire(timeout=10)
    assert time.monotonic() - started < 5.0  # long before the 5 s safety re-check
    assert waiter.fencing_token is not None
    assert holder.fencing_token is not None
    assert waiter.fencing_token > holder.fencing_token
    waiter.release()


def test_extend_resets_the_lease(sync: flexisync.Coordinator, raw: redis.Redis) -> None:
    """extend(ttl) sets the lease to ttl from now; extend of a lapsed lease raises."""
    lock = sync.lock("ext", ttl=1.0)
    assert lock.acquire()
    lock.extend(30)
    assert raw.pttl(_lease_key(sync, "ext")) > 20_000
    lock.extend(timedelta(seconds=2))
    assert raw.pttl(_lease_key(sync, "ext")) <= 2000
    raw.delete(_lease_key(sync, "ext"))
    with pytest.raises(flexisync.LockNotOwnedError, match="lapsed"):
        lock.extend()
    assert lock.lost


def test_list_locks_reports_holder_fence_and_ttl(sync: flexisync.Coordinator) -> None:
    """list_locks returns a LockInfo per held lock, with holder host:pid and the fence."""
    import os

    a = sync.lock("list-a", ttl=30)
    b = sync.lock("list-b", ttl=30, fair=True)
    assert a.acquire()
    assert b.acquire()
    infos = list_locks(sync)
    assert [i.name for i in infos] == ["list-a", "list-b"]
    assert infos[0].fencing_token == a.fencing_token
    assert infos[0].holder is not None
    assert infos[0].holder.endswith(f":{os.getpid()}")
    assert 25 < infos[0].ttl <= 30
    b.release()
    assert [i.name for i in list_locks(sync)] == ["list-a"]
    a.release()


def test_list_locks_skips_foreign_data(sync: flexisync.Coordinator, raw: Any) -> None:
    """Keys under the lock prefix that flexisync did not write (a hash where a lease
    belongs, a fence that is not a number) are left out; the real lock is listed."""
    held = sync.lock("real", ttl=30)
    assert held.acquire()
    ns = sync.namespace
    raw.hset(f"{ns}:lock:{{hash}}", "x", "1")
    raw.set(f"{ns}:lock:{{badfence}}", "tok:host:1", ex=30)
    raw.set(f"{ns}:lock:{{badfence}}:fence", "not-a-number", ex=30)
    assert [i.name for i in list_locks(sync)] == ["real"]
    held.release()
    assert list_locks(sync) == []


# --- lost locks ---------------------------------------------------------------------------


def test_lease_deleted_behind_a_renewing_holder_is_detected_as_lost(
        sync: flexisync.Coordinator, raw: redis.Redis) -> None:
    """The watchdog finds the lease gone: lost, lock.lost logged, on_lost(lock) called."""
    calls: list[flexisync.Lock] = []
    lock = sync.lock("victim", ttl=0.6, auto_renew=True, on_lost=calls.append)
    assert lock.acquire()
    lock.ensure_held()
    with capture_logs() as logs:
        raw.delete(_lease_key(sync, "victim"))
        wait_until(lambda: calls, timeout=10, message="on_lost called")
    assert calls == [lock]
    assert lock.lost
    lost_logs = [e for e in logs if e["event"] == "lock.lost"]
    assert lost_logs
    assert lost_logs[0]["lock"] == "victim"
    with pytest.raises(flexisync.LockLostError):
        lock.ensure_held()
    with pytest.raises(flexisync.LockNotOwnedError):
        lock.release()


def test_on_lost_exception_is_logged_not_raised(sync: flexisync.Coordinator,
                                                raw: redis.Redis) -> None:
    """A raising on_lost callback is logged (lock.on_lost_failed) and harms nothing."""
    called = threading.Event()

    def bad(_lock: flexisync.Lock) -> None:
        called.set()
        raise RuntimeError("boom")

    lock = sync.lock("bad-cb", ttl=0.6, auto_renew=True, on_lost=bad)
    with capture_logs() as logs:
        assert lock.acquire()
        raw.delete(_lease_key(sync, "bad-cb"))
        assert called.wait(10)
        wait_until(lambda: any(e["event"] == "lock.on_lost_failed" for e in logs),
                   message="callback failure logged")
    again = sync.lock("bad-cb", ttl=5)
    assert again.acquire(blocking=False)
    again.release()


def test_lease_that_lapsed_without_renewal_is_lost_and_release_says_why(
        sync: flexisync.Coordinator) -> None:
    """No auto_renew, held past ttl: lost, ensure_held raises, release explains the lapse."""
    lock = sync.lock("lapse", ttl=0.1)
    assert lock.acquire()
    time.sleep(0.2)  # the subject: the lease runs out
    taker = sync.lock("lapse", ttl=5)
    assert taker.acquire(blocking=False)
    assert lock.lost
    with pytest.raises(flexisync.LockLostError):
        lock.ensure_held()
    with pytest.raises(flexisync.LockNotOwnedError,
                       match=r"lapsed before release.*another holder has it"):
        lock.release()
    assert taker.owned()  # the lapsed holder's release did not free the new holder's lease
    taker.release()


def test_release_that_finds_the_lease_gone_reports_the_loss(
        sync: flexisync.Coordinator, raw: redis.Redis) -> None:
    """Deleted behind the holder's back, found at release: lost, on_lost called, clear error."""
    calls: list[flexisync.Lock] = []
    lock = sync.lock("gone", ttl=30, on_lost=calls.append)
    assert lock.acquire()
    raw.delete(_lease_key(sync, "gone"))
    with pytest.raises(flexisync.LockNotOwnedError, match="nobody holds it now"):
        lock.release()
    assert lock.lost
    wait_until(lambda: calls == [lock], message="on_lost called")
    assert lock.fencing_token is None


def test_with_block_whose_lease_lapsed_raises_lock_lost(sync: flexisync.Coordinator) -> None:
    """Leaving a with-block after the lease lapsed raises LockLostError, chained to why."""
    with pytest.raises(flexisync.LockLostError) as info, \
            sync.lock("cm-lapse", ttl=0.1, timeout=1):
        time.sleep(0.2)  # the subject: the lease runs out
    assert isinstance(info.value.__cause__, flexisync.LockNotOwnedError)
    assert "lapsed" in str(info.value.__cause__)


def test_with_block_exception_is_not_masked_by_a_lapsed_lease(
        sync: flexisync.Coordinator) -> None:
    """An exception from the block wins over the release failure."""
    def body() -> None:
        with sync.lock("cm-mask", ttl=0.1, timeout=1):
            time.sleep(0.2)  # the subject: the lease runs out
            raise KeyError("from the block")

    with pytest.raises(KeyError, match="from the block"):
        body()


@pytest.mark.slow
def test_auto_renew_keeps_a_lease_held_past_its_ttl(sync: flexisync.Coordinator,
                                                    raw: redis.Redis) -> None:
    """With auto_renew, holding past twice the ttl keeps the lease; one watchdog serves all."""
    locks = [sync.lock(f"renew-{i}", ttl=0.9, auto_renew=True) for i in range(3)]
    for lock in locks:
        assert lock.acquire()
    time.sleep(2.0)  # the subject: more than two ttls pass
    for lock in locks:
        assert not lock.lost
        lock.ensure_held()
        assert lock.owned()
    watchdogs = [t for t in threading.enumerate() if t.name == "flexisync-lock-watchdog"]
    assert len(watchdogs) == 1
    for lock in locks:
        lock.release()
    assert raw.exists(_lease_key(sync, "renew-0")) == 0


# --- bad input and misuse -------------------------------------------------------------


@pytest.mark.parametrize("ttl", [0, -1, -0.5, float("nan"), float("inf"), "5", None])
def test_bad_ttl_raises_value_error_before_redis(ttl: object) -> None:
    """ttl <= 0 (or not a number) is a ConfigError/ValueError; Redis is never contacted."""
    with flexisync.connect(_dead_url()) as sync, pytest.raises(ValueError, match="ttl"):
        sync.lock("x", ttl=ttl)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["", "has space", "x" * 201, "semi;colon", "{brace}", 5])
def test_bad_name_raises_value_error_before_redis(name: object) -> None:
    """A bad lock name is a ConfigError/ValueError; Redis is never contacted."""
    with flexisync.connect(_dead_url()) as sync, pytest.raises(flexisync.ConfigError):
        sync.lock(name)  # type: ignore[arg-type]


def test_bad_timeouts_raise_value_error_before_redis() -> None:
    """Negative timeouts, and a timeout with blocking=False, fail before any I/O."""
    with flexisync.connect(_dead_url()) as sync:
        with pytest.raises(ValueError, match="timeout"):
            sync.lock("x", timeout=-1)
        lock = sync.lock("x")
        with pytest.raises(ValueError, match="timeout"):
            lock.acquire(timeout=-0.1)
        with pytest.raises(ValueError, match="timeout"):
            lock.acquire(blocking=False, timeout=1)
        with pytest.raises(ValueError, match="ttl"):
            lock.extend(0)
        with pytest.raises(ValueError, match="on_lost"):
            sync.lock("x", on_lost="not callable")  # type: ignore[arg-type]


def test_release_of_a_lock_not_held_raises_not_owned(sync: flexisync.Coordinator) -> None:
    """release() without acquire, and a double release, raise LockNotOwnedError."""
    lock = sync.lock("never", ttl=5)
    with pytest.raises(flexisync.LockNotOwnedError, match="never acquired") as info:
        lock.release()
    assert info.value.name == "never"
    assert lock.acquire()
    lock.release()
    with pytest.raises(flexisync.LockNotOwnedError):
        lock.release()
    with pytest.raises(flexisync.LockNotOwnedError):
        lock.extend()
    with pytest.raises(flexisync.LockNotOwnedError):
        lock.ensure_held()


def test_release_never_frees_another_holders_lease(sync: flexisync.Coordinator) -> None:
    """A Lock that does not hold the lease cannot release it (token-checked)."""
    holder = sync.lock("mine", ttl=5)
    intruder = sync.lock("mine", ttl=5)
    assert holder.acquire()
    with pytest.raises(flexisync.LockNotOwnedError):
        intruder.release()
    assert holder.owned()
    holder.release()


# --- faults -----------------------------------------------------------------------------

_FAST = flexisync.RetryPolicy(attempts=2, initial=0.01, maximum=0.05, deadline=0.5)


def test_redis_down_during_acquire_raises_backend_unavailable(
        own_server: EmbeddedRedis) -> None:
    """With the server killed, acquire raises BackendUnavailable and holds nothing."""
    with flexisync.connect(own_server.url, retry=_FAST) as sync:
        lock = sync.lock("down", ttl=5)
        sync.ping()
        own_server.kill()
        with pytest.raises(flexisync.BackendUnavailable):
            lock.acquire(timeout=1)
        with pytest.raises(flexisync.BackendUnavailable):
            lock.acquire(blocking=False)
        assert lock.fencing_token is None
        assert not lock.owned()
        with pytest.raises(flexisync.LockNotOwnedError):
            lock.release()


def test_redis_down_during_release_surfaces_and_leaves_nothing_held(
        own_server: EmbeddedRedis) -> None:
    """A failed release raises BackendUnavailable; the Lock then holds nothing locally."""
    with flexisync.connect(own_server.url, retry=_FAST) as sync:
        lock = sync.lock("down-release", ttl=5, auto_renew=True)
        assert lock.acquire()
        own_server.kill()
        with pytest.raises(flexisync.BackendUnavailable):
            lock.release()
        assert lock.fencing_token is None
        assert not lock.owned()
        with pytest.raises(flexisync.LockNotOwnedError):
            lock.release()
        own_server.restart()
        assert lock.acquire(timeout=5)  # usable again once Redis is back
        lock.release()


def test_waiter_gets_the_lock_after_a_server_restart(own_server: EmbeddedRedis) -> None:
    """A waiter blocked across a server restart (lease wiped) acquires once it is back."""
    policy = flexisync.RetryPolicy(attempts=50, initial=0.02, maximum=0.1, deadline=10.0)
    with flexisync.connect(own_server.url, retry=policy) as sync:
        holder = sync.lock("restart", ttl=60)
        assert holder.acquire()
        result: list[bool] = []
        waiter = sync.lock("restart", ttl=5)
        thread = threading.Thread(target=lambda: result.append(waiter.acquire(timeout=30)))
        thread.start()
        wait_until(lambda: sync._ctx.listener.connected, message="listener up")
        own_server.kill()
        own_server.restart()
        thread.join(30)
        assert result == [True]
        waiter.release()


def test_closing_the_coordinator_ends_a_wait(flexisync_url: str, namespace: str) -> None:
    """A thread blocked in acquire() raises BackendUnavailable when its Coordinator closes.

    The holder uses other settings (a retry policy of its own): Coordinators of the same
    settings in one process share their machinery, which closes with the last of them.
    """
    with flexisync.connect(flexisync_url, namespace=namespace,
                           retry=flexisync.RetryPolicy(deadline=2.5)) as holder_sync:
        holder = holder_sync.lock("closing", ttl=60)
        assert holder.acquire()
        sync = flexisync.connect(flexisync_url, namespace=namespace)
        waiter = sync.lock("closing", ttl=60)
        errors: list[BaseException] = []

        def wait() -> None:
            try:
                waiter.acquire(timeout=60)
            except flexisync.BackendUnavailable as exc:
                errors.append(exc)

        thread = threading.Thread(target=wait)
        thread.start()
        wait_until(lambda: _waits(sync) == 1, message="waiting")
        closed = time.monotonic()
        sync.close()
        thread.join(10)
        assert not thread.is_alive()
        assert time.monotonic() - closed < 4.0  # woken by close, not by the 5 s re-check
        assert len(errors) == 1
        assert "closed" in str(errors[0])
        holder.release()


def test_close_that_lands_while_a_waiter_subscribes_still_ends_the_wait(
        flexisync_url: str, namespace: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """close() pokes waiters before it closes the backend; a waiter whose wake-up
    subscription was confirmed just as the poke landed must still end at once, not
    sleep until its next re-check (seconds later)."""
    from flexisync._core.locks import runtime as lock_runtime

    with flexisync.connect(flexisync_url, namespace=namespace) as sync:
        holder = sync.lock("closing-race", ttl=60)
        assert holder.acquire()
        runtime = lock_runtime(sync._ctx)
        real_join = runtime.join

        def join_then_close() -> object:
            wakeups = real_join()
            runtime.close()  # the close hook runs (stop + poke) before the wait begins
            return wakeups

        monkeypatch.setattr(runtime, "join", join_then_close)
        waiter = sync.lock("closing-race", ttl=60)
        started = time.monotonic()
        with pytest.raises(flexisync.BackendUnavailable, match="closed"):
            waiter.acquire(timeout=30)
        assert time.monotonic() - started < 2.0, "the wait slept through the close"
        monkeypatch.undo()
        holder.release()


def _waits(sync: flexisync.Coordinator) -> int:
    """How many acquire() calls of this Coordinator are waiting for a wake-up now."""
    from flexisync._core.locks import runtime

    return len(runtime(sync._ctx).waits)


# --- fair mode in one process ---------------------------------------------------------


def test_fair_lock_is_not_taken_past_a_queued_waiter(sync: flexisync.Coordinator,
                                                    raw: redis.Redis) -> None:
    """A free fair lock goes to the queue head, not to a newcomer's non-blocking try;
    a waiter that times out leaves the queue."""
    holder = sync.lock("fq", ttl=30, fair=True)
    assert holder.acquire()
    queue_key = sync._ctx.keys.key("lock", "fq", "queue")
    queued = sync.lock("fq", ttl=30, fair=True)
    result: list[bool] = []
    thread = threading.Thread(target=lambda: result.append(queued.acquire(timeout=30)))
    thread.start()
    wait_until(lambda: raw.zcard(queue_key) == 1, message="waiter queued")
    newcomer = sync.lock("fq", ttl=30, fair=True)
    holder.release()
    thread.join(30)
    assert result == [True]
    assert not newcomer.acquire(blocking=False)  # held by the head now
    queued.release()
    assert newcomer.acquire(blocking=False)  # empty queue: free for anyone
    impatient = sync.lock("fq", ttl=30, fair=True)
    assert impatient.acquire(timeout=0.2) is False
    assert raw.zcard(queue_key) == 0, "a timed-out waiter stayed in the queue"
    newcomer.release()


def test_paused_server_during_acquire_raises_backend_unavailable(
        own_server: EmbeddedRedis) -> None:
    """A server that stops answering mid-acquire gives BackendUnavailable, not "acquired";
    a lease the late command may still set is ours alone and lapses after ttl."""
    with flexisync.connect(own_server.url, retry=_FAST, socket_timeout=0.3) as sync:
        lock = sync.lock("paused", ttl=0.5)
        sync.ping()
        own_server.pause()
        try:
            with pytest.raises(flexisync.BackendUnavailable):
                lock.acquire(blocking=False)
        finally:
            own_server.resume()
        assert lock.fencing_token is None
        other = sync.lock("paused", ttl=5)
        assert other.acquire(timeout=10)  # at worst after the orphaned lease's ttl
        other.release()


def test_works_with_a_decode_responses_client(flexisync_url: str, namespace: str) -> None:
    """connect(client=...) with decode_responses=True: acquire, wake-up, list, release."""
    client = redis.Redis.from_url(flexisync_url, decode_responses=True)
    with flexisync.connect(client=client, namespace=namespace) as sync:
        first = sync.lock("decoded", ttl=5, auto_renew=True)
        assert first.acquire()
        assert first.owned()
        assert [i.fencing_token for i in list_locks(sync)] == [first.fencing_token]
        second = sync.lock("decoded", ttl=5)
        result: list[bool] = []
        thread = threading.Thread(target=lambda: result.append(second.acquire(timeout=10)))
        thread.start()
        first.release()
        thread.join(15)
        assert result == [True]
        second.release()
        with pytest.raises(flexisync.LockNotOwnedError):
            second.release()
    client.close()


# --- loss is reported only when a lease is lost (issue 9, section 3) ------------------


def test_renewal_that_meets_its_own_release_is_not_a_loss(
        sync: flexisync.Coordinator, monkeypatch: pytest.MonkeyPatch) -> None:
    """A watchdog renewal that reaches Redis after the release's DEL, one already in
    flight and one that starts then, finds the lease released, not lost: no on_lost."""
    calls: list[flexisync.Lock] = []
    lock = sync.lock("race", ttl=30, auto_renew=True, on_lost=calls.append)
    backend = sync._ctx.backend
    original = backend.call

    def release_then_renew(operation: str, fn: Any, **kwargs: Any) -> Any:
        token = lock._token  # what a renewal already in flight carries
        result = original(operation, fn, **kwargs)
        if operation == "lock.release":
            assert token is not None
            lock._extend(token, 30)  # the in-flight renewal lands after the DEL
            lock._renew()  # and a renewal that starts now
        return result

    assert lock.acquire()
    monkeypatch.setattr(backend, "call", release_then_renew)
    with capture_logs() as logs:
        lock.release()
    assert [e for e in logs if e["event"] == "lock.lost"] == []
    assert not lock.lost
    assert calls == []


def _on_lost_threads_done() -> bool:
    return not any(t.name == "flexisync-lock-on-lost" for t in threading.enumerate())


def test_auto_renew_reports_no_loss_over_many_releases_and_one_real_loss_once(
        sync: flexisync.Coordinator, raw: redis.Redis,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """500 acquire/release cycles while the watchdog renews back to back give no on_lost;
    a lease deleted behind the holder's back then gives exactly one.

    Each release starts while a renewal is under way, and the releasing thread pauses
    1 ms once Redis answered it (as a preempted thread would), so renewals keep landing
    between the release's DEL and its return."""
    calls: list[flexisync.Lock] = []
    lock = sync.lock("churn", ttl=0.5, auto_renew=True, on_lost=calls.append)
    runtime = lock._runtime
    backend = sync._ctx.backend
    original_call = backend.call
    original_renew = lock._renew
    renewals = [0]

    def preempted_after_release(operation: str, fn: Any, **kwargs: Any) -> Any:
        result = original_call(operation, fn, **kwargs)
        if operation == "lock.release":
            time.sleep(0.001)
        return result

    def back_to_back() -> None:
        original_renew()
        renewals[0] += 1
        lock._renew_at = 0.0  # due again at once

    monkeypatch.setattr(backend, "call", preempted_after_release)
    monkeypatch.setattr(lock, "_renew", back_to_back)
    for _ in range(500):
        assert lock.acquire()
        before = renewals[0]
        with runtime.cond:
            lock._renew_at = 0.0
            runtime.cond.notify()
        wait_until(lambda b=before: renewals[0] > b, interval=0.0002,
                   message="the watchdog renewing")
        lock.release()
    wait_until(_on_lost_threads_done, message="on_lost threads finished")
    assert calls == [], f"{len(calls)} false on_lost in 500 normal releases"
    monkeypatch.undo()
    assert lock.acquire()
    raw.delete(_lease_key(sync, "churn"))
    wait_until(lambda: calls, timeout=10, message="on_lost after a real loss")
    with pytest.raises(flexisync.LockNotOwnedError):
        lock.release()
    wait_until(_on_lost_threads_done, message="on_lost threads finished")
    assert calls == [lock]


# --- steady-state cost (issue 9, section 6) -------------------------------------------


def test_wait_subscriptions_end_when_no_local_waiter_remains(
        sync: flexisync.Coordinator, raw: redis.Redis) -> None:
    """After waiting on 30 distinct lock names (timed out, and woken by a release), the
    process keeps no subscription for any of them, neither in its listener nor in Redis."""
    names = [f"waited-{i}" for i in range(30)]
    for name in names:
        holder = sync.lock(name, ttl=30)
        assert holder.acquire()
        assert sync.lock(name, ttl=30).acquire(timeout=0.01) is False
        waiter = sync.lock(name, ttl=30)
        result: list[bool] = []
        thread = threading.Thread(
            target=lambda w=waiter, r=result: r.append(w.acquire(timeout=10)))
        thread.start()
        channel = sync._ctx.keys.object_channel("lock", name)
        wait_until(lambda c=channel: raw.pubsub_numsub(c)[0][1] == 1, message="waiting")
        holder.release()
        thread.join(10)
        assert result == [True]
        waiter.release()
    channels = [sync._ctx.keys.object_channel("lock", name) for name in names]
    assert not [key for key in sync._ctx.listener._handlers if key[1] in channels]

    def unsubscribed() -> bool:
        return all(count == 0 for _, count in raw.pubsub_numsub(*channels))

    wait_until(unsubscribed, message="Redis no longer counts the wake-up subscriptions")


def test_fence_key_expires_when_idle_and_tokens_still_increase(
        sync: flexisync.Coordinator, raw: redis.Redis) -> None:
    """The fencing counter carries a TTL (set when it starts, renewed by every 1024th
    acquire), and a token issued after the counter is gone (expired, or lost with the
    server's data) is still larger than every earlier one."""
    fence_key = sync._ctx.keys.key("lock", "idle", "fence")
    lock = sync.lock("idle", ttl=5)
    assert lock.acquire()
    first = lock.fencing_token
    lock.release()
    assert 0 < raw.pttl(fence_key) <= 86_400_000  # flexisync.locks.FENCE_IDLE_TTL: a day
    assert first is not None
    renewing = first + (-first - 1) % 1024  # the next token is a multiple of 1024
    raw.set(fence_key, renewing, px=60_000)
    assert lock.acquire()
    assert raw.pttl(fence_key) > 60_000, "the 1024th acquire did not renew the TTL"
    lock.release()
    assert lock.acquire()
    second = lock.fencing_token
    lock.release()
    raw.delete(fence_key)  # what expiry after a long idle period, or a data loss, does
    assert lock.acquire()
    third = lock.fencing_token
    lock.release()
    assert first is not None
    assert second is not None
    assert third is not None
    assert first < second < third
