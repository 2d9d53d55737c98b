"""Provider errors understood by duck typing, checked with the REAL exception objects of
the SDKs and HTTP clients (test-only dependencies), built the way each SDK builds them
from a response carrying the headers.

What the breaker does with them (counted, ignored, opened for the retry-after) is in
tests/contract/test_breaker.py; here: the default classification functions.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from typing import Any

import pytest

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # litellm: no network

import aiohttp
import anthropic
import httpx
import httpx2
import litellm
import openai
import requests
from google.genai import errors as genai_errors
from mistralai.client import errors as mistral_errors
from multidict import CIMultiDict, CIMultiDictProxy

from flexisync.breaker import (
    BreakerPolicy,
    http_status,
    provider_outcome,
    provider_retry_after,
    transient,
)

URL = "https://provider.test/v1/chat"


# --- building the exceptions the way each SDK does ----------------------------------------

def openai_error(status: int, headers: dict[str, str] | None = None,
                 body: dict[str, Any] | None = None) -> openai.APIStatusError:
    """What ``openai.OpenAI`` raises for a non-2xx answer (its own factory)."""
    client = openai.OpenAI(api_key="sk-test", base_url="https://provider.test/v1",
                           max_retries=0)
    response = httpx.Response(status, headers=headers or {},
                              json=body or {"error": {"message": "x", "type": "x"}},
                              request=httpx.Request("POST", URL))
    return client._make_status_error_from_response(response)


def anthropic_client() -> anthropic.Anthropic:
    return anthropic.Anthropic(api_key="sk-ant-test", base_url="https://provider.test",
                               max_retries=0)


def anthropic_error(status: int, headers: dict[str, str] | None = None,
                    kind: str = "api_error") -> anthropic.APIStatusError:
    """What ``anthropic.Anthropic`` raises for a non-2xx answer (its own factory)."""
    body = {"type": "error", "error": {"type": kind, "message": "x"}}
    response = httpx2.Response(status, headers=headers or {}, json=body,
                               request=httpx2.Request("POST", URL))
    return anthropic_client()._make_status_error_from_response(response)


def anthropic_stream_error(kind: str) -> anthropic.APIStatusError:
    """What the SDK's stream raises for an ``event: error`` arriving mid-stream on a
    200 response (anthropic/_streaming.py: ``_make_status_error(msg, body=...,
    response=self.response)``)."""
    body = {"type": "error", "error": {"type": kind, "message": "Overloaded"}}
    response = httpx2.Response(200, headers={"content-type": "text/event-stream"},
                               request=httpx2.Request("POST", URL))
    return anthropic_client()._make_status_error(f"{body}", body=body, response=response)


def genai_error(status: int, headers: dict[str, str] | None = None,
                details: list[dict[str, Any]] | None = None) -> genai_errors.APIError:
    """What google-genai raises for a non-2xx answer (``APIError.raise_for_response``)."""
    error: dict[str, Any] = {"code": status, "message": "x", "status": "X"}
    if details is not None:
        error["details"] = details
    response = httpx.Response(status, headers=headers or {}, json={"error": error},
                              request=httpx.Request("POST", URL))
    with pytest.raises(genai_errors.APIError) as caught:
        genai_errors.APIError.raise_for_response(response)
    return caught.value


def mistral_error(status: int, headers: dict[str, str] | None = None,
                  ) -> mistral_errors.SDKError:
    """What mistralai raises for an unexpected status (``SDKError(msg, http_res, text)``)."""
    response = httpx2.Response(status, headers=headers or {}, text='{"message": "x"}',
                               request=httpx2.Request("POST", URL))
    return mistral_errors.SDKError("API error occurred", response, response.text)


def litellm_error(status: int, headers: dict[str, str] | None = None) -> Exception:
    """litellm's mapped exceptions, built as its exception_mapping_utils builds them."""
    response = httpx.Response(status, headers=headers or {},
                              request=httpx.Request("POST", URL))
    args = {"message": "x", "llm_provider": "openai", "model": "gpt-4o",
            "response": response}
    cls: Any = {400: litellm.BadRequestError, 401: litellm.AuthenticationError,
                429: litellm.RateLimitError, 500: litellm.InternalServerError,
                503: litellm.ServiceUnavailableError}[status]
    return cls(**args)  # type: ignore[no-any-return]


def httpx_error(status: int, headers: dict[str, str] | None = None,
                ) -> httpx.HTTPStatusError:
    response = httpx.Response(status, headers=headers or {},
                              request=httpx.Request("POST", URL))
    with pytest.raises(httpx.HTTPStatusError) as caught:
        response.raise_for_status()
    return caught.value


