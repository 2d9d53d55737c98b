"""The periodic refresh of breaker mirrors, batched per process (issue 13, item 1): one
``breaker_versions`` script call per refresh for up to 500 breakers (per hash slot on a
Cluster), and a full read only for the records that moved or hold foreign data."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import pytest
import redis
from redis.crc import key_slot
from structlog.testing import capture_logs

import flexisync
from flexisync._connection import load_script
from flexisync.breaker._hub import hub_of
from flexisync.testing import delete_namespace
from tests.helpers import wait_until


class Recorder:
    """Every script call and every other backend call a Coordinator makes."""

    def __init__(self, coordinator: flexisync.Coordinator,
                 monkeypatch: pytest.MonkeyPatch) -> None:
        self.scripts: list[tuple[str, list[str]]] = []
        self.calls: list[str] = []
        backend = coordinator._ctx.backend
        run_script, call = backend.run_script, backend.call

        def recording_script(operation: str, name: str, keys: Any, args: Any,
                             **kwargs: Any) -> Any:
            self.scripts.append((name, list(keys)))
            return run_script(operation, name, keys, args, **kwargs)

        def recording_call(operation: str, fn: Any, **kwargs: Any) -> Any:
            self.calls.append(operation)
            return call(operation, fn, **kwargs)

        monkeypatch.setattr(backend, "run_script", recording_script)
        monkeypatch.setattr(backend, "call", recording_call)

    def clear(self) -> None:
        self.scripts.clear()
        self.calls.clear()

    def named(self, name: str) -> list[list[str]]:
        return [keys for script, keys in list(self.scripts) if script == name]


def state_key(coordinator: flexisync.Coordinator, name: str) -> str:
    return coordinator._ctx.keys.key("breaker", name)


def all_keys(coordinator: flexisync.Coordinator, name: str) -> list[str]:
    k = coordinator._ctx.keys
    return [k.key("breaker", name), k.key("breaker", name, "window"),
            k.key("breaker", name, "probes")]


def silent_trip(client: Any, coordinator: flexisync.Coordinator, name: str) -> None:
    """Trip ``name`` the way another process would, but publish the transition on a
    channel nobody listens to: the mirrors miss the message."""
    client.eval(load_script("breaker_command"), 3, *all_keys(coordinator, name),
                "nobody-listens", "trip", 60_000, 60_000)


def events(logs: Sequence[Mapping[str, Any]], name: str) -> list[Mapping[str, Any]]:
    return [entry for entry in logs if entry["event"] == name]


def test_idle_breakers_cost_a_couple_of_script_calls_per_refresh(
        sync: flexisync.Coordinator, monkeypatch: pytest.MonkeyPatch) -> None:
    """200 idle breakers (refresh_interval 0.4 s): the process's backend calls over
    several intervals are ``breaker_versions`` calls covering all of them, at most about
    one per interval, and no breaker reads its record (the old refresh made one
    ``breaker_read`` per breaker per interval)."""
    interval, count = 0.4, 200
    breakers = [sync.breaker(f"b{i}", refresh_interval=interval) for i in range(count)]
    for breaker in breakers:
        breaker.call(lambda: None)
    recorder = Recorder(sync, monkeypatch)
    wait_until(lambda: len(recorder.named("breaker_versions")) >= 2, timeout=30,
               message="two batch refreshes")  # the mirrors settle into one batch
    recorder.clear()
    started = time.monotonic()
    wait_until(lambda: len(recorder.named("breaker_versions")) >= 5, timeout=60,
               message="five more batch refreshes")
    elapsed = time.monotonic() - started
    batches = recorder.named("breaker_versions")
    intervals = elapsed / interval
    # Besides the batches, at most the fleet stats of the calls made while setting up.
    others = [c for c in recorder.calls if c != "breaker.versions"]
    assert others in ([], ["breaker.stats"]), recorder.calls
    assert len(batches) <= 2 * (intervals + 1), (len(batches), intervals)
    assert len(batches) * 50 < count * intervals  # what one read per breaker would cost
    assert recorder.named("breaker_read") == []
    expected = {state_key(sync, f"b{i}") for i in range(count)}
    assert all(set(keys) == expected for keys in batches[1:]), [len(k) for k in batches]


def test_a_missed_transition_is_picked_up_through_the_batch(
        sync: flexisync.Coordinator, raw: redis.Redis,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Another client trips one of 20 breakers and its message is lost: the mirror turns
    open through the batch, which reads that one record in full and no other."""
    breakers = [sync.breaker(f"b{i}", refresh_interval=0.3) for i in range(20)]
    for breaker in breakers:
        breaker.call(lambda: None)
    recorder = Recorder(sync, monkeypatch)
    silent_trip(raw, sync, "b7")
    wait_until(lambda: breakers[7].stats().state == "open", timeout=15,
               message="missed trip mirrored by the refresh")
    assert [b.stats().state for b in breakers].count("open") == 1
    reads = recorder.named("breaker_read")
    assert reads
    assert all(keys[0] == state_key(sync, "b7") for keys in reads), reads
    assert any(state_key(sync, "b7") in keys for keys in recorder.named("breaker_versions"))


