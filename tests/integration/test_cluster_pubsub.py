"""The cluster pub/sub listener: sharded and classic delivery, slot migration, failover.

Tests that migrate slots or kill masters start their own cluster; the rest use the
session ``cluster`` fixture. Every wait is a bounded poll (``wait_for``), never a sleep.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import shutil
import subprocess
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import redis.cluster
from redis.crc import key_slot

import flexisync
import flexisync.aio
from flexisync._cluster_listener import ClusterListener
from tests.topologies import Cluster, start_cluster, wait_for

pytestmark = pytest.mark.timeout(120)


def _slot(channel: str) -> int:
    return int(key_slot(channel.encode()))


def _channel_in(low: int, high: int, prefix: str = "t:lock") -> str:
    """A shard channel ``prefix:{tag}`` whose slot is in ``[low, high]``."""
    for i in range(200_000):
        name = f"{prefix}:{{c{i}}}"
        if low <= _slot(name) <= high:
            return name
    raise AssertionError("no channel found")


def _listener_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("flexisync-listener")]


class Inbox:
    """A handler recording (channel, data, pattern) into a queue."""

    def __init__(self) -> None:
        self.items: queue.Queue[tuple[str, bytes, str | None]] = queue.Queue()

    def __call__(self, channel: str, data: bytes, pattern: str | None) -> None:
        self.items.put((channel, data, pattern))

    def get(self, timeout: float = 5.0) -> tuple[str, bytes, str | None]:
        return self.items.get(timeout=timeout)

    def drain(self) -> list[tuple[str, bytes, str | None]]:
        out = []
        with contextlib.suppress(queue.Empty):
            while True:
                out.append(self.items.get_nowait())
        return out


@pytest.fixture
def coordinator(cluster: Cluster) -> Iterator[Any]:
    coord = flexisync.connect(cluster.url, namespace="c2")
    yield coord
    coord.close()


def _publisher(cluster: Cluster) -> redis.RedisCluster:
    nodes = [redis.cluster.ClusterNode("127.0.0.1", n.port) for n in cluster.nodes
             if n.running]
    return redis.RedisCluster(startup_nodes=nodes, decode_responses=True)


def _shard_channels_on(cluster: Cluster, port: int) -> set[str]:
    with contextlib.closing(cluster.client(port)) as c:
        return set(c.execute_command("PUBSUB SHARDCHANNELS"))


# --- delivery on the session cluster ---------------------------------------------------


def test_sharded_and_classic_delivery_confirmed(cluster: Cluster, coordinator: Any) -> None:
    listener = coordinator._ctx.listener
    assert isinstance(listener, ClusterListener)
    baseline = listener.table_sizes()
    pub = _publisher(cluster)
    inbox = Inbox()
    channels = [f"c2:lock:{{d{i}}}" for i in range(60)]
    owners = {cluster.master_of_slot(_slot(ch)) for ch in channels}
    assert len(owners) == 3, "the channels span every master"
    regs = []
    try:
        for i, channel in enumerate(channels):
            regs.append(listener.subscribe(channel, inbox))
            # Published right after subscribe returned: must be delivered.
            assert pub.execute_command("SPUBLISH", channel, f"m{i}") == 1
        regs.append(listener.subscribe("c2:events:orders", inbox))
        pub.publish("c2:events:orders", "classic")
        regs.append(listener.psubscribe("c2:events:pay.*", inbox))
        pub.publish("c2:events:pay.card", "glob")
        got = [inbox.get() for _ in range(62)]
        assert sorted(got[:60]) == sorted((ch, f"m{i}".encode(), None)
                                          for i, ch in enumerate(channels))
        # Two classic publishes may reach the listener's node over different cluster-bus
        # paths (the publisher's client picks a node per command): no order between them.
        assert sorted(got[60:], key=repr) == sorted(
            [("c2:events:orders", b"classic", None),
             ("c2:events:pay.card", b"glob", "c2:events:pay.*")], key=repr)
        # Really sharded: each channel is an SSUBSCRIBE on its own slot's master.
        for port in owners:
            mine = {ch for ch in channels if cluster.master_of_slot(_slot(ch)) == port}
            assert mine <= _shard_channels_on(cluster, port)
        assert listener.handler_errors == 0
        assert listener.connected
        assert len(_listener_threads()) <= 4
    finally:
        for reg in regs:
            reg.close()
        pub.close()
    assert listener.table_sizes()["handlers"] == baseline["handlers"]
    wait_for(lambda: all(not _shard_channels_on(cluster, p) & set(channels)
                         for p in cluster.masters()), 5.0, "SUNSUBSCRIBE answered")


def test_thread_count_bounded(cluster: Cluster, coordinator: Any) -> None:
    listener = coordinator._ctx.listener
    inbox = Inbox()
    regs = [listener.subscribe(f"c2:breaker:{{b{i}}}", inbox) for i in range(200)]
    try:
        threads = _listener_threads()
        assert 3 <= len(threads) <= 4, threads
        assert listener.table_sizes()["links"] <= 4
    finally:
        for reg in regs:
            reg.close(wait=False)
    wait_for(lambda: listener.table_sizes()["pending"] == 0, 5.0, "unsubscribes answered")
    assert listener.table_sizes()["routes"] == 0


def test_subscribe_async_and_cancellation(cluster: Cluster, coordinator: Any) -> None:
    listener = coordinator._ctx.listener
    inbox = Inbox()
    keep = listener.subscribe("c2:lock:{anchor}", inbox)  # links exist before the baseline
    keep2 = listener.subscribe("c2:events:anchor", inbox)
    pub = _publisher(cluster)

    def tables() -> dict[str, int]:
        sizes = listener.table_sizes()
        assert sizes.pop("links") <= 4  # one per master + classic, kept while they serve
        return sizes

    async def main() -> None:
        baseline = tables()
        for key in (("channel", "c2:lock:{async1}"), ("channel", "c2:events:async1"),
                    ("pattern", "c2:events:async*")):
            reg = await listener.subscribe_async(key, inbox)
            name = key[1].replace("*", "X")
            if "{" in name:
                assert pub.execute_command("SPUBLISH", name, "a") == 1
            else:
                pub.publish(name, "a")
            got = await asyncio.to_thread(inbox.get)
            assert got[:2] == (name, b"a")
            await reg.aclose()
        for _ in range(20):  # cancelled while waiting for the confirmation
            task = asyncio.ensure_future(
                listener.subscribe_async(("channel", "c2:lock:{cancel}"), inbox))
            await asyncio.sleep(0)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        assert listener.table_sizes()["handlers"] == baseline["handlers"]
        assert listener.table_sizes()["waiting"] == 0
        deadline = asyncio.get_running_loop().time() + 5.0
        while tables() != baseline:
            assert asyncio.get_running_loop().time() < deadline, (tables(), baseline)
            await asyncio.sleep(0.02)

    try:
        asyncio.run(main())
    finally:
        keep.close()
        keep2.close()
        pub.close()


@pytest.mark.parametrize("shell", ["sync", "async"])
def test_lock_waiter_woken_by_sharded_push(cluster: Cluster, shell: str) -> None:
    """A waiter blocked on a cluster lock is woken by the release script's SPUBLISH,
    delivered through an SSUBSCRIBE on the lock slot's master."""
    coord = flexisync.connect(cluster.url, namespace=f"c2{shell}")
    listener = coord._ctx.listener
    delivered: list[str] = []
    deliver = listener._deliver

    def spy(key: Any, channel: str, data: Any, pattern: str | None) -> None:
        delivered.append(channel)
        deliver(key, channel, data, pattern)

    listener._deliver = spy  # type: ignore[method-assign]
    name = "pushwake"
    channel = coord._ctx.keys.object_channel("lock", name)
    holder = coord.lock(name, ttl=30)
    assert holder.acquire()
    acquired = threading.Event()
    errors: list[BaseException] = []
    master = cluster.master_of_slot(_slot(channel))

    def wait_sync() -> None:
        try:
            if coord.lock(name, ttl=30).acquire(timeout=20):
                acquired.set()
        except BaseException as exc:
            errors.append(exc)

    def wait_async() -> None:
        async def go() -> None:
            aio = flexisync.aio.connect(cluster.url, namespace=f"c2{shell}")
            try:
                if await aio.lock(name, ttl=30).acquire(timeout=20):
                    acquired.set()
            finally:
                await aio.aclose()
        try:
            asyncio.run(go())
        except BaseException as exc:
            errors.append(exc)

    waiter = threading.Thread(target=wait_sync if shell == "sync" else wait_async)
    waiter.start()
    try:
        wait_for(lambda: channel in _shard_channels_on(cluster, master), 10.0,
                 "the waiter's SSUBSCRIBE on the slot's master")
        holder.release()
        assert acquired.wait(15.0), errors
        assert channel in delivered, "woken without a push on the lock channel"
    finally:
        waiter.join(timeout=20)
        coord.close()
    assert not errors