def requests_error(status: int, headers: dict[str, str] | None = None,
                   ) -> requests.HTTPError:
    response = requests.Response()
    response.status_code = status
    response.url = URL
    response.reason = "X"
    response.headers.update(headers or {})
    with pytest.raises(requests.HTTPError) as caught:
        response.raise_for_status()
    return caught.value


def aiohttp_error(status: int, headers: dict[str, str] | None = None,
                  ) -> aiohttp.ClientResponseError:
    """As ``ClientResponse.raise_for_status`` builds it."""
    info = aiohttp.RequestInfo(url=__import__("yarl").URL(URL), method="POST",
                               headers=CIMultiDictProxy(CIMultiDict()),
                               real_url=__import__("yarl").URL(URL))
    return aiohttp.ClientResponseError(info, (), status=status, message="X",
                                       headers=CIMultiDictProxy(CIMultiDict(headers or {})))


FACTORIES = {
    "openai": openai_error, "anthropic": anthropic_error, "google-genai": genai_error,
    "mistralai": mistral_error, "litellm": litellm_error, "httpx": httpx_error,
    "requests": requests_error, "aiohttp": aiohttp_error,
}
SDKS = sorted(FACTORIES)


# --- status and outcome -------------------------------------------------------------------

@pytest.mark.parametrize("sdk", SDKS)
@pytest.mark.parametrize("status", [500, 503, 429])
def test_provider_failures_count_as_failures(sdk: str, status: int) -> None:
    exc = FACTORIES[sdk](status)
    assert http_status(exc) == status
    assert provider_outcome(exc) == "failure"
    assert transient(exc)


@pytest.mark.parametrize("sdk", SDKS)
@pytest.mark.parametrize("status", [400, 401])
def test_caller_errors_count_as_nothing(sdk: str, status: int) -> None:
    exc = FACTORIES[sdk](status)
    assert http_status(exc) == status
    assert provider_outcome(exc) == "ignore"
    assert not transient(exc)


@pytest.mark.parametrize("sdk", [s for s in SDKS if s != "litellm"])
@pytest.mark.parametrize(("status", "outcome"), [(408, "failure"), (404, "ignore"),
                                                 (422, "ignore"), (504, "failure")])
def test_other_statuses(sdk: str, status: int, outcome: str) -> None:
    exc = FACTORIES[sdk](status)
    assert provider_outcome(exc) == outcome
    assert transient(exc) == (outcome == "failure")


def test_anthropic_overloaded_529_is_a_failure() -> None:
    exc = anthropic_error(529, kind="overloaded_error")
    assert isinstance(exc, anthropic.APIStatusError)
    assert provider_outcome(exc) == "failure"
    assert transient(exc)


def test_anthropic_overloaded_mid_stream_on_a_200_is_a_failure() -> None:
    """The stream's ``event: error`` arrives on a 200 response: only the type says it."""
    exc = anthropic_stream_error("overloaded_error")
    assert exc.status_code == 200
    assert provider_outcome(exc) == "failure"
    assert transient(exc)
    bad_request = anthropic_stream_error("invalid_request_error")
    assert provider_outcome(bad_request) == "ignore"
    assert not transient(bad_request)


def test_an_error_body_type_is_read_from_the_body_too() -> None:
    """No ``type`` attribute (a plain APIStatusError of openai): the body's error type."""
    response = httpx.Response(200, request=httpx.Request("POST", URL))
    exc = openai.APIStatusError("x", response=response,
                                body={"error": {"type": "overloaded_error"}})
    assert provider_outcome(exc) == "failure"


@pytest.mark.parametrize("make", [
    lambda: openai.APITimeoutError(request=httpx.Request("POST", URL)),
    lambda: openai.APIConnectionError(request=httpx.Request("POST", URL)),
    lambda: anthropic.APITimeoutError(request=httpx2.Request("POST", URL)),
    lambda: anthropic.APIConnectionError(request=httpx2.Request("POST", URL)),
    lambda: litellm.Timeout(message="x", model="gpt-4o", llm_provider="openai"),
    lambda: litellm.APIConnectionError(message="x", llm_provider="openai", model="gpt-4o"),
    lambda: httpx.ConnectError("refused", request=httpx.Request("POST", URL)),
    lambda: httpx.ReadTimeout("slow", request=httpx.Request("POST", URL)),
    lambda: httpx.RemoteProtocolError("gone", request=httpx.Request("POST", URL)),
    lambda: requests.ConnectionError("refused"),
    lambda: requests.Timeout("slow"),
    aiohttp.ServerDisconnectedError,
    lambda: aiohttp.ClientConnectionError("refused"),
    asyncio.TimeoutError,
    lambda: ConnectionResetError(104, "reset"),
], ids=["openai-timeout", "openai-connection", "anthropic-timeout",
        "anthropic-connection", "litellm-timeout", "litellm-connection", "httpx-connect",
        "httpx-read-timeout", "httpx-protocol", "requests-connection", "requests-timeout",
        "aiohttp-disconnected", "aiohttp-connection", "asyncio-timeout", "socket-reset"])
