"""A WSGI app exporting flexisync's metrics in prometheus_client's multiprocess mode, for
``tests/integration/test_exporters_gunicorn.py`` under gunicorn (4 sync workers).

Environment: ``FLEXISYNC_URL``, ``FLEXISYNC_NAMESPACE``, ``PROMETHEUS_MULTIPROC_DIR`` (an
empty directory, set before prometheus_client is imported), ``METRICS_BREAKER`` (the
breaker's name), ``METRICS_FLUSH_INTERVAL`` (seconds between the exporter's flushes).

``GET /pid``              which worker answered
``GET /call?fail=1``      one breaker call: ``result`` is ok / failed / rejected
``GET /lock?name=N``      take lock N and release it
``GET /breaker``          this worker's view of the breaker
``GET /metrics``          the fleet's metrics (prometheus_client's MultiProcessCollector)
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qs

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

import flexisync
from flexisync.exporters import prometheus

sync = flexisync.connect(os.environ.get("FLEXISYNC_URL"),
                         namespace=os.environ.get("FLEXISYNC_NAMESPACE", "metrics-wsgi"))
breaker = sync.breaker(os.environ.get("METRICS_BREAKER", "provider"),
                       failure_threshold=1, recovery_timeout=300.0)
exporter = prometheus.register(interval=float(os.environ.get("METRICS_FLUSH_INTERVAL", "1")))


class ProviderError(Exception):
    """The fake provider failed."""


def _call(fail: bool) -> dict[str, Any]:
    def provider() -> str:
        if fail:
            raise ProviderError("500")
        return "ok"

    try:
        breaker.call(provider)
    except flexisync.CircuitOpenError as exc:
        return {"result": "rejected", "retry_after": exc.retry_after}
    except ProviderError:
        return {"result": "failed"}
    return {"result": "ok"}


def _metrics() -> bytes:
    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    return generate_latest(registry)


def application(environ: dict[str, Any],
                start_response: Callable[..., Any]) -> Iterable[bytes]:
    path = environ.get("PATH_INFO", "/")
    query = {key: values[-1] for key, values in parse_qs(environ.get("QUERY_STRING", "")).items()}
    if path == "/metrics":
        start_response("200 OK", [("Content-Type", CONTENT_TYPE_LATEST)])
        return [_metrics()]
    if path == "/call":
        body = _call(query.get("fail") == "1")
    elif path == "/lock":
        with sync.lock(query.get("name", "job"), ttl=10.0, timeout=10.0):
            pass
        body = {"locked": True}
    elif path == "/breaker":
        body = {"state": breaker.state}
    elif path == "/pid":
        body = {"exporter_running": getattr(exporter, "running", False)}
    else:
        start_response("404 Not Found", [("Content-Type", "application/json")])
        return [b"{}"]
    body["pid"] = os.getpid()
    start_response("200 OK", [("Content-Type", "application/json")])
    return [json.dumps(body).encode()]
