"""A WSGI app calling the fake provider with the REAL ``openai`` SDK through the default
breaker, for ``tests/integration/test_llm_providers.py`` under gunicorn (4 workers).

Environment: ``FLEXISYNC_URL``, ``FLEXISYNC_NAMESPACE``, ``FAKE_PROVIDER_URL`` (the
OpenAI ``base_url``), ``LLM_BREAKER`` (the breaker's name).

``GET /pid``        which worker answered
``GET /complete``   one chat completion: ``result`` is ok / failed / rejected
``GET /breaker``    this worker's view of the breaker
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from typing import Any

import openai

import flexisync

sync = flexisync.connect(os.environ.get("FLEXISYNC_URL"),
                         namespace=os.environ.get("FLEXISYNC_NAMESPACE", "llm-wsgi"))
breaker = sync.breaker(os.environ.get("LLM_BREAKER", "llm:openai"),
                       recovery_timeout=30.0, half_open_max_calls=1)
client = openai.OpenAI(base_url=os.environ.get("FAKE_PROVIDER_URL"), api_key="sk-fake",
                       max_retries=0, timeout=10.0)


def _complete() -> dict[str, Any]:
    def request() -> Any:
        return client.chat.completions.create(
            model="gpt-fake", messages=[{"role": "user", "content": "hello"}])

    try:
        reply = breaker.call(request)
    except flexisync.CircuitOpenError as exc:
        return {"result": "rejected", "retry_after": exc.retry_after}
    except openai.APIError as exc:
        return {"result": "failed", "error": type(exc).__name__}
    return {"result": "ok", "text": reply.choices[0].message.content}


def application(environ: dict[str, Any],
                start_response: Callable[..., Any]) -> Iterable[bytes]:
    path = environ.get("PATH_INFO", "/")
    if path == "/complete":
        body = _complete()
    elif path == "/breaker":
        body = {"state": breaker.state}
    elif path == "/pid":
        body = {}
    else:
        start_response("404 Not Found", [("Content-Type", "application/json")])
        return [b"{}"]
    body["pid"] = os.getpid()
    start_response("200 OK", [("Content-Type", "application/json")])
    return [json.dumps(body).encode()]
