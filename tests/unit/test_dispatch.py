"""The bounded dispatch pool on its own (no Redis): order, fairness, bounds, close, fork."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from types import SimpleNamespace

import pytest
from structlog.testing import capture_logs

from flexisync._dispatch import (
    DEFAULT_CALLBACK_THREADS,
    DispatchPool,
    Lane,
    validate_callback_threads,
)
from flexisync.errors import ConfigError
from tests.helpers import wait_until

WAIT = 10.0


class FakeContext:
    """What a pool needs from a Context: hooks, a fork generation and a namespace."""

    def __init__(self) -> None:
        self.keys = SimpleNamespace(namespace="unit")
        self.fork_generation = 0
        self.fork_hooks: list[Callable[[], None]] = []
        self.close_hooks: list[Callable[[], None]] = []

    def on_fork(self, hook: Callable[[], None]) -> None:
        self.fork_hooks.append(hook)

    def on_close(self, hook: Callable[[], None]) -> None:
        self.close_hooks.append(hook)


@pytest.fixture
def ctx() -> FakeContext:
    return FakeContext()


@pytest.fixture
def pool(ctx: FakeContext) -> Iterator[DispatchPool]:
    made = DispatchPool(ctx)  # type: ignore[arg-type]
    yield made
    made.close()


def _workers(pool: DispatchPool) -> list[threading.Thread]:
    return list(pool._crew.threads)


def test_callback_threads_must_be_an_int_of_at_least_one() -> None:
    """0, negatives, floats, bools, strings and None are refused with a message naming
    the option; an int >= 1 is returned as is."""
    for bad in (0, -1, 1.5, True, False, "4", None):
        with pytest.raises(ConfigError, match="callback_threads"):
            validate_callback_threads(bad)
    assert validate_callback_threads(1) == 1
    assert validate_callback_threads(64) == 64


def test_widen_first_ask_replaces_the_default_then_the_largest_wins(
        pool: DispatchPool) -> None:
    """Before any ask the pool runs DEFAULT_CALLBACK_THREADS; the first ask sets the limit
    (even lower); later asks only raise it; a bad ask is refused and changes nothing."""
    assert pool.limit == DEFAULT_CALLBACK_THREADS == 4
    pool.widen(1)
    assert pool.limit == 1
    pool.widen(3)
    pool.widen(2)
    assert pool.limit == 3
    with pytest.raises(ConfigError, match="callback_threads"):
        pool.widen(0)
    assert pool.limit == 3


def test_no_thread_before_the_first_lane_then_one_named_daemon(pool: DispatchPool) -> None:
    """Making the pool starts nothing; the first lane starts one worker, a named daemon."""
    assert pool.threads == 0
    pool.lane(lambda: False, "a")
    workers = _workers(pool)
    assert len(workers) == 1
    assert workers[0].name == "flexisync-dispatch-1"
    assert workers[0].daemon
    assert workers[0].is_alive()


def test_a_lane_never_runs_on_two_workers_and_no_schedule_is_lost(
        pool: DispatchPool) -> None:
    """Schedules from many threads while the lane runs: it is never run concurrently
    with itself, and every item handed in before a schedule is processed."""
    pool.widen(4)
    lock = threading.Lock()
    pending: list[int] = []
    seen: list[int] = []
    running = [0]
    overlap = [0]

    def drain() -> bool:
        with lock:
            running[0] += 1
            overlap[0] = max(overlap[0], running[0])
            batch, pending[:] = list(pending), []
        seen.extend(batch)
        with lock:
            running[0] -= 1
        return False

    lane = pool.lane(drain, "one")
    # Busy lanes keep the other workers awake and looking for work.
    spinners = [pool.lane(lambda: True, f"spin{i}") for i in range(3)]
    for spinner in spinners:
        spinner.schedule()

    def feed(base: int) -> None:
        for i in range(2000):
            with lock:
                pending.append(base + i)
            lane.schedule()

    feeders = [threading.Thread(target=feed, args=(n * 10_000,)) for n in range(4)]
    for feeder in feeders:
        feeder.start()
    for feeder in feeders:
        feeder.join(WAIT)
    wait_until(lambda: len(seen) == 8000, timeout=WAIT, message="all items processed")
    for spinner in spinners:
        assert spinner.close()
    assert overlap[0] == 1, "the lane ran on two workers at once"
    for n in range(4):
        mine = [x for x in seen if n * 10_000 <= x < (n + 1) * 10_000]
        assert mine == sorted(mine), "one feeder's items came out of order"


def test_schedule_during_a_turn_runs_the_lane_once_more(pool: DispatchPool) -> None:
    """A lane scheduled while its drain runs (and then says it is done) gets another
    turn: the wake-up is not lost."""
    entered, release = threading.Event(), threading.Event()
    turns: list[int] = []
    second = threading.Event()

    def drain() -> bool:
        turns.append(len(turns))
        if len(turns) == 1:
            entered.set()
            assert release.wait(WAIT)
        else:
            second.set()
        return False

    lane = pool.lane(drain, "again")
    lane.schedule()
    assert entered.wait(WAIT)
    lane.schedule()  # while running
    lane.schedule()  # twice: still one more turn
    release.set()
    assert second.wait(WAIT), "the schedule made during the turn was lost"
    wait_until(lambda: not lane.running, timeout=WAIT)
    assert turns == [0, 1]


def test_a_busy_lane_yields_its_worker_to_waiting_lanes(pool: DispatchPool) -> None:
    """With one worker, a lane that always has more goes back to the end of the line
    after each turn, so another lane scheduled meanwhile still runs."""
    pool.widen(1)
    busy_turns = [0]
    other = threading.Event()

    def busy() -> bool:
        busy_turns[0] += 1
        return True  # never runs out of work

    hog = pool.lane(busy, "hog")
    hog.schedule()
    wait_until(lambda: busy_turns[0] >= 3, timeout=WAIT, message="the hog ran")
    pool.lane(lambda: other.set() or False, "other").schedule()
    assert other.wait(WAIT), "a lane that always has more starved the others"
    assert hog.close()
    assert pool.threads == 1


def test_workers_are_bounded_and_blocked_lanes_hold_up_the_rest(
        pool: DispatchPool) -> None:
    """Six blocked lanes on a pool of three: exactly three run, three threads exist; the
    others run once the blocked ones return."""
    pool.widen(3)
    release = threading.Event()
    started: list[str] = []
    lock = threading.Lock()
    done: list[str] = []

    def blocking(name: str) -> Callable[[], bool]:
        def drain() -> bool:
            with lock:
                started.append(name)
            assert release.wait(WAIT)
            with lock:
                done.append(name)
            return False
        return drain

    lanes = [pool.lane(blocking(f"l{i}"), f"l{i}") for i in range(6)]
    for lane in lanes:
        lane.schedule()
    wait_until(lambda: len(started) == 3, timeout=WAIT, message="three lanes running")
    assert pool.threads == 3
    assert sum(lane.running for lane in lanes) == 3
    assert len(started) == 3, "more lanes ran than the pool has workers"
    release.set()
    wait_until(lambda: len(done) == 6, timeout=WAIT, message="every lane ran")
    assert pool.threads == 3
    assert {w.name for w in _workers(pool)} == {"flexisync-dispatch-1",
                                               "flexisync-dispatch-2",
                                               "flexisync-dispatch-3"}


def test_lane_close_waits_for_the_running_turn_then_it_never_runs_again(
        pool: DispatchPool) -> None:
    """close() from another thread returns only after the running turn ended; later
    schedules are ignored."""
    entered, release = threading.Event(), threading.Event()
    turns = [0]

    def drain() -> bool:
        turns[0] += 1
        entered.set()
        assert release.wait(WAIT)
        return True  # would have more

    lane = pool.lane(drain, "closing")
    lane.schedule()
    assert entered.wait(WAIT)
    result: list[bool] = []
    closer = threading.Thread(target=lambda: result.append(lane.close(WAIT)))
    closer.start()
    wait_until(lambda: lane._closed, timeout=WAIT)
    assert not result, "close returned while the turn was still running"
    release.set()
    closer.join(WAIT)
    assert result == [True]
    assert not lane.running
    lane.schedule()
    probe = threading.Event()
    pool.lane(lambda: probe.set() or False, "probe").schedule()
    assert probe.wait(WAIT)
    assert turns[0] == 1, "a closed lane ran again"


def test_lane_close_gives_up_after_its_timeout(pool: DispatchPool) -> None:
    """A turn that does not end makes close() return False after the timeout."""
    entered, release = threading.Event(), threading.Event()

    def drain() -> bool:
        entered.set()
        release.wait(WAIT)
        return False

    lane = pool.lane(drain, "stuck")
    lane.schedule()
    assert entered.wait(WAIT)
    try:
        assert lane.close(0.05) is False
    finally:
        release.set()
    wait_until(lambda: not lane.running, timeout=WAIT)


def test_lane_closed_from_its_own_turn_does_not_wait(pool: DispatchPool) -> None:
    """close() called inside drain returns at once (True) and the lane stops."""
    holder: list[Lane] = []
    result: list[bool] = []
    turns = [0]

    def drain() -> bool:
        turns[0] += 1
        result.append(holder[0].close(WAIT))
        return True

    lane = pool.lane(drain, "self")
    holder.append(lane)
    lane.schedule()
    wait_until(lambda: result, timeout=WAIT)
    assert result == [True]
    wait_until(lambda: not lane.running, timeout=WAIT)
    lane.schedule()
    probe = threading.Event()
    pool.lane(lambda: probe.set() or False, "probe").schedule()
    assert probe.wait(WAIT)
    assert turns[0] == 1


def test_a_raising_drain_is_logged_and_the_worker_keeps_serving(ctx: FakeContext) -> None:
    """An exception escaping drain is logged (dispatch.drain_failed) and does not kill
    the worker: other lanes still run."""
    with capture_logs() as logs:
        pool = DispatchPool(ctx)  # type: ignore[arg-type]
        try:
            pool.widen(1)
            failing = [0]

            def broken() -> bool:
                failing[0] += 1
                if failing[0] == 1:
                    raise RuntimeError("broken drain")
                return False

            pool.lane(broken, "broken").schedule()
            wait_until(lambda: failing[0] >= 2, timeout=WAIT,
                       message="the failed lane ran again")
            ok = threading.Event()
            pool.lane(lambda: ok.set() or False, "ok").schedule()
            assert ok.wait(WAIT)
            assert all(w.is_alive() for w in _workers(pool))
        finally:
            pool.close()
    failed = [e for e in logs if e["event"] == "dispatch.drain_failed"]
    assert len(failed) == 1
    assert failed[0]["lane"] == "broken"


def test_close_stops_and_joins_the_workers(ctx: FakeContext) -> None:
    """The Context's close hook stops every worker; nothing runs after it."""
    pool = DispatchPool(ctx)  # type: ignore[arg-type]
    pool.widen(2)
    release = threading.Event()
    lanes = [pool.lane(lambda: release.wait(WAIT) and False, f"l{i}") for i in range(2)]
    for lane in lanes:
        lane.schedule()
    wait_until(lambda: sum(lane.running for lane in lanes) == 2, timeout=WAIT)
    workers = _workers(pool)
    assert len(workers) == 2
    release.set()
    for hook in reversed(ctx.close_hooks):
        hook()
    assert not any(w.is_alive() for w in workers)
    assert pool.threads == 0
    ran = threading.Event()
    late = pool.lane(lambda: ran.set() or False, "late")
    late.schedule()
    assert pool.threads == 0, "a closed pool started a thread"
    assert not ran.is_set()


def test_a_new_fork_generation_gets_a_fresh_crew(ctx: FakeContext, pool: DispatchPool) -> None:
    """When the Context's fork generation moves (a fork was detected) the pool starts
    over: no inherited workers or line; lanes of the old generation are ignored."""
    old_ran = [0]
    old = pool.lane(lambda: old_ran.__setitem__(0, old_ran[0] + 1) or False, "old")
    old_crew = pool._crew
    ctx.fork_generation += 1
    for hook in ctx.fork_hooks:
        hook()
    assert pool._crew is not old_crew
    assert pool.threads == 0
    ran = threading.Event()
    pool.lane(lambda: ran.set() or False, "new").schedule()
    assert ran.wait(WAIT)
    old.schedule()  # a lane of the previous generation: its owner rebuilds it
    probe = threading.Event()
    pool.lane(lambda: probe.set() or False, "probe").schedule()
    assert probe.wait(WAIT)
    assert old_ran[0] == 0
    old_crew.stopping = True  # let the previous generation's worker end (same process)
    with old_crew.lock:
        old_crew.wake.notify_all()
