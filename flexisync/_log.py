"""structlog loggers with stable event names (``breaker.opened``, ``lock.lost``...)."""

from __future__ import annotations

from typing import Any

import structlog

__all__ = ["get_logger"]


def get_logger(component: str, **bound: Any) -> Any:
    """A structlog logger named ``flexisync.<component>`` with ``bound`` fields.

    Fields must never carry a password or a URL with credentials: pass
    ``ConnectionSpec.redacted()`` instead of a raw URL.
    """
    return structlog.get_logger(f"flexisync.{component}").bind(**bound)
