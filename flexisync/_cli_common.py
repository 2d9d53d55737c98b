"""Helpers shared by the ``flexisync`` command's subcommands: connecting, printing."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from typing import Any

from flexisync._connection import RetryPolicy
from flexisync.coordinator import Coordinator, connect
from flexisync.errors import FlexiSyncError

__all__ = [
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_PROBLEM",
    "EXIT_UNAVAILABLE",
    "EXIT_USAGE",
    "UsageError",
    "coordinator_for",
    "error",
    "format_seconds",
    "parse_json",
    "print_json",
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
    """Print ``value`` as one line of JSON (infinities become ``null``)."""
    print(json.dumps(_finite(value), sort_keys=True, default=str))


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
