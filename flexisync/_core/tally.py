"""Per-Context counters of the primitives that have no long-lived object of their own.

Locks, semaphores, rate limiters, topics and streams are cheap objects a user may build
per request, so their counters cannot live on the objects: each Context holds one
:class:`Tally` (``ctx.extension("metrics", Tally)``) with one small record per name,
which the cores bump after the I/O they already do (never on a breaker's closed path).
:mod:`flexisync.metrics` reads it; nothing here does I/O or starts a thread.

Counters are plain ints bumped under the record's histogram lock where a histogram
is involved (a round trip already costs ~100 µs: the lock costs ~0.1 µs). A forked
child starts from zero (its parent's counts are the parent's). The number of names
per kind is bounded (:data:`MAX_NAMES`): past it, new names are counted under
:data:`OVERFLOW`, so a process that names locks per request costs bounded memory.
"""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from flexisync._core.context import Context

__all__ = ["BUCKETS", "MAX_NAMES", "ON_REJECT", "OVERFLOW", "AdmissionTally", "BreakerTally",
           "LockTally", "StreamTally", "Tally", "TopicTally", "WaitHistogram", "tally_of"]

#: Upper bounds (seconds) of the wait histograms' buckets; a last ``+inf`` is implied.
BUCKETS: tuple[float, ...] = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                              1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
#: Distinct names counted per kind and Context; past it, new names count as OVERFLOW.
MAX_NAMES = 10_000
#: The label value under which names beyond :data:`MAX_NAMES` are counted.
OVERFLOW = "(other)"

_R = TypeVar("_R")

#: Called as ``hook(namespace, breaker, retry_after)`` on the thread (or task) of each
#: call a breaker rejects, before ``CircuitOpenError`` is raised; never on other
#: paths. Public as ``flexisync.metrics.on_reject`` (exporters add span events).
ON_REJECT: list[Callable[[str, str, float], None]] = []


class WaitHistogram:
    """A fixed-bucket histogram of waits (seconds); per-bucket (not cumulative) counts."""

    __slots__ = ("counts", "lock", "sum")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts = [0] * (len(BUCKETS) + 1)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        """Count one wait of ``seconds`` (negative or NaN counts as 0)."""
        value = seconds if seconds > 0 else 0.0  # NaN > 0 is False
        index = bisect.bisect_left(BUCKETS, value)
        with self.lock:
            self.counts[index] += 1
            self.sum += value

    def snapshot(self) -> tuple[tuple[tuple[float, int], ...], float, int]:
        """``(((upper bound, cumulative count), ..., (inf, total)), sum, total)``."""
        with self.lock:
            counts = list(self.counts)
            total_sum = self.sum
        cumulative = []
        running = 0
        for bound, count in zip((*BUCKETS, math.inf), counts, strict=True):
            running += count
            cumulative.append((bound, running))
        return tuple(cumulative), total_sum, running


class LockTally:
    """One lock name: acquisitions, waits, timeouts, lost leases."""

    __slots__ = ("acquisitions", "lost", "timeouts", "wait")

    def __init__(self) -> None:
        self.acquisitions = 0
        self.timeouts = 0
        self.lost = 0
        self.wait = WaitHistogram()

    def acquired(self, waited: float) -> None:
        """Count one acquisition after ``waited`` seconds."""
        self.wait.observe(waited)
        with self.wait.lock:
            self.acquisitions += 1


class AdmissionTally:
    """One semaphore or rate limiter name: admissions, waits, refusals."""

    __slots__ = ("admissions", "refusals", "wait")

    def __init__(self) -> None:
        self.admissions = 0
        self.refusals = 0
        self.wait = WaitHistogram()

    def admitted(self, waited: float) -> None:
        """Count one admission after ``waited`` seconds."""
        self.wait.observe(waited)
        with self.wait.lock:
            self.admissions += 1

    def refused(self) -> None:
        """Count one acquire that ended without an admission (timeout, non-blocking)."""
        with self.wait.lock:
            self.refusals += 1


class TopicTally:
    """One topic (or pattern): published here, and subscriptions' counts once closed."""

    __slots__ = ("delivered", "dropped", "errors", "gaps", "invalid", "published",
                 "received")

    def __init__(self) -> None:
        self.published = 0
        self.received = 0
        self.delivered = 0
        self.dropped = 0
        self.errors = 0
        self.invalid = 0
        self.gaps = 0


class StreamTally:
    """One stream name: appends made by this process."""

    __slots__ = ("appends",)

    def __init__(self) -> None:
        self.appends = 0


class BreakerTally:
    """One breaker name: the counts of its cores that were garbage-collected (a core
    folds its counters in here when it goes, so counters never go backwards)."""

    __slots__ = ("failure", "ignored", "open_seconds", "probe", "probe_failure",
                 "probe_ignored", "probe_success", "rejected", "success", "transitions")

    def __init__(self) -> None:
        self.success = 0
        self.failure = 0
        self.ignored = 0
        self.rejected = 0
        self.probe = 0
        self.probe_success = 0
        self.probe_failure = 0
        self.probe_ignored = 0
        self.open_seconds = 0.0
        self.transitions: dict[str, int] = {}


class Tally:
    """Every per-name record of one Context; see the module docstring."""

    def __init__(self, ctx: Context) -> None:
        self._reset()
        ctx.on_fork(self._reset)

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self.locks: dict[str, LockTally] = {}
        self.semaphores: dict[str, AdmissionTally] = {}
        self.rate_limiters: dict[str, AdmissionTally] = {}
        self.topics: dict[str, TopicTally] = {}
        self.streams: dict[str, StreamTally] = {}
        self.breakers: dict[str, BreakerTally] = {}

    def _get(self, table: dict[str, _R], name: str, make: type[_R]) -> _R:
        found = table.get(name)
        if found is None:
            with self._lock:
                found = table.get(name)
                if found is None:
                    if len(table) >= MAX_NAMES:
                        name = OVERFLOW
                        found = table.get(name)
                    if found is None:
                        found = table[name] = make()
        return found

    def lock(self, name: str) -> LockTally:
        """The record of lock ``name`` (made on first use)."""
        return self._get(self.locks, name, LockTally)

    def semaphore(self, name: str) -> AdmissionTally:
        """The record of semaphore ``name``."""
        return self._get(self.semaphores, name, AdmissionTally)

    def rate_limiter(self, name: str) -> AdmissionTally:
        """The record of rate limiter ``name``."""
        return self._get(self.rate_limiters, name, AdmissionTally)

    def topic(self, name: str) -> TopicTally:
        """The record of topic (or pattern) ``name``."""
        return self._get(self.topics, name, TopicTally)

    def stream(self, name: str) -> StreamTally:
        """The record of stream ``name``."""
        return self._get(self.streams, name, StreamTally)

    def breaker(self, name: str) -> BreakerTally:
        """The record of breaker ``name`` (counts of cores that are gone)."""
        return self._get(self.breakers, name, BreakerTally)

    def table_snapshot(self, table: dict[str, _R]) -> list[tuple[str, _R]]:
        """``table``'s items, copied under the lock (safe to iterate anywhere)."""
        with self._lock:
            return list(table.items())


def tally_of(ctx: Context) -> Tally:
    """The Context's one :class:`Tally` (built on first use; no I/O)."""
    return ctx.extension("metrics", Tally)
