"""The pub/sub listener on Redis Cluster: sharded channels on their masters, the rest classic.

:class:`ClusterListener` has the interface and guarantees of
:class:`flexisync._listener.Listener` (it is one), but spreads the subscriptions over
several connections ("links"):

* **shard channels** - a channel holding ``{`` (object channels ``ns:kind:{name}``:
  locks, semaphores, breakers, streams; their scripts ``SPUBLISH``) - are subscribed
  with ``SSUBSCRIBE`` on the master that serves the channel's slot, one link per master;
* **classic** channels and glob patterns (topics) go over one link to any live node
  (a cluster ``PUBLISH`` reaches every node); when it fails it reconnects to the next.

Threads: one named daemon thread per link, so at most one per master holding shard
subscriptions plus one classic (4 on a 3-master cluster), started on first use, stopped
by :meth:`close`, rebuilt after ``fork()``. One thread per socket keeps the tested
single-node reader (its FIFO of replies, PING half-open detection, backoff) as it is.

Moves: a key leaves its link when Redis drops it (an unsolicited ``sunsubscribe``: the
slot migrated), refuses it (``MOVED``/``ASK``/``CLUSTERDOWN``), or when the link's node
cannot be reached and a refreshed slot map (``CLUSTER SLOTS``, asked of another node)
names a new master (replica promotion). The key is then subscribed on the slot's
current master and, once every key is confirmed again, the reconnect hooks run: the
primitives re-read their state then, so a message published while the key was moving
is repaired rather than lost. Delivery is at most once per subscription and
connection; a message published during a move may be missed (the hooks repair it),
never delivered twice by the listener.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
from typing import Any

import redis.exceptions as rexc
from redis.crc import key_slot

from flexisync._cluster import CLASSIC_SLOT
from flexisync._connection import Backend
from flexisync._listener import Listener, _disconnect, _Key, pubsub_connection

__all__ = ["ClusterListener"]

_SLOTS = 16384
_REDIRECTS = ("MOVED", "ASK", "TRYAGAIN", "CLUSTERDOWN")
_REDIRECT_ERRORS = (rexc.AskError, rexc.TryAgainError, rexc.ClusterDownError)
_MAP_TIMEOUT = 1.0  # seconds: connect and read bound of one CLUSTER SLOTS query


def is_shard_channel(key: _Key) -> bool:
    """The channel rule agreed for the cluster: a channel holding ``{`` is sharded
    (object channels); topics and every glob pattern are classic."""
    return key[0] == "channel" and "{" in key[1]


def _slot_of(key: _Key) -> int:
    return int(key_slot(key[1].encode("utf-8")))


class _Link(Listener):
    """One connection of a :class:`ClusterListener`: a ``Listener`` that keeps no
    handlers of its own (its ``_handlers`` only say which keys it carries), shares its
    owner's condition and signals, delivers and runs hooks through its owner."""

    def __init__(self, owner: ClusterListener, node: str | None, *, sharded: bool) -> None:
        self._owner = owner
        self.lost_keys = False  # set by the owner when Redis dropped keys of this link
        self.node = node  # "host:port" of a master; None for the classic link
        super().__init__(owner._backend, name=f"flexisync-listener-{node or 'classic'}",
                         ping_interval=owner.ping_interval, ping_timeout=owner.ping_timeout,
                         poll=owner._poll, backoff_max=owner._backoff_max, sharded=sharded)

    def _reset_runtime(self) -> None:
        super()._reset_runtime()
        self._cond = self._owner._cond
        self._signals = self._owner._signals

    def _new_connection(self) -> Any:
        if self.node is not None:
            return self._owner._connection_to(self.node)
        return self._owner._classic_connection()

    def _connection_lost(self) -> None:
        if self.node is not None:
            self._owner._link_failed(self)

    def _deliver(self, key: _Key, channel: str, data: Any, pattern: str | None) -> None:
        self._owner._deliver(key, channel, data, pattern)

    def _maybe_run_hooks(self) -> None:
        with self._cond:
            if self._hooks_due:  # this link reconnected: the owner's hooks are due
                self._hooks_due = False
                self._owner._hooks_due = True
        self._owner._maybe_run_hooks()

    def _dispatch(self, reply: Any) -> None:
        super()._dispatch(reply)
        if self.lost_keys:
            self._owner._rebalance(self)

    def _unsolicited_unsubscribe(self, channel: str) -> None:
        with self._cond:
            self._owner._lost(self, [("channel", channel)])

    def _excess_error(self, error: rexc.ResponseError) -> bool:
        """A ``MOVED`` for a slot that is not the oldest pending command's: the late
        answer to a SUNSUBSCRIBE that Redis's own ``sunsubscribe`` already settled."""
        moved = _moved(error)
        if moved is None:
            return False
        with self._cond:
            if not self._pending:
                return True
            _command, key = self._pending[0]
            return key is None or not is_shard_channel(key) or _slot_of(key) != moved[0]

    def _redirected(self, command: str, key: _Key | None, error: rexc.ResponseError) -> bool:
        if not (isinstance(error, _REDIRECT_ERRORS) or str(error).startswith(_REDIRECTS)):
            return False
        if key is not None and command == "SSUBSCRIBE" \
                and self._sub_seq.get(key) == self._answered:
            moved = _moved(error)
            if moved is not None and not _is_ask(error):  # ASK: only with ASKING; wait
                self._owner._hints[moved[0]] = moved[1]
            self._owner._lost(self, [key])
        return True  # a stale subscribe or an unsubscribe of a moved slot: nothing to do


def _is_ask(error: rexc.ResponseError) -> bool:
    return (isinstance(error, rexc.AskError) and not isinstance(error, rexc.MovedError)) \
        or str(error).startswith("ASK ")


def _moved(error: rexc.ResponseError) -> tuple[int, str] | None:
    """``(slot, "host:port")`` of a ``MOVED``/``ASK`` error, else None."""
    if isinstance(error, rexc.MovedError | rexc.AskError):
        return int(error.slot_id), f"{error.host}:{error.port}"
    parts = str(error).split()
    if len(parts) == 3 and parts[0] in ("MOVED", "ASK") and parts[1].isdigit():
        return int(parts[1]), parts[2]
    return None


class ClusterListener(Listener):
    """The Context's pub/sub listener on Redis Cluster; see the module docstring.

    Same interface and guarantees as :class:`Listener`: :meth:`subscribe` returns once
    the master serving the channel (or, classic, the node of the classic link)
    confirmed, so a ``SPUBLISH``/``PUBLISH`` made afterwards is delivered; tables are
    bounded by what is live; the reconnect hooks run after any reconnect or move, once
    every key is confirmed again.
    """

    def __init__(self, backend: Backend, **options: Any) -> None:
        super().__init__(backend, **options)
        self._slots: list[str | None] = []  # slot -> "host:port" of its master
        self._nodes: list[str] = []  # every node known (masters and replicas)
        self._next_node = itertools.count()
        self._hints: dict[int, str] = {}  # slot -> master named by a MOVED
        self._moves = 0
        self._base_reconnects = 0
        self._retired_gen = 0

    @property
    def reconnects(self) -> int:
        """Reconnects of every link plus keys moved to another master."""
        with self._cond:
            return self._base_reconnects + self._moves + sum(
                link.reconnects for link in self._all_links())

    @reconnects.setter
    def reconnects(self, value: int) -> None:
        self._base_reconnects = value

    def _reset_runtime(self) -> None:
        super()._reset_runtime()
        self._links: dict[str, _Link] = {}  # master "host:port" -> its sharded link
        self._classic: _Link | None = None
        self._route: dict[_Key, _Link] = {}  # key -> the link carrying it
        self._unplaced: set[_Key] = set()  # keys with handlers waiting for a link
        # Links retired while their thread may still be finishing a map refresh: joined
        # by close(); pruned of finished ones at each retirement (so bounded by masters).
        self._retiring: list[_Link] = []

    def _all_links(self) -> list[_Link]:
        links = list(self._links.values())
        if self._classic is not None:
            links.append(self._classic)
        return links

    # --- the Listener interface -------------------------------------------------------

    @property
    def connected(self) -> bool:
        """True while every link that carries subscriptions is connected (and at least
        one link exists)."""
        with self._cond:
            links = [link for link in self._all_links() if link._handlers]
            return bool(links) and all(link._conn is not None for link in links) \
                and not self._unplaced

    @property
    def generation(self) -> int:
        """Connections made so far by every link; grows on every reconnect."""
        with self._cond:
            return self._retired_gen + sum(link._gen for link in self._all_links())

    def table_sizes(self) -> dict[str, int]:
        """Entry counts of the tables of the listener and of every link."""
        with self._cond:
            sizes = super().table_sizes()
            for link in self._all_links():
                for name, size in link.table_sizes().items():
                    if name in ("pending", "sub_seq", "refused"):
                        sizes[name] += size
            sizes["routes"] = len(self._route)
            sizes["unplaced"] = len(self._unplaced)
            sizes["links"] = len(self._all_links())
            return sizes

    def close(self) -> None:
        """Stop every link's thread and close its socket. Registrations are dropped."""
        with self._cond:
            self._closed = True  # before the links go: no rebalance builds a new one
            links = self._all_links() + self._retiring
            self._links, self._classic, self._retiring = {}, None, []
            self._route.clear()
            self._unplaced.clear()
        super().close()
        for link in links:
            link.close()

    def reconnect(self) -> None:
        """Drop every link's connection now; each reconnects and resubscribes, then
        the reconnect hooks run."""
        with self._cond:
            links = self._all_links()
        for link in links:
            link.reconnect()

    def after_fork(self) -> None:
        """In a forked child: forget the parent's links; keep registrations and
        subscribe them again on links of this process."""
        handlers, hooks, closed = self._handlers, self._hooks, self._closed
        self._reset_runtime()
        self._handlers, self._hooks, self._closed = handlers, hooks, closed
        if handlers and not closed:
            with self._cond:
                for key in handlers:
                    self._place(key)

    def _ensure_thread(self) -> None:
        """No thread of its own: each link starts its thread when it gets a key."""

    def _on_listener_thread(self) -> bool:
        current = threading.current_thread()
        return any(link._thread is current for link in self._all_links())

    # --- routing ---------------------------------------------------------------------

    def _link_of(self, key: _Key) -> Listener | None:
        return self._route.get(key)

    def _place(self, key: _Key, node: str | None = None) -> None:
        """Subscribe ``key`` on the link it belongs to now (caller holds ``_cond``):
        a shard channel on ``node`` (default: its slot's master by the map)."""
        if is_shard_channel(key):
            node = node or self._master_of(key)
            if node is None:
                self._unplaced.add(key)  # slot not served: the next rebalance retries
                return
            link = self._links.get(node)
            if link is None:
                link = self._links[node] = _Link(self, node, sharded=True)
        else:
            if self._classic is None:
                self._classic = _Link(self, None, sharded=False)
            link = self._classic
        self._unplaced.discard(key)
        self._route[key] = link
        link._handlers[key] = []
        link._ensure_thread()
        if link._conn is not None:
            link._send_subscribe(link._conn, [key])

    def _unplace(self, key: _Key) -> tuple[Listener, int] | None:
        self._unplaced.discard(key)
        link = self._route.pop(key, None)
        if link is None:
            return None
        link._handlers.pop(key, None)
        return link._unplace(key)

    def _master_of(self, key: _Key, avoid: str | None = None) -> str | None:
        """The master serving ``key``'s slot by the slot map; when that is ``avoid``
        (the node that just gave it up), a ``MOVED``'s answer if there is one."""
        if not self._slots:
            self._slots, self._nodes = self._client_map()
        slot = _slot_of(key)
        node = self._slots[slot]
        if node is not None and node == avoid:
            return self._hints.get(slot, node)
        return node

    def _lost(self, link: _Link, keys: list[_Key]) -> None:
        """Redis dropped ``keys`` on ``link`` (or its node is gone): queue them for
        the rebalance (caller holds ``_cond``; no I/O here)."""
        for key in keys:
            if self._route.get(key) is not link:
                continue
            del self._route[key]
            link._handlers.pop(key, None)
            link._sub_seq.pop(key, None)
            link._refused.pop(key, None)
            link.lost_keys = True
            if key in self._handlers:
                self._unplaced.add(key)
                self._hooks_due = True
                self._moves += 1
        self._notify_all()

    def _rebalance(self, link: _Link) -> None:
        """On ``link``'s thread: refresh the slot map and subscribe every queued key on
        its master. While the map still names ``link``'s node (the news has not reached
        the node asked), waits a little and asks again: at most ~1.3 s, then uses what
        it has."""
        self._log.info("events.cluster_moved", node=link.node, keys=len(self._unplaced))
        with self._cond:
            link.lost_keys = False
        delay = 0.05
        for attempt in range(6):
            fresh = self._fetch_map(avoid=link.node)
            with self._cond:
                if self._closed:
                    return
                if fresh is not None:
                    self._slots, self._nodes = fresh
                avoid = link.node if attempt < 5 else None
                waiting = self._place_unplaced(avoid)
                if not waiting:
                    self._hints.clear()
                    self._retire_idle()
                    self._notify_all()
                    return
            if link._stop.wait(delay):
                return
            delay = min(delay * 2, 0.5)

    def _place_unplaced(self, avoid: str | None) -> int:
        """Subscribe queued keys whose master is known and not ``avoid``; returns how
        many stay queued. Caller holds ``_cond``."""
        left = 0
        for key in list(self._unplaced):
            if key not in self._handlers or key in self._route:
                self._unplaced.discard(key)
                continue
            node = self._master_of(key, avoid)
            if node is None or (avoid is not None and node == avoid):
                left += 1
                continue
            self._place(key, node)
        return left

    def _link_failed(self, link: _Link) -> None:
        """On ``link``'s thread after its connection failed: if a refreshed slot map
        names other masters for its keys (a replica was promoted, slots moved), move
        them there; a link left with nothing to carry, on a node serving no slot, stops."""
        fresh = self._fetch_map(avoid=link.node)
        with self._cond:
            if self._closed or fresh is None:
                return
            self._slots, self._nodes = fresh
            moved = [key for key, where in self._route.items()
                     if where is link and self._master_of(key) != link.node]
            if moved:
                self._log.info("events.cluster_failover", node=link.node, keys=len(moved))
                self._lost(link, moved)
            self._place_unplaced(None)
            self._retire_idle()
            self._notify_all()

    def _retire_idle(self) -> None:
        """Close sharded links that carry nothing and whose node serves no slot
        (caller holds ``_cond``)."""
        serving = set(self._slots)
        self._retiring = [link for link in self._retiring
                          if link._thread is not None and link._thread.is_alive()]
        for node, link in list(self._links.items()):
            if not link._handlers and node not in serving:
                del self._links[node]
                self._retiring.append(link)
                self._retired_gen += link._gen
                self._base_reconnects += link.reconnects
                link._closed = True
                link._stop.set()
                conn, link._conn = link._conn, None
                if conn is not None:
                    _disconnect(conn)

    # --- slot map and connections -------------------------------------------------------

    def _client_map(self) -> tuple[list[str | None], list[str]]:
        """The slot map the cluster client already holds (no I/O)."""
        manager = self._backend.client.nodes_manager
        slots: list[str | None] = [None] * _SLOTS
        with getattr(manager, "_lock", contextlib.nullcontext()):
            for slot, nodes in manager.slots_cache.items():
                if nodes:
                    slots[slot] = nodes[0].name
            names = list(manager.nodes_cache)
        return slots, names

    def _fetch_map(self, avoid: str | None) -> tuple[list[str | None], list[str]] | None:
        """``CLUSTER SLOTS`` from the first known node that answers (``avoid`` last),
        each try bounded by ``_MAP_TIMEOUT`` seconds; None when none answers."""
        with self._cond:
            if not self._slots:
                self._slots, self._nodes = self._client_map()
            known = list(dict.fromkeys([*self._nodes, *(n for n in self._slots if n)]))
        known.sort(key=lambda name: name == avoid)
        for name in known:
            conn = None
            try:
                conn = self._connection_to(name, timeout=_MAP_TIMEOUT)
                conn.connect()
                conn.send_command("CLUSTER", "SLOTS")
                reply = conn.read_response()
            except (rexc.RedisError, OSError, ValueError):
                continue
            finally:
                if conn is not None:
                    _disconnect(conn)
            host = name.rsplit(":", 1)[0]
            slots: list[str | None] = [None] * _SLOTS
            nodes: list[str] = []
            for start, end, *members in reply:
                names = [f"{_text(m[0]) or host}:{int(m[1])}" for m in members]
                nodes.extend(names)
                if names:
                    slots[int(start):int(end) + 1] = [names[0]] * (int(end) - int(start) + 1)
            return slots, list(dict.fromkeys(nodes)) or known
        return None

    def _connection_to(self, node: str, *, timeout: float | None = None) -> Any:
        """A pub/sub connection to ``node`` ("host:port") with the cluster's settings."""
        host, _, port = node.rpartition(":")
        overrides: dict[str, Any] = {"host": host, "port": int(port)}
        if timeout is not None:
            overrides["socket_timeout"] = timeout
            overrides["socket_connect_timeout"] = timeout
        return pubsub_connection(self._node_pool(), **overrides)

    def _node_pool(self) -> Any:
        """A node's connection pool: the cluster's connection class and settings."""
        client = self._backend.client
        for node in list(client.nodes_manager.nodes_cache.values()):
            if node.redis_connection is not None:
                return node.redis_connection.connection_pool
        raise rexc.ConnectionError("the cluster client knows no node")

    def _classic_connection(self) -> Any:
        """A connected connection to the master serving ``CLASSIC_SLOT`` (where every
        flexisync PUBLISH goes, so its receiver count is exact), else the next live
        node, round robin."""
        with self._cond:
            if not self._slots:
                self._slots, self._nodes = self._client_map()
            nodes = list(self._nodes) or [n for n in dict.fromkeys(self._slots) if n]
            preferred = self._slots[CLASSIC_SLOT] if self._slots else None
        if not nodes:
            raise rexc.ConnectionError("the cluster client knows no node")
        start = next(self._next_node)
        rotated = [nodes[(start + offset) % len(nodes)] for offset in range(len(nodes))]
        if preferred is not None:
            rotated = [preferred, *(n for n in rotated if n != preferred)]
        last: Exception | None = None
        for node in rotated:
            conn = self._connection_to(node)
            try:
                conn.connect()
            except (rexc.RedisError, OSError) as exc:
                last = exc
                continue
            return conn
        raise rexc.ConnectionError(f"no cluster node reachable for pub/sub: {last}")


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def make_cluster_listener(backend: Backend) -> ClusterListener:
    """The listener ``flexisync._cluster.make_listener`` returns."""
    return ClusterListener(backend)

