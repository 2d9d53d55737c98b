"""``flexisync doctor``'s verdicts on server facts it cannot easily meet in a test run."""

from __future__ import annotations

from typing import Any

import pytest

from flexisync import _cli_doctor as doctor
from flexisync.errors import BackendError


@pytest.mark.parametrize(("info", "status", "words"), [
    ({"redis_version": "7.2.4", "redis_mode": "standalone"}, "ok", "Redis 7.2.4, standalone"),
    ({"redis_version": "6.0.9", "redis_mode": "standalone"}, "fail", "needs Redis 6.2"),
    ({"redis_version": "7.2.4", "redis_mode": "sentinel"}, "fail", "redis+sentinel://"),
    ({"redis_version": "7.2.4", "redis_mode": "cluster"}, "warn", "not supported yet"),
    ({}, "warn", "INFO is not permitted"),
], ids=["standalone", "too-old", "sentinel", "cluster", "no-info"])
def test_server_check(info: dict[str, Any], status: str, words: str) -> None:
    """Old versions and Sentinel nodes fail; Cluster warns; unknown is a warning."""
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
    """The suggested ACL is scoped to the namespace's keys and channels."""
    acl = doctor.recommended_acl("billing", "worker")
    assert acl.startswith("ACL SETUSER worker on >CHANGE-ME resetkeys resetchannels "
                          "~billing:* &billing:* -@all ")
    granted = {word[1:] for word in acl.split() if word.startswith("+")}
    assert granted == set(doctor.COMMANDS)
    needed = {c[0].lower() for c in doctor._needed("billing")}
    assert needed - {"xinfo", "script"} <= granted


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
