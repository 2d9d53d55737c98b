"""A job that exactly one of N worker processes runs, fenced at the write.

Every worker tries to take the lock without waiting; the one that gets it runs the job
(here: "build the nightly report") unless its result is already there, and the others
skip it. The job's result is written
to storage that checks the lock's fencing token, so a worker that stalled past its lease
(a GC pause, a frozen VM) and wakes up later cannot overwrite newer results: its token
is smaller than the last one the storage accepted.

Run it: ``python examples/one_worker_job.py``. It uses ``FLEXISYNC_URL`` when set, else
``redis://localhost:6379/0``, else starts a throwaway redis-server
(``flexisync.embedded``). Exits 0 when exactly one worker ran the job.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import time
import uuid
from typing import Any

import flexisync

WORKERS = 4
REPORT_KEY = "{ns}:report:{{nightly}}"

# The storage: accept a write only with a fencing token larger than any accepted before.
# (A SQL equivalent: UPDATE reports SET body = ?, token = ? WHERE id = ? AND token < ?.)
FENCED_WRITE = """
local last = tonumber(redis.call('GET', KEYS[2]) or '0')
if tonumber(ARGV[1]) <= last then return last end
redis.call('SET', KEYS[2], ARGV[1])
redis.call('SET', KEYS[1], ARGV[2])
return 0
"""


def fenced_write(client: Any, namespace: str, token: int, body: str) -> int:
    """Write ``body`` if ``token`` is the newest; returns 0, or the newer token that won."""
    script = client.register_script(FENCED_WRITE)
    report = REPORT_KEY.format(ns=namespace)
    keys = [report, report + ":token"]
    return int(script(keys=keys, args=[token, body]))


def worker(url: str, namespace: str, start: Any, results: Any) -> None:
    """One worker process: run the job if this worker wins the lock."""
    with flexisync.connect(url, namespace=namespace) as sync:
        lock = sync.lock("nightly-report", ttl=10, auto_renew=True)
        start.wait(60)
        if not lock.acquire(blocking=False):
            results.put((os.getpid(), "skipped: another worker is running it", None))
            return
        try:
            if sync.client.exists(REPORT_KEY.format(ns=namespace)):
                # A worker that was slow to start: the job already ran this period.
                results.put((os.getpid(), "skipped: already done", None))
                return
            token = lock.fencing_token
            assert token is not None
            body = f"report built by pid {os.getpid()} at {time.time():.0f}"
            time.sleep(0.2)  # the job itself
            lock.ensure_held()  # cheap local check; the fenced write is the real guard
            newer = fenced_write(sync.client, namespace, token, body)
            results.put((os.getpid(), "ran" if newer == 0 else "rejected", token))
        finally:
            lock.release()


def redis_url() -> tuple[str, Any]:
    """FLEXISYNC_URL, else a local Redis, else a throwaway embedded one."""
    url = os.environ.get("FLEXISYNC_URL") or "redis://localhost:6379/0"
    quick = flexisync.RetryPolicy(attempts=1, deadline=1.0)
    try:
        with flexisync.connect(url, retry=quick, socket_connect_timeout=0.5) as probe:
            probe.ping()
        return url, None
    except flexisync.BackendUnavailable:
        from flexisync.embedded import start

        server = start()
        print(f"no Redis at {url}; started a throwaway one at {server.url}")
        return server.url, server


def main() -> int:
    url, server = redis_url()
    namespace = f"example-{uuid.uuid4().hex[:8]}"
    ctx = multiprocessing.get_context("spawn")
    start, results = ctx.Barrier(WORKERS), ctx.Queue()
    workers = [ctx.Process(target=worker, args=(url, namespace, start, results))
               for _ in range(WORKERS)]
    try:
        for process in workers:
            process.start()
        outcomes = [results.get(timeout=60) for _ in workers]
        for process in workers:
            process.join(30)
        for pid, outcome, token in sorted(outcomes, key=lambda o: o[1]):
            print(f"worker {pid}: {outcome}" + (f" (fencing token {token})" if token else ""))
        ran = [o for o in outcomes if o[1] == "ran"]

        # A zombie: a holder that stalled past its lease wakes up and writes with the
        # token it got back then. The storage has seen a newer token and refuses.
        with flexisync.connect(url, namespace=namespace) as sync:
            with sync.lock("nightly-report", ttl=10) as lock:
                assert lock.fencing_token is not None
                assert fenced_write(sync.client, namespace, lock.fencing_token, "v2") == 0
                stale = lock.fencing_token - 1
            newer = fenced_write(sync.client, namespace, stale, "zombie write")
            print(f"rejected stale write with token {stale}: storage has token {newer}"
                  if newer else "BUG: the stale write was accepted")
            for key in sync.client.scan_iter(match=f"{namespace}:*"):
                sync.client.delete(key)
        return 0 if len(ran) == 1 and newer else 1
    finally:
        if server is not None:
            server.stop()


if __name__ == "__main__":
    sys.exit(main())
