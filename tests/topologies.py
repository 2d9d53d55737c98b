"""Private Redis topologies for tests and benchmarks: a Cluster and a Sentinel set-up.

Both are started from the server binary flexisync.embedded finds (``redis-server`` on
PATH, or the one ``FLEXISYNC_SERVER_BINARY`` names), on free loopback ports, with
nothing saved to disk, and stopped by pid: only what was started here is ever stopped.

* :func:`start_cluster` - ``masters`` masters with ``replicas`` replicas each, built
  with CLUSTER MEET / ADDSLOTSRANGE / REPLICATE (no ``redis-cli`` needed); ready in
  about 2 s.
* :func:`start_sentinel` - one master, ``replicas`` replicas and ``sentinels``
  sentinels (quorum 2) monitoring service ``"mymaster"``; ready in about 3-5 s.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from flexisync.embedded import EmbeddedRedis, find_binary, start

__all__ = ["Cluster", "SentinelSetup", "start_cluster", "start_sentinel", "wait_for"]

SERVICE = "mymaster"


def wait_for(check: Callable[[], bool], timeout: float, what: str,
             interval: float = 0.05) -> None:
    """Poll ``check()`` until it is true; ``RuntimeError`` naming ``what`` on timeout.

    Errors raised by ``check`` count as "not yet"."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (redis.RedisError, OSError) as exc:
            last = exc
        time.sleep(interval)
    raise RuntimeError(f"timed out after {timeout}s waiting for {what} (last error: {last})")


def _client(port: int, **kwargs: Any) -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=port, socket_timeout=2.0,
                       socket_connect_timeout=1.0, decode_responses=True, **kwargs)


def _raw(port: int) -> redis.Redis:
    """A client with redis-py's reply parsing off (CLUSTER NODES/SLOTS as Redis says)."""
    client = _client(port)
    client.response_callbacks.clear()
    return client


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- cluster -------------------------------------------------------------------------


