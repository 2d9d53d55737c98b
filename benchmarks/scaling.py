"""Fleet-scale costs: what idle objects, waiters and subscriber processes cost, one run.

Run: ``.venv/bin/python benchmarks/scaling.py [--window 10] [--loop 2] [--quick]``

It starts its own throwaway ``redis-server`` (:func:`flexisync.embedded.start`), so the
server's ``INFO commandstats`` counts only this run's commands, and measures:

* **idle cost**: one worker process holding 1, 100 and 1,000 breakers (each used once,
  so its mirror is live), callback event subscriptions, or auto-renewed held locks, then
  doing nothing for ``--window`` seconds: Redis commands per second (every command the
  server ran, including those inside scripts; ``EVALSHA`` calls alone in brackets), the
  worker's CPU (per cent of one core) and how many threads the objects added;
* **lock contention**: 2/4/8/16 processes re-acquiring one lock in a loop (hold 1 ms)
  for ``--loop`` seconds, flexisync (default and fair) next to redis-py's ``Lock`` and
  python-redis-lock: acquisitions per second, the worst single wait, and Redis commands
  per acquisition;
* **pub/sub fan-out latency**: one publisher, 2/4/8/16 subscriber processes, p50/p99
  from ``publish`` to the subscriber holding the decoded event, flexisync next to raw
  redis-py (``PUBLISH`` of JSON; a ``PubSub`` per process doing ``json.loads``);
* a paper projection of the idle cost of a fleet of 500 processes x 50 breakers x 20
  auto-renewed locks, from the measured per-object rates.

The load average is printed with every table; on a busy machine the ratios move. The
targets of issue 13 are checked at the end.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any

import redis

import locks as lock_bench  # benchmarks/locks.py: one adapter per lock library
from _common import pct, print_checks, quiet_logs
from flexisync import embedded

IDLE_COUNTS = (1, 100, 1000)
PROCESS_COUNTS = (2, 4, 8, 16)
LOCK_LIBRARIES = ("flexisync", "flexisync fair", "redis-py Lock", "python-redis-lock")
HOLD = lock_bench.HOLD  # seconds each worker holds the lock
MESSAGES = 400  # per fan-out case
GAP = 0.002  # seconds between two published messages (latency, not throughput)
LOCK_TTL = 10.0  # seconds: an auto-renewed lock is extended about every LOCK_TTL / 3
FLEET = {"processes": 500, "breakers": 50, "locks": 20}


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _counts(client: redis.Redis) -> tuple[int, int]:
    """(every command the server ran, EVALSHA/EVAL calls) so far."""
    stats = client.info("commandstats")
    total = sum(int(row["calls"]) for row in stats.values())
    scripts = sum(int(stats.get(name, {}).get("calls", 0))
                  for name in ("cmdstat_evalsha", "cmdstat_eval"))
    return total, scripts


# --- idle cost ----------------------------------------------------------------------------


def _idle_worker(url: str, kind: str, count: int, signals: tuple[Any, ...]) -> None:
    ready, go, done, out = signals
    quiet_logs()
    import flexisync

    coordinator = flexisync.connect(url, namespace="scaling")
    held: list[Any] = []
    try:
        base_threads = threading.active_count()
        for i in range(count):
            if kind == "breakers":
                breaker = coordinator.breaker(f"b{i}")
                breaker.call(lambda: None)
                held.append(breaker)
            elif kind == "callback subscriptions":
                held.append(coordinator.events.subscribe(f"t{i}", _ignore))
            else:
                lock = coordinator.lock(f"l{i}", ttl=LOCK_TTL, auto_renew=True)
                lock.acquire()
                held.append(lock)
        threads = threading.active_count() - base_threads
        ready.set()
        go.wait(120)
        cpu = time.process_time()
        done.wait(600)
        out.put((time.process_time() - cpu, threads))
    finally:
        for item in held:
            close = getattr(item, "release", None) or getattr(item, "close", None)
            if close is not None:
                try:
                    close()
                except Exception:  # noqa: S112 - best effort at the end of a benchmark
                    continue
        coordinator.close()


class _Monitor:
    """Counts the commands clients send (``MONITOR``; those run inside scripts and this
    benchmark's own ``INFO`` calls are left out) until :meth:`stop`."""

    def __init__(self, url: str) -> None:
        self.sent = 0
        self._stop = threading.Event()
        self._url = url
        # No socket timeout: redis-py drops a monitor connection that times out.
        self._client = redis.Redis.from_url(url)
        self._monitor = self._client.monitor()
        self._monitor.__enter__()
        self._thread = threading.Thread(target=self._run, name="bench-monitor", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                command = self._monitor.next_command()
            except (redis.RedisError, OSError):
                return
            words = str(command.get("command", "")).split()
            if self._stop.is_set() or not words:
                continue
            if command.get("client_type") != "lua" and words[0].upper() != "INFO":
                self.sent += 1

    def stop(self) -> int:
        self._stop.set()
        sent = self.sent
        waker = redis.Redis.from_url(self._url)
        waker.echo("bench-monitor-stop")  # the monitor reads one more line and ends
        waker.close()
        self._thread.join(5)
        self._client.close()
        return sent


def _ignore(_event: Any) -> None:
    return None


def idle(url: str, client: redis.Redis, case: tuple[str, int], window: float,
         mp: Any) -> dict[str, float]:
    """Client commands/s (round trips: a script counts once), every command the server
    ran per second (script internals included), CPU % of one core and threads added,
    for ``count`` idle objects of ``kind`` in one worker process."""
    kind, count = case
    ready, go, done, out = mp.Event(), mp.Event(), mp.Event(), mp.Queue()
    worker = mp.Process(target=_idle_worker,
                        args=(url, kind, count, (ready, go, done, out)))
    worker.start()
    try:
        if not ready.wait(300):
            raise RuntimeError(f"idle worker ({kind}, {count}) did not get ready")
        time.sleep(1.0)  # let the set-up traffic (first reads, subscribes) settle
        monitor = _Monitor(url)
        before, started = _counts(client), time.monotonic()
        go.set()
        time.sleep(window)
        done.set()
        after, elapsed = _counts(client), time.monotonic() - started
        sent = monitor.stop()
        cpu, threads = out.get(timeout=120)
    finally:
        done.set()
        worker.join(60)
    # The INFO call of the measurement itself is not the worker's.
    commands = max(0, after[0] - before[0] - 1)
    return {"sent": sent / elapsed, "commands": commands / elapsed,
            "cpu": cpu / elapsed * 100, "threads": threads}


# --- lock contention ------------------------------------------------------------------------


def contention(client: redis.Redis, library: str, processes: int, seconds: float,
               mp: Any) -> dict[str, float]:
    """Acquisitions/s, worst wait (ms) and Redis commands per acquisition."""
    barrier, out = mp.Barrier(processes + 1), mp.Queue()
    lock_bench.LOOP_SECONDS = seconds  # read by the forked workers
    workers = [mp.Process(target=lock_bench._loop_worker, args=(library, barrier, out))
               for _ in range(processes)]
    for worker in workers:
        worker.start()
    barrier.wait(120)
    before = _counts(client)
    waits = [acquired - started for _ in workers
             for started, acquired in out.get(timeout=300)]
    after = _counts(client)
    for worker in workers:
        worker.join(60)
    acquired = max(1, len(waits))
    return {"rate": len(waits) / seconds, "worst": max(waits, default=0.0) * 1000,
            "calls": (after[0] - before[0] - 1) / acquired,
            "scripts": (after[1] - before[1]) / acquired}


# --- pub/sub fan-out latency --------------------------------------------------------------


def _raw_subscriber(url: str, channel: str, ready: Any, out: Any) -> None:
    client = redis.Redis.from_url(url)
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(channel)
    while pubsub.get_message(timeout=1.0) is None and not pubsub.subscribed:
        pass
    ready.wait(120)
    latencies: list[float] = []
    deadline = time.monotonic() + 120
    while len(latencies) < MESSAGES and time.monotonic() < deadline:
        message = pubsub.get_message(timeout=1.0)
        if message is None:
            continue
        payload = json.loads(message["data"])
        latencies.append(time.monotonic() - payload["t"])
    pubsub.close()
    client.close()
    out.put(latencies)


def _flexisync_subscriber(url: str, topic: str, ready: Any, out: Any) -> None:
    quiet_logs()
    import flexisync

    with flexisync.connect(url, namespace="scaling") as coordinator:
        subscription = coordinator.events.subscribe(topic, maxsize=MESSAGES * 2)
        ready.wait(120)
        latencies: list[float] = []
        deadline = time.monotonic() + 120
        while len(latencies) < MESSAGES and time.monotonic() < deadline:
            event = subscription.get(timeout=1.0)
            if event is not None:
                latencies.append(time.monotonic() - event.data["t"])
        subscription.close()
    out.put(latencies)


def fanout(url: str, flavour: str, processes: int, mp: Any) -> tuple[float, float]:
    """p50 and p99 (ms) from publish to a decoded event, over every subscriber."""
    import flexisync

    ready, out = mp.Barrier(processes + 1), mp.Queue()
    target: Callable[..., None] = (_raw_subscriber if flavour == "raw redis-py"
                                   else _flexisync_subscriber)
    name = f"fanout-{flavour.replace(' ', '-')}-{processes}"
    workers = [mp.Process(target=target, args=(url, name, ready, out))
               for _ in range(processes)]
    for worker in workers:
        worker.start()
    raw = redis.Redis.from_url(url)
    coordinator = flexisync.connect(url, namespace="scaling")
    try:
        ready.wait(120)
        time.sleep(0.2)  # subscribers are inside their receive loop
        for _ in range(MESSAGES):
            payload = {"t": time.monotonic()}
            if flavour == "raw redis-py":
                raw.publish(name, json.dumps(payload))
            else:
                coordinator.events.publish(name, payload)
            time.sleep(GAP)
        latencies = [x * 1000 for _ in workers for x in out.get(timeout=300)]
    finally:
        coordinator.close()
        raw.close()
        for worker in workers:
            worker.join(60)
    return statistics.median(latencies), pct(latencies, 0.99)


def _projection(rows: dict[tuple[str, int], dict[str, float]],
                counts: tuple[int, ...]) -> None:
    """Print the idle cost of :data:`FLEET`, scaled from the measured rows.

    Per process, commands sent and server commands are interpolated linearly between
    the two measured counts around the fleet's per-process count (a batched refresh
    sends about as many commands for 1 breaker as for 1,000; its server cost grows
    with the count)."""
    procs = FLEET["processes"]

    def per_process(kind: str, count: int, field: str) -> float:
        low = max([c for c in counts if c <= count], default=min(counts))
        high = min([c for c in counts if c >= count], default=max(counts))
        a, b = rows[kind, low][field], rows[kind, high][field]
        return a if high == low else a + (b - a) * (count - low) / (high - low)

    print(f"\n### Paper projection: {procs} processes x {FLEET['breakers']} breakers x "
          f"{FLEET['locks']} auto-renewed locks, all idle (scaled from the table above)\n")
    print("| source | commands sent/s, per process | fleet | server commands/s, fleet |")
    print("|---|---:|---:|---:|")
    total_sent = total_server = 0.0
    for kind, key in (("breakers", "breakers"), ("auto-renewed locks", "locks")):
        sent = per_process(kind, FLEET[key], "sent")
        server = per_process(kind, FLEET[key], "commands")
        total_sent += procs * sent
        total_server += procs * server
        print(f"| {FLEET[key]} {kind} | {sent:.2f} | {procs * sent:,.0f} "
              f"| {procs * server:,.0f} |")
    print(f"| total | | {total_sent:,.0f} | {total_server:,.0f} |")


# --- report -----------------------------------------------------------------------------------


def idle_table(url: str, client: redis.Redis, server_name: str, plan: dict[str, Any],
               checks: dict[str, bool]) -> dict[tuple[str, int], dict[str, float]]:
    """Measure and print the idle cost table; returns its rows."""
    window, counts, mp = plan["window"], plan["idle_counts"], plan["mp"]
    print(f"### Idle cost per process (private {server_name} on loopback, "
          f"{window:g} s windows, load average {_load()})\n")
    print("| objects in one process | commands sent/s | server commands/s "
          "(script internals too) | CPU % of a core | threads added |")
    print("|---|---:|---:|---:|---:|")
    rows: dict[tuple[str, int], dict[str, float]] = {}
    for kind in ("breakers", "callback subscriptions", "auto-renewed locks"):
        for count in counts:
            print(f"measuring {count} idle {kind} ...", file=sys.stderr)
            row = rows[kind, count] = idle(url, client, (kind, count), window, mp)
            print(f"| {count:,} {kind} | {row['sent']:.2f} | {row['commands']:.1f} "
                  f"| {row['cpu']:.2f} | {row['threads']:.0f} |", flush=True)
    top = max(counts)
    checks[f"{top:,} idle breakers <= 2 commands sent/s per process"] = \
        rows["breakers", top]["sent"] <= 2.0
    checks[f"<= 16 threads for {top:,} callback subscriptions"] = \
        rows["callback subscriptions", top]["threads"] <= 16
    return rows


def lock_table(client: redis.Redis, plan: dict[str, Any], checks: dict[str, bool]) -> None:
    """Measure and print the lock contention table."""
    seconds, counts, mp = plan["loop"], plan["process_counts"], plan["mp"]
    print(f"\n### Lock contention: one lock, hold {HOLD * 1000:g} ms, "
          f"{seconds:g} s per case (load average {_load()})\n")
    print("| processes | library | acquisitions/s | worst wait ms "
          "| Redis commands per acquisition (EVALSHA) |")
    print("|---:|---|---:|---:|---:|")
    rows: dict[tuple[str, int], dict[str, float]] = {}
    for processes in counts:
        for library in LOCK_LIBRARIES:
            print(f"measuring {library} with {processes} processes ...", file=sys.stderr)
            row = rows[library, processes] = contention(client, library, processes,
                                                        seconds, mp)
            print(f"| {processes} | {library} | {row['rate']:.0f} | {row['worst']:.1f} "
                  f"| {row['calls']:.1f} ({row['scripts']:.2f}) |", flush=True)
    most = max(counts)
    checks[f"{most}-process lock throughput >= redis-py Lock's"] = \
        rows["flexisync", most]["rate"] >= rows["redis-py Lock", most]["rate"]
    for library in ("flexisync", "flexisync fair"):
        calls = [rows[library, p]["calls"] for p in counts]
        checks[f"{library}: commands per acquisition constant in the waiters "
               f"({min(calls):.1f}..{max(calls):.1f}, within 1.5x)"] = \
            max(calls) <= 1.5 * min(calls)


def fanout_table(url: str, plan: dict[str, Any]) -> None:
    """Measure and print the pub/sub fan-out latency table."""
    print(f"\n### Pub/sub fan-out latency, publish -> decoded event in each subscriber "
          f"process ({MESSAGES} messages, one every {GAP * 1000:g} ms; load average "
          f"{_load()})\n")
    print("| subscriber processes | raw redis-py p50 / p99 ms "
          "| flexisync p50 / p99 ms | ratio p50 / p99 |")
    print("|---:|---:|---:|---:|")
    for processes in plan["process_counts"]:
        print(f"measuring pub/sub fan-out to {processes} processes ...", file=sys.stderr)
        raw50, raw99 = fanout(url, "raw redis-py", processes, plan["mp"])
        our50, our99 = fanout(url, "flexisync", processes, plan["mp"])
        print(f"| {processes} | {raw50:.3f} / {raw99:.3f} | {our50:.3f} / {our99:.3f} "
              f"| {our50 / raw50:.2f}x / {our99 / raw99:.2f}x |", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--window", type=float, default=10.0,
                        help="seconds each idle case is watched (default 10: two "
                             "refresh intervals of a breaker)")
    parser.add_argument("--loop", type=float, default=2.0,
                        help="seconds each lock contention case runs")
    parser.add_argument("--quick", action="store_true",
                        help="short windows and fewer cases (a smoke run)")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    quiet_logs()
    plan: dict[str, Any] = {
        "window": args.window, "loop": args.loop, "idle_counts": IDLE_COUNTS,
        "process_counts": PROCESS_COUNTS, "mp": multiprocessing.get_context("fork")}
    if args.quick:
        plan.update(window=2.0, loop=0.5, idle_counts=(1, 100), process_counts=(2, 4))
    server = embedded.start(args=["--save", "", "--appendonly", "no"])
    lock_bench.URL = server.url
    client = redis.Redis.from_url(server.url)
    checks: dict[str, bool] = {}
    try:
        rows = idle_table(server.url, client, server.name, plan, checks)
        lock_table(client, plan, checks)
        fanout_table(server.url, plan)
        _projection(rows, plan["idle_counts"])
    finally:
        client.close()
        server.stop()
    print_checks(checks)
    return 0


if __name__ == "__main__":
    sys.exit(main())
