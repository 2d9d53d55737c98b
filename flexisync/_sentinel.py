"""Redis Sentinel: clients that follow the master, and +switch-master handling.

Stub: filled in by the Sentinel work of issue 12.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from flexisync.errors import ConfigError

if TYPE_CHECKING:
    from flexisync._connection import ConnectionSpec
    from flexisync._core.context import Context

__all__ = ["adopt_client", "async_client_factory", "attach", "build_client",
           "pubsub_connection"]


def build_client(spec: ConnectionSpec, options: dict[str, Any]) -> Any:
    """A blocking client for a ``redis+sentinel://`` URL."""
    raise ConfigError("redis+sentinel:// URLs parse, but are not supported yet")


def adopt_client(client: Any) -> Any:
    """The client flexisync uses for a user's sentinel-managed ``redis.Redis``."""
    raise ConfigError("sentinel-managed clients are not supported yet")


def async_client_factory(client: Any) -> Callable[[], Any]:
    """A function building a ``redis.asyncio`` client like the blocking ``client``."""
    raise ConfigError("sentinel-managed clients are not supported yet")


def pubsub_connection(client: Any) -> Any:
    """A fresh connection to the current master, outside the pool, for the listener."""
    raise ConfigError("sentinel-managed clients are not supported yet")


def attach(ctx: Context) -> None:
    """Start following the sentinels' ``+switch-master`` for ``ctx``."""
