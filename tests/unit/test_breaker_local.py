"""The per-process fallback breaker used while Redis is unreachable (no server needed)."""

from __future__ import annotations

import math
import time

import pytest

from flexisync.breaker import BreakerPolicy
from flexisync.breaker._local import LocalBreaker
from flexisync.errors import CircuitOpenError
from tests.helpers import wait_until


def test_consecutive_failures_open_and_a_success_resets() -> None:
    """Same rule as the shared breaker: threshold failures in a row open it."""
    local = LocalBreaker("p", BreakerPolicy(failure_threshold=2))
    local.record(False, "fail", None)
    local.record(False, "ok", None)
    local.record(False, "fail", None)
    assert local.state == "closed"
    local.record(False, "fail", None)
    assert local.state == "open"
    with pytest.raises(CircuitOpenError):
        local.admit()


def test_failure_rate_window_needs_minimum_calls() -> None:
    """Rate mode opens only with minimum_calls in the window and the ratio reached."""
    local = LocalBreaker("p", BreakerPolicy(failure_rate=0.5, minimum_calls=4))
    for outcome in ("ok", "fail", "ok"):
        local.record(False, outcome, None)
    assert local.state == "closed"
    local.record(False, "fail", None)
    assert local.state == "open"


def test_probe_budget_doubling_and_close() -> None:
    """Half-open admits half_open_max_calls probes; a failed probe doubles the period,
    success_threshold good probes close."""
    local = LocalBreaker("p", BreakerPolicy(failure_threshold=1, recovery_timeout=0.05,
                                            max_recovery_timeout=0.5, half_open_max_calls=1,
                                            success_threshold=1))
    local.record(False, "fail", None)
    wait_until(lambda: local.remaining() == 0, timeout=5)
    assert local.admit() is True
    with pytest.raises(CircuitOpenError):
        local.admit()  # the one probe slot is taken
    local.record(True, "fail", None)
    assert local.state == "open"
    assert 0.05 < local.open_until - time.monotonic() <= 0.1
    wait_until(lambda: local.remaining() == 0, timeout=5)
    assert local.admit() is True
    local.record(True, "ok", None)
    assert local.state == "closed"
    assert local.admit() is False


def test_retry_after_opens_and_never_shortens() -> None:
    """A failure with a retry-after opens for that long; a shorter one keeps the longer."""
    local = LocalBreaker("p", BreakerPolicy())
    local.record(False, "fail", 10.0)
    local.record(False, "fail", 1.0)
    assert 9 < local.remaining() <= 10


def test_seed_starts_from_the_mirrored_state() -> None:
    """Seeding carries an open deadline and manual overrides into the fallback."""
    local = LocalBreaker("p", BreakerPolicy(failure_threshold=1))
    local.seed("open", time.monotonic() + 10)
    with pytest.raises(CircuitOpenError) as info:
        local.admit()
    assert 9 < info.value.retry_after <= 10
    local.seed("forced_open", 0.0)
    with pytest.raises(CircuitOpenError) as info:
        local.admit()
    assert info.value.retry_after == math.inf
    local.seed("disabled", 0.0)
    local.record(False, "fail", 30.0)
    assert local.admit() is False
    assert local.state == "disabled"


def test_a_failed_probe_with_retry_after_reopens_for_exactly_that_long() -> None:
    """The fallback follows the shared rule: a failed probe carrying a retry-after
    reopens for it (not for the doubled period, nor the longer of the two); one without
    doubles the backoff period, which the retry-after did not change."""
    local = LocalBreaker("p", BreakerPolicy(failure_threshold=1, recovery_timeout=5,
                                            max_recovery_timeout=60))
    local.seed("open", time.monotonic())  # the open period is over: a probe is due
    assert local.admit() is True
    local.record(True, "fail", 0.05)
    assert local.state == "open"
    assert 0 < local.remaining() <= 0.05  # not 10 (doubled)
    wait_until(lambda: local.remaining() == 0, timeout=5)
    assert local.admit() is True
    local.record(True, "fail", None)
    assert 9 < local.remaining() <= 10  # 5 doubled
