"""Lock benchmark: flexisync vs redis-py ``Lock``, python-redis-lock and pottery ``Redlock``,
next to a raw redis-py floor (``RawFloor``: the least a pushed handoff can cost).

Run: ``.venv/bin/python benchmarks/locks.py`` (Redis from ``FLEXISYNC_BENCH_URL``, default
``redis://localhost:6379/15``). One run measures every library the same way:

* uncontended acquire + release, microseconds per pair (one process);
* handoff: a second process blocks in ``acquire``; the time from ``release`` in the
  holder to ``acquire`` returning in the waiter, p50 / p99 (CLOCK_MONOTONIC is shared by
  all processes on Linux);
* 8 processes re-acquiring in a loop (hold 1 ms, release, acquire again) for a few
  seconds: the worst single wait in ms and in holds (how many times other workers got
  the lock during that wait), and the throughput.

Prints a markdown table with ratios to flexisync. Uses its own namespace on DB 15 and
deletes only the keys it made. Numbers are noisy on a busy machine.
"""

from __future__ import annotations

import bisect
import contextlib
import multiprocessing
import os
import statistics
import sys
import time
import uuid
import warnings
from collections.abc import Callable
from typing import Any

import redis

from _common import print_checks  # benchmarks/_common.py

URL = os.environ.get("FLEXISYNC_BENCH_URL", "redis://localhost:6379/15")
NAMESPACE = f"bench-locks-{uuid.uuid4().hex[:8]}"
LIBRARIES = ("flexisync", "flexisync fair", "raw redis-py floor", "redis-py Lock",
             "python-redis-lock", "pottery Redlock")
ROUNDS = 25
HANDOFFS = {"redis-py Lock": 30, "pottery Redlock": 30}  # slow peers: fewer samples
DEFAULT_HANDOFFS = 100
LOOP_WORKERS = 8
LOOP_SECONDS = 2.0
HOLD = 0.001


class RawFloor:
    """The physical floor of a pushed handoff, in plain redis-py: ``SET NX PX`` to
    acquire; a waiter that missed subscribes once (kept for the next wait) and blocks
    on its pub/sub socket in the calling thread (no listener thread to hand over
    from); a release is one script (DEL if ours + PUBLISH). Release -> wake -> acquire
    costs the release's round trip, the message's delivery and the acquire's round
    trip; no fencing, no retries, no expiry handling."""

    RELEASE = ("if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]); "
               "redis.call('PUBLISH', KEYS[1], '') end")

    def __init__(self, client: redis.Redis, key: str) -> None:
        self.client, self.key = client, key
        self.token = uuid.uuid4().hex
        self.pubsub: Any = None
        self.release_script = client.register_script(self.RELEASE)

    def acquire(self) -> bool:
        while not self.client.set(self.key, self.token, nx=True, px=10_000):
            if self.pubsub is None:
                self.pubsub = self.client.pubsub(  # type: ignore[no-untyped-call]
                    ignore_subscribe_messages=True)
                self.pubsub.subscribe(self.key)
                continue  # attempt again now that releases reach us
            self.pubsub.get_message(timeout=5.0)
        return True

    def release(self) -> None:
        self.release_script(keys=[self.key], args=[self.token])

    def close(self) -> None:
        if self.pubsub is not None:
            self.pubsub.close()


