"""StateStore get/set/update latency next to raw redis-py GET/SET, same server, one run.

    .venv/bin/python benchmarks/state.py [--url redis://localhost:6379/15] [--n 5000]

Each operation runs in several interleaved rounds (flexisync and raw alternate, so a
noisy neighbour hits both alike); the table reports the median round's µs per
operation and flexisync's ratio to raw. Target (DESIGN.md §3): get/set within 1.15x of
raw (flexisync's get also decodes the JSON and checks it; raw GET returns bytes).
Only keys under a fresh namespace are written, and they are deleted at the end.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import uuid
from collections.abc import Callable

import redis

import flexisync
from _common import per_op_us  # benchmarks/_common.py
from flexisync._codec import dumps
from flexisync.testing import DEFAULT_TEST_URL, delete_namespace, resolve_test_url

VALUE = {"healthy": False, "latency_ms": 812.5, "model": "gpt-4o-mini"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default=os.environ.get("FLEXISYNC_TEST_URL") or None)
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    url, server = resolve_test_url(args.url or None)
    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    raw = redis.Redis.from_url(url, protocol=2)
    try:
        with flexisync.connect(url, namespace=namespace) as sync:
            store = sync.state("bench")
            raw_key = f"{namespace}:raw"
            encoded = dumps(VALUE)
            store.set("k", VALUE)
            raw.set(raw_key, encoded)
            cases: list[tuple[str, Callable[[], object], Callable[[], object]]] = [
                ("get", lambda: store.get("k"), lambda: raw.get(raw_key)),
                ("set", lambda: store.set("k", VALUE), lambda: raw.set(raw_key, encoded)),
                ("set with ttl", lambda: store.set("k", VALUE, ttl=60.0),
                 lambda: raw.set(raw_key, encoded, px=60_000)),
                ("incr", lambda: store.incr("n"), lambda: raw.incr(raw_key + "n")),
                ("update (GET + CAS script)", lambda: store.update("u", _bump, default=0),
                 lambda: (raw.get(raw_key), raw.set(raw_key, encoded))),
            ]
            rows = []
            for name, ours, theirs in cases:
                per_op_us(ours, 200)
                per_op_us(theirs, 200)  # warm up connections and scripts
                mine, base = [], []
                for _ in range(args.rounds):
                    mine.append(per_op_us(ours, args.n))
                    base.append(per_op_us(theirs, args.n))
                rows.append((name, statistics.median(mine), statistics.median(base)))
    finally:
        delete_namespace(raw, namespace)
        raw.close()
        if server is not None:
            server.stop()
    print(f"\nStateStore vs raw redis-py on {url if url != DEFAULT_TEST_URL else 'local Redis'}"
          f" (n={args.n} x {args.rounds} rounds, median round; load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())})\n")
    print("| operation | flexisync µs/op | raw redis-py µs/op | ratio |")
    print("|---|---:|---:|---:|")
    for name, mine_us, raw_us in rows:
        baseline = "GET + SET" if name.startswith("update") else "same command"
        print(f"| {name} | {mine_us:.1f} | {raw_us:.1f} ({baseline}) | {mine_us / raw_us:.2f}x |")
    return 0


def _bump(value: int) -> int:
    return value + 1


if __name__ == "__main__":
    sys.exit(main())
