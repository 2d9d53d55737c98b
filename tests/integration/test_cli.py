"""The ``flexisync`` command against a real Redis: doctor, inspection commands, demo."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import structlog

import flexisync
from flexisync import cli, embedded
from flexisync.cli._doctor import Check, diagnose
from tests.helpers import wait_until

FLEXISYNC = str(Path(sys.executable).parent / "flexisync")


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``flexisync argv...`` in this process: (exit code, stdout, stderr)."""
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(autouse=True)
def _library_logs_captured() -> Iterator[None]:
    """Keep this process's own breaker log lines out of the captured command output."""
    with structlog.testing.capture_logs():
        yield


@pytest.fixture
def target(flexisync_url: str, namespace: str) -> list[str]:
    """``--url`` and ``--namespace`` options pointing at the test's namespace."""
    return ["--url", flexisync_url, "--namespace", namespace]


# --- doctor ----------------------------------------------------------------------------


def test_doctor_passes_on_a_noeviction_server(capsys: pytest.CaptureFixture[str],
                                              target: list[str]) -> None:
    """Against the test server (noeviction) every check passes and the exit code is 0."""
    code, out, _ = run(capsys, "doctor", *target)
    assert code == 0, out
    for check in ("server", "round trip", "eviction", "persistence", "permissions"):
        assert check in out
    assert "maxmemory-policy is noeviction" in out
    assert "All checks passed." in out


def test_doctor_json_reports_each_check(capsys: pytest.CaptureFixture[str],
                                        target: list[str]) -> None:
    """--json prints one document with a status per check and an overall verdict."""
    code, out, _ = run(capsys, "doctor", "--json", *target)
    report = json.loads(out)
    assert code == 0
    assert report["ok"] is True
    statuses = {c["name"]: c["status"] for c in report["checks"]}
    assert statuses["eviction"] == "ok"
    assert statuses["permissions"] == "ok"
    assert set(statuses.values()) <= {"ok", "info"}


@pytest.fixture
def lru_server() -> Iterator[embedded.EmbeddedRedis]:
    """A redis-server of the test's own started with --maxmemory-policy allkeys-lru."""
    server = embedded.start(args=["--maxmemory-policy", "allkeys-lru"])
    yield server
    server.stop()


def test_doctor_warns_about_an_evicting_server(capsys: pytest.CaptureFixture[str],
                                               lru_server: embedded.EmbeddedRedis) -> None:
    """maxmemory-policy allkeys-lru is a lock-safety bug: WARN line and exit 1."""
    code, out, _ = run(capsys, "doctor", "--url", lru_server.url)
    assert code == 1
    line = next(line for line in out.splitlines() if "eviction" in line)
    assert line.startswith("WARN")
    assert "allkeys-lru" in line
    assert "1 problem(s) found." in out


def _restricted_user(server: embedded.EmbeddedRedis, *rules: str) -> str:
    client = redis.Redis.from_url(server.url)
    try:
        client.acl_setuser("app", enabled=True, passwords=["+app-secret-pw"],
                           reset_keys=True, reset_channels=True)
        client.execute_command("ACL", "SETUSER", "app", *rules)
    finally:
        client.close()
    return f"redis://app:app-secret-pw@127.0.0.1:{server.port}/0"


def test_doctor_finds_a_missing_permission_with_acl_dryrun(
        capsys: pytest.CaptureFixture[str], own_server: embedded.EmbeddedRedis) -> None:
    """A user who may not PUBLISH fails the permissions check; the password never shows."""
    url = _restricted_user(own_server, "~flexisync:*", "&flexisync:*", "+@all", "-publish")
    code, out, err = run(capsys, "doctor", "--url", url)
    assert code == 1
    line = next(line for line in out.splitlines() if "permissions" in line)
    assert line.startswith("FAIL")
    assert "PUBLISH" in line
    assert "denied (ACL DRYRUN)" in line  # says how it was found
    assert "app-secret-pw" not in out + err
    assert "redis://app:***@" in out


def test_doctor_probes_commands_when_dryrun_is_not_allowed(
        capsys: pytest.CaptureFixture[str], own_server: embedded.EmbeddedRedis) -> None:
    """Without ACL rights the doctor runs each command once and still finds the denial."""
    url = _restricted_user(own_server, "~flexisync:*", "&flexisync:*", "+@all", "-@admin",
                           "-xadd")
    code, out, _ = run(capsys, "doctor", "--url", url)
    assert code == 1
    line = next(line for line in out.splitlines() if "permissions" in line)
    assert "XADD" in line
    assert "PUBLISH" not in line
    assert "denied (running each once)" in line


