"""CircuitBreaker shared by real processes (fork and spawn)."""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import select
import signal
from typing import Any

import pytest
import redis

import flexisync
from flexisync.breaker import breaker_info
from tests.helpers import join_all, wait_until
from tests.workers_breaker import (
    hammer_worker,
    inherited_breaker_worker,
    outcome_worker,
    probe_worker,
    retry_after_worker,
    stuck_probe_worker,
    transitions_worker,
)

WORKERS = 8


def _start(processes: list[Any]) -> list[Any]:
    for process in processes:
        process.start()
    return processes


@pytest.mark.slow
def test_eight_workers_hammering_open_the_breaker_exactly_once(
        mp: Any, sync: flexisync.Coordinator, flexisync_url: str, raw: redis.Redis) -> None:
    """8 processes failing at once make one open transition, and every one of them
    then rejects; the total failures counted stay close to the threshold."""
    policy = {"failure_threshold": 5, "recovery_timeout": 60}
    barrier, out = mp.Barrier(WORKERS), mp.Queue()
    opened: list[str] = []
    sync.breaker("provider").on_state_change(lambda _n, _o, new: opened.append(new))
    workers = _start([mp.Process(target=hammer_worker,
                                 args=(flexisync_url, sync.namespace, policy, barrier, out))
                      for _ in range(WORKERS)])
    results = [out.get(timeout=60) for _ in range(WORKERS)]
    join_all(workers)
    assert all(retry is not None for _, _, retry in results), \
        f"a worker never saw the breaker open: {results}"
    assert all(0 < retry <= 60 for _, _, retry in results)
    assert raw.hget(sync._ctx.keys.key("breaker", "provider"), "trips") == "1"
    wait_until(lambda: opened == ["open"], timeout=10, message="one 'open' transition")
    # Each worker made at most a few calls that ran after the threshold was crossed
    # (calls in flight when it opened); none kept calling the dead provider.
    assert sum(calls for _, calls, _ in results) < 5 + 8 * 3


@pytest.mark.slow
@pytest.mark.parametrize("max_calls", [1, 2])
def test_half_open_admits_exactly_max_probes_across_processes(
        mp: Any, sync: flexisync.Coordinator, flexisync_url: str, max_calls: int) -> None:
    """When the open period ends, 8 processes asking at once get exactly
    half_open_max_calls probes; the rest are rejected; the probes then close it."""
    policy = {"recovery_timeout": 0.2, "half_open_max_calls": max_calls,
              "success_threshold": max_calls, "probe_lease": 30}
    sync.breaker("provider", **policy).trip()
    barrier, out, release = mp.Barrier(WORKERS + 1), mp.Queue(), mp.Event()
    workers = _start([mp.Process(target=probe_worker, args=(
        flexisync_url, sync.namespace, policy, barrier, out, release))
        for _ in range(WORKERS)])
    wait_until(lambda: breaker_info(sync, "provider").retry_after == 0, timeout=10)
    barrier.wait(60)
    answers = [out.get(timeout=60) for _ in range(WORKERS)]
    release.set()
    join_all(workers)
    assert answers.count("admitted") == max_calls, answers
    assert answers.count("rejected") == WORKERS - max_calls
    assert breaker_info(sync, "provider").state == "closed"


@pytest.mark.slow
def test_probe_worker_killed_mid_probe_does_not_leave_the_breaker_stuck(
        mp: Any, sync: flexisync.Coordinator, flexisync_url: str) -> None:
    """A probe whose process is SIGKILLed frees its slot when its lease expires; the next
    probe is admitted and closes the breaker."""
    policy = {"recovery_timeout": 0.1, "probe_lease": 0.5}
    breaker = sync.breaker("provider", **policy)
    breaker.trip()
    wait_until(lambda: breaker.stats().retry_after == 0, timeout=10)
    out = mp.Queue()
    worker = _start([mp.Process(target=stuck_probe_worker,
                                args=(flexisync_url, sync.namespace, policy, out))])[0]
    assert out.get(timeout=60) == "admitted"
    os.kill(worker.pid, signal.SIGKILL)
    worker.join(10)
    with pytest.raises(flexisync.CircuitOpenError) as info:
        breaker.call(lambda: None)  # the dead probe still holds the slot...
    assert 0 < info.value.retry_after <= 0.5  # ...but only until its lease runs out

    def admitted() -> bool:
        try:
            breaker.call(lambda: None)
        except flexisync.CircuitOpenError:
            return False
        return True

    wait_until(admitted, timeout=10, message="a new probe admitted after the lease expired")
    assert breaker.state == "closed"


@pytest.mark.slow
def test_success_in_one_process_does_not_erase_failures_of_another_in_rate_window(
        mp: Any, sync: flexisync.Coordinator, flexisync_url: str) -> None:
    """failure_rate mode: 5 successes in process A and 5 failures in process B make 5/10
    failures counted fleet-wide, which opens at rate 0.5 (pybreaker's reset trap)."""
    policy = {"failure_rate": 0.5, "minimum_calls": 10, "window": 60}
    done = mp.Event()
    succeeding = _start([mp.Process(target=outcome_worker, args=(
        flexisync_url, sync.namespace, policy, 5, 0, done))])
    wait_until(lambda: breaker_info(sync, "provider", window=60).window_calls == 5,
               timeout=20, message="process A's successes flushed")
    failing = _start([mp.Process(target=outcome_worker, args=(
        flexisync_url, sync.namespace, policy, 0, 5, done))])
    wait_until(lambda: breaker_info(sync, "provider", window=60).state == "open",
               timeout=20, message="opened on 5 failures out of 10 calls")
    done.set()
    join_all(succeeding + failing)
    info = breaker_info(sync, "provider", window=60)
    assert (info.window_calls, info.window_failures) == (10, 5)


