"""Events and streams next to raw redis-py on the same server, in one run.

    .venv/bin/python benchmarks/events.py [--url redis://localhost:6379/15] [--n 20000]

Measured (flexisync and raw redis-py alternate round by round, so a noisy neighbour hits
both alike; the table reports the median round):

* publish -> callback latency in another process, p50 / p99: one event every 0.5 ms,
  the subscriber process records ``perf_counter()`` on arrival (CLOCK_MONOTONIC is
  shared by all processes on Linux) minus the publish time carried in the event.
  Raw: a redis-py ``PubSub.listen()`` loop decoding the same JSON.
* end-to-end throughput: one process publishes N events back to back, another receives
  them; events/s from the first publish to the last arrival.
* flat-out to N subscriber processes (``--procs``, default 2 and 8): each process
  receives every event (a callback subscription; raw: a ``PubSub.listen()`` loop doing
  ``json.loads``), the publisher publishes ``--fanout-n`` events as fast as it can;
  events/s of the slowest subscriber, from the first publish to its last arrival.
* stream append (``XADD MAXLEN ~``) and ``read_after`` in pages of 100, next to raw
  ``XADD`` (encoding the same JSON payload and timestamp) / ``XRANGE (id + COUNT 100``
  (plus ``json.loads`` of each payload, which any reader needs; flexisync also checks
  for trimming in the same round trip and builds ``Event`` objects).

Targets (DESIGN.md §3): p99 <= 2 ms; throughput >= 80 % of raw pub/sub.
Only keys and channels under a fresh namespace are used; the keys are deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import time
import uuid
from collections.abc import Callable
from typing import Any

import redis

import flexisync
from _common import pct, per_op_us  # benchmarks/_common.py
from flexisync.testing import DEFAULT_TEST_URL, delete_namespace, resolve_test_url

WAIT = 60.0


# --- subscriber processes ---------------------------------------------------------------


def flexisync_subscriber(url: str, namespace: str, topic: str, *, n: int, ready: Any,
                         out: Any) -> None:
    """Receive n events (+ an 'end' event) with a callback; report arrival data."""
    import threading

    latencies: list[float] = []
    done = threading.Event()
    stamps: list[float] = []

    def callback(event: flexisync.Event) -> None:
        now = time.perf_counter()
        if event.type == "end":
            stamps.append(now)
            done.set()
            return
        latencies.append(now - event.data["t"])

    with flexisync.connect(url, namespace=namespace) as sync:
        sub = sync.events.subscribe(topic, callback, maxsize=n + 10)
        ready.set()
        done.wait(WAIT)
        out.put((latencies, stamps[0] if stamps else None, sub.stats.dropped))


def raw_subscriber(url: str, channel: str, n: int, ready: Any, out: Any) -> None:
    """The same with redis-py's PubSub.listen() on the main thread."""
    del n
    client = redis.Redis.from_url(url, protocol=2)
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(channel)
    pubsub.get_message(timeout=5)  # the subscribe confirmation
    ready.set()
    latencies: list[float] = []
    last = None
    for message in pubsub.listen():
        now = time.perf_counter()
        doc = json.loads(message["data"])
        if doc.get("end"):
            last = now
            break
        latencies.append(now - doc["t"])
    pubsub.close()
    client.close()
    out.put((latencies, last, 0))


# --- measurements ---------------------------------------------------------------------


def run_pubsub(ctx: Any, *, flexi: bool, url: str, namespace: str, n: int,
               pace: float) -> tuple[list[float], float]:
    """One round: (latencies in s, events/s). ``pace`` > 0 spaces the publishes."""
    ready, out = ctx.Event(), ctx.Queue()
    topic = f"bench-{uuid.uuid4().hex[:6]}"
    if flexi:
        proc = ctx.Process(target=flexisync_subscriber, args=(url, namespace, topic),
                           kwargs={"n": n, "ready": ready, "out": out})
    else:
        proc = ctx.Process(target=raw_subscriber,
                           args=(url, f"{namespace}:raw:{topic}", n, ready, out))
    proc.start()
    if not ready.wait(WAIT):
        raise RuntimeError("subscriber did not start")
    publish: Callable[[dict[str, Any]], object]
    if flexi:
        sync = flexisync.connect(url, namespace=namespace)
        publish = lambda d: sync.events.publish(topic, d, type="end" if "end" in d else "m")  # noqa: E731
    else:
        raw = redis.Redis.from_url(url, protocol=2)
        channel = f"{namespace}:raw:{topic}"
        publish = lambda d: raw.publish(channel, json.dumps(d))  # noqa: E731
    perf = time.perf_counter
    start = perf()
    for _ in range(n):
        publish({"t": perf()})
        if pace:
            until = perf() + pace
            while perf() < until:
                pass
    publish({"end": True})
    latencies, last, dropped = out.get(timeout=WAIT)
    proc.join(WAIT)
    if flexi:
        sync.close()
    else:
        raw.close()
    if dropped:
        print(f"  (flexisync subscriber dropped {dropped} events)")
    rate = len(latencies) / (last - start) if last else 0.0
    return latencies, rate


