"""``flexisync dashboard`` over HTTP: the snapshot JSON, the SSE frames, the write
endpoints (refused without ``--allow-write``, guarded against cross-site requests with
it), bad paths and Host headers, two clients at once, a password never shown.

Each test runs the real command in a subprocess (``--port 0 --json``: it prints its
address once listening) and stops it with SIGTERM, after which it must exit 0.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis

import flexisync
from flexisync.embedded import EmbeddedRedis
from tests.faults import FaultProxy
from tests.helpers import wait_until
from tests.servers.conftest import free_port

pytestmark = pytest.mark.slow

WRITE = {"X-FlexiSync-Dashboard": "1"}


class Running:
    """A ``flexisync dashboard`` subprocess: ``base`` is its ``http://127.0.0.1:PORT``."""

    def __init__(self, process: subprocess.Popen[bytes], base: str, info: dict[str, Any],
                 out: pathlib.Path, err: pathlib.Path) -> None:
        self.process, self.base, self.info, self.out, self.err = process, base, info, out, err

    def output(self) -> str:
        """Everything it printed so far (stdout + stderr)."""
        return self.out.read_text() + self.err.read_text()


@contextlib.contextmanager
def running_dashboard(url: str, namespace: str, tmp_path: pathlib.Path,
                      *options: str) -> Iterator[Running]:
    """``flexisync dashboard --port 0 --json`` until the block ends (then SIGTERM: it
    must exit 0 within 15 s)."""
    out = tmp_path / f"dashboard-{time.monotonic_ns()}.out"
    err = out.with_suffix(".err")
    with out.open("wb") as stdout, err.open("wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "flexisync.cli", "dashboard", "--url", url,
             "--namespace", namespace, "--port", "0", "--json", *options],
            stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL, start_new_session=True,
            env={**os.environ, "PYTHONFAULTHANDLER": "1"})  # see the SIGABRT below

    def listening() -> dict[str, Any] | None:
        if process.poll() is not None:
            raise AssertionError(f"dashboard exited ({process.returncode}): "
                                 f"{out.read_text()}{err.read_text()}")
        line = out.read_text().partition("\n")[0]
        return json.loads(line) if line.endswith("}") else None

    try:
        info = wait_until(listening, timeout=30, interval=0.02, message="dashboard listening")
        yield Running(process, info["url"].rstrip("/"), info, out, err)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:  # stuck: SIGABRT dumps every thread's stack
            os.kill(process.pid, signal.SIGABRT)
            try:
                process.wait(5)
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(5)
    assert process.returncode == 0, (f"dashboard exited with {process.returncode}: "
                                     f"{out.read_text()}{err.read_text()}")


@pytest.fixture
def dashboard(flexisync_url: str, namespace: str, tmp_path: pathlib.Path) -> Iterator[Running]:
    """A read-only dashboard of the test's namespace."""
    with running_dashboard(flexisync_url, namespace, tmp_path) as running:
        yield running


@pytest.fixture
def writable(flexisync_url: str, namespace: str, tmp_path: pathlib.Path) -> Iterator[Running]:
    """A dashboard of the test's namespace started with ``--allow-write``."""
    with running_dashboard(flexisync_url, namespace, tmp_path, "--allow-write") as running:
        yield running


def frames(response: httpx.Response) -> Iterator[dict[str, str]]:
    """The SSE frames of a streaming response: ``{"id", "event", "data", ...}``
    (``{"comment": ...}`` for a comment frame)."""
    frame: dict[str, str] = {}
    for line in response.iter_lines():
        if line == "":
            if frame:
                yield frame
            frame = {}
        elif line.startswith(":"):
            frame["comment"] = line[1:].strip()
        else:
            field, _, value = line.partition(":")
            frame[field] = value[1:] if value.startswith(" ") else value


def next_snapshot(stream: Iterator[dict[str, str]]) -> tuple[int, dict[str, Any]]:
    """The next ``event: snapshot`` frame's (id, document)."""
    for frame in stream:
        if frame.get("event") == "snapshot":
            return int(frame["id"]), json.loads(frame["data"])
    raise AssertionError("the event stream ended")


