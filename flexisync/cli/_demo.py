"""``flexisync demo``: a small fleet of workers sharing every flexisync primitive.

The parent process spawns N workers and narrates what they report:

* every worker calls a simulated LLM provider through one shared **circuit breaker**
  ("llm"); whether the provider is up is a value in a shared **state** store that the
  parent flips, so the outage hits every worker at once;
* the parent announces each phase on the **event bus** (topic ``demo.control``) and each
  worker counts the announcements it heard;
* when asked, every worker tries to run the "nightly-report" job; a **lock** lets exactly
  one of them run it (and a state record makes a late worker skip a finished job);
* workers report what they see by appending to a durable **stream** ("demo-log") that
  the parent follows and prints.

Everything lives under a namespace of its own, deleted at the end. With no ``--url``
and nothing in ``FLEXISYNC_URL`` it runs against a throwaway ``redis-server``.

Only the parent prints. Workers report through the stream, and the parent's narration
goes through one printer that orders lines by the time they describe: a line waits
:data:`HOLD` seconds for reports of earlier moments still on their way, so the output
reads in the order things happened, and everything is printed before the summary.
With ``--json`` the narration goes to stderr and stdout holds one JSON document, the
summary.
"""

from __future__ import annotations

import argparse
import contextlib
import heapq
import itertools
import logging
import multiprocessing
import os
import queue
import random
import sys
import threading
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, TextIO

import structlog

from flexisync import embedded
from flexisync.cli._common import EXIT_OK, EXIT_PROBLEM, error, print_json
from flexisync.coordinator import Coordinator, connect
from flexisync.errors import CircuitOpenError, FlexiSyncError

__all__ = ["run_demo", "worker_main"]

BREAKER = "llm"
POLICY: dict[str, Any] = {"failure_threshold": 3, "recovery_timeout": 1.0,
                          "max_recovery_timeout": 2.0, "half_open_max_calls": 1}
JOB = "nightly-report"
LOG = "demo-log"
TOPIC = "demo.control"
CALL_INTERVAL = 0.1  # seconds between two provider calls of one worker
PHASE_TIMEOUT = 20.0  # hang guard for each phase (seconds)
HOLD = 0.3  # seconds a narration line waits for reports of earlier moments


class ProviderError(Exception):
    """The simulated provider answered 503."""


# --- the worker process ----------------------------------------------------------------


def worker_main(url: str, namespace: str, index: int) -> None:
    """One demo worker: call the provider through the breaker until told to stop."""
    _quiet_logs()
    with contextlib.suppress(KeyboardInterrupt), connect(url, namespace=namespace) as sync:
        _Worker(sync, index).run()


class _Worker:
    def __init__(self, sync: Coordinator, index: int) -> None:
        self.sync = sync
        self.index = index
        self.log = sync.stream(LOG, maxlen=100_000)
        self.state = sync.state("demo")
        self.breaker = sync.breaker(BREAKER, **POLICY)
        self.changes: queue.Queue[tuple[str, str, float]] = queue.Queue()
        self.breaker.on_state_change(
            lambda _name, old, new: self.changes.put((old, new, time.time())))
        self.inbox = sync.events.subscribe(TOPIC)
        self.heard = 0
        self.outcomes: Counter[str] = Counter()

    def report(self, kind: str, **data: Any) -> None:
        self.log.append({"worker": self.index, "pid": os.getpid(), **data}, type=kind)

    def run(self) -> None:
        self.report("ready")
        stopping = False
        while not stopping:
            while (event := self.inbox.get(timeout=0)) is not None:
                self.heard += 1
                if event.type == "job.run":
                    self.run_job(str(event.data))
                elif event.type == "demo.stop":
                    stopping = True
            while not self.changes.empty():
                old, new, at = self.changes.get_nowait()
                self.report("saw", old=old, new=new, at=at)
            if not stopping:
                self.call_provider()
                time.sleep(CALL_INTERVAL * random.uniform(0.7, 1.3))
        self.report("done", heard=self.heard, outcomes=dict(self.outcomes))
        self.inbox.close()

    def call_provider(self) -> None:
        # A call admitted while this worker's mirror says "not closed" is a probe.
        probing = self.breaker.state != "closed"
        extra: dict[str, Any] = {}
        try:
            self.breaker.call(self.complete, "Summarise the incident report")
        except CircuitOpenError as exc:
            outcome, probing = "rejected", False
            extra["retry_after"] = exc.retry_after
        except ProviderError as exc:
            outcome = "failed"
            extra["error"] = str(exc)
        else:
            outcome = "ok"
        self.outcomes[outcome] += 1
        self.report("call", outcome=outcome, probe=probing, **extra)

    def complete(self, prompt: str) -> str:
        """The simulated LLM provider: fails while the shared state says it is down."""
        if self.state.get("provider") == "down":
            raise ProviderError("503 Service Unavailable")
        return f"summary of {prompt!r}"

    def run_job(self, run: str) -> None:
        lock = self.sync.lock(JOB, ttl=10.0)
        if not lock.acquire(blocking=False):
            self.report("job", result="skipped", reason="the lock is held by another worker")
            return
        try:
            done = self.state.get(f"job:{run}")
            if done is not None:
                self.report("job", result="skipped",
                            reason=f"already done by worker {done['worker']}")
                return
            token = lock.fencing_token
            self.report("job", result="started", token=token)
            time.sleep(0.3)  # the work itself
            self.state.set(f"job:{run}", {"worker": self.index, "token": token}, ttl=600)
            self.report("job", result="finished", token=token)
        finally:
            lock.release()


