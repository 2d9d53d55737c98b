"""``CircuitBreaker``: one breaker per dependency, shared by every process of the fleet.

How it works:

* The shared state lives in Redis (``ns:breaker:{name}`` and its ``:window`` and
  ``:probes`` keys). Every decision that changes it (count a failure and maybe open,
  admit a half-open probe, settle a probe, trip/reset/force/disable) is ONE Lua script,
  timed by the Redis server's clock. A transition bumps a version and is PUBLISHed.
* Each process mirrors the state, once per name and policy, for its sync and asyncio
  code alike (``_mirror``, ``_core``): messages arrive on the Context's one listener
  thread; the mirror applies a version only when it is newer than what it holds, and
  re-reads the state after a reconnect, every ``refresh_interval`` seconds and when the
  listener loses its connection, so a lost message cannot leave a process stale.
* Hot path: a successful call while closed costs no round trip (a counter is bumped;
  the counts are flushed by a background thread at most every 100 ms when they matter).
  A failure costs one round trip. While open, calls are rejected from the mirror's
  deadline with no round trip until a probe may be admitted.
* Two thin shells: :class:`CircuitBreaker` (blocking, ``_sync``) and
  :class:`flexisync.aio.AsyncCircuitBreaker` run the same plans (``_core``) with
  blocking I/O or ``await``.

Counting semantics:

* ``failure_rate=None`` (default): the breaker opens after ``failure_threshold``
  consecutive failures counted across every process; a success resets the count.
  Successes are not sent per call: a process reports them with its next failure (so
  within one process the order is exact) or in the background at most 100 ms later,
  and only while failures are pending. A success in one process thus resets the count
  when it reaches Redis, which may be up to 100 ms after it happened. For a provider
  that fails most of the time but not always, prefer ``failure_rate``.
* ``failure_rate=r``: the breaker opens when, over the last ``window`` seconds, at least
  ``minimum_calls`` calls were seen fleet-wide and at least ``r`` of them failed. A
  success never erases a failure; it only adds to the call count. The consecutive rule
  is not applied in this mode.
* A call slower than ``slow_call_duration`` counts as a failure (its result is still
  returned). An exception in ``ignore`` counts as nothing; one outside ``failure_on``
  counts as a success (the dependency answered); ``BaseException``s that are not
  ``Exception`` (cancellation, ``KeyboardInterrupt``) count as nothing. Then
  ``outcome_of`` (default :func:`provider_outcome`) reads a provider's HTTP status:
  408, 429, 5xx and overload are failures, any other 4xx counts as nothing.
* A failure whose exception carries a provider's retry-after (by default
  :func:`provider_retry_after`: ``exc.retry_after``, then the ``retry-after-ms``,
  ``retry-after`` and rate-limit reset headers) opens the breaker at once for exactly
  that long (at most :data:`MAX_DURATION`), also when it is a failed probe, and never
  shortens a longer open period already running.
* :func:`retrying` retries transient errors with backoff, honours the retry-after and
  stops as soon as the breaker is open.

Robustness:

* Manual states (``forced_open``, ``disabled``) last until changed: their record has
  no expiry. An automatic state's record expires 7 days after its last change.
* Every duration is bounded (:data:`MAX_DURATION`, 10 years) at construction and at
  ``trip()``; every script checks all its arguments and the stored record before its
  first write, so it either applies entirely or changes nothing.
* A record another program damaged is reported (``breaker.record_repaired``) and
  repaired; one that cannot be repaired without destroying foreign data (a key of
  another type) is reported (``breaker.record_malformed``) and treated per
  ``on_backend_error`` until ``reset()`` replaces it. Garbage on the breaker's channel
  is reported (``breaker.message_malformed``) and ignored.
* Only the process whose script made a transition logs it (``breaker.opened`` at
  warning...); mirrors log ``breaker.mirrored`` at debug.
"""

from __future__ import annotations

from typing import Any

from flexisync._core.context import Context
from flexisync._core.plan import run
from flexisync._durations import to_ms
from flexisync._keys import validate_name
from flexisync.breaker._hub import hub_of
from flexisync.breaker._mirror import decode_info, keys_of, text
from flexisync.breaker._policy import (
    MAX_DURATION,
    BreakerInfo,
    BreakerPolicy,
    BreakerStats,
    State,
    duration,
    retry_after_attribute,
)
from flexisync.breaker._providers import (
    Outcome,
    error_type,
    http_status,
    provider_outcome,
    provider_retry_after,
    transient,
)
from flexisync.breaker._retry import Retrying, retrying
from flexisync.breaker._sync import CircuitBreaker

__all__ = [
    "MAX_DURATION",
    "BreakerInfo",
    "BreakerPolicy",
    "BreakerStats",
    "CircuitBreaker",
    "Outcome",
    "Retrying",
    "State",
    "breaker_info",
    "error_type",
    "http_status",
    "list_breakers",
    "provider_outcome",
    "provider_retry_after",
    "retry_after_attribute",
    "retrying",
    "transient",
]


def _ctx_of(owner: Any) -> Context:
    return owner if isinstance(owner, Context) else owner._ctx


def breaker_info(coordinator: Any, name: str, *, window: float = 60.0) -> BreakerInfo:
    """The shared state of breaker ``name`` as stored in Redis (one round trip).

    Reads only: no :class:`CircuitBreaker` is created, nothing is subscribed or
    mirrored, nothing is written. ``coordinator`` is a ``Coordinator`` (an
    ``AsyncCoordinator`` works too: the read is blocking).

    Args:
        window: the failure-rate window to total (the breaker's own ``window``).

    Raises:
        ConfigError: bad name or window.
        BackendUnavailable: Redis is unreachable.
        BackendError: the record holds data flexisync did not write (``reset()``
            repairs it).
    """
    ctx = _ctx_of(coordinator)
    validate_name(name, "breaker name")
    window_ms = to_ms(duration(window, "window"))
    channel = ctx.keys.object_channel("breaker", name)
    reply = run(ctx, hub_of(ctx).script("read", keys_of(ctx, name), [channel, window_ms],
                                        fail_fast=False))
    return decode_info(name, reply)


def list_breakers(coordinator: Any) -> list[BreakerInfo]:
    """Every breaker with shared state in this namespace, sorted by name (Redis only).

    Reads only, like :func:`breaker_info`.

    Raises:
        BackendUnavailable: Redis is unreachable.
        BackendError: a record holds data flexisync did not write.
    """
    ctx = _ctx_of(coordinator)
    prefix = f"{ctx.namespace}:breaker:{{"

    def scan(client: Any) -> list[str]:
        names = []
        for raw_key in client.scan_iter(match=prefix + "*", count=500):
            key = text(raw_key)
            if key.endswith("}") and "}" not in key[len(prefix):-1]:
                names.append(key[len(prefix):-1])
        return names

    names = ctx.backend.call("breaker.list", scan)
    return [breaker_info(ctx, name) for name in sorted(set(names))]
