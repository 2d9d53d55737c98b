"""What a CircuitBreaker costs over time, and who reports its transitions.

* Steady-state cost does not grow with the names ever used: breakers nobody holds are
  released with their subscriptions, and reading (``list_breakers``, ``breaker_info``)
  creates nothing.
* Only the process that made a transition logs it at its level (``breaker.opened`` is a
  warning); every other process mirrors it quietly (``breaker.mirrored`` at debug).
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from typing import Any

import pytest
from structlog.testing import capture_logs

import flexisync
from flexisync.breaker import breaker_info, list_breakers
from flexisync.breaker._hub import RECENT, hub_of
from tests.helpers import wait_until


@pytest.fixture
def peer(sync: flexisync.Coordinator, flexisync_url: str) -> Iterator[flexisync.Coordinator]:
    """A second Coordinator on the same namespace: another 'process' of the fleet (its
    own client name, so it does not share the test's Context, mirrors and hub)."""
    with flexisync.connect(flexisync_url, namespace=sync.namespace,
                           client_name="breaker-peer") as coordinator:
        yield coordinator


def test_breakers_nobody_holds_are_released(sync: flexisync.Coordinator) -> None:
    """10,000 breakers asked for and dropped, and 300 more used (subscribed, mirrored)
    and dropped, leave the hub's tables and the listener's subscriptions bounded by the
    small keep-alive of recently asked-for breakers (they used to keep all 10,300)."""
    hub = hub_of(sync)
    listener = sync._ctx.listener
    for i in range(10_000):
        sync.breaker(f"dropped-{i}")
    states = {sync.breaker(f"used-{i}").state for i in range(300)}
    assert states == {"closed"}
    gc.collect()
    assert len(hub.instances) <= RECENT
    assert len(hub._breakers) <= RECENT
    wait_until(lambda: len(listener._handlers) <= RECENT, timeout=20,
               message="subscriptions of released breakers closed")
    kept = sync.breaker("used-299")  # recently asked for: the same live object
    assert kept.stats().version >= 0
    assert kept is sync.breaker("used-299")


def test_a_breaker_with_callbacks_stays_alive(sync: flexisync.Coordinator,
                                              peer: flexisync.Coordinator) -> None:
    """A breaker dropped after ``on_state_change`` keeps calling back (it is held by
    its Coordinator), even after many other names were asked for."""
    seen: list[str] = []
    sync.breaker("watched").on_state_change(lambda _n, _o, new: seen.append(new))
    for i in range(RECENT * 2):
        sync.breaker(f"other-{i}")
    gc.collect()
    peer.breaker("watched").trip(30)
    wait_until(lambda: seen == ["open"], message="callback of a dropped breaker")


def test_reading_breakers_creates_nothing(sync: flexisync.Coordinator,
                                          peer: flexisync.Coordinator) -> None:
    """``list_breakers`` and ``breaker_info`` read Redis only: no CircuitBreaker object,
    no subscription, no mirror in the reading process."""
    peer.breaker("alpha").trip(30)
    peer.breaker("beta").force_open()
    hub = hub_of(sync)
    infos = list_breakers(sync)
    assert [(i.name, i.state) for i in infos] == [("alpha", "open"), ("beta", "forced_open")]
    assert breaker_info(sync, "alpha").trips == 1
    assert breaker_info(sync, "never-used").state == "closed"
    assert len(hub.instances) == 0
    listener = sync._ctx.listener_if_started
    assert listener is None or not listener._handlers


def _transition_warnings(logs: list[dict[str, Any]], event: str) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == event and e["log_level"] == "warning"]


def test_only_the_process_that_made_a_transition_warns(
        sync: flexisync.Coordinator, peer: flexisync.Coordinator,
        flexisync_url: str) -> None:
    """One trip logs one ``breaker.opened`` warning in the fleet, from the process
    whose script opened it; the mirrors (and a process that starts while it is open)
    log ``breaker.mirrored`` at debug. It used to be one warning per process."""
    mine = sync.breaker("provider", failure_threshold=1)
    theirs = peer.breaker("provider")
    assert mine.state == "closed"
    assert theirs.state == "closed"
    with capture_logs() as logs:
        with pytest.raises(RuntimeError):
            mine.call(_fail)
        wait_until(lambda: theirs.stats().state == "open", message="trip mirrored")
        with flexisync.connect(flexisync_url, namespace=sync.namespace) as late:
            assert late.breaker("provider").state == "open"
        theirs.force_open()
        wait_until(lambda: mine.stats().state == "forced_open", message="force mirrored")
    opened = _transition_warnings(logs, "breaker.opened")
    assert len(opened) == 1, opened
    assert opened[0]["old"] == "closed"
    assert len(_transition_warnings(logs, "breaker.forced_open")) == 1
    mirrored = [e for e in logs if e["event"] == "breaker.mirrored"]
    assert mirrored
    assert all(e["log_level"] == "debug" for e in mirrored)


def _fail() -> None:
    raise RuntimeError("provider down")
