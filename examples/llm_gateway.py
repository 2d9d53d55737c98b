"""An async LLM gateway: every worker of the fleet shares, per provider, one circuit
breaker, one concurrency limit and one token budget, and falls back to a second
provider while the first one is open.

Per request (``POST /v1/complete`` with ``{"prompt": "...", "max_tokens": 64}``), for the
primary provider (OpenAI chat completions) and then, if it cannot serve, the fallback
(Anthropic messages):

1. **token budget**: reserve an estimate of the tokens the call will use from the
   fleet-wide limiter (``rate_limiter``; waits at most ``QUEUE_TIMEOUT`` seconds), and
   ``settle`` it with the usage the provider reports afterwards (or 0 if no call
   was made);
2. **concurrency**: hold one slot of the fleet-wide ``semaphore`` during the call;
3. **breaker**: make the call through the provider's breaker with the SDK's own retries
   off (``max_retries=0``): the breaker's default classification opens it on 5xx,
   timeouts and overload, opens it on a 429 for exactly the provider's Retry-After, and
   ignores 400/401 (the caller's fault: they are returned as 4xx, with no fallback).

While the primary's breaker is open, requests go straight to the fallback without
touching the primary. ``GET /health`` shows both breakers.

Run it (two terminals) against the fake provider used by the test suite::

    python -m tests.fake_provider --port 8900
    python examples/llm_gateway.py --port 8000
    curl -s localhost:8000/v1/complete -d '{"prompt": "hello"}'

Environment: ``FLEXISYNC_URL`` (Redis), ``FLEXISYNC_NAMESPACE``;
``PRIMARY_BASE_URL`` (default ``http://127.0.0.1:8900/v1``, the fake provider),
``FALLBACK_BASE_URL`` (default ``http://127.0.0.1:8900``); ``OPENAI_API_KEY``,
``ANTHROPIC_API_KEY``, ``PRIMARY_MODEL``, ``FALLBACK_MODEL``. To use the real APIs set
``PRIMARY_BASE_URL=https://api.openai.com/v1`` and
``FALLBACK_BASE_URL=https://api.anthropic.com`` with real keys. Limits:
``CONCURRENCY`` (default 8 calls in flight per provider, fleet-wide),
``TOKENS_PER_MINUTE`` (default 100000 per provider, fleet-wide).
"""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import anthropic
import openai
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

import flexisync
import flexisync.aio
from flexisync.aio.breaker import AsyncCircuitBreaker
from flexisync.aio.rate_limiter import AsyncRateLimiter
from flexisync.aio.semaphores import AsyncSemaphore

QUEUE_TIMEOUT = 10.0  # seconds a request may wait for tokens or a slot


@dataclass
class Answer:
    text: str
    tokens: int  # total tokens the provider reports


@dataclass
class Provider:
    """One upstream: its call, and the fleet-wide breaker, semaphore and token budget."""

    name: str
    call: Callable[[str, int], Awaitable[Answer]]
    breaker: AsyncCircuitBreaker
    slots: AsyncSemaphore
    tokens: AsyncRateLimiter

    async def complete(self, prompt: str, max_tokens: int) -> Answer:
        """Call the provider under its budget, its concurrency limit and its breaker.

        Raises:
            flexisync.CircuitOpenError: the breaker is open (nothing was sent).
            TimeoutError: no tokens or no slot within ``QUEUE_TIMEOUT`` seconds.
            Exception: the SDK's error for this call.
        """
        # Rough estimate: prompt tokens (~4 characters each) plus the most it may write.
        estimate = len(prompt) / 4 + max_tokens
        reservation = await self.tokens.acquire(estimate, timeout=QUEUE_TIMEOUT)
        used = 0.0
        try:
            async with self.slots:
                answer = await self.breaker.acall(self.call, prompt, max_tokens)
            used = answer.tokens
            return answer
        finally:
            # Reserve-then-settle: charge what the provider reported (0 if no call
            # happened or it failed), so the budget tracks real usage.
            await reservation.settle(used)


def openai_caller(client: openai.AsyncOpenAI, model: str) -> Callable[[str, int],
                                                                       Awaitable[Answer]]:
    async def call(prompt: str, max_tokens: int) -> Answer:
        reply = await client.chat.completions.create(
            model=model, max_tokens=max_tokens,
            messages=[{"role": "user", "content": prompt}])
        tokens = reply.usage.total_tokens if reply.usage else 0
        return Answer(reply.choices[0].message.content or "", tokens)

    return call


