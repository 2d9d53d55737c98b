"""The ``flexisync-sentinel`` watcher thread: follows ``+switch-master`` for one Context.

See :mod:`flexisync._sentinel` for what a switch does. The watcher subscribes to
``+switch-master`` on every sentinel (one select() loop, one thread), re-checks the
master's address (``SENTINEL MASTER`` on every sentinel, highest ``config-epoch``) on
every (re)subscription, on a poke and every :data:`~flexisync._sentinel.RECHECK`
seconds, and PINGs its subscriptions to notice a half-open socket. While at least one
subscription is live and the last re-check answered, the address is *confirmed*.
"""

from __future__ import annotations

import contextlib
import random
import select
import socket
import threading
import time
from typing import Any

import redis.exceptions as rexc
from redis.backoff import NoBackoff
from redis.retry import Retry

from flexisync._log import get_logger
from flexisync._sentinel import RECHECK, SWITCH_CHANNEL, MasterAddress

__all__ = ["Watcher"]


class Watcher:
    """The ``flexisync-sentinel`` thread of one Context: see the module docstring."""

    def __init__(self, master: MasterAddress, endpoints: list[tuple[type, dict[str, Any]]],
                 *, name: str = "flexisync-sentinel") -> None:
        self.master = master
        self._endpoints = endpoints
        self._name = name
        self._log = get_logger("sentinel", service=master.service)
        self._reset()

    def _reset(self) -> None:
        self._stop = threading.Event()
        self._poked = threading.Event()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._thread: threading.Thread | None = None
        self.master._poke = self.poke

    def start(self) -> None:
        """Start the thread (idempotent)."""
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
            self._thread.start()

    def poke(self) -> None:
        """Re-check the master's address now."""
        self._poked.set()
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    def stop(self) -> None:
        """Stop the thread and close its connections; waits up to 5 s for it."""
        self._stop.set()
        self.poke()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5.0)
        for sock in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                sock.close()
        self.master.confirmed = False

    def after_fork(self) -> None:
        """In a forked child: forget the parent's thread and sockets, start anew."""
        for sock in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                sock.close()
        self.master.after_fork()
        stopped = self._stop.is_set()
        self._reset()
        if not stopped:
            self.start()

    # -- the loop ----------------------------------------------------------------------

    def _run(self) -> None:
        self._subs: dict[int, Any] = {}
        self._retry_at: dict[int, float] = {}
        self._failures: dict[int, int] = {}
        self._pings: dict[int, float] = {}
        next_check = 0.0
        try:
            while not self._stop.is_set():
                try:
                    added = self._connect_missing()
                    if added or time.monotonic() >= next_check or self._poked.is_set():
                        self._poked.clear()
                        self._recheck(bool(self._subs))
                        self._ping()
                        next_check = time.monotonic() + RECHECK
                    if not self._subs:
                        self.master.confirmed = False
                    self._wait(next_check)
                except Exception:  # never die: a dead watcher follows nothing
                    self._log.exception("sentinel.watcher_failed")
                    self.master.confirmed = False
                    self._stop.wait(1.0)
        finally:
            for conn in self._subs.values():
                with contextlib.suppress(rexc.RedisError, OSError):
                    conn.disconnect()

    def _connect_missing(self) -> bool:
        """Subscribe on every sentinel that has no subscription and is due a retry;
        True when one was added."""
        now = time.monotonic()
        added = False
        for i in range(len(self._endpoints)):
            if i in self._subs or self._retry_at.get(i, 0.0) > now:
                continue
            try:
                self._subs[i] = self._subscribe(i)
                self._failures[i] = 0
                added = True
            except (rexc.RedisError, OSError) as exc:
                failures = self._failures[i] = self._failures.get(i, 0) + 1
                delay = min(2.0, 0.05 * 2 ** min(failures - 1, 10))
                self._retry_at[i] = now + random.uniform(delay / 2, delay)
                if failures == 1:
                    self._log.info("sentinel.unreachable", sentinel=self._at(i),
                                   error=type(exc).__name__)
        return added

    def _ping(self) -> None:
        """PING every subscription (a half-open socket never answers); drop the ones
        whose previous PING went unanswered for :data:`RECHECK` seconds."""
        now = time.monotonic()
        for i, sent in list(self._pings.items()):
            if i in self._subs and now - sent > RECHECK:
                self._drop(i, "no reply to PING")
        for i, conn in list(self._subs.items()):
            if i not in self._pings:
                try:
                    conn.send_command("PING")
                    self._pings[i] = now
                except (rexc.RedisError, OSError) as exc:
                    self._drop(i, type(exc).__name__)

    def _wait(self, next_check: float) -> None:
        """Sleep until a sentinel speaks, a re-check or reconnect is due, or a poke;
        then handle what the sentinels said."""
        now = time.monotonic()
        due = [next_check] + [t for i, t in self._retry_at.items() if i not in self._subs]
        timeout = min(max(min(due) - now, 0.0), RECHECK)
        socks = [self._wake_r]
        for conn in self._subs.values():
            if conn._sock is not None:
                socks.append(conn._sock)
        with contextlib.suppress(OSError, ValueError):
            select.select(socks, [], [], timeout)
        with contextlib.suppress(OSError):
            while self._wake_r.recv(64):
                pass
        for i, conn in list(self._subs.items()):
            try:
                while conn.can_read(timeout=0):
                    self._handle(conn.read_response())
                    self._pings.pop(i, None)
            except (rexc.RedisError, OSError, ValueError) as exc:
                self._drop(i, type(exc).__name__)
                self._retry_at[i] = time.monotonic() + 0.05

    def _drop(self, i: int, why: str) -> None:
        conn = self._subs.pop(i)
        self._pings.pop(i, None)
        with contextlib.suppress(rexc.RedisError, OSError):
            conn.disconnect()
        self._log.info("sentinel.subscription_lost", sentinel=self._at(i), reason=why)

    def _at(self, i: int) -> str:
        kwargs = self._endpoints[i][1]
        return f"{kwargs.get('host')}:{kwargs.get('port')}"

    def _subscribe(self, i: int) -> Any:
        cls, kwargs = self._endpoints[i]
        kwargs = dict(kwargs)
        kwargs.update(decode_responses=False, protocol=2, health_check_interval=0,
                      retry=Retry(NoBackoff(), 0))
        conn = cls(**kwargs)
        try:
            conn.connect()
            conn.send_command("SUBSCRIBE", SWITCH_CHANNEL)
            reply = conn.read_response()
            if not isinstance(reply, list) or _text(reply[0]) != "subscribe":
                raise rexc.ConnectionError(f"unexpected reply to SUBSCRIBE: {reply!r}")
        except BaseException:
            with contextlib.suppress(rexc.RedisError, OSError):
                conn.disconnect()
            raise
        return conn

    def _handle(self, reply: Any) -> None:
        if not isinstance(reply, list) or len(reply) < 3 or _text(reply[0]) != "message":
            return
        if _text(reply[1]) != SWITCH_CHANNEL:
            return
        parts = _text(reply[2]).split()
        if len(parts) != 5 or parts[0] != self.master.service:
            return
        try:
            old, new = (parts[1], int(parts[2])), (parts[3], int(parts[4]))
        except ValueError:
            return
        if not self.master.update(new, None, via="announcement", replaces=old) \
                and self.master.address != new:
            self._poked.set()  # news we could not place: re-check with epochs now

    def _recheck(self, subscribed: bool) -> None:
        try:
            address, epoch = self.master.query()
        except rexc.ConnectionError:
            self.master.confirmed = False
            return
        self.master.update(address, epoch, via="query")
        self.master.confirmed = subscribed


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
