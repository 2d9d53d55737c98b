"""The Context: what every primitive of one (Redis, namespace) shares in one process.

Primitives receive a :class:`Context` and use only its public attributes: ``backend``
and ``abackend`` (blocking and asyncio I/O with the retry policy and deadlines), ``keys``
(key layout), ``listener`` (the one pub/sub connection), ``extension()`` (per-Context
machinery such as the breaker hub or the lock watchdog), ``on_fork()``/``on_close()``
hooks, ``janitor()`` (compensating work after a cancellation) and ``closed``.

One process, one truth: :func:`shared` returns the same Context to every
``flexisync.connect()`` and ``flexisync.aio.connect()`` with the same URL, options,
retry policy and namespace, so sync and async code see the same breaker mirrors and
share one listener. Each Coordinator holds one reference; the Context closes its
threads and connections when the last one is closed.
"""

from __future__ import annotations

import os
import queue
import threading
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar, cast

from flexisync._connection import Backend, ConnectionSpec
from flexisync._keys import KeySpace
from flexisync._listener import Listener
from flexisync._log import get_logger

if TYPE_CHECKING:
    from flexisync._core.plan import Plan
    from flexisync.aio._backend import AsyncBackend

__all__ = ["Context", "shared"]

_T = TypeVar("_T")

_registry: dict[Any, Context] = {}
_registry_lock = threading.Lock()
_live: weakref.WeakSet[Context] = weakref.WeakSet()
_fork_hook_installed = False