class Cluster:
    """A private Redis Cluster. ``nodes[i]`` are EmbeddedRedis servers (cluster mode)."""

    def __init__(self, nodes: list[EmbeddedRedis]) -> None:
        self.nodes = nodes

    @property
    def ports(self) -> list[int]:
        return [n.port for n in self.nodes]

    @property
    def url(self) -> str:
        """``redis+cluster://`` URL listing every node."""
        return "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.ports)

    def client(self, port: int) -> redis.Redis:
        """A plain client on one node (decode_responses=True; close it)."""
        return _client(port)

    def masters(self) -> list[int]:
        """Ports of the nodes that are masters now, as the first live node sees it."""
        return [port for port, role in self._roles().items() if role == "master"]

    def replicas(self) -> list[int]:
        return [port for port, role in self._roles().items() if role == "slave"]

    def master_of_slot(self, slot: int) -> int:
        """Port of the master serving ``slot`` now."""
        for node in self.nodes:
            if not node.running:
                continue
            with contextlib.closing(_raw(node.port)) as c:
                for start_slot, end_slot, master, *_ in c.execute_command("CLUSTER SLOTS"):
                    if start_slot <= slot <= end_slot:
                        return int(master[1])
        raise RuntimeError(f"no master serves slot {slot}")

    def node(self, port: int) -> EmbeddedRedis:
        return next(n for n in self.nodes if n.port == port)

    def _roles(self) -> dict[int, str]:
        for node in self.nodes:
            if not node.running:
                continue
            with contextlib.closing(_raw(node.port)) as c:
                text = c.execute_command("CLUSTER NODES")
            roles: dict[int, str] = {}
            for line in str(text).splitlines():
                parts = line.split()
                port = int(parts[1].split("@")[0].rsplit(":", 1)[1])
                flags = parts[2].split(",")
                if "fail" in flags or "fail?" in flags:
                    continue
                roles[port] = "master" if "master" in flags else "slave"
            return roles
        raise RuntimeError("no cluster node is running")

    def healthy(self) -> bool:
        """Every running node says cluster_state:ok."""
        for node in self.nodes:
            if node.running:
                with contextlib.closing(_client(node.port)) as c:
                    if c.cluster("INFO").get("cluster_state") != "ok":
                        return False
        return True

    def kill_master_of(self, slot: int) -> int:
        """SIGKILL the master serving ``slot``; returns its port."""
        port = self.master_of_slot(slot)
        self.node(port).kill()
        return port

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def start_cluster(*, masters: int = 3, replicas: int = 1, binary: str | None = None,
                  node_timeout_ms: int = 1000, timeout: float = 30.0) -> Cluster:
    """Start ``masters * (1 + replicas)`` nodes and form a cluster; wait until ok."""
    binary = binary or find_binary()
    nodes: list[EmbeddedRedis] = []
    try:
        for _ in range(masters * (1 + replicas)):
            nodes.append(start(binary=binary, args=[
                "--cluster-enabled", "yes",
                "--cluster-config-file", f"nodes-{os.getpid()}-{len(nodes)}.conf",
                "--cluster-node-timeout", str(node_timeout_ms),
                "--cluster-require-full-coverage", "no",
                "--cluster-allow-reads-when-down", "no",
            ]))
        cluster = Cluster(nodes)
        first = _client(nodes[0].port)
        ids: dict[int, str] = {}
        for node in nodes:
            with contextlib.closing(_client(node.port)) as c:
                ids[node.port] = str(c.execute_command("CLUSTER MYID"))
        for node in nodes[1:]:
            first.execute_command("CLUSTER MEET", "127.0.0.1", node.port)
        per = 16384 // masters
        for i in range(masters):
            low = i * per
            high = 16383 if i == masters - 1 else (i + 1) * per - 1
            with contextlib.closing(_client(nodes[i].port)) as c:
                c.execute_command("CLUSTER ADDSLOTSRANGE", low, high)

        def everyone_met() -> bool:
            for node in nodes:
                with contextlib.closing(_raw(node.port)) as c:
                    lines = str(c.execute_command("CLUSTER NODES")).splitlines()
                    if len(lines) < len(nodes) or any("handshake" in ln for ln in lines):
                        return False
            return True

        wait_for(everyone_met, timeout, "cluster nodes to meet")
        for r in range(replicas):
            for i in range(masters):
                replica = nodes[masters + r * masters + i]
                with contextlib.closing(_client(replica.port)) as c:
                    c.execute_command("CLUSTER REPLICATE", ids[nodes[i].port])
        first.close()

        def ready() -> bool:
            if not cluster.healthy():
                return False
            return len(cluster.replicas()) == masters * replicas and all(
                _client(n.port).info("replication").get("master_link_status", "up") == "up"
                for n in nodes)

        wait_for(ready, timeout, "cluster_state:ok with every replica in sync")
        return cluster
    except BaseException:
        for node in nodes:
            node.stop()
        raise


# --- sentinel ------------------------------------------------------------------------


class _SentinelProcess:
    """One ``redis-server --sentinel`` child with its own config file."""

    def __init__(self, binary: str, port: int, master_port: int, *, down_after_ms: int,
                 failover_timeout_ms: int) -> None:
        self.port = port
        self._dir = tempfile.mkdtemp(prefix="flexisync-sentinel-")
        self._conf = Path(self._dir, "sentinel.conf")
        self._conf.write_text(
            f"port {port}\nbind 127.0.0.1\nprotected-mode no\ndir {self._dir}\n"
            f"sentinel monitor {SERVICE} 127.0.0.1 {master_port} 2\n"
            f"sentinel down-after-milliseconds {SERVICE} {down_after_ms}\n"
            f"sentinel failover-timeout {SERVICE} {failover_timeout_ms}\n"
            f"sentinel parallel-syncs {SERVICE} 1\n"
        )
        self._owner = os.getpid()
        log = Path(self._dir, "sentinel.log").open("ab")  # noqa: SIM115  (owned by the child)
        try:
            self.process: subprocess.Popen[bytes] | None = subprocess.Popen(
                [binary, str(self._conf), "--sentinel"], stdout=log,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        finally:
            log.close()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        process = self.process
        if process is not None and os.getpid() == self._owner and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=5.0)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5.0)
        self.process = None
        shutil.rmtree(self._dir, ignore_errors=True)


