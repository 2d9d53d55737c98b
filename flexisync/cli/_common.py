"""Helpers shared by the ``flexisync`` command's subcommands: connecting, printing.

The ``--json`` rule, for every command: a one-shot command prints exactly one JSON
document on stdout (:func:`print_json`); a streaming command (``events tail``,
``stream read --follow``) prints JSON Lines, one document per event, flushed as each
arrives (:func:`print_json_line`). A command that fails prints its one-line error on
stderr and nothing on stdout, except ``doctor --json``, whose report is the document.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Sequence
from typing import Any

from flexisync._connection import RetryPolicy
from flexisync.coordinator import Coordinator, connect
from flexisync.errors import BackendUnavailable, ConfigError, FlexiSyncError

__all__ = [
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_PROBLEM",
    "EXIT_UNAVAILABLE",
    "EXIT_USAGE",
    "UsageError",
    "coordinator_for",
    "describe",
    "error",
    "format_seconds",
    "not_found",
    "number_type",
    "parse_json",
    "print_json",
    "print_json_line",
    "print_table",
    "text",
]

EXIT_OK = 0
EXIT_PROBLEM = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3
EXIT_INTERRUPTED = 130

# A command-line tool should fail in about a second when nothing answers, not after the
# library's default retry budget meant for long-running workers.
CLI_RETRY = RetryPolicy(attempts=2, initial=0.05, maximum=0.2, deadline=1.0)


class UsageError(FlexiSyncError):
    """Bad command-line input the parser itself cannot see (e.g. a malformed JSON value)."""


def error(message: str) -> None:
    """Print ``flexisync: error: message`` to stderr."""
    print(f"flexisync: error: {message}", file=sys.stderr)


def describe(exc: FlexiSyncError) -> tuple[str, int]:
    """The one-line message and the exit code that report ``exc`` on the command line.

    The message never contains a password: errors carry redacted addresses only.
    """
    if isinstance(exc, BackendUnavailable):
        return (f"cannot reach Redis at {exc.address}"
                + (f" ({exc.reason})" if exc.reason else ""), EXIT_UNAVAILABLE)
    code = EXIT_USAGE if isinstance(exc, (ConfigError, UsageError)) else EXIT_PROBLEM
    return str(exc), code


def not_found(message: str) -> int:
    """Report a missing key, stream or breaker on stderr; returns :data:`EXIT_PROBLEM`."""
    error(message)
    return EXIT_PROBLEM


def coordinator_for(args: argparse.Namespace, url: str | None = None) -> Coordinator:
    """A Coordinator for ``--url`` / ``--namespace`` with a short, CLI-sized retry budget.

    Raises:
        ConfigError: malformed URL or namespace.
    """
    return connect(url if url is not None else args.url, namespace=args.namespace,
                   retry=CLI_RETRY, socket_connect_timeout=1.0)


def parse_json(value: str, what: str) -> Any:
    """Parse a JSON command-line argument.

    Raises:
        UsageError: ``value`` is not valid JSON; the message says how to quote a string.
    """
    try:
        return json.loads(value)
    except ValueError as exc:
        raise UsageError(
            f"{what} must be JSON ({exc}); quote strings twice, e.g. '\"text\"'"
        ) from None


def print_json(value: Any) -> None:
    """Print ``value`` as the one JSON document of a one-shot command (infinities: ``null``).

    A one-shot command calls this exactly once per invocation.
    """
    print(json.dumps(_finite(value), sort_keys=True, default=str), flush=True)


def print_json_line(value: Any) -> None:
    """Print ``value`` as one line of a JSON Lines stream, flushed at once."""
    print(json.dumps(_finite(value), sort_keys=True, default=str), flush=True)


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], *,
                empty: str = "(none)") -> None:
    """Print ``rows`` as left-aligned columns under ``headers``; ``empty`` when none."""
    if not rows:
        print(empty)
        return
    cells = [[str(c) for c in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def format_seconds(value: float | None) -> str:
    """``1.25s``, ``inf`` or ``-`` for None, for tables."""
    if value is None:
        return "-"
    if math.isinf(value):
        return "never" if value > 0 else "-"
    return f"{value:.1f}s" if value >= 10 else f"{value:.2f}s"


def text(value: Any) -> str:
    """``value`` as ``str``, decoding bytes (replies may be bytes or str)."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def number_type(whole: bool, low: float, high: float = math.inf, *, unit: str = "",
                low_open: bool = False) -> Callable[[str], Any]:
    """An argparse ``type=`` accepting a finite number from ``low`` to ``high``.

    Args:
        whole: an ``int`` (``"3"``), else a ``float`` (``"0.5"``).
        low, high: the accepted range, both ends included (``high`` may be ``inf``).
        unit: shown in messages, e.g. ``"seconds"``.
        low_open: ``low`` itself is refused (a positive duration: ``low=0``).

    The converter raises ``argparse.ArgumentTypeError`` naming the accepted range, so
    the command exits 2 with that message.
    """
    kind = "a whole number" if whole else (unit or "a number")
    suffix = f" {unit}" if unit else ""

    def convert(text: str) -> Any:
        try:
            value: float = int(text) if whole else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind}, got {text!r}") from None
        below = value <= low if low_open else value < low
        if not math.isfinite(value) or below or value > high:
            if low_open and high == math.inf:
                wanted = f"must be more than {low:g}{suffix}"
            elif high == math.inf:
                wanted = f"must be at least {low:g}{suffix}"
            else:
                wanted = f"must be from {low:g} to {high:g}{suffix}"
            raise argparse.ArgumentTypeError(f"{wanted}, got {text}")
        return value

    return convert