def _flat_out(*, flexi: bool, url: str, namespace: str, topic: str, n: int) -> float:
    """Publish ``n`` events back to back, then an ``end`` event; when the first left."""
    perf = time.perf_counter
    if flexi:
        with flexisync.connect(url, namespace=namespace) as sync:
            publish = sync.events.publish
            start = perf()
            for _ in range(n):
                publish(topic, {"t": perf()}, type="m")
            publish(topic, {"end": True}, type="end")
        return start
    raw = redis.Redis.from_url(url, protocol=2)
    send, dumps, channel = raw.publish, json.dumps, f"{namespace}:raw:{topic}"
    start = perf()
    for _ in range(n):
        send(channel, dumps({"t": perf()}))
    send(channel, dumps({"end": True}))
    raw.close()
    return start


def run_fanout(ctx: Any, *, flexi: bool, url: str, namespace: str, n: int,
               procs: int) -> float:
    """One flat-out round to ``procs`` subscriber processes, each receiving every event.

    The publisher sends ``n`` events back to back (then an ``end`` event); the result is
    the rate of the slowest subscriber: events it received / (its last arrival - first
    publish), in events/s.
    """
    topic = f"bench-{uuid.uuid4().hex[:6]}"
    channel = f"{namespace}:raw:{topic}"
    out = ctx.Queue()
    readies, workers = [], []
    for _ in range(procs):
        ready = ctx.Event()
        if flexi:
            proc = ctx.Process(target=flexisync_subscriber, args=(url, namespace, topic),
                               kwargs={"n": n, "ready": ready, "out": out})
        else:
            proc = ctx.Process(target=raw_subscriber, args=(url, channel, n, ready, out))
        proc.start()
        readies.append(ready)
        workers.append(proc)
    for ready in readies:
        if not ready.wait(WAIT):
            raise RuntimeError("subscriber did not start")
    start = _flat_out(flexi=flexi, url=url, namespace=namespace, topic=topic, n=n)
    rates = []
    for _ in range(procs):
        latencies, last, _dropped = out.get(timeout=WAIT)
        rates.append(len(latencies) / (last - start) if last else 0.0)
    for proc in workers:
        proc.join(WAIT)
    return min(rates)


Row = tuple[str, float, float, str]


def pubsub_rows(ctx: Any, args: argparse.Namespace, url: str, namespace: str) -> list[Row]:
    """Latency p50/p99 and end-to-end throughput to one subscriber process."""
    lat: dict[bool, list[list[float]]] = {True: [], False: []}
    rate: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(args.rounds):
        for flexi in (True, False):
            samples, _ = run_pubsub(ctx, flexi=flexi, url=url, namespace=namespace,
                                    n=args.latency_n, pace=0.0005)
            lat[flexi].append(samples)
            _, per_s = run_pubsub(ctx, flexi=flexi, url=url, namespace=namespace,
                                  n=args.n, pace=0.0)
            rate[flexi].append(per_s)
    rows: list[Row] = []
    for label, q in (("publish -> callback p50 (ms)", 0.50),
                     ("publish -> callback p99 (ms)", 0.99)):
        mine = statistics.median(pct(s, q) for s in lat[True]) * 1e3
        base = statistics.median(pct(s, q) for s in lat[False]) * 1e3
        rows.append((label, mine, base, "lower is better"))
    rows.append(("pub/sub throughput (events/s)", statistics.median(rate[True]),
                 statistics.median(rate[False]), "higher is better"))
    return rows


def fanout_rows(ctx: Any, args: argparse.Namespace, url: str, namespace: str) -> list[Row]:
    """Flat-out throughput to each count of subscriber processes in ``--procs``."""
    rows: list[Row] = []
    for count in [int(p) for p in args.procs.split(",") if p.strip()]:
        fan: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(args.rounds):
            for flexi in (True, False):
                fan[flexi].append(run_fanout(ctx, flexi=flexi, url=url, namespace=namespace,
                                             n=args.fanout_n, procs=count))
        rows.append((f"flat-out to {count} subscriber processes (events/s, slowest)",
                     statistics.median(fan[True]), statistics.median(fan[False]),
                     "higher is better"))
    return rows


