"""URL parsing: every supported scheme, and clear errors that never leak a password."""

from __future__ import annotations

import pytest

import flexisync
from flexisync._connection import parse_url


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://localhost", ("redis", "localhost", 6379, 0)),
        ("redis://h:6380/3", ("redis", "h", 6380, 3)),
        ("rediss://h.example:6390/2", ("rediss", "h.example", 6390, 2)),
        ("redis://h/?db=4", ("redis", "h", 6379, 4)),
        ("REDIS://h:1/0", ("redis", "h", 1, 0)),
    ],
)
def test_tcp_urls_parse_to_host_port_db(url: str, expected: tuple[str, str, int, int]) -> None:
    """redis:// and rediss:// give scheme, host, port (default 6379) and db."""
    spec = parse_url(url)
    assert (spec.scheme, spec.host, spec.port, spec.db) == expected


def test_unix_url_takes_path_and_db() -> None:
    """unix:// keeps the socket path and reads the db from the query."""
    spec = parse_url("unix:///run/redis/redis.sock?db=5")
    assert (spec.scheme, spec.path, spec.db) == ("unix", "/run/redis/redis.sock", 5)


def test_sentinel_and_cluster_urls_parse_every_host() -> None:
    """Multi-host URLs parse (support itself comes later)."""
    sentinel = parse_url("redis+sentinel://:pw@s1:26379,s2/mymaster/2")
    assert sentinel.hosts == (("s1", 26379), ("s2", 26379))
    assert (sentinel.service, sentinel.db, sentinel.password) == ("mymaster", 2, "pw")
    cluster = parse_url("redis+cluster://n1:7000,n2:7001")
    assert cluster.hosts == (("n1", 7000), ("n2", 7001))


def test_sentinel_and_cluster_are_not_supported_yet_with_a_clear_error() -> None:
    """connect() on a parsed but unsupported scheme says so."""
    with pytest.raises(flexisync.ConfigError, match="not supported yet"):
        flexisync.connect("redis+cluster://n1:7000")


def test_memory_url_names_a_private_server() -> None:
    """memory:// and memory://name parse without a host."""
    assert parse_url("memory://").name == ""
    assert parse_url("memory://unit").name == "unit"


def test_url_options_are_parsed_and_unknown_ones_rejected() -> None:
    """Known query options become typed values; an unknown one is an error naming it."""
    spec = parse_url("redis://h/0?socket_timeout=1.5&max_connections=20&client_name=api")
    assert spec.options == {"socket_timeout": 1.5, "max_connections": 20, "client_name": "api"}
    with pytest.raises(flexisync.ConfigError, match="unknown URL option 'bogus'"):
        parse_url("redis://h/0?bogus=1")


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("localhost:6379", "no scheme"),
        ("http://localhost", "unknown URL scheme 'http'"),
        ("redis://h:notaport/0", "malformed"),
        ("redis://h:99999/0", "malformed"),
        ("redis://h/abc", "database must be a non-negative integer"),
        ("redis://h/-1", "database must be a non-negative integer"),
        ("redis:///0", "needs a host"),
        ("unix://", "needs a socket path"),
        ("redis+sentinel://s1:26379", "needs a service name"),
        ("redis+cluster://n1:x", "non-numeric port"),
        ("redis+cluster://n1:7000/1", "takes no database"),
        ("redis://h/0?socket_timeout=-1", "socket_timeout must be >= 0"),
        ("redis://h/0?socket_timeout=fast", "must be a number"),
        (42, "must be a str"),
    ],
)
def test_malformed_urls_raise_config_error_naming_the_problem(url: object, message: str) -> None:
    """Each malformed URL raises ConfigError (a ValueError) with a specific message."""
    with pytest.raises(flexisync.ConfigError, match=message) as info:
        flexisync.connect(url)  # type: ignore[arg-type]
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    "url",
    [
        "redis://user:s3cr3t-pw@h:99999/0",
        "redis://:s3cr3t-pw@h/abc",
        "redis+sentinel://:s3cr3t-pw@s1:26379",
        "redis://:s3cr3t-pw@h/0?bogus=1",
    ],
)
def test_password_never_appears_in_errors(url: str) -> None:
    """A malformed URL's error message does not contain its password."""
    with pytest.raises(flexisync.ConfigError) as info:
        flexisync.connect(url)
    assert "s3cr3t-pw" not in str(info.value)


def test_password_never_appears_in_repr_or_url() -> None:
    """Coordinator repr, .url and the spec's repr redact the password."""
    sync = flexisync.connect("redis://admin:s3cr3t-pw@localhost:6379/2")
    try:
        for text in (repr(sync), sync.url, repr(parse_url("redis://a:s3cr3t-pw@h/0"))):
            assert "s3cr3t-pw" not in text
        assert sync.url == "redis://admin:***@localhost:6379/2"
    finally:
        sync.close()


def test_url_defaults_to_flexisync_url_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """url=None reads FLEXISYNC_URL, else redis://localhost:6379/0."""
    monkeypatch.setenv("FLEXISYNC_URL", "redis://example:6390/7")
    with flexisync.connect() as sync:
        assert sync.url == "redis://example:6390/7"
    monkeypatch.delenv("FLEXISYNC_URL")
    with flexisync.connect() as sync:
        assert sync.url == "redis://localhost:6379/0"


def test_client_and_url_together_are_rejected() -> None:
    """client= excludes a URL; a non-client object is rejected by type."""
    import redis

    client = redis.Redis()
    with pytest.raises(flexisync.ConfigError, match="not both"):
        flexisync.connect("redis://h/0", client=client)
    with pytest.raises(flexisync.ConfigError, match=r"must be a redis\.Redis"):
        flexisync.connect(client="redis://h")
    client.close()
