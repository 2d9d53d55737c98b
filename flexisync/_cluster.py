"""Redis Cluster: clients, cluster-wide commands and the cluster listener.

Clients
    :func:`build_client` makes a ``redis.RedisCluster`` from a ``redis+cluster://`` URL,
    :func:`adopt_client` mirrors a user's ``redis.RedisCluster`` (``connect(client=...)``)
    and :func:`async_client_factory` builds the ``redis.asyncio.RedisCluster`` the
    asyncio shell uses (one per event loop). Every one has the single-node defaults
    (socket timeouts, RESP2, keepalive) and:

    * no retries of its own: ``retry=Retry(NoBackoff(), 0)``, so a connection error, a
      timeout, ``CLUSTERDOWN`` or an uncovered slot reaches ``Backend.call``, which is
      the one place that retries (and never runs a non-idempotent command twice).
      What redis-py's cluster layer still does by itself, per attempt: it follows
      ``MOVED`` and ``ASK`` redirects and waits out ``TRYAGAIN`` (at most 16 hops per
      attempt; a command answered by a redirect was not executed), and after a
      connection error, a timeout or ``CLUSTERDOWN`` it refreshes its slot map (``CLUSTER
      SLOTS`` on a known node) before raising, so that the next attempt goes to the new
      owner of the slot;
    * every node connection deadline-capped (``_deadline_class``): no socket wait of a
      call outlives the call's deadline;
    * ``require_full_coverage=False``: while a master is down and not yet replaced, the
      slots it served fail (and are retried) while every other slot keeps working.

Cluster-wide commands
    :func:`scan_page` pages a ``SCAN`` over every master (a cursor that encodes which
    master is being scanned), for the plans that list keys.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import redis
import redis.asyncio
import redis.asyncio.cluster as acluster
import redis.cluster as rcluster
import redis.exceptions as rexc
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.retry import Retry

from flexisync._connection import CLIENT_DEFAULTS
from flexisync.errors import BackendUnavailable, ConfigError

if TYPE_CHECKING:
    from flexisync._connection import Backend, ConnectionSpec

__all__ = ["CLASSIC_SLOT", "address_of", "adopt_client", "async_client_factory",
           "build_client", "classic_node", "make_listener", "scan_page", "sync_twin"]

#: Defaults every cluster client gets (as ``build_client`` gives a single node).
_DEFAULTS = CLIENT_DEFAULTS

#: Connection options a URL or ``connect(**redis_options)`` may pass on to the nodes.
_NODE_OPTIONS = frozenset(rcluster.REDIS_ALLOWED_KEYS) - {
    "host", "port", "retry", "db", "connection_pool", "connection_pool_class",
    "redis_connect_func", "nodes_flag", "unix_socket_path", "cache", "cache_config",
    "maint_notifications_config", "retry_on_timeout", "connection_class", "ssl",
}

_SSL_PREFIX = "ssl_"


# --- classic pub/sub: one agreed node ----------------------------------------------------

#: Classic (non-sharded) pub/sub - topics and glob patterns - goes through the master
#: serving this slot: every process's classic listener link subscribes there and every
#: PUBLISH is sent there, so PUBLISH's reply (the receivers on the node that got it)
#: counts every flexisync subscriber, as on a single node. A cluster PUBLISH also
#: reaches the other nodes over the cluster bus, so a subscriber elsewhere (a link
#: that fell back to another node while that master was down) still gets the message;
#: it is just not counted.
CLASSIC_SLOT = 0


def classic_node(client: Any) -> Any:
    """The ``ClusterNode`` classic pub/sub uses now: the master serving
    :data:`CLASSIC_SLOT` in the client's slot map (sync or asyncio client, initialized).

    Raises:
        redis.exceptions.SlotNotCoveredError: no master serves the slot (a failover in
            progress); ``Backend.call`` retries it.
    """
    nodes = client.nodes_manager.slots_cache.get(CLASSIC_SLOT)
    if not nodes:
        raise rexc.SlotNotCoveredError(f"slot {CLASSIC_SLOT} is not covered by the cluster")
    return nodes[0]


class _Cluster(redis.RedisCluster):
    """``redis.RedisCluster`` whose ``PUBLISH`` goes to :func:`classic_node`."""

    def publish(self, channel: Any, message: Any, **kwargs: Any) -> Any:
        if "target_nodes" not in kwargs:
            kwargs["target_nodes"] = classic_node(self)
        return super().publish(channel, message, **kwargs)


class _AsyncCluster(redis.asyncio.RedisCluster):
    """``redis.asyncio.RedisCluster`` whose ``PUBLISH`` goes to :func:`classic_node`."""

    async def publish(self, channel: Any, message: Any, **kwargs: Any) -> Any:
        if "target_nodes" not in kwargs:
            if self._initialize:
                await self.initialize()
            kwargs["target_nodes"] = classic_node(self)
        return await super().publish(channel, message, **kwargs)


def _startup(hosts: list[tuple[str, int]]) -> tuple[str, list[rcluster.ClusterNode]]:
    """The URL of the first node (redis-py's ``from_url`` path, which lets the node
    pools use our connection class) and the other nodes as startup nodes."""
    first_host, first_port = hosts[0]
    host = f"[{first_host}]" if ":" in first_host else first_host
    return (f"redis://{host}:{first_port}",
            [rcluster.ClusterNode(h, p) for h, p in hosts[1:]])  # type: ignore[no-untyped-call]


def _make(hosts: list[tuple[str, int]], kwargs: dict[str, Any], *, tls: bool,
          address: str, extra: dict[str, Any] | None = None) -> Any:
    """A ``redis.RedisCluster`` over deadline-capped, never-retrying node connections.

    Raises:
        BackendUnavailable: no node answered ``CLUSTER SLOTS`` (the cluster is
            discovered when the client is built).
        ConfigError: an option the cluster client refuses.
    """
    from flexisync._connection import _deadline_class  # noqa: PLC0415  (import cycle)

    base = redis.SSLConnection if tls else redis.Connection
    url, startup_nodes = _startup(hosts)
    options = {k: v for k, v in kwargs.items() if k in _NODE_OPTIONS}
    if not tls:
        options = {k: v for k, v in options.items() if not k.startswith(_SSL_PREFIX)}
    start = time.monotonic()
    try:
        return _Cluster(
            url=url, startup_nodes=startup_nodes, connection_class=_deadline_class(base),
            retry=Retry(NoBackoff(), 0),  # retries happen in Backend.call only
            require_full_coverage=False, **(extra or {}), **options)
    except (rexc.RedisError, rexc.RedisClusterException, OSError) as exc:
        elapsed = time.monotonic() - start
        if isinstance(exc, rexc.AuthenticationError) or "auth" in str(exc).lower():
            raise BackendUnavailable(address, elapsed=elapsed,
                                     reason="authentication failed") from exc
        if isinstance(exc, rexc.RedisClusterException) and "cannot be connected" not in \
                str(exc) and "not covered" not in str(exc):
            raise ConfigError(f"Redis Cluster client: {exc}") from exc
        raise BackendUnavailable(address, elapsed=elapsed,
                                 reason=f"{type(exc).__name__}: {exc}") from exc


def build_client(spec: ConnectionSpec, options: dict[str, Any]) -> Any:
    """A blocking ``redis.RedisCluster`` for a ``redis+cluster://`` URL.

    ``options`` are ``connect(**redis_options)`` (already validated); they override the
    URL's query options, which override the defaults. The cluster's topology is read
    from the first node that answers; the others are fallbacks.

    Raises:
        BackendUnavailable: no listed node answered (or authentication failed).
        ConfigError: an option the cluster client refuses (e.g. ``db``).
    """
    merged: dict[str, Any] = dict(_DEFAULTS)
    merged.update(username=spec.username, password=spec.password)
    merged.update(spec.options)
    if "db" in options and options["db"] not in (0, None):
        raise ConfigError("Redis Cluster has only database 0; remove the db option")
    options = {k: v for k, v in options.items() if k != "db"}
    if options.get("unix_socket_path"):
        raise ConfigError("Redis Cluster does not support unix sockets")
    tls = bool(options.pop("ssl", False)) or any(k.startswith(_SSL_PREFIX) for k in merged)
    merged.update(options)
    return _make(list(spec.hosts), merged, tls=tls, address=spec.address)


def adopt_client(client: Any) -> Any:
    """The client flexisync uses for a user's ``redis.RedisCluster``.

    Like a single node's (see ``_connection.adopt_client``): a new ``RedisCluster``
    over the nodes the user's client knows, with its connection settings
    (credentials, TLS, decoding, timeouts, client name), redis-py's retries off and
    every socket wait capped by the call's deadline. The user's client is untouched.

    Raises:
        BackendUnavailable: no node of the user's cluster answers.
    """
    if type(client) is _Cluster:  # built by flexisync already (sync_twin)
        return client
    manager = client.nodes_manager
    kwargs = dict(manager.connection_kwargs)
    nodes = list(manager.nodes_cache.values()) or list(manager.startup_nodes.values())
    hosts = [(n.host, int(n.port)) for n in nodes]
    cls = kwargs.get("connection_class") or redis.Connection
    tls = bool(kwargs.get("ssl")) or issubclass(cls, redis.SSLConnection)
    extra: dict[str, Any] = {}
    if manager.address_remap is not None:
        extra["address_remap"] = manager.address_remap
    address = ",".join(f"{h}:{p}" for h, p in hosts)
    return _make(hosts, kwargs, tls=tls, address=address, extra=extra)


def address_of(client: Any) -> str:
    """``host:port,...`` of the nodes a (sync or asyncio) ``RedisCluster`` knows, for
    messages; never credentials."""
    manager = client.nodes_manager
    nodes = list(manager.nodes_cache.values()) or list(manager.startup_nodes.values())
    return ",".join(f"{n.host}:{n.port}" for n in nodes)


def sync_twin(client: Any) -> Any:
    """A blocking ``redis.RedisCluster`` with the nodes and settings of a user's
    ``redis.asyncio.RedisCluster`` (``flexisync.aio.connect(client=...)``); flexisync
    then adopts it like a blocking one.

    Raises:
        BackendUnavailable: no node of the cluster answers.
    """
    manager = client.nodes_manager
    kwargs = dict(manager.connection_kwargs)
    nodes = list(manager.nodes_cache.values()) or list(manager.startup_nodes.values())
    hosts = [(n.host, int(n.port)) for n in nodes]
    cls = kwargs.get("connection_class")
    tls = bool(kwargs.get("ssl")) or (isinstance(cls, type) and cls.__name__ == "SSLConnection")
    kwargs.setdefault("socket_timeout", _DEFAULTS["socket_timeout"])
    if kwargs.get("socket_timeout") is None:
        kwargs["socket_timeout"] = _DEFAULTS["socket_timeout"]
    return _make(hosts, kwargs, tls=tls, address=address_of(client))


def _accepted(fn: Callable[..., Any]) -> frozenset[str]:
    return frozenset(inspect.signature(fn).parameters) - {"self"}


_ASYNC_PARAMETERS = _accepted(redis.asyncio.RedisCluster.__init__)


def async_client_factory(client: Any) -> Callable[[], Any]:
    """A function building a ``redis.asyncio.RedisCluster`` like the blocking ``client``
    (same nodes, credentials, TLS, decoding), its own retries off.

    No per-socket timeout: as on a single node, ``AsyncBackend.call`` bounds every
    await by the call's deadline. The client discovers the cluster on its first
    command, inside that bound.
    """
    manager = client.nodes_manager
    kwargs = dict(manager.connection_kwargs)
    cls = kwargs.get("connection_class") or redis.Connection
    tls = bool(kwargs.get("ssl")) or issubclass(cls, redis.SSLConnection)
    options = {k: v for k, v in kwargs.items()
               if k in _ASYNC_PARAMETERS and k in _NODE_OPTIONS}
    if not tls:
        options = {k: v for k, v in options.items() if not k.startswith(_SSL_PREFIX)}
    options["ssl"] = tls
    options["socket_timeout"] = None
    seeds = [(n.host, int(n.port)) for n in (
        list(manager.nodes_cache.values()) or list(manager.startup_nodes.values()))]
    return _AsyncClusterFactory(seeds, options, manager.address_remap)


class _AsyncClusterFactory:
    """Builds one ``redis.asyncio.RedisCluster`` per call (AsyncBackend: per loop).
    ``sharded`` tells AsyncBackend that scripts publish with SPUBLISH."""

    sharded = True

    def __init__(self, seeds: list[tuple[str, int]], options: dict[str, Any],
                 remap: Any) -> None:
        self.seeds = seeds
        self.options = options
        self.remap = remap

    def __call__(self) -> Any:
        return _AsyncCluster(
            startup_nodes=[acluster.ClusterNode(h, p) for h, p in self.seeds],
            retry=AsyncRetry(NoBackoff(), 0),  # retries happen in AsyncBackend.call
            require_full_coverage=False, address_remap=self.remap, **self.options)


def make_listener(backend: Backend) -> Any:
    """The cluster's pub/sub listener (same interface as ``Listener``)."""
    from flexisync._cluster_listener import ClusterListener  # noqa: PLC0415

    return ClusterListener(backend)


