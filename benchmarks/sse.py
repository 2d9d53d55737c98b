"""SSE at scale: one uvicorn process serving N concurrent clients of one stream.

    .venv/bin/python benchmarks/sse.py [--url redis://localhost:6379/15]
                                       [--sizes 100,1000,5000] [--threadpool-sizes 100,1000]

For each N the server under test runs as its own process (``examples/sse_server.py``,
asyncio; and ``benchmarks/_sse_threadpool_app.py``, the example as it was before: a sync
generator per client on Starlette's thread pool). N lightweight clients (raw asyncio
sockets speaking HTTP/1.1 and parsing the chunked ``text/event-stream``; in one client
process per 2,500 clients) connect to ``/events``; once all are connected, this process
appends ``--events`` events to the stream directly in Redis, one every ``--every``
seconds, each carrying ``time.perf_counter()`` taken just before the append
(CLOCK_MONOTONIC, shared by every process on Linux). Each client notes the arrival time
of each event. Measured:

* Redis connections held by the server process: ``CLIENT LIST`` entries whose client
  address is one of the server process's own TCP sockets (found through
  ``/proc/<pid>/fd`` and ``/proc/net/tcp``), sampled after connecting and after the
  last event; the larger is reported.
* append -> client latency over every (client, event) delivery: p50, p99, max.
* reached: clients that received every event before the deadline.
* server CPU seconds (user + system) during the event phase.

Targets (issue 10): 5,000 clients on <= 4 Redis connections, p99 <= 250 ms on 2 cores.
Clients and server share the machine's cores; the load average is printed before and
after each run. One run per configuration; the last table gives the ratios.

``--micro N`` measures the library alone instead, without HTTP: N
``flexisync.aio.sse.event_stream`` generators of one stream in this process, each
iterated by its own task, while a thread appends the events. Reported: this process's
CPU per event (the reader's fetch, the fan-out, every generator's wake-up and frames),
per follower, and append -> frame latency p50/p99/max.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import multiprocessing
import os
import pathlib
import queue
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import redis

import flexisync
import flexisync.aio
from _common import pct, quiet_logs  # benchmarks/_common.py
from flexisync._core.followers import reader_of
from flexisync.aio.sse import event_stream
from flexisync.testing import delete_namespace, resolve_test_url

ROOT = pathlib.Path(__file__).resolve().parents[1]
ASYNCIO = "asyncio example"
THREADS = "thread-pool example"
SCRIPTS = {
    ASYNCIO: ROOT / "examples" / "sse_server.py",
    THREADS: ROOT / "benchmarks" / "_sse_threadpool_app.py",
}
CLIENTS_PER_PROCESS = 2_500
CONNECT_TIMEOUT = 120.0


def raise_fd_limit() -> int:
    """Raise this process's open-file limit to its hard limit (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = 1_048_576 if hard == resource.RLIM_INFINITY else hard
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


def server_stack() -> str:
    """Which event loop and HTTP parser uvicorn picks for the servers."""
    code = ("import importlib.util as u; print('uvloop' if u.find_spec('uvloop') else "
            "'asyncio', 'httptools' if u.find_spec('httptools') else 'h11')")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(SERVER_PATH)}
    found = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                           text=True, check=True).stdout.split()
    return " + ".join(found)


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def load() -> str:
    """The 1/5/15-minute load averages and the number of CPUs."""
    one, five, fifteen = os.getloadavg()
    return f"load {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} CPUs"


# --- the clients (own processes) ---------------------------------------------------------


