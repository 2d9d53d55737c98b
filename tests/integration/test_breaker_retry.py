"""``retrying(breaker)``: retries that cooperate with the shared breaker, sync and
asyncio, with a fake provider call raising the REAL exceptions of the openai and
anthropic SDKs (built by the SDKs' own factories from a response with the headers).

Only the sleep is replaced (it is the clock): the tests record the delays asked for.
"""

from __future__ import annotations

import asyncio
import os
import threading
from typing import Any

import pytest

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import anthropic
import httpx
import httpx2
import openai

import flexisync
from flexisync.breaker import Retrying, breaker_info, retrying
from flexisync.breaker import _retry as retry_module
from tests.helpers import wait_until

URL = "https://provider.test/v1/chat/completions"


def openai_error(status: int, headers: dict[str, str] | None = None) -> Exception:
    client = openai.OpenAI(api_key="sk-test", base_url="https://provider.test/v1",
                           max_retries=0)
    response = httpx.Response(status, headers=headers or {},
                              json={"error": {"message": "x", "type": "x"}},
                              request=httpx.Request("POST", URL))
    return client._make_status_error_from_response(response)


def anthropic_overloaded() -> Exception:
    client = anthropic.Anthropic(api_key="sk-ant-test", base_url="https://provider.test",
                                 max_retries=0)
    body = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    response = httpx2.Response(529, json=body, request=httpx2.Request("POST", URL))
    return client._make_status_error_from_response(response)


