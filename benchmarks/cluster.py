"""Redis Cluster next to a single node: per-operation cost, and recovery from a master's death.

    .venv/bin/python benchmarks/cluster.py [--n 2000] [--rounds 5] [--workers 4]

Starts, in the same run, a private single Redis and a private 3-master / 3-replica
cluster (``tests/topologies.py``, binaries on PATH), and stops them by pid at the end.

* Per operation (one process, µs, median of interleaved rounds): the bare redis-py
  command (``redis.Redis`` / ``redis.RedisCluster``: the floor), StateStore get / set /
  incr, lock acquire + release, a closed breaker's call, stream append, and publish ->
  receive (a topic subscription in the same process: publish, wait for the event).
  The table gives the cluster's ratio to the single node.
* Failover: ``--workers`` processes (fork) loop on lock + INCR of one hash tag; the master
  serving that slot is SIGKILLed; reported: seconds until the replica is promoted
  (as the cluster reports it) and until every process has completed an operation again
  (CLOCK_MONOTONIC is shared by all processes on Linux).

Prints the load average before and after: the machine has 2 cores, so the absolute
numbers move with whatever else runs; the ratios are what to compare.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import queue
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.topologies

import redis
from redis.crc import key_slot

import flexisync
from _common import per_op_us, quiet_logs
from flexisync import embedded
from flexisync.errors import FlexiSyncError
from tests.topologies import Cluster, start_cluster, wait_for

TAG = "bench-failover"


def _ops(sync: flexisync.Coordinator) -> dict[str, Callable[[], object]]:
    store = sync.state("bench")
    store.set("k", {"v": 1})
    lock = sync.lock("bench-lock", ttl=10)
    breaker = sync.breaker("bench-breaker")
    stream = sync.stream("bench-stream", maxlen=1000)
    arrived = threading.Event()

    def on_event(_event: Any) -> None:
        arrived.set()

    sub = sync.events.subscribe("bench-topic", on_event)
    sync._ctx.on_close(sub.close)

    def lock_pair() -> None:
        lock.acquire()
        lock.release()

    def publish_receive() -> None:
        arrived.clear()
        sync.events.publish("bench-topic", 1)
        if not arrived.wait(5.0):
            raise RuntimeError("event not received within 5 s")

    return {
        "state.get": lambda: store.get("k"),
        "state.set": lambda: store.set("k", {"v": 2}),
        "state.incr": lambda: store.incr("n"),
        "lock acquire+release": lock_pair,
        "breaker closed call": lambda: breaker.call(lambda: None),
        "stream append": lambda: stream.append({"i": 1}),
        "publish -> receive": publish_receive,
    }


def _raw_ops(client: Any) -> dict[str, Callable[[], object]]:
    """The floor: the bare redis-py command (``redis.Redis`` or ``redis.RedisCluster``)."""
    client.set("{bench}raw", b"1")
    return {
        "redis-py GET (floor)": lambda: client.get("{bench}raw"),
        "redis-py SET (floor)": lambda: client.set("{bench}raw", b"2"),
        "redis-py INCR (floor)": lambda: client.incr("{bench}n"),
    }


def _raw_client(url: str) -> Any:
    """A plain redis-py client on the same server(s), retries and all as redis-py has them."""
    if url.startswith("redis+cluster://"):
        host, port = url.split("://", 1)[1].split(",", maxsplit=1)[0].rsplit(":", 1)
        return redis.RedisCluster(host=host, port=int(port), protocol=2)
    return redis.Redis.from_url(url, protocol=2)


def per_operation(urls: dict[str, str], n: int, rounds: int) -> dict[str, dict[str, float]]:
    """{operation: {target: median µs}} over interleaved rounds."""
    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    coordinators = {name: flexisync.connect(url, namespace=namespace)
                    for name, url in urls.items()}
    raws = {name: _raw_client(url) for name, url in urls.items()}
    try:
        ops = {name: {**_raw_ops(raws[name]), **_ops(sync)}
               for name, sync in coordinators.items()}
        samples: dict[str, dict[str, list[float]]] = {}
        for _ in range(rounds):
            for op in next(iter(ops.values())):
                for target, table in ops.items():
                    count = max(n // 4, 50) if op == "publish -> receive" else n
                    per_op_us(table[op], 20)  # warm-up
                    samples.setdefault(op, {}).setdefault(target, []).append(
                        per_op_us(table[op], count))
        return {op: {t: statistics.median(v) for t, v in by.items()}
                for op, by in samples.items()}
    finally:
        for sync in coordinators.values():
            sync.close()
        for raw in raws.values():
            raw.close()


def failover_worker(url: str, namespace: str, index: int, *, out: Any, killed: Any,
                    stop: Any) -> None:
    """Loop on lock + INCR; after ``killed``, report the first success's time once."""
    quiet_logs()
    policy = flexisync.RetryPolicy(deadline=2.0)
    with flexisync.connect(url, namespace=namespace, retry=policy) as sync:
        store = sync.state(TAG)
        out.put(("ready", index, 0.0))
        reported = False
        while not stop.is_set():
            after_kill = killed.is_set()
            try:
                with sync.lock(TAG, ttl=3.0, timeout=5.0):
                    store.incr("n")
            except FlexiSyncError:
                continue
            if after_kill and not reported:
                reported = True
                out.put(("recovered", index, time.monotonic()))


