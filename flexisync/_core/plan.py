"""Plans: operations written once, run by a blocking shell or an asyncio shell.

A plan is a generator. Each ``yield`` hands one :class:`Step` (a Redis call, a script,
a wait on a :class:`Signal`, a pause, a subscription) to the shell that runs it, and
receives the step's result back (or has the step's exception thrown in). The plan's
``return`` value is the operation's result. :func:`run` drives a plan with blocking I/O
on the Context's sync backend; :func:`arun` drives the same plan with ``await`` on its
async backend. So an operation's validation, keys, encoding, retries of compare-and-set
loops and decoding exist once, and the shells only do I/O::

    def get(self, key: str) -> Plan[Any]:          # core
        raw = yield Call("state.get", lambda c: c.get(self._key(key)))
        return loads(raw)

    def get(self, key): return run(self._ctx, self._core.get(key))            # sync
    async def get(self, key): return await arun(self._ctx, self._core.get(key))  # async

``Call.fn`` receives the client: a ``redis.Redis`` in the sync shell, a
``redis.asyncio.Redis`` in the async one. Both have the same method names; the async
shell awaits what ``fn`` returns. ``fn`` must therefore only chain client calls (a
pipeline's ``execute()`` included) and do no other work on the reply.

Cancellation (async shell): when the task running a plan is cancelled at a step, the
plan is closed (its ``finally`` blocks run; it cannot yield again) and, if the step
carries an ``undo`` plan (e.g. "release by token" for a lock acquire whose command may
have reached Redis), that plan runs to completion on the Context's janitor thread, so
it finishes even when the event loop is shutting down.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from flexisync._connection import RetryPolicy
    from flexisync._core.context import Context
    from flexisync._listener import Handler

__all__ = ["Call", "Plan", "Script", "Signal", "Sleep", "Step", "Subscribe", "Wait",
           "arun", "done", "run"]

T = TypeVar("T")

#: A plan returning ``T``: yields steps, receives their results.
Plan = Generator["Step", Any, T]


class Step:
    """One piece of I/O a plan asks its shell for."""

    __slots__ = ()

    #: A plan that undoes this step's possible effect if the task is cancelled while
    #: the step runs (the command may have reached Redis). ``None``: nothing to undo.
    undo: Callable[[], Plan[Any]] | None = None

    def run(self, ctx: Context) -> Any:  # pragma: no cover - abstract
        """Do the step with blocking I/O; return its result."""
        raise NotImplementedError

    async def arun(self, ctx: Context) -> Any:  # pragma: no cover - abstract
        """Do the step with ``await``; return its result."""
        raise NotImplementedError


@dataclass(slots=True, eq=False)
class Call(Step):
    """``fn(client)`` through the backend's retry policy and deadline (``Backend.call``)."""

    operation: str
    fn: Callable[[Any], Any]
    idempotent: bool = True
    deadline: float | None = None
    retry: RetryPolicy | None = None
    undo: Callable[[], Plan[Any]] | None = None

    def run(self, ctx: Context) -> Any:
        return ctx.backend.call(self.operation, self.fn, idempotent=self.idempotent,
                                deadline=self.deadline, retry=self.retry)

    async def arun(self, ctx: Context) -> Any:
        return await ctx.abackend.call(self.operation, self.fn, idempotent=self.idempotent,
                                       deadline=self.deadline, retry=self.retry)


@dataclass(slots=True, eq=False)
class Script(Step):
    """The Lua script ``flexisync/_scripts/<name>.lua`` with ``keys`` and ``args``."""

    operation: str
    name: str
    keys: Sequence[str]
    args: Sequence[Any]
    idempotent: bool = True
    deadline: float | None = None
    retry: RetryPolicy | None = None
    undo: Callable[[], Plan[Any]] | None = None

    def run(self, ctx: Context) -> Any:
        return ctx.backend.run_script(self.operation, self.name, self.keys, self.args,
                                      idempotent=self.idempotent, deadline=self.deadline,
                                      retry=self.retry)

    async def arun(self, ctx: Context) -> Any:
        return await ctx.abackend.run_script(
            self.operation, self.name, self.keys, self.args, idempotent=self.idempotent,
            deadline=self.deadline, retry=self.retry)


@dataclass(slots=True, eq=False)
class Wait(Step):
    """Wait until ``signal`` is set or ``timeout`` seconds pass; result: is it set."""

    signal: Signal
    timeout: float | None

    def run(self, ctx: Context) -> bool:  # noqa: ARG002
        return self.signal.wait(self.timeout)

    async def arun(self, ctx: Context) -> bool:  # noqa: ARG002
        return await self.signal.wait_async(self.timeout)


