"""Connecting, retrying, translating errors, and the shared pub/sub listener."""

from __future__ import annotations

import socket
import threading
import time

import pytest
import redis

import flexisync
from flexisync.embedded import EmbeddedRedis
from tests.helpers import wait_until


def _dead_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_ping_returns_round_trip_seconds(sync: flexisync.Coordinator) -> None:
    """ping() is a small positive float (seconds)."""
    rtt = sync.ping()
    assert isinstance(rtt, float)
    assert 0 < rtt < 1


def test_unreachable_redis_raises_backend_unavailable_within_budget() -> None:
    """A port nothing listens on gives BackendUnavailable after bounded retries, no hang."""
    policy = flexisync.RetryPolicy(attempts=3, initial=0.01, maximum=0.05, deadline=1.0)
    with flexisync.connect(f"redis://127.0.0.1:{_dead_port()}/0", retry=policy) as sync:
        started = time.monotonic()
        with pytest.raises(flexisync.BackendUnavailable) as info:
            sync.state("s").get("k")
        elapsed = time.monotonic() - started
    assert elapsed < 3.0
    assert info.value.attempts == 3
    assert isinstance(info.value.__cause__, redis.ConnectionError)
    with pytest.raises(flexisync.BackendUnavailable):
        sync.ping()


def test_wrong_password_is_backend_unavailable_without_the_password(
        own_server: EmbeddedRedis) -> None:
    """An auth failure is reported as unavailable, and the password is not in it."""
    admin = redis.Redis(port=own_server.port)
    admin.config_set("requirepass", "right-pw")
    url = f"redis://:wrong-pw@127.0.0.1:{own_server.port}/0"
    with flexisync.connect(url) as sync:
        with pytest.raises(flexisync.BackendUnavailable, match="authentication") as info:
            sync.ping()
        assert "wrong-pw" not in str(info.value)
    with flexisync.connect(f"redis://:right-pw@127.0.0.1:{own_server.port}/0") as sync:
        assert sync.ping() > 0


def test_retry_policy_rides_out_a_short_restart(own_server: EmbeddedRedis) -> None:
    """An idempotent call made while the server restarts succeeds once it is back."""
    policy = flexisync.RetryPolicy(attempts=50, initial=0.02, maximum=0.1, deadline=10.0)
    with flexisync.connect(own_server.url, retry=policy) as sync:
        store = sync.state("s")
        store.set("k", 1)
        own_server.kill()
        restarter = threading.Thread(target=own_server.restart)
        restarter.start()
        store.set("k", 2)  # retried until the new server answers
        restarter.join(15)
        assert store.get("k") == 2


def test_existing_client_can_be_passed_in(flexisync_url: str, namespace: str) -> None:
    """client= uses the caller's redis.Redis (decoded responses work too)."""
    client = redis.Redis.from_url(flexisync_url, decode_responses=True)
    with flexisync.connect(client=client, namespace=namespace) as sync:
        store = sync.state("s")
        store.set("k", {"a": 1})
        assert store.get("k") == {"a": 1}
        assert store.keys() == ["k"]
    client.close()


def test_closed_coordinator_refuses_work(flexisync_url: str, namespace: str) -> None:
    """After close() every call raises BackendUnavailable saying it is closed."""
    sync = flexisync.connect(flexisync_url, namespace=namespace)
    sync.close()
    sync.close()  # idempotent
    assert sync.closed
    with pytest.raises(flexisync.BackendUnavailable, match="closed"):
        sync.state("s").get("k")


# --- the listener ---------------------------------------------------------------------


def test_listener_subscribe_returns_only_when_confirmed(sync: flexisync.Coordinator,
                                                        raw: redis.Redis) -> None:
    """A PUBLISH right after subscribe() returns reaches the handler; no sleep needed."""
    got: list[bytes] = []
    channel = f"{sync.namespace}:chan"
    sync._ctx.listener.subscribe(channel, lambda _c, data, _p: got.append(data))
    assert raw.publish(channel, "first") == 1
    wait_until(lambda: got, message="delivery")
    assert got == [b"first"]


def test_listener_uses_one_thread_and_one_connection(sync: flexisync.Coordinator,
                                                     raw: redis.Redis) -> None:
    """Many subscriptions share one named daemon thread and one pub/sub client."""
    for i in range(5):
        sync._ctx.listener.subscribe(f"{sync.namespace}:c{i}", lambda *_: None)
    sync._ctx.listener.psubscribe(f"{sync.namespace}:p*", lambda *_: None)
    threads = [t for t in threading.enumerate() if t.name == "flexisync-listener"]
    assert len(threads) == 1
    assert threads[0].daemon
    subscribers = [c for c in raw.client_list() if int(c.get("sub", 0)) + int(c.get("psub", 0))]
    assert sum(1 for c in subscribers if int(c["sub"]) == 5 and int(c["psub"]) == 1) == 1


def test_raising_handler_does_not_stop_delivery(sync: flexisync.Coordinator,
                                                raw: redis.Redis) -> None:
    """A handler that raises is counted; the next handler and next message still arrive."""
    got: list[bytes] = []
    channel = f"{sync.namespace}:chan"

    def boom(*_: object) -> None:
        raise RuntimeError("handler bug")

    sync._ctx.listener.subscribe(channel, boom)
    sync._ctx.listener.subscribe(channel, lambda _c, d, _p: got.append(d))
    raw.publish(channel, "1")
    raw.publish(channel, "2")
    wait_until(lambda: len(got) == 2, message="both messages")
    assert sync._ctx.listener.handler_errors == 2


def test_listener_reconnects_and_resubscribes_after_server_restart(
        own_server: EmbeddedRedis) -> None:
    """Killing and restarting the server: subscriptions resume, hooks run, no user action."""
    with flexisync.connect(own_server.url, namespace="r") as sync:
        listener = sync._ctx.listener
        listener.ping_interval = 0.2
        got: list[bytes] = []
        hooked = threading.Event()
        listener.add_reconnect_hook(hooked.set)
        listener.subscribe("r:chan", lambda _c, d, _p: got.append(d))
        generation = listener.generation
        own_server.kill()
        own_server.restart()
        assert hooked.wait(15), "reconnect hook not called"
        assert listener.generation > generation
        publisher = redis.Redis(port=own_server.port)
        assert publisher.publish("r:chan", "after") == 1  # resubscribed before the hook ran
        wait_until(lambda: got, message="delivery after restart")
        assert got == [b"after"]


@pytest.mark.slow
def test_listener_detects_a_paused_server_by_ping_deadline(own_server: EmbeddedRedis) -> None:
    """SIGSTOP (a half-open socket) is noticed by the PING deadline, then recovered."""
    with flexisync.connect(own_server.url, namespace="p") as sync:
        listener = sync._ctx.listener
        listener.ping_interval = 0.1
        listener.ping_timeout = 0.3
        hooked = threading.Event()
        listener.add_reconnect_hook(hooked.set)
        listener.subscribe("p:chan", lambda *_: None)
        own_server.pause()
        try:
            wait_until(lambda: not listener.connected, timeout=5, message="disconnect noticed")
        finally:
            own_server.resume()
        assert hooked.wait(15), "listener did not come back after the pause"
        assert listener.connected


def test_close_stops_the_listener_thread(flexisync_url: str, namespace: str) -> None:
    """close() joins the listener thread."""
    sync = flexisync.connect(flexisync_url, namespace=namespace)
    sync._ctx.listener.subscribe(f"{namespace}:c", lambda *_: None)
    thread = sync._ctx.listener._thread
    assert thread is not None
    assert thread.is_alive()
    sync.close()
    assert not thread.is_alive()
