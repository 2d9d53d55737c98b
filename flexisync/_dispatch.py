"""Callback dispatch on a bounded thread pool: one :class:`DispatchPool` per Context.

The sync shell's callback subscriptions (:mod:`flexisync.events`) do not own a thread
each: every one of them is a :class:`Lane` of its Context's pool, and at most
``callback_threads`` named daemon threads (``flexisync-dispatch-<n>``, default
:data:`DEFAULT_CALLBACK_THREADS`) run the callbacks of all of them.

What the pool promises:

* **Order, one at a time.** A lane runs on at most one worker at a time, so a
  subscription's callback sees its events in order and is never called concurrently
  with itself.
* **Scheduled on demand.** A lane is queued when its owner calls :meth:`Lane.schedule`
  (a subscription does when its queue goes from empty to non-empty); scheduling a lane
  that is queued is a no-op, and scheduling one that is running makes it run once more
  afterwards, so no wake-up is lost and no lane is queued twice.
* **Fair turns.** A worker gives a lane one turn (its owner drains at most a batch:
  :data:`BATCH_EVENTS` events or :data:`BATCH_SECONDS`), then puts it back at the end of
  the line if it has more, so one busy subscription cannot starve the others.
* **Bounded blocking.** A slow callback holds one worker for as long as it runs: with
  ``N`` workers, ``N`` callbacks running at once make every other lane wait until one of
  them returns. A raising callback is its owner's business (logged and counted there).
* **Threads on demand, bounded.** The first worker starts with the first lane; another
  starts only when lanes are waiting and every worker is busy, up to the limit. They
  live until the Context closes (:meth:`DispatchPool.close` stops and joins them).
* **Fork.** A forked child starts with no workers and an empty line (the parent's threads
  do not exist there), found by the Context's fork hook, and also by a pid / fork
  generation check when a lane is made (a fork without Python's at-fork hooks, e.g.
  uWSGI, is noticed by the Context on its next Redis call and bumps its generation).
"""

from __future__ import annotations

import collections
import os
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from flexisync._log import get_logger
from flexisync.errors import ConfigError

if TYPE_CHECKING:
    from flexisync._core.context import Context

__all__ = ["BATCH_EVENTS", "BATCH_SECONDS", "CLOSE_TIMEOUT", "DEFAULT_CALLBACK_THREADS",
           "DispatchPool", "Lane", "pool_of", "validate_callback_threads"]

#: Worker threads of a Context's pool when ``connect()`` is not told otherwise.
DEFAULT_CALLBACK_THREADS: Final = 4
#: At most this many events per turn of one lane before the next lane's turn.
BATCH_EVENTS: Final = 64
#: At most about this long (seconds) per turn of one lane (checked between events).
BATCH_SECONDS: Final = 0.005
#: Seconds :meth:`Lane.close` and :meth:`DispatchPool.close` wait for running work.
CLOSE_TIMEOUT: Final = 5.0

#: A lane's work: run one turn; True if it may have more (run it again later).
Drain = Callable[[], bool]

_renew_lock = threading.Lock()  # held only while a forked child builds its new crew


def validate_callback_threads(value: object) -> int:
    """``value`` as a pool size.

    Raises:
        ConfigError: ``value`` is not an int >= 1 (a bool is not accepted).
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"callback_threads must be an int >= 1, got {value!r}")
    return value


def pool_of(ctx: Context) -> DispatchPool:
    """The Context's one dispatch pool (made on first use; it starts no thread)."""
    return ctx.extension("dispatch", DispatchPool)


class _Crew:
    """The pool's state in one process: rebuilt, never reused, after a fork."""

    __slots__ = ("finished", "gen", "idle", "lock", "pid", "ready", "stopping", "threads",
                 "wake")

    def __init__(self, gen: int, stopping: bool) -> None:
        self.lock = threading.Lock()
        self.wake = threading.Condition(self.lock)  # a lane was queued, or stop
        self.finished = threading.Condition(self.lock)  # a lane's turn ended
        self.ready: collections.deque[Lane] = collections.deque()
        self.threads: list[threading.Thread] = []
        self.idle = 0  # workers waiting on ``wake``
        self.stopping = stopping
        self.pid = os.getpid()
        self.gen = gen


