"""Server-Sent Events: frame format, heartbeats, resume, and the example server over HTTP."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator

import httpx
import pytest
import redis

import flexisync
from flexisync.sse import HEARTBEAT, event_stream
from tests.helpers import wait_until

EXAMPLE = pathlib.Path(__file__).resolve().parents[2] / "examples" / "sse_server.py"


def parse_frames(text: str) -> list[dict[str, str]]:
    """SSE frames as dicts of fields (comments become {"comment": ...})."""
    frames = []
    for block in text.split("\n\n"):
        if not block:
            continue
        frame: dict[str, str] = {}
        for line in block.split("\n"):
            if line.startswith(":"):
                frame["comment"] = line[1:].strip()
            else:
                field, _, value = line.partition(": ")
                frame[field] = value
        frames.append(frame)
    return frames


# --- the generator -------------------------------------------------------------------


def test_frames_carry_id_type_and_json_data(sync: flexisync.Coordinator) -> None:
    """Each event becomes `id:`, `event:`, one `data:` line of JSON, and a blank line."""
    stream = sync.stream("frames")
    first = stream.append({"line": "hello\nworld"}, type="stdout")
    second = stream.append(None, type="done")
    frames = list(event_stream(stream, until=lambda e: e.type == "done"))
    assert frames[0] == f'id: {first}\nevent: stdout\ndata: {{"line":"hello\\nworld"}}\n\n'
    assert parse_frames("".join(frames)) == [
        {"id": first, "event": "stdout", "data": '{"line":"hello\\nworld"}'},
        {"id": second, "event": "done", "data": "null"},
    ]


def test_resume_after_last_event_id(sync: flexisync.Coordinator) -> None:
    """last_event_id resumes strictly after that event; "" means from the start."""
    stream = sync.stream("resume")
    ids = [stream.append(i) for i in range(4)]
    stream.append(None, type="done")
    frames = parse_frames("".join(event_stream(stream, ids[1], until=lambda e: e.type == "done")))
    assert [f["id"] for f in frames[:-1]] == ids[2:]
    everything = parse_frames("".join(event_stream(stream, "",
                                                   until=lambda e: e.type == "done")))
    assert [f["id"] for f in everything[:-1]] == ids


def test_heartbeat_comment_when_idle(sync: flexisync.Coordinator) -> None:
    """With no event for `heartbeat` seconds, a `: keepalive` comment frame is yielded."""
    stream = sync.stream("idle")
    frames = event_stream(stream, heartbeat=0.1)
    try:
        assert next(frames) == HEARTBEAT  # the thing under test is time
        event_id = stream.append("now")
        assert next(frames) == f'id: {event_id}\nevent: message\ndata: "now"\n\n'
    finally:
        frames.close()


def test_bad_arguments_are_refused_at_the_call(sync: flexisync.Coordinator) -> None:
    """A malformed Last-Event-ID or heartbeat raises ConfigError before iterating."""
    stream = sync.stream("bad")
    with pytest.raises(flexisync.ConfigError, match="last_event_id"):
        event_stream(stream, "garbage")
    with pytest.raises(flexisync.ConfigError, match="heartbeat"):
        event_stream(stream, heartbeat=0)


def take(frames: Iterable[str], done: str, limit: int = 60) -> list[str]:
    """Frames up to and including the one containing ``done``; at most ``limit``."""
    taken: list[str] = []
    for frame in frames:
        taken.append(frame)
        if done in frame or len(taken) >= limit:
            break
    return taken


def test_an_unknown_last_event_id_starts_over_from_the_oldest_event(
        sync: flexisync.Coordinator) -> None:
    """A Last-Event-ID beyond every id the stream issued (fabricated, or from another
    stream) does not stall the client: a comment says so and the frames start over from
    the oldest retained event, then go on live."""
    stream = sync.stream("unknown")
    ids = [stream.append(i) for i in range(3)]
    bogus = f"{int(ids[-1].split('-')[0]) + 3_600_000}-0"
    frames = event_stream(stream, bogus, heartbeat=0.1, until=lambda e: e.type == "done")
    try:
        head = take(frames, ids[-1])
        assert head[0].startswith(f": last_event_id {bogus} is unknown"), head[:3]
        assert [f["id"] for f in parse_frames("".join(head[1:]))] == ids
        done = stream.append(None, type="done")
        assert [f.get("id") for f in parse_frames("".join(take(frames, done)))
                if "id" in f] == [done]
    finally:
        frames.close()


def test_an_entry_that_is_not_a_valid_event_is_passed_over_with_an_id_only_frame(
        sync: flexisync.Coordinator, raw: redis.Redis) -> None:
    """Foreign bytes in the stream (data that is not JSON, or nested 100,000 deep) do not
    break the response: an id-only frame moves the browser's resume point past the entry
    (no event fires), and the events after it are delivered."""
    stream = sync.stream("skip")
    first = stream.append("ok")
    key = f"{sync.namespace}:stream:{{skip}}"
    bad = str(raw.xadd(key, {"type": "message", "data": "not json"}))
    deep = str(raw.xadd(key, {"type": "message", "data": "[" * 100_000 + "]" * 100_000}))
    last = stream.append(None, type="done")
    frames = take(event_stream(stream, heartbeat=0.1, until=lambda e: e.type == "done"),
                  last)
    assert frames[0].startswith(f"id: {first}\nevent: message")
    assert frames[1] == f"id: {bad}\n: skipped an entry that is not a valid event\n\n"
    assert frames[2] == f"id: {deep}\n: skipped an entry that is not a valid event\n\n"
    assert frames[3] == f"id: {last}\nevent: done\ndata: null\n\n"


def test_setting_stop_ends_the_frames_within_about_a_second(
        sync: flexisync.Coordinator) -> None:
    """stop (set at server shutdown) ends an idle event stream within about a second,
    although its heartbeat is 30 s away."""
    stream = sync.stream("stoppable")
    stream.append("x")
    stop = threading.Event()
    frames = event_stream(stream, heartbeat=30, stop=stop)
    assert next(frames).startswith("id: ")
    ended = threading.Event()

    def drain() -> None:
        for _ in frames:
            pass
        ended.set()

    thread = threading.Thread(target=drain, name="test-drain", daemon=True)
    thread.start()
    started = time.monotonic()
    stop.set()
    assert ended.wait(10), "the frames never ended"
    took = time.monotonic() - started
    assert took < 2.5, f"ended {took:.2f}s after stop was set"
    thread.join(5)


# --- the example server over real HTTP -----------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def example_server(flexisync_url: str, namespace: str, *args: str,
                   ) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """examples/sse_server.py as a subprocess on a free loopback port: (process, base)."""
    port = _free_port()
    env = {**os.environ, "FLEXISYNC_URL": flexisync_url}
    process = subprocess.Popen(
        [sys.executable, str(EXAMPLE), "--port", str(port), "--namespace", namespace,
         "--stream", "web", "--produce", "0", *args],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if process.poll() is not None:
            out = process.stdout.read().decode() if process.stdout else ""
            raise AssertionError(f"example server exited: {out}")
        try:
            return httpx.get(f"{base}/health", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_until(up, timeout=30, interval=0.05, message="example server up")
        yield process, base
    finally:
        if process.poll() is None:
            process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
        if process.stdout:
            process.stdout.close()


@pytest.fixture
def server(flexisync_url: str, namespace: str) -> Iterator[str]:
    """examples/sse_server.py running as a subprocess on a free loopback port."""
    with example_server(flexisync_url, namespace, "--heartbeat", "0.5") as (_, base):
        yield base


def read_events(client: httpx.Client, url: str, n: int | None,
                headers: dict[str, str] | None = None) -> list[dict[str, str]]:
    """Read SSE frames line by line until ``n`` events (None: until the server ends)."""
    events: list[dict[str, str]] = []
    with client.stream("GET", url, headers=headers or {}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        frame: dict[str, str] = {}
        for line in response.iter_lines():
            if line == "":
                if "id" in frame:
                    events.append(frame)
                    if n is not None and len(events) == n:
                        break  # drop the connection mid-stream, like a flaky network
                frame = {}
            elif not line.startswith(":"):
                field, _, value = line.partition(": ")
                frame[field] = value
    return events


def test_example_server_resumes_with_last_event_id_without_loss_or_duplicate(
        server: str) -> None:
    """A real HTTP client reads 3 events, drops the connection, more are published, and
    reconnecting with Last-Event-ID yields exactly the rest, in order."""
    with httpx.Client(timeout=httpx.Timeout(30.0)) as client:
        ids = [client.post(f"{server}/publish?type=step", json={"n": i}).json()["id"]
               for i in range(5)]
        first = read_events(client, f"{server}/events", 3)
        assert [e["id"] for e in first] == ids[:3]
        assert [json.loads(e["data"]) for e in first] == [{"n": 0}, {"n": 1}, {"n": 2}]
        assert {e["event"] for e in first} == {"step"}
        ids += [client.post(f"{server}/publish?type=step", json={"n": i}).json()["id"]
                for i in range(5, 8)]
        ids.append(client.post(f"{server}/publish?type=done", json={"ok": True}).json()["id"])
        rest = read_events(client, f"{server}/events?until=done", None,
                           headers={"Last-Event-ID": first[-1]["id"]})
        assert [e["id"] for e in rest] == ids[3:]
        assert [e["event"] for e in rest][-1] == "done"
        assert [json.loads(e["data"]) for e in rest[:-1]] == [{"n": i} for i in range(3, 8)]


def test_example_server_rejects_a_malformed_last_event_id(server: str) -> None:
    """A garbage Last-Event-ID is a 400, not a broken stream; the page is served."""
    response = httpx.get(f"{server}/events", headers={"Last-Event-ID": "nope"}, timeout=10)
    assert response.status_code == 400
    assert "last_event_id" in response.json()["error"]
    page = httpx.get(f"{server}/", timeout=10)
    assert "EventSource" in page.text


def test_example_server_stops_within_seconds_of_sigterm_with_a_client_connected(
        flexisync_url: str, namespace: str) -> None:
    """SIGTERM while a browser holds an event stream open (heartbeat 15 s away): the
    stream ends and the server exits cleanly within a few seconds, instead of waiting
    for the client forever."""
    with example_server(flexisync_url, namespace, "--heartbeat", "15") as (process, base):
        connected, ended = threading.Event(), threading.Event()

        def client() -> None:
            with contextlib.suppress(httpx.HTTPError), \
                    httpx.stream("GET", f"{base}/events", timeout=60) as response:
                for line in response.iter_lines():
                    if line.startswith("id: "):
                        connected.set()
            ended.set()

        thread = threading.Thread(target=client, name="test-sse-client", daemon=True)
        thread.start()
        httpx.post(f"{base}/publish", json={"hello": 1}, timeout=10)
        assert connected.wait(10), "the client never got its first event"
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(10)
        except subprocess.TimeoutExpired:
            code = None
        took = time.monotonic() - started
        assert code is not None, "still running 10 s after SIGTERM"
        assert took < 4.0, f"took {took:.1f}s to stop after SIGTERM"
        assert code == 0, f"exit status {code}"
        assert ended.wait(5), "the client's stream did not end"
        thread.join(5)