# --- the parent: narration -------------------------------------------------------------


@dataclass
class _Tally:
    """What the parent learned from the workers' reports."""

    workers: int
    start: float
    ready: set[int] = field(default_factory=set)
    pids: set[int] = field(default_factory=set)
    done: dict[int, dict[str, Any]] = field(default_factory=dict)
    last_outcome: dict[int, str] = field(default_factory=dict)
    outcomes: Counter[str] = field(default_factory=Counter)
    sightings: dict[tuple[str, int], dict[int, float]] = field(
        default_factory=lambda: defaultdict(dict))
    seen_count: dict[tuple[int, str], int] = field(default_factory=Counter)
    fleet: list[str] = field(default_factory=list)
    job_runs: list[tuple[int, int | None]] = field(default_factory=list)
    job_skips: int = 0
    job_finished: int = 0
    failure: str | None = None
    changed: threading.Condition = field(default_factory=threading.Condition)


class _Printer:
    """Prints ``[elapsed] message`` lines in the order of the moments they describe.

    A line is held until :data:`HOLD` seconds after its moment, so a report of an
    earlier moment that arrives meanwhile (a worker's, through the stream) is printed
    first. ``close()`` prints whatever is left, in order, and stops the thread.
    """

    def __init__(self, start: float, out: TextIO, hold: float = HOLD) -> None:
        self.start = start
        self.out = out
        self.hold = hold
        self._lines: list[tuple[float, int, str]] = []
        self._order = itertools.count()
        self._changed = threading.Condition()
        self._closed = False
        self._last = start
        self._thread = threading.Thread(target=self._run, name="flexisync-demo-printer",
                                        daemon=True)
        self._thread.start()

    def add(self, message: str, at: float) -> None:
        with self._changed:
            heapq.heappush(self._lines, (at, next(self._order), message))
            self._changed.notify()

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify()
        self._thread.join(timeout=5.0)
        with self._changed:  # the thread printed everything unless it was stuck
            self._flush(until=None)

    def _run(self) -> None:
        with self._changed:
            while not self._closed:
                due = self._lines[0][0] + self.hold if self._lines else None
                now = time.time()
                if due is not None and due <= now:
                    self._flush(until=now - self.hold)
                    continue
                self._changed.wait(None if due is None else due - now)
            self._flush(until=None)

    def _flush(self, until: float | None) -> None:
        """Print held lines up to moment ``until`` (all when None); caller holds the lock."""
        while self._lines and (until is None or self._lines[0][0] <= until):
            at, _, message = heapq.heappop(self._lines)
            at = max(at, self._last)  # a report later than HOLD keeps its place in line
            self._last = at
            print(f"[{at - self.start:6.2f}s] {message}", file=self.out, flush=True)


