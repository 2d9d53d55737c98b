"""AsyncCircuitBreaker: cancellation at each await, one mirror shared with sync code,
several event loops in a row, fork.

Cancellation tests put the breaker in half-open and cancel a call at one ``await`` of
the asyncio path: before the probe script is sent, while it is in flight (the
FaultProxy stalls the network), after the lease was granted, while the protected
coroutine runs, and while the probe's outcome is reported. A :class:`Gate` around the
Context's async ``run_script`` says when the call reached the script (and can hold it
there); nothing sleeps on a guess. Each test then checks that no probe lease is left:
the fleet may probe again at once (``probe_lease`` is 60 s, so a leak would show).
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import pytest
import redis

import flexisync
import flexisync.aio
from flexisync._connection import load_script
from flexisync._core.plan import Signal, Wait
from flexisync.aio.breaker import AsyncCircuitBreaker
from tests.aio_helpers import until


class Gate:
    """Wraps the async backend's ``run_script`` for one script: says when a call
    reached it (``reached``) and holds that call (before sending or after the reply)
    until it is cancelled."""

    def __init__(self, aio: flexisync.aio.AsyncCoordinator, script: str, *,
                 after: bool, monkeypatch: pytest.MonkeyPatch) -> None:
        self.reached = asyncio.Event()
        self.replied = False
        backend = aio._ctx.abackend
        real = backend.run_script

        async def run_script(operation: str, name: str, *args: Any, **kwargs: Any) -> Any:
            if name != f"breaker_{script}":
                return await real(operation, name, *args, **kwargs)
            if not after:
                self.reached.set()
                await asyncio.Future()  # held until cancelled; never sent
            reply = await real(operation, name, *args, **kwargs)
            self.replied = True
            self.reached.set()
            await asyncio.Future()  # the reply arrived; held until cancelled
            return reply

        monkeypatch.setattr(backend, "run_script", run_script)


async def half_open(aio: flexisync.aio.AsyncCoordinator) -> AsyncCircuitBreaker:
    """A breaker whose open period is over: the next call is admitted as the probe."""
    breaker = aio.breaker("provider", probe_lease=60)
    await breaker.prepare()
    await breaker.trip(0.01)
    await until(lambda: breaker.stats().retry_after == 0, "open period over")
    return breaker


async def assert_lease_released(aio: flexisync.aio.AsyncCoordinator,
                                breaker: AsyncCircuitBreaker) -> None:
    """No lease is left behind, and the fleet may probe again at once."""
    assert await asyncio.to_thread(aio._ctx.settle, 10.0)  # janitor work done
    assert (await breaker.info()).probes_in_flight == 0

    async def probe() -> str:
        return "probe"

    assert await breaker.acall(probe) == "probe"
    assert (await breaker.info()).state == "closed"


async def cancel(task: asyncio.Task[Any]) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


@pytest.mark.parametrize("after", [False, True], ids=["before_send", "after_reply"])
async def test_cancel_during_probe_admission_releases_the_lease(
        aio: flexisync.aio.AsyncCoordinator, monkeypatch: pytest.MonkeyPatch,
        after: bool) -> None:
    """Cancelled while the probe script is about to be sent, or after it granted the
    lease: the call does not run and no lease is left."""
    breaker = await half_open(aio)
    gate = Gate(aio, "probe", after=after, monkeypatch=monkeypatch)
    ran: list[str] = []

    async def provider() -> str:
        ran.append("ran")
        return "ok"

    task = asyncio.create_task(breaker.acall(provider))
    await gate.reached.wait()
    if after:
        assert (await breaker.info()).probes_in_flight == 1  # the lease was taken
    await cancel(task)
    monkeypatch.undo()
    assert ran == []
    await assert_lease_released(aio, breaker)


async def test_cancel_while_the_probe_script_is_in_flight(
        own_server: Any, namespace: str) -> None:
    """The probe script was sent and Redis has not run it yet (the server is paused)
    when the caller is cancelled: it takes its lease after the cancellation, and the
    compensation, which the janitor runs after it, frees that lease."""
    retry = flexisync.RetryPolicy(initial=0.01, maximum=0.05, deadline=30.0)
    raw = redis.Redis(port=own_server.port)
    raw.script_load(load_script("breaker_probe"))  # EVALSHA is the one command in flight
    async with flexisync.aio.connect(own_server.url, namespace=namespace,
                                     retry=retry, socket_timeout=30.0) as aio:
        breaker = await half_open(aio)
        hold = Signal()

        def held() -> Any:
            yield Wait(hold, 30.0)

        aio._ctx.janitor(held())  # the compensation queues behind this
        own_server.pause()
        try:
            async def provider() -> None:
                pytest.fail("a cancelled admission must not run the call")

            task = asyncio.create_task(breaker.acall(provider))
            await until(lambda: _awaiting(task, "read_response"), "the probe script sent")
            await cancel(task)
        finally:
            own_server.resume()
        probes = f"{namespace}:breaker:{{provider}}:probes"
        await until(lambda: raw.zcard(probes) == 1, "the in-flight probe took its lease")
        hold.set()
        await assert_lease_released(aio, breaker)
    raw.close()


def _prepared(breaker: AsyncCircuitBreaker) -> bool:
    """Whether the breaker's mirror was read and subscribed."""
    return breaker._core._ready


