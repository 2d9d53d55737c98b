"""Inspection subcommands: ``breakers``, ``breaker``, ``locks``, ``state``, ``events``, ``stream``.

They read (and, for ``breaker`` and ``state set|del``, change) the objects an
application's workers share, through the same public API the workers use.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import sys
from collections.abc import Iterable
from typing import Any

from flexisync._cli_common import (
    EXIT_OK,
    EXIT_PROBLEM,
    coordinator_for,
    format_seconds,
    parse_json,
    print_json,
    print_table,
)
from flexisync._keys import validate_pattern
from flexisync.breaker import list_breakers
from flexisync.locks import list_locks

__all__ = ["register_inspection"]


def register_inspection(commands: Any, *, data: argparse.ArgumentParser,
                        plain: argparse.ArgumentParser) -> None:
    """Add the inspection subcommands to ``commands`` (an argparse subparsers action)."""
    _register_breakers(commands, data, plain)
    _register_state(commands, data, plain)
    _register_events(commands, data, plain)


def _register_breakers(commands: Any, data: argparse.ArgumentParser,
                       plain: argparse.ArgumentParser) -> None:
    breakers = commands.add_parser(
        "breakers", parents=[data], help="list circuit breakers with state, failures and "
                                         "time to retry")
    breakers.set_defaults(handler=_breakers)

    breaker = commands.add_parser("breaker", help="open, close or reset one breaker",
                                  description="Change one breaker for the whole fleet.")
    actions = breaker.add_subparsers(dest="action", metavar="ACTION", required=True)
    opened = actions.add_parser(
        "open", parents=[plain], help="open it: until closed, or --for SECONDS",
        description="Open the breaker for every process. Without --for it stays open "
                    "(forced_open) until `flexisync breaker close`; with --for it opens "
                    "like a tripped breaker and probes again after SECONDS.")
    opened.add_argument("name", help="breaker name")
    opened.add_argument("--for", dest="seconds", type=_seconds, default=None,
                        help="open for this many seconds, then allow a probe")
    closed = actions.add_parser("close", parents=[plain],
                                help="close it now (also ends forced_open and disabled)")
    closed.add_argument("name", help="breaker name")
    reset = actions.add_parser("reset", parents=[plain],
                               help="close it and forget counted failures")
    reset.add_argument("name", help="breaker name")
    for sub in (opened, closed, reset):
        sub.set_defaults(handler=_breaker_action)

    locks = commands.add_parser("locks", parents=[data],
                                help="list held locks with holder, TTL and fencing token")
    locks.set_defaults(handler=_locks)


def _register_state(commands: Any, data: argparse.ArgumentParser,
                    plain: argparse.ArgumentParser) -> None:
    state = commands.add_parser("state", help="read and write state values",
                                description="Read and write StateStore values (JSON).")
    verbs = state.add_subparsers(dest="action", metavar="ACTION", required=True)
    get = verbs.add_parser("get", parents=[data], help="print a value as JSON")
    set_ = verbs.add_parser("set", parents=[plain], help="store a JSON value")
    delete = verbs.add_parser("del", parents=[plain], help="delete a value")
    keys = verbs.add_parser("keys", parents=[data], help="list a scope's keys and TTLs")
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


def _register_events(commands: Any, data: argparse.ArgumentParser,
                     plain: argparse.ArgumentParser) -> None:
    events = commands.add_parser("events", help="watch or publish live events")
    verbs = events.add_subparsers(dest="action", metavar="ACTION", required=True)
    tail = verbs.add_parser(
        "tail", parents=[data], help="print events on a topic (glob allowed) as they come",
        description="Subscribe to TOPIC and print each event until interrupted, --count "
                    "events arrived, or --timeout seconds passed without one.")
    tail.add_argument("topic", help="topic or glob pattern, e.g. providers or 'jobs.*'")
    _add_limits(tail)
    tail.set_defaults(handler=_events_tail)
    publish = verbs.add_parser("publish", parents=[plain], help="publish one event")
    publish.add_argument("topic", help="topic name")
    publish.add_argument("data", nargs="?", default="null", help="event data as JSON")
    publish.add_argument("--type", default="message", help="event type (default: message)")
    publish.set_defaults(handler=_events_publish)

    stream = commands.add_parser("stream", help="read a durable stream")
    verbs = stream.add_subparsers(dest="action", metavar="ACTION", required=True)
    read = verbs.add_parser(
        "read", parents=[data], help="print a stream's events after an id",
        description="Print the events of stream NAME after --after (default: from the "
                    "start); with --follow keep printing new ones.")
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


def _seconds(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {value!r}") from None
    if not math.isfinite(number) or number <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {value}")
    return number


def _count(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {number}")
    return number


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
        breaker = sync.breaker(args.name)
        if args.action == "open":
            if args.seconds is None:
                breaker.force_open()
            else:
                breaker.trip(retry_after=args.seconds)
        else:
            breaker.reset()
        print(f"breaker {args.name!r} is now {breaker.state}")
    return EXIT_OK


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
        print(f"no value for {args.scope}/{args.key}", file=sys.stderr)
        return EXIT_PROBLEM
    print_json(value)
    return EXIT_OK


def _state_set(args: argparse.Namespace) -> int:
    value = parse_json(args.value, "VALUE")
    with coordinator_for(args) as sync:
        sync.state(args.scope).set(args.key, value, ttl=args.ttl)
    expiry = f" (expires in {format_seconds(args.ttl)})" if args.ttl else ""
    print(f"set {args.scope}/{args.key}{expiry}")
    return EXIT_OK


def _state_del(args: argparse.Namespace) -> int:
    with coordinator_for(args) as sync:
        deleted = sync.state(args.scope).delete(args.key)
    print(f"deleted {args.scope}/{args.key}" if deleted
          else f"nothing to delete at {args.scope}/{args.key}")
    return EXIT_OK if deleted else EXIT_PROBLEM


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
            _print_events(_pull(sub, args.timeout), args)
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
    print(f"published to {args.topic!r}: {receivers} subscriber(s) received it")
    return EXIT_OK


def _stream_read(args: argparse.Namespace) -> int:
    with coordinator_for(args) as sync:
        stream = sync.stream(args.name)
        if not args.follow:
            _print_events(stream.read_after(args.after, count=args.count), args)
            return EXIT_OK
        events = stream.follow(args.after, timeout=args.timeout)
        try:
            _print_events(events, args)
        finally:  # closes its XREAD BLOCK connection now, also after --count
            close = getattr(events, "close", None)
            if close is not None:
                close()
    return EXIT_OK


def _print_events(events: Iterable[Any], args: argparse.Namespace) -> None:
    for seen, event in enumerate(events, start=1):
        if args.json:
            print_json({"id": event.id, "topic": event.topic, "type": event.type,
                        "data": event.data, "time": event.time, "source": event.source})
        else:
            stamp = datetime.datetime.fromtimestamp(event.time).strftime("%H:%M:%S.%f")[:-3]
            print(f"{stamp}  {event.id}  {event.topic}  {event.type}  "
                  f"{_compact(event.data)}  ({event.source})")
        sys.stdout.flush()
        if args.count is not None and seen >= args.count:
            return


def _compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), default=str)
