"""Durable streams: append, read strictly after an id, trimming, TTL, follow, bad input."""

from __future__ import annotations

import threading
import time

import pytest
import redis

import flexisync
from flexisync._core import followers
from flexisync._core.followers import reader_of
from flexisync.streams import Stream
from tests.helpers import wait_until


def key(sync: flexisync.Coordinator, name: str) -> str:
    return f"{sync.namespace}:stream:{{{name}}}"


def ids_of(events: list[flexisync.Event]) -> list[str]:
    return [e.id for e in events]


# --- append and read -----------------------------------------------------------------


def test_append_returns_increasing_ids_and_events_read_back(
        sync: flexisync.Coordinator) -> None:
    """append() returns the entry id; read_after(None) returns every event in order."""
    stream = sync.stream("log")
    ids = [stream.append({"line": i}, type="stdout") for i in range(5)]
    assert ids == sorted(ids, key=lambda s: tuple(map(int, s.split("-"))))
    assert len(set(ids)) == 5
    events = stream.read_after()
    assert ids_of(events) == ids
    first = events[0]
    assert (first.topic, first.type, first.data) == ("log", "stdout", {"line": 0})
    assert first.source.endswith(":" + str(__import__("os").getpid()))
    assert abs(first.time - time.time()) < 60


def test_read_after_is_strictly_after_and_empty_after_the_last(
        sync: flexisync.Coordinator) -> None:
    """read_after(id) excludes id itself; after the newest id it returns []."""
    stream = sync.stream("strict")
    ids = [stream.append(i) for i in range(6)]
    assert [e.data for e in stream.read_after(ids[2])] == [3, 4, 5]
    assert [e.data for e in stream.read_after(ids[2], count=2)] == [3, 4]
    assert stream.read_after(ids[-1]) == []
    assert [e.data for e in stream.read_after("0-0")] == list(range(6))


def test_last_id_len_and_delete(sync: flexisync.Coordinator, raw: redis.Redis) -> None:
    """last_id/len follow appends; delete() removes the key; an absent stream is empty."""
    stream = sync.stream("meta")
    assert stream.last_id() is None
    assert len(stream) == 0
    assert stream.read_after() == []
    assert stream.read_after("1-0") == []
    first = stream.append("a")
    second = stream.append("b")
    assert stream.last_id() == second != first
    assert len(stream) == 2
    assert raw.exists(key(sync, "meta")) == 1
    assert stream.delete() is True
    assert raw.exists(key(sync, "meta")) == 0
    assert stream.delete() is False
    assert stream.last_id() is None


def test_two_handles_in_one_namespace_share_the_stream(sync: flexisync.Coordinator,
                                                       flexisync_url: str) -> None:
    """The same name from another Coordinator reads what this one appended."""
    event_id = sync.stream("shared").append({"x": 1})
    with flexisync.connect(flexisync_url, namespace=sync.namespace) as other:
        events = other.stream("shared").read_after()
    assert ids_of(events) == [event_id]


def test_entries_added_by_other_programs_are_readable(sync: flexisync.Coordinator,
                                                      raw: redis.Redis) -> None:
    """A raw XADD without flexisync's fields comes back as type 'message' with its fields."""
    stream = sync.stream("foreign")
    raw_id = raw.xadd(key(sync, "foreign"), {"temp": "21.5"})
    events = stream.read_after()
    assert len(events) == 1
    assert (events[0].id, events[0].type, events[0].data) == (raw_id, "message",
                                                             {"temp": "21.5"})


# --- trimming --------------------------------------------------------------------------


def test_maxlen_trims_and_an_evicted_resume_point_raises_events_trimmed(
        sync: flexisync.Coordinator) -> None:
    """With maxlen, old events go; resuming before the oldest raises EventsTrimmed."""
    stream = sync.stream("bounded", maxlen=10)
    ids = [stream.append(i) for i in range(500)]
    assert 10 <= len(stream) < 500
    with pytest.raises(flexisync.EventsTrimmed) as info:
        stream.read_after(ids[0])
    oldest = stream.read_after()[0].id
    assert info.value.oldest == oldest
    assert info.value.after == ids[0]
    assert info.value.stream == "bounded"
    assert [e.data for e in stream.read_after(ids[-4])] == [497, 498, 499]
    assert [e.data for e in stream.read_after(oldest)][-1] == 499
    with pytest.raises(flexisync.EventsTrimmed):
        next(iter(stream.follow(ids[0], timeout=1)))


def test_resume_point_before_an_untrimmed_stream_is_not_an_error(
        sync: flexisync.Coordinator) -> None:
    """An id older than the stream's first event, with nothing ever trimmed, reads all."""
    stream = sync.stream("fresh")
    stream.append("only")
    assert [e.data for e in stream.read_after("1-0")] == ["only"]