class SentinelSetup:
    """A master, its replicas and the sentinels watching them (service ``mymaster``)."""

    def __init__(self, servers: list[EmbeddedRedis], sentinels: list[_SentinelProcess]) -> None:
        self.servers = servers
        self.sentinels = sentinels

    @property
    def url(self) -> str:
        """``redis+sentinel://`` URL over every sentinel, service ``mymaster``, db 0."""
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{SERVICE}/0"

    def master_port(self) -> int:
        """The master's port as the first live sentinel reports it."""
        for sentinel in self.sentinels:
            if sentinel.running:
                with contextlib.closing(_client(sentinel.port)) as c:
                    _host, port = c.execute_command(
                        "SENTINEL GET-MASTER-ADDR-BY-NAME", SERVICE)
                    return int(port)
        raise RuntimeError("no sentinel is running")

    def server(self, port: int) -> EmbeddedRedis:
        return next(s for s in self.servers if s.port == port)

    def failover(self, timeout: float = 15.0) -> tuple[int, int]:
        """``SENTINEL FAILOVER`` (a planned switch); waits until every sentinel reports
        the new master. Returns ``(old_port, new_port)``."""
        old = self.master_port()
        with contextlib.closing(_client(self.sentinels[0].port)) as c:
            c.execute_command("SENTINEL FAILOVER", SERVICE)
        self._wait_switched(old, timeout)
        return old, self.master_port()

    def kill_master(self, timeout: float = 15.0) -> tuple[int, int]:
        """SIGKILL the master; waits until the sentinels promoted a replica."""
        old = self.master_port()
        self.server(old).kill()
        self._wait_switched(old, timeout)
        return old, self.master_port()

    def _wait_switched(self, old: int, timeout: float) -> None:
        def switched() -> bool:
            for sentinel in self.sentinels:
                if not sentinel.running:
                    continue
                with contextlib.closing(_client(sentinel.port)) as c:
                    _h, port = c.execute_command("SENTINEL GET-MASTER-ADDR-BY-NAME", SERVICE)
                    if int(port) == old:
                        return False
            return True

        wait_for(switched, timeout, "every sentinel to report the new master")

    def stop(self) -> None:
        for sentinel in self.sentinels:
            sentinel.stop()
        for server in self.servers:
            server.stop()


def start_sentinel(*, replicas: int = 1, sentinels: int = 3, binary: str | None = None,
                   down_after_ms: int = 1000, failover_timeout_ms: int = 3000,
                   timeout: float = 30.0) -> SentinelSetup:
    """Start a master, ``replicas`` replicas and ``sentinels`` sentinels; wait until every
    sentinel knows every replica and every other sentinel."""
    binary = binary or find_binary()
    servers: list[EmbeddedRedis] = []
    procs: list[_SentinelProcess] = []
    try:
        # No 5 s wait before a full sync (Redis 7's diskless default): replicas are in
        # sync when ready() returns, so WAIT and failovers work from the start.
        nodelay = ["--repl-diskless-sync-delay", "0"]
        master = start(binary=binary, args=nodelay)
        servers.append(master)
        for _ in range(replicas):
            servers.append(start(binary=binary, args=[
                *nodelay, "--replicaof", "127.0.0.1", str(master.port)]))
        for _ in range(sentinels):
            procs.append(_SentinelProcess(binary, _free_port(), master.port,
                                          down_after_ms=down_after_ms,
                                          failover_timeout_ms=failover_timeout_ms))
        setup = SentinelSetup(servers, procs)

        def ready() -> bool:
            with contextlib.closing(_client(master.port)) as c:
                info = c.info("replication")
                online = [v for k, v in info.items() if k.startswith("slave")
                          and isinstance(v, dict) and v.get("state") == "online"]
                if len(online) < replicas:
                    return False
            for proc in procs:
                if not proc.running:
                    raise RuntimeError(f"sentinel on port {proc.port} exited")
                with contextlib.closing(_client(proc.port)) as c:
                    if len(c.execute_command("SENTINEL REPLICAS", SERVICE)) < replicas:
                        return False
                    if len(c.execute_command("SENTINEL SENTINELS", SERVICE)) < sentinels - 1:
                        return False
            return True

        wait_for(ready, timeout, "sentinels to discover the replicas and each other")
        return setup
    except BaseException:
        for proc in procs:
            proc.stop()
        for server in servers:
            server.stop()
        raise
