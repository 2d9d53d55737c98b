"""Turning user-supplied durations into float seconds, validated once."""

from __future__ import annotations

import math
from datetime import timedelta

from flexisync.errors import ConfigError

__all__ = ["MAX_SECONDS", "Duration", "optional_seconds", "seconds", "to_ms"]

Duration = float | int | timedelta

#: The longest finite duration any flexisync argument accepts: 10 years. Larger values
#: are almost always a unit mistake (milliseconds passed as seconds), and would overflow
#: what Redis and the Lua scripts can represent exactly as milliseconds.
MAX_SECONDS = 10 * 365 * 86400.0


def seconds(value: object, name: str, *, allow_zero: bool = False,
            allow_inf: bool = False) -> float:
    """Return ``value`` as float seconds.

    Accepts an int, a float or a :class:`datetime.timedelta`.

    Raises:
        ConfigError: the value is of another type, is NaN, negative, zero (unless
            ``allow_zero``), infinite (unless ``allow_inf``) or finite but longer than
            :data:`MAX_SECONDS` (10 years); the message names ``name``.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, timedelta)):
        raise ConfigError(
            f"{name} must be seconds as a number or timedelta, not {type(value).__name__}"
        )
    result = value.total_seconds() if isinstance(value, timedelta) else float(value)
    if math.isnan(result):
        raise ConfigError(f"{name} must be a number of seconds, not NaN")
    if math.isinf(result) and not (allow_inf and result > 0):
        raise ConfigError(f"{name} must be finite, got {result}")
    if result < 0 or (result == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{name} must be {bound} seconds, got {result}")
    if MAX_SECONDS < result < math.inf:
        raise ConfigError(
            f"{name} must be at most {MAX_SECONDS:.0f} seconds (10 years), got {result:g}"
        )
    return result


def optional_seconds(value: object, name: str, *, allow_zero: bool = False,
                     allow_inf: bool = False) -> float | None:
    """Like :func:`seconds`, passing ``None`` through."""
    if value is None:
        return None
    return seconds(value, name, allow_zero=allow_zero, allow_inf=allow_inf)


def to_ms(value: float) -> int:
    """Seconds to whole milliseconds for ``PX``, never rounding a positive value to 0."""
    return max(1, math.ceil(value * 1000))
