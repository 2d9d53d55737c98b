"""Start real gunicorn and uWSGI servers running ``examples/wsgi_app.py`` on loopback.

Each server runs in its own process group, under the test's own namespace, and is killed
(the whole group) when the test ends, whatever happened. Requests are made with httpx;
``reach_every_worker`` keeps asking until every worker process has answered (a bounded
loop with a deadline, never a sleep guess).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
BIN = Path(sys.executable).parent
WORKERS = 4


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """A running worker server: ``get(path, **query)`` returns the JSON reply."""

    def __init__(self, name: str, command: list[str], env: dict[str, str], log: Path,
                 port: int) -> None:
        self.name = name
        self.port = port
        self.log = log
        self.base = f"http://127.0.0.1:{port}"
        with log.open("wb") as out:
            self.process = subprocess.Popen(
                command, env=env, cwd=str(ROOT), stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )
        # One connection per request: sync workers and uWSGI's http-socket close the
        # connection after each answer anyway, and a new connection may reach any worker.
        self.http = httpx.Client(base_url=self.base, timeout=10.0,
                                 limits=httpx.Limits(max_keepalive_connections=0))

    def get(self, path: str, **query: Any) -> dict[str, Any]:
        """GET ``path`` and return the decoded JSON body (fails on a non-200 answer)."""
        response = self.http.get(path, params=query)
        assert response.status_code == 200, f"{path}: {response.status_code} {response.text}"
        body: dict[str, Any] = response.json()
        return body

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Wait until the server answers ``/pid``; fail with its log if it died."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"{self.name} exited with {self.process.returncode}:\n{self.tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if self.http.get("/pid", timeout=2.0).status_code == 200:
                    return
            time.sleep(0.05)
        pytest.fail(f"{self.name} did not answer within {timeout}s:\n{self.tail()}")

    def tail(self) -> str:
        """The last lines of the server's log."""
        return self.log.read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        """Kill the server's whole process group and wait for the master."""
        self.http.close()
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                # uWSGI treats SIGTERM as "reload gracefully"; SIGINT is its "stop now".
                stop = signal.SIGINT if self.name == "uwsgi" else signal.SIGTERM
                os.killpg(self.process.pid, stop)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=10.0)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)  # stragglers of the group
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=10.0)


def reach_every_worker(server: Server, path: str, *, accept: Callable[[dict[str, Any]], bool]
                       = lambda _reply: True, workers: int = WORKERS, timeout: float = 30.0,
                       query: dict[str, Any] | None = None) -> dict[int, dict[str, Any]]:
    """Request ``path`` until ``workers`` distinct pids gave a reply that ``accept`` likes.

    Returns the accepted reply of each pid. Fails after ``timeout`` seconds naming the
    pids that never gave an accepted reply, with their last reply.
    """
    accepted: dict[int, dict[str, Any]] = {}
    last: dict[int, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout
    while len(accepted) < workers:
        reply = server.get(path, **(query or {}))
        last[reply["pid"]] = reply
        if accept(reply):
            accepted.setdefault(reply["pid"], reply)
        if time.monotonic() > deadline:
            missing = {pid: r for pid, r in last.items() if pid not in accepted}
            pytest.fail(f"{path}: only {len(accepted)} of {workers} workers gave an accepted "
                        f"reply within {timeout}s; others last said {missing}")
    return accepted


def server_env(url: str, namespace: str) -> dict[str, str]:
    """The environment a server runs the example app with."""
    env = dict(os.environ)
    env.update(FLEXISYNC_URL=url, FLEXISYNC_NAMESPACE=namespace, PYTHONUNBUFFERED="1")
    env.pop("FLEXISYNC_TEST_URL", None)
    return env


def gunicorn_command(port: int, *, preload: bool, timeout: int = 30,
                     app: str = "wsgi_app:application", chdir: Path = EXAMPLES) -> list[str]:
    """gunicorn with 4 sync workers serving ``app`` (default: the example app)."""
    command = [str(BIN / "gunicorn"), "--workers", str(WORKERS), "--worker-class", "sync",
               "--bind", f"127.0.0.1:{port}", "--chdir", str(chdir),
               "--timeout", str(timeout), "--graceful-timeout", "2",
               "--log-level", "warning", app]
    if preload:
        command.insert(1, "--preload")  # preload_app = True
    return command


def uwsgi_ini(directory: Path, port: int, *, lazy_apps: bool, fork_hooks: bool = True,
              harakiri: int | None = None) -> Path:
    """A uWSGI config file: master + 4 processes serving the example app.

    ``fork_hooks=False`` leaves out ``py-call-uwsgi-fork-hooks``: uWSGI then forks
    without running Python's at-fork hooks and flexisync's pid check must notice.
    """
    lines = [
        "[uwsgi]",
        "master = true",
        f"processes = {WORKERS}",
        f"http-socket = 127.0.0.1:{port}",
        f"wsgi-file = {EXAMPLES / 'wsgi_app.py'}",
        "need-app = true",
        "die-on-term = true",
        "disable-logging = true",
        "enable-threads = true",
        f"py-call-uwsgi-fork-hooks = {'true' if fork_hooks else 'false'}",
        f"lazy-apps = {'true' if lazy_apps else 'false'}",
    ]
    if harakiri is not None:
        lines.append(f"harakiri = {harakiri}")
    path = directory / f"uwsgi-{port}.ini"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def start_server(tmp_path: Path, flexisync_url: str, namespace: str,
                 ) -> Iterator[Callable[..., Server]]:
    """``start_server(kind, **options)`` -> a ready :class:`Server`; all stopped after."""
    servers: list[Server] = []

    def start(kind: str, **options: Any) -> Server:
        if not (BIN / kind).exists():
            pytest.skip(f"{kind} is not installed: pip install 'flexisync[servers]'")
        port = free_port()
        if kind == "gunicorn":
            command = gunicorn_command(port, **options)
        else:
            command = [str(BIN / "uwsgi"), "--ini", str(uwsgi_ini(tmp_path, port, **options))]
        server = Server(kind, command, server_env(flexisync_url, namespace),
                        tmp_path / f"{kind}-{port}.log", port)
        servers.append(server)
        server.wait_ready()
        return server

    try:
        yield start
    finally:
        for server in servers:
            server.stop()