async def _connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """GET /events; the connection once the response's 200 head has arrived."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /events HTTP/1.1\r\nHost: bench\r\n"
                 b"Accept: text/event-stream\r\n\r\n")
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        writer.close()
        raise ConnectionError(head.split(b"\r\n", 1)[0].decode())
    return reader, writer


async def _read(reader: asyncio.StreamReader, arrivals: dict[int, float]) -> None:
    """Note the latency of each event (by ``seq``) until the ``end`` event."""
    pending = b""
    while True:
        size = int((await reader.readline()).strip() or b"0", 16)  # chunked encoding
        if size == 0:
            return
        pending += (await reader.readexactly(size + 2))[:-2]
        *frames, pending = pending.split(b"\n\n")
        now = time.perf_counter()
        for frame in frames:
            for line in frame.split(b"\n"):
                if line.startswith(b"data: {"):
                    data = json.loads(line[6:])
                    if data.get("end"):
                        return
                    arrivals[data["seq"]] = now - data["t"]


async def _clients(port: int, n: int, control: Any, out: Any) -> None:
    connected = 0
    arrivals: list[dict[int, float]] = [{} for _ in range(n)]
    gate = asyncio.Semaphore(200)  # connect in waves, not in one SYN flood

    async def client(i: int) -> None:
        nonlocal connected
        async with gate:
            reader, writer = await _connect(port)
        connected += 1
        try:
            await _read(reader, arrivals[i])
        finally:
            writer.close()

    tasks = [asyncio.ensure_future(client(i)) for i in range(n)]
    deadline = time.monotonic() + CONNECT_TIMEOUT
    while (connected + sum(t.done() for t in tasks) < n) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    out.put(("connected", connected))
    stop_after = await asyncio.get_running_loop().run_in_executor(None, control.get)
    await asyncio.wait(tasks, timeout=stop_after)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    latencies = [value for per_client in arrivals for value in per_client.values()]
    counts = [len(per_client) for per_client in arrivals]
    slowest: dict[int, float] = {}  # per event: the latency of its last delivery here
    for per_client in arrivals:
        for seq, value in per_client.items():
            slowest[seq] = max(slowest.get(seq, 0.0), value)
    out.put(("result", latencies, counts, slowest))


def client_process(port: int, n: int, control: Any, out: Any) -> None:
    """Run ``n`` SSE clients of ``port``; report via ``out``, wait for ``control``."""
    raise_fd_limit()
    asyncio.run(_clients(port, n, control, out))


# --- the server under test --------------------------------------------------------------


def server_redis_ports(pid: int, redis_port: int) -> set[int]:
    """Local ports of ``pid``'s TCP sockets connected to ``redis_port``."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as rows:
            next(rows)
            for row in rows:
                cols = row.split()
                local, remote, inode = cols[1], cols[2], cols[9]
                if inode in inodes and int(remote.rsplit(":", 1)[1], 16) == redis_port:
                    ports.add(int(local.rsplit(":", 1)[1], 16))
    return ports


def redis_connections(raw: redis.Redis, pid: int, redis_port: int) -> dict[str, int]:
    """``CLIENT LIST`` entries that are connections of process ``pid``, counted by the
    last command each ran (``subscribe``, ``evalsha``, ``xrange``, ...)."""
    mine = server_redis_ports(pid, redis_port)
    by_command: dict[str, int] = {}
    for entry in raw.client_list():
        if int(str(entry["addr"]).rsplit(":", 1)[1]) in mine:
            by_command[str(entry["cmd"])] = by_command.get(str(entry["cmd"]), 0) + 1
    return by_command


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds used so far by process ``pid``."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Result:
    """One configuration's measurements."""

    app: str
    n: int
    connected: int = 0
    redis_connections: int = 0
    redis_commands: dict[str, int] = field(default_factory=dict)
    reached: int = 0
    latencies: list[float] = field(default_factory=list)
    slowest: dict[int, float] = field(default_factory=dict)
    cpu: float = 0.0
    load_before: str = ""
    load_after: str = ""

    def p(self, q: float) -> float | None:
        """The ``q`` quantile of the latencies in ms (None: nothing arrived)."""
        return pct(self.latencies, q) * 1e3 if self.latencies else None


#: Folders put first on the servers' PYTHONPATH (``--server-path``).
SERVER_PATH: list[str] = []