def test_a_reconnect_refreshes_through_the_batch_at_once(
        sync: flexisync.Coordinator, raw: redis.Redis,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """After the listener reconnects (messages may have been lost), every mirror is
    refreshed by the next batch, long before its refresh_interval (60 s)."""
    breakers = [sync.breaker(f"b{i}", refresh_interval=60) for i in range(10)]
    for breaker in breakers:
        breaker.call(lambda: None)
    recorder = Recorder(sync, monkeypatch)
    silent_trip(raw, sync, "b3")
    hub_of(sync)._on_reconnect()
    wait_until(lambda: breakers[3].stats().state == "open", timeout=15,
               message="refresh after the reconnect")
    batches = recorder.named("breaker_versions")
    assert batches
    assert set(batches[0]) == {state_key(sync, f"b{i}") for i in range(10)}
    assert all(keys[0] == state_key(sync, "b3") for keys in recorder.named("breaker_read"))


def test_a_foreign_key_is_read_in_full_and_the_others_keep_refreshing(
        sync: flexisync.Coordinator, raw: redis.Redis) -> None:
    """A string where one breaker's record belongs is read in full by its mirror
    (``breaker.record_malformed``, local fallback, the string left alone); a record with
    a foreign field value is repaired (``breaker.record_repaired``); a missed transition
    of a third breaker in the same batch is still picked up."""
    breakers = [sync.breaker(f"b{i}", refresh_interval=0.3) for i in range(5)]
    for breaker in breakers:
        breaker.call(lambda: None)
    with capture_logs() as logs:
        raw.delete(state_key(sync, "b1"))
        raw.set(state_key(sync, "b1"), "someone else's")
        raw.hset(state_key(sync, "b2"), "state", "exploded")
        silent_trip(raw, sync, "b4")
        wait_until(lambda: breakers[4].stats().state == "open", timeout=15,
                   message="missed trip mirrored despite the foreign keys")
        wait_until(lambda: not breakers[1].stats().backend_available, timeout=15,
                   message="foreign key reported")
        wait_until(lambda: events(logs, "breaker.record_repaired"), timeout=15,
                   message="foreign field repaired")
    malformed = events(logs, "breaker.record_malformed")
    assert [entry["breaker"] for entry in malformed] == ["b1"], malformed
    assert {entry["breaker"] for entry in events(logs, "breaker.record_repaired")} == {"b2"}
    assert raw.get(state_key(sync, "b1")) == "someone else's"
    assert raw.hget(state_key(sync, "b2"), "state") in ("closed", None)
    assert breakers[2].state == "closed"
    assert [b.stats().backend_available for b in breakers] == [True, False, True, True, True]


def test_mirrors_with_a_short_interval_keep_their_bound_among_long_ones(
        sync: flexisync.Coordinator, raw: redis.Redis,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Mirrors of different refresh_intervals share the process's batches: one with
    0.3 s among ones with 60 s still sees a missed transition within seconds, and the
    60 s ones are not read each time."""
    slow = [sync.breaker(f"slow{i}", refresh_interval=60) for i in range(10)]
    fast = sync.breaker("fast", refresh_interval=0.3)
    for breaker in (*slow, fast):
        breaker.call(lambda: None)
    recorder = Recorder(sync, monkeypatch)
    wait_until(lambda: len(recorder.named("breaker_versions")) >= 3, timeout=30,
               message="three batch refreshes")
    assert all(keys == [state_key(sync, "fast")]
               for keys in recorder.named("breaker_versions")), recorder.scripts
    silent_trip(raw, sync, "fast")
    wait_until(lambda: fast.stats().state == "open", timeout=15,
               message="missed trip of the short-interval breaker")


def same_slot_names() -> tuple[str, str]:
    """Two breaker names whose keys share one hash slot."""
    seen: dict[int, str] = {}
    i = 0
    while True:
        name = f"s{i}"
        slot = int(key_slot(name.encode()))
        if slot in seen:
            return seen[slot], name
        seen[slot] = name
        i += 1


@pytest.fixture
def cluster_sync(cluster_url: str) -> Iterator[flexisync.Coordinator]:
    namespace = f"refresh-{uuid.uuid4().hex[:8]}"
    with flexisync.connect(cluster_url, namespace=namespace) as coordinator:
        yield coordinator
        delete_namespace(coordinator.client, namespace)


def test_cluster_refresh_sends_one_call_per_slot(
        cluster_sync: flexisync.Coordinator, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a Cluster every ``breaker_versions`` call holds keys of one hash slot, the
    calls of a batch cover every breaker (two breakers of one slot share a call), and a
    missed transition is picked up."""
    sync = cluster_sync
    pair = same_slot_names()
    names = [f"c{i}" for i in range(12)] + list(pair)
    breakers = {n: sync.breaker(n, refresh_interval=0.3) for n in names}
    for breaker in breakers.values():
        breaker.call(lambda: None)
    recorder = Recorder(sync, monkeypatch)
    silent_trip(sync.client, sync, "c5")
    wait_until(lambda: breakers["c5"].stats().state == "open", timeout=20,
               message="missed trip mirrored on the cluster")
    wanted = {state_key(sync, n) for n in names}
    wait_until(lambda: {k for keys in recorder.named("breaker_versions") for k in keys}
               == wanted, timeout=20, message="batches covering every breaker")
    batches = recorder.named("breaker_versions")
    for keys in batches:
        assert len({key_slot(k.encode()) for k in keys}) == 1, keys
    assert sorted(state_key(sync, n) for n in pair) in [sorted(k) for k in batches]
    assert all(keys[0] == state_key(sync, "c5") for keys in recorder.named("breaker_read"))


def test_versions_script_agrees_with_the_full_read(
        sync: flexisync.Coordinator, raw: redis.Redis) -> None:
    """``breaker_versions`` reports for each record the epoch and version
    ``breaker_read`` reports ('', 0 for no record), and '', -1 for a key that is not a
    hash or holds a foreign value in a field flexisync owns."""
    tripped = sync.breaker("tripped", failure_threshold=3)
    tripped.trip(30)
    counting = sync.breaker("counting", failure_threshold=3)
    with pytest.raises(ValueError, match="down"):
        counting.call(lambda: (_ for _ in ()).throw(ValueError("down")))
    raw.set(state_key(sync, "string"), "someone else's")
    raw.hset(state_key(sync, "field"), mapping={"epoch": "1.2", "version": "x"})
    raw.hset(state_key(sync, "noepoch"), mapping={"version": 3, "other": "anything"})
    names = ["tripped", "counting", "missing", "string", "field", "noepoch"]
    reply = raw.eval(load_script("breaker_versions"), len(names),
                     *[state_key(sync, n) for n in names])
    rows = [tuple(reply[i:i + 2]) for i in range(0, len(reply), 2)]
    read = load_script("breaker_read")
    for name, row in zip(["tripped", "counting", "missing", "noepoch"],
                         [rows[0], rows[1], rows[2], rows[5]], strict=True):
        full = raw.eval(read, 3, *all_keys(sync, name), "ch", 0)
        assert row == (full[0], full[1]), (name, row, full[:5])
    assert rows[1][1] == 1  # the first failure was published (failures left zero)
    assert rows[2] == ("", 0)
    assert rows[3] == ("", -1)
    assert rows[4] == ("", -1)
    assert raw.get(state_key(sync, "string")) == "someone else's"  # nothing written
    assert raw.exists(state_key(sync, "missing")) == 0


def test_idle_breakers_are_not_visited_by_the_tick(sync: flexisync.Coordinator) -> None:
    """Used and then idle consecutive-failure breakers leave the hub's active set empty
    (the 100 ms tick does nothing per breaker); a failure-rate breaker stays in it (its
    successes are always flushed)."""
    counted = [sync.breaker(f"b{i}") for i in range(50)]
    for breaker in counted:
        breaker.call(lambda: None)
    hub = hub_of(sync)
    wait_until(lambda: not hub._active, timeout=10, message="active set emptied")
    rated = sync.breaker("rated", failure_rate=0.5)
    rated.call(lambda: None)
    assert set(hub._active) == {rated._core}


def test_successes_before_another_coordinators_failure_do_not_reset_its_count(
        flexisync_url: str, sync: flexisync.Coordinator, raw: redis.Redis) -> None:
    """Successes a Coordinator aggregated while no failure was pending are dropped when
    another Coordinator's failure (its own connection and mirror) makes the count
    non-zero - they are older than it; a success after that resets the count, flushed
    by the tick."""
    breaker = sync.breaker("shared", failure_threshold=3)
    for _ in range(5):
        breaker.call(lambda: None)
    core = breaker._core
    with flexisync.connect(flexisync_url, namespace=sync.namespace) as other, \
            pytest.raises(ValueError, match="down"):
        other.breaker("shared", failure_threshold=3).call(
            lambda: (_ for _ in ()).throw(ValueError("down")))
    wait_until(lambda: breaker.stats().failures == 1, timeout=10,
               message="the other process's failure mirrored")
    assert core in hub_of(sync)._active
    core._tick(time.monotonic())  # what the hub's next tick does: nothing to flush
    assert raw.hget(state_key(sync, "shared"), "failures") == "1"
    breaker.call(lambda: None)
    wait_until(lambda: raw.hget(state_key(sync, "shared"), "failures") == "0",
               timeout=10, message="a later success flushed")
