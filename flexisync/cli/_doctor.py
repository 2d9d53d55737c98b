"""``flexisync doctor``: is this Redis fit for flexisync?

Checks, each reported as ``ok``, ``info``, ``warn`` or ``fail``:

* server: version (6.2 or later is required; 7.0 on a Cluster, for sharded pub/sub)
  and deployment mode; on a ``redis+cluster://`` URL, every master's version;
* cluster (``redis+cluster://`` only): ``cluster_state`` and slot coverage as each
  master sees them, and which masters have no replica;
* round trip: median and worst of 20 PINGs;
* eviction: ``maxmemory-policy`` must be ``noeviction``, because an evicted lock key is
  a lock two workers both believe they hold;
* persistence: what survives a restart (informational: without persistence a restart
  forgets held locks, breaker state and streams);
* replication: a read-only replica fails; a master with replicas gets a note that a
  failover with asynchronous replication can lose a lock;
* permissions: every command flexisync sends (directly, inside its Lua scripts, or
  while connecting: ``SELECT`` for a database other than 0, ``CLIENT SETNAME`` with a
  ``client_name``), checked with ``ACL DRYRUN`` (Redis 7+) when allowed, otherwise by
  running each one on a throwaway key of the namespace (``SELECT``, ``CLIENT`` and the
  pub/sub commands on a connection of their own, closed afterwards);
* topics: Redis grants a ``PSUBSCRIBE`` pattern only when the ACL lists that pattern
  literally (``&flexisync:*`` does not cover ``flexisync:events:jobs.*``), so each glob
  topic given with ``--topic`` is checked, and without one the report says so.

The exit code is 1 when any check warns or fails, so ``flexisync doctor`` can gate a
deployment; 3 when Redis does not answer at all (``--json`` still prints a report).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import redis.exceptions as rexc

from flexisync._connection import Backend
from flexisync._keys import is_pattern, validate_pattern
from flexisync.cli._common import (
    EXIT_OK,
    EXIT_PROBLEM,
    coordinator_for,
    describe,
    print_json,
    print_table,
    text,
)
from flexisync.coordinator import Coordinator
from flexisync.errors import BackendError, FlexiSyncError

__all__ = ["COMMANDS", "Check", "diagnose", "recommended_acl", "run_doctor"]

Status = Literal["ok", "info", "warn", "fail"]
MIN_VERSION = (6, 2)
CLUSTER_MIN_VERSION = (7, 0)  # SPUBLISH / SSUBSCRIBE
PINGS = 20


@dataclass(frozen=True)
class Check:
    """One line of the doctor's report."""

    name: str
    status: Status
    detail: str


def run_doctor(args: argparse.Namespace) -> int:
    """Run every check and print the report; 1 when something needs attention.

    With ``--json`` a report is printed even when Redis cannot be reached or the URL is
    malformed (``"ok": false`` and the error), before the error propagates to the
    command's error line and exit code.

    Raises:
        ConfigError: malformed URL, namespace or ``--topic``.
        BackendUnavailable: Redis does not answer at all.
    """
    sync: Coordinator | None = None
    try:
        topics = [validate_pattern(t, "topic") for t in args.topics]
        sync = coordinator_for(args)
        with sync:
            checks = diagnose(sync, topics=topics)
    except FlexiSyncError as exc:
        if args.json:
            message, _ = describe(exc)
            print_json({"url": sync.url if sync is not None else None,
                        "namespace": args.namespace, "ok": False, "error": message,
                        "checks": [asdict(Check("connection", "fail", message))]})
        raise
    problems = [c for c in checks if c.status in ("warn", "fail")]
    if args.json:
        print_json({"url": sync.url, "namespace": sync.namespace, "ok": not problems,
                    "error": None, "checks": [asdict(c) for c in checks]})
    else:
        print(f"flexisync doctor: {sync.url} (namespace {sync.namespace!r})")
        print_table(["status", "check", "detail"],
                    [(c.status.upper() if c.status in ("warn", "fail") else c.status,
                      c.name, c.detail) for c in checks])
        print(f"{len(problems)} problem(s) found." if problems else "All checks passed.")
    return EXIT_PROBLEM if problems else EXIT_OK