class FakeProvider:
    """A provider call answering from a script: an exception to raise or a value."""

    def __init__(self, *answers: Any) -> None:
        self.answers = list(answers)
        self.calls = 0

    def __call__(self, prompt: str = "") -> Any:
        self.calls += 1
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, BaseException):
            raise answer
        return f"{answer}:{prompt}"

    async def acall(self, prompt: str = "") -> Any:
        await asyncio.sleep(0)
        return self(prompt)


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The delays the helper sleeps (the sleep itself is skipped: it is the clock)."""
    asked: list[float] = []

    def fake_sleep(core: Any, seconds: float) -> bool:
        asked.append(seconds)
        return False  # the breaker did not open meanwhile

    async def fake_async_sleep(core: Any, seconds: float) -> bool:
        return fake_sleep(core, seconds)

    monkeypatch.setattr(retry_module, "_sleep", fake_sleep)
    monkeypatch.setattr(retry_module, "_async_sleep", fake_async_sleep)
    return asked


# --- blocking ---------------------------------------------------------------------------

def test_transient_errors_are_retried_with_backoff_and_counted(
        sync: flexisync.Coordinator, sleeps: list[float]) -> None:
    """Two 500s then an answer: three calls, each failure counted by the breaker,
    exponential backoff between them."""
    breaker = sync.breaker("llm", failure_threshold=5)
    provider = FakeProvider(openai_error(500), anthropic_overloaded(), "ok")
    retry = retrying(breaker, attempts=3, backoff=0.5, jitter=False)
    assert retry.call(provider, "hi") == "ok:hi"
    assert provider.calls == 3
    assert sleeps == [0.5, 1.0]
    assert breaker.stats().local_failures == 2
    assert breaker.state == "closed"


def test_jitter_keeps_the_delay_within_half_and_full(
        sync: flexisync.Coordinator, sleeps: list[float]) -> None:
    breaker = sync.breaker("llm", failure_threshold=50)
    provider = FakeProvider(*[openai_error(503)] * 6, "ok")
    assert retrying(breaker, attempts=7, backoff=1, max_backoff=4).call(provider) == "ok:"
    for delay, full in zip(sleeps, [1, 2, 4, 4, 4, 4], strict=True):
        assert full / 2 <= delay <= full


def test_stops_the_moment_the_breaker_opens(sync: flexisync.Coordinator,
                                             sleeps: list[float]) -> None:
    """The failure that opens the breaker ends the retries: CircuitOpenError (chained
    to that failure) instead of a sleep, attempts left unused."""
    breaker = sync.breaker("llm", failure_threshold=2, recovery_timeout=30)
    provider = FakeProvider(openai_error(503))
    with pytest.raises(flexisync.CircuitOpenError) as raised:
        retrying(breaker, attempts=10, backoff=0.01).call(provider)
    assert provider.calls == 2
    assert len(sleeps) == 1
    assert isinstance(raised.value.__cause__, openai.InternalServerError)
    assert 25 < raised.value.retry_after <= 30


def test_a_429_with_retry_after_opens_the_breaker_and_stops(
        sync: flexisync.Coordinator, sleeps: list[float]) -> None:
    """One 429 with retry-after: the breaker opens for exactly that long (fleet-wide)
    and the helper raises at once rather than sleeping inside the worker."""
    breaker = sync.breaker("llm", failure_threshold=5)
    provider = FakeProvider(openai_error(429, {"retry-after-ms": "7000"}))
    with pytest.raises(flexisync.CircuitOpenError) as raised:
        retrying(breaker, attempts=3).call(provider)
    assert provider.calls == 1
    assert sleeps == []
    assert isinstance(raised.value.__cause__, openai.RateLimitError)
    assert 6.5 < raised.value.retry_after <= 7
    assert breaker_info(sync, "llm").open_period == pytest.approx(7)


def test_the_breaker_open_before_an_attempt_rejects_it_unrun(
        sync: flexisync.Coordinator, sleeps: list[float]) -> None:
    """Opened by another process during the backoff: the next attempt is rejected
    without reaching the provider."""
    breaker = sync.breaker("llm", failure_threshold=5)
    provider = FakeProvider(openai_error(502), "ok")

    def tripped_elsewhere(core: Any, seconds: float) -> bool:
        sleeps.append(seconds)
        breaker.trip(30)  # as another worker's failure would, just as the pause ends
        return False

    retry_module._sleep = tripped_elsewhere  # the fixture restores it
    with pytest.raises(flexisync.CircuitOpenError):
        retrying(breaker, attempts=3).call(provider)
    assert provider.calls == 1
    assert len(sleeps) == 1


def test_caller_errors_are_not_retried_and_not_counted(
        sync: flexisync.Coordinator, sleeps: list[float]) -> None:
    breaker = sync.breaker("llm", failure_threshold=1)
    for status in (400, 401, 404):
        provider = FakeProvider(openai_error(status))
        with pytest.raises(openai.APIStatusError) as raised:
            retrying(breaker, attempts=3).call(provider)
        assert raised.value.status_code == status
        assert provider.calls == 1
    bug = FakeProvider(ValueError("ours"))
    with pytest.raises(ValueError, match="ours"):
        retrying(breaker, attempts=3).call(bug)
    assert bug.calls == 1  # not transient: not retried (still a failure for the breaker)
    assert sleeps == []


def test_the_last_failure_is_reraised_after_the_attempts(
        sync: flexisync.Coordinator, sleeps: list[float]) -> None:
    breaker = sync.breaker("llm", failure_threshold=10)
    provider = FakeProvider(openai.APITimeoutError(request=httpx.Request("POST", URL)))
    with pytest.raises(openai.APITimeoutError):
        retrying(breaker, attempts=3, backoff=0.01).call(provider)
    assert provider.calls == 3
    assert len(sleeps) == 2


def test_retry_after_is_honoured_when_the_breaker_lets_calls_through(
        sync: flexisync.Coordinator, sleeps: list[float]) -> None:
    """A disabled breaker counts nothing: the helper itself waits the retry-after (and
    gives up on one longer than max_wait)."""
    breaker = sync.breaker("llm")
    breaker.disable()
    provider = FakeProvider(openai_error(429, {"retry-after": "2"}), "ok")
    assert retrying(breaker, attempts=3).call(provider) == "ok:"
    assert sleeps == [2.0]
    too_long = FakeProvider(openai_error(429, {"retry-after": "120"}), "ok")
    with pytest.raises(openai.RateLimitError):
        retrying(breaker, attempts=3, max_wait=60).call(too_long)
    assert too_long.calls == 1


def test_decorator_and_retry_on(sync: flexisync.Coordinator, sleeps: list[float]) -> None:
    breaker = sync.breaker("llm", failure_threshold=10)
    provider = FakeProvider(KeyError("flaky"), "ok")

    @retrying(breaker, attempts=2, retry_on=lambda exc: isinstance(exc, KeyError))
    def complete(prompt: str) -> str:
        return str(provider(prompt))

    assert complete("x") == "ok:x"
    assert complete.__name__ == "complete"
    assert provider.calls == 2


@pytest.mark.parametrize(("options", "needle"), [
    ({"attempts": 0}, "attempts"), ({"attempts": 1.5}, "attempts"),
    ({"backoff": -1}, "backoff"), ({"max_wait": float("inf")}, "max_wait"),
    ({"retry_on": 3}, "retry_on"),
])
def test_bad_arguments(sync: flexisync.Coordinator, options: dict[str, Any],
                       needle: str) -> None:
    with pytest.raises(flexisync.ConfigError, match=needle):
        retrying(sync.breaker("llm"), **options)
    with pytest.raises(flexisync.ConfigError, match="CircuitBreaker"):
        Retrying(object())


# --- asyncio ------------------------------------------------------------------------------

def test_a_backoff_ends_the_moment_another_process_opens_the_breaker(
        sync: flexisync.Coordinator, flexisync_url: str, namespace: str) -> None:
    """Real pause (no clock stub): a 60 s backoff is cut short when the shared breaker
    opens (here: tripped through a second Redis client, as another worker would), and
    the helper raises CircuitOpenError chained to the last failure, unrun."""
    breaker = sync.breaker("llm", failure_threshold=10)
    provider = FakeProvider(openai_error(503), "ok")
    outcome: list[BaseException] = []

    def worker() -> None:
        try:
            retrying(breaker, attempts=3, backoff=60, jitter=False).call(provider)
        except BaseException as exc:  # handed to the test
            outcome.append(exc)

    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    wait_until(lambda: provider.calls == 1, message="first attempt failed")
    with flexisync.connect(flexisync_url, namespace=namespace) as other:
        # another policy: another mirror of the same shared state, as in another worker
        other.breaker("llm", failure_threshold=3).trip(30)
    thread.join(10)
    assert not thread.is_alive(), "the backoff did not end when the breaker opened"
    assert isinstance(outcome[0], flexisync.CircuitOpenError)
    assert isinstance(outcome[0].__cause__, openai.InternalServerError)
    assert provider.calls == 1
    assert breaker.stats().rejected == 0  # not even admitted: no attempt was made


async def test_async_a_backoff_ends_when_the_breaker_opens(aio: Any) -> None:
    breaker = aio.breaker("llm", failure_threshold=10)
    provider = FakeProvider(openai_error(503), "ok")
    task = asyncio.ensure_future(
        retrying(breaker, attempts=3, backoff=60, jitter=False).acall(provider.acall))
    while provider.calls < 1:
        await asyncio.sleep(0.005)
    await breaker.trip(30)
    with pytest.raises(flexisync.CircuitOpenError):
        await asyncio.wait_for(task, 10)
    assert provider.calls == 1


async def test_async_retries_and_stops_when_open(aio: Any, sleeps: list[float]) -> None:
    breaker = aio.breaker("llm", failure_threshold=3, recovery_timeout=30)
    provider = FakeProvider(openai_error(500), "ok")
    retry = retrying(breaker, attempts=3, jitter=False, backoff=0.25)
    assert await retry.acall(provider.acall, "a") == "ok:a"
    assert sleeps == [0.25]

    failing = FakeProvider(anthropic_overloaded())

    @retrying(breaker, attempts=5, backoff=0.01)
    async def complete(prompt: str) -> str:
        return str(await failing.acall(prompt))

    with pytest.raises(flexisync.CircuitOpenError) as raised:
        await complete("b")
    assert isinstance(raised.value.__cause__, anthropic.OverloadedError)
    # the success reset the count: the third failure opens it, attempts 4-5 never run
    assert failing.calls == 3
    assert (await breaker.info()).state == "open"


async def test_async_a_429_opens_and_stops(aio: Any, sleeps: list[float]) -> None:
    breaker = aio.breaker("llm")
    provider = FakeProvider(openai_error(429, {"retry-after": "0.3"}))
    with pytest.raises(flexisync.CircuitOpenError):
        await retrying(breaker).acall(provider.acall)
    assert provider.calls == 1
    assert sleeps == []
    assert (await breaker.info()).open_period == pytest.approx(0.3)


async def test_async_cancellation_propagates_during_the_backoff(aio: Any) -> None:
    """A task cancelled while it waits between attempts is cancelled (real sleep)."""
    breaker = aio.breaker("llm", failure_threshold=10)
    provider = FakeProvider(openai_error(503))
    task = asyncio.ensure_future(
        retrying(breaker, attempts=5, backoff=30, jitter=False).acall(provider.acall))
    while provider.calls < 1:
        await asyncio.sleep(0.005)
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert provider.calls == 1


def test_sync_shell_acall(sync: flexisync.Coordinator, sleeps: list[float]) -> None:
    """A CircuitBreaker (the blocking shell) also serves ``acall`` retries."""
    breaker = sync.breaker("llm", failure_threshold=10)
    provider = FakeProvider(openai_error(500), "ok")
    assert asyncio.run(retrying(breaker).acall(provider.acall, "s")) == "ok:s"
    assert provider.calls == 2
