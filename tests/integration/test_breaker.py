"""CircuitBreaker behaviour in one process, against a real Redis."""

from __future__ import annotations

import asyncio
import math
import threading
import time
from typing import Any

import pytest
import redis

import flexisync
from flexisync.breaker import breaker_info, list_breakers
from tests.helpers import wait_until


class ProviderDown(RuntimeError):
    """What the fake dependency raises."""


class RateLimited(RuntimeError):
    """A 429 carrying the provider's Retry-After, in seconds."""

    def __init__(self, retry_after: float) -> None:
        super().__init__("429 Too Many Requests")
        self.retry_after = retry_after


def fail() -> None:
    raise ProviderDown("down")


def fail_n(breaker: flexisync.CircuitBreaker, n: int, exc: BaseException | None = None) -> None:
    for _ in range(n):
        with pytest.raises(type(exc) if exc else ProviderDown):
            breaker.call(_raiser(exc) if exc else fail)


def _raiser(exc: BaseException) -> Any:
    def run() -> None:
        raise exc
    return run


def key(sync: flexisync.Coordinator, name: str = "provider") -> str:
    return sync._ctx.keys.key("breaker", name)


# --- counting -------------------------------------------------------------------------

def test_consecutive_failures_open_the_breaker(sync: flexisync.Coordinator,
                                               raw: redis.Redis) -> None:
    """failure_threshold failures in a row open it; the next call is rejected unrun."""
    breaker = sync.breaker("provider", failure_threshold=3, recovery_timeout=30)
    fail_n(breaker, 2)
    assert breaker.state == "closed"
    fail_n(breaker, 1)
    assert breaker.state == "open"
    assert raw.hget(key(sync), "state") == "open"
    ran = []
    with pytest.raises(flexisync.CircuitOpenError) as info:
        breaker.call(lambda: ran.append(1))
    assert ran == []
    assert info.value.name == "provider"
    assert 25 < info.value.retry_after <= 30


def test_success_between_failures_resets_the_consecutive_count(
        sync: flexisync.Coordinator) -> None:
    """fail, fail, success, fail, fail stays closed with failure_threshold=3."""
    breaker = sync.breaker("provider", failure_threshold=3)
    fail_n(breaker, 2)
    assert breaker.call(lambda: "ok") == "ok"
    fail_n(breaker, 2)
    assert breaker.state == "closed"
    assert breaker_info(sync, "provider").failures == 2


