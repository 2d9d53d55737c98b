"""Name, namespace and duration validation happen before any I/O."""

from __future__ import annotations

import math
from datetime import timedelta

import pytest

import flexisync
from flexisync._durations import seconds
from flexisync._keys import KeySpace, validate_name, validate_pattern


@pytest.mark.parametrize("name", ["a", "openai", "gpt-4o.mini", "a:b/c@d_e", "x" * 200])
def test_valid_names_pass(name: str) -> None:
    """Letters, digits and ._-:/@ up to 200 characters are accepted unchanged."""
    assert validate_name(name) == name


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("", "must not be empty"),
        ("x" * 201, "201 characters long"),
        ("has space", "may contain only"),
        ("brace{tag}", "may contain only"),
        ("star*", "may contain only"),
        ("nul\x00", "may contain only"),
        ("ünicode", "may contain only"),
        (12, "must be a str"),
        (None, "must be a str"),
    ],
)
def test_invalid_names_raise_config_error(name: object, message: str) -> None:
    """Every rule violation is a ConfigError that explains itself."""
    with pytest.raises(flexisync.ConfigError, match=message):
        validate_name(name, "lock name")


def test_patterns_allow_glob_characters_only_there() -> None:
    """validate_pattern accepts * ? [ ] which names refuse."""
    assert validate_pattern("providers.*") == "providers.*"
    assert validate_pattern("p[ab]?") == "p[ab]?"
    with pytest.raises(flexisync.ConfigError):
        validate_pattern("bad pattern")


def test_bad_namespace_is_rejected_by_connect() -> None:
    """connect() validates the namespace like any name."""
    with pytest.raises(flexisync.ConfigError, match="namespace"):
        flexisync.connect("memory://", namespace="no spaces")


def test_keys_share_a_cluster_hash_tag_per_object() -> None:
    """All keys of one object carry the same {name} hash tag."""
    keys = KeySpace("app")
    assert keys.key("lock", "job") == "app:lock:{job}"
    assert keys.key("lock", "job", "fence") == "app:lock:{job}:fence"
    assert keys.prefix("state", "s") == "app:state:{s}:"


@pytest.mark.parametrize(
    ("value", "expected"),
    [(1, 1.0), (0.25, 0.25), (timedelta(milliseconds=1500), 1.5)],
)
def test_durations_become_float_seconds(value: object, expected: float) -> None:
    """int, float and timedelta convert to float seconds."""
    result = seconds(value, "ttl")
    assert result == expected
    assert isinstance(result, float)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (0, "ttl must be > 0"),
        (-1, "ttl must be > 0"),
        (math.nan, "NaN"),
        (math.inf, "finite"),
        ("10", "must be seconds"),
        (True, "must be seconds"),
    ],
)
def test_bad_durations_raise_config_error(value: object, message: str) -> None:
    """Zero, negative, NaN, infinite and non-numeric durations are refused."""
    with pytest.raises(flexisync.ConfigError, match=message):
        seconds(value, "ttl")
