"""CircuitBreaker while its Redis is killed and restarted (a server of the test's own)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import redis
from structlog.testing import capture_logs

import flexisync
from flexisync.embedded import EmbeddedRedis
from flexisync.testing import unique_namespace
from tests.faults import FaultProxy
from tests.helpers import wait_until


class ProviderDown(RuntimeError):
    """What the fake dependency raises."""


def fail() -> None:
    raise ProviderDown("down")


@pytest.fixture
def own_sync(own_server: EmbeddedRedis) -> Iterator[flexisync.Coordinator]:
    """A Coordinator on the test's own redis-server, with a short retry budget."""
    policy = flexisync.RetryPolicy(attempts=2, initial=0.01, maximum=0.05, deadline=0.5)
    with flexisync.connect(own_server.url, namespace=unique_namespace(),
                           retry=policy) as coordinator:
        yield coordinator


def _outage_warnings(logs: list[dict[str, object]]) -> int:
    return sum(1 for entry in logs if entry["event"] == "breaker.backend_unavailable")


@pytest.mark.slow
def test_local_mode_keeps_breaking_per_process_and_reconciles(
        own_server: EmbeddedRedis, own_sync: flexisync.Coordinator) -> None:
    """Redis killed: healthy calls still work, failures open a local breaker (one warning
    for the whole outage); when Redis is back the open period is written to it."""
    breaker = own_sync.breaker("provider", failure_threshold=3, recovery_timeout=30)
    assert breaker.call(lambda: "warm") == "warm"
    with capture_logs() as logs:
        own_server.kill()
        assert [breaker.call(abs, -i) for i in range(50)] == list(range(50))
        for _ in range(3):
            with pytest.raises(ProviderDown):
                breaker.call(fail)
        for _ in range(20):
            with pytest.raises(flexisync.CircuitOpenError) as info:
                breaker.call(lambda: None)
            assert 25 < info.value.retry_after <= 30
        assert breaker.state == "open"
        assert not breaker.stats().backend_available
        own_server.restart()
        wait_until(lambda: breaker.stats().backend_available, timeout=20,
                   message="breaker reconciled with the restarted Redis")
    assert _outage_warnings(logs) == 1
    client = redis.Redis.from_url(own_server.url, decode_responses=True)
    try:
        assert client.hget(own_sync._ctx.keys.key("breaker", "provider"), "state") == "open"
    finally:
        client.close()
    assert breaker.state == "open"


@pytest.mark.slow
def test_allow_mode_lets_every_call_through_while_redis_is_down(
        own_server: EmbeddedRedis, own_sync: flexisync.Coordinator) -> None:
    """on_backend_error="allow": failures propagate as themselves, nothing is rejected."""
    breaker = own_sync.breaker("provider", failure_threshold=2, on_backend_error="allow")
    assert breaker.state == "closed"
    with capture_logs() as logs:
        own_server.kill()
        for _ in range(10):
            with pytest.raises(ProviderDown):
                breaker.call(fail)
        assert breaker.call(lambda: "still served") == "still served"
    assert _outage_warnings(logs) == 1
    own_server.restart()
    wait_until(lambda: breaker.stats().backend_available, timeout=20)
    assert breaker.state == "closed"


@pytest.mark.slow
def test_reject_mode_rejects_while_redis_is_down_and_recovers(
        own_server: EmbeddedRedis, own_sync: flexisync.Coordinator) -> None:
    """on_backend_error="reject": once the outage is noticed (without any failing call),
    calls raise CircuitOpenError; when Redis is back they run again."""
    breaker = own_sync.breaker("provider", on_backend_error="reject")
    assert breaker.state == "closed"
    own_server.kill()

    def rejected() -> bool:
        try:
            breaker.call(lambda: None)
        except flexisync.CircuitOpenError:
            return True
        return False

    wait_until(rejected, timeout=20, message="outage noticed in the background")
    own_server.restart()
    wait_until(lambda: not rejected(), timeout=20, message="calls admitted again")


@pytest.mark.slow
def test_breaker_first_used_while_redis_is_down_works_locally(
        own_server: EmbeddedRedis, own_sync: flexisync.Coordinator) -> None:
    """A breaker whose first call happens during an outage protects locally, then joins
    the shared state when Redis comes back."""
    own_server.kill()
    breaker = own_sync.breaker("provider", failure_threshold=1)
    assert breaker.call(lambda: "served") == "served"
    own_server.restart()
    wait_until(lambda: breaker.stats().backend_available, timeout=20)
    other = own_sync.breaker("provider")
    other.trip(30)
    wait_until(lambda: breaker.stats().state == "open", timeout=10,
               message="trip mirrored after recovery")


def test_state_is_re_read_after_the_listener_reconnects(
        own_server: EmbeddedRedis, own_sync: flexisync.Coordinator) -> None:
    """A change made while no message could arrive is picked up after the pub/sub
    connection is re-established, long before the periodic refresh (60 s here)."""
    breaker = own_sync.breaker("provider", refresh_interval=60)
    assert breaker.state == "closed"
    client = redis.Redis.from_url(own_server.url, decode_responses=True)
    try:
        key = own_sync._ctx.keys.key("breaker", "provider")
        version = int(client.hget(key, "version") or 0)
        client.hset(key, mapping={"state": "forced_open", "version": version + 3,
                                  "epoch": client.hget(key, "epoch") or "e"})
        assert breaker.stats().state == "closed"  # no message was published
        client.client_kill_filter(_type="pubsub")
        wait_until(lambda: breaker.stats().state == "forced_open", timeout=10,
                   message="re-read after reconnect")
    finally:
        client.close()


def test_failing_calls_do_not_queue_behind_a_hung_redis(proxy: FaultProxy) -> None:
    """Redis hung (half-open TCP): six threads failing at once each return within one
    bounded round trip (none waits behind another), and once the outage is known, the
    next failing calls of this and of any other breaker of the Coordinator go to
    ``on_backend_error`` at once, without touching Redis; when Redis answers again the
    breakers share state again."""
    policy = flexisync.RetryPolicy(initial=0.01, maximum=0.05, deadline=2.0)
    with flexisync.connect(proxy.url(), namespace=unique_namespace(), retry=policy,
                           socket_timeout=2.0) as sync:
        breaker = sync.breaker("provider", failure_threshold=100)
        other = sync.breaker("other", failure_threshold=100)
        assert breaker.state == "closed"
        assert other.state == "closed"
        proxy.stall()
        barrier = threading.Barrier(6)
        elapsed: list[float] = []

        def failing_call() -> None:
            barrier.wait(5)
            start = time.monotonic()
            with pytest.raises(ProviderDown):
                breaker.call(fail)
            elapsed.append(time.monotonic() - start)

        threads = [threading.Thread(target=failing_call) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(20)
        assert len(elapsed) == 6
        # One round trip is bounded by the 2 s deadline; serialized they took 2..12 s.
        assert max(elapsed) < 4.5, f"failing calls queued: {sorted(elapsed)}"
        for each in (breaker, other):
            start = time.monotonic()
            with pytest.raises(ProviderDown):
                each.call(fail)
            assert time.monotonic() - start < 1.0, "a call waited for the known outage"
            assert not each.stats().backend_available
        proxy.resume()
        wait_until(lambda: breaker.stats().backend_available
                   and other.stats().backend_available, timeout=10,
                   message="breakers back on the shared state")