def test_successful_closed_call_makes_no_round_trip(sync: flexisync.Coordinator,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Once mirrored, closed + success never calls Redis."""
    breaker = sync.breaker("provider")
    assert breaker.state == "closed"
    calls = []
    monkeypatch.setattr(sync._ctx.backend.client, "execute_command",
                        lambda *a, **_k: calls.append(a))
    monkeypatch.setattr(sync._ctx.backend.client, "evalsha", lambda *a, **_k: calls.append(a))

    @breaker
    def healthy(x: int) -> int:
        return x * 2

    assert [healthy(i) for i in range(1000)] == [i * 2 for i in range(1000)]
    assert calls == []
    assert breaker.stats().successes == 1000


def test_failure_rate_window_opens_on_ratio_with_minimum_calls(
        sync: flexisync.Coordinator) -> None:
    """With failure_rate=0.5 and minimum_calls=10: 4 ok + 5 failures stays closed (9 calls),
    the 10th call failing makes 6/10 and opens."""
    breaker = sync.breaker("provider", failure_rate=0.5, minimum_calls=10, window=30)
    for _ in range(4):
        breaker.call(lambda: None)
    fail_n(breaker, 5)
    assert breaker.state == "closed"
    fail_n(breaker, 1)
    assert breaker.state == "open"


def test_successes_in_rate_mode_are_flushed_in_the_background(
        sync: flexisync.Coordinator) -> None:
    """Successes made on the zero-round-trip path reach the shared window within ~100 ms."""
    breaker = sync.breaker("provider", failure_rate=0.5, minimum_calls=5, window=30)
    for _ in range(7):
        breaker.call(lambda: None)
    wait_until(lambda: breaker_info(sync, "provider", window=30).window_calls == 7,
               timeout=10, message="7 successes flushed")


def test_slow_calls_count_as_failures(sync: flexisync.Coordinator) -> None:
    """A call slower than slow_call_duration returns its result but counts as a failure."""
    breaker = sync.breaker("provider", failure_threshold=2, slow_call_duration=0.02)
    for _ in range(2):
        assert breaker.call(lambda: time.sleep(0.05) or "late") == "late"  # type: ignore[func-returns-value]
    assert breaker.state == "open"


def test_ignored_exceptions_count_as_nothing_and_others_as_success(
        sync: flexisync.Coordinator) -> None:
    """ignore= is neutral; an exception outside failure_on is a success; both propagate."""
    breaker = sync.breaker("provider", failure_threshold=2, failure_on=(ProviderDown,),
                           ignore=(KeyError,))
    fail_n(breaker, 1)
    fail_n(breaker, 3, KeyError("ignored"))
    assert breaker_info(sync, "provider").failures == 1  # ignored: no reset, no count
    fail_n(breaker, 1, ValueError("bad input: the provider answered"))  # a success
    fail_n(breaker, 1)
    assert breaker.state == "closed"
    fail_n(breaker, 1)
    assert breaker.state == "open"


# --- open, half-open, recovery --------------------------------------------------------

def test_probe_success_closes_and_failed_probe_doubles_the_open_period(
        sync: flexisync.Coordinator) -> None:
    """A failed probe reopens for twice the period, capped by max_recovery_timeout; a
    successful one closes and the period starts over."""
    breaker = sync.breaker("provider", failure_threshold=1, recovery_timeout=0.1,
                           max_recovery_timeout=0.3)
    fail_n(breaker, 1)
    assert breaker_info(sync, "provider").open_period == pytest.approx(0.1)
    for expected in (0.2, 0.3, 0.3):
        wait_until(lambda: breaker.stats().retry_after == 0, timeout=5)
        fail_n(breaker, 1)  # the probe fails
        info = breaker_info(sync, "provider")
        assert info.state == "open"
        assert info.open_period == pytest.approx(expected)
        assert 0 < info.retry_after <= expected
    wait_until(lambda: breaker.stats().retry_after == 0, timeout=5)
    assert breaker.call(lambda: "ok") == "ok"
    assert breaker.state == "closed"
    fail_n(breaker, 1)
    assert breaker_info(sync, "provider").open_period == pytest.approx(0.1)


def test_success_threshold_probes_are_needed_to_close(sync: flexisync.Coordinator) -> None:
    """With success_threshold=3 the breaker stays half-open until the 3rd good probe."""
    breaker = sync.breaker("provider", failure_threshold=1, recovery_timeout=0.05,
                           success_threshold=3)
    fail_n(breaker, 1)
    wait_until(lambda: breaker.stats().retry_after == 0, timeout=5)
    for _ in range(2):
        breaker.call(lambda: None)
        assert breaker.state == "half_open"
    breaker.call(lambda: None)
    assert breaker.state == "closed"


def test_half_open_rejects_calls_beyond_the_probe_budget(sync: flexisync.Coordinator) -> None:
    """While the one probe runs, another call is rejected with a bounded retry_after."""
    breaker = sync.breaker("provider", failure_threshold=1, recovery_timeout=0.05,
                           probe_lease=5)
    fail_n(breaker, 1)
    wait_until(lambda: breaker.stats().retry_after == 0, timeout=5)
    inside, release = threading.Event(), threading.Event()

    def probe() -> None:
        inside.set()
        release.wait(10)

    thread = threading.Thread(target=breaker.call, args=(probe,))
    thread.start()
    assert inside.wait(10)
    with pytest.raises(flexisync.CircuitOpenError) as info:
        breaker.call(lambda: None)
    assert 0 < info.value.retry_after <= 5
    release.set()
    thread.join(10)
    assert breaker.state == "closed"


# --- manual control and Retry-After ---------------------------------------------------

def test_exception_with_retry_after_opens_for_exactly_that_long(
        sync: flexisync.Coordinator) -> None:
    """A 429 with Retry-After opens at once (below the threshold) for that many seconds."""
    breaker = sync.breaker("provider", failure_threshold=5, recovery_timeout=1)
    fail_n(breaker, 1, RateLimited(7.0))
    info = breaker_info(sync, "provider")
    assert info.state == "open"
    assert 6.5 < info.retry_after <= 7.0
    with pytest.raises(flexisync.CircuitOpenError) as rejected:
        breaker.call(lambda: None)
    assert 6.5 < rejected.value.retry_after <= 7.0


def test_retry_after_classifier_hook(sync: flexisync.Coordinator) -> None:
    """retry_after_of= turns any exception shape (here a status/headers pair) into seconds."""
    class HTTPError(Exception):
        def __init__(self, status: int, headers: dict[str, str]) -> None:
            super().__init__(status)
            self.status, self.headers = status, headers

    def from_headers(exc: BaseException) -> float | None:
        if isinstance(exc, HTTPError) and exc.status == 429:
            return float(exc.headers["Retry-After"])
        return None

    breaker = sync.breaker("provider", retry_after_of=from_headers)
    fail_n(breaker, 1, HTTPError(500, {}))
    assert breaker.state == "closed"
    fail_n(breaker, 1, HTTPError(429, {"Retry-After": "12"}))
    assert 11.5 < breaker_info(sync, "provider").retry_after <= 12


def test_trip_never_shortens_an_open_period(sync: flexisync.Coordinator) -> None:
    """trip(10) then trip(1) stays open ~10 s; trip(20) extends it."""
    breaker = sync.breaker("provider")
    breaker.trip(10)
    breaker.trip(1)
    assert 9 < breaker_info(sync, "provider").retry_after <= 10
    breaker.trip(20)
    assert 19 < breaker_info(sync, "provider").retry_after <= 20
    assert breaker_info(sync, "provider").trips == 1


def test_force_open_disable_and_reset(sync: flexisync.Coordinator) -> None:
    """forced_open rejects with retry_after=inf; disabled lets failures through uncounted;
    reset closes."""
    breaker = sync.breaker("provider", failure_threshold=1)
    breaker.force_open()
    with pytest.raises(flexisync.CircuitOpenError) as info:
        breaker.call(lambda: None)
    assert info.value.retry_after == math.inf
    breaker.trip(5)
    assert breaker.state == "forced_open"  # trip leaves a manual override alone
    breaker.disable()
    fail_n(breaker, 3)
    assert breaker.state == "disabled"
    breaker.reset()
    assert breaker.state == "closed"
    assert breaker_info(sync, "provider").failures == 0


def test_context_manager_rejects_on_entry_and_counts_exit(sync: flexisync.Coordinator) -> None:
    """`with breaker:` counts the block's exception and raises CircuitOpenError when open."""
    breaker = sync.breaker("provider", failure_threshold=2)
    for _ in range(2):
        with pytest.raises(ProviderDown), breaker:
            raise ProviderDown
    entered = []
    with pytest.raises(flexisync.CircuitOpenError), breaker:
        entered.append(1)
    assert entered == []


# --- async ----------------------------------------------------------------------------

def test_async_functions_are_protected(sync: flexisync.Coordinator) -> None:
    """An `async def` decorated function counts failures, opens, and is rejected unawaited."""
    breaker = sync.breaker("provider", failure_threshold=2)
    ran = []

    @breaker
    async def complete(prompt: str, *, fail: bool) -> str:
        ran.append(prompt)
        await asyncio.sleep(0)
        if fail:
            raise ProviderDown(prompt)
        return prompt.upper()

    async def scenario() -> None:
        assert await complete("hi", fail=False) == "HI"
        for _ in range(2):
            with pytest.raises(ProviderDown):
                await complete("x", fail=True)
        with pytest.raises(flexisync.CircuitOpenError):
            await complete("never", fail=False)
        with pytest.raises(flexisync.CircuitOpenError):
            async with breaker:
                ran.append("block")

    asyncio.run(scenario())
    assert ran == ["hi", "x", "x"]
    assert breaker.state == "open"


# --- the mirror -----------------------------------------------------------------------

def test_asking_twice_returns_the_same_object(sync: flexisync.Coordinator) -> None:
    """sync.breaker(name) with the same policy returns one object (safe per request)."""
    assert sync.breaker("provider", failure_threshold=3) is \
        sync.breaker("provider", failure_threshold=3)
    assert sync.breaker("provider") is not sync.breaker("provider", failure_threshold=3)


def test_two_objects_of_one_name_in_one_process_share_state(
        sync: flexisync.Coordinator) -> None:
    """A transition made through one object is seen by another of the same name."""
    first, second = sync.breaker("provider"), sync.breaker("provider", failure_threshold=9)
    assert first is not second
    assert second.state == "closed"
    first.trip(5)
    wait_until(lambda: second.stats().state == "open", timeout=5,
               message="second object mirrored the trip")


def test_missed_message_is_repaired_by_the_periodic_refresh(
        sync: flexisync.Coordinator, raw: redis.Redis) -> None:
    """A state change written without a PUBLISH is picked up by the periodic re-read."""
    breaker = sync.breaker("provider", refresh_interval=0.2)
    assert breaker.state == "closed"
    version = int(raw.hget(key(sync), "version") or 0)
    raw.hset(key(sync), mapping={"state": "forced_open", "version": version + 5})
    wait_until(lambda: breaker.stats().state == "forced_open", timeout=10,
               message="periodic refresh")


def test_out_of_order_versions_are_ignored(sync: flexisync.Coordinator) -> None:
    """A snapshot older than the one mirrored does not roll the mirror back."""
    breaker = sync.breaker("provider")
    breaker.trip(5)
    stats = breaker.stats()
    epoch = breaker._core._epoch
    breaker._core._on_message("", f"{epoch} {stats.version - 1} closed 0 0".encode(), None)
    assert breaker.stats().state == "open"
    breaker._core._on_message("", f"{epoch} {stats.version + 1} closed 0 0".encode(), None)
    assert breaker.stats().state == "closed"


def test_on_state_change_callbacks_run_off_the_caller_and_survive_errors(
        sync: flexisync.Coordinator) -> None:
    """Callbacks get (name, old, new) in order on the breaker thread; one raising does not
    stop the next."""
    breaker = sync.breaker("provider", failure_threshold=1)
    seen: list[tuple[str, str, str, str]] = []
    done = threading.Event()

    @breaker.on_state_change
    def broken(name: str, old: str, new: str) -> None:
        raise RuntimeError("callback bug")

    @breaker.on_state_change
    def record(name: str, old: str, new: str) -> None:
        seen.append((name, old, new, threading.current_thread().name))
        if new == "closed":
            done.set()

    fail_n(breaker, 1)
    breaker.reset()
    assert done.wait(10)
    assert [s[:3] for s in seen] == [("provider", "closed", "open"),
                                     ("provider", "open", "closed")]
    assert {s[3] for s in seen} == {"flexisync-breakers"}


def test_list_breakers_reports_shared_state(sync: flexisync.Coordinator) -> None:
    """list_breakers reads every breaker of the namespace from Redis, sorted by name."""
    sync.breaker("b-provider").trip(30)
    sync.breaker("a-provider").force_open()
    infos = list_breakers(sync)
    assert [(i.name, i.state) for i in infos] == [("a-provider", "forced_open"),
                                                  ("b-provider", "open")]
    assert infos[0].retry_after == math.inf
    assert 29 < infos[1].retry_after <= 30
    assert infos[1].trips == 1


def test_success_elsewhere_after_failures_resets_the_count_once_flushed(
        sync: flexisync.Coordinator, flexisync_url: str) -> None:
    """Consecutive mode across two Coordinators (as two processes): B's success, made
    after A's failures, reaches Redis in the background and resets the shared count."""
    a = sync.breaker("provider", failure_threshold=3)
    with flexisync.connect(flexisync_url, namespace=sync.namespace) as other:
        b = other.breaker("provider", failure_threshold=3)
        assert b.state == "closed"
        fail_n(a, 2)
        wait_until(lambda: b.stats().failures == 2 or b.stats().failures == 1, timeout=10,
                   message="B learned that failures are pending")
        assert b.call(lambda: "ok") == "ok"
        wait_until(lambda: breaker_info(sync, "provider").failures == 0, timeout=10,
                   message="B's success flushed")
        fail_n(a, 2)
        assert a.state == "closed"


# --- real provider SDK errors through the default breaker ------------------------------

def _openai_error(status: int, headers: dict[str, str] | None = None) -> Exception:
    import httpx  # test-only dependencies, imported where used
    import openai

    client = openai.OpenAI(api_key="sk-test", base_url="https://provider.test/v1",
                           max_retries=0)
    return client._make_status_error_from_response(httpx.Response(
        status, headers=headers or {}, json={"error": {"message": "x"}},
        request=httpx.Request("POST", "https://provider.test/v1/chat/completions")))


def _anthropic_error(status: int, kind: str, headers: dict[str, str] | None = None,
                     ) -> Exception:
    import anthropic
    import httpx2

    client = anthropic.Anthropic(api_key="sk-ant-test", base_url="https://provider.test",
                                 max_retries=0)
    return client._make_status_error_from_response(httpx2.Response(
        status, headers=headers or {},
        json={"type": "error", "error": {"type": kind, "message": "x"}},
        request=httpx2.Request("POST", "https://provider.test/v1/messages")))


def test_real_sdk_errors_with_the_default_breaker(sync: flexisync.Coordinator) -> None:
    """The issue's scenarios with the real openai and anthropic exceptions: 400 and 401
    never open; one 429 with ``retry-after-ms: 7000`` opens for 7 s (not 30, not after
    5); a failed probe with ``retry-after: 3`` reopens for 3 (not 60); info() says so."""
    breaker = sync.breaker("llm", failure_threshold=5, recovery_timeout=30)
    for exc in (_openai_error(400), _openai_error(401),
                _anthropic_error(400, "invalid_request_error"),
                _anthropic_error(401, "authentication_error")) * 5:
        fail_n(breaker, 1, exc)
    assert breaker_info(sync, "llm").failures == 0
    assert breaker.state == "closed"
    fail_n(breaker, 1, _openai_error(429, {"retry-after-ms": "7000", "retry-after": "7"}))
    info = breaker_info(sync, "llm")
    assert info.state == "open"
    assert info.open_period == pytest.approx(7)
    assert 6.5 < info.retry_after <= 7
    breaker.reset()
    breaker.trip(0.2)
    wait_until(lambda: breaker.stats().retry_after == 0, timeout=5)
    fail_n(breaker, 1, _anthropic_error(429, "rate_limit_error", {"retry-after": "3"}))
    info = breaker_info(sync, "llm")
    assert info.state == "open"
    assert info.open_period == pytest.approx(3)
    assert 2.5 < info.retry_after <= 3


def test_anthropic_overloaded_counts_and_a_shorter_retry_after_never_shortens(
        sync: flexisync.Coordinator) -> None:
    breaker = sync.breaker("llm", failure_threshold=2, recovery_timeout=30)
    fail_n(breaker, 2, _anthropic_error(529, "overloaded_error"))
    assert breaker.state == "open"
    assert breaker_info(sync, "llm").open_period == pytest.approx(30)
    breaker.trip(5)  # shorter: ignored
    info = breaker_info(sync, "llm")
    assert info.open_period == pytest.approx(30)
    assert 29 < info.retry_after <= 30