def test_doctor_finds_a_glob_topic_the_acl_does_not_grant_literally(
        capsys: pytest.CaptureFixture[str], own_server: embedded.EmbeddedRedis) -> None:
    """&flexisync:* does not let a user PSUBSCRIBE to flexisync:events:jobs.* (Redis
    compares patterns literally): with --topic the doctor fails and names the grant;
    without, it says glob topics need one, instead of 'all commands are allowed'."""
    url = _restricted_user(own_server, "~flexisync:*", "&flexisync:*", "+@all", "-@admin",
                           "+client|setname")
    code, out, _ = run(capsys, "doctor", "--url", url, "--topic", "jobs.*", "--json")
    checks = {c["name"]: c for c in json.loads(out)["checks"]}
    assert code == 1
    assert checks["permissions"]["status"] == "ok"
    assert checks["topics"]["status"] == "fail"
    assert "&flexisync:events:jobs.*" in checks["topics"]["detail"]
    code, out, _ = run(capsys, "doctor", "--url", url, "--json")
    checks = {c["name"]: c for c in json.loads(out)["checks"]}
    assert checks["topics"]["status"] == "info"
    assert "--topic" in checks["topics"]["detail"]


@pytest.mark.parametrize("dryrun", [True, False], ids=["acl-dryrun", "running-each"])
def test_doctor_reports_each_missing_command(
        dryrun: bool, own_server: embedded.EmbeddedRedis) -> None:
    """PSUBSCRIBE, SELECT and CLIENT SETNAME refused are each named, whether found by
    ACL DRYRUN or by running the commands."""
    rules = ["~flexisync:*", "&flexisync:*", "+@all", "-psubscribe", "-client|setname",
             "-select"]
    url = _restricted_user(own_server, *rules, *([] if dryrun else ["-@admin"]))
    report = diagnose_as(url)
    assert report["permissions"].status == "fail"
    for command in ("PSUBSCRIBE", "SELECT", "CLIENT SETNAME"):
        assert command in report["permissions"].detail


def test_doctor_reports_a_connection_the_acl_refuses(
        capsys: pytest.CaptureFixture[str], own_server: embedded.EmbeddedRedis) -> None:
    """A user who may not SELECT its database cannot even connect: the doctor says so
    in its report (exit 1) instead of one bare error line."""
    url = _restricted_user(own_server, "~flexisync:*", "&flexisync:*", "+@all", "-select")
    code, out, _ = run(capsys, "doctor", "--url", url.replace("/0", "/2"), "--json")
    report = json.loads(out)
    assert code == 1
    assert report["ok"] is False
    [check] = report["checks"]
    assert check["name"] == "connection"
    assert check["status"] == "fail"
    assert "select" in check["detail"].lower()


def diagnose_as(url: str) -> dict[str, Check]:
    """The doctor's checks for ``url``, by name."""
    with flexisync.connect(url) as sync:
        return {c.name: c for c in diagnose(sync)}


def test_doctor_on_a_dead_server_exits_3(capsys: pytest.CaptureFixture[str],
                                         own_server: embedded.EmbeddedRedis) -> None:
    """A server that died answers nothing: one error line, exit 3, no traceback."""
    url = own_server.url
    own_server.kill()
    code, out, err = run(capsys, "doctor", "--url", url)
    assert code == 3
    assert out == ""
    assert err.startswith("flexisync: error: cannot reach Redis at 127.0.0.1:")


# --- state -----------------------------------------------------------------------------


def test_state_set_get_keys_del_round_trip(capsys: pytest.CaptureFixture[str],
                                           target: list[str],
                                           sync: flexisync.Coordinator) -> None:
    """Values written by the command are what the library reads, and the other way round."""
    assert run(capsys, "state", "set", "providers", "openai", '{"healthy": false}',
               "--ttl", "60", *target)[0] == 0
    assert sync.state("providers").get("openai") == {"healthy": False}
    sync.state("providers").set("anthropic", [1, "two"])
    code, out, _ = run(capsys, "state", "get", "providers", "anthropic", *target)
    assert (code, json.loads(out)) == (0, [1, "two"])
    code, out, _ = run(capsys, "state", "keys", "providers", "--json", *target)
    rows = {r["key"]: r["ttl"] for r in json.loads(out)}
    assert set(rows) == {"openai", "anthropic"}
    assert 0 < rows["openai"] <= 60
    assert rows["anthropic"] is None  # no expiry (infinity) prints as null
    assert run(capsys, "state", "del", "providers", "openai", *target)[0] == 0
    assert sync.state("providers").get("openai") is None


