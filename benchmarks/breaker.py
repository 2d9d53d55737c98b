"""Circuit breaker benchmark: flexisync against pybreaker and interlock-cb, one run.

Measures, side by side:

1. overhead per successful call while closed (minus a bare function call), for a bare
   ``if``/``try`` guard, flexisync, pybreaker in memory, pybreaker with
   ``CircuitRedisStorage``, interlock-cb local and interlock-cb with ``RedisStorage``;
2. cost of one failing call (the breaker counts it and stays closed);
3. trip propagation: time from a trip in this process until each of 8 other processes
   sees the breaker open (p50 / p99): for flexisync the moment its ``on_state_change``
   callback runs there (transitions are pushed); interlock-cb has no push, so its
   workers look at ``breaker.state`` every 0.5 ms (its poller refreshes it ~1/s).

Run: ``.venv/bin/python benchmarks/breaker.py`` (``FLEXISYNC_BENCH_URL``, default
``redis://localhost:6379/15``). Uses a unique namespace and deletes only its own keys.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import interlock
import pybreaker
import redis
from interlock.integrations.redis import RedisStorage

import flexisync
from _common import pct, quiet_logs  # benchmarks/_common.py

URL = os.environ.get("FLEXISYNC_BENCH_URL", "redis://localhost:6379/15")
CALLS = 200_000
REDIS_CALLS = 2_000
FAILURES = 1_000
WORKERS = 8
ROUNDS = {"flexisync": 30, "interlock-cb": 6}
POLL = 0.0005  # how often a worker looks at its breaker's state, seconds
NAMESPACE = f"bench-{uuid.uuid4().hex[:8]}"
NEVER_OPEN = 10**9


def noop() -> int:
    return 1


def boom() -> int:
    raise RuntimeError("provider down")


def per_call(fn: Callable[[], Any], calls: int) -> float:
    """Best of 3 runs of ``calls`` calls, seconds per call."""
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best


def per_failure(fn: Callable[[], Any], calls: int) -> float:
    """Seconds per failing call (the exception is swallowed)."""
    start = time.perf_counter()
    for _ in range(calls):
        with contextlib.suppress(RuntimeError):
            fn()
    return (time.perf_counter() - start) / calls


def guarded(fn: Callable[[], Any]) -> Callable[[], Any]:
    """The floor: one attribute check and a try/except, nothing counted."""
    class Flag:
        open = False
    flag = Flag()

    def wrapper() -> Any:
        if flag.open:
            raise RuntimeError("open")
        try:
            return fn()
        except Exception:
            raise
    return wrapper


def interlock_config() -> interlock.Config:
    return interlock.Config(minimum_number_of_calls=NEVER_OPEN, window_size=100,
                            failure_rate_threshold=1.0)


def build(client: redis.Redis, sync: flexisync.Coordinator, fn: Callable[[], Any],
          ) -> dict[str, Callable[[], Any]]:
    """Every contender, wrapping ``fn``, each configured never to open."""
    fx = sync.breaker("overhead", failure_threshold=NEVER_OPEN)
    assert fx.state == "closed"
    pb_local = pybreaker.CircuitBreaker(fail_max=NEVER_OPEN)
    pb_redis = pybreaker.CircuitBreaker(fail_max=NEVER_OPEN, state_storage=(
        pybreaker.CircuitRedisStorage(pybreaker.STATE_CLOSED, client,
                                      namespace=f"{NAMESPACE}:pybreaker")))
    il_local = interlock.CircuitBreaker(name="overhead", config=interlock_config())
    il_redis = interlock.CircuitBreaker(
        name="overhead", config=interlock_config(),
        storage=RedisStorage(client, key_prefix=f"{NAMESPACE}:interlock:"))
    return {
        "bare guard + try/except": guarded(fn),
        "flexisync (shared, Redis)": fx(fn),
        "pybreaker in-memory": pb_local(fn),
        "pybreaker + CircuitRedisStorage": pb_redis(fn),
        "interlock-cb local": il_local(fn),
        "interlock-cb + RedisStorage": il_redis(fn),
    }


# --- trip propagation ---------------------------------------------------------------


def _watch(make: Callable[[], Callable[[], str]], ready: Any, out: Any, rounds: int) -> None:
    is_state = make()
    ready.wait(60)
    for _ in range(rounds):
        while is_state() != "open":
            time.sleep(POLL)
        out.put(time.monotonic())
        while is_state() != "closed":
            time.sleep(POLL)
        out.put(None)


def _flexisync_push(ready: Any, out: Any, rounds: int) -> None:
    """flexisync pushes transitions: stamp each one in its on_state_change callback."""
    quiet_logs()  # a spawned worker starts with structlog's defaults
    breaker = flexisync.connect(URL, namespace=NAMESPACE).breaker("propagation")
    done = threading.Event()
    seen = [0]

    def changed(_name: str, _old: str, new: str) -> None:
        out.put(time.monotonic() if new == "open" else None)
        seen[0] += new == "closed"
        if seen[0] >= rounds:
            done.set()

    breaker.on_state_change(changed)  # subscribed (confirmed) before ready
    ready.wait(60)
    done.wait(120)


def _interlock_state() -> Callable[[], str]:
    client = redis.Redis.from_url(URL)
    breaker = interlock.CircuitBreaker(
        name="propagation", config=interlock_config(),
        storage=RedisStorage(client, key_prefix=f"{NAMESPACE}:interlock:"))
    breaker.call(noop)  # starts its coordinator (the poller)
    return lambda: str(breaker.state.value).lower()


def flexisync_worker(ready: Any, out: Any, rounds: int) -> None:
    _flexisync_push(ready, out, rounds)


def interlock_worker(ready: Any, out: Any, rounds: int) -> None:
    _watch(_interlock_state, ready, out, rounds)


def propagation(label: str, sync: flexisync.Coordinator, client: redis.Redis) -> list[float]:
    """Latencies (seconds) from a trip here to each worker seeing it, over all rounds."""
    ctx = multiprocessing.get_context("fork")
    rounds = ROUNDS[label]
    ready, out = ctx.Barrier(WORKERS + 1), ctx.Queue()
    target = flexisync_worker if label == "flexisync" else interlock_worker
    workers = [ctx.Process(target=target, args=(ready, out, rounds)) for _ in range(WORKERS)]
    for worker in workers:
        worker.start()
    breaker = sync.breaker("propagation")
    storage = RedisStorage(client, key_prefix=f"{NAMESPACE}:interlock:")
    ready.wait(60)
    latencies: list[float] = []
    for _ in range(rounds):
        start = time.monotonic()
        if label == "flexisync":
            breaker.trip(60)
        else:
            storage.trip_open(name="propagation", ttl=300)
        latencies.extend(out.get(timeout=60) - start for _ in range(WORKERS))
        if label == "flexisync":
            breaker.reset()
        else:
            storage.close(name="propagation", ttl=300)
        for _ in range(WORKERS):
            assert out.get(timeout=60) is None
    for worker in workers:
        worker.join(30)
    return latencies


def main() -> int:
    quiet_logs()
    client = redis.Redis.from_url(URL)
    sync = flexisync.connect(URL, namespace=NAMESPACE)
    try:
        bare = per_call(noop, CALLS)
        rows = []
        for label, fn in build(client, sync, noop).items():
            calls = REDIS_CALLS if "Storage" in label else CALLS
            rows.append((label, per_call(fn, calls) - bare))
        failing = build(client, sync, boom)
        fail_rows = [(label, per_failure(failing[label], FAILURES)) for label in (
            "flexisync (shared, Redis)", "pybreaker in-memory",
            "pybreaker + CircuitRedisStorage", "interlock-cb local",
            "interlock-cb + RedisStorage")]
        spread = {label: propagation(label, sync, client)
                  for label in ("flexisync", "interlock-cb")}
    finally:
        for key in client.scan_iter(match=f"{NAMESPACE}:*"):
            client.delete(key)
        sync.close()
        client.close()

    fx = dict(rows)["flexisync (shared, Redis)"]
    print(f"## Circuit breaker ({CALLS:,} calls in memory, {REDIS_CALLS:,} with Redis "
          f"storage; bare call {bare * 1e9:.0f} ns)\n")
    print("| closed, successful call | overhead per call | vs flexisync |")
    print("|---|---:|---:|")
    for label, cost in rows:
        print(f"| {label} | {cost * 1e6:.3f} µs | {cost / fx:.2f}x |")
    fx_fail = dict(fail_rows)["flexisync (shared, Redis)"]
    print("\n| failing call (counted, stays closed) | cost per call | vs flexisync |")
    print("|---|---:|---:|")
    for label, cost in fail_rows:
        print(f"| {label} | {cost * 1e6:.1f} µs | {cost / fx_fail:.2f}x |")
    fx_p99 = pct(spread["flexisync"], 0.99)
    print(f"\n| trip seen by {WORKERS} other processes | p50 | p99 | p99 vs flexisync |")
    print("|---|---:|---:|---:|")
    for label, values in spread.items():
        print(f"| {label} ({len(values)} samples) | {statistics.median(values) * 1e3:.2f} ms "
              f"| {pct(values, 0.99) * 1e3:.2f} ms | {pct(values, 0.99) / fx_p99:.0f}x |")
    pb_local = dict(rows)["pybreaker in-memory"]
    print(f"\nTargets: closed path ≤ 1 µs ({fx * 1e6:.3f} µs: "
          f"{'met' if fx <= 1e-6 else 'MISSED'}), no slower than pybreaker in-memory "
          f"({'met' if fx <= pb_local else 'MISSED'}), propagation p99 ≤ 5 ms "
          f"({fx_p99 * 1e3:.2f} ms: {'met' if fx_p99 <= 0.005 else 'MISSED'}).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