# --- cluster-wide SCAN ---------------------------------------------------------------

#: A cluster SCAN cursor is ``node_cursor << _NODE_BITS | master_index``: which master
#: (ordered by the lowest slot it serves, so a promoted replica takes its master's
#: place) and that master's own cursor. 0 starts the scan and ends it, as on one node.
_NODE_BITS = 12


def _masters_by_slot(client: Any) -> list[Any]:
    """The masters, ordered by the lowest slot each serves (sync and async clients
    keep the same ``nodes_manager.slots_cache``)."""
    lowest: dict[str, tuple[int, Any]] = {}
    for slot, nodes in client.nodes_manager.slots_cache.items():
        if nodes:
            primary = nodes[0]
            found = lowest.get(primary.name)
            if found is None or slot < found[0]:
                lowest[primary.name] = (slot, primary)
    return [node for _slot, node in sorted(lowest.values(), key=lambda item: item[0])]


def scan_page(cursor: Any, match: str, count: int, client: Any) -> Any:
    """One page of a SCAN: ``(cursor, keys)`` (awaitable for an asyncio client).

    On a single node it is ``client.scan``. On a cluster it scans each master in turn
    (every master, as ``scan_iter`` would, one page per call); the returned cursor is
    0 after the last master's last page. SCAN's guarantee (every key present for the
    whole scan is returned) holds while the masters stay the same; a failover during
    the scan restarts the new master's part from its beginning.
    """
    if isinstance(client, redis.asyncio.RedisCluster):
        return _scan_page_async(int(cursor), match, count, client)
    if not isinstance(client, redis.RedisCluster):
        return client.scan(cursor, match=match, count=count)
    index, node_cursor = _split(int(cursor))
    masters = _masters_by_slot(client)
    if index >= len(masters):
        return 0, []
    cursors, keys = client.scan(node_cursor, match=match, count=count,
                                target_nodes=masters[index])
    return _join(index, _one_cursor(cursors), len(masters)), keys


async def _scan_page_async(cursor: int, match: str, count: int, client: Any) -> Any:
    if client._initialize:
        await client.initialize()
    index, node_cursor = _split(cursor)
    masters = _masters_by_slot(client)
    if index >= len(masters):
        return 0, []
    reply = await client.scan(node_cursor, match=match, count=count,
                              target_nodes=masters[index])
    cursors, keys = reply
    return _join(index, _one_cursor(cursors), len(masters)), keys


def _one_cursor(cursors: Any) -> int:
    if isinstance(cursors, dict):
        return int(next(iter(cursors.values()), 0))
    return int(cursors)


def _split(cursor: int) -> tuple[int, int]:
    return cursor & ((1 << _NODE_BITS) - 1), cursor >> _NODE_BITS


def _join(index: int, node_cursor: int, masters: int) -> int:
    if node_cursor != 0:
        return node_cursor << _NODE_BITS | index
    index += 1
    return 0 if index >= masters else index
