"""One circuit breaker shared by a fleet of workers calling a flaky LLM provider.

Four worker processes call a fake provider through ONE breaker named after it. The
provider follows a script (seconds since start):

    0.0 - 1.5   healthy
    1.5 - 2.0   429 Too Many Requests, Retry-After: 1.5 s
    2.0 - 4.5   broken: timeouts and HTTP 500s
    4.5 -       healthy again

What to watch for in the output:

* the first 429 opens the breaker at once, in every worker, for exactly the provider's
  Retry-After (no five failures needed);
* when that period ends, exactly one probe goes out for the whole fleet; it fails, so
  the breaker reopens for twice as long (1 s -> 2 s), again fleet-wide;
* once the provider is healthy, two successful probes close it and everyone resumes;
* while open, workers are rejected without touching the provider (or Redis).

Run it: ``python examples/llm_providers.py``. It uses ``FLEXISYNC_URL`` if set, else
starts a throwaway redis-server (``flexisync.embedded``).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import sys
import time
import uuid
from collections import Counter
from typing import Any

import structlog

import flexisync

WORKERS = 4
DURATION = 6.5  # seconds each worker keeps calling
PACE = 0.05  # seconds between one worker's calls


class ProviderError(Exception):
    """An HTTP error from the provider; ``retry_after`` is set for a 429."""

    def __init__(self, status: int, retry_after: float | None = None) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status
        self.retry_after = retry_after  # read by the breaker: opens for exactly this long


def fake_completion(prompt: str, started: float, call: int) -> str:
    """The provider: behaves according to the script in the module docstring."""
    elapsed = time.time() - started
    if 1.5 <= elapsed < 2.0:
        raise ProviderError(429, retry_after=1.5)
    if 2.0 <= elapsed < 4.5:
        if call % 2:
            raise TimeoutError("provider did not answer within 30 s")
        raise ProviderError(500)
    time.sleep(0.005)
    return f"completion for {prompt!r}"


def worker(index: int, url: str, namespace: str, started: float) -> None:
    """Call the provider every PACE seconds for DURATION seconds, through the breaker."""
    # flexisync logs each transition once, in the worker whose call made it
    # (breaker.opened at warning; the others log breaker.mirrored at debug). Only
    # errors here, so that the output shows what each worker sees.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    sync = flexisync.connect(url, namespace=namespace)
    breaker = sync.breaker(
        "llm:openai",
        failure_threshold=5,  # consecutive failures, counted across the fleet
        recovery_timeout=1.0,  # first open period; doubles after each failed probe
        max_recovery_timeout=8.0,
        half_open_max_calls=1,  # one probe at a time for the WHOLE fleet
        success_threshold=2,  # two good probes close it
        slow_call_duration=2.0,  # a very slow answer counts as a failure
    )

    def show(message: str) -> None:
        print(f"{time.time() - started:5.2f}s  worker {index}  {message}", flush=True)

    @breaker.on_state_change
    def changed(name: str, old: str, new: str) -> None:
        show(f"breaker {name}: {old} -> {new}")

    tally: Counter[str] = Counter()
    last = ""
    call = 0
    while time.time() - started < DURATION:
        call += 1
        try:
            breaker.call(fake_completion, "Say hello", started, call + index)
            seen = "ok"
        except flexisync.CircuitOpenError as exc:
            seen = f"rejected by the breaker (retry after {exc.retry_after:.1f}s)"
            tally["rejected"] += 1
        except (ProviderError, TimeoutError) as exc:
            seen = f"provider failed: {exc}"
            tally["failed"] += 1
        else:
            tally["ok"] += 1
        if seen.partition(" (")[0] != last.partition(" (")[0]:
            show(seen)
        last = seen
        time.sleep(PACE)
    show(f"done: {dict(tally)}")
    sync.close()


def main() -> int:
    url = os.environ.get("FLEXISYNC_URL")
    server: Any = None
    if not url:
        from flexisync.embedded import start

        server = start()
        url = server.url
    namespace = f"example-{uuid.uuid4().hex[:8]}"
    try:
        started = time.time()
        ctx = multiprocessing.get_context("spawn")
        processes = [ctx.Process(target=worker, args=(i, url, namespace, started))
                     for i in range(WORKERS)]
        for process in processes:
            process.start()
        for process in processes:
            process.join(60)
        with flexisync.connect(url, namespace=namespace) as sync:
            info = sync.breaker("llm:openai").info()
            print(f"final: {info.state}, opened {info.trips} time(s) fleet-wide")
            for key in sync.client.scan_iter(match=f"{namespace}:*"):
                sync.client.delete(key)
        return 0 if all(p.exitcode == 0 for p in processes) else 1
    finally:
        if server is not None:
            server.stop()


if __name__ == "__main__":
    sys.exit(main())