def test_state_get_of_a_missing_key_exits_1(capsys: pytest.CaptureFixture[str],
                                            target: list[str]) -> None:
    """A missing key is reported on stderr with exit 1; stdout stays empty."""
    code, out, err = run(capsys, "state", "get", "providers", "nobody", *target)
    assert (code, out) == (1, "")
    assert "no value for providers/nobody" in err
    assert run(capsys, "state", "del", "providers", "nobody", *target)[0] == 1


# --- breakers and locks ----------------------------------------------------------------


def test_breakers_lists_state_failures_and_retry(capsys: pytest.CaptureFixture[str],
                                                 target: list[str],
                                                 sync: flexisync.Coordinator) -> None:
    """A breaker tripped in this process shows up open with its time to retry."""
    code, out, _ = run(capsys, "breakers", *target)
    assert (code, out.strip()) == (0, "no breakers in this namespace")
    sync.breaker("openai").trip(retry_after=120)
    sync.breaker("anthropic", failure_threshold=5).reset()
    code, out, _ = run(capsys, "breakers", "--json", *target)
    rows = {r["name"]: r for r in json.loads(out)}
    assert rows["openai"]["state"] == "open"
    assert 60 < rows["openai"]["retry_after"] <= 120
    assert rows["anthropic"]["state"] == "closed"
    code, out, _ = run(capsys, "breakers", *target)
    assert out.splitlines()[0].split() == ["name", "state", "failures", "retry", "in",
                                           "opened", "probes"]
    assert any(line.startswith("openai") and " open " in line for line in out.splitlines())


def test_breaker_commands_change_the_fleet(capsys: pytest.CaptureFixture[str],
                                           target: list[str],
                                           sync: flexisync.Coordinator) -> None:
    """open/close/reset from the command are mirrored by a breaker in another client."""
    breaker = sync.breaker("payments")
    assert breaker.state == "closed"
    code, out, _ = run(capsys, "breaker", "open", "payments", "--create", *target)
    assert (code, out.strip()) == (0, "breaker 'payments' is now forced_open")
    wait_until(lambda: breaker.state == "forced_open", 5.0, message="forced_open mirrored")
    run(capsys, "breaker", "close", "payments", *target)
    wait_until(lambda: breaker.state == "closed", 5.0, message="closed mirrored")
    code, out, _ = run(capsys, "breaker", "open", "payments", "--for", "30", *target)
    assert "is now open" in out
    wait_until(lambda: breaker.state == "open", 5.0, message="open mirrored")
    with pytest.raises(flexisync.CircuitOpenError) as caught:
        breaker.call(lambda: None)
    assert 0 < caught.value.retry_after <= 30
    run(capsys, "breaker", "reset", "payments", *target)
    wait_until(lambda: breaker.state == "closed", 5.0, message="reset mirrored")


@pytest.mark.parametrize("action", ["open", "close", "reset"])
def test_breaker_command_on_an_unknown_name_exits_1_and_creates_nothing(
        action: str, capsys: pytest.CaptureFixture[str], target: list[str],
        raw: redis.Redis, namespace: str) -> None:
    """`breaker reset <typo>` used to create a breaker: now it is "not found" (exit 1),
    and nothing is written; `open --create` is the explicit way to make a new one."""
    code, out, err = run(capsys, "breaker", action, "paymnets", *target)
    assert (code, out) == (1, "")
    assert "no breaker 'paymnets'" in err
    assert list(raw.scan_iter(match=f"{namespace}:*")) == []
    assert run(capsys, "breakers", "--json", *target)[1].strip() == "[]"
    code, out, _ = run(capsys, "breaker", "open", "paymnets", "--create", "--json", *target)
    assert code == 0
    assert json.loads(out)["state"] == "forced_open"


