"""flexisync inside real gunicorn and uWSGI workers, driven over HTTP.

The example app (``examples/wsgi_app.py``) creates its Coordinator, breaker and event
subscription at import time. With gunicorn ``--preload`` and uWSGI without ``lazy-apps``
that import happens in the master before the fork; the other two configurations import
in each worker. No configuration needs a user hook.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pytest

import flexisync
from flexisync.locks import list_locks
from tests.helpers import wait_until
from tests.servers.conftest import WORKERS, Server, reach_every_worker

pytestmark = pytest.mark.slow

CONFIGS = [
    pytest.param("gunicorn", {"preload": True}, id="gunicorn-preload"),
    pytest.param("gunicorn", {"preload": False}, id="gunicorn"),
    pytest.param("uwsgi", {"lazy_apps": False}, id="uwsgi"),
    pytest.param("uwsgi", {"lazy_apps": False, "fork_hooks": False}, id="uwsgi-no-fork-hooks"),
    pytest.param("uwsgi", {"lazy_apps": True}, id="uwsgi-lazy-apps"),
]


@pytest.mark.parametrize(("kind", "options"), CONFIGS)
def test_breaker_lock_and_events_are_shared_by_every_worker(
        start_server: Callable[..., Server], kind: str, options: dict[str, Any]) -> None:
    """State is shared; one failure opens the breaker for all 4 workers; a lock and an
    event cross workers."""
    server = start_server(kind, **options)
    pids = reach_every_worker(server, "/pid")
    assert len(pids) == WORKERS

    # State: increments through whichever worker answers add up exactly.
    replies = [server.get("/state/incr", key="hits") for _ in range(20)]
    assert sorted(r["value"] for r in replies) == list(range(1, 21))

    # Breaker: closed everywhere, then one failure through one worker opens it for all.
    reach_every_worker(server, "/breaker", accept=lambda r: r["state"] == "closed")
    failed = server.get("/call-provider", fail="1")
    assert failed["result"] == "failed"
    rejected = reach_every_worker(server, "/call-provider",
                                  accept=lambda r: r["result"] == "rejected")
    assert all(r["retry_after"] > 0 for r in rejected.values())
    views = reach_every_worker(server, "/breaker", accept=lambda r: r["state"] == "open")
    assert set(views) == set(pids)

    # Lock: taken through one worker, held as seen from every other one.
    name = f"job-{uuid.uuid4().hex[:6]}"
    taken = server.get("/lock/try", name=name, ttl=60)
    assert taken["acquired"] is True
    holder = taken["pid"]
    attempts = reach_every_worker(server, "/lock/try", query={"name": name, "ttl": 60})
    for pid, reply in attempts.items():
        if pid == holder:
            assert reply == {"pid": pid, "acquired": True, "mine": True,
                             "token": taken["token"]}
        else:
            assert reply["acquired"] is False, f"worker {pid} took a lock {holder} holds"
    reach_every_worker(server, "/lock/status", query={"name": name},
                       accept=lambda r: r["locked"] is True)

    # Events: once every worker's subscription is live (each has heard a warm-up
    # event), an event published through one worker reaches all of them.
    _warm_up_subscriptions(server)
    tag = f"news-{uuid.uuid4().hex[:6]}"
    sent = server.get("/publish", tag=tag)
    assert sent["receivers"] >= WORKERS
    heard = reach_every_worker(server, "/received", accept=lambda r: tag in r["tags"])
    assert sent["pid"] in heard
    assert len(heard) == WORKERS


def _warm_up_subscriptions(server: Server, timeout: float = 30.0) -> None:
    """Publish warm-up events until every worker reports having received one."""
    warmed: set[int] = set()
    deadline = time.monotonic() + timeout
    while len(warmed) < WORKERS:
        assert time.monotonic() < deadline, f"only workers {warmed} ever received an event"
        server.get("/publish", tag="warm-up")
        for _ in range(2 * WORKERS):
            reply = server.get("/received")
            if "warm-up" in reply["tags"]:
                warmed.add(reply["pid"])


@pytest.mark.parametrize(("kind", "options"), [
    pytest.param("gunicorn", {"preload": True, "timeout": 2}, id="gunicorn-timeout"),
    pytest.param("uwsgi", {"lazy_apps": False, "harakiri": 2}, id="uwsgi-harakiri"),
])
def test_worker_killed_by_server_timeout_leaves_no_lock_stuck(
        start_server: Callable[..., Server], sync: flexisync.Coordinator,
        kind: str, options: dict[str, Any]) -> None:
    """A worker that hangs holding an auto-renewed lock is killed; the lock frees itself."""
    server = start_server(kind, **options)
    pids = set(reach_every_worker(server, "/pid"))
    name = f"stuck-{uuid.uuid4().hex[:6]}"
    # The hanging request never answers: fire it with a short client timeout.
    with pytest.raises(httpx.HTTPError):
        server.http.get("/lock/hang", params={"name": name, "ttl": 2}, timeout=1.0)
    held = wait_until(lambda: [lock for lock in list_locks(sync) if lock.name == name],
                      timeout=10.0, message="the hanging worker taking the lock")
    holder_pid = int(str(held[0].holder).rsplit(":", 1)[1])
    assert holder_pid in pids
    # The server kills the worker after its timeout; the lease then lapses (TTL 2 s).
    deadline = time.monotonic() + 30.0
    while True:
        reply = server.get("/lock/try", name=name, ttl=30)
        if reply["acquired"]:
            break
        assert time.monotonic() < deadline, f"lock {name} still held 30 s after the hang"
        time.sleep(0.2)  # the thing under test is a server timeout plus a TTL
    assert reply["pid"] != holder_pid
    survivors = set(reach_every_worker(server, "/pid"))
    assert len(survivors) == WORKERS
    assert survivors != pids, "the hung worker was not replaced"
