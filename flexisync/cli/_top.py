"""``flexisync top``: the fleet's breakers, locks, streams and semaphores, live in a terminal.

::

    flexisync top [--interval 1.0] [--once] [--json]

Every ``--interval`` seconds it takes a fleet snapshot (:mod:`flexisync._fleet`) and
redraws it in place (ANSI: the terminal's alternate screen, cursor home, redraw; no
curses). Ctrl-C (SIGINT) or SIGTERM ends it with exit code 0 and the terminal
restored. ``--once`` prints one frame and exits; ``--once --json`` prints the
snapshot as one JSON document; ``--json`` alone prints one snapshot per line (JSON
Lines). When stdout is not a terminal the frames are printed one after another, without
escape sequences. Colour only on a terminal, and never when ``NO_COLOR`` is set.

Redis going away while it refreshes does not end it: the frame says so and the next
refresh tries again (``--once`` exits 3 as every other command does).
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TextIO

from flexisync._fleet import snapshot
from flexisync.cli._common import (
    EXIT_OK,
    coordinator_for,
    describe,
    number_type,
    print_json,
    print_json_line,
)
from flexisync.coordinator import Coordinator
from flexisync.errors import BackendError, BackendUnavailable

__all__ = ["MAX_INTERVAL", "MIN_INTERVAL", "RECENT", "add_top_arguments", "render", "run_top"]

MIN_INTERVAL = 0.1
MAX_INTERVAL = 3600.0
#: Seconds of fleet call outcomes summed in the OK / FAIL / REJ columns.
RECENT = 60.0

_WIDTH = 80  # the frame's width when stdout is not a terminal
_MIN_WIDTH = 60
_MAX_WIDTH = 240

_STATE_COLOUR = {"closed": "32", "open": "31;1", "forced_open": "31;1", "half_open": "33;1",
                 "disabled": "2", "malformed": "35"}
_SEVERITY = {"open": 0, "forced_open": 1, "half_open": 2, "malformed": 3, "disabled": 4,
             "closed": 5}
_HOME, _CLEAR_BELOW, _CLEAR_LINE = "\x1b[H", "\x1b[J", "\x1b[K"
_ALT_ON, _ALT_OFF = "\x1b[?1049h\x1b[?25l", "\x1b[?25h\x1b[?1049l"


def add_top_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--interval`` and ``--once`` to the ``top`` subparser."""
    parser.add_argument("--interval", type=_interval, default=1.0, metavar="SECONDS",
                        help=f"seconds between refreshes ({MIN_INTERVAL:g}-"
                             f"{MAX_INTERVAL:g}, default 1.0)")
    parser.add_argument("--once", action="store_true",
                        help="print one frame (with --json: one JSON document) and exit")


_interval = number_type(False, MIN_INTERVAL, MAX_INTERVAL, unit="seconds")


def run_top(args: argparse.Namespace) -> int:
    """The ``top`` command: one frame (``--once``) or frames until SIGINT/SIGTERM (exit 0).

    Raises:
        BackendUnavailable: with ``--once``, Redis could not be reached (exit 3).
        ConfigError: malformed URL or namespace (exit 2).
    """
    with coordinator_for(args) as sync:
        if args.once:
            snap = snapshot(sync)
            if args.json:
                print_json(snap)
            else:
                _write(sys.stdout, render(snap, url=sync.url, interval=None,
                                          width=_width(sys.stdout), colour=_colour(sys.stdout),
                                          unicode=_unicode(sys.stdout)))
            return EXIT_OK
        return _refresh(sync, args)


# --- the refreshing loop ---------------------------------------------------------------


class _Stop(BaseException):
    """SIGTERM arrived: leave the loop as Ctrl-C does (a BaseException, as
    KeyboardInterrupt is, so that nothing on the way handles it as an error)."""