def test_breaker_open_for_is_honoured_whatever_the_state(
        capsys: pytest.CaptureFixture[str], target: list[str],
        sync: flexisync.Coordinator) -> None:
    """`open --for S` opens for S seconds from now: it replaces forced_open (where a trip
    is ignored) and a longer open period (which a trip never shortens)."""
    breaker = sync.breaker("llm")
    breaker.force_open()
    code, out, _ = run(capsys, "breaker", "open", "llm", "--for", "30", "--json", *target)
    info = json.loads(out)
    assert code == 0
    assert info["state"] == "open"
    assert 25 < info["retry_after"] <= 30
    breaker.trip(retry_after=600)
    code, out, _ = run(capsys, "breaker", "open", "llm", "--for", "5", "--json", *target)
    assert json.loads(out)["state"] == "open"
    assert 0 < json.loads(out)["retry_after"] <= 5


@pytest.mark.parametrize(("manual", "command"), [
    ("force_open", "close"), ("disable", "close"), ("force_open", "reset"),
    ("disable", "reset"), ("trip", "close")])
def test_breaker_close_and_reset_end_every_state(
        manual: str, command: str, capsys: pytest.CaptureFixture[str], target: list[str],
        sync: flexisync.Coordinator) -> None:
    """`close` and `reset` are one documented operation: closed now, failures and backoff
    cleared, from open, forced_open or disabled alike."""
    breaker = sync.breaker("search")
    getattr(breaker, manual)()
    code, out, _ = run(capsys, "breaker", command, "search", "--json", *target)
    info = json.loads(out)
    assert code == 0
    assert (info["state"], info["failures"], info["open_period"]) == ("closed", 0, None)


def test_locks_lists_holder_ttl_and_fencing_token(capsys: pytest.CaptureFixture[str],
                                                  target: list[str],
                                                  sync: flexisync.Coordinator) -> None:
    """A held lock is listed with this process as holder and its fencing token."""
    assert run(capsys, "locks", *target)[1].strip() == "no locks held in this namespace"
    first = sync.lock("report", ttl=60)
    first.acquire()
    earlier = first.fencing_token
    first.release()
    lock = sync.lock("report", ttl=60)
    lock.acquire()
    code, out, _ = run(capsys, "locks", "--json", *target)
    [row] = json.loads(out)
    assert code == 0
    assert row["name"] == "report"
    assert row["fencing_token"] == lock.fencing_token
    assert earlier is not None
    assert row["fencing_token"] > earlier
    assert row["holder"].endswith(f":{os.getpid()}")
    assert 0 < row["ttl"] <= 60
    lock.release()
    assert json.loads(run(capsys, "locks", "--json", *target)[1]) == []


# --- events and streams ----------------------------------------------------------------


def test_events_tail_prints_events_published_elsewhere(capsys: pytest.CaptureFixture[str],
                                                       target: list[str],
                                                       sync: flexisync.Coordinator) -> None:
    """`events tail` prints an event published by another client, then stops at --count."""
    result: list[int] = []
    tail = threading.Thread(target=lambda: result.append(cli.main(
        ["events", "tail", "providers.*", "--count", "1", "--timeout", "30", "--json",
         *target])))
    tail.start()
    # PUBLISH returns how many subscribers got it: repeat until the tail is listening.
    wait_until(lambda: sync.events.publish("providers.openai", {"down": True},
                                           type="provider.down"),
               timeout=20.0, interval=0.01, message="the tail subscribing")
    tail.join(30.0)
    assert result == [0]
    printed = json.loads(capsys.readouterr().out.strip())
    assert printed["topic"] == "providers.openai"
    assert printed["type"] == "provider.down"
    assert printed["data"] == {"down": True}


def test_events_publish_reaches_a_subscriber(capsys: pytest.CaptureFixture[str],
                                             target: list[str],
                                             sync: flexisync.Coordinator) -> None:
    """`events publish` delivers JSON data with the given type."""
    with sync.events.subscribe("deploys") as sub:
        code, out, _ = run(capsys, "events", "publish", "deploys", '{"v": 2}', "--type",
                           "deploy.done", *target)
        event = sub.get(timeout=10.0)
    assert code == 0
    assert "1 subscriber(s)" in out
    assert event is not None
    assert (event.type, event.data) == ("deploy.done", {"v": 2})