def _awaiting(task: asyncio.Task[Any], name: str) -> bool:
    """Whether ``task`` is suspended inside a coroutine whose name contains ``name``."""
    coro: Any = task.get_coro()
    while coro is not None:
        if name in getattr(coro, "__qualname__", ""):
            return True
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    return False


@pytest.mark.parametrize("step", ["read", "subscribe"])
async def test_cancel_while_the_mirror_is_prepared(
        own_server: Any, namespace: str, monkeypatch: pytest.MonkeyPatch,
        step: str) -> None:
    """Cancelled during the first call's preparation (reading the record, or waiting
    for Redis to confirm the subscription, the server paused): no handler is left
    registered and the next call prepares the mirror and works."""
    async with flexisync.aio.connect(own_server.url, namespace=namespace) as aio:
        ctx = aio._ctx
        warm = aio.breaker("warm")
        await warm.prepare()  # the listener is connected
        listener = ctx.listener
        before = listener.table_sizes()
        breaker = aio.breaker("provider")
        if step == "read":
            gate = Gate(aio, "read", after=False, monkeypatch=monkeypatch)
        else:
            real = listener.subscribe_async

            async def paused(*args: Any, **kwargs: Any) -> Any:
                own_server.pause()  # the SUBSCRIBE is sent, its confirmation waits
                return await real(*args, **kwargs)

            monkeypatch.setattr(listener, "subscribe_async", paused)

        async def provider() -> str:
            return "ran"

        task = asyncio.create_task(breaker.acall(provider))
        try:
            if step == "read":
                await gate.reached.wait()
            else:
                await until(lambda: _awaiting(task, "wait_async"), "awaiting confirmation")
            await cancel(task)
        finally:
            own_server.resume()
        monkeypatch.undo()
        await until(lambda: listener.table_sizes() == before, "nothing left registered")
        assert not _prepared(breaker)
        assert await breaker.acall(provider) == "ran"
        assert _prepared(breaker)
        await until(lambda: listener.table_sizes()["handlers"] == before["handlers"] + 1,
                    "one subscription for the prepared breaker")


async def test_cancel_while_the_probe_runs_settles_it_neutral(
        aio: flexisync.aio.AsyncCoordinator) -> None:
    """A probe coroutine cancelled mid-call is neutral: its lease is freed, nothing is
    counted, the breaker does not reopen."""
    breaker = await half_open(aio)
    started = asyncio.Event()

    async def provider() -> None:
        started.set()
        await asyncio.Future()

    task = asyncio.create_task(breaker.acall(provider))
    await started.wait()
    assert (await breaker.info()).probes_in_flight == 1
    await cancel(task)
    info = await breaker.info()
    assert info.trips == 1
    await assert_lease_released(aio, breaker)


