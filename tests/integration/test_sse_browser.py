"""The SSE example in a real browser: headless Chromium's ``EventSource`` resumes with
``Last-Event-ID`` across a server restart, with every event exactly once and in order.

Chromium is the distribution's package (``chromium`` or ``chromium-browser`` on PATH;
``.ci/run`` installs it when missing). It is driven over the DevTools protocol on a pair
of pipes (``--remote-debugging-pipe``: NUL-terminated JSON messages on fds 3 and 4), so
no driver package and no browser download are needed. Every wait polls the page's state
with a deadline.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

import flexisync
from tests.helpers import wait_until
from tests.servers.conftest import free_port

pytestmark = pytest.mark.slow

EXAMPLE = pathlib.Path(__file__).resolve().parents[2] / "examples" / "sse_server.py"


def chromium_binary() -> str | None:
    """The system Chromium: ``$CHROMIUM``, else ``chromium`` / ``chromium-browser`` on PATH."""
    for name in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser"):
        if name and (path := shutil.which(name)):
            return path
    return None


# Runs Chromium with the pipe ends on the descriptors --remote-debugging-pipe uses: it
# reads commands on fd 3 and writes replies on fd 4 (no preexec_fn in this threaded
# process; via fds above 9 so that neither move overwrites the other's source).
_ONTO_FDS_3_AND_4 = """
import fcntl, os, sys
moved = [fcntl.fcntl(int(fd), fcntl.F_DUPFD, 10) for fd in sys.argv[1:3]]
os.dup2(moved[0], 3)
os.dup2(moved[1], 4)
os.execv(sys.argv[3], sys.argv[3:])
"""


class DevToolsError(AssertionError):
    """Chromium answered a DevTools command with an error, or did not answer in time."""


class Chromium:
    """A headless Chromium driven over the DevTools protocol on pipes.

    ``command(method, **params)`` sends one command and returns its result (events
    received meanwhile are dropped); ``open(url)`` opens a tab and returns its session
    id; ``evaluate(session, expression)`` returns the expression's JSON value.
    """

    def __init__(self, binary: str, profile: pathlib.Path) -> None:
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        self.process = subprocess.Popen(
            [sys.executable, "-c", _ONTO_FDS_3_AND_4, str(to_browser_r), str(from_browser_w),
             binary, "--headless", "--no-sandbox", "--remote-debugging-pipe",
             f"--user-data-dir={profile}", "--no-first-run", "--no-default-browser-check",
             "--disable-gpu", "--disable-extensions", "--disable-background-networking",
             "--mute-audio", "about:blank"],
            pass_fds=(to_browser_r, from_browser_w), stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buffer = b""
        self._next_id = 0

    def command(self, method: str, session: str | None = None, timeout: float = 30.0,
                **params: Any) -> dict[str, Any]:
        """Send ``method`` (to ``session``, or to the browser) and return its result."""
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params}
        if session is not None:
            message["sessionId"] = session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._receive(deadline, method)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise DevToolsError(f"{method}: {reply['error']}")
                result: dict[str, Any] = reply.get("result", {})
                return result

    def _receive(self, deadline: float, method: str) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._from_browser], [], [], left)[0]:
                raise DevToolsError(f"{method}: no answer from Chromium in time")
            chunk = os.read(self._from_browser, 1 << 16)
            if not chunk:
                raise DevToolsError(f"{method}: Chromium exited "
                                    f"(status {self.process.poll()})")
            self._buffer += chunk
        raw, _, self._buffer = self._buffer.partition(b"\0")
        message: dict[str, Any] = json.loads(raw)
        return message

    def open(self, url: str) -> str:
        """Open ``url`` in a new tab; the DevTools session id to talk to it."""
        target = self.command("Target.createTarget", url=url)["targetId"]
        session: str = self.command("Target.attachToTarget", targetId=target,
                                    flatten=True)["sessionId"]
        return session

    def evaluate(self, session: str, expression: str) -> Any:
        """The JSON value of ``expression`` evaluated in the tab of ``session``."""
        result = self.command("Runtime.evaluate", session, expression=expression,
                              returnByValue=True)
        if "exceptionDetails" in result:
            raise DevToolsError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def close(self) -> None:
        """Ask Chromium to quit; kill its process group if it lingers."""
        with contextlib.suppress(DevToolsError, OSError):
            self.command("Browser.close", timeout=5)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(5)
        finally:
            os.close(self._to_browser)
            os.close(self._from_browser)


@pytest.fixture
def chromium(tmp_path: pathlib.Path) -> Iterator[Chromium]:
    """A headless system Chromium; the test is skipped when none is installed."""
    binary = chromium_binary()
    if binary is None:
        pytest.skip("no Chromium binary (chromium / chromium-browser) on PATH: install the "
                    "distribution's package (apt-get install chromium), as .ci/run does")
    browser = Chromium(binary, tmp_path / "chromium-profile")
    try:
        yield browser
    finally:
        browser.close()


@contextlib.contextmanager
def example_server(flexisync_url: str, namespace: str, port: int,
                   log: pathlib.Path) -> Iterator[str]:
    """examples/sse_server.py on ``port`` (a subprocess, output appended to ``log``);
    stopped by SIGTERM when the block ends, and then it must exit with status 0."""
    with log.open("ab") as output:
        process = subprocess.Popen(
            [sys.executable, str(EXAMPLE), "--port", str(port), "--namespace", namespace,
             "--stream", "web", "--produce", "0", "--heartbeat", "1", "--reconnect", "0.2"],
            env={**os.environ, "FLEXISYNC_URL": flexisync_url},
            stdout=output, stderr=subprocess.STDOUT, start_new_session=True,
        )
    base = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"example server exited ({process.returncode}): "
                                 f"{log.read_text()}")
        try:
            return httpx.get(f"{base}/health", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_until(up, timeout=30, interval=0.05, message="example server up")
        yield base
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(5)
    assert process.returncode == 0, (f"example server exited with {process.returncode}: "
                                     f"{log.read_text()}")


def page_state(browser: Chromium, session: str) -> dict[str, Any]:
    """The page's record of what its EventSource saw (see ``sse_page.html``); empty
    counts until the page's script has run."""
    state = browser.evaluate(session, "window.sse ? JSON.stringify(window.sse) : null")
    if state is None:
        return {"events": [], "opens": 0, "errors": 0}
    loaded: dict[str, Any] = json.loads(state)
    return loaded