def diagnose(sync: Coordinator, *, topics: Sequence[str] = ()) -> list[Check]:
    """Run the checks against ``sync``'s Redis, in report order.

    Args:
        topics: topics and glob patterns the application subscribes to, checked
            against the ACL's channel rules.

    Raises:
        BackendUnavailable: Redis does not answer a PING.
    """
    backend = sync._ctx.backend
    try:
        rtts = [backend.ping() for _ in range(PINGS)]
    except BackendError as exc:  # e.g. NOPERM for the SELECT or CLIENT SETNAME of connecting
        # (BackendUnavailable is not a BackendError: it propagates, exit 3)
        return [Check("connection", "fail", f"connecting failed: {exc.reason}. An ACL that "
                                            "grants what flexisync needs: "
                                            + recommended_acl(sync.namespace, topics=topics))]
    if backend.topology == "cluster":
        masters = _per_master(backend, lambda c, nodes: c.info("all", target_nodes=nodes))
        info = next(iter(masters.values()), {})
        checks = [_cluster_server(masters), _cluster_state(backend, masters),
                  _latency(rtts), _cluster_eviction(masters),
                  _persistence(backend, info), _cluster_replication(masters)]
    else:
        info = _info(backend)
        checks = [_server(info), _latency(rtts), _eviction(backend, info),
                  _persistence(backend, info), _replication(info)]
    checks.extend(_permissions(backend, sync.namespace, topics))
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


def _product(info: dict[str, Any]) -> str:
    """``"Valkey 9.1.2"`` or ``"Redis 7.0.15"`` from INFO (Valkey reports
    ``redis_version:7.2.4`` for compatibility and its own version in ``valkey_version``)."""
    if text(info.get("server_name", "")) == "valkey":
        return f"Valkey {text(info.get('valkey_version', '?'))}"
    return f"Redis {text(info.get('redis_version', '?'))}"


def _server(info: dict[str, Any]) -> Check:
    if not info:
        return Check("server", "warn", "INFO is not permitted for this user: version and "
                                       "mode unknown")
    version = _version(info)
    mode = text(info.get("redis_mode", "standalone"))
    label = f"{_product(info)}, {mode}"
    if version is not None and version[:2] < MIN_VERSION:
        return Check("server", "fail", f"{label}: flexisync needs Redis "
                                       f"{MIN_VERSION[0]}.{MIN_VERSION[1]} or later")
    if mode == "sentinel":
        return Check("server", "fail", f"{label}: this is a Sentinel, not a data node; "
                                       "connect with redis+sentinel://host:26379/service")
    if mode == "cluster":
        return Check("server", "warn", f"{label}: this node is one of a Redis Cluster; "
                                       "connect with redis+cluster://h1:7000,h2:7001 so that "
                                       "every key reaches the master serving its slot")
    return Check("server", "ok", label)


# --- Redis Cluster (redis+cluster:// URLs) -------------------------------------------


def _per_master(backend: Backend, fn: Callable[[Any, Any], Any]) -> dict[str, dict[str, Any]]:
    """``fn(client, masters)`` run on every master: ``{"host:port": reply}``, with the
    reply's keys as text; ``{}`` when refused (no INFO permission)."""
    try:
        raw = backend.call("doctor.info", lambda c: fn(c, c.get_primaries()))
    except BackendError:
        return {}
    if not isinstance(raw, dict) or not all(isinstance(v, dict) for v in raw.values()):
        return {}
    return {text(name): {text(k): v for k, v in reply.items()} for name, reply in raw.items()}


