"""flexisync.metrics without a server: the catalogue, histograms, bounded names, merging,
and an import that opens nothing."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from flexisync import metrics
from flexisync._core import tally as tally_module
from flexisync._core.tally import BUCKETS, OVERFLOW, Tally, WaitHistogram


class _Ctx:
    """The two hooks a Tally uses."""

    def __init__(self) -> None:
        self.fork_hooks: list[object] = []

    def on_fork(self, hook: object) -> None:
        self.fork_hooks.append(hook)


def test_catalogue_entries_are_well_formed() -> None:
    assert metrics.CATALOGUE
    for name, (kind, text, labels) in metrics.CATALOGUE.items():
        assert name.startswith("flexisync_")
        assert kind in ("counter", "gauge", "histogram")
        assert text
        assert labels[0] == "namespace"
        assert name.endswith("_total") == (kind == "counter"), name
        if kind == "histogram":
            assert name.endswith("_seconds")
    for agreed in ("flexisync_breaker_state", "flexisync_breaker_transitions_total",
                   "flexisync_breaker_calls_total", "flexisync_breaker_open_seconds_total",
                   "flexisync_lock_acquisitions_total", "flexisync_lock_wait_seconds",
                   "flexisync_lock_lost_total", "flexisync_events_published_total",
                   "flexisync_events_delivered_total", "flexisync_events_dropped_total",
                   "flexisync_events_invalid_total", "flexisync_events_gaps_total",
                   "flexisync_stream_appends_total", "flexisync_stream_follower_lag",
                   "flexisync_semaphore_admissions_total",
                   "flexisync_semaphore_wait_seconds",
                   "flexisync_rate_limiter_admissions_total",
                   "flexisync_rate_limiter_wait_seconds"):
        assert agreed in metrics.CATALOGUE
    assert metrics.CATALOGUE["flexisync_breaker_calls_total"][2] == (
        "namespace", "breaker", "outcome")


def test_wait_histogram_is_cumulative_with_an_inf_bucket() -> None:
    hist = WaitHistogram()
    for seconds in (0.0005, 0.001, 0.003, 0.2, 100.0, -1.0, math.nan):
        hist.observe(seconds)
    buckets, total, count = hist.snapshot()
    assert count == 7
    assert total == pytest.approx(0.0005 + 0.001 + 0.003 + 0.2 + 100.0)
    assert [b for b, _ in buckets] == [*BUCKETS, math.inf]
    assert dict(buckets)[0.001] == 4  # 0.0005, 0.001 (le), and the two clamped to 0
    assert dict(buckets)[0.005] == 5
    assert dict(buckets)[0.25] == 6
    assert buckets[-1] == (math.inf, 7)
    counts = [c for _, c in buckets]
    assert counts == sorted(counts)


def test_tally_bounds_the_names_it_keeps(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tally_module, "MAX_NAMES", 3)
    tally = Tally(_Ctx())  # type: ignore[arg-type]
    for i in range(10):
        tally.lock(f"l{i}").acquired(0.01)
    assert len(tally.locks) == 4  # three names and OVERFLOW
    assert tally.locks[OVERFLOW].acquisitions == 7
    assert tally.lock("l0") is tally.locks["l0"]


def test_tally_starts_from_zero_in_a_forked_child() -> None:
    ctx = _Ctx()
    tally = Tally(ctx)  # type: ignore[arg-type]
    tally.stream("s").appends += 3
    for hook in ctx.fork_hooks:
        hook()  # type: ignore[operator]
    assert tally.streams == {}


def test_samples_of_two_contexts_with_one_namespace_merge() -> None:
    out = metrics._Samples()
    base = {"namespace": "n", "breaker": "b"}
    out.add("flexisync_breaker_calls_total", {**base, "outcome": "success"}, 2)
    out.add("flexisync_breaker_calls_total", {**base, "outcome": "success"}, 3)
    out.add("flexisync_breaker_state", {**base, "state": "open"}, 1.0)
    out.add("flexisync_breaker_state", {**base, "state": "open"}, 0.0)
    hist = metrics.Histogram(((1.0, 1), (math.inf, 2)), 1.5, 2)
    out.add("flexisync_lock_wait_seconds", {"namespace": "n", "lock": "l"}, hist)
    out.add("flexisync_lock_wait_seconds", {"namespace": "n", "lock": "l"}, hist)
    found = {(s.name, s.labels.get("outcome", s.labels.get("state"))): s.value
             for s in out.found.values()}
    assert found[("flexisync_breaker_calls_total", "success")] == 5
    assert found[("flexisync_breaker_state", "open")] == 1.0
    assert found[("flexisync_lock_wait_seconds", None)] == metrics.Histogram(
        ((1.0, 2), (math.inf, 4)), 3.0, 4)


def test_importing_metrics_starts_no_thread_and_no_exporter() -> None:
    # (opentelemetry may be imported by redis-py itself when installed: not checked)
    code = ("import sys, threading, flexisync, flexisync.metrics as m; "
            "assert threading.active_count() == 1, threading.enumerate(); "
            "assert not any(k.startswith(('prometheus_client', 'flexisync.exporters')) "
            "for k in sys.modules); "
            "assert m.collect() == []; print('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.stdout.strip() == "ok", done.stderr