def wait_for_state(browser: Chromium, session: str, ready: Callable[[dict[str, Any]], bool],
                   message: str) -> dict[str, Any]:
    """Poll the page's state until ``ready(state)``; that state."""
    def check() -> dict[str, Any] | None:
        state = page_state(browser, session)
        return state if ready(state) else None

    state: dict[str, Any] = wait_until(check, timeout=30, interval=0.05, message=message)
    return state


def test_event_source_resumes_with_last_event_id_across_a_server_restart(
        chromium: Chromium, flexisync_url: str, namespace: str,
        tmp_path: pathlib.Path) -> None:
    """The page's EventSource reads 3 events; the server process stops; 2 events are
    appended while it is down; it starts again on the same port; 2 more are appended
    through it. The browser reconnected by itself and sent Last-Event-ID: the page saw
    all 7 events, each exactly once, in append order (resuming from the start would
    repeat the first 3; resuming from "now" would lose the 2 appended meanwhile)."""
    port, log = free_port(), tmp_path / "server.log"
    ids: list[str] = []
    with flexisync.connect(flexisync_url, namespace=namespace) as sync:
        stream = sync.stream("web")
        with example_server(flexisync_url, namespace, port, log) as base:
            session = chromium.open(f"{base}/")
            wait_for_state(chromium, session, lambda s: s["opens"] >= 1,
                           "the page's EventSource open")
            with httpx.Client(base_url=base, timeout=10) as client:
                for n in range(3):
                    reply = client.post("/publish", params={"type": "step"}, json={"n": n})
                    ids.append(reply.json()["id"])
            wait_for_state(chromium, session, lambda s: len(s["events"]) >= 3,
                           "the first 3 events in the page")
        # The server is gone (SIGTERM, exit status 0 checked): the page notices.
        wait_for_state(chromium, session, lambda s: s["errors"] >= 1,
                       "the page's EventSource noticing the server left")
        ids += [stream.append({"n": n}, type="step") for n in (3, 4)]
        with example_server(flexisync_url, namespace, port, log) as base:
            wait_for_state(chromium, session, lambda s: len(s["events"]) >= 5,
                           "the 2 events appended while down")
            with httpx.Client(base_url=base, timeout=10) as client:
                for n in (5, 6):
                    reply = client.post("/publish", params={"type": "step"}, json={"n": n})
                    ids.append(reply.json()["id"])
            state = wait_for_state(chromium, session, lambda s: len(s["events"]) >= 7,
                                   "the events after the restart")
    assert [e["id"] for e in state["events"]] == ids, "lost, repeated or reordered events"
    assert [json.loads(e["data"]) for e in state["events"]] == [{"n": n} for n in range(7)]
    assert {e["type"] for e in state["events"]} == {"step"}
    assert state["opens"] >= 2, f"the EventSource did not reconnect: {state}"
