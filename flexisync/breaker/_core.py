"""The breaker's decisions, written once for both shells: admission, outcomes, commands.

:class:`BreakerCore` is the one object per Context, name and policy (held by the hub)
that :class:`~flexisync.CircuitBreaker` and :class:`~flexisync.aio.AsyncCircuitBreaker`
share. Decisions that need no I/O are plain methods (:meth:`BreakerCore.admit_quick`,
:meth:`BreakerCore.classify`); those that talk to Redis are plans, run by the blocking
shell with ``run`` and by the asyncio shell with ``await arun``.
"""

from __future__ import annotations

import contextvars
import math
import time
import uuid
import weakref
from collections.abc import Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any, cast

from flexisync._core.plan import Plan, Wait
from flexisync._core.tally import ON_REJECT
from flexisync._durations import to_ms
from flexisync.breaker._hub import FORK_MARK, detect_fork, hub_of
from flexisync.breaker._mirror import Mirror, decode_info, integer
from flexisync.breaker._policy import (
    BreakerInfo,
    BreakerPolicy,
    BreakerStats,
    State,
    choose_policy,
    foreign_seconds,
    optional_duration,
)
from flexisync.errors import CircuitOpenError, ConfigError, FlexiSyncError

if TYPE_CHECKING:
    from flexisync._core.context import Context

__all__ = ["BYPASS", "PLAIN", "BreakerCore", "Ticket", "core_of", "pop_ticket", "push_ticket"]

_MARK = FORK_MARK


class Ticket:
    """What admission decided for one call; handed back when it finishes."""

    __slots__ = ("kind", "start", "token")

    PLAIN, PROBE, LOCAL, LOCAL_PROBE, BYPASS = range(5)

    def __init__(self, kind: int, token: str = "", start: float = 0.0) -> None:
        self.kind = kind
        self.token = token
        self.start = start


PLAIN = Ticket(Ticket.PLAIN)
BYPASS = Ticket(Ticket.BYPASS)
_open_tickets: contextvars.ContextVar[tuple[tuple[int, Ticket], ...]] = \
    contextvars.ContextVar("flexisync_breaker_tickets", default=())


def push_ticket(owner: object, ticket: Ticket) -> None:
    """Remember ``ticket`` for ``owner``'s ``__exit__`` in this context (task/thread)."""
    _open_tickets.set((*_open_tickets.get(), (id(owner), ticket)))


def pop_ticket(owner: object) -> Ticket:
    """The ticket ``push_ticket`` stored last for ``owner`` here (PLAIN if none)."""
    stack = _open_tickets.get()
    for i in range(len(stack) - 1, -1, -1):
        if stack[i][0] == id(owner):
            _open_tickets.set(stack[:i] + stack[i + 1:])
            return stack[i][1]
    return PLAIN


