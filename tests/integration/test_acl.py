"""The least-privilege ACL of docs/operating.md, run for real.

A private redis-server gets a user made from exactly the ``ACL SETUSER`` line in
docs/operating.md (parsed out of the document, so the docs and this test cannot drift).
As that user, on database 3 and with a ``client_name`` (so ``SELECT`` and ``CLIENT
SETNAME`` are exercised), every primitive runs, and ``flexisync doctor`` reports every
check passed. Each documented rule is then removed in turn, and the doctor must notice:
so the line grants nothing flexisync does not use, and the doctor checks all of it.
The 6379 server is never touched.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import structlog

import flexisync
from flexisync import cli, embedded
from flexisync.breaker import list_breakers
from flexisync.cli._doctor import diagnose
from flexisync.locks import list_locks
from flexisync.streams import Stream
from tests.helpers import wait_until

DOCS = Path(__file__).resolve().parents[2] / "docs" / "operating.md"
PASSWORD = "CHANGE-ME"  # noqa: S105  (the documented line's placeholder, used as is)
DB = 3
GLOB = "jobs.*"  # the glob topic the documented line grants


def documented_acl() -> list[str]:
    """The words of the ``ACL SETUSER`` line under "ACL: least privilege" in the docs."""
    text = DOCS.read_text()
    section = text[text.index("**ACL: least privilege.**"):]
    found = re.search(r"```\n(ACL SETUSER [^\n]+)\n```", section)
    assert found, "docs/operating.md: no ACL SETUSER block in the ACL section"
    words = found.group(1).split()
    assert words[:5] == ["ACL", "SETUSER", "app", "on", f">{PASSWORD}"], words[:5]
    return words


def _rules() -> list[str]:
    """The documented grants: key and channel patterns and +commands."""
    return [w for w in documented_acl()[5:] if w[0] in "~&+"]


@pytest.fixture(scope="module")
def acl_server() -> Iterator[embedded.EmbeddedRedis]:
    """A private redis-server for this module's users (never the shared 6379 one)."""
    server = embedded.start()
    yield server
    server.stop()


def _create_user(server: embedded.EmbeddedRedis, words: list[str]) -> str:
    """(Re)create user ``app`` from ``words`` (a whole ACL SETUSER line); its URL."""
    admin = redis.Redis(host="127.0.0.1", port=server.port)
    try:
        admin.execute_command("ACL", "DELUSER", "app")
        admin.execute_command(*words)
    finally:
        admin.close()
    return f"redis://app:{PASSWORD}@127.0.0.1:{server.port}/{DB}?client_name=acl-test"


@pytest.fixture
def acl_url(acl_server: embedded.EmbeddedRedis) -> str:
    """A URL for a user made from exactly the documented ACL line."""
    return _create_user(acl_server, documented_acl())


@pytest.fixture
def app(acl_url: str) -> Iterator[flexisync.Coordinator]:
    """A Coordinator connected as the documented ACL user, on database 3."""
    with flexisync.connect(acl_url) as coordinator:
        yield coordinator


def test_state_works_as_the_documented_acl_user(app: flexisync.Coordinator) -> None:
    """set/get/add/update/incr/ttl/keys/items/delete/clear all pass the ACL."""
    store = app.state("acl")
    store.set("a", {"n": 1}, ttl=60)
    assert store.get("a") == {"n": 1}
    assert store.add("b", 1) is True
    assert store.add("b", 2) is False
    assert store.update("b", lambda v: v + 1) == 2
    assert store.incr("c", 5) == 5
    assert 0 < (store.ttl("a") or 0) <= 60
    assert sorted(store.keys()) == ["a", "b", "c"]
    assert store.items() == {"a": {"n": 1}, "b": 2, "c": 5}
    assert store.delete("a") is True
    assert store.clear() == 2
    assert store.keys() == []


def test_locks_work_as_the_documented_acl_user(acl_server: embedded.EmbeddedRedis,
                                               app: flexisync.Coordinator) -> None:
    """acquire/extend/release, auto_renew, list_locks, and a waiter (plain and fair)
    woken by a release through its wake-up subscription all pass the ACL."""
    lock = app.lock("job", ttl=5)
    assert lock.acquire(timeout=5)
    lock.extend(10)
    assert lock.owned()
    lock.release()

    with app.lock("renewed", ttl=0.5, auto_renew=True) as renewed:
        start = time.monotonic()  # held past three TTLs only if renewals pass the ACL
        wait_until(lambda: time.monotonic() - start > 1.5 and renewed.owned(),
                   timeout=5.0, interval=0.05, message="the lease outliving its TTL")
        assert not renewed.lost

    for fair in (False, True):  # a waiter subscribes to the lock's wake-up channel
        holder = app.lock(f"shared-{fair}", ttl=30, fair=fair)
        assert holder.acquire(timeout=5)
        assert f"shared-{fair}" in [info.name for info in list_locks(app)]
        got: list[bool] = []
        waiter = threading.Thread(target=_acquire_into, args=(app, f"shared-{fair}", fair, got))
        waiter.start()
        wait_until(lambda f=fair: _waiting(acl_server, app, f"shared-{f}"), timeout=10.0,
                   message="the waiter waiting")
        holder.release()
        waiter.join(20.0)
        assert got == [True], f"the waiter (fair={fair}) was not woken by the release"


def _acquire_into(app: flexisync.Coordinator, name: str, fair: bool,
                  got: list[bool]) -> None:
    lock = app.lock(name, ttl=30, fair=fair)
    got.append(lock.acquire(timeout=20))
    lock.release()


