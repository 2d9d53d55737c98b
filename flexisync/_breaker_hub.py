"""The background half of every :class:`~flexisync.CircuitBreaker` of one Coordinator.

One named daemon thread per Coordinator (``flexisync-breakers``), started on the first
breaker use, stopped by ``Coordinator.close()`` and rebuilt lazily after ``fork()``:

* runs ``on_state_change`` callbacks, in order, off the listener thread;
* every 100 ms flushes the successes each breaker aggregated on its hot path;
* re-reads each breaker's shared state every ``refresh_interval`` seconds, and at once
  when the listener lost its connection, so a missed message is repaired;
* while Redis is unreachable, checks every half second whether it is back and lets the
  breakers reconcile.

It also runs the breaker Lua scripts: each is ``breaker_lib.lua`` followed by the
operation's own file, registered once per client and run by EVALSHA.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import redis.exceptions as rexc

from flexisync._connection import is_transient
from flexisync._log import get_logger
from flexisync.errors import BackendError, BackendUnavailable

if TYPE_CHECKING:
    from flexisync.breaker import CircuitBreaker
    from flexisync.coordinator import Coordinator

__all__ = ["FLUSH_INTERVAL", "Hub", "hub_of"]

FLUSH_INTERVAL = 0.1  # seconds between flushes of aggregated successes
RECHECK_INTERVAL = 0.5  # seconds between checks whether Redis is back

def hub_of(coordinator: Coordinator) -> Hub:
    """The one :class:`Hub` of ``coordinator`` (built on first use)."""
    return coordinator._extension("breakers", Hub)


class Hub:
    """Per-Coordinator breaker machinery. Internal; see the module docstring."""

    def __init__(self, coordinator: Coordinator) -> None:
        self._coordinator = coordinator
        self._backend = coordinator._backend
        self._log = get_logger("breaker", namespace=coordinator.namespace)
        self._breakers: list[CircuitBreaker] = []
        # one CircuitBreaker per (name, policy): see CircuitBreaker.__new__
        self.instances: dict[tuple[str, Any], CircuitBreaker] = {}
        self.instances_lock = threading.Lock()
        self._reconnect_hook: Callable[[], None] | None = None
        self._closed = False
        self._reset_runtime()
        coordinator._on_close(self.close)
        coordinator._on_fork(self._after_fork)

    def _reset_runtime(self) -> None:
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue[tuple[Callable[..., None], tuple[Any, ...]]] = \
            queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    # --- scripts --------------------------------------------------------------------

    def run(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> list[Any]:
        """Run ``breaker_<name>.lua`` once, retrying once at once on a dropped connection.

        No backoff: a protected call must not wait for Redis; the caller degrades instead.

        Raises:
            BackendUnavailable: Redis could not be reached (or did not answer in time).
            BackendError: Redis rejected the script.
        """
        if self._backend.closed:
            raise BackendUnavailable(self._backend.address, reason="the Coordinator is closed")
        self._backend.check_fork()  # a fork the at-fork hooks missed (uWSGI)
        script = self._backend.script(f"breaker_{name}")
        start = time.monotonic()
        for attempt in (1, 2):
            try:
                return list(script(keys=keys, args=args))
            except (rexc.RedisError, OSError) as exc:
                if not is_transient(exc):
                    raise BackendError(f"breaker.{name}", str(exc)) from exc
                if attempt == 2 or isinstance(exc, (rexc.TimeoutError, TimeoutError)):
                    raise BackendUnavailable(
                        self._backend.address, attempts=attempt,
                        elapsed=time.monotonic() - start,
                        reason=f"{type(exc).__name__}: {exc}") from exc
        raise AssertionError("unreachable")  # pragma: no cover

    # --- registration ---------------------------------------------------------------

    def register(self, breaker: CircuitBreaker) -> None:
        """Include ``breaker`` in the periodic work and start the thread if needed."""
        with self._lock:
            if breaker not in self._breakers:
                self._breakers.append(breaker)
            if self._reconnect_hook is None:
                self._reconnect_hook = self._coordinator._listener.add_reconnect_hook(
                    self._on_reconnect)
            self._ensure_thread()

    def notify(self, fn: Callable[..., None], *args: Any) -> None:
        """Run ``fn(*args)`` on the hub thread, soon (used for state-change callbacks)."""
        self._queue.put((fn, args))
        with self._lock:
            self._ensure_thread()

    def _ensure_thread(self) -> None:
        if self._closed:
            return
        if self._thread is None or not self._thread.is_alive():
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._run, name="flexisync-breakers",
                                            daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Stop the thread (runs first in ``Coordinator.close()``)."""
        self._closed = True
        self._stop.set()
        self._queue.put((_noop, ()))
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5.0)

    def _after_fork(self) -> None:
        self.instances_lock = threading.Lock()
        self._reset_runtime()  # the listener kept our reconnect hook: not added again
        for breaker in list(self.instances.values()):
            breaker._after_fork()

    def _on_reconnect(self) -> None:
        # On the listener thread: only mark; the hub thread does the reads.
        for breaker in list(self._breakers):
            breaker._refresh_due = 0.0
        self._queue.put((_noop, ()))

    # --- the loop -------------------------------------------------------------------

    def _run(self) -> None:
        next_tick = time.monotonic()
        was_connected = True
        while not self._stop.is_set():
            timeout = max(0.0, next_tick - time.monotonic())
            try:
                fn, args = self._queue.get(timeout=timeout)
            except queue.Empty:
                pass
            else:
                try:
                    fn(*args)
                except Exception:
                    self._log.exception("breaker.callback_failed")
                if time.monotonic() < next_tick:
                    continue
            if self._stop.is_set():
                break
            now = time.monotonic()
            next_tick = now + FLUSH_INTERVAL
            listener = self._coordinator._listener_obj
            connected = listener is None or listener.connected
            lost = was_connected and not connected
            was_connected = connected
            for breaker in list(self._breakers):
                try:
                    breaker._tick(now, check_now=lost)
                except Exception:
                    self._log.exception("breaker.tick_failed", breaker=breaker.name)


def _noop() -> None:
    return None
