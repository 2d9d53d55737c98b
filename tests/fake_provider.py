"""A fake LLM provider on loopback that the REAL ``openai`` and ``anthropic`` SDKs talk to.

Endpoints (enough of each API for the SDKs' ``base_url=``):

* ``POST /v1/chat/completions`` — OpenAI chat completions (``base_url=.../v1``);
* ``POST /v1/messages`` — Anthropic messages (``base_url=...``), also ``stream: true``.

Control endpoints (used by :class:`FakeProvider`):

* ``POST /_fake/script`` ``{"responses": [spec, ...], "default": spec|null}`` — the next
  requests get these specs in order, then the default (``{"status": 200}`` unless set);
* ``GET /_fake/stats`` — ``requests``, ``in_flight``, ``max_in_flight``, ``statuses``;
* ``POST /_fake/reset`` — empty script, default 200, counters to zero.

A spec is a dict: ``status`` (HTTP status, default 200), ``headers`` (added to the
reply), ``delay`` (seconds to wait before answering; counts as in flight), ``hang``
(seconds to wait without answering, to make the client time out), ``error_type`` (the
provider's error ``type``, e.g. ``overloaded_error``), ``stream_error`` (Anthropic
streams only: answer 200 and send this error ``type`` as an ``error`` event mid-stream).
Helpers :func:`ok`, :func:`error`, :func:`rate_limited`, :func:`hang` build specs.

Run it alone: ``python -m tests.fake_provider --port 8900``. In tests:
``with start_fake_provider() as provider: ...`` (a uvicorn subprocess on a free port).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from email.utils import formatdate
from pathlib import Path
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

ROOT = Path(__file__).resolve().parents[1]

Spec = dict[str, Any]

_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                403: "permission_error", 404: "not_found_error", 408: "timeout_error",
                429: "rate_limit_error", 500: "api_error", 503: "api_error",
                529: "overloaded_error"}


# --- spec builders (used by tests and the gateway example) -----------------------------

def ok(*, delay: float = 0.0, text: str = "hello from the fake provider") -> Spec:
    """A 200 answer, after ``delay`` seconds."""
    return {"status": 200, "delay": delay, "text": text}


def error(status: int, *, error_type: str | None = None,
          headers: dict[str, str] | None = None) -> Spec:
    """An error answer with the provider's JSON error body."""
    return {"status": status, "error_type": error_type, "headers": headers or {}}


def rate_limited(seconds: float, form: str = "retry-after") -> Spec:
    """A 429 whose wait is given in one header form:

    ``retry-after`` (seconds), ``retry-after-ms``, ``http-date`` (``retry-after`` as an
    HTTP date; whole seconds only), ``openai-reset`` (``x-ratelimit-reset-requests`` like
    ``1.5s``), ``anthropic-reset`` (``anthropic-ratelimit-requests-reset``, RFC 3339).
    """
    if form == "retry-after":
        headers = {"retry-after": f"{seconds:g}"}
    elif form == "retry-after-ms":
        headers = {"retry-after-ms": f"{seconds * 1000:g}"}
    elif form == "http-date":
        headers = {"retry-after": formatdate(time.time() + seconds, usegmt=True)}
    elif form == "openai-reset":
        headers = {"x-ratelimit-reset-requests": f"{seconds:g}s",
                   "x-ratelimit-remaining-requests": "0"}
    elif form == "anthropic-reset":
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(time.time() + seconds))
        frac = f"{(time.time() + seconds) % 1:.3f}"[1:]
        headers = {"anthropic-ratelimit-requests-reset": f"{stamp}{frac}Z",
                   "anthropic-ratelimit-requests-remaining": "0"}
    else:
        raise ValueError(f"unknown retry-after form {form!r}")
    return error(429, headers=headers)


def hang(seconds: float = 30.0) -> Spec:
    """Do not answer for ``seconds`` (the client's timeout fires first)."""
    return {"status": 200, "hang": seconds}


# --- the app ---------------------------------------------------------------------------

class _State:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.script: list[Spec] = []
        self.default: Spec = ok()
        self.requests = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.statuses: list[int] = []

    def next_spec(self) -> Spec:
        return self.script.pop(0) if self.script else dict(self.default)


def _error_body(api: str, status: int, error_type: str | None) -> dict[str, Any]:
    kind = error_type or _ERROR_TYPES.get(status, "api_error")
    message = f"fake provider: HTTP {status} {kind}"
    if api == "anthropic":
        return {"type": "error", "error": {"type": kind, "message": message}}
    return {"error": {"message": message, "type": kind, "param": None, "code": kind}}


