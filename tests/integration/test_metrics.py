"""flexisync.metrics: every counter moves as the primitive is used (blocking shell),
transitions are counted once, the fleet's outcome stats add up across processes, and
an idle process writes nothing."""

from __future__ import annotations

import contextlib
import gc
import threading
import uuid
from typing import Any

import pytest
import redis

import flexisync
from flexisync import metrics
from flexisync._core.lock_runtime import runtime
from flexisync.breaker._hub import hub_of
from flexisync.embedded import EmbeddedRedis
from tests.helpers import join_all, wait_until
from tests.workers_metrics import caller_worker, opener_worker


class Boom(RuntimeError):
    pass


def value(namespace: str, name: str, **labels: str) -> Any:
    """The sample ``name`` of ``namespace`` with ``labels`` (None when absent)."""
    for sample in metrics.collect():
        if sample.name == name and sample.labels.get("namespace") == namespace \
                and all(sample.labels.get(k) == v for k, v in labels.items()):
            return sample.value
    return None


def calls(namespace: str, outcome: str, breaker: str = "b") -> Any:
    return value(namespace, "flexisync_breaker_calls_total", breaker=breaker,
                 outcome=outcome)


def _boom() -> None:
    raise Boom


def _key_error() -> None:
    raise KeyError("not counted")


def test_every_sample_is_in_the_catalogue_with_its_labels(
        sync: flexisync.Coordinator, namespace: str) -> None:
    sync.breaker("b").call(lambda: 1)
    with sync.lock("l", ttl=5):
        pass
    sync.events.publish("t", 1)
    sync.stream("s").append(1)
    assert sync.semaphore("m", 2).acquire()
    sync.rate_limiter("r", 10).acquire()
    mine = [s for s in metrics.collect() if s.labels.get("namespace") == namespace]
    assert {s.name for s in mine} >= {
        "flexisync_breaker_state", "flexisync_breaker_calls_total",
        "flexisync_lock_acquisitions_total", "flexisync_lock_wait_seconds",
        "flexisync_events_published_total", "flexisync_stream_appends_total",
        "flexisync_semaphore_admissions_total", "flexisync_rate_limiter_admissions_total"}
    for sample in mine:
        kind, _help, labels = metrics.CATALOGUE[sample.name]
        assert sample.kind == kind
        assert tuple(sample.labels) == labels, sample
        if kind == "histogram":
            assert isinstance(sample.value, metrics.Histogram)
            assert sample.value.buckets[-1] == (float("inf"), sample.value.count)


def test_breaker_outcomes_transitions_state_and_open_time(
        sync: flexisync.Coordinator, namespace: str) -> None:
    breaker = sync.breaker("b", failure_threshold=100, ignore=(KeyError,))
    for _ in range(3):
        breaker.call(lambda: None)
    with pytest.raises(Boom):
        breaker.call(_boom)
    with pytest.raises(KeyError):
        breaker.call(_key_error)
    assert [calls(namespace, o) for o in ("success", "failure", "ignored", "rejected")] \
        == [3, 1, 1, 0]
    assert value(namespace, "flexisync_breaker_state", breaker="b", state="closed") == 1
    breaker.trip(retry_after=0.2)
    with pytest.raises(flexisync.CircuitOpenError):
        breaker.call(lambda: None)
    assert calls(namespace, "rejected") == 1
    assert value(namespace, "flexisync_breaker_transitions_total", breaker="b",
                 to="open") == 1
    assert value(namespace, "flexisync_breaker_state", breaker="b", state="open") == 1
    assert value(namespace, "flexisync_breaker_state", breaker="b", state="closed") == 0

    def probe() -> bool:  # the first call after the open period is the probe
        with contextlib.suppress(flexisync.CircuitOpenError):
            breaker.call(lambda: None)
            return True
        return False

    wait_until(probe, timeout=5, message="a probe admitted")
    assert calls(namespace, "probe") == 1
    assert value(namespace, "flexisync_breaker_probes_total", breaker="b",
                 result="success") == 1
    assert calls(namespace, "success") == 3  # a probe is not also a success
    assert value(namespace, "flexisync_breaker_transitions_total", breaker="b",
                 to="half_open") == 1
    assert value(namespace, "flexisync_breaker_transitions_total", breaker="b",
                 to="closed") == 1
    open_for = value(namespace, "flexisync_breaker_open_seconds_total", breaker="b")
    assert 0.15 < open_for < 5.0