def _cluster_server(masters: dict[str, dict[str, Any]]) -> Check:
    if not masters:
        return Check("server", "warn", "INFO is not permitted for this user: the masters' "
                                       "versions are unknown")
    versions = {name: text(info.get("redis_version", "?")) for name, info in masters.items()}
    label = (f"Redis Cluster, {len(masters)} master(s): "
             + ", ".join(f"{name} {version}" for name, version in sorted(versions.items())))
    old = [name for name, info in masters.items()
           if (_version(info) or (0,))[:2] < CLUSTER_MIN_VERSION]
    if old:
        return Check("server", "fail", f"{label}: flexisync needs Redis "
                     f"{CLUSTER_MIN_VERSION[0]}.{CLUSTER_MIN_VERSION[1]} or later on every "
                     f"master of a cluster (sharded pub/sub); too old: {', '.join(sorted(old))}")
    return Check("server", "ok", label)


def _cluster_state(backend: Backend, masters: dict[str, dict[str, Any]]) -> Check:
    states = _per_master(backend, lambda c, nodes: c.cluster_info(target_nodes=nodes))
    if not states:
        return Check("cluster", "warn", "CLUSTER INFO is not permitted: cluster_state unknown")
    bad = {name: info for name, info in states.items()
           if text(info.get("cluster_state")) != "ok"
           or text(info.get("cluster_slots_ok")) != "16384"}
    first = next(iter(states.values()))
    detail = (f"cluster_state ok on {len(states)} master(s), 16384 slots served, "
              f"{text(first.get('cluster_known_nodes', '?'))} nodes known")
    if bad:
        return Check("cluster", "fail", "; ".join(
            f"{name}: cluster_state {text(info.get('cluster_state'))}, "
            f"{text(info.get('cluster_slots_ok', '?'))} of 16384 slots ok, "
            f"{text(info.get('cluster_slots_fail', '?'))} failing"
            for name, info in sorted(bad.items()))
            + ": the keys of the slots not served fail until a replica is promoted")
    del masters  # the versions are reported by the server check
    return Check("cluster", "ok", detail)


def _cluster_eviction(masters: dict[str, dict[str, Any]]) -> Check:
    if not masters:
        return Check("eviction", "warn", "could not read maxmemory-policy (INFO not "
                                         "permitted); make sure it is noeviction everywhere")
    wrong = {name: text(info.get("maxmemory_policy")) for name, info in masters.items()
             if text(info.get("maxmemory_policy", "noeviction")) != "noeviction"}
    if wrong:
        return Check("eviction", "warn", "maxmemory-policy is not noeviction on "
                     + ", ".join(f"{n} ({p})" for n, p in sorted(wrong.items()))
                     + ": under memory pressure Redis may evict a held lock's key; set "
                       "noeviction on every node")
    return Check("eviction", "ok", f"maxmemory-policy is noeviction on all {len(masters)} "
                                   "masters")


def _cluster_replication(masters: dict[str, dict[str, Any]]) -> Check:
    if not masters:
        return Check("replication", "info", "unknown (INFO not permitted)")
    alone = sorted(name for name, info in masters.items()
                   if int(info.get("connected_slaves", 0) or 0) == 0)
    if alone:
        return Check("replication", "warn",
                     f"master(s) without a replica: {', '.join(alone)}; when one fails its "
                     "slots stay down (locks, breakers and streams there fail) until it is "
                     "back")
    counts = sorted({int(info.get("connected_slaves", 0) or 0) for info in masters.values()})
    return Check("replication", "info",
                 f"every master has {'/'.join(map(str, counts))} replica(s): replication is "
                 "asynchronous, so a failover can lose a recently taken lock or breaker "
                 "change; check fencing tokens at the resource")


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
                 "none: a restart forgets held locks, breaker states and streams "
                 "(fencing tokens keep increasing: they follow the server's clock)")


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


@dataclass(frozen=True)
class _Probe:
    """One command flexisync sends: its ACL rule name and a harmless invocation."""

    acl: str
    command: tuple[str, ...]