# --- slot migration and failover (own clusters) -----------------------------------------


@pytest.fixture
def own_cluster() -> Iterator[Cluster]:
    found = start_cluster()
    yield found
    found.stop()


def _node_id(cluster: Cluster, port: int) -> str:
    with contextlib.closing(cluster.client(port)) as c:
        return str(c.execute_command("CLUSTER MYID"))


def _first_slot(cluster: Cluster, port: int) -> int:
    with contextlib.closing(redis.Redis(port=port)) as c:
        c.response_callbacks.clear()
        return min(int(start) for start, _end, master, *_ in c.execute_command("CLUSTER SLOTS")
                   if int(master[1]) == port)


class Feed:
    """Publishes numbered messages on ``channels`` from a thread until stopped."""

    def __init__(self, cluster: Cluster, channels: list[str], *, sharded: list[bool]) -> None:
        self.cluster = cluster
        self.channels = channels
        self.sharded = sharded
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        client: redis.RedisCluster | None = None
        while not self._stop.is_set():
            try:
                if client is None:
                    client = _publisher(self.cluster)
                n = self.sent + 1
                for channel, sharded in zip(self.channels, self.sharded, strict=True):
                    if sharded:
                        client.execute_command("SPUBLISH", channel, str(n))
                    else:  # one node for every classic publish: their order is kept
                        client.execute_command("PUBLISH", channel, str(n),
                                               target_nodes=client.get_default_node())
                self.sent = n
            except Exception:
                if client is not None:
                    with contextlib.suppress(Exception):
                        client.close()
                client = None
            self._stop.wait(0.02)
        if client is not None:
            client.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