@pytest.mark.parametrize("after", [False, True], ids=["before_send", "after_reply"])
async def test_cancel_while_the_probe_outcome_is_reported(
        aio: flexisync.aio.AsyncCoordinator, monkeypatch: pytest.MonkeyPatch,
        after: bool) -> None:
    """Cancelled while reporting a successful probe: the lease is freed whether the
    report was sent (the breaker closed) or not (the slot is given back)."""
    breaker = await half_open(aio)
    gate = Gate(aio, "settle", after=after, monkeypatch=monkeypatch)

    async def provider() -> str:
        return "ok"

    task = asyncio.create_task(breaker.acall(provider))
    await gate.reached.wait()
    await cancel(task)
    monkeypatch.undo()
    assert await asyncio.to_thread(aio._ctx.settle, 10.0)
    info = await breaker.info()
    assert info.probes_in_flight == 0
    assert info.state == ("closed" if after else "half_open")
    await assert_lease_released(aio, breaker)


async def test_cancel_during_async_with_admission_releases_the_lease(
        aio: flexisync.aio.AsyncCoordinator, monkeypatch: pytest.MonkeyPatch) -> None:
    """``async with breaker`` cancelled on entry, after the lease was granted, frees it
    and never runs the body."""
    breaker = await half_open(aio)
    gate = Gate(aio, "probe", after=True, monkeypatch=monkeypatch)
    ran: list[str] = []

    async def enter() -> None:
        async with breaker:
            ran.append("body")

    task = asyncio.create_task(enter())
    await gate.reached.wait()
    await cancel(task)
    monkeypatch.undo()
    assert ran == []
    await assert_lease_released(aio, breaker)