class _Narrator:
    def __init__(self, workers: int, out: TextIO) -> None:
        self.tally = _Tally(workers=workers, start=time.time())
        self.printer = _Printer(self.tally.start, out)

    def say(self, message: str, at: float | None = None) -> None:
        self.printer.add(message, at if at is not None else time.time())

    def on_report(self, event: Any) -> None:
        tally, data = self.tally, event.data
        worker = int(data.get("worker", 0))
        with tally.changed:
            self._handle(event.type, worker, data, event.time)
            tally.changed.notify_all()

    def _handle(self, kind: str, worker: int, data: dict[str, Any], at: float) -> None:
        handler = {"ready": self._ready, "call": self._call, "saw": self._saw,
                   "job": self._job, "done": self._done}.get(kind)
        if handler is not None:
            handler(worker, data, at)

    def _ready(self, worker: int, data: dict[str, Any], at: float) -> None:
        tally = self.tally
        tally.ready.add(worker)
        tally.pids.add(int(data["pid"]))
        if len(tally.ready) == tally.workers:
            self.say(f"all {tally.workers} workers ready (pids "
                     f"{', '.join(str(p) for p in sorted(tally.pids))})", at)

    def _call(self, worker: int, data: dict[str, Any], at: float) -> None:
        tally = self.tally
        outcome = data["outcome"]
        tally.outcomes[outcome] += 1
        previous = tally.last_outcome.get(worker)
        tally.last_outcome[worker] = outcome
        if outcome == previous and not data.get("probe"):
            return  # narrate changes only, and every probe
        probe = data.get("probe")
        if outcome == "ok":
            message = "called the provider: ok" + (" (the probe succeeded)" if probe else "")
        elif outcome == "failed":
            message = (f"called the provider: {data['error']}"
                       + (" (the probe failed)" if probe else ""))
        else:
            message = ("rejected without calling the provider (retry in "
                       f"{data['retry_after']:.2f}s)")
        self.say(f"worker {worker} {message}", at)

    def _saw(self, worker: int, data: dict[str, Any], _at: float) -> None:
        tally = self.tally
        new = data["new"]
        count = tally.seen_count[(worker, new)] = tally.seen_count[(worker, new)] + 1
        seen = tally.sightings[(new, count)]
        seen[worker] = float(data["at"])
        if len(seen) == tally.workers:
            # Stamped when the last report arrived, which is after the parent's own
            # "*** breaker" line for the same transition.
            spread = (max(seen.values()) - min(seen.values())) * 1000
            self.say(f"every worker saw the breaker turn {new} "
                     f"(within {spread:.1f} ms of each other)")

    def _job(self, worker: int, data: dict[str, Any], at: float) -> None:
        tally = self.tally
        result = data["result"]
        if result == "started":
            tally.job_runs.append((worker, data.get("token")))
            self.say(f"worker {worker} took lock {JOB!r} (fencing token {data['token']}) "
                     "and runs the job", at)
        elif result == "finished":
            tally.job_finished += 1
            self.say(f"worker {worker} finished the job and released the lock", at)
        else:
            tally.job_skips += 1
            self.say(f"worker {worker} skipped the job: {data['reason']}", at)

    def _done(self, worker: int, data: dict[str, Any], _at: float) -> None:
        self.tally.done[worker] = data

    def on_fleet_change(self, _name: str, old: str, new: str) -> None:
        with self.tally.changed:
            self.tally.fleet.append(new)
            self.tally.changed.notify_all()
        note = {"open": "the fleet stops calling the provider",
                "half_open": "one probe call is admitted for the whole fleet",
                "closed": "the fleet calls the provider again"}.get(new, "")
        self.say(f"*** breaker {BREAKER!r}: {old} -> {new.upper()}"
                 + (f": {note}" if note else ""))

    def wait(self, what: str, predicate: Any, timeout: float = PHASE_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        with self.tally.changed:
            while not predicate(self.tally):
                if self.tally.failure is not None:
                    raise _DemoStuck(f"reading the workers' reports failed: "
                                     f"{self.tally.failure}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise _DemoStuck(f"{what} did not happen within {timeout:.0f}s")
                self.tally.changed.wait(min(remaining, 0.2))


class _DemoStuck(Exception):
    pass


def _follow(sync: Coordinator, narrator: _Narrator, stop: threading.Event) -> None:
    stream = sync.stream(LOG, maxlen=100_000)
    after: str | None = None
    try:
        while not stop.is_set():
            for event in stream.follow(after, timeout=0.2):
                after = event.id
                narrator.on_report(event)
    except FlexiSyncError as exc:
        with narrator.tally.changed:
            narrator.tally.failure = str(exc)
            narrator.tally.changed.notify_all()


def run_demo(args: argparse.Namespace) -> int:
    """Run the demo; 0 when the fleet opened and recovered together and the job ran once.

    Raises:
        BackendUnavailable: the given Redis does not answer.
    """
    out = sys.stderr if args.json else sys.stdout
    url = args.url or os.environ.get("FLEXISYNC_URL")
    server = None
    print(f"flexisync demo: {args.workers} worker processes share one circuit breaker, "
          "one lock, a state store, events and a stream.", file=out, flush=True)
    if not url:
        try:
            server = embedded.start()
        except embedded.EmbeddedRedisError as exc:
            error(f"{exc} (or pass --url / set FLEXISYNC_URL)")
            return EXIT_PROBLEM
        url = server.url
        print(f"No --url and no FLEXISYNC_URL: started a throwaway {server.name} at {url} "
              f"({server.binary}; stopped at the end).", file=out, flush=True)
    namespace = f"{args.namespace}-demo-{uuid.uuid4().hex[:8]}"
    try:
        with connect(url, namespace=namespace) as sync:
            print(f"Redis: {sync.url}, namespace {namespace!r} (deleted at the end)",
                  file=out, flush=True)
            sync.ping()
            try:
                summary = _run(sync, url, namespace, args.workers, out)
            finally:
                _delete_namespace(sync)
    finally:
        if server is not None:
            server.stop()
    if summary is None:
        return EXIT_PROBLEM
    if args.json:
        print_json(summary)
    else:
        print("\n".join(_summary_lines(summary)), flush=True)
    return EXIT_OK if summary["ok"] else EXIT_PROBLEM


def _run(sync: Coordinator, url: str, namespace: str, workers: int,
         out: TextIO) -> dict[str, Any] | None:
    """Run the fleet through its phases, narrating to ``out``; the summary, or None
    when the demo got stuck (already reported)."""
    narrator = _Narrator(workers, out)
    state = sync.state("demo")
    state.set("provider", "up")
    breaker = sync.breaker(BREAKER, **POLICY)
    breaker.on_state_change(narrator.on_fleet_change)
    stop = threading.Event()
    reader = threading.Thread(target=_follow, args=(sync, narrator, stop),
                              name="flexisync-demo-reader", daemon=True)
    reader.start()
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=worker_main, args=(url, namespace, i + 1),
                                 name=f"demo-worker-{i + 1}", daemon=True)
                 for i in range(workers)]
    narrator.say(f"starting {workers} worker processes")
    for process in processes:
        process.start()
    events = sync.events
    try:
        narrator.wait("all workers ready", lambda t: len(t.ready) == workers, 60.0)
        narrator.say("the provider is healthy; every worker calls it through breaker "
                     f"{BREAKER!r}")
        narrator.wait("healthy calls", lambda t: t.outcomes["ok"] >= 3 * workers)

        narrator.say(">>> the provider goes down: it answers 503 to every call; after "
                     f"{POLICY['failure_threshold']} failures across the fleet the breaker "
                     "opens")
        state.set("provider", "down")
        events.publish(TOPIC, "provider is down", type="provider.down")
        narrator.wait("the breaker opening", lambda t: "open" in t.fleet)
        narrator.wait("a failed probe", lambda t: t.fleet.count("open") >= 2, 10.0)

        narrator.say(">>> the provider recovers")
        state.set("provider", "up")
        events.publish(TOPIC, "provider is up", type="provider.up")
        narrator.wait("the breaker closing", lambda t: t.fleet[-1:] == ["closed"])
        narrator.wait("every worker seeing it closed",
                      lambda t: len(t.sightings.get(("closed", 1), {})) == workers)

        run = uuid.uuid4().hex[:6]
        narrator.say(f">>> job {JOB!r} requested: every worker tries to run it")
        events.publish(TOPIC, run, type="job.run")
        narrator.wait("the job", lambda t: len(t.job_runs) + t.job_skips >= workers
                      and t.job_finished >= 1)

        narrator.say(">>> stop")
        events.publish(TOPIC, None, type="demo.stop")
        narrator.wait("every worker stopping", lambda t: len(t.done) == workers)
    except _DemoStuck as exc:
        narrator.printer.close()
        error(f"the demo got stuck: {exc}")
        return None
    finally:
        # Workers that reported "done" are exiting; any others are stuck or interrupted.
        grace = 10.0 if len(narrator.tally.done) == workers else 1.0
        for process in processes:
            process.join(timeout=grace)
            if process.is_alive():
                process.kill()
                process.join(timeout=5.0)
        stop.set()
        reader.join(timeout=5.0)
        narrator.printer.close()
    return _summary(narrator.tally, breaker)