def test_a_transition_is_counted_once_across_two_contexts(
        sync: flexisync.Coordinator, namespace: str, flexisync_url: str) -> None:
    other = flexisync.connect(client=redis.Redis.from_url(flexisync_url),
                              namespace=namespace)
    try:
        assert other._ctx is not sync._ctx
        mirror = other.breaker("b")
        assert mirror.state == "closed"  # subscribed: it will mirror the trip
        sync.breaker("b").trip()
        wait_until(lambda: mirror.state == "open", message="the other Context mirrors it")
        assert value(namespace, "flexisync_breaker_transitions_total", breaker="b",
                     to="open") == 1
        assert value(namespace, "flexisync_breaker_state", breaker="b", state="open") == 1
    finally:
        other.close()


def test_counts_survive_the_core_being_collected(
        sync: flexisync.Coordinator, namespace: str) -> None:
    hub = hub_of(sync._ctx)
    breaker = sync.breaker("gone", failure_threshold=100)
    breaker.call(lambda: None)
    with pytest.raises(Boom):
        breaker.call(_boom)
    del breaker
    with hub.instances_lock:
        hub._recent.clear()  # as if 128 other breakers had been asked for since
    gc.collect()
    assert not [c for c in hub.instances.values() if c.name == "gone"]
    assert calls(namespace, "success", "gone") == 1
    assert calls(namespace, "failure", "gone") == 1


def test_lock_acquisitions_waits_timeouts_and_lost_leases(
        sync: flexisync.Coordinator, namespace: str) -> None:
    holder = sync.lock("l", ttl=5)
    assert holder.acquire()
    assert not sync.lock("l", ttl=5).acquire(blocking=False)
    waiter = sync.lock("l", ttl=5)
    got = threading.Event()

    def wait() -> None:
        if waiter.acquire(timeout=10):
            got.set()

    thread = threading.Thread(target=wait)
    thread.start()
    wait_until(lambda: runtime(sync._ctx).waits, message="the waiter is waiting")
    holder.release()
    thread.join(10)
    assert got.is_set()
    waiter.release()
    assert value(namespace, "flexisync_lock_acquisitions_total", lock="l") == 2
    assert value(namespace, "flexisync_lock_timeouts_total", lock="l") == 1
    hist = value(namespace, "flexisync_lock_wait_seconds", lock="l")
    assert hist.count == 2
    assert hist.sum > 0
    short = sync.lock("short", ttl=0.05)
    assert short.acquire()
    wait_until(lambda: short.lost, message="the lease ran past its ttl")
    assert value(namespace, "flexisync_lock_lost_total", lock="short") == 1


def test_events_published_delivered_dropped_invalid(
        sync: flexisync.Coordinator, namespace: str, raw: redis.Redis) -> None:
    sub = sync.events.subscribe("t", maxsize=2)
    for i in range(4):
        sync.events.publish("t", i)
    raw.publish(f"{namespace}:events:t", b"\xff not json")
    wait_until(lambda: sub.stats.received == 5, message="all five arrived")
    assert value(namespace, "flexisync_events_published_total", topic="t") == 4
    assert value(namespace, "flexisync_events_dropped_total", topic="t") == 3
    assert value(namespace, "flexisync_events_queued", topic="t") == 2
    event = sub.get(timeout=1)
    assert event is not None
    assert event.data == 3
    assert sub.get(timeout=0) is None  # the invalid one: counted and skipped
    assert value(namespace, "flexisync_events_invalid_total", topic="t") == 1
    assert value(namespace, "flexisync_events_delivered_total", topic="t") == 1
    sub.close()  # closed: the totals stay (folded into the topic's record)
    assert value(namespace, "flexisync_events_delivered_total", topic="t") == 1
    assert value(namespace, "flexisync_events_dropped_total", topic="t") == 3
    assert value(namespace, "flexisync_events_invalid_total", topic="t") == 1
    assert value(namespace, "flexisync_events_received_total", topic="t") == 5