@contextmanager
def _sigterm_stops() -> Iterator[None]:
    """While inside, SIGTERM raises :class:`_Stop` (only in the main thread)."""
    def stop(_signum: int, _frame: Any) -> None:
        raise _Stop

    try:
        previous = signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread: leave SIGTERM alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _refresh(sync: Coordinator, args: argparse.Namespace) -> int:
    out = sys.stdout
    screen = out.isatty() and not args.json
    try:
        with _sigterm_stops():
            if screen:
                out.write(_ALT_ON)
            while True:
                started = time.monotonic()
                _frame(sync, args, out, screen=screen)
                time.sleep(max(0.0, args.interval - (time.monotonic() - started)))
    except (KeyboardInterrupt, _Stop):
        return EXIT_OK
    finally:
        if screen:
            out.write(_ALT_OFF)
            out.flush()


def _frame(sync: Coordinator, args: argparse.Namespace, out: TextIO, *, screen: bool) -> None:
    """Take one snapshot and print it (a frame, or a JSON line); Redis errors are shown."""
    try:
        snap: dict[str, Any] | None = snapshot(sync)
        problem = None
    except (BackendUnavailable, BackendError) as exc:
        snap, problem = None, describe(exc)[0]
    if args.json:
        print_json_line(snap if snap is not None else
                        {"namespace": sync.namespace, "taken_at": time.time(),
                         "error": problem})
        return
    if snap is None:
        lines = [_header(sync.namespace, sync.url, time.time(), args.interval),
                 f"{problem}; retrying every {args.interval:g}s"]
    else:
        lines = render(snap, url=sync.url, interval=args.interval, width=_width(out),
                       colour=_colour(out), unicode=_unicode(out))
    if not screen:
        _write(out, [*lines, ""])
        return
    rows = shutil.get_terminal_size((_WIDTH, 24)).lines or 24  # 0: a pty never sized
    if rows >= 5 and len(lines) > rows - 1:
        hidden = len(lines) - (rows - 2)
        lines = [*lines[:rows - 2], f"... {hidden} more line(s): enlarge the terminal or "
                                    "use --once / --json"]
    out.write(_HOME + "".join(line + _CLEAR_LINE + "\n" for line in lines) + _CLEAR_BELOW)
    out.flush()


def _write(out: TextIO, lines: Sequence[str]) -> None:
    out.write("".join(line + "\n" for line in lines))
    out.flush()


def _width(out: TextIO) -> int:
    if not out.isatty():
        return _WIDTH
    columns = shutil.get_terminal_size((_WIDTH, 24)).columns or _WIDTH
    return max(_MIN_WIDTH, min(_MAX_WIDTH, columns))


def _colour(out: TextIO) -> bool:
    """Colour only on a terminal, never with ``NO_COLOR`` (any non-empty value) or
    ``TERM=dumb``."""
    return (out.isatty() and not os.environ.get("NO_COLOR")
            and os.environ.get("TERM") != "dumb")


def _unicode(out: TextIO) -> bool:
    return (getattr(out, "encoding", None) or "").lower().replace("-", "") == "utf8"


# --- rendering (pure: a snapshot in, lines out) ----------------------------------------


