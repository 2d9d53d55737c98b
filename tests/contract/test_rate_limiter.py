"""Contract: the fleet-wide rate limiter, in every shell (sync, asyncio; Redis, memory://).

Assertions read the limiter's decisions (admitted or not, the wait the server named,
what is left), never the wall clock: waits are asserted as the server's arithmetic.
"""

from __future__ import annotations

import itertools
import math
import time
from typing import Any

import pytest

import flexisync
from flexisync._core.rate_limiter import RateLimitTimeout
from tests.contract.conftest import Shell


def _count_scripts(shell: Shell) -> list[str]:
    """Record the name of every script the shell's backend runs from now on."""
    ctx = shell.coordinator._ctx
    backend = ctx.abackend if shell.is_async else ctx.backend
    calls: list[str] = []
    original = backend.run_script

    def counting(operation: str, name: str, *args: Any, **kwargs: Any) -> Any:
        calls.append(name)
        return original(operation, name, *args, **kwargs)

    backend.run_script = counting
    return calls


async def test_burst_is_admitted_at_once_then_the_rate_applies(shell: Shell) -> None:
    """A full limiter admits ``burst`` units now, then nothing until they refill;
    ``remaining`` counts down."""
    limiter = shell.coordinator.rate_limiter("api", 60, per=60.0, burst=3)
    assert limiter.burst == 3
    started = time.monotonic()
    first = await shell(limiter.try_acquire())
    assert first is not None
    assert first.waited == 0
    assert math.isclose(first.remaining, 2, abs_tol=0.01)
    assert await shell(limiter.try_acquire()) is not None
    third = await shell(limiter.try_acquire())
    elapsed = time.monotonic() - started
    assert third is not None
    # 1 unit refills per second: what came back while the three calls ran (milliseconds,
    # more on a loaded machine) is all that may be left.
    assert third.remaining < 0.01 + elapsed
    assert await shell(limiter.try_acquire()) is None
    with pytest.raises(RateLimitTimeout) as info:
        await shell(limiter.acquire(timeout=0))
    # One unit refills in per/rate = 1 s, counted from the first acquire: the server says so.
    assert 1.0 - (time.monotonic() - started) - 0.01 < info.value.retry_after <= 1.0
    assert isinstance(info.value, flexisync.errors.FlexiSyncError)
    assert isinstance(info.value, TimeoutError)


async def test_acquire_sleeps_exactly_the_wait_the_server_names(shell: Shell) -> None:
    """Past the burst, acquire reserves in one script call and waits what it was told:
    each reservation is admitted one cost's refill (0.2 s) after the previous one, on
    the server's clock, and never earlier."""
    limiter = shell.coordinator.rate_limiter("paced", 10, per=1.0, burst=2)
    calls = _count_scripts(shell)
    reservations = [await shell(limiter.acquire(2)) for _ in range(4)]
    assert calls == ["ratelimit_acquire"] * 4, "one script call per admission, no polling"
    assert reservations[0].waited == 0
    assert all(r.waited > 0 for r in reservations[1:])
    gaps = [b.admitted_at - a.admitted_at for a, b in itertools.pairwise(reservations)]
    assert all(math.isclose(gap, 0.2, abs_tol=1e-5) for gap in gaps), gaps


async def test_a_timeout_that_cannot_be_met_fails_at_once_and_reserves_nothing(
        shell: Shell) -> None:
    """acquire(timeout) whose wait would exceed it raises RateLimitTimeout without
    waiting and without taking anything; a timeout that can be met is honoured."""
    limiter = shell.coordinator.rate_limiter("tokens", 1000, per=60.0, burst=1000)
    assert await shell(limiter.acquire(1000)) is not None
    calls = _count_scripts(shell)
    with pytest.raises(RateLimitTimeout) as info:
        await shell(limiter.acquire(500, timeout=1.0))
    assert calls == ["ratelimit_acquire"]
    assert info.value.cost == 500
    assert info.value.timeout == 1.0
    assert 29.9 < info.value.retry_after <= 30.0  # 500 tokens at 1000/min
    # Nothing was reserved: a small cost still waits only its own refill.
    with pytest.raises(RateLimitTimeout) as small:
        await shell(limiter.acquire(1, timeout=0.01))
    assert small.value.retry_after <= 0.06
    reservation = await shell(limiter.acquire(1, timeout=0.5))
    assert 0 < reservation.waited <= 0.06


async def test_large_costs_cost_one_decision(shell: Shell) -> None:
    """5,000 tokens: one script call, the same arithmetic (O(1) in the cost)."""
    limiter = shell.coordinator.rate_limiter("llm", 100_000, per=60.0, burst=20_000)
    calls = _count_scripts(shell)
    for _ in range(4):
        assert await shell(limiter.try_acquire(5_000)) is not None
    assert await shell(limiter.try_acquire(5_000)) is None
    assert calls == ["ratelimit_acquire"] * 5
    with pytest.raises(RateLimitTimeout) as info:
        await shell(limiter.acquire(5_000, timeout=0))
    assert 2.9 < info.value.retry_after <= 3.0  # 5,000 tokens at 100,000/min


