"""``flexisync doctor``'s verdicts on server facts it cannot easily meet in a test run."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

import flexisync
from flexisync.cli import _doctor as doctor
from flexisync.errors import BackendError


@pytest.mark.parametrize(("info", "status", "words"), [
    ({"redis_version": "7.2.4", "redis_mode": "standalone"}, "ok", "Redis 7.2.4, standalone"),
    ({"redis_version": "7.2.4", "server_name": "valkey", "valkey_version": "9.1.2",
      "redis_mode": "standalone"}, "ok", "Valkey 9.1.2, standalone"),
    ({"redis_version": "6.0.9", "redis_mode": "standalone"}, "fail", "needs Redis 6.2"),
    ({"redis_version": "7.2.4", "redis_mode": "sentinel"}, "fail", "redis+sentinel://"),
    ({"redis_version": "7.2.4", "redis_mode": "cluster"}, "warn", "redis+cluster://"),
    ({}, "warn", "INFO is not permitted"),
], ids=["standalone", "valkey", "too-old", "sentinel", "cluster", "no-info"])
def test_server_check(info: dict[str, Any], status: str, words: str) -> None:
    """Old versions and Sentinel nodes fail; a cluster node reached with redis:// warns
    (use redis+cluster://); unknown is a warning."""
    check = doctor._server(info)
    assert check.status == status
    assert words in check.detail


@pytest.mark.parametrize(("info", "status", "words"), [
    ({"role": "master", "connected_slaves": 0}, "ok", "role master"),
    ({"role": "master", "connected_slaves": 2}, "info", "failover can lose"),
    ({"role": "slave"}, "fail", "read-only replica"),
], ids=["alone", "with-replicas", "replica"])
def test_replication_check(info: dict[str, Any], status: str, words: str) -> None:
    """A replica is unusable; replicas earn a note about failover losing locks."""
    check = doctor._replication(info)
    assert check.status == status
    assert words in check.detail


def test_slow_round_trip_warns() -> None:
    """A median PING above 10 ms is worth a warning; a fast one is ok."""
    assert doctor._latency([0.0002] * 20).status == "ok"
    slow = doctor._latency([0.015] * 20)
    assert slow.status == "warn"
    assert "median 15.00 ms" in slow.detail


def test_recommended_acl_names_the_namespace_and_every_command() -> None:
    """The suggested ACL is scoped to the namespace's keys and channels, and the doctor
    checks every command it grants (and nothing else)."""
    acl = doctor.recommended_acl("billing", "worker")
    assert acl.startswith("ACL SETUSER worker on >CHANGE-ME resetkeys resetchannels "
                          "~billing:* &billing:* -@all ")
    granted = {word[1:] for word in acl.split() if word.startswith("+")}
    assert granted == set(doctor.COMMANDS)
    checked = {p.acl for p in doctor._needed("billing", db=3, client_name="worker-1")}
    assert checked == granted


def test_recommended_acl_grants_each_glob_topic_literally() -> None:
    """Redis grants a PSUBSCRIBE pattern only when listed literally: each glob topic gets
    its own &ns:events:<pattern>; exact topics are covered by &ns:*."""
    acl = doctor.recommended_acl("billing", topics=["jobs.*", "alerts", "p?"]).split()
    channels = [word for word in acl if word.startswith("&")]
    assert channels == ["&billing:*", "&billing:events:jobs.*", "&billing:events:p?"]


@pytest.mark.parametrize("needed", ["select", "client|setname", "psubscribe",
                                    "punsubscribe", "xinfo|stream", "script|load",
                                    "evalsha"])
def test_commands_flexisync_sends_while_connecting_or_subscribing_are_granted(
        needed: str) -> None:
    """SELECT (db != 0), CLIENT SETNAME (client_name) and PSUBSCRIBE (glob topics) are
    in the ACL and checked by the doctor."""
    assert needed in doctor.COMMANDS
    assert needed in {p.acl for p in doctor._needed("ns", db=1, client_name="x")}


def test_a_transaction_in_the_code_requires_multi_and_exec_in_the_acl() -> None:
    """The ACL grants MULTI/EXEC exactly when some module opens a transactional
    pipeline (redis-py's default), so removing the last one, or adding one, is seen."""
    package = Path(flexisync.__file__).parent
    transactional = [
        f"{path.name}: {match}" for path in package.rglob("*.py")
        for match in re.findall(r"\.pipeline\((?!transaction=False)[^)]*\)",
                                path.read_text())
        if path.name != "_doctor.py"]
    granted = {"multi", "exec"} <= set(doctor.COMMANDS)
    assert granted == bool(transactional), transactional or "no transaction in the code"


def test_every_command_in_the_lua_scripts_is_granted() -> None:
    """Commands run inside Lua are checked against the ACL too: each one the scripts
    call is in the documented ACL."""
    scripts = Path(flexisync.__file__).parent / "_scripts"
    called = set()
    for script in scripts.glob("*.lua"):
        source = script.read_text()
        for raw, sub in re.findall(r"redis\.p?call\(\s*'(\w+)'(?:\s*,\s*'(\w+)')?", source):
            name = raw.lower()
            called.add(f"{name}|{sub.lower()}" if name in ("xinfo", "client") else name)
        # XADD is built as a table and run by redis.call(unpack(args)).
        called.update(w.lower() for w in re.findall(r"\{'(\w+)', KEYS", source))
    assert called, "no redis.call found: the pattern is stale"
    assert called - set(doctor.COMMANDS) == set()


def test_documented_acl_is_the_doctors_recommendation() -> None:
    """docs/operating.md shows exactly the ACL line the doctor suggests (with the
    example glob topic), so the two cannot drift."""
    docs = (Path(__file__).resolve().parents[2] / "docs" / "operating.md").read_text()
    assert doctor.recommended_acl("flexisync", "app", topics=["jobs.*"]) in docs


class _FakeBackend:
    """Answers CONFIG GET from a dict; ``None`` means CONFIG is not permitted."""

    def __init__(self, config: dict[str, str] | None) -> None:
        self.config = config

    def call(self, operation: str, fn: Any) -> Any:
        if self.config is None:
            raise BackendError(operation, "NOPERM this user has no permissions to run 'config'")
        return fn(self)

    def config_get(self, name: str) -> dict[str, str]:
        assert self.config is not None
        return {name: self.config[name]} if name in self.config else {}


@pytest.mark.parametrize(("config", "info", "words"), [
    ({"save": "", "appendfsync": "everysec"}, {"aof_enabled": 0}, "none: a restart forgets"),
    ({"save": "", "appendfsync": "everysec"}, {"aof_enabled": 1},
     "AOF on (appendfsync everysec)"),
    ({"save": "3600 1"}, {"aof_enabled": 0}, "RDB snapshots (save 3600 1)"),
    (None, {"aof_enabled": 0}, "AOF off; RDB snapshot schedule unknown"),
], ids=["none", "aof", "rdb", "config-denied"])
def test_persistence_check_says_what_survives_a_restart(
        config: dict[str, str] | None, info: dict[str, Any], words: str) -> None:
    """Persistence is informational and never claims 'none' when it could not look."""
    check = doctor._persistence(_FakeBackend(config), info)
    assert check.status == "info"
    assert words in check.detail


def _masters(**per_node: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name.replace("_", ":"): info for name, info in per_node.items()}


def test_cluster_server_check_names_each_master_and_needs_7() -> None:
    """Every master's version is reported; one below 7.0 (no sharded pub/sub) fails."""
    good = doctor._cluster_server(_masters(a_1={"redis_version": "7.0.15"},
                                           b_2={"redis_version": "7.2.4"}))
    assert good.status == "ok"
    assert "a:1 7.0.15" in good.detail
    assert "b:2 7.2.4" in good.detail
    old = doctor._cluster_server(_masters(a_1={"redis_version": "7.0.15"},
                                          b_2={"redis_version": "6.2.14"}))
    assert old.status == "fail"
    assert "b:2" in old.detail
    assert "7.0" in old.detail
    assert doctor._cluster_server({}).status == "warn"


def test_cluster_eviction_and_replication_checks_name_the_nodes() -> None:
    """A master that may evict warns, named; so does a master without a replica."""
    masters = _masters(a_1={"maxmemory_policy": "noeviction", "connected_slaves": 1},
                       b_2={"maxmemory_policy": "allkeys-lru", "connected_slaves": 0})
    eviction = doctor._cluster_eviction(masters)
    assert eviction.status == "warn"
    assert "b:2 (allkeys-lru)" in eviction.detail
    replication = doctor._cluster_replication(masters)
    assert replication.status == "warn"
    assert "b:2" in replication.detail
    fine = _masters(a_1={"maxmemory_policy": "noeviction", "connected_slaves": 1})
    assert doctor._cluster_eviction(fine).status == "ok"
    assert doctor._cluster_replication(fine).status == "info"


def test_cluster_acl_adds_what_cluster_clients_send() -> None:
    """On a cluster the recommended ACL also grants CLUSTER SLOTS, COMMAND and the
    sharded pub/sub commands, and the doctor checks exactly those (no SELECT)."""
    acl = doctor.recommended_acl("billing", "worker", cluster=True)
    granted = {word[1:] for word in acl.split() if word.startswith("+")}
    assert granted == set(doctor.COMMANDS) | set(doctor.CLUSTER_COMMANDS)
    checked = {p.acl for p in doctor._needed("billing", cluster=True)}
    assert checked == granted - {"select"}
