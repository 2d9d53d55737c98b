"""The ``flexisync`` command without a server: parsing, help, bad input, unreachable Redis."""

from __future__ import annotations

import argparse
import socket

import pytest

from flexisync import cli
from flexisync._cli_common import format_seconds, print_table

# Every leaf command, as the words that select it.
COMMANDS = [
    ["demo"], ["doctor"], ["breakers"], ["breaker", "open"], ["breaker", "close"],
    ["breaker", "reset"], ["locks"], ["state", "get"], ["state", "set"], ["state", "del"],
    ["state", "keys"], ["events", "tail"], ["events", "publish"], ["stream", "read"],
]
DATA_COMMANDS = [["doctor"], ["breakers"], ["locks"], ["state", "get"], ["state", "keys"],
                 ["events", "tail"], ["stream", "read"]]


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
                    "stream"):
        assert command in out


@pytest.mark.parametrize("words", COMMANDS, ids=" ".join)
def test_every_command_has_help_url_and_namespace(
        words: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """Each command answers --help with exit 0 and accepts --url and --namespace."""
    assert cli.main([*words, "--help"]) == 0
    out = capsys.readouterr().out
    assert "--url" in out
    assert "--namespace" in out


@pytest.mark.parametrize("words", DATA_COMMANDS, ids=" ".join)
def test_commands_that_print_data_offer_json(words: list[str]) -> None:
    """Commands whose output is data accept --json."""
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
    ["breaker", "reset", "b"],
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