def _ordered(ids: list[str]) -> list[tuple[int, int]]:
    return [tuple(map(int, i.split("-"))) for i in ids]  # type: ignore[misc]


def test_events_trimmed_is_raised_only_when_an_event_after_the_resume_point_was_lost(
        sync: flexisync.Coordinator) -> None:
    """Redis trims whole nodes: a resume point that was the last entry of a trimmed node
    loses nothing (the next event is retained) and reads on; one entry earlier, the
    event right after it is gone, and EventsTrimmed says so."""
    stream = sync.stream("nodes", maxlen=3)
    ids = [stream.append({"pad": "x" * 1500, "i": i}) for i in range(12)]
    retained = ids_of(stream.read_after())
    first = ids.index(retained[0])
    assert first >= 2, "the setup must have trimmed at least two entries"
    assert ids_of(stream.read_after(ids[first - 1])) == retained
    assert ids_of(list(stream.follow(ids[first - 1], timeout=0))) == retained
    with pytest.raises(flexisync.EventsTrimmed) as info:
        stream.read_after(ids[first - 2])
    assert info.value.oldest == retained[0]
    with pytest.raises(flexisync.EventsTrimmed):
        next(iter(stream.follow(ids[first - 2], timeout=1)))


def test_a_resume_point_between_issued_ids_before_the_oldest_is_judged_exactly(
        sync: flexisync.Coordinator) -> None:
    """An id the stream never issued, lying between the last trimmed id and the oldest
    retained one, loses nothing; one just below the last trimmed id does."""
    stream = sync.stream("between", maxlen=3)
    ids = [stream.append("y" * 1500) for _ in range(12)]
    retained = ids_of(stream.read_after())
    first = ids.index(retained[0])
    ms, seq = map(int, ids[first - 1].split("-"))
    assert ids_of(stream.read_after(f"{ms}-{seq + 1}")) in (retained, retained[1:])
    below = f"{ms}-{seq - 1}" if seq else f"{ms - 1}-99999"
    with pytest.raises(flexisync.EventsTrimmed):
        stream.read_after(below)


def test_an_id_beyond_the_newest_raises_unknown_resume_point(
        sync: flexisync.Coordinator) -> None:
    """A well-formed id the stream never issued, beyond its newest (a fabricated or
    foreign Last-Event-ID), is an UnknownResumePoint (an EventsTrimmed) from read_after
    and follow, not an empty "caught up" that withholds every new event."""
    from flexisync.streams import UnknownResumePoint

    stream = sync.stream("ahead")
    ids = [stream.append(i) for i in range(3)]
    ms = int(ids[-1].split("-")[0])
    for bogus in (f"{ms + 3_600_000}-0", f"{ms}-{10**9}",
                  f"{2**64 - 1}-{2**64 - 1}"):
        with pytest.raises(UnknownResumePoint) as info:
            stream.read_after(bogus)
        assert isinstance(info.value, flexisync.EventsTrimmed)
        assert (info.value.after, info.value.newest) == (bogus, ids[-1])
        assert bogus in str(info.value)
        follower = stream.follow(bogus, timeout=5)
        started = time.monotonic()
        with pytest.raises(UnknownResumePoint):
            next(iter(follower))
        assert time.monotonic() - started < 4, "raised at once, not after the timeout"
    assert stream.read_after(ids[-1]) == [], "the newest id itself is caught up"


def test_an_id_ahead_of_the_clock_is_unknown_to_a_stream_that_does_not_exist(
        sync: flexisync.Coordinator) -> None:
    """For a missing stream, an id ahead of the server's clock is unknown (new events
    would get smaller ids); an id in the past reads as empty."""
    from flexisync.streams import UnknownResumePoint

    stream = sync.stream("absent")
    future = f"{int(time.time() * 1000) + 86_400_000}-0"
    with pytest.raises(UnknownResumePoint) as info:
        stream.read_after(future)
    assert info.value.newest is None
    assert stream.read_after("1-0") == []
    assert stream.read_after(f"{int(time.time() * 1000) - 1000}-5") == []


# --- foreign payloads -------------------------------------------------------------------


@pytest.mark.parametrize(("data", "kind"), [
    ("not json", "message"),
    ("[" * 100_000 + "]" * 100_000, "message"),
    (b"\xff\xfe", "message"),
    ("NaN", "message"),
    ("1", "a\nevent: injected"),
])
def test_foreign_payloads_give_decode_error_never_a_crash(
        sync: flexisync.Coordinator, raw: redis.Redis, data: str | bytes, kind: str) -> None:
    """An entry with flexisync's fields whose data is not JSON, nests 100,000 levels or
    is not UTF-8, or whose type could break an SSE frame, raises DecodeError (naming the
    stream and entry) from read_after and follow, never RecursionError; follow yields
    every good event before it, and resuming after the bad id skips it."""
    stream = sync.stream("hostile")
    good = stream.append("before")
    bad = str(raw.xadd(key(sync, "hostile"), {"type": kind, "data": data, "time": "1"}))
    after = stream.append("after")
    with pytest.raises(flexisync.DecodeError) as info:
        stream.read_after()
    assert info.value.key == f"hostile#{bad}"
    follower = stream.follow(timeout=5)
    assert next(follower).id == good
    with pytest.raises(flexisync.DecodeError):
        next(follower)
    assert ids_of(stream.read_after(bad)) == [after]