class Seen:
    """Per channel: message numbers received, in order."""

    def __init__(self) -> None:
        self.numbers: dict[str, list[int]] = {}
        self._lock = threading.Lock()

    def __call__(self, channel: str, data: bytes, _pattern: str | None) -> None:
        with self._lock:
            self.numbers.setdefault(channel, []).append(int(data))

    def latest(self, channel: str) -> int:
        with self._lock:
            found = self.numbers.get(channel)
            return found[-1] if found else 0

    def check_no_duplicates(self) -> None:
        with self._lock:
            for channel, numbers in self.numbers.items():
                assert numbers == sorted(set(numbers)), f"{channel}: duplicate or reordered"


def _hooked(listener: Any) -> threading.Event:
    ran = threading.Event()
    listener.add_reconnect_hook(ran.set)
    return ran


@pytest.mark.skipif(shutil.which("redis-cli") is None, reason="redis-cli not on PATH")
def test_survives_slot_migration_by_redis_cli_reshard(own_cluster: Cluster) -> None:
    cluster = own_cluster
    source = cluster.masters()[0]
    target = next(p for p in cluster.masters() if p != source)
    low = _first_slot(cluster, source)
    moved = _channel_in(low, low + 9, "t:lock")  # reshard moves the source's first slots
    stays = _channel_in(low + 200, low + 5000, "t:breaker")
    assert cluster.master_of_slot(_slot(stays)) == source
    coord = flexisync.connect(cluster.url, namespace="t")
    listener = coord._ctx.listener
    seen = Seen()
    regs = [listener.subscribe(ch, seen) for ch in (moved, stays, "t:events:all")]
    hook = _hooked(listener)
    feed = Feed(cluster, [moved, stays, "t:events:all"], sharded=[True, True, False])
    try:
        wait_for(lambda: seen.latest(moved) > 0, 10.0, "first messages")
        subprocess.run(
            ["redis-cli", "--cluster", "reshard", f"127.0.0.1:{source}",
             "--cluster-from", _node_id(cluster, source),
             "--cluster-to", _node_id(cluster, target),
             "--cluster-slots", "10", "--cluster-yes"],
            check=True, capture_output=True, timeout=60)
        assert cluster.master_of_slot(_slot(moved)) == target
        after = feed.sent
        wait_for(lambda: min(seen.latest(ch) for ch in (moved, stays, "t:events:all"))
                 > after, 10.0, "messages published after the move")
        assert hook.wait(5.0), "reconnect hooks did not run after the move"
        assert moved in _shard_channels_on(cluster, target)
        assert moved not in _shard_channels_on(cluster, source)
        assert listener.connected
        assert len(_listener_threads()) <= 4
    finally:
        feed.stop()
        for reg in regs:
            reg.close(wait=False)
        coord.close()
    seen.check_no_duplicates()


