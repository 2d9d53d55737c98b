"""URL parsing: every supported scheme, and clear errors that never leak a password."""

from __future__ import annotations

import asyncio

import pytest

import flexisync
import flexisync.aio
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


def test_unreachable_cluster_is_backend_unavailable_without_the_password() -> None:
    """connect() discovers a cluster's slots at once: no node answering is
    BackendUnavailable naming every node, never the password."""
    with pytest.raises(flexisync.BackendUnavailable) as info:
        flexisync.connect("redis+cluster://u:Qx7Zk9Wv@127.0.0.1:1,127.0.0.1:2")
    assert "127.0.0.1:1,127.0.0.1:2" in str(info.value)
    assert "Qx7Zk9Wv" not in str(info.value)


def test_cluster_url_refuses_options_a_cluster_cannot_have() -> None:
    """A database other than 0 is refused (the URL path already is)."""
    from flexisync._connection import build_client

    with pytest.raises(flexisync.ConfigError, match="only database 0"):
        build_client(parse_url("redis+cluster://127.0.0.1:1"), db=2)


def test_cluster_url_connects_for_real(cluster_url: str) -> None:
    """redis+cluster:// gives a RedisCluster with the single-node defaults, URL options,
    redis-py retries off and deadline-capped node connections, in both shells."""
    import redis

    from flexisync._connection import _DeadlineMixin

    url = cluster_url + "?socket_timeout=1.5&client_name=unit"
    with flexisync.connect(url, namespace="urls") as sync:
        client = sync.client
        assert isinstance(client, redis.RedisCluster)
        assert client.retry.get_retries() == 0
        assert sync.ping() > 0
        for node in client.get_nodes():
            pool = client.get_redis_connection(node).connection_pool
            assert issubclass(pool.connection_class, _DeadlineMixin)
            assert pool.connection_kwargs["socket_timeout"] == 1.5
            assert pool.connection_kwargs["client_name"] == "unit"
            assert pool.connection_kwargs["protocol"] == 2
        assert sync.url.startswith("redis+cluster://127.0.0.1:")

    async def run() -> None:
        coordinator = flexisync.aio.connect(url, namespace="urls")
        try:
            assert await coordinator.ping() > 0
        finally:
            await coordinator.aclose()

    asyncio.run(run())


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


_SECRET = "Qx7Zk9Wv/x?y#z@w:v"  # noqa: S105  (a made-up password the test hunts for)

_HOSTILE_URLS = [
    # Reserved characters left unescaped in the password, in every position.
    f"redis://:{_SECRET}@localhost:6379/0",
    f"redis://user:{_SECRET}@localhost:6379/0",
    "redis://:Qx7Zk9Wv/x@localhost:6379/0",
    "redis://:Qx7Zk9Wv?x@localhost:6379/0",
    "redis://:Qx7Zk9Wv#x@localhost:6379/0",
    "redis://user:Qx7Zk9Wv/x@localhost:notaport/0",
    "rediss://:Qx7Zk9Wv?db=abc@host/0",
    "unix://:Qx7Zk9Wv/x@/run/redis.sock?db=1",
    "redis+sentinel://:Qx7Zk9Wv?x@s1:26379/mymaster",
    "redis+cluster://u:Qx7Zk9Wv/x#y@n1:7000",
    "redis+cluster://:Qx7Zk9Wv@n1:notaport",
    "redis://:Qx7Zk9Wv@localhost:99999/0",
    "redis://:Qx7Zk9Wv@localhost:6379/abc",
    "user:Qx7Zk9Wv@redis://localhost",
    "Qx7Zk9Wvredis://:Qx7Zk9Wv@localhost",
    "redis://:Qx7Zk9Wv@",
    "redis://:Qx7Zk9Wv@:6379",
]


def _password_parts(password: str) -> set[str]:
    """Every piece of ``password`` three characters or longer that holds a letter or
    digit (pieces of punctuation alone, like "'/'", also occur in the advice text)."""
    pieces = {password[i:j] for i in range(len(password))
              for j in range(i + 3, len(password) + 1)}
    return {piece for piece in pieces if any(c.isalnum() for c in piece)}


@pytest.mark.parametrize("url", _HOSTILE_URLS)
def test_no_part_of_a_password_leaks_from_any_malformed_url(url: str) -> None:
    """However malformed the URL, an error, a repr or the redacted URL never shows any
    three-character piece of the password (here 'Qx7Zk9Wv' or the longer secret)."""
    secret = _SECRET if _SECRET in url else "Qx7Zk9Wv"
    try:
        spec = parse_url(url)
    except flexisync.ConfigError as exc:
        shown = str(exc)
    else:
        shown = repr(spec) + spec.redacted() + spec.address
    leaked = [p for p in _password_parts(secret) if p in shown]
    assert not leaked, f"password piece(s) {leaked} in {shown!r}"