def _summary(tally: _Tally, breaker: Any) -> dict[str, Any]:
    """What the demo showed, as the JSON summary (``ok``: it went as it should)."""
    opened = tally.sightings.get(("open", 1), {})
    closed = tally.sightings.get(("closed", 1), {})
    info = breaker.info()
    summary: dict[str, Any] = {
        "workers": tally.workers,
        "breaker": {"name": BREAKER, "trips": info.trips, "state": info.state},
        "opened_together": len(opened) == tally.workers, "saw_open": len(opened),
        "recovered_together": len(closed) == tally.workers, "saw_closed": len(closed),
        "calls": {k: tally.outcomes[k] for k in ("ok", "failed", "rejected")},
        "job": {"name": JOB, "runs": [{"worker": w, "fencing_token": t}
                                      for w, t in tally.job_runs],
                "skipped": tally.job_skips},
        "events_heard": {str(w): int(d.get("heard", 0)) for w, d in sorted(tally.done.items())},
    }
    summary["ok"] = (summary["opened_together"] and summary["recovered_together"]
                     and len(tally.job_runs) == 1)
    return summary


def _summary_lines(summary: dict[str, Any]) -> list[str]:
    workers, job, calls = summary["workers"], summary["job"], summary["calls"]
    first = job["runs"][0] if job["runs"] else None
    return [
        "",
        "Summary",
        f"  breaker {BREAKER!r}: opened {summary['breaker']['trips']} time(s), now "
        f"{summary['breaker']['state']}",
        f"  fleet opened together:    {'yes' if summary['opened_together'] else 'no'} "
        f"({summary['saw_open']} of {workers} workers saw it open)",
        f"  fleet recovered together: {'yes' if summary['recovered_together'] else 'no'} "
        f"({summary['saw_closed']} of {workers} workers saw it close again)",
        f"  provider calls: {calls['ok']} ok, {calls['failed']} failed, "
        f"{calls['rejected']} rejected by the breaker without calling",
        f"  job {JOB!r}: ran {len(job['runs'])} time(s)"
        + (f", on worker {first['worker']} with fencing token {first['fencing_token']}"
           if first else "")
        + f"; {job['skipped']} worker(s) skipped it",
        "  events received per worker: "
        + ", ".join(f"worker {w}: {n}" for w, n in summary["events_heard"].items()),
    ]


def _quiet_logs() -> None:
    """Keep a worker's own log lines (breaker.opened...) out of the narration: errors
    only, on stderr, never on the parent's stdout."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR),
                        logger_factory=structlog.PrintLoggerFactory(sys.stderr))


def _delete_namespace(sync: Coordinator) -> None:
    with contextlib.suppress(FlexiSyncError):
        pattern = sync._ctx.keys.all_keys_pattern()

        def delete(client: Any) -> int:
            keys = list(client.scan_iter(match=pattern, count=1000))
            return int(client.delete(*keys)) if keys else 0  # DEL: in the documented ACL

        sync._ctx.backend.call("demo.cleanup", delete)

