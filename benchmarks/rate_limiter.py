"""Rate limiter benchmark: flexisync vs ``limits`` (Redis moving window and fixed window)
and ``pyrate-limiter`` (``RedisBucket``, a sliding log; and its ``RedisStateStore`` GCRA).

Run: ``.venv/bin/python benchmarks/rate_limiter.py`` (Redis from ``FLEXISYNC_BENCH_URL``,
default ``redis://localhost:6379/15``). One run measures every library the same way, for
cost 1 (requests) and cost 5,000 (LLM tokens):

* decision latency: one non-blocking decision that is admitted, µs mean / p50 / p99
  (one process). The log-based peers store one entry per unit of cost (``limits``'
  moving window LPUSHes ``cost`` entries, pyrate's ``RedisBucket`` ZADDs ``cost``
  members): their decision is O(cost). flexisync, ``limits``' fixed window (INCRBY) and
  pyrate's GCRA state store are O(1).
* accuracy: 4 processes ask flat out for ``SECONDS`` s against a limit of ``RATE``
  decisions per second (cost 1: 50/s; cost 5,000: 250,000 tokens/s, i.e. 50 calls/s):
  admitted in total vs ``RATE * SECONDS``, the most admitted in any sliding 1-s window
  vs ``RATE`` (the promise a window limiter makes: fixed windows let up to 2x through
  across a boundary), and decision calls per admission. flexisync runs with
  ``burst=1`` (strict pacing) and uses its blocking ``acquire`` (the server names the
  wait); the peers have no server-told wait, so their callers poll: retry after 1 ms.

Prints markdown tables with ratios to flexisync and the load average. Uses its own
prefix on DB 15 and deletes only the keys it made. Numbers are noisy on a busy machine.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import time
import uuid
from importlib.metadata import version
from typing import Any

import redis

from _common import pct, quiet_logs  # benchmarks/_common.py

URL = os.environ.get("FLEXISYNC_BENCH_URL", "redis://localhost:6379/15")
PREFIX = f"bench-rl-{uuid.uuid4().hex[:8]}"
LIBRARIES = ("flexisync", "limits moving window", "limits fixed window",
             "pyrate RedisBucket", "pyrate GCRA state")
LATENCY_N = {1: 2000, 5000: 60}
RATE = 50.0  # decisions per second in the accuracy run
SECONDS = 3.0
WORKERS = 4


class Adapter:
    """One library's limiter of ``limit`` units per ``period`` seconds, named ``name``.

    ``decide(cost)`` makes one non-blocking decision; ``admit(cost)`` returns once
    admitted and the number of decision calls that took.
    """

    def __init__(self, library: str, name: str, limit: float, period: int,
                 burst: float | None = None) -> None:
        self.library = library
        self.key = f"{PREFIX}:{name}"
        self.calls = 0
        if library == "flexisync":
            import flexisync

            self._coordinator = flexisync.connect(URL, namespace=PREFIX)
            self._fx = self._coordinator.rate_limiter(name, limit, per=float(period),
                                                      burst=burst)
        elif library.startswith("limits"):
            from limits import RateLimitItemPerSecond, storage, strategies

            self._storage = storage.RedisStorage(URL, key_prefix=PREFIX)
            cls = strategies.MovingWindowRateLimiter if "moving" in library \
                else strategies.FixedWindowRateLimiter
            self._limits = cls(self._storage)
            self._item = RateLimitItemPerSecond(int(limit), period)
        else:
            from pyrate_limiter import (
                Duration,
                Limiter,
                Rate,
                RedisBucket,
                RedisStateStore,
                StateBucket,
            )

            self._client = redis.Redis.from_url(URL)
            rates = [Rate(int(limit), Duration.SECOND * period)]
            if "GCRA" in library:
                bucket: Any = StateBucket(rates, store=RedisStateStore(self._client,
                                                                       self.key))
            else:
                bucket = RedisBucket.init(rates, self._client, self.key)
            self._pyrate = Limiter(bucket)

    def decide(self, cost: int) -> bool:
        self.calls += 1
        if self.library == "flexisync":
            return self._fx.try_acquire(cost) is not None
        if self.library.startswith("limits"):
            return bool(self._limits.hit(self._item, self.key, cost=cost))
        return bool(self._pyrate.try_acquire(self.key, weight=cost, blocking=False))

    def admit(self, cost: int) -> None:
        if self.library == "flexisync":
            self.calls += 1
            self._fx.acquire(cost)
            return
        while not self.decide(cost):
            time.sleep(0.001)

    def close(self) -> None:
        if self.library == "flexisync":
            self._coordinator.close()


def _cleanup() -> None:
    client = redis.Redis.from_url(URL)
    for pattern in (f"{PREFIX}*", f"*{PREFIX}*"):
        for key in client.scan_iter(match=pattern, count=1000):
            client.delete(key)
    client.close()


def latency(library: str, cost: int) -> list[float]:
    """µs per admitted non-blocking decision."""
    n = LATENCY_N[cost]
    adapter = Adapter(library, f"lat-{cost}-{uuid.uuid4().hex[:6]}", cost * n * 10, 3600)
    for _ in range(5):
        adapter.decide(cost)  # warm: connections, scripts
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        admitted = adapter.decide(cost)
        samples.append((time.perf_counter() - start) * 1e6)
        assert admitted, f"{library} refused a decision that fits its limit"
    adapter.close()
    _cleanup()
    return samples


def _accuracy_worker(library: str, name: str, cost: int, barrier: Any, out: Any) -> None:
    quiet_logs()
    adapter = Adapter(library, name, RATE * cost, 1, burst=cost)
    barrier.wait(timeout=60)
    end = time.monotonic() + SECONDS
    admitted = []
    while time.monotonic() < end:
        adapter.admit(cost)
        admitted.append(time.time())
    out.put((admitted, adapter.calls))
    adapter.close()


def accuracy(library: str, cost: int) -> tuple[float, float, float]:
    """(admitted / (RATE * SECONDS), max in any 1-s window / RATE, calls per admission)."""
    mp = multiprocessing.get_context("fork")
    barrier, out = mp.Barrier(WORKERS), mp.Queue()
    name = f"acc-{cost}-{uuid.uuid4().hex[:6]}"
    workers = [mp.Process(target=_accuracy_worker, args=(library, name, cost, barrier, out))
               for _ in range(WORKERS)]
    for worker in workers:
        worker.start()
    results = [out.get(timeout=60) for _ in workers]
    for worker in workers:
        worker.join(30)
    _cleanup()
    times = sorted(t for admitted, _ in results for t in admitted)
    first = times[0]
    # Count only what was admitted in the measured span (the last calls may end late).
    times = [t for t in times if t < first + SECONDS]
    calls = sum(c for _, c in results)
    total = sum(len(a) for a, _ in results)
    worst, j = 0, 0
    for i, t in enumerate(times):
        while times[j] <= t - 1.0:
            j += 1
        worst = max(worst, i - j + 1)
    return len(times) / (RATE * SECONDS), worst / RATE, calls / max(total, 1)


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    quiet_logs()
    print(f"# rate limiter benchmark ({URL}; load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())})\n")
    print(f"flexisync {version('flexisync')}, limits {version('limits')}, "
          f"pyrate-limiter {version('pyrate-limiter')}, redis-py {version('redis')}\n")
    lat: dict[tuple[str, int], list[float]] = {}
    for cost in (1, 5000):
        for library in LIBRARIES:
            lat[library, cost] = latency(library, cost)
    print("## decision latency (admitted, non-blocking), µs\n")
    print(_row(["library", "cost", "O(cost)?", "mean", "p50", "p99", "mean vs flexisync"]))
    print(_row(["---"] * 7))
    for cost in (1, 5000):
        base = sum(lat["flexisync", cost]) / len(lat["flexisync", cost])
        for library in LIBRARIES:
            s = lat[library, cost]
            mean = sum(s) / len(s)
            linear = "yes" if library in ("limits moving window", "pyrate RedisBucket") \
                else "no"
            print(_row([library, str(cost), linear, f"{mean:.0f}", f"{pct(s, .5):.0f}",
                        f"{pct(s, .99):.0f}", f"{mean / base:.2f}x"]))
    print(f"\n## accuracy: {WORKERS} processes flat out for {SECONDS:g} s at {RATE:g} "
          "decisions/s\n")
    print(_row(["library", "cost", "admitted / allowed", "max in any 1 s / limit",
                "decision calls per admission"]))
    print(_row(["---"] * 5))
    for cost in (1, 5000):
        for library in LIBRARIES:
            with contextlib.suppress(KeyboardInterrupt):
                total, worst, calls = accuracy(library, cost)
                print(_row([library, str(cost), f"{total:.3f}", f"{worst:.2f}",
                            f"{calls:.1f}"]), flush=True)


if __name__ == "__main__":
    try:
        main()
    finally:
        _cleanup()