class Lane:
    """One ordered source of work on a :class:`DispatchPool` (a callback subscription).

    Build it with :meth:`DispatchPool.lane`. Its ``drain`` function runs on a pool
    worker, never on two at once; it should do at most one batch of work and return
    True if more may remain (it is then queued again, behind the lanes waiting), False
    once it saw nothing left (a :meth:`schedule` that came meanwhile still counts).
    """

    __slots__ = ("_again", "_closed", "_crew", "_drain", "_pool", "_queued", "_runner",
                 "name")

    def __init__(self, pool: DispatchPool, crew: _Crew, drain: Drain, name: str) -> None:
        self._pool = pool
        self._crew = crew
        self._drain = drain
        self.name = name
        self._queued = False  # in the crew's ready line
        self._runner: threading.Thread | None = None  # the worker running it now
        self._again = False  # scheduled while running: run once more after
        self._closed = False

    def __repr__(self) -> str:
        return f"<Lane {self.name!r}{' closed' if self._closed else ''}>"

    def schedule(self) -> None:
        """Have a worker run ``drain`` soon (once more, if it is running now).

        Never blocks on user code; safe from any thread (the listener's, typically).
        A no-op once the lane or the pool is closed.
        """
        self._pool._schedule(self)

    @property
    def running(self) -> bool:
        """True while a worker runs this lane's ``drain``."""
        return self._runner is not None

    def close(self, timeout: float = CLOSE_TIMEOUT) -> bool:
        """Never run ``drain`` again; wait up to ``timeout`` seconds for a running turn.

        Called from within the lane's own ``drain`` (its callback closing its
        subscription) it does not wait: the turn ends when ``drain`` returns.

        Returns:
            True when no turn of this lane runs any more (or the caller is that turn),
            False when the wait timed out.
        """
        self._closed = True  # a worker that pops it from the line skips it
        crew = self._crew
        if crew.pid != os.getpid():  # a lane of the parent process: nothing runs here
            return True
        deadline = time.monotonic() + timeout
        with crew.lock:
            while self._runner is not None:
                if self._runner is threading.current_thread():
                    return True
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                crew.finished.wait(left)
        return True


