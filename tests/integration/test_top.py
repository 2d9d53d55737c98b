"""``flexisync top``: one frame, the JSON document, JSON Lines, and a live refreshing run
in a pseudo-terminal stopped by SIGINT / SIGTERM (exit 0); never a password."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import signal
import socket
import struct
import subprocess
import sys
import termios
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import structlog

import flexisync
from flexisync import cli, embedded
from flexisync.cli._top import render
from tests.helpers import wait_until

FLEXISYNC = str(Path(sys.executable).parent / "flexisync")
_SGR = re.compile(r"\x1b\[[0-9;]*m")
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class Down(RuntimeError):
    """What the fake dependency raises."""


def _fail() -> None:
    raise Down("down")


@pytest.fixture(autouse=True)
def _library_logs_captured() -> Iterator[None]:
    """Keep this process's own breaker log lines out of the captured command output."""
    with structlog.testing.capture_logs():
        yield


@pytest.fixture
def target(flexisync_url: str, namespace: str) -> list[str]:
    return ["--url", flexisync_url, "--namespace", namespace]


@pytest.fixture
def fleet(sync: flexisync.Coordinator) -> Iterator[dict[str, Any]]:
    """An open breaker, a closed one with a failure, a held lock and a stream."""
    sync.breaker("openai").trip(retry_after=120)
    with pytest.raises(Down):
        sync.breaker("search").call(_fail)
    lock = sync.lock("deploy", ttl=60)
    assert lock.acquire()
    last = ""
    for n in range(5):
        last = sync.stream("audit").append({"n": n})
    try:
        yield {"lock": lock, "last_id": last}
    finally:
        lock.release()


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "FLEXISYNC_URL")}
    env.update(extra)
    return env


# --- one frame, the JSON document ------------------------------------------------------


