"""MasterAddress: which news about the master is adopted, which is stale (no server)."""

from __future__ import annotations

from structlog.testing import capture_logs

from flexisync._sentinel import MasterAddress

A, B, C = ("10.0.0.1", 6379), ("10.0.0.2", 6379), ("10.0.0.3", 6379)


def master_at(address: tuple[str, int], epoch: int, service: str = "svc") -> MasterAddress:
    master = MasterAddress(service, [])
    assert not master.update(address, epoch, via="query")  # the first look-up: no switch
    return master


def test_announcement_switches_and_runs_callbacks_once() -> None:
    master = master_at(A, 3, service="svc-logged")  # the log is once per process
    calls: list[int] = []
    master.on_switch(lambda: calls.append(1))
    with capture_logs() as logs:
        assert master.update(B, None, via="announcement", replaces=A)
        assert not master.update(B, None, via="announcement", replaces=A)  # an echo
    assert master.address == B
    assert master.switches == 1
    assert calls == [1]
    assert [e["event"] for e in logs] == ["sentinel.switch_master"]
    assert (logs[0]["old"], logs[0]["new"]) == ("10.0.0.1:6379", "10.0.0.2:6379")


def test_a_lagging_sentinel_cannot_switch_back() -> None:
    master = master_at(A, 3)
    assert master.update(B, None, via="announcement", replaces=A)
    assert not master.update(A, 3, via="query")  # has not heard of the failover yet
    assert master.address == B
    assert not master.update(B, 4, via="query")  # the real epoch: adopted, no switch
    assert master.epoch == 4


def test_late_echo_of_an_earlier_failover_is_ignored() -> None:
    master = master_at(A, 3)
    assert master.update(B, None, via="announcement", replaces=A)
    assert master.update(C, None, via="announcement", replaces=B)
    assert not master.update(B, None, via="announcement", replaces=A)
    assert master.address == C


def test_a_newer_epoch_from_a_recheck_is_a_switch() -> None:
    master = master_at(A, 3)
    assert master.update(C, 5, via="query")  # a switch the announcements missed
    assert master.address == C
    assert not master.update(A, 4, via="query")


def test_current_is_none_until_confirmed() -> None:
    master = master_at(A, 1)
    assert master.current() is None
    master.confirmed = True
    assert master.current() == A
    assert master.resolve() == A  # confirmed: no sentinel asked (there are none)