def by_name(items: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {item["name"]: item for item in items}


def _fail() -> None:
    raise RuntimeError("provider down")


def test_snapshot_json_shows_breakers_locks_and_streams(
        dashboard: Running, sync: flexisync.Coordinator) -> None:
    """/api/snapshot: the tripped breaker (open, time left), the held lock (holder, time
    left), the stream (length, last id), the dashboard's own info; no infinity."""
    breaker = sync.breaker("payments", failure_threshold=2, recovery_timeout=30)
    for _ in range(2):
        with contextlib.suppress(RuntimeError):
            breaker.call(_fail)
    sync.breaker("search").reset()
    sync.breaker("manual").force_open()
    stream = sync.stream("orders")
    ids = [stream.append({"n": n}) for n in range(3)]
    with sync.lock("nightly-report", ttl=20):
        reply = httpx.get(f"{dashboard.base}/api/snapshot", timeout=10)
    assert reply.status_code == 200
    assert reply.headers["content-type"].startswith("application/json")
    assert reply.headers["cache-control"] == "no-store"
    doc = reply.json()
    breakers = by_name(doc["breakers"])
    assert breakers["payments"]["state"] == "open"
    assert 25 < breakers["payments"]["retry_after"] <= 30
    assert breakers["payments"]["trips"] == 1
    assert breakers["search"]["state"] == "closed"
    assert breakers["manual"]["state"] == "forced_open"
    assert breakers["manual"]["retry_after"] is None  # infinite: null, never Infinity
    assert all(isinstance(b["transitions"], list) for b in doc["breakers"])
    lock = by_name(doc["locks"])["nightly-report"]
    assert lock["holder"].endswith(f":{os.getpid()}")
    assert 15 < lock["ttl_left"] <= 20
    orders = by_name(doc["streams"])["orders"]
    assert (orders["length"], orders["last_id"]) == (3, ids[-1])
    assert doc["dashboard"]["allow_write"] is False
    assert doc["dashboard"]["namespace"] == sync.namespace
    assert "Infinity" not in reply.text
    assert "NaN" not in reply.text
    after = httpx.get(f"{dashboard.base}/api/snapshot", timeout=10).json()
    assert "nightly-report" not in by_name(after["locks"]), "a released lock still shown"


def test_events_stream_snapshots_and_show_a_trip_at_once(
        dashboard: Running, sync: flexisync.Coordinator) -> None:
    """/events: ``retry:`` then snapshot frames with growing ids, about every 0.5 s; a
    trip made elsewhere shows in a frame well before the next periodic one would be
    late (the breaker channel wakes the poller), and the frame records the
    transition closed -> open."""
    breaker = sync.breaker("payments")
    breaker.reset()
    with httpx.stream("GET", f"{dashboard.base}/events", timeout=10) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        stream = frames(response)
        assert next(stream) == {"retry": "1000"}
        first, doc = next_snapshot(stream)
        assert by_name(doc["breakers"])["payments"]["state"] == "closed"
        started = time.monotonic()
        seen = [first]
        for _ in range(3):
            seen.append(next_snapshot(stream)[0])
        periodic = (time.monotonic() - started) / 3
        assert seen == sorted(seen)
        assert len(set(seen)) == 4
        assert 0.2 < periodic < 1.0, f"one snapshot every {periodic:.2f}s"
        breaker.trip(retry_after=60)
        tripped = time.monotonic()
        while True:
            _, doc = next_snapshot(stream)
            payments = by_name(doc["breakers"])["payments"]
            if payments["state"] == "open":
                break
            assert time.monotonic() - tripped < 5, "the trip never showed"
        assert time.monotonic() - tripped < 1.0
        assert [(t["from"], t["to"]) for t in payments["transitions"]] == [("closed", "open")]
        assert abs(payments["transitions"][0]["at"] - time.time()) < 5


def test_a_transition_is_pushed_at_once_not_at_the_next_poll(
        flexisync_url: str, namespace: str, tmp_path: pathlib.Path,
        sync: flexisync.Coordinator) -> None:
    """With snapshots only every 10 s, a trip and then a reset still reach the page
    within a second each: the breaker's channel wakes the poller."""
    breaker = sync.breaker("payments")
    breaker.reset()
    with running_dashboard(flexisync_url, namespace, tmp_path, "--interval", "10") as running, \
            httpx.stream("GET", f"{running.base}/events", timeout=20) as response:
        stream = frames(response)
        wait_until(lambda: by_name(next_snapshot(stream)[1]["breakers"]).get("payments"),
                   timeout=15, message="the first snapshot")
        for change, expected in ((breaker.force_open, "forced_open"), (breaker.reset, "closed")):
            change()
            changed = time.monotonic()
            _, doc = next_snapshot(stream)
            assert time.monotonic() - changed < 1.0
            assert by_name(doc["breakers"])["payments"]["state"] == expected
        transitions = by_name(doc["breakers"])["payments"]["transitions"]
        assert [(t["from"], t["to"]) for t in transitions] == [("closed", "forced_open"),
                                                               ("forced_open", "closed")]


def test_two_clients_each_get_frames_and_one_leaving_does_not_stop_the_other(
        dashboard: Running, sync: flexisync.Coordinator) -> None:
    """Two pages at once: both receive the snapshots; after the first disconnects the
    second keeps receiving them (and sees a change made meanwhile)."""
    sync.breaker("payments").reset()
    with httpx.stream("GET", f"{dashboard.base}/events", timeout=10) as second:
        later = frames(second)
        with httpx.stream("GET", f"{dashboard.base}/events", timeout=10) as first:
            early = frames(first)
            a, b = next_snapshot(early)[0], next_snapshot(later)[0]
            assert next_snapshot(early)[0] > a
            assert next_snapshot(later)[0] > b
        sync.breaker("payments").force_open()
        wait_until(lambda: by_name(next_snapshot(later)[1]["breakers"])["payments"]["state"]
                   == "forced_open", timeout=5, message="the change on the remaining page")


def _post(base: str, action: str, body: Any, headers: dict[str, str] | None = None,
          **options: Any) -> httpx.Response:
    return httpx.post(f"{base}/api/breaker/{action}", json=body,
                      headers=WRITE if headers is None else headers, timeout=10, **options)


def test_write_endpoints_are_refused_without_allow_write(
        dashboard: Running, sync: flexisync.Coordinator) -> None:
    """Read-only (the default): every control answers 403 and changes nothing."""
    sync.breaker("payments").reset()
    for action, body in (("open", {"name": "payments"}),
                         ("open", {"name": "payments", "seconds": 30}),
                         ("reset", {"name": "payments"}), ("close", {"name": "payments"})):
        reply = _post(dashboard.base, action, body)
        assert reply.status_code == 403, reply.text
        assert "--allow-write" in reply.json()["error"]
    assert sync.breaker("payments").info().state == "closed"
    assert sync.breaker("payments").info().trips == 0


def test_write_endpoints_work_with_allow_write(
        writable: Running, sync: flexisync.Coordinator) -> None:
    """--allow-write: force open, open for N seconds and reset change the breaker for
    the whole fleet (read back from Redis), and each is narrated on stderr."""
    breaker = sync.breaker("payments")
    breaker.reset()
    reply = _post(writable.base, "open", {"name": "payments"})
    assert reply.status_code == 200, reply.text
    assert reply.json()["breaker"]["state"] == "forced_open"
    assert breaker.info().state == "forced_open"
    reply = _post(writable.base, "open", {"name": "payments", "seconds": 30})
    assert reply.status_code == 200, reply.text
    info = breaker.info()
    assert info.state == "open"  # from forced_open too, as `breaker open --for`
    assert 28 < info.retry_after <= 31
    reply = _post(writable.base, "reset", {"name": "payments"})
    assert reply.status_code == 200, reply.text
    assert breaker.info().state == "closed"
    _post(writable.base, "open", {"name": "payments"})
    assert _post(writable.base, "close", {"name": "payments"}).status_code == 200
    assert breaker.info().state == "closed"
    wait_until(lambda: writable.output().count("breaker 'payments'") >= 5, timeout=5,
               message="each action narrated on stderr")


@pytest.mark.parametrize(("headers", "why"), [
    ({}, "missing X-FlexiSync-Dashboard"),
    ({**WRITE, "Origin": "http://evil.example"}, "cross-origin"),
    ({**WRITE, "Sec-Fetch-Site": "cross-site"}, "cross-site"),
])
def test_cross_site_writes_are_refused(writable: Running, sync: flexisync.Coordinator,
                                       headers: dict[str, str], why: str) -> None:
    """With --allow-write, a request another site's page could make is still 403 and
    changes nothing: without the page's custom header, from a foreign Origin, or
    marked cross-site by the browser."""
    sync.breaker("payments").reset()
    reply = _post(writable.base, "open", {"name": "payments"}, headers)
    assert reply.status_code == 403
    assert why in reply.json()["error"]
    assert sync.breaker("payments").info().state == "closed"


def test_a_form_post_is_refused(writable: Running, sync: flexisync.Coordinator) -> None:
    """A cross-site HTML form can send text/plain, never JSON with a custom header."""
    sync.breaker("payments").reset()
    reply = httpx.post(f"{writable.base}/api/breaker/open", timeout=10,
                       content=b'{"name": "payments"}',
                       headers={**WRITE, "Content-Type": "text/plain"})
    assert reply.status_code == 403
    assert sync.breaker("payments").info().state == "closed"


def test_bad_control_requests(writable: Running, sync: flexisync.Coordinator) -> None:
    """Unknown breaker 404 (and nothing created), bad name or body 400, GET 405."""
    sync.breaker("payments").reset()
    reply = _post(writable.base, "open", {"name": "nobody-uses-this"})
    assert reply.status_code == 404
    assert "nobody-uses-this" in reply.json()["error"]
    names = [b.name for b in flexisync.breaker.list_breakers(sync)]
    assert names == ["payments"]
    assert _post(writable.base, "open", {"name": "bad name!"}).status_code == 400
    assert _post(writable.base, "open", ["payments"]).status_code == 400
    assert _post(writable.base, "open", {"name": "payments", "seconds": -1}).status_code == 400
    assert _post(writable.base, "reset", {"name": "payments", "seconds": 5}).status_code == 400
    assert httpx.get(f"{writable.base}/api/breaker/open", timeout=10).status_code == 405
    assert sync.breaker("payments").info().state == "closed"


def test_bad_paths_methods_and_hosts(dashboard: Running) -> None:
    """404 for unknown paths, 405 for a POST to a page, 403 for a foreign Host header
    (DNS rebinding), 400 for a malformed request; the page and its files are served
    with a strict Content-Security-Policy."""
    base = dashboard.base
    for path in ("/nope", "/api", "/api/breaker/explode", "/api/breaker/a/b/open",
                 "/../etc/passwd", "/dashboard_static/index.html"):
        assert httpx.get(base + path, timeout=10).status_code == 404, path
    assert httpx.post(f"{base}/api/snapshot", timeout=10).status_code == 405
    port = base.rsplit(":", 1)[1]
    assert httpx.get(f"{base}/api/snapshot", headers={"Host": f"evil.example:{port}"},
                     timeout=10).status_code == 403
    assert httpx.get(f"{base}/api/snapshot", headers={"Host": f"localhost:{port}"},
                     timeout=10).status_code == 200
    page = httpx.get(f"{base}/", timeout=10)
    assert page.status_code == 200
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert '<script src="/dashboard.js"' in page.text
    for path, kind in (("/dashboard.js", "text/javascript"), ("/dashboard.css", "text/css")):
        reply = httpx.get(base + path, timeout=10)
        assert reply.status_code == 200
        assert reply.headers["content-type"].startswith(kind)
    with socket.create_connection(("127.0.0.1", int(port)), timeout=10) as raw:
        raw.sendall(b"NONSENSE\r\n\r\n")
        assert raw.recv(100).startswith(b"HTTP/1.1 400 ")


@pytest.fixture
def password_url(own_server: EmbeddedRedis) -> str:
    """A URL with a user and password on a server of the test's own."""
    client = redis.Redis.from_url(own_server.url)
    try:
        client.acl_setuser("ops", enabled=True, passwords=["+dash-secret-pw"],
                           keys=["*"], channels=["*"], commands=["+@all"])
    finally:
        client.close()
    return f"redis://ops:dash-secret-pw@127.0.0.1:{own_server.port}/0"


def test_the_password_is_never_shown(password_url: str, tmp_path: pathlib.Path) -> None:
    """The page's data, the snapshot and the command's output show the URL redacted."""
    with running_dashboard(password_url, "app", tmp_path) as running:
        doc = httpx.get(f"{running.base}/api/snapshot", timeout=10)
        with httpx.stream("GET", f"{running.base}/events", timeout=10) as response:
            _, live = next_snapshot(frames(response))
        page = httpx.get(f"{running.base}/", timeout=10).text
    for text in (doc.text, json.dumps(live), page, running.output()):
        assert "dash-secret-pw" not in text
    assert "ops:***@" in doc.json()["dashboard"]["url"]
    assert "ops:***@" in running.output()


def test_redis_going_away_is_shown_and_the_page_recovers(
        proxy: FaultProxy, tmp_path: pathlib.Path) -> None:
    """Redis stops answering while a page watches: the stream stays open and carries
    ``event: unavailable`` frames (the reason, no traceback), /api/snapshot answers
    503; once Redis is back the snapshots resume on the same stream."""
    with running_dashboard(proxy.url(), "app", tmp_path) as running, \
            httpx.stream("GET", f"{running.base}/events", timeout=20) as response:
        stream = frames(response)
        before, _ = next_snapshot(stream)
        proxy.refuse()
        proxy.cut()
        frame = next(f for f in stream if f.get("event") == "unavailable")
        assert "cannot reach Redis" in json.loads(frame["data"])["error"]
        reply = httpx.get(f"{running.base}/api/snapshot", timeout=20)
        assert reply.status_code == 503
        assert "cannot reach Redis" in reply.json()["error"]
        proxy.resume()
        after, doc = next_snapshot(stream)
        assert after > before
        assert doc["namespace"] == "app"


def test_unreachable_redis_exits_3(tmp_path: pathlib.Path) -> None:
    """Nothing answers at --url: one readable line on stderr and exit code 3."""
    result = subprocess.run(
        [sys.executable, "-m", "flexisync.cli", "dashboard", "--url",
         f"redis://127.0.0.1:{free_port()}/0", "--port", "0"],
        capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 3, result.stderr
    assert "cannot reach Redis" in result.stderr
    assert "Traceback" not in result.stderr
