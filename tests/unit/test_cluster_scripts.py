"""Every Lua script is Cluster-safe: the keys of one call (and the channel it publishes
on) share one hash slot, and the sharded variant only swaps PUBLISH for SPUBLISH.

The workload runs every primitive on ``memory://`` in both shells, recording each script
call at the backends' one entry point (``run_script``); no server needed.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import uuid
from importlib import resources
from typing import Any

import pytest
from redis.crc import key_slot

import flexisync
import flexisync.aio
from flexisync._connection import Backend, load_script
from flexisync.aio._backend import AsyncBackend

pytest.importorskip("fakeredis")

SCRIPTS = sorted(
    p.name[:-4] for p in resources.files("flexisync._scripts").iterdir()
    if p.name.endswith(".lua") and not p.name.endswith("_lib.lua"))


def _slot(text: str) -> int:
    return int(key_slot(text.encode()))


def _record(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, list[str], list[Any]]]:
    calls: list[tuple[str, list[str], list[Any]]] = []
    sync_run, async_run = Backend.run_script, AsyncBackend.run_script

    def run(self: Backend, operation: str, name: str, keys: Any, args: Any,
            **kwargs: Any) -> Any:
        calls.append((name, list(keys), list(args)))
        return sync_run(self, operation, name, keys, args, **kwargs)

    async def arun(self: AsyncBackend, operation: str, name: str, keys: Any, args: Any,
                   **kwargs: Any) -> Any:
        calls.append((name, list(keys), list(args)))
        return await async_run(self, operation, name, keys, args, **kwargs)

    monkeypatch.setattr(Backend, "run_script", run)
    monkeypatch.setattr(AsyncBackend, "run_script", arun)
    return calls


def _sync_workload(url: str) -> None:
    with flexisync.connect(url, namespace="slots") as sync:
        store = sync.state("scope")
        store.set("a", 1)
        store.incr("n", 2, ttl=60)
        store.update("a", lambda v: (v or 0) + 1)
        for fair in (False, True):
            lock = sync.lock(f"job-{fair}", ttl=5, fair=fair)
            assert lock.acquire()
            lock.extend(5)
            other = sync.lock(f"job-{fair}", ttl=5, fair=fair)
            assert not other.acquire(timeout=0.05)  # gives its attempt up: lock_abandon
            lock.release()
        sem = sync.semaphore("pool", 1, lease=5)
        assert sem.acquire()
        sem.extend(5)
        sem.info()
        assert not sync.semaphore("pool", 1, lease=5).acquire(timeout=0.05)
        sem.release()
        limiter = sync.rate_limiter("api", 100, per=1)
        limiter.acquire().settle(0.5)
        stream = sync.stream("audit")
        first = stream.append({"i": 1})
        stream.read_after(first)
        stream.read_after(None)
        breaker = sync.breaker("dep", failure_threshold=1, recovery_timeout=0.05)

        def fail() -> None:
            raise ValueError("down")

        with pytest.raises(ValueError, match="down"):
            breaker.call(fail)
        breaker.reset()
        breaker.call(lambda: None)
        flexisync.breaker.breaker_info(sync, "dep")


async def _async_workload(url: str) -> None:
    coordinator = flexisync.aio.connect(url, namespace="slots")
    try:
        store = coordinator.state("scope")
        await store.set("a", 1)
        await store.incr("n", ttl=60)
        async with coordinator.lock("ajob", ttl=5):
            pass
        sem = coordinator.semaphore("apool", 2, lease=5)
        async with sem:
            pass
        await coordinator.stream("astream").append({"i": 1})
    finally:
        await coordinator.aclose()


def test_every_script_call_stays_in_one_slot(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each recorded call: all KEYS in one slot; a channel argument with a hash tag in
    that slot too (its script SPUBLISHes there on a cluster)."""
    calls = _record(monkeypatch)
    url = f"memory://slots-{uuid.uuid4().hex}"
    _sync_workload(url)
    asyncio.run(_async_workload(url))
    seen = {name for name, _keys, _args in calls}
    assert {"state_incr", "state_cas", "lock_acquire", "lock_release", "lock_extend",
            "lock_abandon", "semaphore_acquire", "semaphore_release", "semaphore_extend",
            "stream_append", "stream_read", "breaker_record", "breaker_command",
            "breaker_read"} <= seen, sorted(set(SCRIPTS) - seen)
    channels = 0
    for name, keys, args in calls:
        assert keys, f"{name} was run without KEYS (a cluster could not route it)"
        slots = {_slot(k) for k in keys}
        if name == "breaker_versions":
            # The batch refresh: one call for many breakers off a Cluster; on a Cluster
            # one call per slot (tests/unit/test_breaker_refresh_groups.py).
            continue
        assert len(slots) == 1, f"{name} touches keys in {len(slots)} slots: {keys}"
        for arg in args:
            if isinstance(arg, str) and arg.startswith("slots:") and "{" in arg:
                channels += 1
                assert _slot(arg) in slots, f"{name} publishes on {arg} outside its slot"
    assert channels > 0  # the channel check above did run


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_uses_only_declared_keys(name: str) -> None:
    """No script builds a key name (``KEYS[i] .. 'x'``) or reads one from ARGV into a
    key-taking command: a cluster routes a script only by its declared KEYS."""
    text = load_script(name)
    assert not re.search(r"KEYS\[\d+\]\s*\.\.", text), f"{name} builds a key from KEYS"
    for call in re.findall(r"redis\.p?call\('([A-Z]+)',\s*([^,)]+)", text):
        command, first = call
        if command in ("PUBLISH", "TIME"):
            continue
        assert not first.strip().startswith("ARGV"), f"{name}: {command} on an ARGV key"


@pytest.mark.parametrize("name", SCRIPTS)
def test_sharded_variant_only_swaps_publish(name: str) -> None:
    """The cluster text is the single-node text with every PUBLISH an SPUBLISH; its
    SHA1 (EVALSHA) is that of the text that runs."""
    plain, sharded = load_script(name), load_script(name, sharded=True)
    assert "redis.call('PUBLISH'" not in sharded
    assert sharded.replace("redis.call('SPUBLISH', ", "redis.call('PUBLISH', ") == plain
    publishes = plain.count("redis.call('PUBLISH', ")
    assert sharded.count("redis.call('SPUBLISH', ") == publishes
    if publishes:
        digest = [hashlib.sha1(t.encode(), usedforsecurity=False).digest()
                  for t in (plain, sharded)]
        assert digest[0] != digest[1]