class DispatchPool:
    """A Context's bounded pool of callback workers; see the module docstring.

    Attributes:
        limit: the most worker threads it runs at once.
    """

    def __init__(self, ctx: Context) -> None:
        self._ctx = ctx
        self._asked: int | None = None
        self._closed = False
        self._log = get_logger("dispatch", namespace=ctx.keys.namespace)
        self._crew = _Crew(ctx.fork_generation, stopping=False)
        ctx.on_fork(self._after_fork)
        ctx.on_close(self.close)

    def __repr__(self) -> str:
        return f"<DispatchPool limit={self.limit} threads={self.threads}>"

    @property
    def limit(self) -> int:
        """The most worker threads this pool runs (``callback_threads``)."""
        return DEFAULT_CALLBACK_THREADS if self._asked is None else self._asked

    @property
    def threads(self) -> int:
        """How many worker threads run now, in this process."""
        crew = self._crew
        if crew.pid != os.getpid():
            return 0
        with crew.lock:
            return len(crew.threads)

    def widen(self, callback_threads: int) -> None:
        """Ask for ``callback_threads`` workers. Coordinators sharing a Context share
        its pool: the pool runs as many workers as the largest number asked for (the
        first ask replaces the default).

        Raises:
            ConfigError: ``callback_threads`` is not an int >= 1.
        """
        wanted = validate_callback_threads(callback_threads)
        self._asked = wanted if self._asked is None else max(self._asked, wanted)

    def lane(self, drain: Drain, name: str) -> Lane:
        """A new lane running ``drain`` on this pool; starts the first worker if none
        runs yet (so that the first event never waits for a thread to start)."""
        crew = self._current()
        lane = Lane(self, crew, drain, name)
        with crew.lock:
            if not crew.threads and not crew.stopping:
                self._spawn(crew)
        return lane

    def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """Stop the workers: each ends after its current turn; wait up to ``timeout``
        seconds in all for them. Lanes still waiting are not run. Idempotent."""
        self._closed = True
        crew = self._crew
        if crew.pid != os.getpid():
            return  # the parent's workers: none of them runs in this process
        with crew.lock:
            crew.stopping = True
            for lane in crew.ready:
                lane._queued = False
            crew.ready.clear()
            threads = list(crew.threads)
            crew.wake.notify_all()
        deadline = time.monotonic() + timeout
        me = threading.current_thread()
        for thread in threads:
            if thread is not me:
                thread.join(max(0.0, deadline - time.monotonic()))
        stuck = sum(thread.is_alive() for thread in threads if thread is not me)
        if stuck:
            self._log.warning("dispatch.close_timed_out", threads=stuck, timeout=timeout)

    # --- internals -------------------------------------------------------------------

    def _current(self) -> _Crew:
        """This process's crew: a fresh one after a fork (pid or fork generation moved)."""
        crew = self._crew
        gen = self._ctx.fork_generation
        if crew.pid != os.getpid() or crew.gen != gen:
            with _renew_lock:
                crew = self._crew
                if crew.pid != os.getpid() or crew.gen != gen:
                    # Never touch the old crew's lock: a parent's thread may have held
                    # it at the fork.
                    crew = self._crew = _Crew(gen, stopping=self._closed)
        return crew

    def _after_fork(self) -> None:
        self._current()

    def _schedule(self, lane: Lane) -> None:
        crew = lane._crew
        if crew is not self._crew or lane._closed:
            return  # closed, or a lane of the parent process (its owner builds a new one)
        with crew.lock:
            if lane._closed or crew.stopping:
                return
            if lane._runner is not None:
                lane._again = True
                return
            if lane._queued:
                return
            lane._queued = True
            crew.ready.append(lane)
            if len(crew.ready) > crew.idle and len(crew.threads) < self.limit:
                self._spawn(crew)
            else:
                crew.wake.notify()

    def _spawn(self, crew: _Crew) -> None:
        """Start one more worker; caller holds ``crew.lock``."""
        thread = threading.Thread(target=self._work, args=(crew,),
                                  name=f"flexisync-dispatch-{len(crew.threads) + 1}",
                                  daemon=True)
        crew.threads.append(thread)
        thread.start()

    def _work(self, crew: _Crew) -> None:
        """A worker: take the lane at the head of the line, give it one turn, repeat."""
        me = threading.current_thread()
        try:
            while True:
                with crew.lock:
                    while not crew.ready and not crew.stopping:
                        crew.idle += 1
                        crew.wake.wait()
                        crew.idle -= 1
                    if crew.stopping:
                        return
                    lane = crew.ready.popleft()
                    lane._queued = False
                    if lane._closed:
                        continue
                    lane._runner = me
                    lane._again = False
                more = True
                try:
                    more = lane._drain()
                except Exception:
                    # Not a callback's error (its owner handles those). Run it again
                    # later rather than lose its wake-up; each turn consumes work.
                    self._log.exception("dispatch.drain_failed", lane=lane.name)
                finally:
                    with crew.lock:
                        lane._runner = None
                        if (more or lane._again) and not lane._closed and not crew.stopping:
                            lane._again = False
                            lane._queued = True
                            crew.ready.append(lane)  # behind the lanes already waiting
                        crew.finished.notify_all()
        finally:
            # Normally at close; also when a callback raised a BaseException (SystemExit
            # ...) that ended this thread: a replacement may start on demand.
            with crew.lock:
                if me in crew.threads:
                    crew.threads.remove(me)
                if crew.ready and not crew.stopping:
                    if crew.idle:
                        crew.wake.notify()
                    elif len(crew.threads) < self.limit:
                        self._spawn(crew)