def stream_rows(raw: redis.Redis, args: argparse.Namespace, url: str,
                namespace: str) -> list[Row]:
    """Stream append and read_after next to raw XADD / XRANGE + json."""
    with flexisync.connect(url, namespace=namespace) as sync:
        stream = sync.stream("bench", maxlen=100_000)
        raw_key = f"{namespace}:raw-stream"
        fields = {"type": "m", "data": json.dumps({"line": "x" * 40}),
                  "time": repr(time.time()), "source": "host:1"}
        data = {"line": "x" * 40}
        appends = args.appends
        ours_append, raw_append, ours_read, raw_read = [], [], [], []
        for _ in range(args.rounds):
            stream.delete()
            raw.delete(raw_key)
            ours_append.append(per_op_us(lambda: stream.append(data), appends))
            raw_append.append(per_op_us(
                lambda: raw.xadd(raw_key, {**fields, "data": json.dumps(data),
                                           "time": repr(time.time())},
                                 maxlen=100_000, approximate=True),
                appends))
            ours_read.append(_read_pages_us(lambda a: stream.read_after(a, count=100),
                                            lambda e: e.id, stream.read_after(count=1)[0].id))
            first = raw.xrange(raw_key, count=1)[0][0].decode()
            raw_read.append(_read_pages_us(
                lambda a: _raw_page(raw, raw_key, a), lambda e: e[0].decode(), first))
    return [("stream append (µs/event)", statistics.median(ours_append),
             statistics.median(raw_append), "lower is better"),
            ("stream read_after, pages of 100 (µs/event; raw = XRANGE + json)",
             statistics.median(ours_read), statistics.median(raw_read), "lower is better")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default=os.environ.get("FLEXISYNC_TEST_URL") or None)
    parser.add_argument("--n", type=int, default=20_000, help="events per throughput round")
    parser.add_argument("--latency-n", type=int, default=2_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--fanout-n", type=int, default=10_000,
                        help="events per flat-out round to N subscriber processes")
    parser.add_argument("--procs", default="2,8",
                        help="subscriber process counts for the flat-out rows")
    parser.add_argument("--appends", type=int, default=5_000,
                        help="stream appends per round (read_after pages through them)")
    parser.add_argument("--only", choices=("pubsub", "fanout", "streams"), action="append",
                        help="run only these groups of rows (repeatable; default: all)")
    args = parser.parse_args()
    groups = args.only or ["pubsub", "fanout", "streams"]
    url, server = resolve_test_url(args.url or None)
    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    ctx = multiprocessing.get_context("spawn")
    raw = redis.Redis.from_url(url, protocol=2)
    rows: list[Row] = []
    try:
        if "pubsub" in groups:
            rows += pubsub_rows(ctx, args, url, namespace)
        if "fanout" in groups:
            rows += fanout_rows(ctx, args, url, namespace)
        if "streams" in groups:
            rows += stream_rows(raw, args, url, namespace)
    finally:
        delete_namespace(raw, namespace)
        raw.close()
        if server is not None:
            server.stop()

    where = "local Redis" if url == DEFAULT_TEST_URL else url
    print(f"\nEvents and streams vs raw redis-py on {where} "
          f"({args.rounds} rounds, median round; latency n={args.latency_n}, "
          f"throughput n={args.n}, flat-out n={args.fanout_n}; load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())})\n")
    print("| measurement | flexisync | raw redis-py | flexisync / raw | |")
    print("|---|---:|---:|---:|---|")
    for label, mine, base, note in rows:
        print(f"| {label} | {mine:,.3f} | {base:,.3f} | {mine / base:.2f} | {note} |")
    return 0


def _raw_page(raw: redis.Redis, key: str, after: str) -> list[Any]:
    """One raw XRANGE page, with the JSON payloads decoded as any reader must."""
    page = raw.xrange(key, "(" + after, "+", count=100)
    for _id, fields in page:
        json.loads(fields[b"data"])
    return page


def _read_pages_us(read: Callable[[str], list[Any]], id_of: Callable[[Any], str],
                   after: str) -> float:
    """µs per event to page through the whole stream after ``after``, 100 at a time."""
    count = 0
    start = time.perf_counter()
    while True:
        page = read(after)
        if not page:
            break
        count += len(page)
        after = id_of(page[-1])
    return (time.perf_counter() - start) / max(count, 1) * 1e6


if __name__ == "__main__":
    raise SystemExit(main())
