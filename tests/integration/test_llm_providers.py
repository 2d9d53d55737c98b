"""The REAL ``openai`` and ``anthropic`` SDKs, against a fake provider on loopback, behind
flexisync's default breaker, a fleet-wide semaphore, and under gunicorn.

The SDKs run with ``max_retries=0`` (docs/llm.md): the breaker must see every failure.
The fake provider (``tests/fake_provider.py``) is a uvicorn subprocess scripted per test;
it counts the requests that reached it and the most that were in flight at once.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import flexisync
from flexisync.breaker import BreakerPolicy
from tests.fake_provider import FakeProvider, error, hang, ok, rate_limited, start_fake_provider
from tests.helpers import wait_until
from tests.servers.conftest import Server, free_port, reach_every_worker, server_env

anthropic = pytest.importorskip("anthropic")
openai = pytest.importorskip("openai")

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
PROMPT = [{"role": "user", "content": "hello"}]


def _default_classification_landed() -> bool:
    """True once the breaker reads provider errors by default (issue 11, deliverable 1)."""
    exc = RuntimeError("429")
    exc.response = SimpleNamespace(  # type: ignore[attr-defined]
        status_code=429, headers={"retry-after-ms": "7000"})
    try:
        return BreakerPolicy().retry_after_of(exc) == 7.0  # type: ignore[misc]
    except Exception:
        return False


needs_classification = pytest.mark.skipif(
    not _default_classification_landed(),
    reason="the breaker's default provider-error classification (issue 11 item 1) "
           "is not in this tree yet")


@pytest.fixture(scope="module")
def _provider_process() -> Iterator[FakeProvider]:
    with start_fake_provider() as provider:
        yield provider


@pytest.fixture
def provider(_provider_process: FakeProvider) -> FakeProvider:
    """The module's fake provider, reset: empty script, 200 by default, counters at 0."""
    _provider_process.reset()
    return _provider_process


# --- one request through a real SDK -----------------------------------------------------

Caller = Callable[..., Awaitable[str]]


def make_caller(provider: FakeProvider, sdk: str, mode: str, *,
                timeout: float = 5.0) -> Caller:
    """``await call(breaker)`` makes one request with the real SDK through ``breaker``
    (``breaker.call`` for the sync clients, ``await breaker.acall`` for the async ones)."""
    if sdk == "openai":
        cls = openai.OpenAI if mode == "sync" else openai.AsyncOpenAI
        client = cls(base_url=provider.openai_base, api_key="sk-fake", max_retries=0,
                     timeout=timeout)

        def request() -> Any:
            return client.chat.completions.create(model="gpt-fake", messages=PROMPT)

        def text(reply: Any) -> str:
            return str(reply.choices[0].message.content)
    else:
        cls = anthropic.Anthropic if mode == "sync" else anthropic.AsyncAnthropic
        client = cls(base_url=provider.anthropic_base, api_key="sk-ant-fake",
                     max_retries=0, timeout=timeout)

        def request() -> Any:
            return client.messages.create(model="claude-fake", max_tokens=16,
                                          messages=PROMPT)

        def text(reply: Any) -> str:
            return str(reply.content[0].text)

    async def call(breaker: flexisync.CircuitBreaker, retry: Any = None) -> str:
        runner = breaker if retry is None else retry  # a Retrying has the same methods
        if mode == "sync":
            return text(runner.call(request))
        return text(await runner.acall(request))

    return call


SDKS = [pytest.param(sdk, mode, id=f"{sdk}-{mode}")
        for sdk in ("openai", "anthropic") for mode in ("sync", "async")]


def breaker_name() -> str:
    return f"llm-{uuid.uuid4().hex[:8]}"


async def expect_failure(call: Caller, breaker: flexisync.CircuitBreaker) -> BaseException:
    """Make one call that must raise the SDK's error (not CircuitOpenError); return it."""
    with pytest.raises(Exception) as caught:  # noqa: PT011 - each SDK has its own classes
        await call(breaker)
    assert not isinstance(caught.value, flexisync.CircuitOpenError), caught.value
    return caught.value