@contextlib.contextmanager
def serving(app: str, *, url: str, namespace: str, stream: str,
            library: pathlib.Path | None) -> Iterator[tuple[int, int]]:
    """``app`` serving ``stream`` in its own process: (pid, port); SIGTERM at exit.

    ``library``: a folder holding another ``flexisync`` package to run it with.
    """
    port = free_port()
    env = {**os.environ, "FLEXISYNC_URL": url}
    path = [*SERVER_PATH, *([str(library)] if library is not None else [])]
    if path:
        env["PYTHONPATH"] = os.pathsep.join(path)
    server = subprocess.Popen(
        [sys.executable, str(SCRIPTS[app.partition(" @")[0]]), "--port", str(port),
         "--namespace", namespace, "--stream", stream, "--produce", "0", "--heartbeat", "15"],
        env=env, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError(f"{app} did not start")
            time.sleep(0.05)
        yield server.pid, port
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(5)


def start_clients(port: int, n: int, out: Any) -> list[tuple[Any, Any]]:
    """Client processes (up to CLIENTS_PER_PROCESS clients each): (process, control)."""
    ctx = multiprocessing.get_context("spawn")
    sizes = [CLIENTS_PER_PROCESS] * (n // CLIENTS_PER_PROCESS)
    if n % CLIENTS_PER_PROCESS:
        sizes.append(n % CLIENTS_PER_PROCESS)
    procs = []
    for size in sizes:
        control = ctx.Queue()
        proc = ctx.Process(target=client_process, args=(port, size, control, out),
                           name="sse-clients", daemon=True)
        proc.start()
        procs.append((proc, control))
    return procs


def collect(out: Any, procs: list[tuple[Any, Any]], timeout: float) -> list[Any]:
    """One message from each client process; fails early if one of them died."""
    replies: list[Any] = []
    deadline = time.monotonic() + timeout
    while len(replies) < len(procs):
        try:
            replies.append(out.get(timeout=0.5))
        except queue.Empty:
            dead = [p.exitcode for p, _ in procs if p.exitcode not in (None, 0)]
            if dead or time.monotonic() > deadline:
                raise RuntimeError(f"client processes: exit codes {dead}, "
                                   f"{len(replies)}/{len(procs)} answered") from None
    return replies


def run(app: str, n: int, *, url: str, namespace: str, events: int, every: float,
        library: pathlib.Path | None = None) -> Result:
    """Serve ``n`` clients with ``app``, append ``events`` events; the measurements."""
    result = Result(app, n, load_before=load())
    stream_name = f"bench-{n}-{uuid.uuid4().hex[:6]}"  # a fresh stream: nothing to replay
    out = multiprocessing.get_context("spawn").Queue()
    raw = redis.Redis.from_url(url)
    redis_port = int(raw.connection_pool.connection_kwargs.get("port", 6379))
    with serving(app, url=url, namespace=namespace, stream=stream_name,
                 library=library) as (pid, port), \
            flexisync.connect(url, namespace=namespace) as sync:
        procs = start_clients(port, n, out)
        try:
            result.connected = sum(reply[1] for reply in collect(out, procs, CONNECT_TIMEOUT))
            connections = [redis_connections(raw, pid, redis_port)]
            stream = sync.stream(stream_name, maxlen=10_000)
            cpu_before = cpu_seconds(pid)
            for seq in range(events):
                stream.append({"seq": seq, "t": time.perf_counter()}, type="tick")
                time.sleep(every)
            stream.append({"end": True}, type="tick")
            connections.append(redis_connections(raw, pid, redis_port))
            for _, control in procs:
                control.put(10.0)  # the clients' deadline for the last deliveries
            for _, latencies, counts, slowest in collect(out, procs, 60):
                result.latencies += latencies
                for seq, value in slowest.items():
                    result.slowest[seq] = max(result.slowest.get(seq, 0.0), value)
                result.reached += sum(1 for c in counts if c == events)
            result.cpu = cpu_seconds(pid) - cpu_before
            result.redis_commands = max(connections, key=lambda c: sum(c.values()))
            result.redis_connections = sum(result.redis_commands.values())
        finally:
            for proc, _ in procs:
                proc.join(10)
                if proc.is_alive():
                    proc.kill()
            raw.close()
    result.load_after = load()
    return result


# --- in-process: the library's cost per event, without HTTP -----------------------------


async def _micro(url: str, namespace: str, n: int, events: int, every: float) -> None:
    name = f"micro-{n}-{uuid.uuid4().hex[:6]}"
    sent: list[float] = []
    latencies: list[float] = []
    counts = [0] * n

    async def client(i: int, frames: Any) -> None:
        async for frame in frames:
            ticks = frame.count("event: tick")
            if ticks:
                now = time.perf_counter()
                for seq in range(counts[i], counts[i] + ticks):
                    latencies.append(now - sent[seq])
                counts[i] += ticks
                if counts[i] >= events:
                    return

    async with flexisync.aio.connect(url, namespace=namespace) as sync:
        stream = sync.stream(name, maxlen=10_000)
        reader = reader_of(sync._ctx)
        tasks = [asyncio.ensure_future(client(i, event_stream(stream, None, heartbeat=15)))
                 for i in range(n)]
        while reader.followers().get(name, 0) < n:
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)  # every follower has replayed (nothing) and waits

        def produce() -> None:
            with flexisync.connect(url, namespace=namespace) as writer:
                log = writer.stream(name, maxlen=10_000)
                for seq in range(events):
                    time.sleep(every)
                    sent.append(time.perf_counter())
                    log.append({"seq": seq, "t": sent[-1]}, type="tick")

        collections = [g["collections"] for g in gc.get_stats()]
        cpu = time.process_time()
        wall = time.perf_counter()
        producer = asyncio.get_running_loop().run_in_executor(None, produce)
        await asyncio.wait_for(asyncio.gather(producer, *tasks), timeout=events * every + 60)
        cpu = time.process_time() - cpu
        wall = time.perf_counter() - wall
        collections = [g["collections"] - c for g, c in zip(gc.get_stats(), collections,
                                                             strict=True)]
    idle = events * every  # the producer's sleeps: the rest of the wall time is work
    print(f"{n} async event_stream generators, {events} events one every {every}s: "
          f"CPU {cpu / events * 1e3:.1f} ms per event "
          f"({cpu / events / n * 1e6:.1f} us per follower per event), "
          f"wall {wall - idle:.2f}s beyond the {idle:.1f}s of pauses; append -> frame "
          f"p50 {pct(latencies, 0.5) * 1e3:.1f} ms, p99 {pct(latencies, 0.99) * 1e3:.1f} ms, "
          f"max {max(latencies) * 1e3:.1f} ms; {len(latencies)}/{n * events} delivered; "
          f"garbage collections by generation {collections}; {load()}")


def micro(url: str, namespace: str, n: int, events: int, every: float) -> None:
    """Run :func:`_micro`: N in-process async SSE generators, CPU per event."""
    quiet_logs()
    asyncio.run(_micro(url, namespace, n, events, every))


def fmt(value: float | None, spec: str = ".1f") -> str:
    """``value`` formatted, or "-" when there is none."""
    return "-" if value is None else format(value, spec)


@contextlib.contextmanager
def library_at(rev: str | None) -> Iterator[pathlib.Path | None]:
    """The ``flexisync`` package as of git revision ``rev``, in a temporary folder
    (``git archive``; the checkout is left alone); None without a revision."""
    if not rev:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="flexisync-baseline-") as folder:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "flexisync"],
                                 check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", folder], input=archive, check=True)
        yield pathlib.Path(folder)