class Context:
    """Shared machinery of one (Redis, namespace); see the module docstring."""

    def __init__(self, backend: Backend, keys: KeySpace, *, spec: ConnectionSpec | None,
                 make_async: Callable[[], AsyncBackend] | None = None,
                 identity: Any = None) -> None:
        self.backend = backend
        self.keys = keys
        self.spec = spec
        self.identity = identity
        self.log = get_logger("coordinator", namespace=keys.namespace)
        self._make_async = make_async
        self._abackend: AsyncBackend | None = None
        self._lock = threading.RLock()  # RLock: an extension's factory may use the listener
        self._listener_obj: Listener | None = None
        self._extensions: dict[str, Any] = {}
        self._fork_hooks: list[Callable[[], None]] = []
        self._close_hooks: list[Callable[[], None]] = []
        self._janitor: tuple[queue.SimpleQueue[Any], threading.Thread] | None = None
        self._janitor_pid = os.getpid()
        self.refs = 0
        self.closed = False
        self.fork_generation = 0
        backend.on_fork = self.after_fork
        _install_fork_hook()
        _live.add(self)
        if backend.topology == "sentinel":
            from flexisync import _sentinel  # noqa: PLC0415

            _sentinel.attach(self)  # follows +switch-master; registers its own hooks

    @property
    def namespace(self) -> str:
        """The namespace every key and channel of this Context starts with."""
        return self.keys.namespace

    @property
    def address(self) -> str:
        """The server's address, for messages (never a password)."""
        return self.backend.address

    @property
    def abackend(self) -> AsyncBackend:
        """The asyncio backend (built on first use; one client per event loop)."""
        found = self._abackend
        if found is None:
            with self._lock:
                if self._abackend is None:
                    if self._make_async is None:
                        from flexisync.errors import ConfigError  # noqa: PLC0415

                        raise ConfigError("this connection has no asyncio client")
                    self._abackend = self._make_async()
                found = self._abackend
        return found

    @property
    def listener(self) -> Listener:
        """The Context's pub/sub listener (its thread starts on first subscription)."""
        listener = self._listener_obj
        if listener is None:
            with self._lock:
                if self._listener_obj is None:
                    if self.backend.topology == "cluster":
                        from flexisync import _cluster  # noqa: PLC0415

                        self._listener_obj = _cluster.make_listener(self.backend)
                    else:
                        self._listener_obj = Listener(self.backend)
                listener = self._listener_obj
        return listener

    @property
    def listener_if_started(self) -> Listener | None:
        """The listener when something created it, else ``None`` (for inspection)."""
        return self._listener_obj

    def extension(self, key: str, factory: Callable[[Context], _T]) -> _T:
        """The one helper object under ``key``, built by ``factory(self)`` once.

        Primitives keep their process-wide machinery here (the lock watchdog, the
        breaker hub, the stream readers), so it lives and dies with the Context.
        """
        found = self._extensions.get(key)
        if found is None:
            with self._lock:
                found = self._extensions.get(key)
                if found is None:
                    found = self._extensions[key] = factory(self)
        return cast(_T, found)

    def on_fork(self, hook: Callable[[], None]) -> None:
        """Run ``hook()`` in a forked child, after connections and listener are reset."""
        self._fork_hooks.append(hook)

    def on_close(self, hook: Callable[[], None]) -> None:
        """Run ``hook()`` first thing when the Context closes (threads before sockets)."""
        self._close_hooks.append(hook)

    def janitor(self, plan: Plan[Any]) -> None:
        """Run ``plan`` with blocking I/O on the Context's janitor thread, in order.

        For compensating work after a cancellation (release a lock by token): it
        completes even when the event loop that was cancelled is shutting down, and
        before the Context's connections close. Failures are logged. One named daemon
        thread, started on first use (again in a forked child).
        """
        with self._lock:
            if self.closed:
                plan.close()
                return
            self._janitor_queue().put(plan)

    def settle(self, timeout: float = 5.0) -> bool:
        """Wait until the janitor work queued so far is done; False if ``timeout``
        seconds (wall clock) pass first. For tests and orderly shutdowns."""
        done = threading.Event()
        with self._lock:
            if self._janitor is None or self._janitor_pid != os.getpid():
                return True
            self._janitor[0].put(done)
        return done.wait(timeout)

    def _janitor_queue(self) -> queue.SimpleQueue[Any]:
        """The janitor's queue, starting its thread; caller holds ``_lock``."""
        if self._janitor is None or self._janitor_pid != os.getpid():
            work: queue.SimpleQueue[Any] = queue.SimpleQueue()
            thread = threading.Thread(target=self._clean, args=(work,),
                                      name="flexisync-janitor", daemon=True)
            self._janitor = (work, thread)
            self._janitor_pid = os.getpid()
            thread.start()
        return self._janitor[0]

    def _clean(self, work: queue.SimpleQueue[Any]) -> None:
        from flexisync._core.plan import run  # noqa: PLC0415

        while True:
            item = work.get()
            if item is None:
                return
            if isinstance(item, threading.Event):
                item.set()
                continue
            try:
                run(self, item)
            except Exception:
                self.log.exception("coordinator.cleanup_failed")

    # --- lifetime -----------------------------------------------------------------------

    def acquire(self) -> None:
        """One more Coordinator uses this Context (caller holds the registry lock)."""
        self.refs += 1

    def release(self) -> None:
        """A Coordinator is done with this Context; the last one closes it."""
        with _registry_lock:
            self.refs -= 1
            if self.refs > 0 or self.closed:
                return
            self._unregister_locked()
        self._shutdown()

    def close(self) -> None:
        """Stop threads, close the listener and connections, whoever still uses them.
        Idempotent."""
        with _registry_lock:
            if self.closed:
                return
            self._unregister_locked()
        self._shutdown()

    def _unregister_locked(self) -> None:
        self.closed = True
        if self.identity is not None and _registry.get(self.identity) is self:
            del _registry[self.identity]

    def _shutdown(self) -> None:
        for hook in reversed(self._close_hooks):
            try:
                hook()
            except Exception:
                self.log.exception("coordinator.close_hook_failed")
        if self._listener_obj is not None:
            self._listener_obj.close()
        janitor, self._janitor = self._janitor, None
        if janitor is not None and self._janitor_pid == os.getpid():
            janitor[0].put(None)  # after the work already queued: it completes first
            janitor[1].join(timeout=self.backend.retry.deadline + 1.0)
        self.backend.closed = True
        self.backend.close()
        if self._abackend is not None:
            self._abackend.closed = True

    def after_fork(self) -> None:
        """Reset per-process state in a forked child (also found by a pid check)."""
        self.backend.pid = os.getpid()
        self._lock = threading.RLock()
        self._janitor = None
        self.fork_generation += 1
        if self._abackend is not None:
            self._abackend.after_fork()
        if self.closed:
            return
        if self._listener_obj is not None:
            self._listener_obj.after_fork()
        for hook in self._fork_hooks:
            try:
                hook()
            except Exception:
                self.log.exception("coordinator.fork_hook_failed")


def shared(identity: Any, build: Callable[[], Context]) -> Context:
    """The live Context for ``identity`` (built by ``build`` when there is none), with
    one more reference taken. ``identity=None`` never shares."""
    with _registry_lock:
        if identity is None:
            ctx = build()
            ctx.acquire()
            return ctx
        found = _registry.get(identity)
        if found is None or found.closed:
            found = _registry[identity] = build()
        found.acquire()
        return found


def _after_fork_in_child() -> None:
    global _registry_lock
    _registry_lock = threading.Lock()
    for ctx in list(_live):
        ctx.after_fork()


def _install_fork_hook() -> None:
    global _fork_hook_installed
    if not _fork_hook_installed and hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=_after_fork_in_child)
        _fork_hook_installed = True