async def test_settle_gives_back_unused_capacity_and_charges_overruns(
        shell: Shell) -> None:
    """Reserve an estimate, settle with the actual usage: unused units return at once,
    an overrun is charged (the next caller waits it off); never above burst."""
    limiter = shell.coordinator.rate_limiter("usage", 600, per=60.0, burst=100)
    estimate = await shell(limiter.acquire(100))
    assert await shell(limiter.try_acquire(1)) is None
    returned = await shell(estimate.settle(40))  # used 40 of 100
    assert math.isclose(returned, -60, abs_tol=0.5)
    assert estimate.cost == 40
    assert await shell(limiter.try_acquire(50)) is not None
    # 10 left (plus refill); an overrun of 200 puts the limiter ~190 units in debt.
    charged = await shell(estimate.settle(240))
    assert charged == 200
    with pytest.raises(RateLimitTimeout) as info:
        await shell(limiter.acquire(1, timeout=0))
    assert 18.0 < info.value.retry_after <= 19.1  # ~190 units at 10/s
    # Giving back more than was used never lifts the limiter above its burst.
    fresh = shell.coordinator.rate_limiter("usage-fresh", 600, per=60.0, burst=100)
    small = await shell(fresh.acquire(10))
    given = await shell(small.settle(0))
    assert math.isclose(given, -10, abs_tol=0.5)
    assert await shell(small.settle(0)) == 0.0
    assert await shell(fresh.try_acquire(100)) is not None
    assert await shell(fresh.try_acquire(1)) is None


async def test_limiters_with_one_name_share_one_budget(shell: Shell) -> None:
    """Two objects (as two processes would) draw on one budget; other names do not."""
    a = shell.coordinator.rate_limiter("shared", 2, per=60.0)
    b = shell.coordinator.rate_limiter("shared", 2, per=60.0)
    other = shell.coordinator.rate_limiter("other", 2, per=60.0)
    assert await shell(a.try_acquire()) is not None
    assert await shell(b.try_acquire()) is not None
    assert await shell(a.try_acquire()) is None
    assert await shell(b.try_acquire()) is None
    assert await shell(other.try_acquire(2)) is not None


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"rate": 0}, "rate must be a finite number > 0"),
    ({"rate": -1}, "rate must be a finite number > 0"),
    ({"rate": math.inf}, "rate must be a finite number > 0"),
    ({"rate": "10"}, "rate must be a number"),
    ({"rate": 10, "per": 0}, "per must be > 0"),
    ({"rate": 10, "burst": 0}, "burst must be a finite number > 0"),
])
async def test_construction_is_validated(shell: Shell, kwargs: dict[str, Any],
                                         message: str) -> None:
    """Bad rate, per or burst: ConfigError naming it, before any I/O."""
    with pytest.raises(flexisync.ConfigError, match=message):
        shell.coordinator.rate_limiter("bad", **kwargs)
    with pytest.raises(flexisync.ConfigError, match="rate limiter name"):
        shell.coordinator.rate_limiter("no spaces", 10)


async def test_costs_are_validated_before_any_io(shell: Shell) -> None:
    """cost <= 0, above burst (never admissible), a bad timeout or actual: ConfigError
    naming it, and no script runs."""
    limiter = shell.coordinator.rate_limiter("costs", 100, per=60.0, burst=50)
    calls = _count_scripts(shell)
    with pytest.raises(flexisync.ConfigError, match=r"exceeds .* burst 50"):
        await shell(limiter.acquire(51))
    with pytest.raises(flexisync.ConfigError, match=r"exceeds .* burst 50"):
        await shell(limiter.try_acquire(51))
    for bad in (0, -1, math.nan, True):
        with pytest.raises(flexisync.ConfigError, match="cost"):
            await shell(limiter.acquire(bad))
    with pytest.raises(flexisync.ConfigError, match="timeout"):
        await shell(limiter.acquire(1, timeout=-1))
    assert calls == []
    reservation = await shell(limiter.acquire(50))
    with pytest.raises(flexisync.ConfigError, match="actual"):
        await shell(reservation.settle(-1))
    assert calls == ["ratelimit_acquire"]


async def test_defaults_and_foreign_data(shell: Shell) -> None:
    """burst defaults to rate; foreign data in the limiter's key is a BackendError
    (nothing reserved), not a crash or a silent reset."""
    limiter = shell.coordinator.rate_limiter("defaults", 30, per=60.0)
    assert limiter.burst == 30
    assert limiter.per == 60.0
    assert "defaults" in repr(limiter)
    key = shell.coordinator._ctx.keys.key("ratelimit", "defaults")
    await shell(shell.coordinator._ctx.abackend.call("t", lambda c: c.set(key, "junk"))
                if shell.is_async else
                shell.coordinator._ctx.backend.call("t", lambda c: c.set(key, "junk")))
    with pytest.raises(flexisync.errors.BackendError, match="foreign data"):
        await shell(limiter.try_acquire())