def print_table(results: list[Result]) -> None:
    """The measurements, then the ratios to the thread-pool example at the same N."""
    print(f"{'server':<30} {'N':>5} {'connected':>9} {'reached':>7} {'redis conns':>11} "
          f"{'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'cpu s':>6}")
    for r in results:
        worst = max(r.latencies) * 1e3 if r.latencies else None
        print(f"{r.app:<30} {r.n:>5} {r.connected:>9} {r.reached:>7} "
              f"{r.redis_connections:>11} {fmt(r.p(0.5)):>8} {fmt(r.p(0.99)):>8} "
              f"{fmt(worst):>8} {r.cpu:>6.2f}")
    print("\nratios, thread-pool example / asyncio example at the same N "
          "(> 1: the asyncio example is better by that factor; reached: asyncio / thread-pool)")
    mine = {r.n: r for r in results if r.app == ASYNCIO}
    for theirs in (r for r in results if r.app.startswith(THREADS) and r.n in mine):
        ours = mine[theirs.n]
        ratios = [f"redis conns {theirs.redis_connections / max(ours.redis_connections, 1):.1f}x"]
        for q, label in ((0.5, "p50"), (0.99, "p99")):
            a, b = ours.p(q), theirs.p(q)
            ratios.append(f"{label} {b / a:.1f}x" if a and b is not None else f"{label} -")
        ratios.append(f"reached {ours.reached}/{theirs.reached}")
        print(f"  {theirs.app} N={theirs.n}: " + ", ".join(ratios))
    if mine:
        big = mine[max(mine)]
        print(f"\ntarget at N={big.n}: <= 4 Redis connections (got {big.redis_connections}), "
              f"p99 <= 250 ms (got {fmt(big.p(0.99))}), every client reached "
              f"({big.reached}/{big.n})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default=os.environ.get("FLEXISYNC_TEST_URL") or None)
    parser.add_argument("--sizes", default="100,1000,5000",
                        help="client counts for the asyncio example")
    parser.add_argument("--threadpool-sizes", default="100,1000",
                        help="client counts for the thread-pool example")
    parser.add_argument("--baseline-rev", default=None,
                        help="also run the thread-pool example on flexisync as of this git "
                             "revision (e.g. the last commit before the asyncio work)")
    parser.add_argument("--events", type=int, default=20)
    parser.add_argument("--every", type=float, default=0.5, help="seconds between appends")
    parser.add_argument("--server-path", default="",
                        help="a folder put first on the servers' PYTHONPATH, e.g. one "
                             "holding uvloop and httptools (what uvicorn[standard] adds; "
                             "uvicorn uses them when it finds them): "
                             "pip install --target DIR uvloop httptools")
    parser.add_argument("--micro", type=int, default=0, metavar="N",
                        help="only the in-process measurement: N async event_stream "
                             "generators, no HTTP (see the module docstring)")
    args = parser.parse_args()
    if args.server_path:
        SERVER_PATH.append(str(pathlib.Path(args.server_path).resolve()))
    limit = raise_fd_limit()
    url, embedded = resolve_test_url(args.url or None)
    namespace = f"bench-sse-{uuid.uuid4().hex[:8]}"
    raw = redis.Redis.from_url(url)
    if args.micro:
        try:
            micro(url, namespace, args.micro, args.events, args.every)
        finally:
            delete_namespace(raw, namespace)
            raw.close()
            if embedded is not None:
                embedded.stop()
        return 0
    threadpool_sizes = [int(n) for n in args.threadpool_sizes.split(",") if n]
    plan: list[tuple[str, int, bool]] = [(ASYNCIO, int(n), False)
                                         for n in args.sizes.split(",")]
    plan += [(THREADS, n, False) for n in threadpool_sizes]
    if args.baseline_rev:
        plan += [(f"{THREADS} @{args.baseline_rev}", n, True) for n in threadpool_sizes]
    print(f"{load()}; fd limit {limit}; {args.events} events, one every {args.every}s; "
          f"servers' extra path: {SERVER_PATH or 'none'} ({server_stack()})")
    results: list[Result] = []
    try:
        with library_at(args.baseline_rev) as baseline:
            for app, n, old in plan:
                result = run(app, n, url=url, namespace=namespace, events=args.events,
                             every=args.every, library=baseline if old else None)
                results.append(result)
                print(f"  {app:<30} N={n:>5}: {result.load_before} -> {result.load_after}; "
                      f"server's Redis connections by last command: {result.redis_commands}",
                      flush=True)
                slowest = " ".join(f"{result.slowest[seq] * 1e3:.0f}"
                                   for seq in sorted(result.slowest))
                print(f"    ms to the last client, event by event: {slowest}", flush=True)
    finally:
        delete_namespace(raw, namespace)
        raw.close()
        if embedded is not None:
            embedded.stop()
    print()
    print_table(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
