"""Key and channel layout, and validation of every user-supplied name.

Layout (``ns`` is the Coordinator's namespace, ``{name}`` is a Redis Cluster hash tag so
that every key of one object lands in one slot and its Lua scripts may touch them all)::

    ns:state:{scope}:key           one StateStore value
    ns:lock:{name}                 a lock's lease (value = owner token "random:host:pid";
                                   "~token" while a free fair lock is reserved for token)
    ns:lock:{name}:fence           the lock's fencing counter (expires after about a day)
    ns:lock:{name}:released:<id>   "released by token <id>" marker (a few seconds)
    ns:lock:{name}:waiters         default-mode waiters (ZSET token -> arrival, us)
    ns:lock:{name}:queue           fair-mode waiter queue (ZSET token -> arrival, us)
    ns:lock:{name}                 wake-up channel PUBLISHed by a lock's release
    ns:sem:{name}                  a semaphore's holders (ZSET owner token -> lease expiry, ms)
    ns:sem:{name}:queue            its FIFO waiter queue (ZSET token -> arrival, us)
    ns:sem:{name}:queue:ttl        its waiter expiries (ZSET token -> server ms)
    ns:sem:{name}:done:<id>        "token <id> released / given up" marker (a few seconds)
    ns:sem:{name}                  wake-up channel PUBLISHed by a semaphore's release
    ns:events:topic                pub/sub channel of a topic (a channel, not a key)
    ns:stream:{name}               a Stream (XADD log), and the channel its appends wake
    ns:breaker:{name}              a breaker's shared state (HASH: state, version, epoch...)
    ns:breaker:{name}:window       its failure-rate window (HASH of per-bucket counts)
    ns:breaker:{name}:probes       its half-open probe leases (ZSET token -> expiry ms)
    ns:breaker:{name}              channel on which a breaker's transitions are published
    ns:doctor:{probe-xxxxxxxx}:*   throwaway keys `flexisync doctor` writes and deletes
                                   while probing ACL permissions
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from flexisync.errors import ConfigError

__all__ = ["MAX_NAME", "KeySpace", "validate_name", "validate_pattern"]

MAX_NAME = 200
_NAME = re.compile(r"[A-Za-z0-9._\-:/@]{1,200}")
_PATTERN = re.compile(r"[A-Za-z0-9._\-:/@*?\[\]]{1,200}")


def validate_name(value: object, kind: str = "name") -> str:
    """Return ``value`` if it is a valid flexisync name.

    A name is 1-200 characters from letters, digits and ``._-:/@``.

    Raises:
        ConfigError: ``value`` is not a string or breaks the rule; the message names
            ``kind`` and shows the offending value.
    """
    if not isinstance(value, str):
        raise ConfigError(f"{kind} must be a str, not {type(value).__name__}")
    if _NAME.fullmatch(value) is None:
        raise ConfigError(_explain(value, kind, "letters, digits and ._-:/@"))
    return value


def validate_pattern(value: object, kind: str = "topic pattern") -> str:
    """Like :func:`validate_name`, also allowing the glob characters ``* ? [ ]``."""
    if not isinstance(value, str):
        raise ConfigError(f"{kind} must be a str, not {type(value).__name__}")
    if _PATTERN.fullmatch(value) is None:
        raise ConfigError(_explain(value, kind, "letters, digits, ._-:/@ and * ? [ ]"))
    return value


def is_pattern(value: str) -> bool:
    """True when ``value`` contains a glob character."""
    return any(c in value for c in "*?[")


def _explain(value: str, kind: str, allowed: str) -> str:
    if not value:
        return f"{kind} must not be empty"
    if len(value) > MAX_NAME:
        return f"{kind} is {len(value)} characters long; the limit is {MAX_NAME}"
    return f"{kind} {value!r} may contain only {allowed}"


@dataclass(frozen=True)
class KeySpace:
    """Builds every key and channel name under one namespace."""

    namespace: str

    def __post_init__(self) -> None:
        validate_name(self.namespace, "namespace")

    def key(self, kind: str, name: str, *parts: str) -> str:
        """``ns:kind:{name}[:part...]``; ``name`` becomes the Cluster hash tag."""
        tail = "".join(":" + p for p in parts)
        return f"{self.namespace}:{kind}:{{{name}}}{tail}"

    def prefix(self, kind: str, name: str) -> str:
        """The prefix every key of one object starts with (for SCAN ``MATCH prefix*``)."""
        return f"{self.namespace}:{kind}:{{{name}}}:"

    def channel(self, kind: str, name: str) -> str:
        """A topic's pub/sub channel: ``ns:kind:name``, no hash tag (glob patterns
        match it; on Redis Cluster it stays a classic, cluster-wide channel)."""
        return f"{self.namespace}:{kind}:{name}"

    def object_channel(self, kind: str, name: str) -> str:
        """One object's channel (a lock's wake-ups, a breaker's transitions):
        ``ns:kind:{name}``, with the object's hash tag, so its scripts may publish on it
        and on Redis Cluster it is a sharded channel (SPUBLISH / SSUBSCRIBE) in the
        object's slot. A channel holding ``{`` is sharded; topics never do (names
        cannot contain braces)."""
        return f"{self.namespace}:{kind}:{{{name}}}"

    def all_keys_pattern(self) -> str:
        """SCAN pattern matching every key of this namespace."""
        return f"{self.namespace}:*"