def test_stream_appends_and_follower_lag(sync: flexisync.Coordinator,
                                          namespace: str) -> None:
    stream = sync.stream("s")
    stream.append({"n": 0})
    follower = stream.follow(timeout=10)
    assert next(follower).data == {"n": 0}  # replayed; now following live
    for n in range(1, 6):
        stream.append({"n": n})
    assert value(namespace, "flexisync_stream_appends_total", stream="s") == 6
    wait_until(lambda: value(namespace, "flexisync_stream_follower_lag", stream="s") == 5,
               message="five entries fetched and not yet taken")
    assert value(namespace, "flexisync_stream_followers", stream="s") == 1
    assert value(namespace, "flexisync_stream_follower_lag_seconds", stream="s") >= 0
    assert [next(follower).data["n"] for _ in range(5)] == [1, 2, 3, 4, 5]
    assert value(namespace, "flexisync_stream_follower_lag", stream="s") == 0
    follower.close()


def test_semaphore_and_rate_limiter_admissions_waits_refusals(
        sync: flexisync.Coordinator, namespace: str) -> None:
    sem = sync.semaphore("m", 1)
    assert sem.acquire()
    assert not sync.semaphore("m", 1).acquire(blocking=False)
    sem.release()
    assert value(namespace, "flexisync_semaphore_admissions_total", semaphore="m") == 1
    assert value(namespace, "flexisync_semaphore_timeouts_total", semaphore="m") == 1
    assert value(namespace, "flexisync_semaphore_wait_seconds", semaphore="m").count == 1
    limiter = sync.rate_limiter("r", 2, per=1.0, burst=1)
    limiter.acquire()
    assert limiter.try_acquire() is None
    limiter.acquire(timeout=5)  # waits ~0.5 s for the next unit
    assert value(namespace, "flexisync_rate_limiter_admissions_total", limiter="r") == 2
    assert value(namespace, "flexisync_rate_limiter_rejections_total", limiter="r") == 1
    hist = value(namespace, "flexisync_rate_limiter_wait_seconds", limiter="r")
    assert hist.count == 2
    assert 0.2 < hist.sum < 1.0


def test_on_reject_hooks_run_only_on_rejection(sync: flexisync.Coordinator,
                                               namespace: str) -> None:
    seen: list[tuple[str, str, float]] = []
    metrics.on_reject.append(lambda *args: seen.append(args))
    try:
        breaker = sync.breaker("b")
        breaker.call(lambda: None)
        assert seen == []
        breaker.trip(retry_after=30)
        with pytest.raises(flexisync.CircuitOpenError):
            breaker.call(lambda: None)
        assert len(seen) == 1
        assert seen[0][:2] == (namespace, "b")
        assert 0 < seen[0][2] <= 30
    finally:
        metrics.on_reject.clear()


# --- fleet outcome stats ----------------------------------------------------------------


def test_fleet_outcomes_report_this_process_calls(
        sync: flexisync.Coordinator, raw: redis.Redis, namespace: str) -> None:
    breaker = sync.breaker("b", failure_threshold=100)
    for _ in range(5):
        breaker.call(lambda: None)
    for _ in range(2):
        with pytest.raises(Boom):
            breaker.call(_boom)

    def totals() -> dict[str, int]:
        rows = metrics.fleet_outcomes(sync, "b")
        return {k: sum(r[k] for r in rows) for k in ("success", "failure", "rejected")}

    wait_until(lambda: totals() == {"success": 5, "failure": 2, "rejected": 0},
               message="the flusher added this process's calls")
    rows = metrics.fleet_outcomes(sync, "b", buckets=5)
    assert len(rows) == 5
    assert [r["t"] for r in rows] == sorted(r["t"] for r in rows)
    assert all(r["t"] % 10 == 0 for r in rows)
    key = f"{namespace}:stats:{{breaker:b}}"
    assert 0 < raw.pttl(key) <= 900_000
    with pytest.raises(flexisync.ConfigError):
        metrics.fleet_outcomes(sync, "b", buckets=0)