async def once_admitted(call: Caller, breaker: flexisync.CircuitBreaker,
                        timeout: float = 10.0) -> Any:
    """Call until the breaker admits the call (its open period is over); return what the
    admitted call returned, or the SDK error it raised. Bounded by ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await call(breaker)
        except flexisync.CircuitOpenError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.01)
        except Exception as exc:
            return exc


# --- the default breaker ---------------------------------------------------------------

@pytest.mark.parametrize(("sdk", "mode"), SDKS)
async def test_a_healthy_provider_answers_through_the_breaker(
        sync: flexisync.Coordinator, provider: FakeProvider, sdk: str, mode: str) -> None:
    call = make_caller(provider, sdk, mode)
    breaker = sync.breaker(breaker_name())
    assert await call(breaker) == "hello from the fake provider"
    assert breaker.state == "closed"
    assert provider.stats()["requests"] == 1


@pytest.mark.parametrize(("sdk", "mode"), SDKS)
@pytest.mark.parametrize("status", [500, 503, 529])
async def test_5xx_opens_the_breaker(sync: flexisync.Coordinator, provider: FakeProvider,
                                     sdk: str, mode: str, status: int) -> None:
    call = make_caller(provider, sdk, mode)
    breaker = sync.breaker(breaker_name(), failure_threshold=3, recovery_timeout=60.0)
    provider.script(default=error(status))
    for _ in range(3):
        await expect_failure(call, breaker)
    assert breaker.state == "open"
    with pytest.raises(flexisync.CircuitOpenError):
        await call(breaker)
    assert provider.stats()["requests"] == 3  # the rejected call never reached it


@pytest.mark.parametrize(("sdk", "mode"), SDKS)
async def test_timeouts_open_the_breaker(sync: flexisync.Coordinator, provider: FakeProvider,
                                         sdk: str, mode: str) -> None:
    call = make_caller(provider, sdk, mode, timeout=0.3)
    breaker = sync.breaker(breaker_name(), failure_threshold=2, recovery_timeout=60.0)
    provider.script(default=hang(5.0))
    for _ in range(2):
        exc = await expect_failure(call, breaker)
        assert "timeout" in type(exc).__name__.lower() or "timed out" in str(exc).lower()
    assert breaker.state == "open"


@needs_classification
@pytest.mark.parametrize(("sdk", "mode"), SDKS)
@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
async def test_caller_errors_never_open_the_breaker(
        sync: flexisync.Coordinator, provider: FakeProvider, sdk: str, mode: str,
        status: int) -> None:
    """A bad prompt or a wrong key is the caller's fault: not even one counts."""
    call = make_caller(provider, sdk, mode)
    breaker = sync.breaker(breaker_name(), failure_threshold=1)
    provider.script(error(status), error(status), error(status))
    for _ in range(3):
        exc = await expect_failure(call, breaker)
        assert getattr(exc, "status_code", None) == status
    assert breaker.state == "closed"
    assert breaker.info().failures == 0
    assert await call(breaker) == "hello from the fake provider"


RETRY_AFTER_FORMS = ["retry-after", "retry-after-ms", "openai-reset", "anthropic-reset"]


@needs_classification
@pytest.mark.parametrize(("sdk", "mode"), SDKS)
@pytest.mark.parametrize("form", RETRY_AFTER_FORMS)
async def test_one_429_opens_for_its_retry_after(
        sync: flexisync.Coordinator, provider: FakeProvider, sdk: str, mode: str,
        form: str) -> None:
    """One 429 opens the breaker at once (no failure_threshold needed) for the
    provider's Retry-After, not for recovery_timeout; then a probe goes out and closes."""
    call = make_caller(provider, sdk, mode)
    breaker = sync.breaker(breaker_name(), failure_threshold=5, recovery_timeout=60.0)
    provider.script(rate_limited(0.5, form))
    await expect_failure(call, breaker)
    info = breaker.info()
    assert info.state == "open"
    assert info.open_period is not None
    # The reset headers are absolute instants written with ms precision: allow for the
    # time the reply took to travel; never the 60 s recovery_timeout.
    assert 0.2 <= info.open_period <= 0.6, info
    assert info.retry_after <= 0.6
    # Once that short period is over, the next call is the probe; it succeeds and closes.
    assert await once_admitted(call, breaker) == "hello from the fake provider"
    wait_until(lambda: breaker.state == "closed", timeout=10.0)
    assert provider.stats()["requests"] == 2