def render(snap: dict[str, Any], *, url: str, interval: float | None, width: int = _WIDTH,
           colour: bool = False, unicode: bool = False,
           now: float | None = None) -> list[str]:
    """The text frame of a fleet snapshot: lines no wider than ``width`` columns.

    Args:
        snap: a :func:`flexisync._fleet.snapshot` result.
        url: the Redis URL to show (pass a redacted one: ``Coordinator.url``).
        interval: the refresh interval shown in the header; None for ``--once``.
        colour: colour the breaker states with ANSI SGR codes (not counted in width).
        unicode: ``…`` marks a cut name (else ``~``).
        now: the time (Unix seconds) ages are measured from; default ``taken_at``.
    """
    now = snap["taken_at"] if now is None else now
    cut = "\u2026" if unicode else "~"
    lines = [_fit(_header(snap["namespace"], url, snap["taken_at"], interval), width, cut)]
    breakers, locks = snap["breakers"], snap["locks"]
    streams, semaphores = snap["streams"], snap.get("semaphores", [])
    states: dict[str, int] = {}
    for breaker in breakers:
        states[breaker["state"]] = states.get(breaker["state"], 0) + 1
    summary = ", ".join(f"{states[state]} {state}"
                        for state in sorted(states, key=lambda s: (_SEVERITY.get(s, 9), s)))
    lines.append(_fit(f"breakers {len(breakers)}{f' ({summary})' if summary else ''}  "
                      f"locks {len(locks)}  streams {len(streams)}  "
                      f"semaphores {len(semaphores)}", width, cut))
    truncated = [kind for kind, more in snap.get("truncated", {}).items() if more]
    if truncated:
        lines.append(_fit(f"showing the first {snap.get('limit')} of each: more "
                          f"{', '.join(truncated)} exist", width, cut))

    lines += ["", *_breaker_table(breakers, now, width, colour, cut)]
    lines += ["", *_table(
        "LOCKS", [("HOLDER (host:pid)", -20), ("LEFT", 7), ("FENCING TOKEN", 16),
                  ("QUEUE", 5)],
        [(lock["name"], [lock["holder"] or "-", _duration(lock["ttl_left"], never="no ttl"),
                         _token(lock["fencing_token"]), _number(lock["waiters"])])
         for lock in locks], width, cut, empty="no locks held")]
    lines += ["", *_table(
        "STREAMS", [("LENGTH", 9), ("LAST ID", -20), ("LAST", 6)],
        [(stream["name"], [_number(stream["length"]), stream["last_id"] or "-",
                           _id_age(stream["last_id"], now)]) for stream in streams],
        width, cut, empty="no streams")]
    if semaphores:
        lines += ["", *_table(
            "SEMAPHORES", [("HOLDERS", 7), ("WAITERS", 7)],
            [(sem["name"], [_number(sem["holders"]), _number(sem["waiters"])])
             for sem in semaphores], width, cut, empty="")]
    return lines


def _header(namespace: str, url: str, taken_at: float, interval: float | None) -> str:
    clock = datetime.datetime.fromtimestamp(taken_at).strftime("%H:%M:%S")
    every = f"every {interval:g}s" if interval is not None else "once"
    return f"flexisync top  {namespace}  {url}  {clock}  {every}"


_BREAKER_COLUMNS = [("STATE", -11), ("SINCE", 6), ("LEFT", 7), ("TRIPS", 5), ("FAILS", 5),
                    ("OK", 5), ("FAIL", 5), ("REJ", 5)]


def _breaker_table(breakers: list[dict[str, Any]], now: float, width: int, colour: bool,
                   cut: str) -> list[str]:
    rows: list[tuple[str, list[str]]] = []
    for b in breakers:
        recent = _recent(b.get("outcomes") or [], now)
        rows.append((b["name"], [
            b["state"], _age(b["changed_at"], now), _left(b),
            _number(b["trips"]), _number(b["failures"]),
            _number(recent["success"]), _number(recent["failure"]),
            _number(recent["rejected"])]))
    paint: Callable[[str, str], str] | None = None
    if colour:
        def paint(column: str, cell: str) -> str:
            code = _STATE_COLOUR.get(cell.strip())
            return f"\x1b[{code}m{cell}\x1b[0m" if column == "STATE" and code else cell
    title = f"BREAKERS (OK/FAIL/REJ: fleet calls in the last {RECENT:g}s)"
    return _table(title, _BREAKER_COLUMNS, rows, width, cut, empty="no breakers",
                  paint=paint)