@dataclass(slots=True, eq=False)
class Sleep(Step):
    """Pause for ``seconds`` (a retry's backoff inside a plan)."""

    seconds: float

    def run(self, ctx: Context) -> None:  # noqa: ARG002
        if self.seconds > 0:
            time.sleep(self.seconds)

    async def arun(self, ctx: Context) -> None:  # noqa: ARG002
        await asyncio.sleep(max(self.seconds, 0.0))


@dataclass(slots=True, eq=False)
class Subscribe(Step):
    """Register ``handler`` on the shared listener; result: the ``Registration``.

    Completes once Redis confirmed the subscription (``kind`` is ``"channel"`` or
    ``"pattern"``); ``timeout`` as in ``Listener.subscribe``. Cancelled while waiting
    for the confirmation, the registration is removed again.
    """

    kind: str
    name: str
    handler: Handler
    timeout: float | None = None

    def run(self, ctx: Context) -> Any:
        listener = ctx.listener
        if self.kind == "pattern":
            return listener.psubscribe(self.name, self.handler, timeout=self.timeout)
        return listener.subscribe(self.name, self.handler, timeout=self.timeout)

    async def arun(self, ctx: Context) -> Any:
        return await ctx.listener.subscribe_async(
            (self.kind, self.name), self.handler, timeout=self.timeout)


def done(value: T) -> Plan[T]:
    """A plan that does no I/O and returns ``value``."""
    yield from ()
    return value


def run(ctx: Context, plan: Plan[T]) -> T:
    """Run ``plan`` to completion with blocking I/O; its return value, or its exception."""
    try:
        step = plan.send(None)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]
    backend = ctx.backend
    while True:
        try:
            if type(step) is Call:  # the common step, without Call.run's extra frame
                result = backend.call(step.operation, step.fn, idempotent=step.idempotent,
                                      deadline=step.deadline, retry=step.retry)
            else:
                result = step.run(ctx)
        except Exception as exc:  # handed to the plan, which re-raises
            try:
                step = plan.throw(exc)
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]
            continue
        except BaseException:  # KeyboardInterrupt, SystemExit: undo, as for a cancel
            plan.close()
            if step.undo is not None:
                ctx.janitor(step.undo())
            raise
        try:
            step = plan.send(result)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]


async def arun(ctx: Context, plan: Plan[T]) -> T:
    """Run ``plan`` to completion with ``await``; cancellation-safe (module docstring)."""
    send: Any = None
    error: BaseException | None = None
    while True:
        try:
            step = plan.send(send) if error is None else plan.throw(error)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]
        send, error = None, None
        task = asyncio.current_task()
        cancelling = getattr(task, "cancelling", None)  # Python 3.11+
        before = cancelling() if cancelling is not None else 0
        try:
            send = await step.arun(ctx)
            if cancelling is not None and cancelling() > before:
                # redis.asyncio can swallow a cancellation that lands while a command
                # is being sent and return the reply: the task is still cancelled.
                raise asyncio.CancelledError
        except asyncio.CancelledError:
            plan.close()
            if step.undo is not None:
                ctx.janitor(step.undo())
            raise
        except Exception as exc:  # handed to the plan, which re-raises
            error = exc


class Signal:
    """A flag that threads can wait on and coroutines of any event loop can await.

    Level-triggered: :meth:`set` wakes every current waiter and stays set until
    :meth:`clear`. Safe to set from any thread (the listener's, for instance).
    """

    __slots__ = ("_cond", "_flag", "_futures")

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._flag = False
        self._futures: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []

    def is_set(self) -> bool:
        """Whether the flag is set."""
        return self._flag

    def set(self) -> None:
        """Set the flag and wake every waiter (threads and coroutines)."""
        with self._cond:
            self._flag = True
            self._cond.notify_all()
            futures, self._futures = self._futures, []
        for loop, future in futures:
            # A closed loop raises RuntimeError: nobody waits there any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_resolve, future)

    def clear(self) -> None:
        """Clear the flag."""
        with self._cond:
            self._flag = False

    def wait(self, timeout: float | None) -> bool:
        """Block until set or ``timeout`` seconds (``None``: forever); whether it is set."""
        with self._cond:
            if self._flag:
                return True
            if timeout is None:
                while not self.is_set():
                    self._cond.wait()
                return True
            end = time.monotonic() + timeout
            while not self.is_set():
                left = end - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            return self._flag

    async def wait_async(self, timeout: float | None) -> bool:
        """Await until set or ``timeout`` seconds (``None``: forever); whether it is set."""
        if self._flag:
            return True
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        entry = (loop, future)
        with self._cond:
            if self.is_set():
                return True
            self._futures.append(entry)
        handle = None if timeout is None else loop.call_later(max(timeout, 0.0), _resolve,
                                                                future)
        try:
            await future
        finally:
            if handle is not None:
                handle.cancel()
            with self._cond:
                if entry in self._futures:
                    self._futures.remove(entry)
        return self._flag


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
