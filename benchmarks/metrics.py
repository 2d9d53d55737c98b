"""Metrics overhead: the same operations with metrics scraped and without, one run.

"Metrics on" means what a production process with an exporter does: a thread calls
``flexisync.metrics.collect()`` every 100 ms (a scrape) while the breaker thread adds
the fleet's call outcomes to Redis about once a second. "Metrics off" is the same
process with no scraper and the fleet-stats flush disabled. (The counters themselves
are always kept: they are plain ints the primitives bump anyway.)

Measured: a closed breaker's successful call (overhead over the bare call, as
``benchmarks/breaker.py`` measures it, next to pybreaker's in-memory breaker), a
lock acquire + release (2 round trips), an event publish (1 round trip). Prints the
load average and a table of ratios.

    .venv/bin/python benchmarks/metrics.py      # FLEXISYNC_BENCH_URL picks the Redis
"""

from __future__ import annotations

import os
import sys
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import pybreaker
import redis

import flexisync
from _common import quiet_logs  # benchmarks/_common.py
from flexisync import metrics
from flexisync.breaker._hub import hub_of

URL = os.environ.get("FLEXISYNC_BENCH_URL", "redis://localhost:6379/15")
CALLS = 200_000
LOCKS = 2_000
PUBLISHES = 5_000
RUNS = 5
SCRAPE_EVERY = 0.1


def noop() -> int:
    return 1


def best_per_call(fn: Callable[[], Any], calls: int, runs: int = RUNS) -> float:
    """Best of ``runs`` runs of ``calls`` calls, seconds per call."""
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best


class Scraper:
    """``metrics.collect()`` every :data:`SCRAPE_EVERY` seconds on a thread of its own."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.scrapes = 0
        self.samples = 0
        self.thread = threading.Thread(target=self.run, name="bench-scraper", daemon=True)

    def run(self) -> None:
        while not self.stop.wait(SCRAPE_EVERY):
            self.samples = len(metrics.collect())
            self.scrapes += 1

    def __enter__(self) -> Scraper:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(5)


def measure(on: bool) -> dict[str, float]:
    """One set of measurements with metrics on or off, in a fresh namespace."""
    namespace = f"bench-metrics-{uuid.uuid4().hex[:8]}"
    client = redis.Redis.from_url(URL)
    sync = flexisync.connect(URL, namespace=namespace)
    hub = hub_of(sync._ctx)
    if not on:
        hub.flush_stats = lambda: False  # type: ignore[method-assign]
    try:
        guarded = sync.breaker("bench")(noop)
        guarded()  # mirror ready: the closed path from here on
        for i in range(50):  # a realistic process: a few more names to collect
            sync.breaker(f"other-{i}")(noop)()
        lock = sync.lock("bench-lock", ttl=10)

        def lock_cycle() -> None:
            lock.acquire()
            lock.release()

        def publish() -> None:
            sync.events.publish("bench-topic", 1)

        start = time.perf_counter()
        for _ in range(20):
            metrics.collect()
        collect_cost = (time.perf_counter() - start) / 20
        scraper = Scraper() if on else None
        if scraper is not None:
            scraper.__enter__()
        try:
            bare = best_per_call(noop, CALLS)
            results = {
                "breaker": best_per_call(guarded, CALLS) - bare,
                "lock": best_per_call(lock_cycle, LOCKS, 3),
                "publish": best_per_call(publish, PUBLISHES, 3),
                "collect": collect_cost,
            }
        finally:
            if scraper is not None:
                scraper.__exit__()
                results["scrapes"] = scraper.scrapes
                results["samples"] = scraper.samples
        return results
    finally:
        for key in client.scan_iter(match=f"{namespace}:*"):
            client.delete(key)
        sync.close()
        client.close()


def main() -> int:
    quiet_logs()
    bare = best_per_call(noop, CALLS)
    pb = pybreaker.CircuitBreaker(fail_max=10**9)(noop)
    pybreaker_cost = best_per_call(pb, CALLS) - bare
    runs = [measure(on=flag) for flag in (False, True, False, True)]  # interleaved
    off = {k: min(r[k] for r in runs[0::2]) for k in runs[0]}
    on = {k: min(r[k] for r in runs[1::2]) for k in runs[1]}
    load = os.getloadavg()
    print(f"## Metrics overhead (load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; "
          f"on = collect() every {SCRAPE_EVERY * 1000:.0f} ms "
          f"({int(on['scrapes'])} scrapes of {int(on['samples'])} samples) "
          f"+ fleet stats flush)\n")
    print("| operation | metrics off | metrics on | on / off |")
    print("|---|---:|---:|---:|")
    rows = (("closed breaker, successful call (overhead)", "breaker", 1e6, "µs", 3),
            ("lock acquire + release", "lock", 1e6, "µs", 1),
            ("event publish", "publish", 1e6, "µs", 1))
    for label, key, scale, unit, digits in rows:
        print(f"| {label} | {off[key] * scale:.{digits}f} {unit} "
              f"| {on[key] * scale:.{digits}f} {unit} | {on[key] / off[key]:.2f}x |")
    print(f"| one collect() ({int(on['samples'])} samples, 51 breakers) | "
          f"{off['collect'] * 1e3:.2f} ms | — | — |")
    print(f"| pybreaker in-memory, successful call (overhead) | "
          f"{pybreaker_cost * 1e6:.3f} µs | — | — |")
    target = on["breaker"] <= 1e-6
    print(f"\nTarget: closed path with metrics on ≤ 1 µs ({on['breaker'] * 1e6:.3f} µs: "
          f"{'met' if target else 'MISSED'}); vs pybreaker in-memory "
          f"{on['breaker'] / pybreaker_cost:.2f}x.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