def _table(title: str, columns: list[tuple[str, int]], rows: list[tuple[str, list[str]]],
           width: int, cut: str, *, empty: str,
           paint: Callable[[str, str], str] | None = None) -> list[str]:
    """A titled table: NAME takes what the ``columns`` (header, width; negative: left
    aligned) leave of ``width``; cells are cut to fit, never wider."""
    fixed = sum(abs(w) + 1 for _, w in columns)
    name_width = max(8, width - fixed)
    lines = [_fit(title, width, cut)]
    if not rows:
        return [*lines, f"  {empty}"] if empty else lines
    header = [("NAME", -name_width), *columns]
    lines.append(" ".join(_cell(h, w, cut) for h, w in header).rstrip())
    for name, cells in rows:
        parts = [_cell(name, -name_width, cut)]
        for (head, w), value in zip(columns, cells, strict=True):
            text = _cell(value, w, cut)
            parts.append(paint(head, text) if paint is not None else text)
        lines.append(" ".join(parts).rstrip())
    return lines


def _cell(value: str, width: int, cut: str) -> str:
    size = abs(width)
    value = _printable(value)
    if len(value) > size:
        value = value[:size - 1] + cut
    return value.ljust(size) if width < 0 else value.rjust(size)


def _fit(text: str, width: int, cut: str) -> str:
    text = _printable(text)
    return text if len(text) <= width else text[:width - 1] + cut


def _printable(text: str) -> str:
    """``text`` with control characters as ``?``: a name or holder read from Redis
    must not move the cursor or change the terminal."""
    return text if text.isprintable() else "".join(c if c.isprintable() else "?"
                                                   for c in text)


def _recent(outcomes: list[dict[str, Any]], now: float) -> dict[str, int]:
    """Fleet call outcomes summed over the buckets of the last :data:`RECENT` seconds."""
    total = {"success": 0, "failure": 0, "rejected": 0}
    for bucket in outcomes:
        if bucket.get("t", 0) + 10 > now - RECENT:
            for outcome in total:
                total[outcome] += int(bucket.get(outcome, 0) or 0)
    return total


def _left(breaker: dict[str, Any]) -> str:
    """How long the breaker stays open: a time, ``manual`` (forced open), or ``-``."""
    state = breaker["state"]
    if state == "open":
        return _duration(breaker["retry_after"], never="manual")
    if state == "forced_open":
        return "manual"
    if state == "half_open":
        return "probing"
    return "-"


def _duration(seconds: float | None, *, never: str) -> str:
    """``950ms``, ``12.3s``, ``4m05s``, ``2h03m``, ``3d04h``; ``never`` for None."""
    if seconds is None:
        return never
    if seconds < 1:
        return f"{max(seconds, 0.0) * 1000:.0f}ms"
    if seconds < 60:
        return f"{seconds:.1f}s"
    whole = int(seconds)
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d{whole % 86400 // 3600:02d}h"


def _age(at: float | None, now: float) -> str:
    if at is None:
        return "-"
    seconds = max(0.0, now - at)
    return f"{seconds:.0f}s" if seconds < 60 else _duration(seconds, never="-")


def _id_age(entry_id: str | None, now: float) -> str:
    """How long ago a stream id's entry was appended (ids start with the server's ms)."""
    if not entry_id:
        return "-"
    try:
        millis = int(entry_id.split("-", 1)[0])
    except ValueError:
        return "?"
    return _age(millis / 1000.0, now)


def _token(value: int | None) -> str:
    return "-" if value is None else str(value)


def _number(value: int | None) -> str:
    """``1234``, ``12k``, ``3.4M``; ``-`` for None."""
    if value is None:
        return "-"
    size = abs(value)
    if size < 100_000:
        return str(value)
    if size < 999_500:
        return f"{value / 1000:.0f}k"
    if size < 99_950_000:
        return f"{value / 1_000_000:.1f}M"
    if size < 999_500_000:
        return f"{value / 1_000_000:.0f}M"
    return f"{value / 1_000_000_000:.0f}G"