# The commands flexisync sends, directly, inside its Lua scripts (the tests compare this
# with the scripts) or while connecting, as ACL rule names. ``info`` is for the doctor
# only; ``select`` is sent for a database other than 0, ``client|setname`` with a
# ``client_name`` option. redis-py's CLIENT SETINFO on connecting is left out: its
# refusal is ignored, and the command does not exist before Redis 7.2 (an ACL naming it
# would not load there). No transaction (MULTI/EXEC) is used: every multi-key change is
# one Lua script.
COMMANDS = [
    "ping", "time", "info", "select", "client|setname", "type", "get",
    "set", "mget", "del", "exists", "incrby", "pttl", "pexpire", "persist", "hget", "hmget",
    "hset", "hsetnx", "hdel", "hincrby", "hgetall", "hvals", "zadd", "zrem", "zpopmin", "zscore",
    "zcard", "zcount", "zrange", "zrangebyscore", "zremrangebyscore", "xadd", "xrange", "xrevrange",
    "xread", "xlen", "xinfo|stream", "scan", "evalsha", "script|load",
    "publish", "subscribe", "psubscribe", "unsubscribe", "punsubscribe",
]

# What a cluster connection also sends: redis-py's cluster client reads the slot map
# (CLUSTER SLOTS) and the command table (COMMAND) when it starts; object channels are
# sharded (SPUBLISH in the scripts, SSUBSCRIBE / SUNSUBSCRIBE by the listener).
CLUSTER_COMMANDS = ["cluster|slots", "command", "spublish", "ssubscribe", "sunsubscribe"]

# Sent on a connection of their own (closed afterwards), with the command that undoes
# them where there is one: they change the connection's mode, name or database.
_SESSION: dict[str, str | None] = {"SUBSCRIBE": "UNSUBSCRIBE", "PSUBSCRIBE": "PUNSUBSCRIBE",
                                   "SSUBSCRIBE": "SUNSUBSCRIBE", "SELECT": None,
                                   "CLIENT": None}


def recommended_acl(namespace: str = "flexisync", user: str = "app", *,
                    topics: Sequence[str] = (), cluster: bool = False) -> str:
    """An ``ACL SETUSER`` line granting exactly what flexisync needs under ``namespace``.

    Args:
        topics: the glob topics the application subscribes to; Redis grants a
            ``PSUBSCRIBE`` pattern only when it is listed literally, so each gets its
            own ``&<namespace>:events:<pattern>``.
        cluster: for a Redis Cluster (set it on every node): also
            :data:`CLUSTER_COMMANDS`.
    """
    globs = "".join(f" &{namespace}:events:{t}" for t in topics if is_pattern(t))
    commands = [*COMMANDS, *CLUSTER_COMMANDS] if cluster else COMMANDS
    return (f"ACL SETUSER {user} on >CHANGE-ME resetkeys resetchannels "
            f"~{namespace}:* &{namespace}:*{globs} -@all "
            + " ".join("+" + c for c in commands))


