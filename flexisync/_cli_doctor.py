"""``flexisync doctor``: is this Redis fit for flexisync?

Checks, each reported as ``ok``, ``info``, ``warn`` or ``fail``:

* server: version (6.2 or later is required) and deployment mode;
* round trip: median and worst of 20 PINGs;
* eviction: ``maxmemory-policy`` must be ``noeviction``, because an evicted lock key is
  a lock two workers both believe they hold;
* persistence: what survives a restart (informational: without persistence a restart
  forgets held locks, breaker state, streams and fencing counters);
* replication: a read-only replica fails; a master with replicas gets a note that a
  failover with asynchronous replication can lose a lock;
* permissions: every command flexisync sends, checked with ``ACL DRYRUN`` (Redis 7+)
  when allowed, otherwise by running each one on a throwaway key of the namespace.

The exit code is 1 when any check warns or fails, so ``flexisync doctor`` can gate a
deployment.
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Literal

import redis.exceptions as rexc

from flexisync._cli_common import (
    EXIT_OK,
    EXIT_PROBLEM,
    coordinator_for,
    print_json,
    print_table,
    text,
)
from flexisync._connection import Backend
from flexisync.coordinator import Coordinator
from flexisync.errors import BackendError

__all__ = ["COMMANDS", "Check", "diagnose", "recommended_acl", "run_doctor"]

Status = Literal["ok", "info", "warn", "fail"]
MIN_VERSION = (6, 2)
PINGS = 20


@dataclass(frozen=True)
class Check:
    """One line of the doctor's report."""

    name: str
    status: Status
    detail: str


def run_doctor(args: argparse.Namespace) -> int:
    """Run every check and print the report; 1 when something needs attention.

    Raises:
        BackendUnavailable: Redis does not answer at all.
    """
    with coordinator_for(args) as sync:
        checks = diagnose(sync)
        problems = [c for c in checks if c.status in ("warn", "fail")]
        if args.json:
            print_json({"url": sync.url, "namespace": sync.namespace,
                        "ok": not problems, "checks": [asdict(c) for c in checks]})
        else:
            print(f"flexisync doctor: {sync.url} (namespace {sync.namespace!r})")
            print_table(["status", "check", "detail"],
                        [(c.status.upper() if c.status in ("warn", "fail") else c.status,
                          c.name, c.detail) for c in checks])
            print(f"{len(problems)} problem(s) found." if problems else "All checks passed.")
    return EXIT_PROBLEM if problems else EXIT_OK


def diagnose(sync: Coordinator) -> list[Check]:
    """Run the checks against ``sync``'s Redis, in report order.

    Raises:
        BackendUnavailable: Redis does not answer a PING.
    """
    backend = sync._backend
    rtts = [backend.ping() for _ in range(PINGS)]
    info = _info(backend)
    checks = [_server(info), _latency(rtts), _eviction(backend, info),
              _persistence(backend, info), _replication(info)]
    checks.append(_permissions(backend, sync.namespace))
    return checks


# --- individual checks ---------------------------------------------------------------


def _info(backend: Backend) -> dict[str, Any]:
    try:
        raw = backend.call("doctor.info", lambda c: c.info("all"))
    except BackendError:
        return {}
    return {text(k): v for k, v in dict(raw).items()}


def _version(info: dict[str, Any]) -> tuple[int, ...] | None:
    raw = info.get("redis_version")
    if raw is None:
        return None
    try:
        return tuple(int(p) for p in text(raw).split(".")[:3])
    except ValueError:
        return None


def _server(info: dict[str, Any]) -> Check:
    if not info:
        return Check("server", "warn", "INFO is not permitted for this user: version and "
                                       "mode unknown")
    version = _version(info)
    mode = text(info.get("redis_mode", "standalone"))
    label = f"Redis {text(info.get('redis_version', '?'))}, {mode}"
    if version is not None and version[:2] < MIN_VERSION:
        return Check("server", "fail", f"{label}: flexisync needs Redis "
                                       f"{MIN_VERSION[0]}.{MIN_VERSION[1]} or later")
    if mode == "sentinel":
        return Check("server", "fail", f"{label}: this is a Sentinel, not a data node; "
                                       "connect with redis+sentinel://host:26379/service")
    if mode == "cluster":
        return Check("server", "warn", f"{label}: redis+cluster:// URLs are not supported "
                                       "yet; every object's keys share one hash slot")
    return Check("server", "ok", label)


