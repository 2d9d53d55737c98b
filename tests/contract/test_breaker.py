"""Contract: the circuit breaker, in every shell (sync, asyncio; Redis, memory://)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest

import flexisync
from flexisync.breaker import breaker_info
from tests.aio_helpers import until
from tests.contract.conftest import Shell


class ProviderDown(RuntimeError):
    """What the fake dependency raises."""


class Ignored(RuntimeError):
    """An exception the breaker is told to ignore."""


async def protected(shell: Shell, breaker: Any, fn: Callable[[], Any]) -> Any:
    """``fn()`` through the breaker: ``call`` in the sync shell, ``acall`` (with ``fn``
    wrapped in a coroutine) in the asyncio one."""
    if not shell.is_async:
        return breaker.call(fn)

    async def coro() -> Any:
        return fn()

    return await breaker.acall(coro)


async def with_block(shell: Shell, breaker: Any, fn: Callable[[], Any]) -> Any:
    """``fn()`` inside ``with breaker:`` / ``async with breaker:``."""
    if shell.is_async:
        async with breaker:
            return fn()
    with breaker:
        return fn()


async def prepared(shell: Shell, breaker: Any) -> None:
    """Until ``breaker`` mirrors the shared state (subscribed): reading ``state`` does
    it in the sync shell, ``await prepare()`` in the asyncio one."""
    if shell.is_async:
        await breaker.prepare()
    else:
        assert breaker.state in ("closed", "open")


def fail() -> None:
    raise ProviderDown("down")


async def test_closed_calls_pass_and_count(shell: Shell) -> None:
    """A closed breaker runs the call, returns its result, counts the success."""
    breaker = shell.coordinator.breaker("provider")
    assert await protected(shell, breaker, lambda: 42) == 42
    assert await with_block(shell, breaker, lambda: "in") == "in"
    assert breaker.state == "closed"
    stats = breaker.stats()
    assert stats.successes == 2
    assert stats.name == "provider"
    assert stats.backend_available


async def test_failure_threshold_opens_and_rejects_unrun(shell: Shell) -> None:
    """failure_threshold failures in a row open it, fleet-wide; then calls are rejected
    without running, with a retry_after up to the recovery timeout."""
    breaker = shell.coordinator.breaker("provider", failure_threshold=3, recovery_timeout=30)
    for _ in range(3):
        with pytest.raises(ProviderDown):
            await protected(shell, breaker, fail)
    assert breaker.state == "open"
    ran: list[int] = []
    with pytest.raises(flexisync.CircuitOpenError) as info:
        await protected(shell, breaker, lambda: ran.append(1))
    assert ran == []
    assert 25 < info.value.retry_after <= 30
    with pytest.raises(flexisync.CircuitOpenError):
        await with_block(shell, breaker, lambda: ran.append(1))
    assert ran == []
    shared = await shell(breaker.info())
    assert shared.state == "open"
    assert shared.trips == 1
    assert breaker.stats().rejected == 2
    assert breaker.stats().local_failures == 3


async def test_a_success_resets_the_consecutive_count(shell: Shell) -> None:
    """Consecutive mode: a success between failures starts the count again."""
    breaker = shell.coordinator.breaker("provider", failure_threshold=2)
    with pytest.raises(ProviderDown):
        await protected(shell, breaker, fail)
    assert await protected(shell, breaker, lambda: "ok") == "ok"
    with pytest.raises(ProviderDown):
        await protected(shell, breaker, fail)
    assert breaker.state == "closed"
    with pytest.raises(ProviderDown):
        await protected(shell, breaker, fail)
    assert breaker.state == "open"


async def test_excluded_exceptions(shell: Shell) -> None:
    """ignore= counts as nothing, an exception outside failure_on as a success; both
    propagate unchanged."""
    breaker = shell.coordinator.breaker("provider", failure_threshold=1, ignore=Ignored,
                                        failure_on=ProviderDown)

    def ignored() -> None:
        raise Ignored("not the provider's fault")

    def unrelated() -> None:
        raise KeyError("a bug of ours")

    for fn, exc in ((ignored, Ignored), (unrelated, KeyError)):
        for _ in range(3):
            with pytest.raises(exc):
                await protected(shell, breaker, fn)
    assert breaker.state == "closed"
    assert (await shell(breaker.info())).failures == 0
    with pytest.raises(ProviderDown):
        await protected(shell, breaker, fail)
    assert breaker.state == "open"


async def test_probe_after_the_recovery_timeout_closes(shell: Shell) -> None:
    """Once the open period is over one probe is admitted; its success closes the
    breaker for everyone."""
    breaker = shell.coordinator.breaker("provider", failure_threshold=1,
                                        recovery_timeout=0.05)
    with pytest.raises(ProviderDown):
        await protected(shell, breaker, fail)
    assert breaker.state == "open"
    await until(lambda: breaker.stats().retry_after == 0, "open period over")
    assert await protected(shell, breaker, lambda: "probe") == "probe"
    assert breaker.state == "closed"
    assert (await shell(breaker.info())).state == "closed"


async def test_a_failed_probe_reopens_for_longer(shell: Shell) -> None:
    """A failed probe opens the breaker again, for twice the last open period."""
    breaker = shell.coordinator.breaker("provider", failure_threshold=1,
                                        recovery_timeout=0.05, max_recovery_timeout=10)
    with pytest.raises(ProviderDown):
        await protected(shell, breaker, fail)
    await until(lambda: breaker.stats().retry_after == 0, "open period over")
    with pytest.raises(ProviderDown):
        await protected(shell, breaker, fail)
    assert breaker.state == "open"
    info = await shell(breaker.info())
    assert info.open_period == pytest.approx(0.1)
    assert info.probes_in_flight == 0


async def test_manual_commands(shell: Shell) -> None:
    """trip / force_open / disable / reset move the shared state, seen by info()."""
    breaker = shell.coordinator.breaker("provider", recovery_timeout=30)
    await shell(breaker.trip(12))
    assert breaker.state == "open"
    info = await shell(breaker.info())
    assert info.state == "open"
    assert 10 < info.retry_after <= 12
    await shell(breaker.force_open())
    assert breaker.state == "forced_open"
    with pytest.raises(flexisync.CircuitOpenError) as rejected:
        await protected(shell, breaker, lambda: None)
    assert rejected.value.retry_after == math.inf
    await shell(breaker.trip())  # a manual state is left alone
    assert breaker.state == "forced_open"
    await shell(breaker.disable())
    assert breaker.state == "disabled"
    breaker_ = shell.coordinator.breaker("provider", recovery_timeout=30)
    for _ in range(10):
        with pytest.raises(ProviderDown):
            await protected(shell, breaker_, fail)
    assert breaker.state == "disabled"
    await shell(breaker.reset())
    assert breaker.state == "closed"
    assert (await shell(breaker.info())).state == "closed"
    if not shell.is_async:
        assert breaker_info(shell.coordinator, "provider").state == "closed"


async def test_state_changes_reach_callbacks_and_other_objects(shell: Shell) -> None:
    """on_state_change sees every transition; another object (another policy) of the
    same name sees them too."""
    breaker = shell.coordinator.breaker("provider")
    other = shell.coordinator.breaker("provider", failure_threshold=7)
    assert other is not breaker
    await prepared(shell, other)
    seen: list[tuple[str, str, str]] = []
    breaker.on_state_change(lambda *change: seen.append(change))
    await shell(breaker.trip(30))
    await until(lambda: seen == [("provider", "closed", "open")], "callback")
    await until(lambda: other.stats().state == "open", "mirrored by the other object")
    await shell(breaker.reset())
    await until(lambda: len(seen) == 2, "second callback")
    assert seen[1] == ("provider", "open", "closed")


async def test_the_same_name_and_policy_is_one_object(shell: Shell) -> None:
    """Asking again returns the live object; a different policy another one."""
    first = shell.coordinator.breaker("provider", failure_threshold=3)
    assert shell.coordinator.breaker("provider", failure_threshold=3) is first
    assert shell.coordinator.breaker("provider") is not first


@pytest.mark.parametrize(("options", "words"), [
    ({"failure_threshold": 0}, "failure_threshold"),
    ({"failure_rate": 1.5}, "failure_rate"),
    ({"recovery_timeout": -1}, "recovery_timeout"),
    ({"recovery_timeout": 20, "max_recovery_timeout": 10}, "max_recovery_timeout"),
    ({"on_backend_error": "explode"}, "on_backend_error"),
    ({"failure_on": 3}, "failure_on"),
    ({"failure_treshold": 3}, "unknown breaker option"),
])
async def test_bad_policy_is_a_config_error(shell: Shell, options: dict[str, Any],
                                            words: str) -> None:
    """A bad option raises ConfigError at construction, naming it, before any I/O."""
    with pytest.raises(flexisync.ConfigError, match=words):
        shell.coordinator.breaker("provider", **options)
    with pytest.raises(flexisync.ConfigError):
        shell.coordinator.breaker("bad name with spaces")


async def test_bad_trip_duration_changes_nothing(shell: Shell) -> None:
    """trip() with a duration that is not positive seconds raises ConfigError."""
    breaker = shell.coordinator.breaker("provider")
    for bad in (-1, 0, math.inf, "soon"):
        with pytest.raises(flexisync.ConfigError):
            await shell(breaker.trip(bad))
    assert (await shell(breaker.info())).state == "closed"


# --- provider errors (the default classification) and Retry-After ------------------------

def http_error(status: int, headers: dict[str, str] | None = None) -> Exception:
    """A real ``httpx.HTTPStatusError``, as ``response.raise_for_status()`` raises it."""
    import httpx  # a test-only dependency; flexisync never imports it

    response = httpx.Response(status, headers=headers or {},
                              request=httpx.Request("POST", "https://provider.test/v1"))
    try:
        response.raise_for_status()
    except httpx.HTTPStatusError as exc:
        return exc
    raise AssertionError("not an error status")


def raiser(exc: Exception) -> Callable[[], None]:
    def call() -> None:
        raise exc
    return call


async def test_caller_errors_are_reraised_and_count_as_nothing(shell: Shell) -> None:
    """By default a 400/401/404 (the caller's fault) neither opens nor resets the
    breaker: re-raised unchanged, not counted; a 500 and a 408 count as failures."""
    breaker = shell.coordinator.breaker("provider", failure_threshold=2)
    for status in (400, 401, 404, 422):
        exc = http_error(status)
        for _ in range(3):
            with pytest.raises(type(exc)) as raised:
                await protected(shell, breaker, raiser(exc))
            assert raised.value is exc
    assert breaker.state == "closed"
    assert breaker.stats().local_failures == 0
    assert breaker.stats().successes == 0  # not a success either
    with pytest.raises(Exception, match="500"):
        await protected(shell, breaker, raiser(http_error(500)))
    with pytest.raises(Exception, match="400"):  # does not reset the count
        await protected(shell, breaker, raiser(http_error(400)))
    assert (await shell(breaker.info())).failures == 1
    with pytest.raises(Exception, match="408"):
        await protected(shell, breaker, raiser(http_error(408)))
    assert breaker.state == "open"


async def test_outcome_of_none_counts_every_exception(shell: Shell) -> None:
    """outcome_of=None restores "every exception in failure_on is a failure"."""
    breaker = shell.coordinator.breaker("provider", failure_threshold=1, outcome_of=None)
    with pytest.raises(Exception, match="401"):
        await protected(shell, breaker, raiser(http_error(401)))
    assert breaker.state == "open"


async def test_a_429_with_retry_after_opens_for_exactly_that_long(shell: Shell) -> None:
    """One 429 with ``retry-after`` opens at once (below the threshold) for exactly that
    long, whatever recovery_timeout says; info() reports that period; then a probe."""
    breaker = shell.coordinator.breaker("provider", failure_threshold=5,
                                        recovery_timeout=30)
    with pytest.raises(Exception, match="429"):
        await protected(shell, breaker, raiser(http_error(429, {"retry-after": "0.3"})))
    info = await shell(breaker.info())
    assert info.state == "open"
    assert info.open_period == pytest.approx(0.3)
    assert 0 < info.retry_after <= 0.3
    with pytest.raises(flexisync.CircuitOpenError) as rejected:
        await protected(shell, breaker, lambda: None)
    assert 0 < rejected.value.retry_after <= 0.3
    await until(lambda: breaker.stats().retry_after == 0, "retry-after over")
    assert await protected(shell, breaker, lambda: "probe") == "probe"
    assert breaker.state == "closed"


async def test_retry_after_ms_comes_first(shell: Shell) -> None:
    breaker = shell.coordinator.breaker("provider", recovery_timeout=30)
    headers = {"retry-after-ms": "400", "retry-after": "20"}
    with pytest.raises(Exception, match="429"):
        await protected(shell, breaker, raiser(http_error(429, headers)))
    assert (await shell(breaker.info())).open_period == pytest.approx(0.4)


async def test_a_failed_probe_with_retry_after_reopens_for_exactly_that_long(
        shell: Shell) -> None:
    """A failed probe carrying a Retry-After reopens for it (not for the doubled
    period); one without doubles the backoff period as before."""
    breaker = shell.coordinator.breaker("provider", failure_threshold=1,
                                        recovery_timeout=0.3, max_recovery_timeout=10)
    with pytest.raises(Exception, match="500"):
        await protected(shell, breaker, raiser(http_error(500)))
    assert (await shell(breaker.info())).open_period == pytest.approx(0.3)
    await until(lambda: breaker.stats().retry_after == 0, "open period over")
    with pytest.raises(Exception, match="503"):  # the probe fails, with a Retry-After
        await protected(shell, breaker, raiser(http_error(503, {"retry-after": "0.2"})))
    info = await shell(breaker.info())
    assert info.state == "open"
    assert info.open_period == pytest.approx(0.2)  # not 0.6 (doubled)
    assert 0 < info.retry_after <= 0.2
    await until(lambda: breaker.stats().retry_after == 0, "retry-after over")
    with pytest.raises(Exception, match="500"):  # the probe fails, no Retry-After
        await protected(shell, breaker, raiser(http_error(500)))
    info = await shell(breaker.info())
    assert info.open_period == pytest.approx(0.6)
    assert 0.2 < info.retry_after <= 0.6


async def test_a_retry_after_never_shortens_a_longer_open_period(shell: Shell) -> None:
    """Failures of calls admitted before the breaker opened: a shorter Retry-After
    leaves the open period alone, a longer one extends it (and open_period says so)."""
    breaker = shell.coordinator.breaker("provider", failure_threshold=5)
    checked: list[float] = []

    async def nest(outcomes: list[str]) -> None:
        """Enter one block per outcome while closed; the innermost fails first."""

        async def guarded(body: Callable[[], Any]) -> None:
            if shell.is_async:
                async with breaker:
                    await body()
            else:
                with breaker:
                    await body()

        if not outcomes:
            return
        exc = http_error(429, {"retry-after": outcomes[0]})

        async def body() -> None:
            await nest(outcomes[1:])
            if outcomes[0] == "20":  # after "10" opened it and "0.2" left it alone
                info = await shell(breaker.info())
                checked.append(info.open_period)
                assert 9 < info.retry_after <= 10
            raise exc

        with pytest.raises(type(exc)):
            await guarded(body)

    async def nested() -> None:
        await nest(["20", "0.2", "10"])
        info = await shell(breaker.info())
        assert checked == [pytest.approx(10)]
        assert 19 < info.retry_after <= 20  # the longer one extended it
    await nested()
    info = await shell(breaker.info())
    assert info.state == "open"
    assert 19 < info.retry_after <= 20
    assert 19.9 < info.open_period <= 20.1
    assert info.trips == 1