def _needed(namespace: str, *, db: int = 0, client_name: str | None = None,
            cluster: bool = False) -> list[_Probe]:
    """Every command flexisync sends, with arguments shaped like its real keys.

    Ordered so that, when run for real, each finds the key type it expects.
    """
    key = f"{namespace}:doctor:{{probe-{uuid.uuid4().hex[:8]}}}"
    chan = f"{namespace}:events:doctor"
    h, z, s = key + ":h", key + ":z", key + ":s"
    commands = [
        ("PING",), ("TIME",), ("INFO", "server"), ("SELECT", str(db)),
        ("CLIENT", "SETNAME", client_name or "flexisync-doctor"),
        ("TYPE", key), ("GET", key), ("SET", key, "1", "PX", "60000"), ("MGET", key),
        ("EXISTS", key), ("PTTL", key), ("PEXPIRE", key, "60000"), ("PERSIST", key),
        ("INCRBY", key + ":n", "1"),
        ("HSET", h, "f", "1"), ("HSETNX", h, "g", "1"), ("HGET", h, "f"), ("HMGET", h, "f", "g"),
        ("HINCRBY", h, "f", "1"), ("HGETALL", h), ("HVALS", h), ("HDEL", h, "g"),
        ("ZADD", z, "1", "m"), ("ZSCORE", z, "m"), ("ZCARD", z), ("ZCOUNT", z, "-inf", "+inf"),
        ("ZRANGE", z, "0", "-1"), ("ZRANGEBYSCORE", z, "-inf", "+inf"),
        ("ZREMRANGEBYSCORE", z, "-inf", "0"), ("ZADD", z, "2", "n"), ("ZPOPMIN", z),
        ("ZREM", z, "m"),
        ("XADD", s, "MAXLEN", "~", "10", "*", "f", "v"), ("XRANGE", s, "-", "+"),
        ("XREVRANGE", s, "+", "-", "COUNT", "1"), ("XREAD", "COUNT", "1", "STREAMS", s, "0"),
        ("XLEN", s), ("XINFO", "STREAM", s),
        ("SCAN", "0", "MATCH", f"{namespace}:*", "COUNT", "10"),
        ("SCRIPT", "LOAD", "return 1"),
        ("EVALSHA", "e0e1f9fabfc9d4800c877a703b823ac0578ff8db", "1", key),
        ("PUBLISH", chan, "doctor"), ("SUBSCRIBE", chan), ("UNSUBSCRIBE", chan),
        ("PSUBSCRIBE", f"{namespace}:events:*"), ("PUNSUBSCRIBE", f"{namespace}:events:*"),
        ("DEL", key, key + ":n", h, z, s),
    ]
    if cluster:  # no SELECT on a cluster (database 0 only); what its clients add
        commands = [c for c in commands if c[0] != "SELECT"]
        commands[-1:-1] = [("CLUSTER", "SLOTS"), ("COMMAND", "COUNT"),
                           ("SPUBLISH", key, "doctor"), ("SSUBSCRIBE", key),
                           ("SUNSUBSCRIBE", key)]
    names = {"XINFO": "xinfo|stream", "SCRIPT": "script|load", "CLUSTER": "cluster|slots",
             "COMMAND": "command"}
    probes = []
    for command in commands:
        name = command[0]
        acl = (f"client|{command[1].lower()}" if name == "CLIENT"
               else names.get(name, name.lower()))
        probes.append(_Probe(acl, command))
    return probes


def _topic_probes(namespace: str, topics: Sequence[str]) -> list[_Probe]:
    return [_Probe("psubscribe", ("PSUBSCRIBE", f"{namespace}:events:{t}")) if is_pattern(t)
            else _Probe("subscribe", ("SUBSCRIBE", f"{namespace}:events:{t}"))
            for t in topics]


def _permissions(backend: Backend, namespace: str, topics: Sequence[str]) -> list[Check]:
    kwargs = _connection_kwargs(backend)
    cluster = backend.topology == "cluster"
    probes = _needed(namespace, db=int(kwargs.get("db") or 0),
                     client_name=kwargs.get("client_name"), cluster=cluster)
    checked = _topic_probes(namespace, topics)
    denials, how = _denials(backend, [*probes, *checked])
    denied: list[str] = []
    glob_denial: str | None = None
    for probe, failure in zip(probes, denials, strict=False):
        if failure is None:
            continue
        if probe.acl == "psubscribe" and _channel_denial(failure):
            glob_denial = failure  # the command is allowed; this sample pattern is not
            continue
        denied.append(f"{probe.command[0]}"
                      + (f" {probe.command[1]}" if probe.command[0] == "CLIENT" else "")
                      + f": {failure}")
    if denied:
        permissions = Check(
            "permissions", "fail",
            f"denied ({how}): " + "; ".join(denied) + ". An ACL that grants what flexisync "
            "needs: " + recommended_acl(namespace, topics=topics, cluster=cluster))
    else:
        permissions = Check("permissions", "ok",
                            f"all {len(probes)} commands flexisync uses are allowed ({how})")
    return [permissions, _topics(namespace, topics, denials[len(probes):], glob_denial)]


def _topics(namespace: str, topics: Sequence[str], denials: Sequence[str | None],
            glob_denial: str | None) -> Check:
    refused = [t for t, failure in zip(topics, denials, strict=True) if failure is not None]
    if refused:
        grants = " ".join(f"&{namespace}:events:{t}" for t in refused)
        return Check("topics", "fail", "cannot subscribe to " + ", ".join(map(repr, refused))
                     + f": add {grants} to the user's ACL (Redis grants a PSUBSCRIBE "
                       "pattern only when the ACL lists it literally)")
    if topics:
        return Check("topics", "ok", "may subscribe to " + ", ".join(map(repr, topics)))
    if glob_denial is None:
        return Check("topics", "ok", "any topic and glob pattern may be subscribed to")
    return Check("topics", "info",
                 "exact topics are allowed; a glob topic (jobs.*) needs its pattern granted "
                 f"literally, &{namespace}:events:<pattern>: check each with --topic")