@pytest.mark.slow
def test_trip_with_retry_after_is_honoured_by_every_process(
        mp: Any, sync: flexisync.Coordinator, flexisync_url: str) -> None:
    """trip(retry_after=30) reaches 8 processes, each rejecting with retry_after <= 30;
    a later, shorter trip(1) does not shorten it."""
    ready, tripped, out = mp.Barrier(WORKERS + 1), mp.Event(), mp.Queue()
    workers = _start([mp.Process(target=retry_after_worker, args=(
        flexisync_url, sync.namespace, ready, tripped, out)) for _ in range(WORKERS)])
    ready.wait(60)
    breaker = sync.breaker("provider")
    breaker.trip(30)
    breaker.trip(1)
    tripped.set()
    seen = [out.get(timeout=60) for _ in range(WORKERS)]
    join_all(workers)
    assert all(value is not None and 20 < value <= 30 for value in seen), seen
    assert 20 < breaker_info(sync, "provider").retry_after <= 30


@pytest.mark.slow
def test_manual_transitions_and_callbacks_reach_every_process(
        mp: Any, sync: flexisync.Coordinator, flexisync_url: str) -> None:
    """force_open, disable and reset are mirrored by 8 processes, each of which gets every
    on_state_change callback, in order, and rejects calls while forced open."""
    ready, out = mp.Barrier(WORKERS + 1), mp.Queue()
    workers = _start([mp.Process(target=transitions_worker, args=(
        flexisync_url, sync.namespace, ready, out, 3)) for _ in range(WORKERS)])
    ready.wait(60)
    breaker = sync.breaker("provider")
    breaker.force_open()
    forced = [out.get(timeout=60) for _ in range(WORKERS)]
    assert all(kind == "forced" and rejected for kind, _, rejected in forced), forced
    breaker.disable()
    breaker.reset()
    reports = [out.get(timeout=60) for _ in range(WORKERS)]
    join_all(workers)
    for _, pid, seen in reports:
        assert seen == [("provider", "closed", "forced_open"),
                        ("provider", "forced_open", "disabled"),
                        ("provider", "disabled", "closed")], (pid, seen)


def test_breaker_used_before_fork_works_in_the_child(
        sync: flexisync.Coordinator) -> None:
    """A breaker mirrored in the parent before fork() re-subscribes in the child and
    mirrors a trip made afterwards."""
    ctx = multiprocessing.get_context("fork")
    breaker = sync.breaker("provider")
    assert breaker.call(lambda: "warm") == "warm"
    ready, tripped, out = ctx.Event(), ctx.Event(), ctx.Queue()
    child = ctx.Process(target=inherited_breaker_worker, args=(breaker, ready, tripped, out))
    child.start()
    assert out.get(timeout=30) == ("state", "closed")
    assert ready.wait(30)
    breaker.trip(20)
    tripped.set()
    kind, retry_after = out.get(timeout=30)
    join_all([child])
    assert kind == "rejected"
    assert retry_after is not None
    assert 10 < retry_after <= 20


def _fork_without_hooks() -> int:
    """fork() as uWSGI does it by default (from C): Python's at-fork hooks do not run.

    ``PyDLL`` keeps the GIL held across the call, so the child owns it.
    """
    return int(ctypes.PyDLL(None).fork())


def _child_calls(breaker: flexisync.CircuitBreaker, go: int, report: int) -> None:
    """In the hook-less child: once told the breaker was forced open, make 100 calls
    and report how many reached the provider."""
    code = 1
    try:
        os.read(go, 1)
        reached = 0

        def provider() -> None:
            nonlocal reached
            reached += 1

        for _ in range(100):
            with contextlib.suppress(flexisync.CircuitOpenError):
                breaker.call(provider)
        os.write(report, f"{reached}".encode())
        code = 0
    finally:
        os._exit(code)


def test_child_forked_without_fork_hooks_hears_transitions(
        sync: flexisync.Coordinator) -> None:
    """A child forked from C (no at-fork hooks, no user call) with a breaker on its
    zero-round-trip closed path notices the fork on its next call and mirrors the
    shared state: after another process forced the breaker open, none of 100 calls
    reaches the provider (it used to be 100 of 100)."""
    breaker = sync.breaker("provider")
    assert breaker.call(lambda: "warm") == "warm"
    assert breaker.stats().state == "closed"
    go_read, go_write = os.pipe()
    report_read, report_write = os.pipe()
    pid = _fork_without_hooks()
    if pid == 0:
        _child_calls(breaker, go_read, report_write)
    os.close(report_write)
    try:
        breaker.force_open()
        os.write(go_write, b"x")
        ready, _, _ = select.select([report_read], [], [], 30)
        assert ready, "the hook-less child did not report"
        reached = int(os.read(report_read, 16) or b"-1")
    finally:
        finished, _status = os.waitpid(pid, os.WNOHANG)
        if finished == 0:  # still running: it failed to report in time
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        for fd in (go_read, go_write, report_read):
            os.close(fd)
    assert reached == 0, f"{reached} of 100 calls reached the provider of a forced-open breaker"
