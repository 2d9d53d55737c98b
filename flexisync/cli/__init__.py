"""The ``flexisync`` command: a demo, a health check, and read/write access to the primitives.

::

    flexisync demo [--workers N]
    flexisync doctor [--topic PATTERN]...
    flexisync top [--interval SECONDS] [--once]
    flexisync dashboard [--host H] [--port N] [--allow-write]
    flexisync breakers                     flexisync breaker open|close|reset NAME
    flexisync locks
    flexisync state get|set|del|keys SCOPE [KEY] [VALUE-JSON]
    flexisync events tail TOPIC            flexisync events publish TOPIC [DATA-JSON]
    flexisync stream read NAME [--after ID] [--follow]

Every command takes ``--url`` (default: ``FLEXISYNC_URL``, else
``redis://localhost:6379/0``), ``--namespace`` (default ``flexisync``) and ``--json``.
With ``--json`` a one-shot command prints exactly one JSON document on stdout; the
streaming commands (``events tail``, ``stream read --follow``) print JSON Lines, one
document per event.

Exit codes: 0 success; 1 the command ran but found a problem (doctor warnings, a missing
key, stream or breaker); 2 bad input (usage, a malformed URL, name or JSON value); 3
Redis unreachable; 130 interrupted. Errors go to stderr as one readable line, never as a
traceback, and a password in a URL is never printed.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Callable, Iterator, Sequence

import structlog

from flexisync.cli._common import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    describe,
    error,
    number_type,
)
from flexisync.cli._dashboard import register_dashboard
from flexisync.cli._demo import run_demo
from flexisync.cli._doctor import run_doctor
from flexisync.cli._inspect import register_inspection
from flexisync.cli._top import add_top_arguments, run_top
from flexisync.errors import FlexiSyncError

__all__ = ["build_parser", "main"]

Command = Callable[[argparse.Namespace], int]


def _common() -> argparse.ArgumentParser:
    """The options every command takes: --url, --namespace, --json."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--url", default=None,
                        help="Redis URL (default: $FLEXISYNC_URL, else redis://localhost:6379/0)")
    parent.add_argument("--namespace", default="flexisync",
                        help="key prefix shared by the application's processes "
                             "(default: flexisync)")
    parent.add_argument("--json", action="store_true",
                        help="print one JSON document instead of text (JSON Lines, one "
                             "per event, for events tail and stream read --follow)")
    return parent


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``flexisync`` command (one subparser per command)."""
    common = _common()
    parser = argparse.ArgumentParser(
        prog="flexisync",
        description="Coordinate worker processes through Redis: demo, health check, and "
                    "inspection of breakers, locks, state, events and streams.",
        epilog="Exit codes: 0 ok, 1 problem found (or not found), 2 bad input, 3 Redis "
               "unreachable, 130 interrupted. --json: one JSON document per invocation; "
               "JSON Lines for events tail and stream read --follow.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    demo = commands.add_parser(
        "demo", parents=[common], help="run a fleet of workers sharing one breaker, lock, "
                                      "state store and event stream",
        description="Spawn worker processes that share a circuit breaker guarding a "
                    "simulated flaky LLM provider, a lock for a one-worker job, a state "
                    "store and events, and narrate what happens. Without --url or "
                    "FLEXISYNC_URL it starts a throwaway redis-server. With --json the "
                    "narration goes to stderr and the summary is the JSON document.")
    demo.add_argument("--workers", type=_positive_int, default=4,
                      help="worker processes to spawn (1-32, default 4)")
    demo.set_defaults(handler=run_demo)

    doctor = commands.add_parser(
        "doctor", parents=[common], help="check that a Redis is fit for flexisync",
        description="Check server version, round-trip time, maxmemory-policy (must be "
                    "noeviction), persistence, deployment mode and the ACL permissions "
                    "flexisync needs. Exits 1 when something needs attention, 3 when Redis "
                    "does not answer (with --json, the document reports that too).")
    doctor.add_argument("--topic", dest="topics", action="append", default=[],
                        metavar="PATTERN",
                        help="a glob topic the application subscribes to (repeatable): "
                             "checks that the ACL grants it literally")
    doctor.set_defaults(handler=run_doctor)

    top = commands.add_parser(
        "top", parents=[common], help="watch breakers, locks and streams live in the "
                                      "terminal",
        description="The fleet at a glance, redrawn every --interval seconds until "
                    "Ctrl-C or SIGTERM (exit 0): every breaker with its state, time left "
                    "open, trips and the fleet's recent calls; held locks with holder and "
                    "time left; streams with length and last id. --once prints one frame; "
                    "--once --json the snapshot as one JSON document; --json alone one "
                    "snapshot per line (JSON Lines). No colour when stdout is not a "
                    "terminal or NO_COLOR is set.")
    add_top_arguments(top)
    top.set_defaults(handler=run_top)

    register_dashboard(commands, common=common)
    register_inspection(commands, common=common)
    return parser


_positive_int = number_type(True, 1, 32)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``flexisync`` command; returns the exit code (never raises, except exit).

    Args:
        argv: the arguments after the program name; ``None`` reads ``sys.argv[1:]``.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2), already printed
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    handler: Command = args.handler
    try:
        with _quiet_library_logs():
            return handler(args)
    except (FlexiSyncError, KeyboardInterrupt, BrokenPipeError) as exc:
        return _report(exc)


def _report(exc: BaseException) -> int:
    """Print what went wrong in one line and return the exit code for it."""
    if isinstance(exc, BrokenPipeError):  # `flexisync stream read X | head`
        return EXIT_OK
    if isinstance(exc, KeyboardInterrupt):
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    message, code = (describe(exc) if isinstance(exc, FlexiSyncError)
                     else (str(exc), EXIT_USAGE))
    error(message)
    return code


@contextlib.contextmanager
def _quiet_library_logs() -> Iterator[None]:
    """Send only flexisync's errors, to stderr, while a command runs; restore after.

    The library's warnings (``breaker.opened``...) are the command's own output here,
    and stdout must stay clean for ``--json``.
    """
    saved = structlog.get_config()
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=False,
    )
    try:
        yield
    finally:
        structlog.configure(**saved)