class Adapter:
    """acquire()/release() of one library's lock named ``name``, built in this process."""

    def __init__(self, library: str, name: str) -> None:
        self.library = library
        self.closers: list[Callable[[], Any]] = []
        self.acquire: Callable[[], Any]
        self.release: Callable[[], Any]
        key = f"{NAMESPACE}:{name}"
        if library.startswith("flexisync"):
            import flexisync

            sync = flexisync.connect(URL, namespace=NAMESPACE)
            self.closers.append(sync.close)
            lock = sync.lock(name, ttl=10, fair=library.endswith("fair"))
            self.acquire, self.release = lock.acquire, lock.release
            return
        client = redis.Redis.from_url(URL)
        self.closers.append(client.close)
        if library == "raw redis-py floor":
            peer: Any = RawFloor(client, key)
            self.closers.insert(0, peer.close)
        elif library == "redis-py Lock":
            peer = client.lock(key, timeout=10)
        elif library == "python-redis-lock":
            import redis_lock

            peer = redis_lock.Lock(client, key, expire=10)
        else:
            from pottery import Redlock

            peer = Redlock(key=key, masters={client}, auto_release_time=10)
        self.acquire, self.release = peer.acquire, peer.release

    def close(self) -> None:
        for closer in self.closers:
            closer()


def peer_keys(name: str) -> list[str]:
    """Every key the peers may create for ``name`` (outside our namespace prefix too)."""
    key = f"{NAMESPACE}:{name}"
    return [key, f"lock:{key}", f"lock-signal:{key}", f"redlock:{key}"]  # (floor: key)


def _quiet() -> None:
    warnings.simplefilter("ignore")  # pottery warns about single-master Redlock


# --- uncontended ------------------------------------------------------------------------


def uncontended(libraries: tuple[str, ...]) -> dict[str, float]:
    """Microseconds per acquire + release with nobody else around, per library.

    Short batches of every library are interleaved and the median batch is reported,
    so that load from other processes on the machine hits every library alike.
    """
    adapters = {library: Adapter(library, "uncontended") for library in libraries}
    batches: dict[str, list[float]] = {library: [] for library in libraries}
    try:
        for _ in range(ROUNDS):
            for library, adapter in adapters.items():
                size = 20 if library == "pottery Redlock" else 100
                started = time.perf_counter()
                for _ in range(size):
                    adapter.acquire()
                    adapter.release()
                batches[library].append((time.perf_counter() - started) / size * 1e6)
    finally:
        for adapter in adapters.values():
            adapter.close()
    return {library: statistics.median(values) for library, values in batches.items()}


# --- handoff -----------------------------------------------------------------------------


def _handoff_waiter(library: str, conn: Any) -> None:
    _quiet()
    adapter = Adapter(library, "handoff")
    try:
        while conn.recv() == "go":
            conn.send("waiting")
            adapter.acquire()
            acquired = time.monotonic()
            adapter.release()
            conn.send(acquired)
    finally:
        adapter.close()


def handoff(library: str, ctx: Any) -> list[float]:
    """Milliseconds from release in this process to acquire in a waiting process."""
    adapter = Adapter(library, "handoff")
    here, there = ctx.Pipe()
    waiter = ctx.Process(target=_handoff_waiter, args=(library, there))
    waiter.start()
    samples = []
    try:
        for _ in range(HANDOFFS.get(library, DEFAULT_HANDOFFS)):
            adapter.acquire()
            here.send("go")
            assert here.recv() == "waiting"
            time.sleep(0.01)  # let the waiter block in acquire
            released = time.monotonic()
            adapter.release()
            samples.append((here.recv() - released) * 1000)
        here.send("stop")
    finally:
        waiter.join(30)
        adapter.close()
    return samples


# --- 8 workers in a loop ------------------------------------------------------------------


def _loop_worker(library: str, barrier: Any, out: Any) -> None:
    _quiet()
    adapter = Adapter(library, "loop")
    waits = []
    try:
        barrier.wait(60)
        stop = time.monotonic() + LOOP_SECONDS
        while time.monotonic() < stop:
            started = time.monotonic()
            adapter.acquire()
            waits.append((started, time.monotonic()))
            time.sleep(HOLD)
            adapter.release()
    finally:
        adapter.close()
    out.put(waits)