# --- ttl --------------------------------------------------------------------------------


def test_ttl_is_set_and_refreshed_on_every_append(sync: flexisync.Coordinator,
                                                  raw: redis.Redis) -> None:
    """ttl puts an expiry on the stream key and each append resets it; it then expires."""
    stream = sync.stream("temp", ttl=30.0)
    stream.append(1)
    assert 0 < raw.pttl(key(sync, "temp")) <= 30_000
    raw.pexpire(key(sync, "temp"), 5_000)
    stream.append(2)
    assert raw.pttl(key(sync, "temp")) > 5_000, "append did not refresh the expiry"
    short = sync.stream("short", ttl=0.2)
    short.append("gone soon")
    wait_until(lambda: len(short) == 0, timeout=5, message="stream expired")  # time under test
    assert raw.exists(key(sync, "short")) == 0


def test_stream_with_ttl_none_never_expires(sync: flexisync.Coordinator,
                                            raw: redis.Redis) -> None:
    """ttl=None, asked for explicitly: the key has no expiry."""
    sync.stream("forever", ttl=None).append(1)
    assert raw.pttl(key(sync, "forever")) == -1


def test_streams_expire_seven_days_after_the_last_append_by_default(
        sync: flexisync.Coordinator, raw: redis.Redis) -> None:
    """Without a ttl argument a stream gets DEFAULT_TTL (7 days), refreshed by every
    append, so names used once do not pile up in Redis forever."""
    from flexisync.streams import DEFAULT_TTL

    assert DEFAULT_TTL == 7 * 24 * 3600
    stream = sync.stream("defaulted")
    assert stream.ttl == DEFAULT_TTL
    stream.append(1)
    week_ms = DEFAULT_TTL * 1000
    assert week_ms - 60_000 < raw.pttl(key(sync, "defaulted")) <= week_ms
    raw.pexpire(key(sync, "defaulted"), 5_000)
    stream.append(2)
    assert raw.pttl(key(sync, "defaulted")) > week_ms - 60_000, "append refreshes the ttl"


# --- follow -----------------------------------------------------------------------------


def test_follow_replays_then_waits_for_live_events(sync: flexisync.Coordinator) -> None:
    """follow() yields the backlog, then events appended later, and stops on until()."""
    stream = sync.stream("live")
    stream.append(0)
    stream.append(1)
    seen: list[int] = []
    proceed = threading.Event()

    def writer() -> None:
        assert proceed.wait(10)
        for i in range(2, 5):
            stream.append(i)
        stream.append(None, type="done")

    thread = threading.Thread(target=writer)
    thread.start()
    for event in stream.follow(timeout=30, until=lambda e: e.type == "done"):
        seen.append(event.data)
        if event.data == 1:
            proceed.set()
    thread.join(10)
    assert seen == [0, 1, 2, 3, 4, None]


def test_follow_stops_after_timeout_without_events(sync: flexisync.Coordinator) -> None:
    """timeout: the generator ends when that long passes with no new event."""
    stream = sync.stream("quiet")
    last = stream.append("x")
    started = time.monotonic()
    assert list(stream.follow(last, timeout=0.3)) == []
    assert time.monotonic() - started >= 0.3  # the thing under test is time


def test_follow_holds_no_connection_and_closing_it_leaves_the_reader(
        sync: flexisync.Coordinator, raw: redis.Redis) -> None:
    """A waiting follower holds no connection of its own (no XREAD BLOCK); closing the
    generator frees its place at the stream's reader and the wake-up subscription."""
    stream = sync.stream("conns")
    stream.append(1)
    follower = stream.follow(timeout=30)
    assert next(follower).data == 1
    got: list[object] = []
    thread = threading.Thread(target=lambda: got.append(next(follower).data))
    thread.start()
    reader = reader_of(sync._ctx)
    wait_until(lambda: reader.followers() == {"conns": 1}, message="follower registered")
    assert not any(c["cmd"] == "xread" for c in raw.client_list())
    stream.append(2)
    thread.join(10)
    assert got == [2]
    listener = sync._ctx.listener
    assert listener.table_sizes()["handlers"] >= 1
    follower.close()
    assert reader.followers() == {}
    wait_until(lambda: listener.table_sizes()["handlers"] == 0,
               message="the wake-up channel unsubscribed")