def _openai_body(spec: Spec, payload: dict[str, Any]) -> dict[str, Any]:
    text = spec.get("text", "hello")
    return {"id": "chatcmpl-fake", "object": "chat.completion", "created": int(time.time()),
            "model": payload.get("model", "fake"),
            "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                         "message": {"role": "assistant", "content": text}}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}}


def _anthropic_body(spec: Spec, payload: dict[str, Any]) -> dict[str, Any]:
    return {"id": "msg_fake", "type": "message", "role": "assistant",
            "model": payload.get("model", "fake"),
            "content": [{"type": "text", "text": spec.get("text", "hello")}],
            "stop_reason": "end_turn", "stop_sequence": None,
            "usage": {"input_tokens": 10, "output_tokens": 5}}


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


async def _anthropic_stream(spec: Spec, payload: dict[str, Any]) -> AsyncIterator[bytes]:
    message = _anthropic_body(spec, payload) | {"content": [], "stop_reason": None}
    yield _sse("message_start", {"type": "message_start", "message": message})
    yield _sse("content_block_start", {"type": "content_block_start", "index": 0,
                                       "content_block": {"type": "text", "text": ""}})
    if spec.get("stream_error"):
        kind = spec["stream_error"]
        yield _sse("error", {"type": "error", "error": {"type": kind, "message": kind}})
        return
    yield _sse("content_block_delta", {"type": "content_block_delta", "index": 0,
                                       "delta": {"type": "text_delta",
                                                 "text": spec.get("text", "hello")}})
    yield _sse("content_block_stop", {"type": "content_block_stop", "index": 0})
    yield _sse("message_delta", {"type": "message_delta",
                                 "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                                 "usage": {"output_tokens": 5}})
    yield _sse("message_stop", {"type": "message_stop"})


def build_app() -> Starlette:
    """The fake provider's Starlette app (one state per app; run it in ONE process)."""
    state = _State()

    async def answer(request: Request, api: str) -> Response:
        state.requests += 1
        state.in_flight += 1
        state.max_in_flight = max(state.max_in_flight, state.in_flight)
        try:
            payload = await request.json()
            spec = state.next_spec()
            if spec.get("hang"):
                await asyncio.sleep(float(spec["hang"]))
            if spec.get("delay"):
                await asyncio.sleep(float(spec["delay"]))
            status = int(spec.get("status", 200))
            state.statuses.append(status)
            headers = {"x-request-id": f"req-{state.requests}", **spec.get("headers", {})}
            if status >= 400:
                return JSONResponse(_error_body(api, status, spec.get("error_type")),
                                    status_code=status, headers=headers)
            if api == "anthropic" and payload.get("stream"):
                return StreamingResponse(_anthropic_stream(spec, payload), headers=headers,
                                         media_type="text/event-stream")
            body = (_anthropic_body if api == "anthropic" else _openai_body)(spec, payload)
            return JSONResponse(body, headers=headers)
        finally:
            state.in_flight -= 1

    async def openai_chat(request: Request) -> Response:
        return await answer(request, "openai")

    async def anthropic_messages(request: Request) -> Response:
        return await answer(request, "anthropic")

    async def script(request: Request) -> Response:
        body = await request.json()
        state.script.extend(body.get("responses", []))
        if body.get("default") is not None:
            state.default = body["default"]
        return JSONResponse({"queued": len(state.script)})

    async def stats(_request: Request) -> Response:
        return JSONResponse({"requests": state.requests, "in_flight": state.in_flight,
                             "max_in_flight": state.max_in_flight,
                             "statuses": state.statuses, "queued": len(state.script)})

    async def reset(_request: Request) -> Response:
        state.reset()
        return JSONResponse({"reset": True})

    return Starlette(routes=[
        Route("/v1/chat/completions", openai_chat, methods=["POST"]),
        Route("/v1/messages", anthropic_messages, methods=["POST"]),
        Route("/_fake/script", script, methods=["POST"]),
        Route("/_fake/stats", stats, methods=["GET"]),
        Route("/_fake/reset", reset, methods=["POST"]),
    ])


# --- the client side -------------------------------------------------------------------

class FakeProvider:
    """Handle on a running fake provider: script its answers and read its counters."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        self.openai_base = f"{self.url}/v1"  # OpenAI(base_url=...)
        self.anthropic_base = self.url  # Anthropic(base_url=...)
        self._http = httpx.Client(base_url=self.url, timeout=10.0)

    def script(self, *responses: Spec, default: Spec | None = None) -> None:
        """Queue ``responses`` for the next requests; then answer ``default`` (if given)."""
        reply = self._http.post("/_fake/script",
                                json={"responses": list(responses), "default": default})
        reply.raise_for_status()

    def stats(self) -> dict[str, Any]:
        """``requests``, ``in_flight``, ``max_in_flight``, ``statuses``, ``queued``."""
        reply = self._http.get("/_fake/stats")
        reply.raise_for_status()
        result: dict[str, Any] = reply.json()
        return result

    def reset(self) -> None:
        """Empty the script, answer 200 by default, zero the counters."""
        self._http.post("/_fake/reset").raise_for_status()

    def close(self) -> None:
        self._http.close()


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def start_fake_provider(timeout: float = 30.0) -> Iterator[FakeProvider]:
    """Run the fake provider in a uvicorn subprocess on a free loopback port.

    Yields a ready :class:`FakeProvider`; kills the subprocess's group on exit.
    """
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.fake_provider", "--port", str(port)],
        cwd=str(ROOT), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL, start_new_session=True,
    )
    provider = FakeProvider(f"http://127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                err = process.stderr.read().decode(errors="replace") if process.stderr else ""
                raise RuntimeError(f"fake provider exited with {process.returncode}: {err}")
            with contextlib.suppress(httpx.HTTPError):
                provider.stats()
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"fake provider did not start within {timeout}s")
            time.sleep(0.05)
        yield provider
    finally:
        provider.close()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10.0)
        if process.stderr:
            process.stderr.close()


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=8900)
    args = parser.parse_args()
    uvicorn.run(build_app(), host="127.0.0.1", port=args.port, log_level="warning",
                timeout_keep_alive=30)


if __name__ == "__main__":
    main()
