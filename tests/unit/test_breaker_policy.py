"""Breaker configuration is validated at construction, before any I/O."""

from __future__ import annotations

import math
from datetime import timedelta
from typing import Any

import pytest

import flexisync
from flexisync.breaker import BreakerPolicy, provider_retry_after, retry_after_attribute


@pytest.fixture
def offline() -> Any:
    """A Coordinator pointing at a port nothing listens on: any I/O would fail."""
    with flexisync.connect("redis://127.0.0.1:1/0") as coordinator:
        yield coordinator


@pytest.mark.parametrize(("options", "needle"), [
    ({"failure_threshold": 0}, "failure_threshold"),
    ({"failure_threshold": -3}, "failure_threshold"),
    ({"failure_threshold": 2.5}, "failure_threshold"),
    ({"failure_rate": 0}, "failure_rate"),
    ({"failure_rate": 1.5}, "failure_rate"),
    ({"failure_rate": -0.1}, "failure_rate"),
    ({"minimum_calls": 0}, "minimum_calls"),
    ({"window": 0}, "window"),
    ({"window": -1}, "window"),
    ({"slow_call_duration": -0.5}, "slow_call_duration"),
    ({"recovery_timeout": 0}, "recovery_timeout"),
    ({"recovery_timeout": -1.0}, "recovery_timeout"),
    ({"recovery_timeout": math.nan}, "recovery_timeout"),
    ({"max_recovery_timeout": -1}, "max_recovery_timeout"),
    ({"recovery_timeout": 10, "max_recovery_timeout": 5}, "max_recovery_timeout"),
    ({"half_open_max_calls": 0}, "half_open_max_calls"),
    ({"success_threshold": 0}, "success_threshold"),
    ({"failure_on": (ValueError, "nope")}, "failure_on"),
    ({"ignore": int}, "ignore"),
    ({"on_backend_error": "explode"}, "on_backend_error"),
    ({"probe_lease": 0}, "probe_lease"),
    ({"refresh_interval": -1}, "refresh_interval"),
    ({"retry_after_of": 42}, "retry_after_of"),
    ({"outcome_of": 42}, "outcome_of"),
    ({"failure_treshold": 3}, "failure_treshold"),
])
def test_bad_configuration_raises_value_error_naming_the_option(
        offline: flexisync.Coordinator, options: dict[str, Any], needle: str) -> None:
    """Out-of-range values and unknown options raise ConfigError (a ValueError), no I/O."""
    with pytest.raises(ValueError, match=needle) as info:
        offline.breaker("provider", **options)
    assert isinstance(info.value, flexisync.ConfigError)


def test_bad_breaker_name_is_rejected(offline: flexisync.Coordinator) -> None:
    """A name outside the name rule raises ConfigError."""
    with pytest.raises(flexisync.ConfigError, match="breaker name"):
        offline.breaker("has space")


def test_policy_normalizes_durations_and_exception_classes() -> None:
    """timedelta becomes float seconds; a single class becomes a tuple; the policy is frozen."""
    policy = BreakerPolicy(recovery_timeout=timedelta(seconds=2), failure_on=TimeoutError,
                           window=5)
    assert policy.recovery_timeout == 2.0
    assert isinstance(policy.window, float)
    assert policy.failure_on == (TimeoutError,)
    with pytest.raises(AttributeError):
        policy.window = 3.0  # type: ignore[misc]


def test_policy_object_and_options_are_exclusive(offline: flexisync.Coordinator) -> None:
    """policy= and keyword options together are ambiguous and rejected."""
    with pytest.raises(flexisync.ConfigError, match="not both"):
        flexisync.CircuitBreaker(offline, "provider", policy=BreakerPolicy(),
                                 failure_threshold=2)


def test_constructing_a_breaker_does_no_io(offline: flexisync.Coordinator) -> None:
    """A breaker is built (and its stats read) with Redis unreachable and no thread started."""
    breaker = offline.breaker("provider", failure_threshold=2)
    stats = breaker.stats()
    assert stats.state == "closed"
    assert stats.version == -1


@pytest.mark.parametrize(("value", "expected"), [
    (3, 3.0), (0.5, 0.5), (timedelta(seconds=4), 4.0),
    (0, None), (-1, None), (math.inf, None), ("12", None), (True, None), (None, None),
])
def test_retry_after_attribute_reads_only_positive_finite_seconds(
        value: object, expected: float | None) -> None:
    """retry_after_attribute (the default retry_after_of before provider_retry_after)
    accepts positive finite seconds and ignores the rest."""
    exc = RuntimeError("429")
    exc.retry_after = value  # type: ignore[attr-defined]
    assert retry_after_attribute(exc) == expected


@pytest.mark.parametrize(("value", "expected"), [
    (3, 3.0), (0.5, 0.5), (timedelta(seconds=4), 4.0), ("12", 12.0),
    (0, None), (-1, None), (math.inf, None), ("soon", None), (True, None), (None, None),
])
def test_the_default_retry_after_of_reads_the_attribute_first(
        value: object, expected: float | None) -> None:
    """provider_retry_after (the default) reads ``exc.retry_after`` like
    retry_after_attribute, numeric strings included."""
    exc = RuntimeError("429")
    exc.retry_after = value  # type: ignore[attr-defined]
    assert BreakerPolicy().retry_after_of is provider_retry_after
    assert provider_retry_after(exc) == expected


def test_circuit_open_error_carries_name_and_retry_after() -> None:
    """CircuitOpenError exposes name and retry_after as attributes."""
    exc = flexisync.CircuitOpenError("openai", 1.5)
    assert (exc.name, exc.retry_after) == ("openai", 1.5)
    assert "openai" in str(exc)


@pytest.mark.parametrize(("option", "value"), [
    ("recovery_timeout", 1e30),
    ("max_recovery_timeout", 1e14),
    ("window", 10 * 365 * 86400.0 + 1),
    ("slow_call_duration", 1e300),
    ("probe_lease", timedelta(days=10 * 366)),
    ("refresh_interval", 1e18),
    ("failure_threshold", 10**12),
    ("minimum_calls", 10**30),
    ("half_open_max_calls", 2**63),
    ("success_threshold", 10**10),
])
def test_every_duration_and_count_is_bounded_at_construction(
        offline: flexisync.Coordinator, option: str, value: Any) -> None:
    """A value beyond the bound (10 years for durations, 10**9 for counts) raises
    ConfigError naming the argument and the bound, before any I/O: nothing can
    publish a number another process cannot parse."""
    with pytest.raises(flexisync.ConfigError, match=option) as info:
        offline.breaker("provider", **{option: value})
    assert "10 years" in str(info.value) or "1_000_000_000" in str(info.value)


def test_trip_beyond_the_bound_raises_before_any_io(offline: flexisync.Coordinator) -> None:
    """trip(retry_after=1e14) raises ConfigError naming retry_after and the bound; the
    breaker does not fall back to its local mode."""
    breaker = offline.breaker("provider")
    for bad in (1e14, math.inf, -1, math.nan, timedelta(days=10 * 366)):
        with pytest.raises(flexisync.ConfigError, match="retry_after"):
            breaker.trip(retry_after=bad)
    assert breaker.stats().backend_available

