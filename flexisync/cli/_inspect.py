"""Inspection subcommands: ``breakers``, ``breaker``, ``locks``, ``state``, ``events``, ``stream``.

They read (and, for ``breaker``, ``state set|del`` and ``events publish``, change) the
objects an application's workers share, through the same public API the workers use.
Every one takes ``--json`` (see :mod:`flexisync.cli._common` for the rule).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import sys
from collections.abc import Iterable
from typing import Any

from flexisync._keys import validate_name, validate_pattern
from flexisync.breaker import CircuitBreaker, list_breakers
from flexisync.cli._common import (
    EXIT_OK,
    coordinator_for,
    format_seconds,
    not_found,
    number_type,
    parse_json,
    print_json,
    print_json_line,
    print_table,
)
from flexisync.coordinator import Coordinator
from flexisync.locks import list_locks
from flexisync.streams import parse_id

__all__ = ["MAX_OPEN_SECONDS", "register_inspection"]

# `breaker open --for` beyond this is a typo or a forced open in disguise.
MAX_OPEN_SECONDS = 30 * 24 * 3600.0


def register_inspection(commands: Any, *, common: argparse.ArgumentParser) -> None:
    """Add the inspection subcommands to ``commands`` (an argparse subparsers action).

    Args:
        common: the parent parser with ``--url``, ``--namespace`` and ``--json``.
    """
    _register_breakers(commands, common)
    _register_state(commands, common)
    _register_events(commands, common)


def _register_breakers(commands: Any, common: argparse.ArgumentParser) -> None:
    breakers = commands.add_parser(
        "breakers", parents=[common], help="list circuit breakers with state, failures and "
                                           "time to retry")
    breakers.set_defaults(handler=_breakers)

    breaker = commands.add_parser(
        "breaker", help="open or close one breaker for the whole fleet",
        description="Change one breaker for the whole fleet. A NAME that no process has "
                    "used in this namespace is an error (exit 1) and creates nothing; "
                    "`open --create` opens a breaker no process has used yet.")
    actions = breaker.add_subparsers(dest="action", metavar="ACTION", required=True)
    opened = actions.add_parser(
        "open", parents=[common], help="open it: until closed, or for --for SECONDS",
        description="Open the breaker for every process. Without --for it stays open "
                    "(forced_open) until `flexisync breaker close`. With --for it is open "
                    "for exactly SECONDS from now and then admits one probe, whatever it "
                    "was before (forced_open, disabled, or open for longer).")
    opened.add_argument("name", help="breaker name")
    opened.add_argument("--for", dest="seconds", type=_open_seconds, default=None,
                        metavar="SECONDS",
                        help=f"open for this many seconds (up to {MAX_OPEN_SECONDS:.0f}), "
                             "then allow a probe")
    opened.add_argument("--create", action="store_true",
                        help="also open a breaker that no process has used yet")
    close_help = ("close it now: ends open, half_open, forced_open and disabled, and "
                  "clears counted failures and the backoff (the same as {other})")
    closed = actions.add_parser("close", parents=[common],
                                help=close_help.format(other="reset"),
                                description=close_help.format(other="reset").capitalize()
                                + ". CircuitBreaker.reset() in the library.")
    closed.add_argument("name", help="breaker name")
    reset = actions.add_parser("reset", parents=[common],
                               help=close_help.format(other="close"),
                               description=close_help.format(other="close").capitalize()
                               + ". CircuitBreaker.reset() in the library.")
    reset.add_argument("name", help="breaker name")
    for sub in (opened, closed, reset):
        sub.set_defaults(handler=_breaker_action)

    locks = commands.add_parser("locks", parents=[common],
                                help="list held locks with holder, TTL and fencing token")
    locks.set_defaults(handler=_locks)


def _register_state(commands: Any, common: argparse.ArgumentParser) -> None:
    state = commands.add_parser("state", help="read and write state values",
                                description="Read and write StateStore values (JSON).")
    verbs = state.add_subparsers(dest="action", metavar="ACTION", required=True)
    get = verbs.add_parser("get", parents=[common], help="print a value as JSON")
    set_ = verbs.add_parser("set", parents=[common], help="store a JSON value")
    delete = verbs.add_parser("del", parents=[common], help="delete a value")
    keys = verbs.add_parser("keys", parents=[common], help="list a scope's keys and TTLs")
    for sub in (get, set_, delete, keys):
        sub.add_argument("scope", help="the store's scope, e.g. providers")
    for sub in (get, set_, delete):
        sub.add_argument("key", help="the key inside the scope")
    set_.add_argument("value", help="the value as JSON, e.g. '{\"healthy\": false}' or "
                                    "'\"text\"'")
    set_.add_argument("--ttl", type=_seconds, default=None, help="expire after SECONDS")
    get.set_defaults(handler=_state_get)
    set_.set_defaults(handler=_state_set)
    delete.set_defaults(handler=_state_del)
    keys.set_defaults(handler=_state_keys)


def _register_events(commands: Any, common: argparse.ArgumentParser) -> None:
    events = commands.add_parser("events", help="watch or publish live events")
    verbs = events.add_subparsers(dest="action", metavar="ACTION", required=True)
    tail = verbs.add_parser(
        "tail", parents=[common], help="print events on a topic (glob allowed) as they come",
        description="Subscribe to TOPIC and print each event until interrupted, --count "
                    "events arrived, or --timeout seconds passed without one. --json "
                    "prints JSON Lines: one document per event.")
    tail.add_argument("topic", help="topic or glob pattern, e.g. providers or 'jobs.*'")
    _add_limits(tail)
    tail.set_defaults(handler=_events_tail)
    publish = verbs.add_parser("publish", parents=[common], help="publish one event")
    publish.add_argument("topic", help="topic name")
    publish.add_argument("data", nargs="?", default="null", help="event data as JSON")
    publish.add_argument("--type", default="message", help="event type (default: message)")
    publish.set_defaults(handler=_events_publish)

    stream = commands.add_parser("stream", help="read a durable stream")
    verbs = stream.add_subparsers(dest="action", metavar="ACTION", required=True)
    read = verbs.add_parser(
        "read", parents=[common], help="print a stream's events after an id",
        description="Print the events of stream NAME after --after (default: from the "
                    "start); a stream that does not exist is an error (exit 1). With "
                    "--follow keep printing new ones (a stream that does not exist yet "
                    "is waited for). --json prints one JSON array, or with --follow JSON "
                    "Lines: one document per event.")
    read.add_argument("name", help="stream name")
    read.add_argument("--after", default=None, help="print events strictly after this id")
    read.add_argument("--follow", action="store_true", help="keep waiting for new events")
    _add_limits(read)
    read.set_defaults(handler=_stream_read)


def _add_limits(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--count", type=_count, default=None,
                        help="stop after this many events")
    parser.add_argument("--timeout", type=_seconds, default=None,
                        help="stop after SECONDS without an event")


_seconds = number_type(False, 0, unit="seconds", low_open=True)


def _open_seconds(value: str) -> float:
    number = float(_seconds(value))
    if number > MAX_OPEN_SECONDS:
        raise argparse.ArgumentTypeError(
            f"at most {MAX_OPEN_SECONDS:.0f} seconds (30 days), got {value}; use "
            "`breaker open NAME` without --for to keep it open until closed")
    return number


_count = number_type(True, 1)


_OPEN_SLACK = 1.0  # seconds: a trip that took leaves at most `seconds` (+ clock skew)


def _record(item: Any) -> dict[str, Any]:
    return dataclasses.asdict(item)


# --- breakers --------------------------------------------------------------------------


def _breakers(args: argparse.Namespace) -> int:
    with coordinator_for(args) as sync:
        rows = [_record(b) for b in list_breakers(sync)]
    if args.json:
        print_json(rows)
        return EXIT_OK
    print_table(["name", "state", "failures", "retry in", "opened", "probes"],
                [(r["name"], r["state"], r["failures"],
                  format_seconds(r["retry_after"]) if r["state"] != "closed" else "-",
                  f"{r['trips']}x", r["probes_in_flight"]) for r in rows],
                empty="no breakers in this namespace")
    return EXIT_OK


def _breaker_action(args: argparse.Namespace) -> int:
    with coordinator_for(args) as sync:
        if not (args.action == "open" and args.create) and not _breaker_exists(sync, args.name):
            return not_found(f"no breaker {args.name!r} in namespace {sync.namespace!r} "
                             "(`flexisync breakers` lists them; `breaker open --create` "
                             "opens a new one)")
        breaker = sync.breaker(args.name)
        if args.action != "open":
            breaker.reset()
        elif args.seconds is None:
            breaker.force_open()
        else:
            _open_for(breaker, args.seconds)
        info = breaker.info()
    if args.json:
        print_json(_record(info))
    elif info.state == "open":
        print(f"breaker {args.name!r} is now open (a probe in "
              f"{format_seconds(info.retry_after)})")
    else:
        print(f"breaker {args.name!r} is now {info.state}")
    return EXIT_OK


def _breaker_exists(sync: Coordinator, name: str) -> bool:
    """Whether breaker ``name`` has shared state in Redis (reads; creates nothing)."""
    key = sync._ctx.keys.key("breaker", validate_name(name, "breaker name"))
    return bool(sync._ctx.backend.call("cli.breaker_exists", lambda c: c.exists(key)))


def _open_for(breaker: CircuitBreaker, seconds: float) -> None:
    """Open ``breaker`` for exactly ``seconds`` from now, whatever its state was.

    ``trip`` never shortens an open period and leaves forced_open and disabled alone
    (right for a worker's Retry-After, wrong for an operator's explicit order), so when
    the trip did not take, the breaker is closed and tripped again: two atomic, published
    transitions, with the fleet closed for one round trip between them.
    """
    breaker.trip(retry_after=seconds)
    info = breaker.info()
    if info.state != "open" or info.retry_after > seconds + _OPEN_SLACK:
        breaker.reset()
        breaker.trip(retry_after=seconds)


# --- locks -----------------------------------------------------------------------------


def _locks(args: argparse.Namespace) -> int:
    with coordinator_for(args) as sync:
        rows = [_record(lock) for lock in list_locks(sync)]
    if args.json:
        print_json(rows)
        return EXIT_OK
    print_table(["name", "holder (host:pid)", "expires in", "fencing token", "waiters"],
                [(r["name"], r["holder"] or "-", format_seconds(r["ttl"]),
                  r["fencing_token"] if r["fencing_token"] is not None else "-",
                  r["waiters"]) for r in rows],
                empty="no locks held in this namespace")
    return EXIT_OK


# --- state -----------------------------------------------------------------------------


def _state_get(args: argparse.Namespace) -> int:
    missing = object()
    with coordinator_for(args) as sync:
        value = sync.state(args.scope).get(args.key, missing)
    if value is missing:
        return not_found(f"no value for {args.scope}/{args.key}")
    print_json(value)  # the value is JSON with or without --json
    return EXIT_OK


def _state_set(args: argparse.Namespace) -> int:
    value = parse_json(args.value, "VALUE")
    with coordinator_for(args) as sync:
        sync.state(args.scope).set(args.key, value, ttl=args.ttl)
    if args.json:
        print_json({"scope": args.scope, "key": args.key, "ttl": args.ttl})
    else:
        expiry = f" (expires in {format_seconds(args.ttl)})" if args.ttl else ""
        print(f"set {args.scope}/{args.key}{expiry}")
    return EXIT_OK


def _state_del(args: argparse.Namespace) -> int:
    with coordinator_for(args) as sync:
        deleted = sync.state(args.scope).delete(args.key)
    if not deleted:
        return not_found(f"nothing to delete at {args.scope}/{args.key}")
    if args.json:
        print_json({"scope": args.scope, "key": args.key, "deleted": True})
    else:
        print(f"deleted {args.scope}/{args.key}")
    return EXIT_OK


def _state_keys(args: argparse.Namespace) -> int:
    with coordinator_for(args) as sync:
        store = sync.state(args.scope)
        rows: list[dict[str, Any]] = [{"key": key, "ttl": store.ttl(key)}
                                      for key in sorted(store.keys())]
    if args.json:
        print_json(rows)
    else:
        print_table(["key", "expires in"], [(r["key"], format_seconds(r["ttl"])) for r in rows],
                    empty=f"no keys in scope {args.scope!r}")
    return EXIT_OK


# --- events and streams ---------------------------------------------------------------


def _events_tail(args: argparse.Namespace) -> int:
    validate_pattern(args.topic, "topic")
    with coordinator_for(args) as sync:
        sub = sync.events.subscribe(args.topic)
        print(f"listening on {args.topic!r} (Ctrl-C to stop)", file=sys.stderr,
              flush=True)
        try:
            _print_live(_pull(sub, args.timeout), args)
        finally:
            sub.close()
    return EXIT_OK


def _pull(sub: Any, timeout: float | None) -> Iterable[Any]:
    """Events from ``sub`` until ``timeout`` seconds pass without one (None: forever)."""
    while True:
        event = sub.get(timeout=timeout if timeout is not None else 1.0)
        if event is not None:
            yield event
        elif timeout is not None:
            return


def _events_publish(args: argparse.Namespace) -> int:
    data = parse_json(args.data, "DATA")
    with coordinator_for(args) as sync:
        receivers = sync.events.publish(args.topic, data, type=args.type)
    if args.json:
        print_json({"topic": args.topic, "type": args.type, "receivers": receivers})
    else:
        print(f"published to {args.topic!r}: {receivers} subscriber(s) received it")
    return EXIT_OK


def _stream_read(args: argparse.Namespace) -> int:
    with coordinator_for(args) as sync:
        stream = sync.stream(args.name)
        if args.after is not None:
            parse_id(args.after, "--after")  # bad input (exit 2) before "not found" (1)
        exists = _exists(sync, sync._ctx.keys.key("stream", args.name))
        if not args.follow:
            if not exists:
                return not_found(f"no stream {args.name!r} in namespace "
                                 f"{sync.namespace!r}")
            events = stream.read_after(args.after, count=args.count)
            if args.json:
                print_json([_event_record(e) for e in events])
            else:
                _print_live(events, args)
            return EXIT_OK
        if not exists:
            print(f"stream {args.name!r} does not exist yet; waiting for its first event",
                  file=sys.stderr, flush=True)
        live = stream.follow(args.after, timeout=args.timeout)
        try:
            _print_live(live, args)
        finally:  # closes its XREAD BLOCK connection now, also after --count
            close = getattr(live, "close", None)
            if close is not None:
                close()
    return EXIT_OK


def _exists(sync: Coordinator, key: str) -> bool:
    return bool(sync._ctx.backend.call("cli.exists", lambda c: c.exists(key)))


def _event_record(event: Any) -> dict[str, Any]:
    return {"id": event.id, "topic": event.topic, "type": event.type, "data": event.data,
            "time": event.time, "source": event.source}


def _print_live(events: Iterable[Any], args: argparse.Namespace) -> None:
    """Print each event as it comes (a JSON line with --json), up to ``--count``."""
    for seen, event in enumerate(events, start=1):
        if args.json:
            print_json_line(_event_record(event))
        else:
            stamp = datetime.datetime.fromtimestamp(event.time).strftime("%H:%M:%S.%f")[:-3]
            print(f"{stamp}  {event.id}  {event.topic}  {event.type}  "
                  f"{_compact(event.data)}  ({event.source})", flush=True)
        if args.count is not None and seen >= args.count:
            return


def _compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), default=str)