@needs_classification
@pytest.mark.parametrize(("sdk", "mode"), SDKS)
async def test_429_with_an_http_date(sync: flexisync.Coordinator, provider: FakeProvider,
                                     sdk: str, mode: str) -> None:
    """``retry-after: <HTTP date>`` (whole seconds): open for about that long."""
    call = make_caller(provider, sdk, mode)
    breaker = sync.breaker(breaker_name(), recovery_timeout=600.0)
    provider.script(rate_limited(3.0, "http-date"))
    await expect_failure(call, breaker)
    info = breaker.info()
    assert info.state == "open"
    assert info.open_period is not None
    assert 1.0 <= info.open_period <= 3.5, info


@needs_classification
@pytest.mark.parametrize(("sdk", "mode"), SDKS)
async def test_a_failed_probe_reopens_for_the_new_retry_after(
        sync: flexisync.Coordinator, provider: FakeProvider, sdk: str, mode: str) -> None:
    call = make_caller(provider, sdk, mode)
    breaker = sync.breaker(breaker_name(), recovery_timeout=30.0)
    provider.script(rate_limited(0.3), rate_limited(0.7))
    await expect_failure(call, breaker)
    probe = await once_admitted(call, breaker)  # the probe: another 429
    assert getattr(probe, "status_code", None) == 429, probe
    info = breaker.info()
    assert info.state == "open"
    assert info.open_period is not None
    assert 0.5 <= info.open_period <= 0.7, info


@needs_classification
async def test_anthropic_overloaded_mid_stream_opens(sync: flexisync.Coordinator,
                                                     provider: FakeProvider) -> None:
    """Anthropic's ``overloaded_error`` sent in a 200 stream counts as a failure."""
    client = anthropic.Anthropic(base_url=provider.anthropic_base, api_key="sk-ant-fake",
                                 max_retries=0, timeout=5.0)
    breaker = sync.breaker(breaker_name(), failure_threshold=1, recovery_timeout=60.0)
    provider.script({"status": 200, "stream_error": "overloaded_error"})

    def stream() -> str:
        with client.messages.stream(model="claude-fake", max_tokens=16,
                                    messages=PROMPT) as events:
            return str(events.get_final_text())

    with pytest.raises(anthropic.APIStatusError) as caught:
        breaker.call(stream)
    assert caught.value.status_code == 200
    assert breaker.state == "open"


# --- the retry helper: retries transient errors, stops when the breaker opens ---------

def _retrying_landed() -> bool:
    return hasattr(flexisync.breaker, "retrying")


needs_retrying = pytest.mark.skipif(not _retrying_landed(),
                                    reason="flexisync.breaker.retrying is not in this tree yet")


@needs_retrying
@pytest.mark.parametrize(("sdk", "mode"), SDKS)
async def test_retrying_recovers_from_a_transient_5xx(
        sync: flexisync.Coordinator, provider: FakeProvider, sdk: str, mode: str) -> None:
    call = make_caller(provider, sdk, mode)
    breaker = sync.breaker(breaker_name(), failure_threshold=5)
    retry = flexisync.breaker.retrying(breaker, attempts=3, backoff=0.01)
    provider.script(error(503), error(500))
    assert await call(breaker, retry) == "hello from the fake provider"
    assert provider.stats()["statuses"] == [503, 500, 200]
    assert breaker.state == "closed"


@needs_retrying
@pytest.mark.parametrize(("sdk", "mode"), SDKS)
async def test_retrying_stops_at_once_when_a_429_opens_the_breaker(
        sync: flexisync.Coordinator, provider: FakeProvider, sdk: str, mode: str) -> None:
    """No worker sleeps out a Retry-After inside a retry loop: the 429 opened the
    breaker for the fleet, so the retry gives up with CircuitOpenError at once."""
    call = make_caller(provider, sdk, mode)
    breaker = sync.breaker(breaker_name())
    retry = flexisync.breaker.retrying(breaker, attempts=5, backoff=0.01)
    provider.script(rate_limited(30.0, "retry-after"))
    with pytest.raises(flexisync.CircuitOpenError) as caught:
        await call(breaker, retry)
    assert getattr(caught.value.__cause__, "status_code", None) == 429
    assert 20.0 < caught.value.retry_after <= 30.0
    assert provider.stats()["requests"] == 1