def anthropic_caller(client: anthropic.AsyncAnthropic, model: str,
                     ) -> Callable[[str, int], Awaitable[Answer]]:
    async def call(prompt: str, max_tokens: int) -> Answer:
        reply = await client.messages.create(
            model=model, max_tokens=max_tokens,
            messages=[{"role": "user", "content": prompt}])
        text = "".join(getattr(block, "text", "") for block in reply.content)
        return Answer(text, reply.usage.input_tokens + reply.usage.output_tokens)

    return call


def caller_error(exc: BaseException) -> int | None:
    """The HTTP status of an error that is the caller's fault (4xx but 408/429)."""
    status = flexisync.breaker.http_status(exc)
    if status is not None and 400 <= status < 500 and status not in (408, 429):
        return status
    return None


def build_app() -> Starlette:
    """The gateway app; providers and the Coordinator are set up in its lifespan."""
    env = os.environ.get
    providers: list[Provider] = []

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        coordinator = flexisync.aio.connect(
            env("FLEXISYNC_URL"), namespace=env("FLEXISYNC_NAMESPACE", "llm-gateway"))
        concurrency = int(env("CONCURRENCY", "8"))
        tokens_per_minute = float(env("TOKENS_PER_MINUTE", "100000"))
        primary = openai.AsyncOpenAI(
            base_url=env("PRIMARY_BASE_URL", "http://127.0.0.1:8900/v1"),
            api_key=env("OPENAI_API_KEY", "sk-fake"), max_retries=0, timeout=30.0)
        fallback = anthropic.AsyncAnthropic(
            base_url=env("FALLBACK_BASE_URL", "http://127.0.0.1:8900"),
            api_key=env("ANTHROPIC_API_KEY", "sk-ant-fake"), max_retries=0, timeout=30.0)
        calls = {
            "primary": openai_caller(primary, env("PRIMARY_MODEL", "gpt-4o-mini")),
            "fallback": anthropic_caller(fallback,
                                         env("FALLBACK_MODEL", "claude-3-5-haiku-latest")),
        }
        for name, call in calls.items():
            providers.append(Provider(
                name, call,
                breaker=coordinator.breaker(f"llm:{name}", failure_threshold=3,
                                            recovery_timeout=10.0),
                slots=coordinator.semaphore(f"llm:{name}", concurrency, lease=60.0,
                                            timeout=QUEUE_TIMEOUT),
                tokens=coordinator.rate_limiter(f"llm:{name}:tokens", tokens_per_minute,
                                                per=60.0)))
        try:
            yield
        finally:
            providers.clear()
            await primary.close()
            await fallback.close()
            await coordinator.aclose()

    async def complete(request: Request) -> Response:
        body = await request.json()
        prompt = str(body.get("prompt", ""))
        max_tokens = int(body.get("max_tokens", 64))
        skipped: dict[str, str] = {}
        for provider in providers:
            try:
                answer = await provider.complete(prompt, max_tokens)
            except flexisync.CircuitOpenError as exc:
                skipped[provider.name] = f"open, retry in {exc.retry_after:.1f}s"
            except TimeoutError:
                skipped[provider.name] = "busy"
            except Exception as exc:
                status = caller_error(exc)
                if status is not None:  # the caller's fault: no fallback would help
                    return JSONResponse({"error": str(exc), "provider": provider.name},
                                        status_code=status)
                skipped[provider.name] = f"failed: {type(exc).__name__}"
            else:
                return JSONResponse({"provider": provider.name, "text": answer.text,
                                     "tokens": answer.tokens, "skipped": skipped})
        return JSONResponse({"error": "no provider available", "skipped": skipped},
                            status_code=503)

    async def health(_request: Request) -> Response:
        return JSONResponse({p.name: p.breaker.state for p in providers})

    return Starlette(routes=[Route("/v1/complete", complete, methods=["POST"]),
                             Route("/health", health, methods=["GET"])],
                     lifespan=lifespan)


app = build_app()


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description="flexisync LLM gateway example")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    uvicorn.run("llm_gateway:app", host="127.0.0.1", port=args.port,
                workers=args.workers, log_level="warning",
                app_dir=os.path.dirname(os.path.abspath(__file__)))


if __name__ == "__main__":
    main()