class BreakerCore(Mirror):
    """A breaker's mirror plus its decisions. Internal: use a shell."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: The shells built over this core (weakly: the shells hold the core).
        self.shells: dict[str, weakref.ref[Any]] = {}

    def shell(self, kind: str, build: Callable[[BreakerCore], Any]) -> Any:
        """The live shell of ``kind`` over this core, built by ``build`` if none."""
        ref = self.shells.get(kind)
        found = ref() if ref is not None else None
        if found is None:
            found = build(self)
            self.shells[kind] = weakref.ref(found)
        return found

    # --- admission ------------------------------------------------------------------

    def admit_quick(self) -> Ticket | None:
        """Decide from the mirror alone; None when a round trip is needed.

        Raises:
            CircuitOpenError: rejected.
        """
        if not _MARK[0]:
            detect_fork()  # forked without at-fork hooks: the mirror is the parent's
        if self._down:
            return self._admit_down()
        if not self._ready:
            return None
        state = self._state
        if state == "closed":
            return Ticket(Ticket.PLAIN, "", time.perf_counter()) if self._slow else PLAIN
        if state == "disabled":
            return BYPASS
        if state == "forced_open":
            self._reject(math.inf)
        now = time.monotonic()
        if state == "open" and now < self._open_until:
            self._reject(self._open_until - now)
        if state == "half_open" and now < self._ask_after:
            self._reject(self._ask_after - now)
        return None

    def admit_plan(self) -> Plan[Ticket]:
        """Admission needing I/O (after :meth:`admit_quick` returned None).

        Raises:
            CircuitOpenError: rejected.
        """
        ticket = self.admit_quick()
        if ticket is None:
            yield from self.prepare_plan()
            ticket = self.admit_quick()
            if ticket is None:
                ticket = yield from self._admit_remote()
        return ticket

    def _reject(self, retry_after: float) -> None:
        self._rejected += 1
        if ON_REJECT:
            self._on_reject(retry_after)
        raise CircuitOpenError(self.name, retry_after)

    def _on_reject(self, retry_after: float) -> None:
        """Run the ``flexisync.metrics.on_reject`` hooks (a raising one is logged)."""
        for hook in list(ON_REJECT):
            try:
                hook(self.ctx.namespace, self.name, retry_after)
            except Exception:
                self._log.exception("breaker.hook_failed")

    def _admit_down(self) -> Ticket:
        mode = self.policy.on_backend_error
        if mode == "allow":
            return BYPASS
        if mode == "reject":
            at = self._hub.recheck_at if self._hub.down else self._recheck_at
            self._reject(max(0.0, at - time.monotonic()))
        try:
            probe = self._local.admit()
        except CircuitOpenError as exc:
            self._rejected += 1
            if ON_REJECT:
                self._on_reject(exc.retry_after)
            raise
        kind = Ticket.LOCAL_PROBE if probe else Ticket.LOCAL
        return Ticket(kind, "", time.perf_counter() if self._slow else 0.0)

    def _admit_remote(self) -> Plan[Ticket]:
        """Ask Redis for a probe slot (the open period is over, or half-open).

        Cancelled while the probe script runs (asyncio), the slot it may have taken is
        given back by the janitor (a neutral settle of the token).
        """
        token = uuid.uuid4().hex
        try:
            reply = yield from self._script(
                "probe", [self._channel, token, to_ms(self.policy.probe_lease),
                          self.policy.half_open_max_calls],
                undo=lambda: self._settle_probe(token, "neutral", None))
            snap = self._apply_reply(reply, "probe")
            verdict, retry_ms = integer(reply[6]), integer(reply[7])
        except (FlexiSyncError, IndexError, ValueError) as exc:
            self._go_down(exc)
            return self._admit_down()
        now = time.monotonic()
        start = time.perf_counter() if self._slow else 0.0
        if verdict == 1:
            return Ticket(Ticket.PROBE, token, start)
        if verdict == 2:
            return Ticket(Ticket.PLAIN, "", start) if snap.state != "disabled" else BYPASS
        retry = math.inf if retry_ms < 0 else retry_ms / 1000.0
        if self._state == "half_open":
            self._ask_after = now + retry
        elif self._state == "open":  # our deadline ran out before the server's
            self._open_until = max(self._open_until, now + retry)
        self._reject(retry)
        raise AssertionError("unreachable")  # pragma: no cover

    def release_plan(self, ticket: Ticket) -> Plan[None]:
        """Give back what an admission took for a call that will never finish."""
        if ticket.kind == Ticket.PROBE:
            yield from self._settle_probe(ticket.token, "neutral", None)
        elif ticket.kind == Ticket.LOCAL_PROBE:
            self._local.record(True, "neutral", None)

    # --- outcomes -------------------------------------------------------------------

    def classify(self, ticket: Ticket, exc: BaseException | None,
                 ) -> tuple[str, float | None]:
        """``("ok" | "fail" | "neutral", retry_after)`` for a call that ended with
        ``exc`` (None: returned). Cancellation and other non-``Exception``s are
        neutral. Order: ``ignore``, then ``failure_on`` (outside: success), then the
        policy's ``outcome_of`` (may turn a failure into "ignore" or "success")."""
        policy = self.policy
        if exc is None:
            outcome = "ok"
        elif isinstance(exc, policy.ignore):
            return "neutral", None
        elif isinstance(exc, policy.failure_on):
            outcome = self._refined(exc)
            if outcome == "neutral":
                return "neutral", None
        elif not isinstance(exc, Exception):
            return "neutral", None
        else:
            outcome = "ok"
        if outcome == "ok":
            if self._slow is not None and ticket.start \
                    and time.perf_counter() - ticket.start > self._slow:
                return "fail", None
            return "ok", None
        retry_after = None
        if policy.retry_after_of is not None and exc is not None:
            try:
                retry_after = foreign_seconds(policy.retry_after_of(exc))
            except Exception:
                self._log.exception("breaker.retry_after_of_failed")
        return "fail", retry_after

    def _refined(self, exc: BaseException) -> str:
        """The policy's ``outcome_of`` verdict on a failure: "fail", "ok" or "neutral"
        (a hook that raises is logged and leaves it a failure)."""
        hook = self.policy.outcome_of
        if hook is None:
            return "fail"
        try:
            verdict = hook(exc)
        except Exception:
            self._log.exception("breaker.outcome_of_failed")
            return "fail"
        return {"ignore": "neutral", "success": "ok"}.get(str(verdict), "fail")

    def needs_io(self, ticket: Ticket, outcome: str) -> bool:
        """Whether settling ``outcome`` for ``ticket`` talks to Redis."""
        return ticket.kind == Ticket.PROBE or (ticket.kind == Ticket.PLAIN
                                               and outcome == "fail")

    def settle_plan(self, ticket: Ticket, outcome: str, retry_after: float | None,
                    ) -> Plan[None]:
        """Count one call's outcome. Never raises a FlexiSyncError (degrades instead)."""
        kind = ticket.kind
        if kind == Ticket.BYPASS:
            return
        self._count(kind, outcome)
        if kind in (Ticket.LOCAL, Ticket.LOCAL_PROBE):
            self._local.record(kind == Ticket.LOCAL_PROBE, outcome, retry_after)
        elif kind == Ticket.PROBE:
            yield from self._settle_probe(ticket.token, outcome, retry_after)
        elif outcome == "ok":
            self._ok += 1
        elif outcome == "fail":
            yield from self._record_failure(retry_after)

    def _count(self, kind: int, outcome: str) -> None:
        """Bump the counters of one finished call (successes of plain tickets are
        counted by the caller, in ``_ok``: the closed path's one counter)."""
        if outcome == "fail":
            self._local_failures += 1
        if kind in (Ticket.PROBE, Ticket.LOCAL_PROBE):
            if outcome == "ok":
                self._probe_ok += 1
            elif outcome == "fail":
                self._probe_failed += 1
            else:
                self._probe_ignored += 1
        elif outcome == "fail":
            self._failed += 1
        elif outcome != "ok":
            self._ignored += 1
        elif kind == Ticket.LOCAL:
            self._ok_local += 1

    def _record_failure(self, retry_after: float | None) -> Plan[None]:
        """Count one failure (with this process's pending successes): one round trip.

        No lock is held across the round trip, so concurrent failing calls never wait
        for each other (a hung Redis costs each of them one bounded round trip at most,
        and once one has found it unreachable the others skip Redis altogether).
        """
        retry_ms = "" if retry_after is None else str(to_ms(retry_after))
        successes = yield from self._successes_before_failure()
        try:
            reply = yield from self._script("record",
                                            self._record_args(successes, 1, retry_ms))
            self._apply_reply(reply, "record")
        except FlexiSyncError as exc:
            self._go_down(exc)
            self._local.record(False, "fail", retry_after)
        finally:
            with self._flush_lock:
                self._reporting -= 1

    def _settle_probe(self, token: str, outcome: str, retry_after: float | None,
                      ) -> Plan[None]:
        pol = self.policy
        retry_ms = "" if retry_after is None else str(to_ms(retry_after))
        # Cancelled while in flight (asyncio): the janitor frees the slot (neutral
        # settles of one token are harmless twice; the outcome itself may be lost).
        undo = None if outcome == "neutral" else (
            lambda: self._settle_probe(token, "neutral", None))
        try:
            reply = yield from self._script("settle", [
                self._channel, token, outcome, pol.success_threshold,
                to_ms(pol.recovery_timeout), to_ms(pol.max_recovery_timeout), retry_ms],
                undo=undo)
            self._apply_reply(reply, "settle")
        except FlexiSyncError as exc:
            self._go_down(exc)
            self._local.record(False, outcome, retry_after)

    def _successes_before_failure(self) -> Plan[int]:
        """Take the unreported successes for a failure report, after any background flush
        in flight has landed, so that successes made before the failure never reach
        Redis after it (they would reset the count the failure just raised). Waiting
        for a flush is never longer than the failure's own round trip would be: the
        flush started earlier, under the same bound, and if it finds Redis unreachable
        the failure skips Redis."""
        bound = time.monotonic() + self.ctx.backend.retry.deadline + 1.0
        while True:
            if not self._flush_idle.is_set():
                yield Wait(self._flush_idle, max(0.0, bound - time.monotonic()))
            with self._flush_lock:
                if self._flush_idle.is_set() or time.monotonic() >= bound:
                    self._reporting += 1  # until _record_failure's report is done
                    return self._take_successes()

    # --- manual control ---------------------------------------------------------------

    def trip_plan(self, retry_after: float | timedelta | None) -> Plan[None]:
        """See ``CircuitBreaker.trip``; validates before any I/O.

        Raises:
            ConfigError: bad ``retry_after``.
        """
        period = optional_duration(retry_after, "retry_after")
        return self._trip(period)

    def _trip(self, period: float | None) -> Plan[None]:
        args = [self._channel, "trip", "" if period is None else to_ms(period),
                to_ms(self.policy.recovery_timeout)]
        try:
            reply = yield from self._script("command", args)
            self._apply_reply(reply, "command")
        except FlexiSyncError as exc:
            self._go_down(exc)
            self._local.record(False, "fail", period or self.policy.recovery_timeout)

    def command_plan(self, op: str) -> Plan[None]:
        """``reset``, ``force_open`` or ``disable``, in every process.

        Raises:
            BackendUnavailable: Redis is unreachable.
        """
        args = [self._channel, op, "", to_ms(self.policy.recovery_timeout)]
        reply = yield from self._script("command", args, force=op == "reset",
                                        fail_fast=False)
        self._apply_reply(reply, "command")
        if self._down:
            self._recheck_at = 0.0  # Redis answered: rejoin the shared state at once
        if op == "reset":
            self._local.seed("closed", 0.0)

    def info_plan(self) -> Plan[BreakerInfo]:
        """The shared state as stored in Redis (one round trip)."""
        reply = yield from self.read_plan(fail_fast=False)
        return decode_info(self.name, reply)

    def add_callback(self, callback: Callable[[str, str, str], None]) -> None:
        """Register an ``on_state_change`` callback (keeps the core alive).

        Raises:
            ConfigError: not callable.
        """
        if not callable(callback):
            raise ConfigError("callback must be callable")
        self._callbacks.append(callback)
        self._hub.pin(self)

    # --- reading ----------------------------------------------------------------------

    def current_state(self) -> State:
        """The state this process acts on (the local fallback's while Redis is down)."""
        if self._down and self.policy.on_backend_error == "local":
            return cast("State", self._local.state)
        return self._state

    def stats(self) -> BreakerStats:
        """This process's view, without any I/O."""
        if not _MARK[0]:
            detect_fork()
        if self._down and self.policy.on_backend_error == "local":
            state: State = cast("State", self._local.state)
            retry_after = self._local.remaining()
        else:
            state = self._state
            retry_after = (math.inf if state == "forced_open" else
                           max(0.0, self._open_until - time.monotonic())
                           if state == "open" else 0.0)
        return BreakerStats(name=self.name, state=state, version=self._version,
                            failures=self._shared_failures, retry_after=retry_after,
                            successes=self._ok, local_failures=self._local_failures,
                            rejected=self._rejected, backend_available=not self._down)



def core_of(ctx: Context, name: str, policy: BreakerPolicy | None,
            options: dict[str, Any]) -> BreakerCore:
    """The one :class:`BreakerCore` of ``ctx`` for ``name`` and the chosen policy.

    Raises:
        ConfigError: bad name, unknown option or invalid value (before any I/O).
    """
    chosen = choose_policy(name, policy, options)
    return hub_of(ctx).instance((name, chosen), lambda: BreakerCore(ctx, name, chosen))