@needs_retrying
@pytest.mark.parametrize(("sdk", "mode"), SDKS)
async def test_retrying_stops_when_the_failures_open_the_breaker(
        sync: flexisync.Coordinator, provider: FakeProvider, sdk: str, mode: str) -> None:
    call = make_caller(provider, sdk, mode)
    breaker = sync.breaker(breaker_name(), failure_threshold=2, recovery_timeout=60.0)
    retry = flexisync.breaker.retrying(breaker, attempts=10, backoff=0.01)
    provider.script(default=error(500))
    with pytest.raises(flexisync.CircuitOpenError):
        await call(breaker, retry)
    assert provider.stats()["requests"] == 2  # not 10: the breaker said stop


@needs_retrying
@needs_classification
@pytest.mark.parametrize(("sdk", "mode"), SDKS)
@pytest.mark.parametrize("status", [400, 401])
async def test_retrying_never_retries_a_caller_error(
        sync: flexisync.Coordinator, provider: FakeProvider, sdk: str, mode: str,
        status: int) -> None:
    call = make_caller(provider, sdk, mode)
    breaker = sync.breaker(breaker_name(), failure_threshold=1)
    retry = flexisync.breaker.retrying(breaker, attempts=5, backoff=0.01)
    provider.script(error(status))
    exc = await expect_failure(lambda b: call(b, retry), breaker)
    assert getattr(exc, "status_code", None) == status
    assert provider.stats()["requests"] == 1
    assert breaker.state == "closed"


# --- the semaphore: 8 processes, limit 3 -----------------------------------------------

def _semaphore_worker(url: str, namespace: str, name: str, base_url: str, *,
                      calls: int, start: Any) -> None:
    sync = flexisync.connect(url, namespace=namespace)
    client = openai.OpenAI(base_url=base_url, api_key="sk-fake", max_retries=0, timeout=30.0)
    semaphore = sync.semaphore(name, 3, lease=30.0)
    start.wait(60)  # a Barrier: every worker is connected and ready before any starts
    for _ in range(calls):
        with semaphore:
            client.chat.completions.create(model="gpt-fake", messages=PROMPT)
    sync.close()


def _semaphore_landed() -> bool:
    try:
        import flexisync.semaphores  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.skipif(not _semaphore_landed(), reason="sync.semaphore is not in this tree yet")
