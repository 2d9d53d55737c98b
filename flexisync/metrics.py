"""In-process metrics of every flexisync primitive, pull-based, plus the fleet's call
outcomes per breaker.

:func:`collect` reads the counters the primitives already keep (plain ints on the
breaker cores, per-name records of the Context for locks, semaphores, rate limiters,
topics and streams, the subscriptions' own counters) for every live Context of this
process, sync and asyncio shells alike, and returns them as :class:`Sample` objects
named and labelled as :data:`CATALOGUE` says (see ``docs/observability.md``).
Nothing is measured on a breaker's closed path beyond the counter it already bumped;
collecting does no I/O, starts no thread and never creates a Context's machinery.

Counters are per process and start at zero in a forked child. A transition is counted
once, by the process whose Lua script made it (mirrors count nothing), so summing
``flexisync_breaker_transitions_total`` over a fleet gives the real number.

The fleet's call outcomes (every process's successes, failures, rejections...) are
added to Redis about once a second by the Context's breaker thread (nothing when there
were no calls) and read with :func:`fleet_outcomes`: a HASH ``ns:stats:{breaker:NAME}``
with fields ``"<bucket>:<outcome>"`` (``bucket`` = unix seconds // 10 * 10), expiring
15 minutes after its last write.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from flexisync._core import context as _context
from flexisync._core.plan import Call, Plan, arun, run
from flexisync._core.tally import ON_REJECT
from flexisync._keys import validate_name
from flexisync.breaker._hub import OUTCOMES, STATS_BUCKET, STATS_TTL, stats_key
from flexisync.errors import ConfigError

if TYPE_CHECKING:
    from flexisync._core.context import Context
    from flexisync._core.tally import Tally, WaitHistogram

__all__ = ["CATALOGUE", "Histogram", "Sample", "afleet_outcomes", "collect",
           "fleet_outcomes", "on_reject"]

Kind = Literal["counter", "gauge", "histogram"]
_STATES = ("closed", "open", "half_open", "forced_open", "disabled")

#: Hooks called as ``hook(namespace, breaker, retry_after)`` on the thread or task of
#: every call a breaker rejects, just before ``CircuitOpenError`` is raised (and on no
#: other path). Append to add one; a raising hook is logged (``breaker.hook_failed``).
on_reject = ON_REJECT


@dataclass(frozen=True)
class Histogram:
    """A cumulative histogram, Prometheus-style.

    Attributes:
        buckets: ``(upper bound in seconds, cumulative count)`` pairs, ascending; the
            last is ``(math.inf, count)``.
        sum: the sum of every observed value, seconds.
        count: how many values were observed.
    """

    buckets: tuple[tuple[float, int], ...]
    sum: float
    count: int


@dataclass(frozen=True)
class Sample:
    """One time series' current value.

    Attributes:
        name: the metric's name, e.g. ``"flexisync_breaker_calls_total"``.
        kind: ``"counter"``, ``"gauge"`` or ``"histogram"`` (as in :data:`CATALOGUE`).
        labels: label name -> value, e.g. ``{"namespace": "app", "breaker": "openai",
            "outcome": "success"}``.
        value: a number (counters, gauges) or a :class:`Histogram`.
    """

    name: str
    kind: Kind
    labels: Mapping[str, str]
    value: float | Histogram


_NB = ("namespace", "breaker")
_NL = ("namespace", "lock")
_NT = ("namespace", "topic")
_NS = ("namespace", "stream")
_NSEM = ("namespace", "semaphore")
_NRL = ("namespace", "limiter")

#: Every metric :func:`collect` may return: name -> (kind, help text, label names).
CATALOGUE: Mapping[str, tuple[str, str, tuple[str, ...]]] = {
    "flexisync_breaker_state": (
        "gauge", "1 for the state this process's mirror of the breaker is in, 0 for the "
        "others (closed, open, half_open, forced_open, disabled)", (*_NB, "state")),
    "flexisync_breaker_transitions_total": (
        "counter", "State transitions made by this process's scripts (each transition is "
        "counted once fleet-wide, by the process that made it)", (*_NB, "to")),
    "flexisync_breaker_calls_total": (
        "counter", "Protected calls by outcome: success, failure, rejected (did not run), "
        "ignored (counted as nothing), probe (a half-open trial call, whatever its "
        "result)", (*_NB, "outcome")),
    "flexisync_breaker_probes_total": (
        "counter", "Half-open trial calls by result (success, failure, ignored)",
        (*_NB, "result")),
    "flexisync_breaker_open_seconds_total": (
        "counter", "Seconds the breaker spent away from closed (open, half_open, "
        "forced_open) in the open periods this process's scripts ended, measured from "
        "when this process's mirror saw the period begin", _NB),
    "flexisync_lock_acquisitions_total": (
        "counter", "Successful lock acquisitions by this process", _NL),
    "flexisync_lock_wait_seconds": (
        "histogram", "Seconds from acquire() to holding the lock (round trips included), "
        "for successful acquisitions", _NL),
    "flexisync_lock_timeouts_total": (
        "counter", "Acquires that ended without the lock (timeout, or non-blocking and "
        "held)", _NL),
    "flexisync_lock_lost_total": (
        "counter", "Held leases found lost (renewal, extend, release or owned() found "
        "them gone, or they ran past their ttl)", _NL),
    "flexisync_semaphore_admissions_total": (
        "counter", "Semaphore slots taken by this process", _NSEM),
    "flexisync_semaphore_wait_seconds": (
        "histogram", "Seconds from acquire() to holding a slot, for successful "
        "acquisitions", _NSEM),
    "flexisync_semaphore_timeouts_total": (
        "counter", "Semaphore acquires that ended without a slot", _NSEM),
    "flexisync_rate_limiter_admissions_total": (
        "counter", "Rate limiter admissions (acquire / try_acquire that got through)",
        _NRL),
    "flexisync_rate_limiter_wait_seconds": (
        "histogram", "Seconds an admitted caller was told to wait", _NRL),
    "flexisync_rate_limiter_rejections_total": (
        "counter", "Rate limiter requests refused (RateLimitTimeout, or try_acquire "
        "returning None)", _NRL),
    "flexisync_events_published_total": (
        "counter", "Events published by this process", _NT),
    "flexisync_events_received_total": (
        "counter", "Messages that arrived for this process's subscriptions (topic = the "
        "topic or pattern subscribed to)", _NT),
    "flexisync_events_delivered_total": (
        "counter", "Events handed to a callback or returned by get()/iteration", _NT),
    "flexisync_events_dropped_total": (
        "counter", "Events discarded because a subscription's queue was full (or it was "
        "closed with events queued)", _NT),
    "flexisync_events_invalid_total": (
        "counter", "Messages that were not valid events (dropped)", _NT),
    "flexisync_events_errors_total": (
        "counter", "Subscription callbacks that raised", _NT),
    "flexisync_events_gaps_total": (
        "counter", "Listener reconnects while a subscription was live (events published "
        "meanwhile were lost)", _NT),
    "flexisync_events_queued": (
        "gauge", "Events waiting in this process's subscription queues", _NT),
    "flexisync_stream_appends_total": (
        "counter", "Events appended to the stream by this process", _NS),
    "flexisync_stream_followers": (
        "gauge", "follow() iterations of the stream running in this process", _NS),
    "flexisync_stream_follower_lag": (
        "gauge", "Entries this process fetched that its slowest follower of the stream "
        "has not taken yet", _NS),
    "flexisync_stream_follower_lag_seconds": (
        "gauge", "How much older (by entry id: the server's clock) the oldest entry a "
        "follower has not taken is than the newest entry fetched", _NS),
}

# Gauges that add up across Contexts (the others take the maximum).
_SUMMED_GAUGES = frozenset(("flexisync_events_queued", "flexisync_stream_followers"))


class _Samples:
    """Samples keyed by (name, labels); equal keys (two Contexts with one namespace)
    are merged: counters and histograms add up, gauges per :data:`_SUMMED_GAUGES`."""

    def __init__(self) -> None:
        self.found: dict[tuple[str, tuple[tuple[str, str], ...]], Sample] = {}

    def add(self, name: str, labels: dict[str, str], value: float | Histogram) -> None:
        kind: Kind = CATALOGUE[name][0]  # type: ignore[assignment]
        key = (name, tuple(labels.items()))
        old = self.found.get(key)
        if old is not None:
            value = _merge(name, kind, old.value, value)
        self.found[key] = Sample(name, kind, labels, value)

    def family(self, name: str, base: dict[str, str], label: str,
                       values: Iterable[tuple[str, float]]) -> None:
        for label_value, value in values:
            self.add(name, {**base, label: label_value}, value)


def _merge(name: str, kind: Kind, old: float | Histogram, new: float | Histogram,
           ) -> float | Histogram:
    if isinstance(old, Histogram) and isinstance(new, Histogram):
        return Histogram(tuple((b, c1 + c2) for (b, c1), (_, c2)
                               in zip(old.buckets, new.buckets, strict=True)),
                         old.sum + new.sum, old.count + new.count)
    assert not isinstance(old, Histogram)
    assert not isinstance(new, Histogram)
    if kind == "gauge" and name not in _SUMMED_GAUGES:
        return max(old, new)
    return old + new


def _first(item: tuple[Any, Sample]) -> Any:
    return item[0]


def _histogram(wait: WaitHistogram) -> Histogram:
    buckets, total, count = wait.snapshot()
    return Histogram(buckets, total, count)


def collect() -> list[Sample]:
    """Every metric of every live Context of this process (both shells), now.

    No I/O, no thread; safe to call from any thread as often as a scraper likes
    (cost: proportional to the number of breakers, names and subscriptions).
    Sorted by name, then labels.
    """
    out = _Samples()
    for ctx in list(_context._live):
        if ctx.closed:
            continue
        _collect_context(ctx, out)
    return [sample for _, sample in sorted(out.found.items(), key=_first)]


def _collect_context(ctx: Context, out: _Samples) -> None:
    extensions = dict(ctx._extensions)  # read only: never build machinery here
    ns = ctx.namespace
    tally: Tally | None = extensions.get("metrics")
    hub = extensions.get("breakers")
    if hub is not None:
        hub.bury()  # counts of collected cores go to the tally first (may build it)
        tally = ctx._extensions.get("metrics")
        _collect_breakers(ns, hub, tally, out)
    if tally is not None:
        _collect_tally(ns, tally, out)
    for key in ("events", "aio.events"):
        bus = extensions.get(key)
        if bus is not None:
            for sub in bus.live_subscriptions():
                stats = sub.stats
                base = {"namespace": ns, "topic": sub.topic}
                _add_event_counts(out, base, stats)
                out.add("flexisync_events_queued", base, stats.queued)
    reader = extensions.get("streams.reader")
    if reader is not None:
        for stream, (followers, entries, seconds) in reader.lag().items():
            base = {"namespace": ns, "stream": stream}
            out.add("flexisync_stream_followers", base, followers)
            out.add("flexisync_stream_follower_lag", base, entries)
            out.add("flexisync_stream_follower_lag_seconds", base, seconds)


def _collect_breakers(ns: str, hub: Any, tally: Tally | None, out: _Samples) -> None:
    with hub.instances_lock:
        cores = list(hub.instances.values())
    gone = dict(tally.table_snapshot(tally.breakers)) if tally is not None else {}
    names = sorted({core.name for core in cores} | set(gone))
    by_name: dict[str, list[Any]] = {name: [] for name in names}
    for core in cores:
        by_name[core.name].append(core)
    for name in names:
        base = {"namespace": ns, "breaker": name}
        record = gone.get(name)
        counts = [core.counts() for core in by_name[name]]
        if record is not None:
            counts.append({
                "success": record.success, "failure": record.failure,
                "ignored": record.ignored, "rejected": record.rejected,
                "probe_success": record.probe_success,
                "probe_failure": record.probe_failure,
                "probe_ignored": record.probe_ignored,
                "open_seconds": record.open_seconds,
                "transitions": dict(record.transitions)})

        def total(field: str, counts: list[dict[str, Any]] = counts) -> float:
            return float(sum(c[field] for c in counts))

        probes = total("probe_success") + total("probe_failure") + total("probe_ignored")
        out.family("flexisync_breaker_calls_total", base, "outcome", (
            ("success", total("success")), ("failure", total("failure")),
            ("rejected", total("rejected")), ("ignored", total("ignored")),
            ("probe", probes)))
        out.family("flexisync_breaker_probes_total", base, "result", (
            ("success", total("probe_success")), ("failure", total("probe_failure")),
            ("ignored", total("probe_ignored"))))
        out.family("flexisync_breaker_transitions_total", base, "to", (
            (state, sum(c["transitions"].get(state, 0) for c in counts))
            for state in _STATES))
        out.add("flexisync_breaker_open_seconds_total", base, total("open_seconds"))
        state = next((core.current_state() for core in by_name[name]
                      if core._ready or core._down), None)
        if state is not None:
            out.family("flexisync_breaker_state", base, "state", (
                (s, 1.0 if s == state else 0.0) for s in _STATES))


def _collect_tally(ns: str, tally: Tally, out: _Samples) -> None:
    for name, lock in tally.table_snapshot(tally.locks):
        base = {"namespace": ns, "lock": name}
        out.add("flexisync_lock_acquisitions_total", base, lock.acquisitions)
        out.add("flexisync_lock_wait_seconds", base, _histogram(lock.wait))
        out.add("flexisync_lock_timeouts_total", base, lock.timeouts)
        out.add("flexisync_lock_lost_total", base, lock.lost)
    for name, sem in tally.table_snapshot(tally.semaphores):
        base = {"namespace": ns, "semaphore": name}
        out.add("flexisync_semaphore_admissions_total", base, sem.admissions)
        out.add("flexisync_semaphore_wait_seconds", base, _histogram(sem.wait))
        out.add("flexisync_semaphore_timeouts_total", base, sem.refusals)
    for name, limiter in tally.table_snapshot(tally.rate_limiters):
        base = {"namespace": ns, "limiter": name}
        out.add("flexisync_rate_limiter_admissions_total", base, limiter.admissions)
        out.add("flexisync_rate_limiter_wait_seconds", base, _histogram(limiter.wait))
        out.add("flexisync_rate_limiter_rejections_total", base, limiter.refusals)
    for name, topic in tally.table_snapshot(tally.topics):
        base = {"namespace": ns, "topic": name}
        out.add("flexisync_events_published_total", base, topic.published)
        if topic.received:  # subscriptions to it were closed: their final counts
            _add_event_counts(out, base, topic)
    for name, stream in tally.table_snapshot(tally.streams):
        out.add("flexisync_stream_appends_total", {"namespace": ns, "stream": name},
                stream.appends)


# --- the fleet's call outcomes ----------------------------------------------------------


def _ctx_of(owner: Any) -> Context:
    return owner if isinstance(owner, _context.Context) else owner._ctx


def _outcomes_plan(ctx: Context, name: str, buckets: int) -> Plan[list[dict[str, int]]]:
    validate_name(name, "breaker name")
    most = STATS_TTL // STATS_BUCKET
    if isinstance(buckets, bool) or not isinstance(buckets, int) or not 1 <= buckets <= most:
        raise ConfigError(f"buckets must be an int from 1 to {most}, got {buckets!r}")
    key = stats_key(ctx, name)
    raw = yield Call("breaker.stats_read", lambda c: c.hgetall(key))
    newest = int(time.time() // STATS_BUCKET) * STATS_BUCKET
    oldest = newest - (buckets - 1) * STATS_BUCKET
    rows = {t: dict.fromkeys(OUTCOMES, 0) for t in range(oldest, newest + 1, STATS_BUCKET)}
    for raw_field, raw_value in (raw or {}).items():
        field = raw_field.decode() if isinstance(raw_field, bytes) else str(raw_field)
        head, _, outcome = field.partition(":")
        if not head.isdigit() or outcome not in OUTCOMES:
            continue  # not ours: ignored
        row = rows.get(int(head))
        if row is None:
            continue
        try:
            value = int(raw_value)
        except (TypeError, ValueError):
            continue
        row[outcome] += max(0, value)
    return [{"t": t, **row} for t, row in sorted(rows.items())]


def fleet_outcomes(coordinator: Any, name: str, buckets: int = 30) -> list[dict[str, int]]:
    """The fleet's calls through breaker ``name`` per 10-second bucket (one HGETALL).

    ``coordinator`` is a ``Coordinator`` (an ``AsyncCoordinator`` works too: the read
    is blocking; see :func:`afleet_outcomes`). Every process adds its counts about once
    a second, so the newest bucket lags by up to ~1 s.

    Returns:
        ``buckets`` dicts, oldest first, ending with the current bucket (this
        machine's clock): ``{"t": bucket start, unix seconds, "success": n,
        "failure": n, "rejected": n, "ignored": n, "probe": n}``; zeros where no
        process reported anything.

    Raises:
        ConfigError: bad name, or ``buckets`` not an int from 1 to 90 (15 minutes).
        BackendUnavailable: Redis is unreachable.
    """
    ctx = _ctx_of(coordinator)
    return run(ctx, _outcomes_plan(ctx, name, buckets))


async def afleet_outcomes(coordinator: Any, name: str,
                          buckets: int = 30) -> list[dict[str, int]]:
    """:func:`fleet_outcomes`, awaited on the asyncio client (same result, same errors)."""
    ctx = _ctx_of(coordinator)
    return await arun(ctx, _outcomes_plan(ctx, name, buckets))


#: A subscription's counters, as ``flexisync_events_<field>_total``.
_EVENT_COUNTS = ("received", "delivered", "dropped", "invalid", "errors", "gaps")


def _add_event_counts(out: _Samples, base: dict[str, str], counts: Any) -> None:
    """Add the event counters of ``counts`` (live ``stats`` or a closed topic's tally)."""
    for field in _EVENT_COUNTS:
        out.add(f"flexisync_events_{field}_total", base, getattr(counts, field))
