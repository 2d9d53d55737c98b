"""``redis+sentinel://`` options: auth and TLS for the sentinels vs the data nodes.

No server needed: clients are built, never connected.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import redis.sentinel
from redis.connection import SSLConnection

from flexisync import _sentinel
from flexisync._connection import ConnectionSpec, _DeadlineMixin, parse_url
from flexisync.errors import ConfigError

HOSTS = (("s1", 26379), ("s2", 26380))
DATA_PW = "data-pw"
SENTINEL_PW = "s-secret"


def spec(**options: Any) -> ConnectionSpec:
    return ConnectionSpec(scheme="redis+sentinel", hosts=HOSTS, service="mymaster", db=3,
                          username="app", password=DATA_PW, options=options)


def sentinel_kwargs(client: Any) -> list[dict[str, Any]]:
    master = _sentinel.master_of(client)
    return [s.connection_pool.connection_kwargs for s in master.sentinels]


def sentinel_classes(client: Any) -> list[type]:
    master = _sentinel.master_of(client)
    return [s.connection_pool.connection_class for s in master.sentinels]


def test_defaults_match_a_single_node_client() -> None:
    client = _sentinel.build_client(spec(), {})
    pool = client.connection_pool
    assert isinstance(pool, redis.sentinel.SentinelConnectionPool)
    assert issubclass(pool.connection_class, _DeadlineMixin)
    assert not issubclass(pool.connection_class, SSLConnection)
    kwargs = pool.connection_kwargs
    assert kwargs["db"] == 3
    assert (kwargs["username"], kwargs["password"]) == ("app", "data-pw")
    assert kwargs["socket_timeout"] == 5.0
    assert kwargs["socket_connect_timeout"] == 2.0
    assert kwargs["protocol"] == 2
    assert kwargs["retry"].get_retries() == 0
    assert [(k["host"], k["port"]) for k in sentinel_kwargs(client)] == list(HOSTS)
    assert all(issubclass(c, _DeadlineMixin) for c in sentinel_classes(client))
    assert all(k["retry"].get_retries() == 0 for k in sentinel_kwargs(client))


def test_url_credentials_authenticate_to_the_sentinels_too() -> None:
    """As in the limits library: user:password@ applies to sentinels and data nodes."""
    client = _sentinel.build_client(spec(), {})
    assert all((k["username"], k["password"]) == ("app", "data-pw")
               for k in sentinel_kwargs(client))


def test_sentinel_credentials_override_and_empty_means_none() -> None:
    client = _sentinel.build_client(
        spec(sentinel_username="sentry", sentinel_password=_sentinel.Secret("s-pw")), {})
    assert all((k["username"], k["password"]) == ("sentry", "s-pw")
               for k in sentinel_kwargs(client))
    assert client.connection_pool.connection_kwargs["password"] == DATA_PW
    client = _sentinel.build_client(
        spec(sentinel_username=None, sentinel_password=_sentinel.Secret("")), {})
    assert all((k["username"], k["password"]) == (None, None)
               for k in sentinel_kwargs(client))


def test_tls_for_data_nodes_and_sentinels() -> None:
    client = _sentinel.build_client(spec(ssl=True, ssl_cert_reqs="none"), {})
    assert issubclass(client.connection_pool.connection_class, SSLConnection)
    assert all(issubclass(c, SSLConnection) for c in sentinel_classes(client))
    assert client.connection_pool.connection_kwargs["ssl_cert_reqs"] == "none"
    client = _sentinel.build_client(spec(ssl=True, sentinel_ssl=False), {})
    assert issubclass(client.connection_pool.connection_class, SSLConnection)
    assert not any(issubclass(c, SSLConnection) for c in sentinel_classes(client))
    client = _sentinel.build_client(spec(sentinel_ssl=True), {})
    assert not issubclass(client.connection_pool.connection_class, SSLConnection)
    assert all(issubclass(c, SSLConnection) for c in sentinel_classes(client))


def test_tls_files_without_tls_are_refused() -> None:
    with pytest.raises(ConfigError, match="ssl_ca_certs needs TLS"):
        _sentinel.build_client(spec(ssl_ca_certs="/ca.pem"), {})


@pytest.mark.parametrize("option", ["host", "port", "unix_socket_path"])
def test_server_address_options_are_refused(option: str) -> None:
    with pytest.raises(ConfigError, match=f"'{option}' cannot be used"):
        _sentinel.build_client(spec(), {option: "x"})


def test_redis_options_override_url_defaults() -> None:
    client = _sentinel.build_client(spec(), {"socket_timeout": 1.5, "client_name": "w1"})
    kwargs = client.connection_pool.connection_kwargs
    assert (kwargs["socket_timeout"], kwargs["client_name"]) == (1.5, "w1")


def test_parse_url_options_takes_only_its_own() -> None:
    query = {"ssl": "yes", "sentinel_ssl": "0", "sentinel_username": "",
             "sentinel_password": "pw", "client_name": "x"}
    found = _sentinel.parse_url_options(query)
    assert query == {"client_name": "x"}
    assert found == {"ssl": True, "sentinel_ssl": False, "sentinel_username": None,
                     "sentinel_password": "pw"}
    assert repr(found["sentinel_password"]) == "'***'"
    assert "pw" not in repr(found)


def test_bad_boolean_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="ssl must be true or false"):
        _sentinel.parse_url_options({"ssl": "maybe"})


def test_parse_url_with_sentinel_options_never_shows_a_password() -> None:
    parsed = parse_url("redis+sentinel://app:data-pw@s1:26379,s2/mymaster/2"
                       "?sentinel_password=s-secret&ssl=true&socket_timeout=1")
    assert parsed.options["ssl"] is True
    assert parsed.options["sentinel_password"] == SENTINEL_PW
    assert parsed.options["socket_timeout"] == 1.0
    for text in (repr(parsed), repr(dataclasses.asdict(parsed)), parsed.redacted()):
        assert "s-secret" not in text
    assert "data-pw" not in repr(parsed) + parsed.redacted()
    client = _sentinel.build_client(parsed, {})
    assert all(k["password"] == SENTINEL_PW for k in sentinel_kwargs(client))


def test_parse_url_still_refuses_unknown_options() -> None:
    with pytest.raises(ConfigError, match="unknown URL option 'sentinel_pasword'"):
        parse_url("redis+sentinel://h:26379/mymaster?sentinel_pasword=x")
