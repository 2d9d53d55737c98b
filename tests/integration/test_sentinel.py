"""Sentinel: clients follow ``+switch-master``; failover and kill-master with workers.

Every test that fails the master over starts its own master + replicas + 3 sentinels
(:func:`own_setup`). Timing bounds asserted here are the issue's own ("every process
writes to the new master <= 2 s after the announcement"), with the margins named at
each assertion; measured figures are printed (``pytest -s``).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import multiprocessing
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

import flexisync
from flexisync import _sentinel
from flexisync.testing import unique_namespace
from tests.helpers import join_all, wait_until
from tests.topologies import SERVICE, SentinelSetup, start_sentinel, wait_for

#: Writes sent this long after the announcement must not reach the old master: the
#: time for the announcement to reach a worker as well as the test's observer (both
#: subscribe to every sentinel; measured lag is a few milliseconds).
ANNOUNCEMENT_SKEW = 0.25
#: The issue's target: every process writes to the new master within this many
#: seconds of the announcement.
FOLLOW_TARGET = 2.0


# --- set-up helpers (also used by test_sentinel_aio and test_locks_replicas) ----------


def replicas_in_sync(setup: SentinelSetup) -> bool:
    """Every running replica of the current master has finished its initial sync."""
    master = setup.master_port()
    with contextlib.closing(redis.Redis(port=master, decode_responses=True)) as client:
        info = client.info("replication")
    running = [s for s in setup.servers if s.running and s.port != master]
    online = [v for k, v in info.items() if k.startswith("slave") and isinstance(v, dict)
              and v.get("state") == "online"]
    return len(online) >= len(running)


def own_setup(replicas: int = 1) -> SentinelSetup:
    """A private master + ``replicas`` replicas + 3 sentinels, replicas in sync."""
    setup = start_sentinel(replicas=replicas)
    try:
        for server in setup.servers:  # full syncs without the 5 s diskless delay
            with contextlib.closing(redis.Redis(port=server.port)) as client:
                client.config_set("repl-diskless-sync-delay", 0)
        wait_for(lambda: replicas_in_sync(setup), 30, "replicas in sync")
    except BaseException:
        setup.stop()
        raise
    return setup


class SwitchObserver:
    """The test's own ear on every sentinel: when was the switch first announced?"""

    def __init__(self, setup: SentinelSetup) -> None:
        self.first: dict[int, float] = {}  # new master port -> time.time() of the first
        self.switches: list[tuple[float, int]] = []  # (time.time(), new port), each switch
        self._stop = threading.Event()
        self._pubsubs = []
        for sentinel in setup.sentinels:
            client = redis.Redis(port=sentinel.port, decode_responses=True)
            pubsub = client.pubsub()
            pubsub.subscribe(_sentinel.SWITCH_CHANNEL)
            wait_for(lambda p=pubsub: p.get_message(timeout=0.1) is not None, 5, "subscribed")
            self._pubsubs.append(pubsub)
        self._thread = threading.Thread(target=self._run, name="test-switch-observer",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for pubsub in self._pubsubs:
                with contextlib.suppress(redis.RedisError, OSError):
                    message = pubsub.get_message(timeout=0.002)
                    if message and message["type"] == "message":
                        now = time.time()
                        parts = message["data"].split()
                        if parts[0] == SERVICE:
                            port = int(parts[4])
                            self.first.setdefault(port, now)
                            if not self.switches or self.switches[-1][1] != port:
                                self.switches.append((now, port))

    def wait(self, port: int, timeout: float = 15.0) -> float:
        """The wall time the switch to ``port`` was first announced."""
        wait_until(lambda: port in self.first, timeout=timeout,
                   message=f"+switch-master to {port}")
        return self.first[port]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for pubsub in self._pubsubs:
            pubsub.close()


@pytest.fixture
def setup() -> Iterator[SentinelSetup]:
    """The test's own Sentinel set-up (master + 1 replica + 3 sentinels)."""
    found = own_setup()
    yield found
    found.stop()


def _keys_on(port: int, keys: list[str]) -> list[Any]:
    with contextlib.closing(redis.Redis(port=port, decode_responses=True)) as client:
        return client.mget(keys) if keys else []


# --- the writers ----------------------------------------------------------------------


def _probe(key: str, last_key: str, sent: float, client: Any) -> Any:
    """SET the probe key and ask, on the same connection, which server executed it."""
    pipe = client.pipeline(transaction=False)
    pipe.set(key, repr(sent))
    pipe.set(last_key, repr(sent))
    pipe.config_get("port")
    return pipe.execute()


def _writer(url: str, namespace: str, index: int, signals: tuple[Any, Any, Any]) -> None:
    """Write probe keys every few ms until ``stop``; report (seq, sent, done, port)."""
    ready, stop, results = signals
    records: list[tuple[int, float, float, int | None]] = []
    with flexisync.connect(url, namespace=namespace) as sync:
        backend = sync._ctx.backend
        last_key = f"{namespace}:probe:{index}:last"
        seq = 0
        while not stop.is_set():
            seq += 1
            sent = time.time()
            try:
                replies = backend.call("test.probe", functools.partial(
                    _probe, f"{namespace}:probe:{index}:{seq}", last_key, sent))
                port: int | None = int(replies[2]["port"])
            except flexisync.FlexiSyncError:
                port = None
            records.append((seq, sent, time.time(), port))
            if port is not None:
                ready.set()
            stop.wait(0.005)
    results.put((index, records))


@pytest.mark.slow
def test_fork_and_spawn_workers_follow_a_planned_failover(setup: SentinelSetup) -> None:
    """4 workers (2 fork, 2 spawn) write continuously through a SENTINEL FAILOVER: each
    writes to the new master within 2 s of the first announcement, none sends a write
    to the old master after it (margin: ANNOUNCEMENT_SKEW), and every write the new
    master acknowledged is there."""
    namespace = unique_namespace()
    observer = SwitchObserver(setup)
    contexts = [multiprocessing.get_context(m) for m in ("fork", "fork", "spawn", "spawn")]
    stop = contexts[2].Event()
    results = contexts[2].Queue()
    readies = [c.Event() for c in contexts]
    workers = [c.Process(target=_writer,
                         args=(setup.url, namespace, i, (readies[i], stop, results)))
               for i, c in enumerate(contexts)]
    for worker in workers:
        worker.start()
    try:
        for ready in readies:
            assert ready.wait(30), "a worker never wrote"
        old, new = setup.failover()
        announced = observer.wait(new)

        def everyone_moved() -> bool:
            lasts = _keys_on(new, [f"{namespace}:probe:{i}:last" for i in range(4)])
            return all(v is not None and float(v) > announced + 0.5 for v in lasts)

        wait_until(everyone_moved, timeout=20, message="every worker writing to the new master")
    finally:
        stop.set()
        observer.close()
    collected = dict(results.get(timeout=30) for _ in workers)
    join_all(workers, timeout=30)

    late, follow, acked_new = [], [], []
    for index, records in collected.items():
        on_new = [r for r in records if r[3] == new and r[1] >= announced]
        assert on_new, f"worker {index} never wrote to the new master"
        follow.append(on_new[0][2] - announced)
        late += [(index, r) for r in records if r[3] == old and r[1] > announced]
        acked_new += [(index, r[0]) for r in records if r[3] == new]
    skew = max((r[1] - announced for _, r in late), default=0.0)
    print(f"\nplanned failover: every worker on the new master {max(follow):.3f}s after "
          f"the announcement (per worker: {', '.join(f'{f:.3f}' for f in follow)}); "
          f"{len(late)} write(s) to the old master after it, the last sent {skew:.3f}s "
          "after it")
    assert max(follow) <= FOLLOW_TARGET
    assert skew <= ANNOUNCEMENT_SKEW, late
    keys = [f"{namespace}:probe:{i}:{seq}" for i, seq in acked_new]
    missing = [k for k, v in zip(keys, _keys_on(new, keys), strict=True) if v is None]
    assert not missing, f"{len(missing)} acknowledged writes missing on the new master"


@pytest.mark.slow
def test_subscriptions_breaker_mirror_and_stream_followers_resume(
        setup: SentinelSetup) -> None:
    """Across a planned failover: events published after the switch reach the
    subscriber; a breaker transition made during the switch (by another Context) is
    seen by this one's mirror; a stream follower resumes after its last id with no
    gap and no duplicate."""
    namespace = unique_namespace()
    with flexisync.connect(setup.url, namespace=namespace) as sync, \
            flexisync.connect(setup.url, namespace=namespace,
                              retry=flexisync.RetryPolicy(deadline=3.5)) as other:
        assert sync._ctx is not other._ctx  # two Contexts: two listeners, two mirrors
        sub = sync.events.subscribe("ticks")
        breaker = sync.breaker("provider", failure_threshold=3)
        assert breaker.state == "closed"
        stream = sync.stream("log")
        got: list[int] = []
        follower_done = threading.Event()

        def follow() -> None:
            for event in stream.follow(timeout=30):
                got.append(event.data)
                if event.data == 39:
                    break
            follower_done.set()

        thread = threading.Thread(target=follow, name="test-follower", daemon=True)
        thread.start()
        writer = other.stream("log")
        for n in range(20):
            writer.append(n)
        wait_until(lambda: len(got) == 20, timeout=10, message="follower caught up")
        listener = sync._ctx.listener
        generation = listener.generation
        master = _sentinel.master_of(sync._ctx.backend.client)
        _old, new = setup.failover()
        other.breaker("provider", failure_threshold=3).trip(retry_after=60)
        wait_until(lambda: breaker.state == "open", timeout=10,
                   message="the mirror saw the trip made during the switch")
        wait_until(lambda: master.address is not None and master.address[1] == new,
                   timeout=5, message="the Context followed the switch")
        wait_until(lambda: listener.generation > generation and listener.connected,
                   timeout=10, message="the listener reconnected to the new master")
        for n in range(20, 40):
            writer.append(n)
        for n in range(10):
            other.events.publish("ticks", n)
        received = [sub.get(timeout=5) for _ in range(10)]
        assert [e.data for e in received if e is not None] == list(range(10))
        assert follower_done.wait(20)
        assert got == list(range(40))
        thread.join(5)


# --- kill the master -----------------------------------------------------------------


def _locker(url: str, namespace: str, index: int, signals: tuple[Any, Any, Any]) -> None:
    """Take a replicas=1 lock and increment a counter inside it, until ``stop``."""
    ready, stop, results = signals
    from tests.integration.test_locks_replicas import make_lock

    holds: list[tuple[int, float, float, float]] = []  # fence, asked, got, left
    values: list[tuple[int, float]] = []
    errors: dict[str, int] = {}
    with flexisync.connect(url, namespace=namespace) as sync:
        lock = make_lock(sync, "critical", ttl=3.0, replicas=1, replicas_timeout=0.5)
        counter = sync.state("counter")
        while not stop.is_set():
            asked = time.monotonic()
            try:
                if not lock.acquire(timeout=2.0):
                    continue
            except flexisync.FlexiSyncError as exc:
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                stop.wait(0.02)
                continue
            got = time.monotonic()
            fence = lock.fencing_token
            with contextlib.suppress(flexisync.FlexiSyncError):
                values.append((counter.incr("n"), time.time()))
            holds.append((int(fence or 0), asked, got, time.monotonic()))
            with contextlib.suppress(flexisync.FlexiSyncError):
                lock.release()
            ready.set()
    results.put((index, holds, values, errors))


@pytest.mark.slow
def test_kill_master_keeps_lock_counter_pubsub_and_breaker_invariants() -> None:
    """SIGKILL the master under load (2 replicas, so the new master still has one).

    * locks (replicas=1; Sentinel promotes the replica with the highest offset, so a
      confirmed lease survives): no two holders' leases overlap, and fencing tokens
      grow in the order the lock was taken;
    * counter (incremented under the lock): the values returned after the switch are
      unique and increasing; increments the old master acknowledged but had not yet
      replicated are lost (asynchronous replication) and counted, not asserted;
    * pub/sub: events published once the listener is back all arrive, in order;
    * breaker: a trip made by another process right after the switch is mirrored.
    """
    setup = own_setup(replicas=2)
    namespace = unique_namespace()
    fork = multiprocessing.get_context("fork")
    stop, results = fork.Event(), fork.Queue()
    readies = [fork.Event() for _ in range(2)]
    workers = [fork.Process(target=_locker,
                            args=(setup.url, namespace, i, (readies[i], stop, results)))
               for i in range(2)]
    try:
        observer = SwitchObserver(setup)
        with flexisync.connect(setup.url, namespace=namespace) as sync, \
                flexisync.connect(setup.url, namespace=namespace,
                                  retry=flexisync.RetryPolicy(deadline=3.5)) as other:
            sub = sync.events.subscribe("ticks")
            breaker = sync.breaker("provider", failure_threshold=3)
            assert breaker.state == "closed"
            for worker in workers:
                worker.start()
            for ready in readies:
                assert ready.wait(30), "a worker never held the lock"
            listener = sync._ctx.listener
            generation = listener.generation
            killed_at = time.time()
            _old, new = setup.kill_master()
            announced = observer.wait(new)
            wait_until(lambda: _writes_on(other), timeout=10, message="other Context back")
            other.breaker("provider", failure_threshold=3).trip(retry_after=60)
            wait_until(lambda: breaker.state == "open", timeout=10,
                       message="the mirror saw the trip made after the kill")
            wait_until(lambda: listener.generation > generation and listener.connected,
                       timeout=10, message="the listener reconnected to the new master")
            for n in range(20):
                other.events.publish("ticks", n)
            received = [sub.get(timeout=5) for _ in range(20)]
            assert [e.data for e in received if e is not None] == list(range(20))
            counter = other.state("counter")
            base = int(counter.get("n") or 0)
            wait_until(lambda: int(counter.get("n") or 0) >= base + 10, timeout=20,
                       message="the workers taking turns on the new master")
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            observer.close()
    try:
        collected = [results.get(timeout=30) for _ in workers]
        join_all(workers, timeout=30)
    finally:
        setup.stop()
    # On a loaded machine the sentinels may fail over once more (the new master missed
    # PINGs for down-after-milliseconds): the counter is then judged after the last one.
    last_switch = observer.switches[-1][0] if observer.switches else announced
    _check_kill_invariants(collected, killed_at, announced, last_switch,
                           len(observer.switches))


def _check_kill_invariants(collected: list[Any], killed_at: float, announced: float,
                           last_switch: float, switches: int) -> None:
    holds = sorted((h for _, hs, _, _ in collected for h in hs), key=lambda h: h[2])
    ttl = 3.0
    for before, after in itertools.pairwise(holds):
        assert after[0] > before[0], "fencing tokens must grow in acquisition order"
        assert after[2] >= min(before[3], before[1] + ttl), "two holders at once"
    values = [v for _, _, vs, _ in collected for v in vs]
    after_switch = sorted((t, v) for v, t in values if t > last_switch)
    assert after_switch, "no increment after the failover"
    post = [v for _, v in after_switch]
    assert post == sorted(set(post)), "increments after the switch must be unique, in order"
    before_kill = [v for v, t in values if t < killed_at]
    lost = sum(1 for v in before_kill if v >= post[0])
    errors: dict[str, int] = {}
    for _, _, _, errs in collected:
        for name, count in errs.items():
            errors[name] = errors.get(name, 0) + count
    print(f"\nkill master: switch announced {announced - killed_at:.2f}s after SIGKILL "
          f"({switches} switch(es) in all); "
          f"{len(holds)} holds, {len(post)} increments after the switch, {lost} "
          f"acknowledged increment(s) lost to asynchronous replication; errors {errors}")


def _writes_on(coordinator: flexisync.Coordinator) -> bool:
    try:
        coordinator.state("probe").set("x", 1)
    except flexisync.FlexiSyncError:
        return False
    return True


# --- adopting a client, threads, fork -------------------------------------------------


def test_adopted_sentinel_client_follows_through_its_own_pool(
        sentinel_setup: SentinelSetup) -> None:
    """connect(client=Sentinel(...).master_for(service)): flexisync builds its own
    following client; the user's client is left as it was."""
    hosts = [("127.0.0.1", s.port) for s in sentinel_setup.sentinels]
    user = redis.sentinel.Sentinel(hosts, socket_timeout=1.0).master_for(SERVICE)
    with flexisync.connect(client=user, namespace=unique_namespace()) as sync:
        assert sync._ctx.backend.topology == "sentinel"
        assert sync._ctx.backend.client is not user
        store = sync.state("s")
        store.set("k", {"v": 1})
        assert store.get("k") == {"v": 1}
        master = _sentinel.master_of(sync._ctx.backend.client)
        assert master.address == ("127.0.0.1", sentinel_setup.master_port())
        wait_until(lambda: master.confirmed, timeout=5, message="watcher confirmed")
    user.close()


def test_replica_client_is_refused(sentinel_setup: SentinelSetup) -> None:
    hosts = [("127.0.0.1", s.port) for s in sentinel_setup.sentinels]
    replica = redis.sentinel.Sentinel(hosts).slave_for(SERVICE)
    with pytest.raises(flexisync.ConfigError, match="replica client"):
        flexisync.connect(client=replica)


def _watcher(sync: flexisync.Coordinator) -> Any:
    return sync._ctx.extension("sentinel.watcher", lambda _ctx: None)


def test_watcher_thread_is_named_confirmed_and_stopped_by_close(sentinel_url: str) -> None:
    sync = flexisync.connect(sentinel_url, namespace=unique_namespace(),
                             retry=flexisync.RetryPolicy(deadline=2.9))
    master = _sentinel.master_of(sync._ctx.backend.client)
    wait_until(lambda: master.confirmed, timeout=5, message="watcher subscribed")
    thread = _watcher(sync)._thread
    assert thread.name == "flexisync-sentinel"
    assert thread.daemon
    assert thread.is_alive()
    sync.close()
    assert not thread.is_alive()
    assert not master.confirmed


def _forked_child(sync: flexisync.Coordinator, parent_thread: int, results: Any) -> None:
    master = _sentinel.master_of(sync._ctx.backend.client)
    sync.state("s").set("forked", 1)
    wait_until(lambda: master.confirmed, timeout=5, message="forked child's watcher")
    thread = _watcher(sync)._thread
    results.put((thread.is_alive(), id(thread) != parent_thread))


def test_a_forked_child_runs_its_own_watcher(sentinel_url: str) -> None:
    """A Coordinator made before fork() works in the child, which starts its own
    watcher (the parent's thread does not survive fork)."""
    fork = multiprocessing.get_context("fork")
    results = fork.Queue()
    with flexisync.connect(sentinel_url, namespace=unique_namespace(),
                           retry=flexisync.RetryPolicy(deadline=2.8)) as sync:
        sync.state("s").set("parent", 1)
        parent_thread = id(_watcher(sync)._thread)
        child = fork.Process(target=_forked_child, args=(sync, parent_thread, results))
        child.start()
        assert results.get(timeout=20) == (True, True)
        join_all([child], timeout=20)
        assert sync.state("s").get("forked") == 1


@pytest.mark.slow
def test_sentinels_all_gone_the_last_known_master_is_used() -> None:
    """With every sentinel stopped the address is no longer confirmed, and new
    connections go to the last known master: work goes on."""
    setup = own_setup()
    try:
        with flexisync.connect(setup.url, namespace=unique_namespace()) as sync:
            master = _sentinel.master_of(sync._ctx.backend.client)
            wait_until(lambda: master.confirmed, timeout=5, message="watcher subscribed")
            for sentinel in setup.sentinels:
                sentinel.stop()
            wait_until(lambda: not master.confirmed, timeout=5,
                       message="the watcher noticed the sentinels are gone")
            sync._ctx.backend.client.connection_pool.disconnect()  # force new connections
            store = sync.state("s")
            store.set("k", 1)
            assert store.get("k") == 1
            assert master.address is not None
            assert master.address[1] == setup.servers[0].port
    finally:
        setup.stop()