# --- bad input ----------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["abc", "1-", "-1", "1-2-3", "", " 1-0", "1.5-0",
                                 "99999999999999999999-0", 17, b"1-0", "1-0\n",
                                 "\uff11-0", "1-\u0661"])
def test_malformed_ids_raise_config_error(sync: flexisync.Coordinator, bad: object) -> None:
    """read_after/follow reject malformed ids with ConfigError (a ValueError), eagerly;
    digits must be ASCII (a fullwidth or Arabic-Indic digit is not an id)."""
    stream = sync.stream("ids")
    with pytest.raises(ValueError, match="after") as info:
        stream.read_after(bad)  # type: ignore[arg-type]
    assert isinstance(info.value, flexisync.ConfigError)
    with pytest.raises(flexisync.ConfigError):
        stream.follow(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("maxlen", [0, -5, True, 2.5, "100"])
def test_bad_maxlen_raises_config_error(sync: flexisync.Coordinator, maxlen: object) -> None:
    """maxlen must be an int >= 1 or None."""
    with pytest.raises(flexisync.ConfigError, match="maxlen"):
        sync.stream("m", maxlen=maxlen)  # type: ignore[arg-type]


def test_other_bad_arguments(sync: flexisync.Coordinator) -> None:
    """Bad names, ttl, count, timeout, until, type and non-JSON data are refused."""
    with pytest.raises(flexisync.ConfigError):
        sync.stream("bad name")
    with pytest.raises(flexisync.ConfigError):
        sync.stream("t", ttl=0)
    with pytest.raises(flexisync.ConfigError):
        Stream(sync._ctx, "t", maxlen=None, ttl=-1.0)
    stream = sync.stream("args")
    with pytest.raises(flexisync.ConfigError, match="count"):
        stream.read_after(count=0)
    with pytest.raises(flexisync.ConfigError, match="timeout"):
        stream.follow(timeout=-1)
    with pytest.raises(flexisync.ConfigError, match="until"):
        stream.follow(until=5)  # type: ignore[arg-type]
    with pytest.raises(flexisync.ConfigError, match="event type"):
        stream.append(1, type="a b")
    with pytest.raises(TypeError):
        stream.append({"when": object()})
    assert len(stream) == 0, "a refused append wrote nothing"


def test_works_with_a_user_client_that_decodes_responses(flexisync_url: str,
                                                         namespace: str) -> None:
    """A client passed in with decode_responses=True reads, trims and follows the same."""
    client = redis.Redis.from_url(flexisync_url, decode_responses=True)
    with flexisync.connect(client=client, namespace=namespace) as sync:
        stream = sync.stream("decoded", maxlen=5)
        ids = [stream.append({"i": i}, type="n") for i in range(300)]
        assert [e.data for e in stream.read_after(ids[-3])] == [{"i": 298}, {"i": 299}]
        assert stream.last_id() == ids[-1]
        with pytest.raises(flexisync.EventsTrimmed):
            stream.read_after(ids[0])
        follower = stream.follow(ids[-2], timeout=5)
        assert next(follower).id == ids[-1]
        follower.close()
    client.close()


# --- the shared reader ------------------------------------------------------------------


def test_a_follower_that_falls_behind_rereads_from_redis_without_gap(
        sync: flexisync.Coordinator, monkeypatch: pytest.MonkeyPatch) -> None:
    """More entries waiting for a follower than the reader keeps for it: the follower
    re-reads from Redis after its last event, so nothing is lost or repeated."""
    monkeypatch.setattr(followers, "MEMBER_MAX", 5)
    stream = sync.stream("behind", maxlen=None)
    stream.append(0)
    follower = stream.follow(timeout=30, until=lambda e: e.type == "done")
    assert next(follower).data == 0
    reader = reader_of(sync._ctx)
    fetches = reader.fetches
    for i in range(1, 40):
        stream.append(i)
    stream.append(None, type="done")
    wait_until(lambda: reader.fetches > fetches and not reader._dirty,
               message="the reader fetched the new entries")
    assert [e.data for e in follower] == [*range(1, 40), None]


def test_a_follower_behind_a_trim_raises_events_trimmed(
        sync: flexisync.Coordinator, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fallen behind both the reader's buffer and the stream's trimming: EventsTrimmed,
    after every event it could still yield in order."""
    monkeypatch.setattr(followers, "MEMBER_MAX", 5)
    stream = sync.stream("trimmed-live", maxlen=10)
    stream.append(0)
    follower = stream.follow(timeout=30)
    assert next(follower).data == 0
    for i in range(1, 400):
        stream.append(i)
    with pytest.raises(flexisync.EventsTrimmed):
        next(follower)
    follower.close()
    assert reader_of(sync._ctx).followers() == {}
