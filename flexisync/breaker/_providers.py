"""What a provider's exception says, read by duck typing (no SDK is imported).

Used as the breaker's default classification (:func:`provider_outcome`,
:func:`provider_retry_after`) and by :func:`~flexisync.breaker.retrying`
(:func:`transient`). Works with the exceptions of ``openai``, ``anthropic``,
``google-genai``, ``mistralai``, ``litellm``, ``httpx``, ``requests``, ``aiohttp`` and
``urllib``, and with any exception carrying the same attributes.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Mapping
from datetime import datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any, Literal

__all__ = ["Outcome", "error_type", "http_status", "provider_outcome",
           "provider_retry_after", "transient"]

#: A classification hook's verdict: ``"failure"`` counts against the provider,
#: ``"success"`` counts as the provider answering, ``"ignore"`` counts as nothing.
Outcome = Literal["failure", "success", "ignore"]

# Error ``type`` names (Anthropic's, OpenAI's and Mistral's bodies) that blame the
# provider, and those that blame the caller. Used when the status does not decide
# (an error raised mid-stream on a 200 response).
_FAILURE_TYPES = frozenset({"overloaded_error", "api_error", "rate_limit_error",
                            "timeout_error", "server_error", "rate_limit_exceeded",
                            "service_unavailable", "internal_error",
                            "throttling_error"})
_CALLER_TYPES = frozenset({"invalid_request_error", "authentication_error",
                           "permission_error", "not_found_error", "request_too_large",
                           "billing_error", "invalid_api_key", "insufficient_quota"})
# The last resort for exceptions carrying no status: class names of timeouts and lost
# connections in the SDKs and HTTP clients (matched on the class and its bases).
_TRANSIENT_NAME = re.compile(
    r"Timeout|TimedOut|Connect|Network|Transport|RemoteProtocol|ServerDisconnected|"
    r"ReadError|WriteError|ServiceUnavailable|InternalServer|Overloaded|RateLimit|"
    r"APIConnection|ChunkedEncoding|IncompleteRead")
_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|us|µs|ns|h|m|s)")
_UNIT = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
# Reset headers: (reset, remaining) pairs, OpenAI's Go-style durations then
# Anthropic's RFC 3339 instants.
_OPENAI_RESETS = (("x-ratelimit-reset-requests", "x-ratelimit-remaining-requests"),
                  ("x-ratelimit-reset-tokens", "x-ratelimit-remaining-tokens"))
_ANTHROPIC_RESETS = tuple(
    (f"anthropic-ratelimit-{kind}-reset", f"anthropic-ratelimit-{kind}-remaining")
    for kind in ("requests", "tokens", "input-tokens", "output-tokens"))


def _attr(obj: object, name: str) -> Any:
    """``getattr(obj, name, None)``, also when a property raises."""
    try:
        return getattr(obj, name, None)
    except Exception:
        return None


def _int_status(value: object) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value if 100 <= value <= 599 else None


def http_status(exc: BaseException) -> int | None:
    """The HTTP status an exception carries, or None.

    Looked for, in order: ``exc.status_code``, ``exc.response.status_code``,
    ``exc.raw_response.status_code``, ``exc.http_status``, ``exc.status`` and
    ``exc.code`` (an int from 100 to 599 only: a string code such as OpenAI's
    ``"invalid_api_key"`` or gRPC's ``"RESOURCE_EXHAUSTED"`` is not a status).
    """
    found = _int_status(_attr(exc, "status_code"))
    if found is None:
        for holder in ("response", "raw_response"):
            response = _attr(exc, holder)
            if response is not None:
                found = _int_status(_attr(response, "status_code"))
                if found is None:  # aiohttp.ClientResponse
                    found = _int_status(_attr(response, "status"))
                if found is not None:
                    break
    for attr in ("http_status", "status", "code"):
        if found is not None:
            break
        found = _int_status(_attr(exc, attr))
    return found


def error_type(exc: BaseException) -> str | None:
    """The provider's error ``type`` (e.g. Anthropic's ``"overloaded_error"``), or None.

    Read from ``exc.type``, then from the error body (``exc.body``):
    ``{"error": {"type": ...}}`` or ``{"type": ...}``.
    """
    value = _attr(exc, "type")
    if isinstance(value, str) and value:
        return value
    body = _attr(exc, "body")
    if isinstance(body, Mapping):
        inner = body.get("error")
        if isinstance(inner, Mapping) and isinstance(inner.get("type"), str):
            return str(inner["type"])
        if isinstance(body.get("type"), str) and body["type"] != "error":
            return str(body["type"])
    return None


def provider_outcome(exc: BaseException) -> Outcome | None:
    """The breaker's default ``outcome_of``: what a provider's error says about it.

    * HTTP 408, 429 and any 5xx (Anthropic's 529 ``overloaded_error`` included):
      ``"failure"``.
    * Any other 4xx (bad request, authentication, not found...): ``"ignore"``: the
      caller's fault, counted as neither success nor failure.
    * No 4xx/5xx status (an error raised mid-stream on a 200 response): decided by the
      error type: ``overloaded_error``, ``api_error``, ``rate_limit_error``... are
      failures, ``invalid_request_error``, ``authentication_error``... are ignored.
    * Otherwise None: the policy's ``failure_on`` decides (by default every
      ``Exception`` is a failure: timeouts, lost connections, your own errors).
    """
    status = http_status(exc)
    if status is not None and status >= 400:
        if status in (408, 429) or status >= 500:
            return "failure"
        return "ignore"
    kind = error_type(exc)
    if kind in _FAILURE_TYPES:
        return "failure"
    if kind in _CALLER_TYPES:
        return "ignore"
    return None


def transient(exc: BaseException) -> bool:
    """Whether retrying the call that raised ``exc`` may succeed.

    True for a status 408, 429 or 5xx (unless the error type blames the caller, as
    OpenAI's 429 ``insufficient_quota`` does), a provider error type meaning overload or
    rate limiting, ``TimeoutError`` and ``ConnectionError`` (``asyncio`` timeouts
    included), and, for exceptions carrying no status, the timeouts and connection
    errors of the SDKs and HTTP clients (recognised by class name:
    ``APITimeoutError``, ``APIConnectionError``, ``httpx.ConnectError``,
    ``requests.ConnectionError``, ``aiohttp.ServerDisconnectedError``...). False for
    everything else (a 4xx, a bug in your code).
    """
    kind = error_type(exc)
    if kind in _CALLER_TYPES:  # e.g. OpenAI's 429 "insufficient_quota": waiting won't help
        return False
    status = http_status(exc)
    if status is not None and status >= 400:
        return status in (408, 429) or status >= 500
    if kind in _FAILURE_TYPES:
        return True
    if isinstance(exc, (TimeoutError, ConnectionError)):
        return True
    return any(_TRANSIENT_NAME.search(cls.__name__) for cls in type(exc).__mro__
               if cls.__module__ != "builtins")


# --- retry-after ------------------------------------------------------------------------


def _headers_of(exc: BaseException) -> list[Any]:
    """Where the exception keeps response headers: its response's (``response``,
    ``raw_response``), then its own (aiohttp, urllib, litellm's ``headers=``)."""
    found = []
    for holder in ("response", "raw_response"):
        response = _attr(exc, holder)
        headers = _attr(response, "headers") if response is not None else None
        if headers is not None:
            found.append(headers)
    own = _attr(exc, "headers")
    if own is not None:
        found.append(own)
    return found


def _one_header(headers: Any, name: str) -> str | None:
    try:
        value = headers.get(name)
    except Exception:
        value = None
    if value is None:
        try:
            items = headers.items() if hasattr(headers, "items") else headers
            for key, found in items:
                if isinstance(key, str) and key.lower() == name:
                    value = found
                    break
        except Exception:
            return None
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    return value.strip() if isinstance(value, str) else None


def _header(sources: list[Any], name: str) -> str | None:
    """Header ``name`` (lowercase), case-insensitively, from the first source having it
    (any mapping-like object or list of pairs)."""
    for headers in sources:
        value = _one_header(headers, name)
        if value:
            return value
    return None


def _positive(value: float) -> float | None:
    return value if math.isfinite(value) and value > 0 else None


def _number(text: str) -> float | None:
    try:
        return _positive(float(text))
    except ValueError:
        return None


def _http_date(text: str) -> float | None:
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return _positive(when.timestamp() - time.time())


def _go_duration(text: str) -> float | None:
    """OpenAI's reset durations: ``"1s"``, ``"6m0s"``, ``"20ms"``, ``"1h2m3.5s"``."""
    if not text or _DURATION.sub("", text):
        return _number(text)  # not a duration: maybe plain seconds
    return _positive(sum(float(n) * _UNIT[u] for n, u in _DURATION.findall(text)))


def _rfc3339(text: str) -> float | None:
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        return None
    if when.tzinfo is None:
        return None
    return _positive(when.timestamp() - time.time())


def _reset(headers: list[Any], pairs: tuple[tuple[str, str], ...],
           parse: Any) -> float | None:
    """The longest reset among the exhausted limits (among all when none says so)."""
    found: list[tuple[float, bool]] = []
    for reset_name, remaining_name in pairs:
        raw = _header(headers, reset_name)
        value = parse(raw) if raw else None
        if value is not None:
            found.append((value, _header(headers, remaining_name) == "0"))
    exhausted = [value for value, out in found if out]
    pool = exhausted or [value for value, _ in found]
    return max(pool) if pool else None


def _google_retry_delay(exc: BaseException) -> float | None:
    """google-genai: the ``retryDelay`` of a ``google.rpc.RetryInfo`` error detail."""
    body = _attr(exc, "details")
    error = body.get("error") if isinstance(body, Mapping) else None
    details = error.get("details") if isinstance(error, Mapping) else None
    if not isinstance(details, list):
        return None
    for detail in details:
        if isinstance(detail, Mapping) and isinstance(detail.get("retryDelay"), str):
            return _go_duration(detail["retryDelay"])
    return None


def _attribute_seconds(value: object) -> float | None:
    if isinstance(value, timedelta):
        value = value.total_seconds()
    if isinstance(value, str):
        return _number(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return _positive(float(value))
    return None


def _retry_after_header(headers: list[Any]) -> float | None:
    """``retry-after-ms`` (milliseconds), else ``retry-after`` (seconds or HTTP date)."""
    raw = _header(headers, "retry-after-ms")
    ms = _number(raw) if raw else None
    if ms is not None:
        return ms / 1000.0
    raw = _header(headers, "retry-after")
    if not raw:
        return None
    found = _number(raw)
    return found if found is not None else _http_date(raw)


def provider_retry_after(exc: BaseException) -> float | None:
    """The breaker's default ``retry_after_of``: how long the provider asked us to wait.

    Seconds (a positive float), or None. Looked for, in order:

    1. ``exc.retry_after``: seconds (int, float or numeric string) or a ``timedelta``.
    2. The response headers (``exc.response.headers``, ``exc.raw_response.headers``
       or ``exc.headers``, case-insensitive): ``retry-after-ms`` (milliseconds),
       ``retry-after`` (seconds, or an HTTP date, measured against this host's
       clock).
    3. Only for a 429: the providers' reset headers, the longest among the limits
       reported exhausted (remaining 0), or among all when none is: OpenAI's
       ``x-ratelimit-reset-requests`` / ``-tokens`` (durations such as ``"1s"``,
       ``"6m0s"``), Anthropic's ``anthropic-ratelimit-{requests,tokens,input-tokens,
       output-tokens}-reset`` (RFC 3339 instants), and Google's ``RetryInfo``
       ``retryDelay`` in the error body.
    """
    found = _attribute_seconds(_attr(exc, "retry_after"))
    if found is not None:
        return found
    headers = _headers_of(exc)
    found = _retry_after_header(headers)
    if found is not None:
        return found
    if http_status(exc) != 429:
        return None  # reset headers come with every answer: only a 429 means "wait"
    if headers:
        found = _reset(headers, _OPENAI_RESETS, _go_duration)
        if found is None:
            found = _reset(headers, _ANTHROPIC_RESETS, _rfc3339)
        if found is not None:
            return found
    return _google_retry_delay(exc)