def test_once_json_from_a_subprocess(target: list[str], fleet: dict[str, Any]) -> None:
    """`top --once --json` prints exactly one JSON document: the fleet snapshot."""
    done = subprocess.run([FLEXISYNC, "top", "--once", "--json", *target], env=_env(),
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    snap = json.loads(done.stdout)  # one document, nothing else on stdout
    breakers = {b["name"]: b for b in snap["breakers"]}
    assert breakers["openai"]["state"] == "open"
    assert 100 < breakers["openai"]["retry_after"] <= 120
    assert breakers["search"]["failures"] == 1
    assert [(lk["name"], lk["fencing_token"]) for lk in snap["locks"]] == \
        [("deploy", fleet["lock"].fencing_token)]
    assert snap["streams"] == [{"name": "audit", "length": 5, "last_id": fleet["last_id"]}]
    assert done.stderr == ""


def test_once_text_frame_fits_80_columns(capsys: pytest.CaptureFixture[str],
                                         sync: flexisync.Coordinator, target: list[str],
                                         fleet: dict[str, Any]) -> None:
    """`top --once` (stdout not a terminal): one frame, plain text, no escape
    sequences, every line within 80 columns, long names cut."""
    long_name = "provider-" + "x" * 150
    sync.breaker(long_name).trip(retry_after=30)
    code = cli.main(["top", "--once", *target])
    out = capsys.readouterr().out
    assert code == 0
    assert "\x1b" not in out
    lines = out.splitlines()
    assert max(len(line) for line in lines) <= 80
    rows = {line.split()[0]: line.split() for line in lines if line.strip()}
    assert rows["openai"][1] == "open"
    assert re.fullmatch(r"\d+(\.\d)?s|\dm\d\ds", rows["openai"][3])  # time left open
    assert rows["search"][1] == "closed"
    assert rows["deploy"][1].startswith(f"{socket.gethostname()}:{os.getpid()}"[:19])
    assert rows["audit"][1:3] == ["5", fleet["last_id"]]
    assert long_name not in out
    assert any(line.startswith("provider-xxx") for line in lines)
    assert "2 open" in lines[1]


def test_once_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    """Bad --interval is a usage error (2); an unreachable Redis exits 3 with one line
    on stderr and no password."""
    assert cli.main(["top", "--interval", "0"]) == 2
    assert cli.main(["top", "--interval", "nan"]) == 2
    capsys.readouterr()
    port = embedded._free_port()
    code = cli.main(["top", "--once", "--url", f"redis://u:pw-1234@127.0.0.1:{port}/0"])
    captured = capsys.readouterr()
    assert code == 3
    assert captured.out == ""
    assert "cannot reach Redis" in captured.err
    assert "pw-1234" not in captured.err


# --- refreshing ------------------------------------------------------------------------


def test_json_lines_keep_coming_through_an_outage_and_sigterm_ends_them() -> None:
    """`top --json` prints one snapshot per line; with Redis unreachable each line says
    so (it does not exit), and SIGTERM ends it with exit code 0."""
    port = embedded._free_port()
    proc = subprocess.Popen([FLEXISYNC, "top", "--json", "--interval", "0.1", "--url",
                             f"redis://u:pw-5678@127.0.0.1:{port}/0"], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        first, second = json.loads(proc.stdout.readline()), json.loads(proc.stdout.readline())
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        rest = proc.stdout.read() + (proc.stderr.read() if proc.stderr else "")
    finally:
        proc.kill()
        proc.wait()
    for line in (first, second):
        assert "cannot reach Redis" in line["error"]
        assert "pw-5678" not in line["error"]
    assert "pw-5678" not in rest
    assert "Traceback" not in rest


class _Terminal:
    """``flexisync top`` on a pseudo-terminal (80x30); everything it writes is kept."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 80, 0, 0))
        self.proc = subprocess.Popen([FLEXISYNC, "top", *argv], stdin=slave, stdout=slave,
                                     stderr=slave, env=env, close_fds=True)
        os.close(slave)
        self._data = bytearray()
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, name="pty-reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                chunk = os.read(self.master, 65536)
            except OSError:  # EIO: the child closed its side
                return
            if not chunk:
                return
            with self._lock:
                self._data += chunk

    @property
    def text(self) -> str:
        with self._lock:
            return self._data.decode("utf-8", "replace")

    def last_frame(self) -> str:
        """What the latest redraw wrote (from its cursor-home)."""
        return self.text.rsplit("\x1b[H", 1)[-1]

    def stop(self, signum: int) -> int:
        self.proc.send_signal(signum)
        code = self.proc.wait(timeout=30)
        self._reader.join(timeout=10)
        return code

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.master)


def test_refreshing_in_a_terminal_shows_a_trip_and_stops_on_sigint(
        sync: flexisync.Coordinator, target: list[str], fleet: dict[str, Any]) -> None:
    """In a terminal it redraws in place (alternate screen, cursor home), colours the
    states, shows a trip made meanwhile, and Ctrl-C (SIGINT) ends it with exit code 0
    and the terminal restored."""
    term = _Terminal([*target, "--interval", "0.2"], _env(TERM="xterm"))
    try:
        wait_until(lambda: "deploy" in term.last_frame() and "audit" in term.last_frame(),
                   timeout=30, interval=0.05, message="first frame")
        assert "\x1b[?1049h" in term.text  # the alternate screen
        assert "\x1b[32mclosed" in term.last_frame()  # search: closed, in green
        sync.breaker("search").trip(retry_after=30)
        wait_until(lambda: term.last_frame().count("\x1b[31;1mopen") == 2, timeout=30,
                   interval=0.05, message="the trip shown by a later frame")
        frame = term.last_frame()
        for line in frame.split("\r\n"):
            assert len(_ANSI.sub("", line)) <= 80, line
        assert term.stop(signal.SIGINT) == 0
        assert term.text.endswith("\x1b[?25h\x1b[?1049l")  # cursor back, screen restored
        assert "Traceback" not in term.text
        assert "interrupted" not in term.text
    finally:
        term.close()


def test_no_color_and_sigterm_in_a_terminal(target: list[str],
                                            fleet: dict[str, Any]) -> None:
    """With NO_COLOR set it still redraws in place but never colours; SIGTERM ends it
    with exit code 0."""
    term = _Terminal([*target, "--interval", "0.2"], _env(TERM="xterm", NO_COLOR="1"))
    try:
        wait_until(lambda: term.text.count("\x1b[H") >= 2 and "openai" in term.last_frame(),
                   timeout=30, interval=0.05, message="two frames")
        assert term.stop(signal.SIGTERM) == 0
        assert _SGR.search(term.text) is None
        assert "open" in term.text
    finally:
        term.close()


# --- never a password ------------------------------------------------------------------


@pytest.fixture
def password_url(own_server: embedded.EmbeddedRedis) -> str:
    client = redis.Redis.from_url(own_server.url)
    try:
        client.acl_setuser("ops", enabled=True, passwords=["+top-secret-pw"], keys=["*"],
                           channels=["*"], commands=["+@all"])
    finally:
        client.close()
    return f"redis://ops:top-secret-pw@127.0.0.1:{own_server.port}/0"


def test_password_is_never_printed(password_url: str) -> None:
    """The header shows the URL with the password as ***; neither the frame, the JSON
    document nor a live terminal run prints the password."""
    with flexisync.connect(password_url, namespace="pw") as sync:
        sync.breaker("openai").trip()
    once = subprocess.run([FLEXISYNC, "top", "--once", "--url", password_url,
                           "--namespace", "pw"], env=_env(), capture_output=True,
                          text=True, timeout=60, check=False)
    assert once.returncode == 0, once.stderr
    assert "ops:***@" in once.stdout
    as_json = subprocess.run([FLEXISYNC, "top", "--once", "--json", "--namespace", "pw"],
                             env=_env(FLEXISYNC_URL=password_url), capture_output=True,
                             text=True, timeout=60, check=False)
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout)["breakers"][0]["name"] == "openai"
    term = _Terminal(["--url", password_url, "--namespace", "pw", "--interval", "0.2"],
                     _env(TERM="xterm"))
    try:
        wait_until(lambda: "openai" in term.last_frame(), timeout=30, interval=0.05,
                   message="a frame")
        assert term.stop(signal.SIGINT) == 0
    finally:
        term.close()
    for output in (once.stdout, once.stderr, as_json.stdout, as_json.stderr, term.text):
        assert "top-secret-pw" not in output


# --- the frame itself (pure rendering) -------------------------------------------------


def _snap(**kinds: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"namespace": "app", "taken_at": 1_700_000_000.0, "limit": 500,
                            "truncated": {"breakers": False, "locks": False,
                                          "streams": False, "semaphores": False},
                            "breakers": [], "locks": [], "streams": [], "semaphores": []}
    base.update(kinds)
    return base


def _breaker(name: str, state: str, **fields: Any) -> dict[str, Any]:
    row = {"name": name, "state": state, "retry_after": 0.0, "open_period": None,
           "trips": 0, "failures": 0, "probes_in_flight": 0, "changed_at": None,
           "window_calls": 0, "window_failures": 0, "outcomes": []}
    row.update(fields)
    return row


def test_render_columns_recent_outcomes_and_bounds() -> None:
    """Time left open, manual for forced open, calls of the last 60 s only, big numbers
    shortened, control characters neutralised, truncation announced, 80 columns."""
    now = 1_700_000_000.0
    outcomes = [{"t": now - 300, "success": 999, "failure": 999, "rejected": 999},
                {"t": now - 50, "success": 7, "failure": 3, "rejected": 0},
                {"t": now - 10, "success": 123_456, "failure": 2, "rejected": 4_500_000}]
    snap = _snap(
        breakers=[_breaker("openai", "open", retry_after=75.0, trips=3, failures=5,
                           changed_at=now - 20, outcomes=outcomes),
                  _breaker("admin", "forced_open", retry_after=None, changed_at=now - 7200),
                  _breaker("evil\x1b[2J", "closed")],
        locks=[{"name": "deploy", "holder": "host-" + "y" * 60 + ":42", "ttl_left": None,
                "fencing_token": 12, "waiters": 0}],
        streams=[{"name": "audit", "length": 12_345_678, "last_id": f"{int(now * 1000)}-0"}],
        truncated={"breakers": False, "locks": True, "streams": False, "semaphores": False})
    lines = render(snap, url="redis://u:***@h:6379/0", interval=1.0)
    text = "\n".join(lines)
    assert all(len(line) <= 80 for line in lines)
    assert "\x1b" not in text
    row = next(line.split() for line in lines if line.startswith("openai"))
    assert row[1:8] == ["open", "20s", "1m15s", "3", "5", "123k", "5"]
    assert row[8] == "4.5M"
    assert next(line.split() for line in lines if line.startswith("admin"))[1:4] == \
        ["forced_open", "2h00m", "manual"]
    assert "evil?[2J" in text
    assert "no ttl" in text
    assert "12.3M" in text
    assert "more locks exist" in text
    coloured = render(snap, url="u", interval=None, colour=True, unicode=True)
    assert "\x1b[31;1mopen" in "\n".join(coloured)
    assert all(len(_SGR.sub("", line)) <= 80 for line in coloured)
    wide = render(snap, url="u", interval=None, width=200)
    assert any("host-" + "y" * 10 in line for line in wide)
    empty = render(_snap(), url="u", interval=None)
    assert "no breakers" in "\n".join(empty)
    assert "no locks held" in "\n".join(empty)
