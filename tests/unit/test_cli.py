"""The ``flexisync`` command without a server: parsing, help, bad input, unreachable Redis."""

from __future__ import annotations

import argparse
import io
import json
import socket
import time

import pytest

from flexisync import cli
from flexisync.cli import _demo
from flexisync.cli._common import format_seconds, print_table
from tests.helpers import wait_until

# Every leaf command, as the words that select it.
COMMANDS = [
    ["demo"], ["doctor"], ["breakers"], ["breaker", "open"], ["breaker", "close"],
    ["breaker", "reset"], ["locks"], ["state", "get"], ["state", "set"], ["state", "del"],
    ["state", "keys"], ["events", "tail"], ["events", "publish"], ["stream", "read"],
    ["top"], ["dashboard"],
]


def _dead_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _leaf(words: list[str]) -> argparse.ArgumentParser:
    parser = cli.build_parser()
    for word in words:
        action = next(a for a in parser._actions
                      if isinstance(a, argparse._SubParsersAction))
        parser = action.choices[word]
    return parser


def test_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    """`flexisync --help` exits 0 and names each command."""
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("demo", "doctor", "breakers", "breaker", "locks", "state", "events",
                    "stream", "top", "dashboard"):
        assert command in out


@pytest.mark.parametrize("words", COMMANDS, ids=" ".join)
def test_every_command_has_help_url_and_namespace(
        words: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """Each command answers --help with exit 0 and accepts --url and --namespace."""
    assert cli.main([*words, "--help"]) == 0
    out = capsys.readouterr().out
    assert "--url" in out
    assert "--namespace" in out


@pytest.mark.parametrize("words", COMMANDS, ids=" ".join)
def test_every_command_accepts_json(words: list[str]) -> None:
    """Every command takes --json (state del and events publish used to reject it)."""
    options = {o for a in _leaf(words)._actions for o in a.option_strings}
    assert "--json" in options


@pytest.mark.parametrize("argv", [
    [],
    ["no-such-command"],
    ["demo", "--workers", "0"],
    ["demo", "--workers", "many"],
    ["state", "get", "scope"],
    ["stream", "read", "s", "--count", "0"],
    ["events", "tail", "t", "--timeout", "-1"],
    ["breaker", "open", "x", "--for", "soon"],
    ["top", "--interval", "0"],
    ["breaker", "open", "x", "--for", "0"],
    ["breaker", "open", "x", "--for", "nan"],
    ["breaker", "open", "x", "--for", "1e14"],
    ["breaker", "explode", "x"],
], ids=str)
def test_usage_errors_exit_2_with_a_message(argv: list[str],
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """Malformed command lines exit 2 and explain themselves on stderr."""
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    assert "error" in captured.err
    assert "Traceback" not in captured.err


@pytest.mark.parametrize(("argv", "expected"), [
    (["state", "set", "scope", "key", "not json"], "VALUE must be JSON"),
    (["state", "get", "bad scope", "key"], "scope 'bad scope'"),
    (["state", "get", "scope", "k" * 201], "limit is 200"),
    (["locks", "--url", "http://localhost:6379"], "unknown URL scheme 'http'"),
    (["breakers", "--namespace", "has space"], "namespace"),
    (["events", "publish", "topic", "{oops"], "DATA must be JSON"),
    (["events", "tail", "bad topic!"], "topic"),
    (["doctor", "--topic", "bad topic!"], "topic"),
], ids=lambda v: v if isinstance(v, str) else " ".join(v))
def test_bad_values_exit_2_before_touching_redis(
        argv: list[str], expected: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Bad names, URLs and JSON values fail with exit 2 even with no Redis at all."""
    url = ["--url", f"redis://127.0.0.1:{_dead_port()}/0"] if "--url" not in argv else []
    assert cli.main([*argv, *url]) == 2
    err = capsys.readouterr().err
    assert expected in err
    assert err.startswith("flexisync: error:")


@pytest.mark.parametrize("argv", [
    ["doctor"], ["breakers"], ["locks"], ["state", "get", "s", "k"],
    ["state", "set", "s", "k", "1"], ["events", "publish", "t"], ["stream", "read", "s"],
    ["breaker", "reset", "b"], ["state", "del", "s", "k", "--json"],
    ["events", "publish", "t", "--json"], ["breakers", "--json"],
], ids=" ".join)
def test_unreachable_redis_exits_3_without_traceback_or_password(
        argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """BackendUnavailable is one clear line on stderr, exit 3; the password never shows."""
    url = f"redis://admin:s3cr3t-pw@127.0.0.1:{_dead_port()}/0"
    assert cli.main([*argv, "--url", url]) == 3
    captured = capsys.readouterr()
    assert "cannot reach Redis at 127.0.0.1:" in captured.err
    assert "Traceback" not in captured.err
    assert "s3cr3t-pw" not in captured.err + captured.out
    assert captured.out == ""  # a failed command prints nothing on stdout


def test_doctor_json_reports_an_unreachable_redis(capsys: pytest.CaptureFixture[str]) -> None:
    """`doctor --json` with Redis down prints one JSON document saying so (exit 3), not
    nothing; the error line is on stderr and the password nowhere."""
    port = _dead_port()
    code = cli.main(["doctor", "--json", "--url", f"redis://u:s3cr3t-pw@127.0.0.1:{port}/0"])
    captured = capsys.readouterr()
    assert code == 3
    report = json.loads(captured.out)
    assert report["ok"] is False
    assert f"cannot reach Redis at 127.0.0.1:{port}" in report["error"]
    assert report["checks"] == [{"name": "connection", "status": "fail",
                                 "detail": report["error"]}]
    assert report["url"] == f"redis://u:***@127.0.0.1:{port}/0"
    assert "s3cr3t-pw" not in captured.out + captured.err
    assert captured.err.startswith("flexisync: error: cannot reach Redis")


def test_doctor_json_reports_a_malformed_url(capsys: pytest.CaptureFixture[str]) -> None:
    """A malformed URL is still reported as a JSON document (exit 2)."""
    assert cli.main(["doctor", "--json", "--url", "http://localhost:6379"]) == 2
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False
    assert "unknown URL scheme 'http'" in report["error"]


def test_demo_narration_is_printed_in_the_order_things_happened() -> None:
    """A worker's report that arrives after the parent's own line, but describes an
    earlier moment, is printed first; every held line is out before close() returns."""
    out = io.StringIO()
    start = time.time()
    printer = _demo._Printer(start, out, hold=5.0)
    printer.add(">>> the provider goes down", start + 0.30)
    printer.add("worker 2 called the provider: ok", start + 0.20)  # reported late
    printer.add("worker 1 called the provider: ok", start + 0.10)
    assert out.getvalue() == ""  # held: earlier reports may still be on their way
    printer.close()
    lines = out.getvalue().splitlines()
    assert [line.split("] ", 1)[1] for line in lines] == [
        "worker 1 called the provider: ok", "worker 2 called the provider: ok",
        ">>> the provider goes down"]
    assert lines[0].startswith("[  0.10s]")


def test_demo_lines_arriving_later_than_the_hold_keep_the_clock_monotonic() -> None:
    """A report later than the hold is printed after what is already out, stamped no
    earlier than it, so the elapsed times printed never go backwards."""
    out = io.StringIO()
    start = time.time() - 10.0
    printer = _demo._Printer(start, out, hold=0.0)
    printer.add("phase two", start + 5.0)
    wait_until(out.getvalue, 5.0, message="the first line printed")
    printer.add("a late report of phase one", start + 1.0)
    printer.close()
    stamps = [float(line[1:line.index("s]")]) for line in out.getvalue().splitlines()]
    assert stamps == sorted(stamps)



def test_url_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    """Without --url the command uses FLEXISYNC_URL."""
    monkeypatch.setenv("FLEXISYNC_URL", f"redis://127.0.0.1:{_dead_port()}/0")
    assert cli.main(["locks"]) == 3
    assert "127.0.0.1" in capsys.readouterr().err


def test_table_and_durations_read_well(capsys: pytest.CaptureFixture[str]) -> None:
    """Tables align their columns; durations print as seconds, never or a dash."""
    print_table(["name", "state"], [("openai", "open"), ("a", "closed")])
    print_table(["name"], [], empty="nothing here")
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["name    state", "openai  open", "a       closed", "nothing here"]
    assert format_seconds(None) == "-"
    assert format_seconds(float("inf")) == "never"
    assert format_seconds(1.234) == "1.23s"
    assert format_seconds(42.0) == "42.0s"