def test_survives_manual_slot_migration_and_subscribe_during_it(own_cluster: Cluster) -> None:
    """SETSLOT IMPORTING/MIGRATING + SETSLOT NODE by hand; a channel subscribed with a
    stale slot map (MOVED reply) still ends up on the right master."""
    cluster = own_cluster
    source, target = cluster.masters()[:2]
    low = _first_slot(cluster, source)
    channel = _channel_in(low, low, "t:lock")
    slot = _slot(channel)
    coord = flexisync.connect(cluster.url, namespace="t")
    listener = coord._ctx.listener
    seen = Seen()
    reg = listener.subscribe(channel, seen)
    hook = _hooked(listener)
    src_id, dst_id = _node_id(cluster, source), _node_id(cluster, target)
    with contextlib.closing(cluster.client(target)) as t, \
            contextlib.closing(cluster.client(source)) as s:
        t.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", src_id)
        s.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", dst_id)
        t.execute_command("CLUSTER SETSLOT", slot, "NODE", dst_id)
        s.execute_command("CLUSTER SETSLOT", slot, "NODE", dst_id)
        for port in cluster.masters():
            if port not in (source, target):
                with contextlib.closing(cluster.client(port)) as o:
                    o.execute_command("CLUSTER SETSLOT", slot, "NODE", dst_id)
    try:
        wait_for(lambda: channel in _shard_channels_on(cluster, target), 10.0,
                 "the channel resubscribed on its new master")
        assert hook.wait(5.0)
        pub = _publisher(cluster)
        # A second channel in the moved slot, subscribed with the client's stale map:
        # SSUBSCRIBE on the old master answers MOVED, the listener follows it.
        other = _channel_in(slot, slot, "t:breaker")
        listener._slots[slot] = f"127.0.0.1:{source}"
        reg2 = listener.subscribe(other, seen)
        assert pub.execute_command("SPUBLISH", other, "1") == 1
        assert pub.execute_command("SPUBLISH", channel, "7") == 1
        wait_for(lambda: seen.latest(other) == 1 and seen.latest(channel) == 7, 5.0,
                 "both channels delivered on the new master")
        reg2.close()
        pub.close()
    finally:
        reg.close()
        coord.close()
    assert listener.table_sizes()["routes"] == 0


def test_survives_master_kill_and_replica_promotion(own_cluster: Cluster) -> None:
    cluster = own_cluster
    victim = cluster.masters()[0]
    low = _first_slot(cluster, victim)
    channel = _channel_in(low, low + 3000, "t:lock")
    elsewhere = _channel_in(0, 16383, "t:stream")
    while cluster.master_of_slot(_slot(elsewhere)) == victim:
        elsewhere = _channel_in(_slot(elsewhere) + 1, 16383, "t:stream")
    coord = flexisync.connect(cluster.url, namespace="t")
    listener = coord._ctx.listener
    seen = Seen()
    regs = [listener.subscribe(ch, seen) for ch in (channel, elsewhere, "t:events:all")]
    hook = _hooked(listener)
    feed = Feed(cluster, [channel, elsewhere, "t:events:all"], sharded=[True, True, False])
    try:
        wait_for(lambda: seen.latest(channel) > 0, 10.0, "first messages")
        cluster.kill_master_of(_slot(channel))
        wait_for(lambda: cluster.master_of_slot(_slot(channel)) != victim, 20.0,
                 "a replica promoted")
        promoted = cluster.master_of_slot(_slot(channel))
        after = feed.sent
        wait_for(lambda: min(seen.latest(ch) for ch in (channel, elsewhere, "t:events:all"))
                 > after, 15.0, "delivery after the promotion")
        assert hook.wait(5.0), "reconnect hooks did not run after the failover"
        assert channel in _shard_channels_on(cluster, promoted)
        wait_for(lambda: listener.connected, 5.0, "listener connected")
        wait_for(lambda: len(_listener_threads()) <= 4, 10.0, "dead master's link retired")
    finally:
        feed.stop()
        for reg in regs:
            reg.close(wait=False)
        coord.close()
    seen.check_no_duplicates()
    assert _listener_threads() == []


def test_close_and_fork_rebuild(cluster: Cluster) -> None:
    """close() stops every link thread; a forked child subscribes on links of its own."""
    import multiprocessing

    coord = flexisync.connect(cluster.url, namespace="c2fork")
    listener = coord._ctx.listener
    inbox = Inbox()
    reg = listener.subscribe("c2fork:lock:{f}", inbox)
    ctx = multiprocessing.get_context("fork")
    result: Any = ctx.Queue()
    ready = ctx.Event()

    def child() -> None:
        got: queue.Queue[bytes] = queue.Queue()
        coord._ctx.listener.subscribe("c2fork:lock:{child}",
                                      lambda _c, d, _p: got.put(d))
        ready.set()
        try:
            result.put((got.get(timeout=10), sorted(_listener_threads())))
        except queue.Empty:
            result.put((None, []))

    proc = ctx.Process(target=child)
    proc.start()
    try:
        assert ready.wait(20)
        pub = _publisher(cluster)
        wait_for(lambda: pub.execute_command("SPUBLISH", "c2fork:lock:{child}", "hi") >= 1,
                 10.0, "the child's subscription")
        pub.close()
        data, threads = result.get(timeout=20)
        assert data == b"hi"
        assert 1 <= len(threads) <= 4
    finally:
        proc.join(timeout=20)
    assert proc.exitcode == 0
    reg.close()
    coord.close()
    wait_for(lambda: _listener_threads() == [], 5.0, "threads stopped by close()")