async def test_a_cancelled_call_is_not_a_failure(aio: flexisync.aio.AsyncCoordinator,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A call cancelled while it runs (closed path, no Redis) is not counted: with
    failure_threshold=1 the breaker stays closed and nothing reaches Redis."""
    breaker = aio.breaker("provider", failure_threshold=1)
    await breaker.prepare()
    assert breaker.state == "closed"
    sent: list[str] = []
    real = aio._ctx.abackend.run_script

    async def spy(operation: str, name: str, *args: Any, **kwargs: Any) -> Any:
        sent.append(name)
        return await real(operation, name, *args, **kwargs)

    monkeypatch.setattr(aio._ctx.abackend, "run_script", spy)
    started = asyncio.Event()

    async def provider() -> None:
        started.set()
        await asyncio.Future()

    for _ in range(3):
        task = asyncio.create_task(breaker.acall(provider))
        await started.wait()
        started.clear()
        await cancel(task)
    assert sent == []
    assert breaker.stats().local_failures == 0
    monkeypatch.undo()
    info = await breaker.info()
    assert (info.state, info.failures) == ("closed", 0)


async def test_cancel_while_a_failure_is_recorded(
        aio: flexisync.aio.AsyncCoordinator, monkeypatch: pytest.MonkeyPatch) -> None:
    """Cancelled while its failure report is on the way: the caller gets the
    cancellation, the breaker keeps working and holds nothing."""
    breaker = aio.breaker("provider", failure_threshold=1)
    await breaker.prepare()
    gate = Gate(aio, "record", after=False, monkeypatch=monkeypatch)

    async def provider() -> None:
        raise RuntimeError("down")

    task = asyncio.create_task(breaker.acall(provider))
    await gate.reached.wait()
    await cancel(task)
    monkeypatch.undo()
    with pytest.raises(RuntimeError):
        await breaker.acall(provider)
    assert breaker.state == "open"
    assert (await breaker.info()).probes_in_flight == 0


# --- one process, one truth -----------------------------------------------------------

async def test_sync_and_async_share_one_mirror(sync: flexisync.Coordinator,
                                               aio: flexisync.aio.AsyncCoordinator,
                                               ) -> None:
    """A transition made by sync code is seen by asyncio code at once (no message, no
    await in between), and the reverse; failures count together."""
    s = sync.breaker("provider", failure_threshold=2)
    a = aio.breaker("provider", failure_threshold=2)
    assert s._core is a._core
    assert s.state == "closed"
    s.trip(30)
    assert a.state == "open"
    assert a.stats().version == s.stats().version
    await a.reset()
    assert s.stats().state == "closed"

    async def fail() -> None:
        raise RuntimeError("down")

    with pytest.raises(RuntimeError):
        await a.acall(fail)
    with pytest.raises(RuntimeError):
        s.call(lambda: (_ for _ in ()).throw(RuntimeError("down")))
    assert a.state == "open"
    assert s.stats().state == "open"
    await a.force_open()
    with pytest.raises(flexisync.CircuitOpenError):
        s.call(lambda: None)


async def test_a_transition_from_another_process_reaches_both_shells(
        sync: flexisync.Coordinator, aio: flexisync.aio.AsyncCoordinator,
        flexisync_url: str) -> None:
    """Another 'process' (a Coordinator that shares nothing with these) trips the
    breaker: the one shared listener subscription updates the one mirror."""
    s = sync.breaker("provider")
    assert s.state == "closed"
    listener = sync._ctx.listener
    handlers = listener.table_sizes()["handlers"]
    a = aio.breaker("provider")
    await a.prepare()
    assert listener.table_sizes()["handlers"] == handlers  # no second subscription
    with flexisync.connect(flexisync_url, namespace=sync.namespace,
                           client_name="breaker-peer") as peer:
        peer.breaker("provider").trip(30)
        await until(lambda: a.state == "open", "trip mirrored")
        assert s.stats().state == "open"
        peer.breaker("provider").reset()
        await until(lambda: s.stats().state == "closed", "reset mirrored")
        assert a.state == "closed"


async def test_state_starts_mirroring_in_the_background(
        aio: flexisync.aio.AsyncCoordinator, flexisync_url: str) -> None:
    """Reading ``state`` does no I/O; it has the hub thread subscribe and read, so a
    transition made elsewhere later reaches it without any coroutine being awaited."""
    breaker = aio.breaker("provider")
    assert breaker.state == "closed"
    await until(lambda: breaker.stats().version >= 0, "mirrored in the background")
    with flexisync.connect(flexisync_url, namespace=aio.namespace,
                           client_name="breaker-peer") as peer:
        peer.breaker("provider").trip(30)
        await until(lambda: breaker.state == "open", "trip mirrored")


def test_several_event_loops_in_a_row(flexisync_url: str, namespace: str) -> None:
    """One AsyncCoordinator used from three asyncio.run() in turn (as test suites do):
    every loop gets working Redis I/O and the same mirror."""
    aio = flexisync.aio.connect(flexisync_url, namespace=namespace)
    breaker = aio.breaker("provider", failure_threshold=1, recovery_timeout=0.05)

    async def fail() -> None:
        raise RuntimeError("down")

    async def ok() -> str:
        return "ok"

    async def round_trip(last: bool) -> None:
        try:
            assert await breaker.acall(ok) == "ok"
            with pytest.raises(RuntimeError):
                await breaker.acall(fail)
            assert breaker.state == "open"
            await until(lambda: breaker.stats().retry_after == 0, "open period over")
            assert await breaker.acall(ok) == "ok"  # the probe
            assert (await breaker.info()).state == "closed"
            await breaker.trip(30)
            await breaker.reset()
        finally:
            if last:
                await aio.aclose()

    for i in range(3):
        asyncio.run(round_trip(last=i == 2))
    assert aio.closed


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_after_fork(flexisync_url: str, namespace: str) -> None:
    """A forked child uses the parent's AsyncCoordinator and breaker: it reads the
    shared state afresh, is rejected while open, and its reset reaches the parent."""
    aio = flexisync.aio.connect(flexisync_url, namespace=namespace)
    breaker = aio.breaker("provider")

    async def parent_setup() -> None:
        await breaker.prepare()
        await breaker.trip(30)

    asyncio.run(parent_setup())
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through its exit code
        code = 1
        try:
            async def child() -> None:
                async def ok() -> None:
                    return None

                with pytest.raises(flexisync.CircuitOpenError):
                    await breaker.acall(ok)
                assert (await breaker.info()).state == "open"
                await breaker.reset()
                assert breaker.state == "closed"
                await aio.aclose()

            asyncio.run(child())
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0

    async def parent_check() -> None:
        try:
            await until(lambda: breaker.state == "closed", "the child's reset mirrored")
            assert (await breaker.info()).state == "closed"
        finally:
            await aio.aclose()

    asyncio.run(parent_check())

