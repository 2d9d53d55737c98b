"""Through Sentinel vs straight to the same master; and failover recovery times.

    .venv/bin/python benchmarks/sentinel.py [--n 2000] [--rounds 3] [--workers 4]

Starts its own master + replica + 3 sentinels (tests/topologies.py; quorum 2,
down-after 1 s) and measures, on that one master:

1. per-operation cost through ``redis+sentinel://`` next to ``redis://`` to the same
   server (ratio; interleaved rounds, median round): state get / set, lock acquire +
   release, publish -> receive in the same process, breaker call while closed;
2. with ``--workers`` processes (fork) writing continuously, the time from a planned
   ``SENTINEL FAILOVER`` and from a SIGKILL of the master to every worker having
   written to the new master (and from the first ``+switch-master`` announcement).

Takes about a minute. Prints the load average (2 shared cores: read ratios, not
absolute figures).
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

import flexisync
from _common import per_op_us, quiet_logs  # benchmarks/_common.py

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # for tests.topologies

from tests.topologies import SERVICE, SentinelSetup, start_sentinel, wait_for

SWITCH = "+switch-master"


def _setup() -> SentinelSetup:
    setup = start_sentinel()
    for server in setup.servers:
        with contextlib.closing(redis.Redis(port=server.port)) as client:
            client.config_set("repl-diskless-sync-delay", 0)

    def synced() -> bool:
        with contextlib.closing(redis.Redis(port=setup.master_port(),
                                            decode_responses=True)) as client:
            info = client.info("replication")
        return any(isinstance(v, dict) and v.get("state") == "online" for v in info.values())

    wait_for(synced, 30, "the replica in sync")
    return setup


# --- per-operation cost --------------------------------------------------------------


def _cases(sync: flexisync.Coordinator) -> list[tuple[str, Callable[[], object]]]:
    store = sync.state("bench")
    store.set("k", {"v": 1})
    lock = sync.lock("bench", ttl=10)
    sub = sync.events.subscribe("bench")
    breaker = sync.breaker("bench")

    def lock_cycle() -> None:
        lock.acquire()
        lock.release()

    def publish_receive() -> None:
        sync.events.publish("bench", 1)
        sub.get(timeout=5)

    return [
        ("state get", lambda: store.get("k")),
        ("state set", lambda: store.set("k", {"v": 1})),
        ("lock acquire + release", lock_cycle),
        ("publish -> receive", publish_receive),
        ("breaker call (closed)", lambda: breaker.call(int)),
    ]


def per_op(setup: SentinelSetup, n: int, rounds: int) -> list[tuple[str, float, float]]:
    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    single_url = f"redis://127.0.0.1:{setup.master_port()}/0"
    with flexisync.connect(setup.url, namespace=namespace) as via_sentinel, \
            flexisync.connect(single_url, namespace=namespace + "s") as single:
        ours, theirs = _cases(via_sentinel), _cases(single)
        rows = []
        for (name, mine_fn), (_, base_fn) in zip(ours, theirs, strict=True):
            count = n if "breaker" not in name else n * 20
            per_op_us(mine_fn, 100)
            per_op_us(base_fn, 100)
            mine, base = [], []
            for _ in range(rounds):
                mine.append(per_op_us(mine_fn, count))
                base.append(per_op_us(base_fn, count))
            rows.append((name, statistics.median(mine), statistics.median(base)))
    return rows


# --- failover ------------------------------------------------------------------------


def _probe(key: str, client: Any) -> Any:
    pipe = client.pipeline(transaction=False)
    pipe.set(key, 1, px=60_000)
    pipe.config_get("port")
    return pipe.execute()


def _worker(url: str, namespace: str, index: int, signals: tuple[Any, Any, Any]) -> None:
    ready, stop, out = signals
    quiet_logs()
    records: list[tuple[float, int]] = []
    with flexisync.connect(url, namespace=namespace) as sync:
        backend = sync._ctx.backend
        key = f"{namespace}:w{index}"
        while not stop.is_set():
            try:
                replies = backend.call("bench.probe", lambda c: _probe(key, c))
                records.append((time.time(), int(replies[1]["port"])))
                ready.set()
            except flexisync.FlexiSyncError:
                pass
            stop.wait(0.002)
    out.put(records)


class _Observer:
    """First ``+switch-master`` announcement per new master port, from any sentinel."""

    def __init__(self, setup: SentinelSetup) -> None:
        self.first: dict[int, float] = {}
        self._stop = threading.Event()
        self._subs = []
        for sentinel in setup.sentinels:
            pubsub = redis.Redis(port=sentinel.port, decode_responses=True).pubsub()
            pubsub.subscribe(SWITCH)
            self._subs.append(pubsub)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for pubsub in self._subs:
                with contextlib.suppress(redis.RedisError, OSError):
                    message = pubsub.get_message(timeout=0.002)
                    if message and message["type"] == "message":
                        parts = message["data"].split()
                        if parts[0] == SERVICE:
                            self.first.setdefault(int(parts[4]), time.time())

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for pubsub in self._subs:
            pubsub.close()


def failovers(setup: SentinelSetup, workers: int) -> list[tuple[str, float, float]]:
    """(what, seconds from the event to every worker on the new master, seconds from
    the first announcement to that) for a planned failover and a SIGKILL."""
    fork = multiprocessing.get_context("fork")
    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    stop, out = fork.Event(), fork.Queue()
    readies = [fork.Event() for _ in range(workers)]
    procs = [fork.Process(target=_worker,
                          args=(setup.url, namespace, i, (readies[i], stop, out)))
             for i in range(workers)]
    observer = _Observer(setup)
    for proc in procs:
        proc.start()
    events: list[tuple[str, float, int]] = []
    try:
        for ready in readies:
            ready.wait(30)
        started = time.time()
        _old, new = setup.failover()
        events.append(("planned SENTINEL FAILOVER", started, new))
        time.sleep(1.0)  # let every worker write on the new master before the kill
        started = time.time()
        _old, new = setup.kill_master()
        events.append(("SIGKILL of the master", started, new))
        time.sleep(2.0)
    finally:
        stop.set()
        records = [out.get(timeout=30) for _ in procs]
        for proc in procs:
            proc.join(30)
        observer.close()
    rows = []
    for what, at, new in events:
        firsts = [min((t for t, port in rs if port == new and t >= at), default=float("nan"))
                  for rs in records]
        done = max(firsts)
        announced = observer.first.get(new, float("nan"))
        rows.append((what, done - at, done - announced, announced - at))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=4)
    args = parser.parse_args()
    quiet_logs()
    setup = _setup()
    try:
        rows = per_op(setup, args.n, args.rounds)
        recoveries = failovers(setup, args.workers)
    finally:
        setup.stop()
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"\nThrough Sentinel vs redis:// to the same master (n={args.n} x {args.rounds} "
          f"rounds, median round; load average {load})\n")
    print("| operation | via redis+sentinel:// µs/op | redis:// µs/op | ratio |")
    print("|---|---:|---:|---:|")
    for name, mine, base in rows:
        print(f"| {name} | {mine:.1f} | {base:.1f} | {mine / base:.2f}x |")
    print(f"\nFailover with {args.workers} worker processes writing (fork; down-after 1 s, "
          "quorum 2)\n")
    print("| event | event -> every worker on the new master | first +switch-master -> "
          "every worker on it | event -> first +switch-master |")
    print("|---|---:|---:|---:|")
    for what, total, after, announce in recoveries:
        print(f"| {what} | {total:.3f} s | {after:.3f} s | {announce:.3f} s |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
