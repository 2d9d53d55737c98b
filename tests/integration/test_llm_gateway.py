"""``examples/llm_gateway.py`` run for real (uvicorn subprocess, 2 workers) in front of
two fake providers: the primary answers the OpenAI API, the fallback the Anthropic API.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fake_provider import (
    FakeProvider,
    error,
    free_port,
    ok,
    rate_limited,
    start_fake_provider,
)
from tests.helpers import wait_until

pytest.importorskip("openai")
pytest.importorskip("anthropic")

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def _providers() -> Iterator[tuple[FakeProvider, FakeProvider]]:
    with start_fake_provider() as primary, start_fake_provider() as fallback:
        yield primary, fallback


@pytest.fixture
def providers(_providers: tuple[FakeProvider, FakeProvider],
              ) -> tuple[FakeProvider, FakeProvider]:
    for provider in _providers:
        provider.reset()
    return _providers


class Gateway:
    def __init__(self, base: str) -> None:
        self.http = httpx.Client(base_url=base, timeout=30.0)

    def complete(self, prompt: str = "hello", **extra: Any) -> httpx.Response:
        return self.http.post("/v1/complete", json={"prompt": prompt, **extra})

    def health(self) -> dict[str, str]:
        reply = self.http.get("/health")
        reply.raise_for_status()
        result: dict[str, str] = reply.json()
        return result


@pytest.fixture
def gateway_env() -> dict[str, str]:
    """Settings for the gateway; a test may override it (parametrize indirectly)."""
    return {"CONCURRENCY": "4", "TOKENS_PER_MINUTE": "1000000"}


@pytest.fixture
def gateway(flexisync_url: str, namespace: str, tmp_path: Path,
            providers: tuple[FakeProvider, FakeProvider],
            gateway_env: dict[str, str]) -> Iterator[Gateway]:
    primary, fallback = providers
    port = free_port()
    env = dict(os.environ)
    env.update(FLEXISYNC_URL=flexisync_url, FLEXISYNC_NAMESPACE=namespace,
               PRIMARY_BASE_URL=primary.openai_base,
               FALLBACK_BASE_URL=fallback.anthropic_base, PYTHONUNBUFFERED="1",
               **gateway_env)
    env.pop("FLEXISYNC_TEST_URL", None)
    log = tmp_path / "gateway.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, str(ROOT / "examples" / "llm_gateway.py"), "--port", str(port),
             "--workers", "2"],
            cwd=str(ROOT), env=env, stdout=out, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True)
    gateway = Gateway(f"http://127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + 60.0
        while True:
            if process.poll() is not None:
                pytest.fail(f"gateway exited: {log.read_text(errors='replace')[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if gateway.health():
                    break
            if time.monotonic() > deadline:
                pytest.fail(f"gateway not ready: {log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.05)
        yield gateway
    finally:
        gateway.http.close()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10.0)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10.0)


def test_gateway_uses_the_primary_while_it_is_healthy(
        gateway: Gateway, providers: tuple[FakeProvider, FakeProvider]) -> None:
    primary, fallback = providers
    reply = gateway.complete()
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["provider"] == "primary"
    assert body["text"] == "hello from the fake provider"
    assert body["tokens"] == 15  # the usage the fake provider reports (settled)
    assert primary.stats()["requests"] == 1
    assert fallback.stats()["requests"] == 0


def test_gateway_falls_back_while_the_primary_is_open(
        gateway: Gateway, providers: tuple[FakeProvider, FakeProvider]) -> None:
    primary, fallback = providers
    primary.script(default=error(503))
    # Three failures (failure_threshold=3) are each answered by the fallback...
    for _ in range(3):
        reply = gateway.complete()
        assert reply.status_code == 200, reply.text
        assert reply.json()["provider"] == "fallback"
        assert reply.json()["skipped"]["primary"].startswith("failed")
    assert primary.stats()["requests"] == 3
    # ...then the primary is open for the whole gateway fleet: it is not even asked.
    wait_until(lambda: gateway.health()["primary"] == "open", timeout=10.0)
    for _ in range(6):
        reply = gateway.complete()
        assert reply.json()["provider"] == "fallback"
        assert reply.json()["skipped"]["primary"].startswith("open")
    assert primary.stats()["requests"] == 3
    assert fallback.stats()["requests"] == 9


def test_gateway_429_opens_the_primary_for_its_retry_after(
        gateway: Gateway, providers: tuple[FakeProvider, FakeProvider]) -> None:
    primary, _fallback = providers
    primary.script(rate_limited(0.5, "retry-after-ms"), default=ok())
    reply = gateway.complete()
    assert reply.json()["provider"] == "fallback"  # one 429 opened it at once
    # After the provider's 0.5 s (not the 10 s recovery_timeout) the primary serves again.
    wait_until(lambda: gateway.complete().json()["provider"] == "primary", timeout=5.0,
               interval=0.05)
    assert gateway.health()["primary"] == "closed"


def test_gateway_returns_caller_errors_without_falling_back(
        gateway: Gateway, providers: tuple[FakeProvider, FakeProvider]) -> None:
    primary, fallback = providers
    primary.script(*(error(400) for _ in range(5)))
    for _ in range(5):
        reply = gateway.complete()
        assert reply.status_code == 400
        assert reply.json()["provider"] == "primary"
    assert fallback.stats()["requests"] == 0
    assert gateway.health()["primary"] == "closed"  # a bad request never opens it
    assert gateway.complete().json()["provider"] == "primary"


def test_gateway_both_providers_down_is_a_503(
        gateway: Gateway, providers: tuple[FakeProvider, FakeProvider]) -> None:
    primary, fallback = providers
    primary.script(default=error(500))
    fallback.script(default=error(529, error_type="overloaded_error"))
    reply = gateway.complete()
    assert reply.status_code == 503
    assert set(reply.json()["skipped"]) == {"primary", "fallback"}


@pytest.mark.parametrize("gateway_env", [{"TOKENS_PER_MINUTE": "100"}])
def test_gateway_settles_token_reservations_with_the_reported_usage(
        gateway: Gateway, providers: tuple[FakeProvider, FakeProvider]) -> None:
    """Budget 100 tokens/min; each request reserves ~65 (prompt + max_tokens) and the
    provider reports 15. Settling gives the other ~50 back, so five requests in a row
    all fit the primary's budget; without settling the second would wait ~18 s
    (refused at once: more than the gateway's 10 s queue timeout) and fall back."""
    primary, fallback = providers
    for _ in range(5):
        reply = gateway.complete(max_tokens=64)
        assert reply.status_code == 200, reply.text
        assert reply.json()["provider"] == "primary", reply.json()
    assert primary.stats()["requests"] == 5
    assert fallback.stats()["requests"] == 0
    # A request bigger than what is left (100 - 5 x 15 = 25 tokens) is refused by the
    # primary's budget without a call, and served by the fallback's.
    reply = gateway.complete(max_tokens=90)
    assert reply.json()["provider"] == "fallback", reply.json()
    assert reply.json()["skipped"]["primary"] == "busy"
    assert primary.stats()["requests"] == 5