def loop(library: str, ctx: Any) -> tuple[float, int, float]:
    """(worst wait ms, most acquisitions by others during one wait, acquisitions/s)."""
    barrier, out = ctx.Barrier(LOOP_WORKERS + 1), ctx.Queue()
    workers = [ctx.Process(target=_loop_worker, args=(library, barrier, out))
               for _ in range(LOOP_WORKERS)]
    for worker in workers:
        worker.start()
    barrier.wait(60)
    waits = [w for _ in workers for w in out.get(timeout=120)]
    for worker in workers:
        worker.join(30)
    acquired = sorted(a for _, a in waits)
    worst = max(a - s for s, a in waits)
    # How many times someone else got the lock while this waiter waited.
    overtaken = max(bisect.bisect_left(acquired, a) - bisect.bisect_right(acquired, s)
                    for s, a in waits)
    return worst * 1000, overtaken, len(waits) / LOOP_SECONDS


# --- report --------------------------------------------------------------------------------


def _ratio(value: float, base: float) -> str:
    return "1.0x" if value == base else f"{value / base:.1f}x"


def main() -> int:
    _quiet()
    ctx = multiprocessing.get_context("fork")
    results: dict[str, dict[str, Any]] = {}
    try:
        print("measuring uncontended acquire + release ...", file=sys.stderr)
        for library, pair in uncontended(LIBRARIES).items():
            results[library] = {"pair": pair}
        for library in LIBRARIES:
            print(f"measuring {library} handoff and 8-worker loop ...", file=sys.stderr)
            row = results[library]
            samples = sorted(handoff(library, ctx))
            row["p50"] = statistics.median(samples)
            row["p99"] = samples[min(len(samples) - 1, round(0.99 * (len(samples) - 1)))]
            row["worst"], row["overtaken"], row["rate"] = loop(library, ctx)
    finally:
        client = redis.Redis.from_url(URL)
        with contextlib.suppress(redis.RedisError):
            names = ("uncontended", "handoff", "loop")
            client.delete(*[k for n in names for k in peer_keys(n)])
            for key in client.scan_iter(match=f"{NAMESPACE}:*", count=1000):
                client.delete(key)
        client.close()
    base = results["flexisync"]
    print(f"\n### Locks: flexisync vs peers ({URL.rsplit('@', 1)[-1]}, "
          f"{LOOP_WORKERS} workers, hold {HOLD * 1000:g} ms, load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())})\n")
    print("| library | acquire+release µs | handoff p50 ms | handoff p99 ms "
          "| worst wait, 8 workers looping | acquisitions/s |")
    print("|---|---|---|---|---|---|")
    for library, row in results.items():
        print(f"| {library} "
              f"| {row['pair']:.0f} ({_ratio(row['pair'], base['pair'])}) "
              f"| {row['p50']:.3f} ({_ratio(row['p50'], base['p50'])}) "
              f"| {row['p99']:.3f} ({_ratio(row['p99'], base['p99'])}) "
              f"| {row['worst']:.1f} ms, {row['overtaken']} holds "
              f"| {row['rate']:.0f} |")
    print("\nRatios: the library's number divided by flexisync's (lower is better for "
          "times). Worst wait: the longest single acquire() in the loop, and the most "
          "acquisitions by other workers during one wait (a FIFO lock keeps it at "
          f"{LOOP_WORKERS - 1}).")
    fair = results["flexisync fair"]
    checks = {
        "handoff p50 <= 0.35 ms": base["p50"] <= 0.35,
        "handoff p50 <= 1.5x the raw redis-py floor measured in this run":
            base["p50"] <= 1.5 * results["raw redis-py floor"]["p50"],
        "handoff p50 >= 10x better than redis-py Lock":
            results["redis-py Lock"]["p50"] >= 10 * base["p50"],
        "uncontended no slower than redis-py Lock":
            base["pair"] <= results["redis-py Lock"]["pair"],
        f"fair worst wait <= {LOOP_WORKERS} hold times": fair["overtaken"] <= LOOP_WORKERS,
    }
    print_checks(checks)
    return 0


if __name__ == "__main__":
    sys.exit(main())
