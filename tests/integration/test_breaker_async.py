"""CircuitBreaker under asyncio cancellation: a cancelled call never keeps a probe lease.

Each test puts the breaker in half-open, starts ``acall`` as a task and cancels it at
one ``await`` of the async path: while admission runs in its worker thread (before and
after the probe script ran), while the protected coroutine runs, and while the probe's
outcome is being settled. The worker thread is held at the exact point with a gate
around the hub's script runner, so the cancel lands there every time.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

import flexisync
from flexisync._breaker_hub import hub_of
from tests.helpers import wait_until


def half_open(sync: flexisync.Coordinator) -> flexisync.CircuitBreaker:
    """A breaker whose open period is over: the next call is admitted as the probe."""
    breaker = sync.breaker("provider", probe_lease=60)
    assert breaker.state == "closed"
    breaker.trip(0.01)
    wait_until(lambda: breaker.stats().retry_after == 0, message="open period over")
    return breaker


class Gate:
    """Holds the hub's ``run(<script>)`` in its worker thread, before or after Redis."""

    def __init__(self, script: str, *, after: bool) -> None:
        self.script = script
        self.after = after
        self.reached = threading.Event()
        self.go = threading.Event()

    def install(self, sync: flexisync.Coordinator, monkeypatch: pytest.MonkeyPatch) -> None:
        hub = hub_of(sync)
        real: Callable[..., list[Any]] = hub.run

        def run(name: str, keys: Any, args: Any, **options: Any) -> list[Any]:
            if name != self.script:
                return real(name, keys, args, **options)
            if not self.after:
                self.reached.set()
                self.go.wait(10)
            reply = real(name, keys, args, **options)
            if self.after:
                self.reached.set()
                self.go.wait(10)
            return reply

        monkeypatch.setattr(hub, "run", run)


def probes_in_flight(breaker: flexisync.CircuitBreaker) -> int:
    return breaker.info().probes_in_flight


def assert_lease_released(breaker: flexisync.CircuitBreaker) -> None:
    """No lease is left behind, and the fleet may probe again at once."""
    wait_until(lambda: probes_in_flight(breaker) == 0, timeout=5,
               message="the cancelled call's probe lease released")
    assert breaker.call(lambda: "probe") == "probe"
    assert breaker.info().state == "closed"


@pytest.mark.parametrize("after", [False, True], ids=["before_script", "after_script"])
def test_cancel_during_probe_admission_releases_the_lease(
        sync: flexisync.Coordinator, monkeypatch: pytest.MonkeyPatch, after: bool) -> None:
    """A task cancelled while its admission runs in the worker thread (the probe
    script about to run, or already granted the lease) leaves no lease held: the
    fleet is not rejected until ``probe_lease`` (60 s here) runs out."""
    breaker = half_open(sync)
    gate = Gate("probe", after=after)
    gate.install(sync, monkeypatch)
    ran: list[str] = []

    async def provider() -> str:
        ran.append("ran")
        return "ok"

    async def main() -> None:
        task = asyncio.create_task(breaker.acall(provider))
        assert await asyncio.to_thread(gate.reached.wait, 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        gate.go.set()

    asyncio.run(main())
    monkeypatch.undo()
    assert ran == []
    assert_lease_released(breaker)


def test_cancel_while_the_probe_runs_releases_the_lease(
        sync: flexisync.Coordinator) -> None:
    """A probe coroutine cancelled mid-call settles as neutral: its lease is freed."""
    breaker = half_open(sync)

    async def main() -> None:
        started = asyncio.Event()

        async def provider() -> None:
            started.set()
            await asyncio.sleep(3600)

        task = asyncio.create_task(breaker.acall(provider))
        await started.wait()
        assert probes_in_flight(breaker) == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert_lease_released(breaker)


def test_cancel_while_the_probe_outcome_waits_for_a_thread_still_settles_it(
        sync: flexisync.Coordinator) -> None:
    """A task cancelled while the report of its successful probe waits for a free
    worker thread still has it reported (a cancelled executor job would be skipped):
    the breaker closes for the fleet and no lease is left."""
    breaker = half_open(sync)
    hold = threading.Event()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.set_default_executor(ThreadPoolExecutor(max_workers=1))
        reported = asyncio.Event()

        async def provider() -> str:
            loop.run_in_executor(None, hold.wait, 10)  # the only worker is now busy
            reported.set()
            return "ok"

        task = asyncio.create_task(breaker.acall(provider))
        await reported.wait()  # the task now awaits the report, queued for a thread
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        hold.set()

    asyncio.run(main())
    wait_until(lambda: breaker.info().state == "closed", timeout=5,
               message="the probe's success reported despite the cancel")
    assert probes_in_flight(breaker) == 0


def test_cancel_during_async_with_admission_releases_the_lease(
        sync: flexisync.Coordinator, monkeypatch: pytest.MonkeyPatch) -> None:
    """``async with breaker`` cancelled on entry, after the lease was granted, frees it."""
    breaker = half_open(sync)
    gate = Gate("probe", after=True)
    gate.install(sync, monkeypatch)

    async def enter() -> None:
        async with breaker:
            pytest.fail("the body must not run")

    async def main() -> None:
        task = asyncio.create_task(enter())
        assert await asyncio.to_thread(gate.reached.wait, 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        gate.go.set()

    asyncio.run(main())
    monkeypatch.undo()
    assert_lease_released(breaker)