def test_stream_read_after_an_id_and_follow(capsys: pytest.CaptureFixture[str],
                                            target: list[str],
                                            sync: flexisync.Coordinator) -> None:
    """read prints events strictly after --after; --follow waits for new ones."""
    stream = sync.stream("exec-42")
    ids = [stream.append({"line": n}, type="stdout") for n in range(3)]
    code, out, _ = run(capsys, "stream", "read", "exec-42", "--after", ids[0], "--json",
                       *target)
    assert code == 0
    assert [event["id"] for event in json.loads(out)] == ids[1:]  # one document
    code, out, _ = run(capsys, "stream", "read", "exec-42", *target)
    assert len(out.splitlines()) == 3
    assert '{"line":0}' in out.splitlines()[0]

    result: list[int] = []
    follower = threading.Thread(target=lambda: result.append(cli.main(
        ["stream", "read", "exec-42", "--after", ids[-1], "--follow", "--count", "1",
         "--timeout", "30", "--json", *target])))
    follower.start()
    new_id = stream.append({"line": "live"}, type="stdout")
    follower.join(30.0)
    assert result == [0]
    printed = json.loads(capsys.readouterr().out)
    assert (printed["id"], printed["data"]) == (new_id, {"line": "live"})


def test_stream_read_of_a_missing_stream_exits_1(capsys: pytest.CaptureFixture[str],
                                                target: list[str]) -> None:
    """A stream that does not exist is "not found" (exit 1, a message), as documented;
    it used to print nothing and exit 0."""
    code, out, err = run(capsys, "stream", "read", "exec-nope", *target)
    assert (code, out) == (1, "")
    assert "no stream 'exec-nope'" in err


def test_stream_read_follow_waits_for_a_stream_that_does_not_exist_yet(
        capsys: pytest.CaptureFixture[str], target: list[str],
        sync: flexisync.Coordinator) -> None:
    """--follow on a stream not yet created says so on stderr and prints its first event."""
    result: list[int] = []
    follower = threading.Thread(target=lambda: result.append(cli.main(
        ["stream", "read", "later", "--follow", "--count", "1", "--timeout", "30", "--json",
         *target])))
    follower.start()
    new_id = sync.stream("later").append({"first": True})
    follower.join(30.0)
    captured = capsys.readouterr()
    assert result == [0]
    assert json.loads(captured.out)["id"] == new_id


def test_stream_read_rejects_a_malformed_id(capsys: pytest.CaptureFixture[str],
                                            target: list[str]) -> None:
    """A malformed --after id is bad input: exit 2 and a message."""
    code, _, err = run(capsys, "stream", "read", "exec-42", "--after", "yesterday", *target)
    assert code == 2
    assert "yesterday" in err


def test_stream_read_of_trimmed_history_explains(capsys: pytest.CaptureFixture[str],
                                                 target: list[str],
                                                 sync: flexisync.Coordinator) -> None:
    """Resuming before the oldest retained event is reported (exit 1), not a traceback."""
    stream = sync.stream("short", maxlen=1)
    first = stream.append({"n": 1})
    for n in range(200):  # MAXLEN ~ trims in whole nodes: append well past it
        stream.append({"n": n})
    sync.client.xtrim(f"{sync.namespace}:stream:{{short}}", maxlen=1)
    code, _, err = run(capsys, "stream", "read", "short", "--after", first, *target)
    assert code == 1
    assert "no longer holds events" in err


@pytest.mark.parametrize("argv", [
    ["breakers"], ["locks"], ["state", "get", "cfg", "mode"], ["state", "keys", "cfg"],
    ["state", "set", "cfg", "other", "[1, 2]"], ["state", "del", "cfg", "gone"],
    ["events", "publish", "cfg.changed", '{"k": 1}'], ["stream", "read", "audit"],
    ["breaker", "open", "llm"], ["breaker", "close", "llm"], ["breaker", "reset", "llm"],
    ["doctor"],
], ids=" ".join)
def test_json_is_one_document_for_every_one_shot_command(
        argv: list[str], capsys: pytest.CaptureFixture[str], target: list[str],
        sync: flexisync.Coordinator) -> None:
    """With --json a one-shot command prints exactly one JSON document (a stream read
    used to print JSON Lines; state del and events publish rejected --json)."""
    sync.state("cfg").set("mode", "canary")
    sync.state("cfg").set("gone", 1)
    sync.stream("audit").append({"n": 1})
    sync.stream("audit").append({"n": 2})
    sync.breaker("llm").trip(retry_after=60)
    code, out, err = run(capsys, *argv, "--json", *target)
    assert code == 0, err
    assert out.endswith("\n")
    assert out.count("\n") == 1, out
    json.loads(out)