def _channel_denial(failure: str) -> bool:
    return "channel" in failure.lower()


def _connection_kwargs(backend: Backend) -> dict[str, Any]:
    return dict(getattr(_session_pool(backend), "connection_kwargs", {}) or {})


def _session_pool(backend: Backend) -> Any:
    """A connection pool to make a probe connection from: the client's, or on a
    cluster the pool of the master serving classic pub/sub."""
    if backend.topology == "cluster":
        from flexisync._cluster import classic_node

        node = classic_node(backend.client)
        return backend.client.get_redis_connection(node).connection_pool
    return getattr(backend.client, "connection_pool", None)


def _denials(backend: Backend, probes: list[_Probe]) -> tuple[list[str | None], str]:
    """For each probe, ``None`` when allowed, else why not; and how that was found."""
    found = _dry_run(backend, probes)
    if found is not None:
        return found, "ACL DRYRUN"
    results: dict[tuple[str, ...], str | None] = {}
    for probe in probes:
        if probe.command in results:  # (P)UNSUBSCRIBE: sent with its (P)SUBSCRIBE
            continue
        if probe.command[0] in _SESSION:
            results.update(_probe_session(backend, probe.command))
        else:
            results[probe.command] = _probe(backend, probe.command)
    return [results.get(p.command) for p in probes], "running each once"


def _dry_run(backend: Backend, probes: list[_Probe]) -> list[str | None] | None:
    """Denials found by ``ACL DRYRUN``; ``None`` when DRYRUN is unavailable or denied."""
    try:
        user = text(backend.call("doctor.acl", lambda c: c.execute_command("ACL", "WHOAMI")))
        found: list[str | None] = []
        for probe in probes:
            reply = text(backend.call("doctor.acl",
                                      _runner("ACL", "DRYRUN", user, *probe.command)))
            found.append(None if reply == "OK" else reply)
    except BackendError:  # Redis < 7, or the user may not run ACL commands
        return None
    return found


def _probe(backend: Backend, command: tuple[str, ...]) -> str | None:
    """Run one command for real on throwaway keys; why it was refused, or ``None``."""
    try:
        backend.call("doctor.probe", _runner(*command))
    except BackendError as exc:
        return None if "NOSCRIPT" in exc.reason else exc.reason
    return None


def _probe_session(backend: Backend, command: tuple[str, ...],
                   ) -> dict[tuple[str, ...], str | None]:
    """Run ``command`` and the one undoing it on a fresh connection, closed after.

    Only a permission error counts as a refusal: any other error reply has passed the
    ACL. Returns the outcome of each command sent.
    """
    follow_name = _SESSION[command[0]]
    sent = [command] if follow_name is None else [command, (follow_name, *command[1:])]
    outcome: dict[tuple[str, ...], str | None] = {}
    pool = _session_pool(backend)
    conn = pool.connection_class(**{**pool.connection_kwargs, "socket_timeout": 2.0})
    try:
        for one in sent:
            conn.send_command(*one)
            try:
                conn.read_response()
            except rexc.NoPermissionError as exc:
                outcome[one] = str(exc)
            except rexc.ResponseError:
                outcome[one] = None
            else:
                outcome[one] = None
    except (rexc.RedisError, OSError) as exc:
        failure = f"no answer ({type(exc).__name__}: {exc})"
        return {one: outcome.get(one, failure) for one in sent}
    finally:
        with contextlib.suppress(rexc.RedisError, OSError):
            conn.disconnect()
    return outcome


def _runner(*command: str) -> Callable[[Any], Any]:
    def run(client: Any) -> Any:
        return client.execute_command(*command)

    return run