def failover(cluster: Cluster, workers: int) -> tuple[float, float]:
    """(seconds to promotion, seconds until every worker worked again) after SIGKILL."""
    mp = multiprocessing.get_context("fork")
    out, killed, stop = mp.Queue(), mp.Event(), mp.Event()
    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    procs = [mp.Process(target=failover_worker, args=(cluster.url, namespace, i),
                        kwargs={"out": out, "killed": killed, "stop": stop}, daemon=True)
             for i in range(workers)]
    for proc in procs:
        proc.start()
    seen: dict[str, dict[int, float]] = {"ready": {}, "recovered": {}}

    def collect(kind: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while len(seen[kind]) < workers:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"workers did not report {kind!r} within {timeout}s")
            with contextlib.suppress(queue.Empty):
                what, index, at = out.get(timeout=min(left, 0.2))
                seen[what][index] = at

    try:
        collect("ready", 30.0)
        time.sleep(1.0)  # a steady second of work before the kill
        slot = int(key_slot(TAG.encode()))
        dead = cluster.master_of_slot(slot)
        killed_at = time.monotonic()
        cluster.node(dead).kill()
        killed.set()
        wait_for(lambda: cluster.master_of_slot(slot) != dead, 30.0, "replica promotion",
                 interval=0.02)
        promoted = time.monotonic() - killed_at
        collect("recovered", 30.0)
        return promoted, max(seen["recovered"].values()) - killed_at
    finally:
        stop.set()
        for proc in procs:
            proc.join(timeout=10.0)
            if proc.is_alive():
                proc.kill()


def _us(value: float) -> str:
    return f"{value:.2f}" if value < 10 else f"{value:.0f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workers", type=int, default=4)
    args = parser.parse_args()
    quiet_logs()
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    started = time.monotonic()
    single = embedded.start()
    cluster = start_cluster()
    try:
        table = per_operation({"single": single.url, "cluster": cluster.url},
                              args.n, args.rounds)
        print("\n| operation | single node µs | cluster µs | cluster / single |")
        print("|---|---:|---:|---:|")
        for op, by in table.items():
            print(f"| {op} | {_us(by['single'])} | {_us(by['cluster'])} | "
                  f"{by['cluster'] / by['single']:.2f}x |")
        floors = {"state.get": "redis-py GET (floor)", "state.set": "redis-py SET (floor)",
                  "state.incr": "redis-py INCR (floor)"}
        print("\n| operation | flexisync / redis-py, single node | "
              "flexisync / redis-py RedisCluster, cluster |")
        print("|---|---:|---:|")
        for op, floor in floors.items():
            print(f"| {op} | {table[op]['single'] / table[floor]['single']:.2f}x | "
                  f"{table[op]['cluster'] / table[floor]['cluster']:.2f}x |")
        promoted, recovered = failover(cluster, args.workers)
        print(f"\nmaster SIGKILLed under {args.workers} processes: replica promoted after "
              f"{promoted:.2f} s, every process working again after {recovered:.2f} s "
              "(cluster-node-timeout 1000 ms)")
    finally:
        cluster.stop()
        single.stop()
    print(f"\nload average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
          f"run took {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