def test_fleet_outcomes_sum_the_calls_of_two_processes(
        mp: Any, sync: flexisync.Coordinator, flexisync_url: str, namespace: str) -> None:
    workers = [mp.Process(target=caller_worker, args=(flexisync_url, namespace, 7, 2)),
               mp.Process(target=caller_worker, args=(flexisync_url, namespace, 4, 1))]
    for worker in workers:
        worker.start()
    join_all(workers, timeout=60)
    rows = metrics.fleet_outcomes(sync, "provider")
    assert sum(r["success"] for r in rows) == 11
    assert sum(r["failure"] for r in rows) == 3


def test_an_idle_process_writes_no_stats(own_server: EmbeddedRedis) -> None:
    url = f"redis://127.0.0.1:{own_server.port}/0"
    direct = redis.Redis(port=own_server.port)

    def writes() -> int:
        stats = direct.info("commandstats")
        return sum(int(stats.get(f"cmdstat_{c}", {}).get("calls", 0))
                   for c in ("hincrby", "hlen"))  # the stats pipeline's commands

    with flexisync.connect(url, namespace="idle") as sync:
        breaker = sync.breaker("b")
        breaker.call(lambda: None)
        hub = hub_of(sync._ctx)
        flushes = []
        real = hub.flush_stats

        def counting() -> bool:
            flushes.append(1)
            return real()

        hub.flush_stats = counting  # type: ignore[method-assign]
        wait_until(lambda: writes() >= 1, message="the one call was reported")
        before = writes()
        seen = len(flushes)
        wait_until(lambda: len(flushes) >= seen + 3, timeout=10,
                   message="three more flush rounds")
        assert writes() == before  # idle: the flush rounds wrote nothing
        breaker.call(lambda: None)
        wait_until(lambda: writes() > before, message="a new call is reported")
    direct.close()


# --- logs (issue item 5) ------------------------------------------------------------------


@pytest.mark.slow
def test_exactly_one_opened_warning_across_the_fleet(
        mp: Any, flexisync_url: str, namespace: str) -> None:
    workers = 4
    barrier = mp.Barrier(workers)
    out = mp.Queue()
    processes = [mp.Process(target=opener_worker,
                            args=(flexisync_url, namespace, workers, barrier, out))
                 for _ in range(workers)]
    for process in processes:
        process.start()
    reports = [out.get(timeout=60) for _ in range(workers)]
    join_all(processes, timeout=30)
    assert [state for state, _, _ in reports] == ["open"] * workers
    warnings = [(event, level) for _, _, lines in reports for event, level in lines
                if level == "warning"]
    assert warnings == [("breaker.opened", "warning")]
    assert sum(t for _, t, _ in reports) == 1  # the transition counted once
    makers = [lines for _, _, lines in reports if ("breaker.opened", "warning") in lines]
    mirrors = [lines for _, _, lines in reports if lines not in makers]
    assert len(mirrors) == workers - 1
    for lines in mirrors:
        assert ("breaker.mirrored", "debug") in lines


def test_fleet_outcomes_on_redis_cluster(cluster_url: str) -> None:
    """Several breakers (several slots) in one stats pipeline, and the reader."""
    with flexisync.connect(cluster_url, namespace=f"m{uuid.uuid4().hex[:8]}") as sync:
        names = [f"p{i}" for i in range(6)]
        for i, name in enumerate(names):
            breaker = sync.breaker(name, failure_threshold=100)
            for _ in range(i + 1):
                breaker.call(lambda: None)

        def reported() -> bool:
            return all(sum(r["success"] for r in metrics.fleet_outcomes(sync, name)) == i + 1
                       for i, name in enumerate(names))

        wait_until(reported, timeout=10, message="every breaker's calls reported")