def _waiting(server: embedded.EmbeddedRedis, app: flexisync.Coordinator, name: str) -> bool:
    """Someone is subscribed to the lock's wake-up channel (asked as the admin)."""
    admin = redis.Redis(host="127.0.0.1", port=server.port)
    try:
        return bool(admin.pubsub_numsub(f"{app.namespace}:lock:{{{name}}}")[0][1])
    finally:
        admin.close()


def test_semaphores_work_as_the_documented_acl_user(acl_server: embedded.EmbeddedRedis,
                                                    app: flexisync.Coordinator) -> None:
    """acquire/extend/info/release, and a queued waiter woken by a release through its
    wake-up subscription, all pass the ACL."""
    sem = app.semaphore("pool", 1, lease=5)
    assert sem.acquire(timeout=5)
    sem.extend(10)
    assert sem.info().holders == 1
    got: list[bool] = []

    def wait() -> None:
        other = app.semaphore("pool", 1, lease=5)
        got.append(other.acquire(timeout=20))
        other.release()

    waiter = threading.Thread(target=wait)
    waiter.start()
    wait_until(lambda: _subscribed(acl_server, f"{app.namespace}:sem:{{pool}}"), timeout=10.0,
               message="the waiter waiting")
    sem.release()
    waiter.join(20.0)
    assert got == [True], "the waiter was not woken by the release"
    assert sem.info().holders == 0


def _subscribed(server: embedded.EmbeddedRedis, channel: str) -> bool:
    admin = redis.Redis(host="127.0.0.1", port=server.port)
    try:
        return bool(admin.pubsub_numsub(channel)[0][1])
    finally:
        admin.close()


def test_events_work_as_the_documented_acl_user(app: flexisync.Coordinator) -> None:
    """publish, subscribe to a topic, and psubscribe to the documented glob topic."""
    with app.events.subscribe("deploys") as exact, app.events.subscribe(GLOB) as glob:
        assert app.events.publish("deploys", {"v": 1}) == 1
        assert app.events.publish("jobs.nightly", {"v": 2}, type="job") == 1
        event = exact.get(timeout=10)
        assert event is not None
        assert event.data == {"v": 1}
        event = glob.get(timeout=10)
        assert event is not None
        assert (event.topic, event.data) == ("jobs.nightly", {"v": 2})


def test_streams_work_as_the_documented_acl_user(app: flexisync.Coordinator) -> None:
    """append (with and without a TTL), read_after, len, last_id and follow."""
    for stream in (app.stream("log", ttl=None), app.stream("log-ttl", ttl=60)):
        ids = [stream.append({"n": n}) for n in range(3)]
        assert [e.id for e in stream.read_after(ids[0])] == ids[1:]
        assert len(stream) == 3
        assert stream.last_id() == ids[-1]
        seen: list[str] = []
        follower = threading.Thread(target=_follow_one, args=(stream, ids[-1], seen))
        follower.start()
        new = stream.append({"n": "live"})
        follower.join(15.0)
        assert seen == [new]


def _follow_one(stream: Stream, after: str, seen: list[str]) -> None:
    seen.extend(e.id for e in stream.follow(after, timeout=10, until=lambda _e: True))


def test_breaker_works_as_the_documented_acl_user(acl_url: str,
                                                  app: flexisync.Coordinator) -> None:
    """Failures open a breaker, a second Coordinator's mirror sees it, reset closes it;
    breaker_info and list_breakers read it."""
    with structlog.testing.capture_logs(), flexisync.connect(acl_url) as other:
        mirror = other.breaker("llm", failure_threshold=2)
        assert mirror.state == "closed"
        breaker = app.breaker("llm", failure_threshold=2)
        for _ in range(2):
            with pytest.raises(RuntimeError):
                breaker.call(_fail)
        assert breaker.state == "open"
        wait_until(lambda: mirror.state == "open", 5.0, message="the mirror opening")
        assert [b.name for b in list_breakers(app)] == ["llm"]
        breaker.reset()
        wait_until(lambda: mirror.state == "closed", 5.0, message="the mirror closing")


def _fail() -> None:
    raise RuntimeError("provider down")


def test_scripts_reload_as_the_documented_acl_user(acl_server: embedded.EmbeddedRedis,
                                                   app: flexisync.Coordinator) -> None:
    """After the server forgets its scripts (a restart, SCRIPT FLUSH), NOSCRIPT is
    answered by SCRIPT LOAD, which the ACL allows."""
    app.state("s").incr("n")
    admin = redis.Redis(host="127.0.0.1", port=acl_server.port)
    try:
        admin.script_flush()
    finally:
        admin.close()
    assert app.state("s").incr("n") == 2


def test_doctor_passes_for_the_documented_acl_user(acl_url: str,
                                                   capsys: pytest.CaptureFixture[str],
                                                   ) -> None:
    """`flexisync doctor --topic 'jobs.*'` as the documented user: every check ok."""
    code = cli.main(["doctor", "--url", acl_url, "--topic", GLOB, "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0, report
    statuses = {c["name"]: c["status"] for c in report["checks"]}
    assert statuses["permissions"] == "ok", report
    assert statuses["topics"] == "ok", report
    assert "running each once" in next(c["detail"] for c in report["checks"]
                                       if c["name"] == "permissions")


@pytest.mark.parametrize("rule", _rules())
def test_the_doctor_notices_any_documented_rule_removed(
        rule: str, acl_server: embedded.EmbeddedRedis) -> None:
    """Without any one documented grant, the doctor fails a check: the documented line
    holds nothing superfluous for the doctor, and a weakened ACL cannot pass."""
    words = [w for w in documented_acl() if w != rule]
    url = _create_user(acl_server, words)
    with flexisync.connect(url) as sync:
        checks = diagnose(sync, topics=[GLOB])
    failed = [c for c in checks if c.status == "fail"]
    assert failed, f"the doctor passed an ACL without {rule}: {checks}"
