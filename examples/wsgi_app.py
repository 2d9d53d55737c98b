"""A plain WSGI app whose workers share a breaker, locks, state and events through flexisync.

Run it under a real worker server (no hook or extra code needed for either)::

    FLEXISYNC_URL=redis://localhost:6379/0 gunicorn -w 4 --preload \\
        --chdir examples wsgi_app:application
    FLEXISYNC_URL=redis://localhost:6379/0 uwsgi --master --processes 4 \\
        --http-socket 127.0.0.1:8000 --wsgi-file examples/wsgi_app.py \\
        --py-call-uwsgi-fork-hooks

The Coordinator, the breaker and the event subscription are created at import time, as
an application would: under gunicorn ``--preload`` (``preload_app = True``) and uWSGI
without ``lazy-apps`` that happens in the master, before the workers are forked, and
every worker still gets connections and threads of its own.

Every endpoint answers JSON and includes the answering worker's ``pid``:

``GET /pid``                          which worker answered
``GET /call-provider?fail=1``         call the fake LLM provider through the shared breaker
``GET /breaker``                      this worker's view of the breaker
``GET /lock/try?name=N&ttl=S``        take lock N without waiting (and keep holding it)
``GET /lock/status?name=N``           is lock N held by anyone?
``GET /lock/hang?name=N&ttl=S``       take lock N (auto-renewed), then hang forever
``GET /publish?tag=T``                publish an event on topic ``broadcast``
``GET /received``                     tags of the events this worker has received
``GET /state/incr?key=K``             increment a shared counter
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qs

import flexisync

sync = flexisync.connect(os.environ.get("FLEXISYNC_URL"),
                         namespace=os.environ.get("FLEXISYNC_NAMESPACE", "wsgi-example"))
provider = sync.breaker("llm-provider", failure_threshold=1, recovery_timeout=60.0)
counters = sync.state("counters")

_received: list[str] = []
_received_lock = threading.Lock()
_held: dict[str, flexisync.Lock] = {}


class ProviderError(Exception):
    """The fake provider answered 500."""


def _on_event(event: Any) -> None:
    with _received_lock:
        _received.append(str(event.data.get("tag")))


subscription = sync.events.subscribe("broadcast", _on_event)


def _fake_provider(fail: bool) -> str:
    if fail:
        raise ProviderError("500 from the provider")
    return "a completion"


# --- endpoints -------------------------------------------------------------------------

Handler = Callable[[dict[str, str]], dict[str, Any]]


def call_provider(query: dict[str, str]) -> dict[str, Any]:
    try:
        provider.call(_fake_provider, query.get("fail") == "1")
    except flexisync.CircuitOpenError as exc:
        return {"result": "rejected", "retry_after": exc.retry_after}
    except ProviderError:
        return {"result": "failed"}
    return {"result": "ok"}


def breaker_state(_query: dict[str, str]) -> dict[str, Any]:
    return {"state": provider.state}


def lock_try(query: dict[str, str]) -> dict[str, Any]:
    name = query["name"]
    lock = _held.get(name)
    if lock is not None and lock.owned():
        return {"acquired": True, "mine": True, "token": lock.fencing_token}
    lock = sync.lock(name, ttl=float(query.get("ttl", "30")))
    if lock.acquire(blocking=False):
        _held[name] = lock
        return {"acquired": True, "mine": False, "token": lock.fencing_token}
    return {"acquired": False}


def lock_status(query: dict[str, str]) -> dict[str, Any]:
    return {"locked": sync.lock(query["name"]).locked()}


def lock_hang(query: dict[str, str]) -> dict[str, Any]:
    lock = sync.lock(query["name"], ttl=float(query.get("ttl", "2")), auto_renew=True)
    lock.acquire()
    while True:  # the server's timeout (gunicorn --timeout, uWSGI harakiri) kills us
        time.sleep(1.0)


def publish(query: dict[str, str]) -> dict[str, Any]:
    return {"receivers": sync.events.publish("broadcast", {"tag": query["tag"]})}


def received(_query: dict[str, str]) -> dict[str, Any]:
    with _received_lock:
        return {"tags": list(_received)}


def state_incr(query: dict[str, str]) -> dict[str, Any]:
    return {"value": counters.incr(query["key"])}


ROUTES: dict[str, Handler] = {
    "/pid": lambda _query: {},
    "/call-provider": call_provider,
    "/breaker": breaker_state,
    "/lock/try": lock_try,
    "/lock/status": lock_status,
    "/lock/hang": lock_hang,
    "/publish": publish,
    "/received": received,
    "/state/incr": state_incr,
}


def application(environ: dict[str, Any],
                start_response: Callable[..., Any]) -> Iterable[bytes]:
    """The WSGI entry point."""
    handler = ROUTES.get(environ.get("PATH_INFO", ""))
    query = {k: v[0] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}
    if handler is None:
        status, body = "404 Not Found", {"error": "no such endpoint"}
    else:
        try:
            status, body = "200 OK", handler(query)
        except (KeyError, ValueError) as exc:
            status, body = "400 Bad Request", {"error": f"{type(exc).__name__}: {exc}"}
        except flexisync.FlexiSyncError as exc:
            status, body = "503 Service Unavailable", {"error": str(exc)}
    payload = json.dumps({"pid": os.getpid(), **body}).encode()
    start_response(status, [("Content-Type", "application/json"),
                            ("Content-Length", str(len(payload)))])
    return [payload]
