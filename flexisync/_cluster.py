"""Redis Cluster: clients, sharded pub/sub routing and the cluster listener.

Stub: filled in by the Cluster work of issue 12.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from flexisync.errors import ConfigError

if TYPE_CHECKING:
    from flexisync._connection import Backend, ConnectionSpec

__all__ = ["adopt_client", "async_client_factory", "build_client", "make_listener"]


def build_client(spec: ConnectionSpec, options: dict[str, Any]) -> Any:
    """A blocking ``redis.RedisCluster`` for a ``redis+cluster://`` URL."""
    raise ConfigError("redis+cluster:// URLs parse, but are not supported yet")


def adopt_client(client: Any) -> Any:
    """The client flexisync uses for a user's ``redis.RedisCluster``."""
    return client


def async_client_factory(client: Any) -> Callable[[], Any]:
    """A function building a ``redis.asyncio.RedisCluster`` like the blocking one."""
    raise ConfigError("the asyncio shell does not support Redis Cluster yet")


def make_listener(backend: Backend) -> Any:
    """The cluster's pub/sub listener (same interface as ``Listener``)."""
    raise ConfigError("pub/sub on Redis Cluster is not supported yet")