def test_semaphore_caps_concurrency_at_the_provider_across_8_processes(
        flexisync_url: str, namespace: str, provider: FakeProvider) -> None:
    # All 8 workers start together (a Barrier, after connecting: spawn start-up on a
    # loaded machine is staggered by seconds) and each call lasts long enough that 3
    # holders' requests overlap at the provider.
    provider.script(default=ok(delay=0.3))
    name = f"provider-{uuid.uuid4().hex[:6]}"
    mp = multiprocessing.get_context("spawn")
    start = mp.Barrier(8)
    workers = [mp.Process(target=_semaphore_worker,
                          args=(flexisync_url, namespace, name, provider.openai_base),
                          kwargs={"calls": 4, "start": start}) for _ in range(8)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
        assert worker.exitcode == 0
    stats = provider.stats()
    assert stats["requests"] == 32
    assert stats["max_in_flight"] <= 3, stats
    assert stats["max_in_flight"] == 3  # the limit was reached: the test had contention


# Long enough that the stuck holder still holds when the test looks, however slowly a
# loaded machine gets there (a 1 s lease lapsed before the check under the full suite).
_STUCK_LEASE = 5.0


def _holder_stuck_in_a_call(url: str, namespace: str, name: str, base_url: str,
                            holding: Any) -> None:
    sync = flexisync.connect(url, namespace=namespace)
    client = openai.OpenAI(base_url=base_url, api_key="sk-fake", max_retries=0,
                           timeout=60.0)
    with sync.semaphore(name, 1, lease=_STUCK_LEASE):
        holding.set()
        client.chat.completions.create(model="gpt-fake", messages=PROMPT)  # hangs


@pytest.mark.slow
@pytest.mark.skipif(not _semaphore_landed(), reason="sync.semaphore is not in this tree yet")
def test_a_sigkilled_holder_frees_its_slot_after_its_lease(
        sync: flexisync.Coordinator, flexisync_url: str, namespace: str,
        provider: FakeProvider) -> None:
    """A worker killed in the middle of a provider call (limit 1) does not block the
    fleet: its slot comes back when its lease (``_STUCK_LEASE``) runs out."""
    provider.script(hang(60.0))
    name = f"provider-{uuid.uuid4().hex[:6]}"
    mp = multiprocessing.get_context("spawn")
    holding = mp.Event()
    holder = mp.Process(target=_holder_stuck_in_a_call,
                        args=(flexisync_url, namespace, name, provider.openai_base, holding))
    holder.start()
    try:
        assert holding.wait(60)
        wait_until(lambda: provider.stats()["requests"] == 1, timeout=30.0)
        semaphore = sync.semaphore(name, 1, lease=30.0)
        assert semaphore.acquire(blocking=False) is False  # held by the stuck worker
        holder.kill()  # SIGKILL: no chance to release
        holder.join(30)
        assert semaphore.acquire(timeout=30.0) is True  # after the dead holder's lease
        client = openai.OpenAI(base_url=provider.openai_base, api_key="sk-fake",
                               max_retries=0, timeout=10.0)
        client.chat.completions.create(model="gpt-fake", messages=PROMPT)
        semaphore.release()
        assert provider.stats()["requests"] == 2
    finally:
        if holder.is_alive():
            holder.kill()
            holder.join(30)


async def test_semaphore_caps_concurrency_of_async_clients(
        aio: Any, provider: FakeProvider) -> None:
    if not hasattr(aio, "semaphore") or not _semaphore_landed():
        pytest.skip("aio semaphore is not in this tree yet")
    provider.script(default=ok(delay=0.05))
    client = openai.AsyncOpenAI(base_url=provider.openai_base, api_key="sk-fake",
                                max_retries=0, timeout=30.0)
    semaphore = aio.semaphore(f"provider-{uuid.uuid4().hex[:6]}", 2)

    async def one() -> None:
        async with semaphore:
            await client.chat.completions.create(model="gpt-fake", messages=PROMPT)

    await asyncio.gather(*(one() for _ in range(12)))
    await client.close()
    stats = provider.stats()
    assert stats["requests"] == 12
    assert stats["max_in_flight"] == 2, stats


# --- under gunicorn: after a trip only the allowed probes reach the provider ----------

@pytest.fixture
def gunicorn_llm(tmp_path: Path, flexisync_url: str, namespace: str,
                 provider: FakeProvider) -> Iterator[Any]:
    if not (BIN / "gunicorn").exists():
        pytest.skip("gunicorn is not installed")
    port = free_port()
    command = [str(BIN / "gunicorn"), "--workers", "4", "--worker-class", "sync",
               "--bind", f"127.0.0.1:{port}", "--chdir", str(ROOT / "tests" / "servers"),
               "--timeout", "30", "--graceful-timeout", "2", "--log-level", "warning",
               "llm_wsgi_app:application"]
    env = server_env(flexisync_url, namespace)
    env.update(FAKE_PROVIDER_URL=provider.openai_base,
               LLM_BREAKER=f"llm-{uuid.uuid4().hex[:8]}",
               PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
    server = Server("gunicorn", command, env, tmp_path / f"gunicorn-{port}.log", port)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.mark.slow
@needs_classification
def test_gunicorn_after_a_trip_only_the_allowed_probe_reaches_the_provider(
        gunicorn_llm: Any, provider: FakeProvider) -> None:
    server = gunicorn_llm
    reach_every_worker(server, "/breaker", accept=lambda r: r["state"] == "closed")
    before = provider.stats()["requests"]  # reaching the workers made no provider call
    assert before == 0

    # One 429 (Retry-After 1 s) through one worker opens the breaker for all four.
    provider.script(rate_limited(1.0), default=error(500))
    assert server.get("/complete")["result"] == "failed"
    reach_every_worker(server, "/complete", accept=lambda r: r["result"] == "rejected")
    assert provider.stats()["requests"] == 1

    # Many concurrent callers on all workers while the period ends: the provider (now
    # answering 500 slowly) sees exactly one probe, which reopens it.
    provider.script(default=error(500) | {"delay": 0.5})
    results: list[str] = []
    deadline = time.monotonic() + 15.0
    with ThreadPoolExecutor(8) as pool:
        while "failed" not in results and time.monotonic() < deadline:
            results += [r["result"] for r in pool.map(lambda _: server.get("/complete"),
                                                      range(16))]
    assert results.count("failed") == 1, results
    assert provider.stats()["requests"] == 2
    reach_every_worker(server, "/breaker", accept=lambda r: r["state"] == "open")
    assert provider.stats()["requests"] == 2