def test_an_unescaped_reserved_character_in_a_password_gets_a_clear_error() -> None:
    """A '/', '?' or '#' before the last '@' is refused with advice to percent-encode."""
    with pytest.raises(flexisync.ConfigError, match="percent-encode") as info:
        parse_url("redis://:Qx7Zk9Wv/x@localhost:6379/0")
    assert "Qx7Zk9Wv" not in str(info.value)


def test_a_percent_encoded_password_with_reserved_characters_parses() -> None:
    """The same password percent-encoded reaches redis-py intact."""
    spec = parse_url("redis://user:hunter2%2Fx%3Fy%23z%40w@localhost:6379/3")
    assert (spec.username, spec.password, spec.host, spec.db) == (
        "user", "hunter2/x?y#z@w", "localhost", 3)


def test_an_unescaped_at_sign_in_a_password_parses() -> None:
    """'@' is unambiguous (the userinfo ends at the last one), so it needs no escaping."""
    spec = parse_url("redis://:p@ss@localhost:6380/1")
    assert (spec.password, spec.host, spec.port, spec.db) == ("p@ss", "localhost", 6380, 1)


def test_the_cli_never_prints_a_password_from_a_malformed_url(
        capsys: pytest.CaptureFixture[str]) -> None:
    """The command line reports a malformed URL without any piece of its password."""
    from flexisync.cli import main

    code = main(["doctor", "--url", "redis://:Qx7Zk9Wv/x@localhost:6379/0"])
    out, err = capsys.readouterr()
    assert code != 0
    assert "percent-encode" in out + err
    assert not [p for p in _password_parts("Qx7Zk9Wv") if p in out + err]


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis://h/0?db=abc", "non-negative integer"),
        ("redis://h/?db=abc", "non-negative integer"),
        ("redis://h/1?db=2", "names the database twice"),
        ("unix:///s.sock?db=x", "non-negative integer"),
    ],
)
def test_a_bad_or_conflicting_db_in_the_query_is_an_error(url: str, message: str) -> None:
    """?db= is never silently ignored: a bad one or one that contradicts the path fails."""
    with pytest.raises(flexisync.ConfigError, match=message):
        parse_url(url)


def test_the_same_db_in_path_and_query_is_accepted() -> None:
    """/2?db=2 says the same thing twice, which is fine."""
    assert parse_url("redis://h/2?db=2").db == 2


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"socket_timout": 1}, "did you mean 'socket_timeout'"),
        ({"socket_timeout": -1}, "socket_timeout must be > 0"),
        ({"socket_timeout": float("nan")}, "socket_timeout must be a number of seconds"),
        ({"socket_connect_timeout": float("inf")}, "must be finite"),
        ({"socket_timeout": "1"}, "socket_timeout must be seconds"),
        ({"retry_on_error": []}, "set by flexisync"),
        ({"retry_on_timeout": True}, "set by flexisync"),
    ],
)
def test_bad_redis_options_raise_config_error_before_any_io(
        options: dict[str, object], message: str) -> None:
    """A misspelt or out-of-range redis option fails in connect(), naming it."""
    with pytest.raises(flexisync.ConfigError, match=message):
        flexisync.connect("redis://localhost:1/0", **options)


def test_good_redis_options_are_accepted() -> None:
    """Known options with sane values pass, and socket_timeout=None means no timeout."""
    flexisync.connect("redis://localhost:1/0", socket_timeout=None,
                      socket_connect_timeout=0.5, client_name="x").close()


def test_retry_policy_rejects_nonsense() -> None:
    """RetryPolicy validates at construction: attempts, durations, maximum >= initial."""
    with pytest.raises(flexisync.ConfigError, match="attempts"):
        flexisync.RetryPolicy(attempts=0)
    with pytest.raises(flexisync.ConfigError, match="deadline"):
        flexisync.RetryPolicy(deadline=float("nan"))
    with pytest.raises(flexisync.ConfigError, match="maximum backoff"):
        flexisync.RetryPolicy(initial=1.0, maximum=0.1)
    with pytest.raises(flexisync.ConfigError, match="at most"):
        flexisync.RetryPolicy(deadline=1e30)
