"""The fleet snapshot (``flexisync._fleet``) after real activity: sync and asyncio
coordinators, one node and a Redis Cluster, the per-kind bound, foreign data, and errors."""

from __future__ import annotations

import asyncio
import json
import math
import os
import socket
import sys
import types
import uuid
from typing import Any

import pytest
import redis
from redis.crc import key_slot

import flexisync
import flexisync.aio
from flexisync import _fleet, embedded
from flexisync._connection import RetryPolicy
from flexisync._fleet import MAX_OBJECTS, asnapshot, snapshot
from flexisync.errors import BackendUnavailable, ConfigError
from flexisync.testing import delete_namespace
from tests.helpers import wait_until
from tests.topologies import Cluster


class Down(RuntimeError):
    """What the fake dependency raises."""


def _fail() -> None:
    raise Down("down")


def _me() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _by_name(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {row["name"]: row for row in rows}


def _strict_json(snap: dict[str, Any]) -> dict[str, Any]:
    """The snapshot survives strict JSON (no NaN/inf, only plain types) unchanged."""
    loaded: dict[str, Any] = json.loads(json.dumps(snap, allow_nan=False))
    assert loaded == snap
    return loaded


@pytest.fixture(autouse=True)
def _no_outcomes_reader(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unless a test installs one, no fleet outcomes reader: outcomes are []."""
    monkeypatch.setattr(_fleet, "_outcomes_reader", lambda: None)


# --- one node, blocking ---------------------------------------------------------------


def test_snapshot_after_sync_activity(sync: flexisync.Coordinator, raw: redis.Redis) -> None:
    """Breakers (open, forced open, closed with a failure), a held lock, a stream and a
    semaphore in use appear with their numbers; state values and other keys do not."""
    opened = sync.breaker("pay", failure_threshold=2)
    for _ in range(2):
        with pytest.raises(Down):
            opened.call(_fail)
    assert opened.info().state == "open"
    sync.breaker("admin").force_open()
    flaky = sync.breaker("search", failure_threshold=5)
    with pytest.raises(Down):
        flaky.call(_fail)
    lock = sync.lock("deploy", ttl=30)
    assert lock.acquire()
    token = lock.fencing_token
    stream = sync.stream("audit")
    ids = [stream.append({"n": n}) for n in range(3)]
    sem = sync.semaphore("slots", 3)
    assert sem.acquire()
    sync.state("cfg").set("mode", "x")
    raw.set(f"{sync.namespace}:stats:{{breaker:pay}}", "not listed")
    try:
        snap = _strict_json(snapshot(sync))
    finally:
        lock.release()
        sem.release()

    assert snap["namespace"] == sync.namespace
    assert snap["limit"] == MAX_OBJECTS
    assert snap["truncated"] == {"breakers": False, "locks": False, "streams": False,
                                 "semaphores": False}
    breakers = _by_name(snap["breakers"])
    assert list(breakers) == ["admin", "pay", "search"]  # sorted by name
    pay = breakers["pay"]
    assert pay["state"] == "open"
    assert pay["trips"] == 1
    assert 0 < pay["retry_after"] <= opened.policy.recovery_timeout
    assert pay["open_period"] == pytest.approx(opened.policy.recovery_timeout)
    assert pay["changed_at"] == pytest.approx(snap["taken_at"], abs=30)
    assert pay["outcomes"] == []
    assert breakers["admin"]["state"] == "forced_open"
    assert breakers["admin"]["retry_after"] is None  # infinite: null in JSON
    assert breakers["search"]["state"] == "closed"
    assert breakers["search"]["failures"] == 1
    assert snap["locks"] == [{"name": "deploy", "holder": _me(), "ttl_left": pytest.approx(
        30, abs=5), "fencing_token": token, "waiters": 0}]
    assert snap["streams"] == [{"name": "audit", "length": 3, "last_id": ids[-1]}]
    assert snap["semaphores"] == [{"name": "slots", "holders": 1, "waiters": 0}]


def test_released_objects_leave_the_snapshot(sync: flexisync.Coordinator) -> None:
    """A released lock or semaphore is no longer listed (the snapshot shows what is
    held now); a reset breaker is listed closed."""
    lock = sync.lock("job", ttl=30)
    sem = sync.semaphore("pool", 2)
    assert lock.acquire()
    assert sem.acquire()
    breaker = sync.breaker("api")
    breaker.trip(retry_after=60)
    before = snapshot(sync)
    assert [row["name"] for row in before["locks"]] == ["job"]
    assert [row["name"] for row in before["semaphores"]] == ["pool"]
    lock.release()
    sem.release()
    breaker.reset()
    after = snapshot(sync)
    assert after["locks"] == []
    assert after["semaphores"] == []
    assert [(b["name"], b["state"]) for b in after["breakers"]] == [("api", "closed")]


def test_empty_namespace_snapshot(sync: flexisync.Coordinator) -> None:
    snap = snapshot(sync)
    assert (snap["breakers"], snap["locks"], snap["streams"], snap["semaphores"]) == \
        ([], [], [], [])


# --- asyncio ---------------------------------------------------------------------------


async def test_asnapshot_after_async_activity(aio: flexisync.aio.AsyncCoordinator) -> None:
    """Objects made by asyncio code are in the awaited snapshot, which equals the
    blocking one taken on the same AsyncCoordinator."""
    breaker = aio.breaker("llm")
    await breaker.trip(retry_after=45)
    lock = aio.lock("leader", ttl=20)
    assert await lock.acquire()
    stream = aio.stream("jobs")
    last = ""
    for n in range(4):
        last = await stream.append({"n": n})
    token = lock.fencing_token
    sem = aio.semaphore("gpu", 2)
    assert await sem.acquire()
    try:
        snap = _strict_json(await asnapshot(aio))
        blocking = snapshot(aio)
    finally:
        await lock.release()
        await sem.release()
    llm = _by_name(snap["breakers"])["llm"]
    assert llm["state"] == "open"
    assert 40 < llm["retry_after"] <= 45
    assert llm["open_period"] == pytest.approx(45)
    assert snap["locks"][0]["name"] == "leader"
    assert snap["locks"][0]["holder"] == _me()
    assert snap["locks"][0]["fencing_token"] == token
    assert snap["streams"] == [{"name": "jobs", "length": 4, "last_id": last}]
    assert snap["semaphores"] == [{"name": "gpu", "holders": 1, "waiters": 0}]
    for kind in ("streams", "semaphores"):
        assert blocking[kind] == snap[kind]
    assert [{**lk, "ttl_left": 0} for lk in blocking["locks"]] == \
        [{**lk, "ttl_left": 0} for lk in snap["locks"]]
    assert [b["name"] for b in blocking["breakers"]] == ["llm"]


# --- bounds, foreign data, errors ------------------------------------------------------


def test_each_kind_is_bounded_to_the_first_names(sync: flexisync.Coordinator) -> None:
    """With more objects than ``limit`` each list holds the first ``limit`` names in
    sorted order and says it was truncated (also when the SCAN's bounded buffer had to
    drop names on the way)."""
    names = [f"n{i:02d}" for i in range(9)]
    locks = [sync.lock(name, ttl=30) for name in names]
    for name, lock in zip(names, locks, strict=True):
        assert lock.acquire()
        sync.stream(name).append(1)
    for name in names[:3]:
        sync.breaker(name).trip()
    try:
        snap = snapshot(sync, limit=3)
        assert [row["name"] for row in snap["locks"]] == names[:3]
        assert [row["name"] for row in snap["streams"]] == names[:3]
        assert [row["name"] for row in snap["breakers"]] == names[:3]
        assert snap["truncated"] == {"breakers": False, "locks": True, "streams": True,
                                     "semaphores": False}
        assert snap["limit"] == 3
        whole = snapshot(sync, limit=9)
        assert len(whole["locks"]) == 9
        assert not whole["truncated"]["locks"]
    finally:
        for lock in locks:
            lock.release()
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ConfigError):
            snapshot(sync, limit=bad)  # type: ignore[arg-type]


def test_foreign_keys_do_not_break_the_snapshot(sync: flexisync.Coordinator,
                                                raw: redis.Redis) -> None:
    """Keys of another type where flexisync keeps a lock, stream or semaphore are left
    out; a breaker record holding foreign data is listed as malformed; the rest is
    read as usual."""
    ns = sync.namespace
    raw.hset(f"{ns}:lock:{{weird}}", "a", "1")
    raw.set(f"{ns}:stream:{{weird}}", "x")
    raw.set(f"{ns}:sem:{{weird}}", "x")
    raw.hset(f"{ns}:breaker:{{weird}}", mapping={"state": "sideways", "version": "zz"})
    raw.set(f"{ns}:breaker:{{str}}", "x")
    sync.breaker("ok").trip()
    sync.stream("fine").append(1)
    snap = _strict_json(snapshot(sync))
    assert snap["locks"] == []
    assert snap["semaphores"] == []
    assert [s["name"] for s in snap["streams"]] == ["fine"]
    breakers = _by_name(snap["breakers"])
    assert breakers["weird"]["state"] == "malformed"
    assert "field state is not a state" in breakers["weird"]["error"]
    assert breakers["str"]["state"] == "malformed"
    assert "string, not a hash" in breakers["str"]["error"]
    assert breakers["ok"]["state"] == "open"


def test_unreachable_redis_raises_backend_unavailable() -> None:
    """No redis-py exception escapes: an unreachable server is BackendUnavailable, and
    the message does not show the password."""
    port = embedded._free_port()
    quick = RetryPolicy(attempts=1, deadline=1.0)
    with flexisync.connect(f"redis://u:pw-4711@127.0.0.1:{port}/0", namespace="x",
                           retry=quick, socket_connect_timeout=0.5) as sync, \
            pytest.raises(BackendUnavailable) as caught:
        snapshot(sync)
    assert "pw-4711" not in str(caught.value)


# --- fleet call outcomes (flexisync.metrics.fleet_outcomes, interface 2) ---------------


def test_outcomes_come_from_the_fleet_reader(sync: flexisync.Coordinator,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Each readable breaker's ``outcomes`` is what ``fleet_outcomes(coordinator, name,
    buckets=...)`` returns; without the reader they are []."""
    sync.breaker("a").trip()
    sync.breaker("b").trip()
    calls: list[tuple[Any, str, int]] = []

    def fleet_outcomes(coordinator: Any, name: str, buckets: int = 30) -> list[dict[str, Any]]:
        calls.append((coordinator, name, buckets))
        return [{"t": 1000, "success": len(name), "failure": 1, "rejected": 2,
                 "ignored": 0, "probe": 0}]

    monkeypatch.setattr(_fleet, "_outcomes_reader", lambda: fleet_outcomes)
    snap = snapshot(sync, buckets=12)
    assert [b["outcomes"][0]["success"] for b in snap["breakers"]] == [1, 1]
    assert [(c[1], c[2]) for c in calls] == [("a", 12), ("b", 12)]
    assert all(c[0] is sync for c in calls)
    snapshot(sync._ctx)  # a bare Context is handed over as a coordinator-shaped handle
    assert calls[-1][0]._ctx is sync._ctx


def test_outcomes_reader_is_flexisync_metrics_when_present(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The adapter finds ``flexisync.metrics.fleet_outcomes``, and None without it."""
    monkeypatch.undo()  # the real adapter, not the autouse stub
    module = types.ModuleType("flexisync.metrics")
    monkeypatch.setitem(sys.modules, "flexisync.metrics", module)
    monkeypatch.setattr(flexisync, "metrics", module, raising=False)
    assert _fleet._outcomes_reader() is None

    def reader(coordinator: Any, name: str, buckets: int = 30) -> list[dict[str, Any]]:
        return []

    module.fleet_outcomes = reader  # type: ignore[attr-defined]
    assert _fleet._outcomes_reader() is reader


def test_real_fleet_outcomes_when_metrics_ships_them(
        sync: flexisync.Coordinator, monkeypatch: pytest.MonkeyPatch) -> None:
    """End to end with ``flexisync.metrics.fleet_outcomes`` (skipped until it exists):
    calls made here show up in the breaker's outcomes within a few seconds."""
    monkeypatch.undo()  # the real adapter, not the autouse stub
    metrics = pytest.importorskip("flexisync.metrics")
    if not hasattr(metrics, "fleet_outcomes"):
        pytest.skip("flexisync.metrics.fleet_outcomes not there yet")
    breaker = sync.breaker("counted", failure_threshold=50)
    for _ in range(3):
        breaker.call(lambda: None)
    for _ in range(2):
        with pytest.raises(Down):
            breaker.call(_fail)

    def counted() -> bool:
        row = _by_name(snapshot(sync)["breakers"]).get("counted")
        if row is None:
            return False
        sums = {k: sum(b.get(k, 0) for b in row["outcomes"]) for k in ("success", "failure")}
        return sums == {"success": 3, "failure": 2}

    wait_until(counted, timeout=10, interval=0.2, message="fleet outcomes in the snapshot")


async def test_real_fleet_outcomes_awaited(aio: flexisync.aio.AsyncCoordinator,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The same with asyncio calls and :func:`asnapshot` (skipped as above)."""
    monkeypatch.undo()
    metrics = pytest.importorskip("flexisync.metrics")
    if not hasattr(metrics, "afleet_outcomes"):
        pytest.skip("flexisync.metrics.afleet_outcomes not there yet")
    breaker = aio.breaker("counted", failure_threshold=50)

    async def ok() -> None:
        return None

    async def bad() -> None:
        raise Down("down")

    for _ in range(2):
        await breaker.acall(ok)
    with pytest.raises(Down):
        await breaker.acall(bad)
    deadline = asyncio.get_running_loop().time() + 10
    while True:
        row = _by_name((await asnapshot(aio))["breakers"]).get("counted")
        sums = {k: sum(b.get(k, 0) for b in row["outcomes"]) for k in ("success", "failure")
                } if row else None
        if sums == {"success": 2, "failure": 1}:
            break
        assert asyncio.get_running_loop().time() < deadline, sums
        await asyncio.sleep(0.2)


# --- Redis Cluster ---------------------------------------------------------------------


def _names_on_every_master(cluster: Cluster, per_master: int = 2) -> list[str]:
    """Object names whose hash tags land on each master (``per_master`` each)."""
    masters: dict[int, list[str]] = {}
    i = 0
    while len(masters) < len(cluster.masters()) or \
            any(len(v) < per_master for v in masters.values()):
        name = f"obj{i}"
        port = cluster.master_of_slot(int(key_slot(name.encode())))
        found = masters.setdefault(port, [])
        if len(found) < per_master:
            found.append(name)
        i += 1
    return sorted(n for names in masters.values() for n in names)


def test_snapshot_on_a_cluster(cluster: Cluster, cluster_url: str) -> None:
    """On a cluster the snapshot sees objects on every master, blocking and awaited."""
    names = _names_on_every_master(cluster)
    cluster_ns = f"fleet-{uuid.uuid4().hex[:8]}"
    with flexisync.connect(cluster_url, namespace=cluster_ns) as sync:
        locks = [sync.lock(name, ttl=30) for name in names]
        for name, lock in zip(names, locks, strict=True):
            assert lock.acquire()
            sync.breaker(name).trip(retry_after=30)
            sync.stream(name).append({"name": name})
        try:
            snap = _strict_json(snapshot(sync))

            async def awaited() -> dict[str, Any]:
                coordinator = flexisync.aio.connect(cluster_url, namespace=cluster_ns)
                try:
                    return await asnapshot(coordinator)
                finally:
                    await coordinator.aclose()

            from_async = asyncio.run(awaited())
        finally:
            for lock in locks:
                lock.release()
            delete_namespace(sync.client, cluster_ns)
    for result in (snap, from_async):
        assert [b["name"] for b in result["breakers"]] == names
        assert all(b["state"] == "open" and b["trips"] == 1 for b in result["breakers"])
        assert [lk["name"] for lk in result["locks"]] == names
        assert all(lk["holder"] == _me() for lk in result["locks"])
        assert [(s["name"], s["length"]) for s in result["streams"]] == \
            [(n, 1) for n in names]
        assert not any(result["truncated"].values())
    assert not math.isnan(snap["taken_at"])
