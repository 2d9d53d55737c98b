"""StateStore across real processes (fork and spawn)."""

from __future__ import annotations

from typing import Any

import pytest

import flexisync
from tests.helpers import join_all
from tests.workers import (
    inherited_coordinator_worker,
    state_incr_worker,
    state_reader_worker,
    state_update_worker,
)


def test_value_set_in_one_process_is_read_in_another(
        mp: Any, sync: flexisync.Coordinator, flexisync_url: str) -> None:
    """A write here is what a separate process (own connection) reads."""
    ready, out = mp.Event(), mp.Queue()
    reader = mp.Process(target=state_reader_worker,
                        args=(flexisync_url, sync.namespace, ready, out))
    reader.start()
    sync.state("shared").set("config", {"model": "gpt-4o", "max_tokens": 512})
    ready.set()
    assert out.get(timeout=30) == {"model": "gpt-4o", "max_tokens": 512}
    join_all([reader])


@pytest.mark.slow
def test_update_from_8_processes_loses_no_increment(
        mp: Any, sync: flexisync.Coordinator, flexisync_url: str) -> None:
    """8 processes x 250 update() increments end at exactly 2000."""
    barrier = mp.Barrier(8)
    workers = [mp.Process(target=state_update_worker,
                          args=(flexisync_url, sync.namespace, barrier, 250))
               for _ in range(8)]
    for w in workers:
        w.start()
    join_all(workers, timeout=120)
    assert sync.state("shared").get("counter") == 2000


@pytest.mark.slow
def test_incr_from_8_processes_loses_no_increment(
        mp: Any, sync: flexisync.Coordinator, flexisync_url: str) -> None:
    """8 processes x 250 incr() end at exactly 2000."""
    barrier = mp.Barrier(8)
    workers = [mp.Process(target=state_incr_worker,
                          args=(flexisync_url, sync.namespace, barrier, 250))
               for _ in range(8)]
    for w in workers:
        w.start()
    join_all(workers, timeout=120)
    assert sync.state("shared").get("hits") == 2000


def test_coordinator_created_before_fork_works_in_the_child(
        sync: flexisync.Coordinator) -> None:
    """A Coordinator used before fork() keeps working in the child with no user call."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    store = sync.state("shared")
    store.set("parent", "hello")  # opens a pooled connection before the fork
    out = ctx.Queue()
    child = ctx.Process(target=inherited_coordinator_worker, args=(sync, out))
    child.start()
    assert out.get(timeout=30) == ("hello", True)
    join_all([child])
    assert store.get("child")["pid"] == child.pid
    assert store.get("parent") == "hello"  # the parent's connection still works


def test_fork_missed_by_at_fork_hooks_is_caught_by_the_pid_check(
        sync: flexisync.Coordinator) -> None:
    """A fork the at-fork hooks never saw (uWSGI without fork hooks) is detected by pid.

    A real server cannot fork without running CPython's hooks here, so the test plays
    the child's view: the backend remembers another pid than the current one.
    """
    store = sync.state("shared")
    store.set("k", 1)
    assert sync._ctx.fork_generation == 0
    sync._ctx.backend.pid = -1  # "this process is not the one that created the Coordinator"
    assert store.get("k") == 1
    assert sync._ctx.fork_generation == 1  # the same reset as after an announced fork
    assert store.get("k") == 1
    assert sync._ctx.fork_generation == 1  # once per fork, not once per call
