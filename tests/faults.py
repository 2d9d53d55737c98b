"""A TCP proxy that injects network faults between a client and a private redis-server.

The suite's fault layer: tests put a :class:`FaultProxy` in front of a server they
started themselves and make the network misbehave on demand, deterministically:

* ``stall()``: stop forwarding bytes in both directions while every connection stays
  open, so the client sees a hung server (a half-open TCP connection, a frozen host);
* ``delay(s)``: hold every forwarded chunk for ``s`` seconds;
* ``cut()``: close every open connection at once (a crashed proxy, a dropped NAT entry);
* ``refuse(True)``: refuse new connections (a server that is down).

It only ever listens on and connects to loopback.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import struct
import threading
import time

__all__ = ["FaultProxy"]

_CHUNK = 65536


class _Pair:
    """One proxied connection: the client's socket and ours to the server."""

    def __init__(self, client: socket.socket, server: socket.socket) -> None:
        self.client = client
        self.server = server
        # Bytes read but not yet forwarded, per direction: (deliver_at, data).
        self.to_server: list[tuple[float, bytes]] = []
        self.to_client: list[tuple[float, bytes]] = []

    def close(self) -> None:
        for sock in (self.client, self.server):
            with contextlib.suppress(OSError):
                # Linger 0: close() sends RST, as a crashed peer or dropped route would.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            with contextlib.suppress(OSError):
                sock.close()


class FaultProxy:
    """Forward 127.0.0.1:``port`` to ``host``:``target_port``, with faults on demand.

    Args:
        target_port: the port of the redis-server behind the proxy.
        host: the server's address (loopback only).
    """

    def __init__(self, target_port: int, host: str = "127.0.0.1") -> None:
        self.target = (host, target_port)
        self._listen = socket.create_server(("127.0.0.1", 0))
        self._listen.setblocking(False)
        self.port: int = self._listen.getsockname()[1]
        self._lock = threading.Lock()
        self._pairs: list[_Pair] = []
        self._stalled = False
        self._delay = 0.0
        self._refuse = False
        self._closed = False
        self._wake_r, self._wake_w = socket.socketpair()
        self._thread = threading.Thread(target=self._run, name="test-fault-proxy", daemon=True)
        self._thread.start()

    # --- controls ------------------------------------------------------------------

    def url(self, db: int = 0) -> str:
        """A ``redis://`` URL that goes through this proxy."""
        return f"redis://127.0.0.1:{self.port}/{db}"

    def stall(self) -> None:
        """Stop forwarding in both directions; connections stay open (a hung server)."""
        with self._lock:
            self._stalled = True
        self._wake()

    def resume(self) -> None:
        """Forward again, including everything held back while stalled; no delay."""
        with self._lock:
            self._stalled = False
            self._delay = 0.0
            self._refuse = False
        self._wake()

    def delay(self, seconds: float) -> None:
        """Hold every chunk read from now on for ``seconds`` before forwarding it."""
        with self._lock:
            self._delay = seconds
        self._wake()

    def cut(self) -> None:
        """Close every open connection now (with RST); new connections are accepted."""
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for pair in pairs:
            pair.close()
        self._wake()

    def refuse(self, refuse: bool = True) -> None:
        """Refuse (close at once) new connections while ``refuse`` is true."""
        with self._lock:
            self._refuse = refuse
        self._wake()

    @property
    def connections(self) -> int:
        """How many proxied connections are open."""
        with self._lock:
            return len(self._pairs)

    def close(self) -> None:
        """Stop the proxy and close every connection."""
        self._closed = True
        self._wake()
        self._thread.join(5)
        self.cut()
        with contextlib.suppress(OSError):
            self._listen.close()
        for sock in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                sock.close()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the forwarding loop ---------------------------------------------------------

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        while not self._closed:
            with self._lock:
                pairs = list(self._pairs)
                stalled = self._stalled
            sel = selectors.DefaultSelector()
            sel.register(self._listen, selectors.EVENT_READ, None)
            sel.register(self._wake_r, selectors.EVENT_READ, None)
            timeout = None
            now = time.monotonic()
            for pair in pairs:
                if not stalled:
                    with contextlib.suppress(ValueError, KeyError, OSError):
                        sel.register(pair.client, selectors.EVENT_READ, (pair, True))
                        sel.register(pair.server, selectors.EVENT_READ, (pair, False))
                    pending = [at for at, _ in pair.to_server + pair.to_client]
                    if pending:
                        wait = max(0.0, min(pending) - now)
                        timeout = wait if timeout is None else min(timeout, wait)
            try:
                ready = sel.select(timeout)
            except (OSError, ValueError):
                ready = []
            for key, _ in ready:
                if key.fileobj is self._wake_r:
                    with contextlib.suppress(OSError):
                        self._wake_r.recv(4096)
                elif key.fileobj is self._listen:
                    self._accept()
                else:
                    pair, from_client = key.data
                    self._read(pair, from_client)
            if not stalled:
                self._flush(time.monotonic())
            sel.close()

    def _accept(self) -> None:
        try:
            client, _ = self._listen.accept()
        except OSError:
            return
        with self._lock:
            refuse = self._refuse
        if refuse:
            _Pair(client, client).close()
            return
        try:
            server = socket.create_connection(self.target, timeout=2.0)
        except OSError:
            client.close()
            return
        client.setblocking(False)
        server.setblocking(False)
        pair = _Pair(client, server)
        with self._lock:
            # Decided again under the lock: a refuse() (and the cut() after it) that
            # landed while we connected must not miss this connection.
            if not self._refuse:
                self._pairs.append(pair)
                return
        pair.close()

    def _read(self, pair: _Pair, from_client: bool) -> None:
        sock = pair.client if from_client else pair.server
        try:
            data = sock.recv(_CHUNK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._drop(pair)
            return
        with self._lock:
            at = time.monotonic() + self._delay
        (pair.to_server if from_client else pair.to_client).append((at, data))

    def _flush(self, now: float) -> None:
        with self._lock:
            pairs = list(self._pairs)
        for pair in pairs:
            for queue, sock in ((pair.to_server, pair.server), (pair.to_client, pair.client)):
                while queue and queue[0][0] <= now:
                    _, data = queue.pop(0)
                    try:
                        sock.setblocking(True)
                        sock.sendall(data)
                        sock.setblocking(False)
                    except OSError:
                        self._drop(pair)
                        break

    def _drop(self, pair: _Pair) -> None:
        with self._lock:
            if pair in self._pairs:
                self._pairs.remove(pair)
        pair.close()