def _latency(rtts: list[float]) -> Check:
    median, worst = statistics.median(rtts) * 1000, max(rtts) * 1000
    detail = f"median {median:.2f} ms, worst {worst:.2f} ms over {len(rtts)} PINGs"
    if median > 10.0:
        return Check("round trip", "warn", detail + ": every lock and failure costs one "
                                                    "round trip; put Redis closer")
    return Check("round trip", "ok", detail)


def _config(backend: Backend, name: str) -> str | None:
    try:
        reply = backend.call("doctor.config", lambda c: c.config_get(name))
    except BackendError:  # CONFIG is often disabled on managed services
        return None
    for key, value in dict(reply).items():
        if text(key) == name:
            return text(value)
    return None


def _eviction(backend: Backend, info: dict[str, Any]) -> Check:
    policy = info.get("maxmemory_policy")
    value = text(policy) if policy is not None else _config(backend, "maxmemory-policy")
    if value is None:
        return Check("eviction", "warn", "could not read maxmemory-policy (INFO and CONFIG "
                                         "not permitted); make sure it is noeviction")
    if value != "noeviction":
        return Check("eviction", "warn",
                     f"maxmemory-policy is {value}: under memory pressure Redis may evict a "
                     "held lock's key and let a second worker take it; set noeviction")
    return Check("eviction", "ok", "maxmemory-policy is noeviction")


def _persistence(backend: Backend, info: dict[str, Any]) -> Check:
    aof = text(info.get("aof_enabled", "")) == "1"
    save = _config(backend, "save")
    parts = []
    if aof:
        fsync = _config(backend, "appendfsync")
        parts.append(f"AOF on (appendfsync {fsync})" if fsync else "AOF on")
    if save:
        parts.append(f"RDB snapshots (save {save})")
    if parts:
        return Check("persistence", "info", ", ".join(parts) + "; a crash may still lose "
                                                                "the last writes")
    if save is None:
        known = "AOF off" if "aof_enabled" in info else "AOF unknown"
        return Check("persistence", "info", f"{known}; RDB snapshot schedule unknown "
                                            "(CONFIG not permitted)")
    return Check("persistence", "info",
                 "none: a restart forgets held locks, breaker states, streams and "
                 "fencing counters (tokens start again from 1)")


def _replication(info: dict[str, Any]) -> Check:
    role = text(info.get("role", "")) or "unknown"
    if role == "slave":
        return Check("replication", "fail", "this server is a read-only replica; connect "
                                            "to the master (or use redis+sentinel://)")
    replicas = int(info.get("connected_slaves", 0) or 0)
    if role == "master" and replicas:
        return Check("replication", "info",
                     f"master with {replicas} replica(s): replication is asynchronous, so a "
                     "failover can lose a recently taken lock; check fencing tokens at the "
                     "resource")
    return Check("replication", "ok" if role == "master" else "info", f"role {role}")


# --- permissions ---------------------------------------------------------------------


# The commands flexisync sends (directly or inside its Lua scripts), as an ACL rule.
COMMANDS = [
    "ping", "time", "info", "get", "set", "mget", "del", "unlink", "exists", "incr",
    "incrby", "pttl", "pexpire", "hget", "hset", "hsetnx", "hdel", "hincrby", "hgetall",
    "zadd", "zrem", "zcard", "zcount", "zrange", "zrangebyscore", "zremrangebyscore",
    "xadd", "xrange", "xrevrange", "xread", "xlen", "xinfo|stream", "scan", "eval",
    "evalsha", "script|load", "publish", "subscribe", "psubscribe", "unsubscribe",
    "punsubscribe",
]


def recommended_acl(namespace: str = "flexisync", user: str = "app") -> str:
    """An ``ACL SETUSER`` line granting exactly what flexisync needs under ``namespace``."""
    return (f"ACL SETUSER {user} on >CHANGE-ME resetkeys resetchannels "
            f"~{namespace}:* &{namespace}:* -@all "
            + " ".join("+" + c for c in COMMANDS))