def test_timeouts_and_connection_errors_are_transient_failures(make: Any) -> None:
    exc = make()
    assert provider_outcome(exc) in (None, "failure")  # None: failure_on decides (failure)
    assert transient(exc)
    assert provider_retry_after(exc) is None


@pytest.mark.parametrize("exc", [ValueError("bug"), KeyError("k"), RuntimeError("x"),
                                 FileNotFoundError("f")])
def test_exceptions_without_provider_signals_are_left_to_failure_on(exc: Exception) -> None:
    """Your own errors keep counting as failures (failure_on=Exception) and are not
    retried."""
    assert http_status(exc) is None
    assert provider_outcome(exc) is None
    assert not transient(exc)


def test_a_string_code_is_not_a_status() -> None:
    """OpenAI's ``code`` is a string ("invalid_api_key"); gRPC's status names too."""
    class Coded(Exception):
        code = "rate_limit_exceeded"
        status = "RESOURCE_EXHAUSTED"

    assert http_status(Coded()) is None
    assert http_status(type("X", (Exception,), {"code": 9999})()) is None
    assert http_status(type("X", (Exception,), {"http_status": 503})()) == 503


def test_no_sdk_is_imported_by_flexisync() -> None:
    code = ("import sys, flexisync, flexisync.breaker, flexisync.aio\n"
            "bad = [m for m in ('openai', 'anthropic', 'httpx', 'httpx2', 'requests', "
            "'aiohttp', 'litellm', 'mistralai', 'google.genai', 'tenacity') "
            "if m in sys.modules]\n"
            "print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60)
    assert out.stdout.strip() == "[]"


# --- retry-after ----------------------------------------------------------------------

@pytest.mark.parametrize("sdk", SDKS)
@pytest.mark.parametrize(("headers", "expected"), [
    ({"retry-after": "7"}, 7.0),
    ({"Retry-After": "2.5"}, 2.5),
    ({"retry-after-ms": "7000", "retry-after": "30"}, 7.0),  # -ms first, as openai's SDK
    ({"retry-after-ms": "250"}, 0.25),
])
def test_retry_after_headers(sdk: str, headers: dict[str, str], expected: float) -> None:
    exc = FACTORIES[sdk](429, headers)
    assert provider_retry_after(exc) == pytest.approx(expected)


@pytest.mark.parametrize("sdk", SDKS)
def test_retry_after_http_date(sdk: str) -> None:
    when = datetime.now(timezone.utc) + timedelta(seconds=120)
    exc = FACTORIES[sdk](503, {"retry-after": format_datetime(when, usegmt=True)})
    found = provider_retry_after(exc)
    assert found is not None
    assert 110 < found <= 121


@pytest.mark.parametrize("sdk", SDKS)
def test_no_retry_after_without_a_header(sdk: str) -> None:
    assert provider_retry_after(FACTORIES[sdk](429)) is None
    assert provider_retry_after(FACTORIES[sdk](500)) is None


@pytest.mark.parametrize("value", ["garbage", "-5", "0", "nan", "inf", ""])
def test_unusable_retry_after_is_ignored(value: str) -> None:
    assert provider_retry_after(openai_error(429, {"retry-after": value})) is None
    assert provider_retry_after(httpx_error(429, {"retry-after-ms": value})) is None


@pytest.mark.parametrize(("headers", "expected"), [
    ({"x-ratelimit-reset-requests": "1s", "x-ratelimit-reset-tokens": "6m0s"}, 360.0),
    ({"x-ratelimit-reset-requests": "1s", "x-ratelimit-remaining-requests": "0",
      "x-ratelimit-reset-tokens": "6m0s", "x-ratelimit-remaining-tokens": "1500"}, 1.0),
    ({"x-ratelimit-reset-tokens": "20ms"}, 0.02),
    ({"x-ratelimit-reset-requests": "1h2m3.5s"}, 3723.5),
    ({"x-ratelimit-reset-requests": "17.5"}, 17.5),
])
def test_openai_reset_headers_on_a_429(headers: dict[str, str], expected: float) -> None:
    assert provider_retry_after(openai_error(429, headers)) == pytest.approx(expected)


def test_reset_headers_mean_nothing_outside_a_429() -> None:
    """Reset headers come with every answer: a 500 carrying them opens nothing early."""
    headers = {"x-ratelimit-reset-requests": "1s", "x-ratelimit-remaining-requests": "0"}
    assert provider_retry_after(openai_error(500, headers)) is None


def test_anthropic_reset_headers_on_a_429() -> None:
    soon = datetime.now(timezone.utc) + timedelta(seconds=30)
    later = datetime.now(timezone.utc) + timedelta(seconds=90)
    headers = {"anthropic-ratelimit-requests-reset": soon.isoformat().replace("+00:00", "Z"),
               "anthropic-ratelimit-requests-remaining": "0",
               "anthropic-ratelimit-tokens-reset": later.isoformat(),
               "anthropic-ratelimit-tokens-remaining": "5000"}
    found = provider_retry_after(anthropic_error(429, headers, kind="rate_limit_error"))
    assert found is not None
    assert 25 < found <= 30  # the exhausted limit's reset, not the longest
    del headers["anthropic-ratelimit-requests-remaining"]
    found = provider_retry_after(anthropic_error(429, headers, kind="rate_limit_error"))
    assert found is not None
    assert 85 < found <= 90  # none reported exhausted: the longest
    headers["retry-after"] = "4"  # Anthropic's retry-after wins over the resets
    assert provider_retry_after(anthropic_error(429, headers)) == 4.0


def test_google_retry_info_delay() -> None:
    exc = genai_error(429, details=[
        {"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": []},
        {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "17s"}])
    assert provider_retry_after(exc) == 17.0


def test_retry_after_attribute_first() -> None:
    """An attribute ``retry_after`` (seconds, numeric string or timedelta) comes first;
    litellm's own ``headers=`` are read when the response has none."""
    class Limited(Exception):
        def __init__(self, value: object) -> None:
            super().__init__("429")
            self.retry_after = value

    assert provider_retry_after(Limited(3)) == 3.0
    assert provider_retry_after(Limited("4.5")) == 4.5
    assert provider_retry_after(Limited(timedelta(seconds=6))) == 6.0
    assert provider_retry_after(Limited(-1)) is None
    assert provider_retry_after(Limited(True)) is None
    exc = litellm.RateLimitError(message="x", llm_provider="openai", model="gpt-4o",
                                 headers={"retry-after": "9"})
    assert provider_retry_after(exc) == 9.0


def test_the_policy_defaults_are_the_provider_functions() -> None:
    policy = BreakerPolicy()
    assert policy.outcome_of is provider_outcome
    assert policy.retry_after_of is provider_retry_after
    assert policy.failure_on == (Exception,)
    assert policy.ignore == ()


def test_http_date_in_the_past_is_ignored() -> None:
    past = datetime.now(timezone.utc) - timedelta(seconds=60)
    exc = httpx_error(429, {"retry-after": format_datetime(past, usegmt=True)})
    assert provider_retry_after(exc) is None
    assert time.time() > past.timestamp()


def test_openai_error_raised_mid_stream() -> None:
    """openai/_streaming.py raises ``APIError(message, request, body=data["error"])``
    for an error event on a 200 stream: no status, only the error type."""
    request = httpx.Request("POST", URL)
    overloaded = openai.APIError("The server is overloaded", request,
                                 body={"message": "x", "type": "server_error"})
    assert http_status(overloaded) is None
    assert provider_outcome(overloaded) == "failure"
    assert transient(overloaded)
    invalid = openai.APIError("bad", request,
                              body={"message": "x", "type": "invalid_request_error"})
    assert provider_outcome(invalid) == "ignore"
    assert not transient(invalid)


def test_openai_insufficient_quota_429_opens_but_is_not_retried() -> None:
    """A 429 "insufficient_quota" (billing) fails every call of the fleet: a failure for
    the breaker, but retrying cannot help."""
    exc = openai_error(429, body={"error": {"message": "quota", "type": "insufficient_quota",
                                            "code": "insufficient_quota"}})
    assert provider_outcome(exc) == "failure"
    assert not transient(exc)
