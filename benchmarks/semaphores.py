"""Semaphore benchmark: flexisync ``Semaphore`` next to flexisync's own ``Lock``.

Run: ``.venv/bin/python benchmarks/semaphores.py`` (Redis from ``FLEXISYNC_BENCH_URL``,
default ``redis://localhost:6379/15``). One run measures, the same way for each:

* uncontended acquire + release, microseconds per pair (one process; short batches of
  each kind interleaved, median batch reported);
* handoff: every slot is held here, a second process blocks in ``acquire``; the time
  from ``release`` here to ``acquire`` returning there, p50 / p99 (CLOCK_MONOTONIC is
  shared by all processes on Linux);
* 8 processes re-acquiring in a loop (hold 1 ms, release, acquire again) for a few
  seconds: acquisitions per second and the worst single wait.

Kinds: the lock, the fair (FIFO) lock, a semaphore of limit 1 (a FIFO mutex) and one of
limit 4. Prints a markdown table with ratios to the lock, and the load average. Uses its
own namespace on DB 15 and deletes only the keys it made. Noisy on a busy machine.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import statistics
import sys
import time
import uuid
from typing import Any

import redis

from _common import pct, quiet_logs  # benchmarks/_common.py

URL = os.environ.get("FLEXISYNC_BENCH_URL", "redis://localhost:6379/15")
NAMESPACE = f"bench-sem-{uuid.uuid4().hex[:8]}"
KINDS = ("lock", "fair lock", "semaphore limit 1", "semaphore limit 4")
ROUNDS = 25
BATCH = 100
HANDOFFS = 100
LOOP_WORKERS = 8
LOOP_SECONDS = 2.0
HOLD = 0.001


class Kind:
    """acquire()/release() of one kind of flexisync primitive named ``name``."""

    def __init__(self, kind: str, name: str) -> None:
        import flexisync

        self.sync = flexisync.connect(URL, namespace=NAMESPACE)
        self.limit = 1
        if kind.startswith("semaphore"):
            self.limit = int(kind.rsplit(" ", 1)[1])
            primitive: Any = self.sync.semaphore(f"{name}-{self.limit}", self.limit,
                                                 lease=10)
        else:
            primitive = self.sync.lock(f"{name}-{kind.replace(' ', '-')}", ttl=10,
                                       fair=kind == "fair lock")
        self.primitive = primitive
        self.acquire, self.release = primitive.acquire, primitive.release
        self.others: list[Any] = []

    def fill(self) -> None:
        """Hold every slot (the lock's one, or all of the semaphore's)."""
        self.acquire()
        for _ in range(self.limit - 1):
            self.primitive.acquire()

    def close(self) -> None:
        self.sync.close()


def uncontended() -> dict[str, float]:
    """Microseconds per acquire + release with nobody else around, per kind."""
    kinds = {kind: Kind(kind, "uncontended") for kind in KINDS}
    batches: dict[str, list[float]] = {kind: [] for kind in KINDS}
    try:
        for _ in range(ROUNDS):
            for kind, k in kinds.items():
                started = time.perf_counter()
                for _ in range(BATCH):
                    k.acquire()
                    k.release()
                batches[kind].append((time.perf_counter() - started) / BATCH * 1e6)
    finally:
        for k in kinds.values():
            k.close()
    return {kind: statistics.median(values) for kind, values in batches.items()}


def _handoff_waiter(kind: str, conn: Any) -> None:
    quiet_logs()
    k = Kind(kind, "handoff")
    try:
        while conn.recv() == "go":
            conn.send("waiting")
            k.acquire()
            acquired = time.monotonic()
            k.release()
            conn.send(acquired)
    finally:
        k.close()


def handoff(kind: str, ctx: Any) -> list[float]:
    """Milliseconds from a release here to the acquire in a waiting process."""
    k = Kind(kind, "handoff")
    here, there = ctx.Pipe()
    waiter = ctx.Process(target=_handoff_waiter, args=(kind, there))
    waiter.start()
    samples = []
    try:
        for _ in range(HANDOFFS):
            k.fill()
            here.send("go")
            assert here.recv() == "waiting"
            time.sleep(0.01)  # let the waiter block in acquire
            released = time.monotonic()
            k.release()
            samples.append((here.recv() - released) * 1000)
            for _ in range(k.limit - 1):
                k.release()
        here.send("stop")
    finally:
        waiter.join(30)
        k.close()
    return samples


def _loop_worker(kind: str, barrier: Any, out: Any) -> None:
    quiet_logs()
    k = Kind(kind, "loop")
    waits = []
    try:
        barrier.wait(60)
        stop = time.monotonic() + LOOP_SECONDS
        while time.monotonic() < stop:
            started = time.monotonic()
            k.acquire()
            waits.append(time.monotonic() - started)
            time.sleep(HOLD)
            k.release()
    finally:
        k.close()
    out.put(waits)


def loop(kind: str, ctx: Any) -> tuple[float, float]:
    """(acquisitions per second, worst wait in ms) of 8 workers looping."""
    barrier, out = ctx.Barrier(LOOP_WORKERS + 1), ctx.Queue()
    workers = [ctx.Process(target=_loop_worker, args=(kind, barrier, out))
               for _ in range(LOOP_WORKERS)]
    for worker in workers:
        worker.start()
    barrier.wait(60)
    waits = [w for _ in workers for w in out.get(timeout=120)]
    for worker in workers:
        worker.join(30)
    return len(waits) / LOOP_SECONDS, max(waits) * 1000


def _ratio(value: float, base: float) -> str:
    return "1.0x" if value == base else f"{value / base:.2f}x"


def main() -> int:
    quiet_logs()
    ctx = multiprocessing.get_context("fork")
    rows: dict[str, dict[str, float]] = {}
    try:
        print("measuring uncontended acquire + release ...", file=sys.stderr)
        for kind, pair in uncontended().items():
            rows[kind] = {"pair": pair}
        for kind in KINDS:
            print(f"measuring {kind} handoff and 8-worker loop ...", file=sys.stderr)
            samples = handoff(kind, ctx)
            rows[kind]["p50"] = statistics.median(samples)
            rows[kind]["p99"] = pct(samples, 0.99)
            rows[kind]["rate"], rows[kind]["worst"] = loop(kind, ctx)
    finally:
        client = redis.Redis.from_url(URL)
        with contextlib.suppress(redis.RedisError):
            for key in client.scan_iter(match=f"{NAMESPACE}:*", count=1000):
                client.delete(key)
        client.close()
    base = rows["lock"]
    print(f"\n### Semaphore next to the lock ({URL.rsplit('@', 1)[-1]}, {LOOP_WORKERS} "
          f"workers, hold {HOLD * 1000:g} ms, load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())})\n")
    print("| kind | acquire+release µs | handoff p50 ms | handoff p99 ms "
          "| acquisitions/s, 8 workers | worst wait ms |")
    print("|---|---|---|---|---|---|")
    for kind, row in rows.items():
        print(f"| {kind} "
              f"| {row['pair']:.0f} ({_ratio(row['pair'], base['pair'])}) "
              f"| {row['p50']:.3f} ({_ratio(row['p50'], base['p50'])}) "
              f"| {row['p99']:.3f} ({_ratio(row['p99'], base['p99'])}) "
              f"| {row['rate']:.0f} ({_ratio(row['rate'], base['rate'])}) "
              f"| {row['worst']:.1f} |")
    print("\nRatios: the kind's number divided by the (unfair) lock's. Handoff: every "
          "slot held, one waiting process; the time from one release to its acquire.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