# --- through the console script --------------------------------------------------------


def test_console_script_reads_flexisync_url(flexisync_url: str, namespace: str,
                                            sync: flexisync.Coordinator) -> None:
    """The installed `flexisync` script works and takes its URL from FLEXISYNC_URL."""
    sync.state("cfg").set("mode", "canary")
    env = {**os.environ, "FLEXISYNC_URL": flexisync_url}
    done = subprocess.run([FLEXISYNC, "state", "get", "cfg", "mode", "--namespace", namespace],
                          env=env, capture_output=True, text=True, timeout=60, check=False)
    assert (done.returncode, done.stdout.strip()) == (0, '"canary"'), done.stderr


def test_console_script_on_unreachable_redis_has_no_traceback() -> None:
    """A dead URL exits 3 with one line on stderr and never shows the password."""
    port = embedded._free_port()
    done = subprocess.run([FLEXISYNC, "doctor", "--url", f"redis://u:pw-9f8e@127.0.0.1:{port}"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 3
    assert "Traceback" not in done.stderr
    assert "pw-9f8e" not in done.stderr + done.stdout
    assert done.stderr.count("\n") == 1


def test_console_script_tail_prints_live_events_and_stops_on_ctrl_c(
        flexisync_url: str, namespace: str, sync: flexisync.Coordinator) -> None:
    """`flexisync events tail` prints events as they come; Ctrl-C exits 130 quietly."""
    tail = subprocess.Popen([FLEXISYNC, "events", "tail", "alerts", "--url", flexisync_url,
                             "--namespace", namespace], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert tail.stderr is not None
        assert tail.stdout is not None
        assert "listening on 'alerts'" in tail.stderr.readline()  # subscribed by now
        assert sync.events.publish("alerts", {"level": "page"}, type="alert") == 1
        line = tail.stdout.readline()
        assert "alerts  alert  {\"level\":\"page\"}" in line
        tail.send_signal(signal.SIGINT)
        assert tail.wait(timeout=30) == 130
        rest = tail.stderr.read()
        assert "Traceback" not in rest
        assert "interrupted" in rest
    finally:
        if tail.poll() is None:
            tail.kill()
            tail.wait(10)


@pytest.mark.slow
def test_demo_runs_end_to_end_on_an_embedded_server() -> None:
    """`flexisync demo --workers 3` with no URL starts its own Redis; the fleet opens and
    recovers together and the job runs once."""
    env = {k: v for k, v in os.environ.items() if k != "FLEXISYNC_URL"}
    done = subprocess.run([FLEXISYNC, "demo", "--workers", "3"], env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    # the binary flexisync.embedded finds: redis-server, or Valkey in the Valkey run
    assert f"started a throwaway {Path(embedded.find_binary()).name} at" in out
    assert "fleet opened together:    yes (3 of 3 workers saw it open)" in out
    assert "fleet recovered together: yes (3 of 3 workers saw it close again)" in out
    assert "ran 1 time(s)" in out
    assert "worker 1: 4, worker 2: 4, worker 3: 4" in out
    narration, summary = out.split("\nSummary\n")
    assert "[" not in summary, "a narration line printed after the summary"
    stamps = [float(line[1:line.index("s]")]) for line in narration.splitlines()
              if line.startswith("[")]
    assert len(stamps) > 10
    assert stamps == sorted(stamps), "narration printed out of order"


@pytest.mark.slow
def test_demo_on_a_given_url_prints_json_and_cleans_up_its_namespace(
        capsys: pytest.CaptureFixture[str], flexisync_url: str, namespace: str,
        raw: redis.Redis) -> None:
    """With --url the demo uses that server and deletes every key it wrote; --json
    prints the summary as one document."""
    code, out, err = run(capsys, "demo", "--workers", "2", "--url", flexisync_url,
                         "--namespace", namespace, "--json")
    assert code == 0, err
    summary = json.loads(out)  # --json: the summary is the one document, narration on stderr
    assert summary["ok"] is True
    assert summary["recovered_together"] is True
    assert len(summary["job"]["runs"]) == 1
    assert "throwaway" not in err
    assert "every worker saw the breaker turn closed" in err
    assert list(raw.scan_iter(match=f"{namespace}-demo-*")) == []