def _needed(namespace: str) -> list[tuple[str, ...]]:
    """Every command flexisync sends, with arguments shaped like its real keys.

    Ordered so that, when run for real, each finds the key type it expects.
    """
    key = f"{namespace}:doctor:{{probe-{uuid.uuid4().hex[:8]}}}"
    chan = f"{namespace}:events:doctor"
    h, z, s = key + ":h", key + ":z", key + ":s"
    return [
        ("PING",), ("TIME",), ("GET", key), ("SET", key, "1", "PX", "60000"), ("MGET", key),
        ("EXISTS", key), ("PTTL", key), ("PEXPIRE", key, "60000"),
        ("INCR", key + ":n"), ("INCRBY", key + ":n", "1"),
        ("HSET", h, "f", "1"), ("HSETNX", h, "g", "1"), ("HGET", h, "f"),
        ("HINCRBY", h, "f", "1"), ("HGETALL", h), ("HDEL", h, "g"),
        ("ZADD", z, "1", "m"), ("ZCARD", z), ("ZCOUNT", z, "-inf", "+inf"),
        ("ZRANGE", z, "0", "-1"), ("ZRANGEBYSCORE", z, "-inf", "+inf"),
        ("ZREMRANGEBYSCORE", z, "-inf", "0"), ("ZREM", z, "m"),
        ("XADD", s, "MAXLEN", "~", "10", "*", "f", "v"), ("XRANGE", s, "-", "+"),
        ("XREVRANGE", s, "+", "-", "COUNT", "1"), ("XREAD", "COUNT", "1", "STREAMS", s, "0"),
        ("XLEN", s), ("XINFO", "STREAM", s),
        ("SCAN", "0", "MATCH", f"{namespace}:*", "COUNT", "10"),
        ("SCRIPT", "LOAD", "return 1"),
        ("EVALSHA", "e0e1f9fabfc9d4800c877a703b823ac0578ff8db", "1", key),
        ("EVAL", "return 1", "1", key),
        ("PUBLISH", chan, "doctor"), ("SUBSCRIBE", chan), ("PSUBSCRIBE", f"{namespace}:*"),
        ("DEL", key), ("UNLINK", key + ":n", h, z, s),
    ]


def _permissions(backend: Backend, namespace: str) -> Check:
    commands = _needed(namespace)
    denied = _dry_run(backend, commands)
    how = "ACL DRYRUN"
    if denied is None:
        denied = _probe(backend, commands)
        how = "running each once"
    if denied:
        return Check("permissions", "fail",
                     "denied: " + "; ".join(denied) + ". An ACL that grants what flexisync "
                     "needs: " + recommended_acl(namespace))
    return Check("permissions", "ok",
                 f"all {len(commands)} commands flexisync uses are allowed ({how})")


def _dry_run(backend: Backend, commands: list[tuple[str, ...]]) -> list[str] | None:
    """Denials found by ``ACL DRYRUN``; ``None`` when DRYRUN is unavailable or denied."""
    try:
        user = text(backend.call("doctor.acl", lambda c: c.execute_command("ACL", "WHOAMI")))
        denied = []
        for command in commands:
            reply = text(backend.call("doctor.acl", _runner("ACL", "DRYRUN", user, *command)))
            if reply != "OK":
                denied.append(f"{command[0]}: {reply}")
    except BackendError:  # Redis < 7, or the user may not run ACL commands
        return None
    return denied


def _probe(backend: Backend, commands: list[tuple[str, ...]]) -> list[str]:
    """Run each command for real on throwaway keys; the ones refused for permission."""
    denied = []
    for command in commands:
        name = command[0]
        if name in ("SUBSCRIBE", "PSUBSCRIBE"):
            failure = _probe_subscribe(backend, name, command[1])
        else:
            failure = _attempt(_runner(*command), backend)
        if failure is not None:
            denied.append(f"{name}: {failure}")
    return denied


def _runner(*command: str) -> Callable[[Any], Any]:
    def run(client: Any) -> Any:
        return client.execute_command(*command)

    return run


def _attempt(fn: Callable[[Any], Any], backend: Backend) -> str | None:
    try:
        backend.call("doctor.probe", fn)
    except BackendError as exc:
        return None if "NOSCRIPT" in exc.reason else exc.reason
    return None


def _probe_subscribe(backend: Backend, command: str, target: str) -> str | None:
    pubsub = backend.client.pubsub()
    try:
        if command == "SUBSCRIBE":
            pubsub.subscribe(target)
        else:
            pubsub.psubscribe(target)
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            message = pubsub.get_message(timeout=0.2)
            if message is not None and text(message.get("type")).endswith("subscribe"):
                return None
        return "no confirmation within 2 s"
    except rexc.NoPermissionError as exc:
        return str(exc)
    except rexc.ResponseError as exc:
        return str(exc)
    finally:
        pubsub.close()
