"""The optional exporters (``flexisync.exporters.prometheus`` and ``.otel``) on a real Redis:
what a scrape / an OpenTelemetry collection shows after real breaker calls and locks; the
span event on a rejected call (both shells); the multiprocess writer across a fork; and
that ``import flexisync`` imports neither library."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import flexisync
import flexisync.aio

ROOT = Path(__file__).resolve().parents[2]


class ProviderError(Exception):
    """A failing provider."""


def fail() -> None:
    raise ProviderError("500")


def use_breaker_and_lock(sync: flexisync.Coordinator, breaker: str, lock: str) -> None:
    """3 successes, 1 failure (trips: threshold 1), 2 rejections; 2 lock acquisitions."""
    guarded = sync.breaker(breaker, failure_threshold=1, recovery_timeout=300.0)
    for _ in range(3):
        assert guarded.call(lambda: "ok") == "ok"
    with pytest.raises(ProviderError):
        guarded.call(fail)
    for _ in range(2):
        with pytest.raises(flexisync.CircuitOpenError):
            guarded.call(lambda: "ok")
    for _ in range(2):
        with sync.lock(lock, ttl=10.0, timeout=5.0):
            pass


# --- no optional import ---------------------------------------------------------------------


OPTIONAL = ("prometheus_client", "opentelemetry")
NO_OPTIONAL_IMPORT = textwrap.dedent("""
    import json, sys
    OPTIONAL = ("prometheus_client", "opentelemetry")
    def optional():
        return {m for m in sys.modules if m.split(".")[0] in OPTIONAL}
    if sys.argv[1] == "blocked":  # as if neither library were installed
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in OPTIONAL:
                    raise ImportError(f"{name} is blocked")
                return None
        sys.meta_path.insert(0, Block())
    import redis, redis.asyncio  # redis-py itself may import opentelemetry when installed
    before = optional()
    import flexisync, flexisync.aio, flexisync.exporters, flexisync.metrics
    print(json.dumps(sorted(optional() - before)))
""")


@pytest.mark.parametrize("mode", ["installed", "blocked"])
def test_import_flexisync_imports_no_optional_exporter_library(mode: str) -> None:
    out = subprocess.run([sys.executable, "-c", NO_OPTIONAL_IMPORT, mode], capture_output=True,
                         text=True, check=False, cwd=str(ROOT), timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == []


# --- prometheus: one process ------------------------------------------------------------------


@pytest.fixture
def prom() -> Iterator[Any]:
    prometheus_client = pytest.importorskip("prometheus_client")
    from flexisync.exporters import prometheus

    registry = prometheus_client.CollectorRegistry()
    yield prometheus, registry
    prometheus.close()


def parsed(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    from prometheus_client.parser import text_string_to_metric_families

    found: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return found


def value(samples: dict[str, list[tuple[dict[str, str], float]]], name: str,
          **labels: str) -> float:
    return sum(v for found, v in samples.get(name, [])
               if all(found.get(key) == wanted for key, wanted in labels.items()))


def test_prometheus_collector_reads_the_metrics_at_each_scrape(
        prom: Any, sync: flexisync.Coordinator, namespace: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from prometheus_client import generate_latest

    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    prometheus, registry = prom
    collector = prometheus.register(registry)
    assert isinstance(collector, prometheus.FlexisyncCollector)
    assert prometheus.register(registry) is collector  # idempotent, no duplicate error
    mine = {"namespace": namespace, "breaker": "api"}

    before = parsed(generate_latest(registry).decode())
    assert value(before, "flexisync_breaker_calls_total", **mine) == 0
    use_breaker_and_lock(sync, "api", "job")
    after = parsed(generate_latest(registry).decode())

    calls = "flexisync_breaker_calls_total"
    assert value(after, calls, **mine, outcome="success") == 3
    assert value(after, calls, **mine, outcome="failure") == 1
    assert value(after, calls, **mine, outcome="rejected") == 2
    assert value(after, "flexisync_breaker_transitions_total", **mine, to="open") == 1
    states = {labels["state"]: v for labels, v in after["flexisync_breaker_state"]
              if labels.get("namespace") == namespace and labels.get("breaker") == "api"}
    assert states["open"] == 1
    assert sum(states.values()) == 1
    lock = {"namespace": namespace, "lock": "job"}
    assert value(after, "flexisync_lock_acquisitions_total", **lock) == 2
    assert value(after, "flexisync_lock_wait_seconds_count", **lock) == 2
    assert value(after, "flexisync_lock_wait_seconds_bucket", **lock, le="+Inf") == 2
    # Buckets are cumulative and end with +Inf.
    buckets = [(labels["le"], v) for labels, v in after["flexisync_lock_wait_seconds_bucket"]
               if labels.get("namespace") == namespace]
    assert buckets[-1][0] == "+Inf"
    assert [v for _le, v in buckets] == sorted(v for _le, v in buckets)

    prometheus.close()
    assert value(parsed(generate_latest(registry).decode()), calls, **mine) == 0


def test_prometheus_multiprocess_writer_rejects_bad_configuration(
        prom: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    prometheus, _registry = prom
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    with pytest.raises(flexisync.ConfigError):
        prometheus.enable_multiprocess()
    with pytest.raises(flexisync.ConfigError):
        prometheus.MultiprocessWriter(interval=0)


MULTIPROCESS_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import flexisync
    from flexisync.exporters import prometheus
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    url, namespace = sys.argv[1], sys.argv[2]
    sync = flexisync.connect(url, namespace=namespace)
    breaker = sync.breaker("api", failure_threshold=100)
    writer = prometheus.register(interval=0.05)
    assert writer.running
    threads_before = {t.name for t in __import__("threading").enumerate()}
    for _ in range(5):
        breaker.call(lambda: None)
    writer.flush()
    read_r, write_w = os.pipe()
    child = os.fork()
    if child == 0:  # the child: its own writer thread, counting only its own calls
        try:
            for _ in range(7):
                breaker.call(lambda: None)
            ok = writer.running
            prometheus.close()
            os.write(write_w, b"1" if ok else b"0")
        finally:
            os._exit(0)
    os.waitpid(child, 0)
    child_ok = os.read(read_r, 1) == b"1"
    for _ in range(2):
        breaker.call(lambda: None)
    prometheus.close()
    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    found = {}
    for metric in registry.collect():
        for s in metric.samples:
            if s.labels.get("namespace") == namespace:
                found.setdefault(s.name, []).append([s.labels, s.value])
    print(json.dumps({"child_ok": child_ok, "running_after_close": writer.running,
                      "threads": sorted(threads_before), "samples": found}))
""")


def test_prometheus_multiprocess_writer_counts_each_process_once_across_fork(
        tmp_path: Path, flexisync_url: str, namespace: str) -> None:
    pytest.importorskip("prometheus_client")
    directory = tmp_path / "prom"
    directory.mkdir()
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(directory))
    env.pop("FLEXISYNC_TEST_URL", None)
    out = subprocess.run([sys.executable, "-c", MULTIPROCESS_SCRIPT, flexisync_url, namespace],
                         capture_output=True, text=True, env=env, cwd=str(ROOT), timeout=60,
                         check=False)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["child_ok"] is True, "no writer thread in the forked child"
    assert report["running_after_close"] is False
    assert "flexisync-prometheus" in report["threads"]
    samples = report["samples"]
    calls = [(labels, v) for labels, v in samples["flexisync_breaker_calls_total"]
             if labels["outcome"] == "success"]
    # parent 5 + 2, child 7: each counted by the process that made it, none twice.
    assert sum(v for _labels, v in calls) == 14
    assert all("pid" not in labels for labels, _v in calls)
    states = [(labels, v) for labels, v in samples["flexisync_breaker_state"]
              if labels.get("breaker") == "api"]
    assert len({labels["state"] for labels, _v in states}) == len(states)  # one per state
    assert {labels["state"]: v for labels, v in states}.get("closed") == 1.0


# --- OpenTelemetry -----------------------------------------------------------------------


@pytest.fixture
def otel() -> Iterator[Any]:
    pytest.importorskip("opentelemetry.sdk")
    from flexisync.exporters import otel as exporter

    yield exporter
    exporter.uninstall()


def points(reader: Any, name: str) -> list[Any]:
    data = reader.get_metrics_data()
    found: list[Any] = []
    for resource in data.resource_metrics if data is not None else ():
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name == name:
                    found.extend(metric.data.data_points)
    return found


def otel_value(reader: Any, name: str, **attributes: str) -> float:
    return sum(point.value for point in points(reader, name)
               if all(point.attributes.get(k) == v for k, v in attributes.items()))


def test_otel_observable_instruments_read_the_metrics(
        otel: Any, sync: flexisync.Coordinator, namespace: str) -> None:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    try:
        installed = otel.install(provider)
        assert otel.install(provider) is installed
        use_breaker_and_lock(sync, "api", "job")
        mine = {"namespace": namespace, "breaker": "api"}
        calls = "flexisync_breaker_calls"
        assert otel_value(reader, calls, **mine, outcome="success") == 3
        assert otel_value(reader, calls, **mine, outcome="failure") == 1
        assert otel_value(reader, calls, **mine, outcome="rejected") == 2
        assert otel_value(reader, "flexisync_breaker_state", **mine, state="open") == 1
        assert otel_value(reader, "flexisync_breaker_state", **mine, state="closed") == 0
        lock = {"namespace": namespace, "lock": "job"}
        assert otel_value(reader, "flexisync_lock_acquisitions", **lock) == 2
        assert otel_value(reader, "flexisync_lock_wait_seconds_count", **lock) == 2
        assert otel_value(reader, "flexisync_lock_wait_seconds_bucket", **lock, le="+Inf") == 2
        assert otel_value(reader, "flexisync_lock_wait_seconds_sum", **lock) >= 0
        otel.uninstall()
        assert otel_value(reader, calls, **mine) == 0  # muted
    finally:
        provider.shutdown()


@pytest.fixture
def spans() -> Iterator[Any]:
    pytest.importorskip("opentelemetry.sdk")
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider.get_tracer("test"), exporter
    provider.shutdown()


def rejected_events(exporter: Any, span_name: str) -> list[Any]:
    from flexisync.exporters.otel import REJECTED_EVENT

    return [event for span in exporter.get_finished_spans() if span.name == span_name
            for event in span.events if event.name == REJECTED_EVENT]


def test_otel_span_event_when_an_open_breaker_rejects_a_call(
        otel: Any, spans: Any, sync: flexisync.Coordinator, namespace: str) -> None:
    from opentelemetry.sdk.metrics import MeterProvider

    tracer, exporter = spans
    name = f"api-{uuid.uuid4().hex[:6]}"
    otel.install(MeterProvider())
    guarded = sync.breaker(name, failure_threshold=1, recovery_timeout=300.0)
    with tracer.start_as_current_span("admitted"):
        guarded.call(lambda: "ok")
    with tracer.start_as_current_span("failing"), pytest.raises(ProviderError):
        guarded.call(fail)
    with tracer.start_as_current_span("rejected"), pytest.raises(flexisync.CircuitOpenError):
        guarded.call(lambda: "ok")
    assert rejected_events(exporter, "admitted") == []
    assert rejected_events(exporter, "failing") == []
    [event] = rejected_events(exporter, "rejected")
    assert event.attributes["flexisync.namespace"] == namespace
    assert event.attributes["flexisync.breaker"] == name
    assert 0 < event.attributes["flexisync.retry_after"] <= 300.0

    # Forced open: no retry_after attribute (infinite).
    guarded.force_open()
    with tracer.start_as_current_span("forced"), pytest.raises(flexisync.CircuitOpenError):
        guarded.call(lambda: "ok")
    [forced] = rejected_events(exporter, "forced")
    assert "flexisync.retry_after" not in forced.attributes

    # Uninstalled: no event any more.
    otel.uninstall()
    with tracer.start_as_current_span("after"), pytest.raises(flexisync.CircuitOpenError):
        guarded.call(lambda: "ok")
    assert rejected_events(exporter, "after") == []


async def test_otel_span_event_on_rejection_in_the_async_shell(
        otel: Any, spans: Any, aio: flexisync.aio.AsyncCoordinator, namespace: str) -> None:
    from opentelemetry.sdk.metrics import MeterProvider

    tracer, exporter = spans
    otel.install(MeterProvider())
    guarded = aio.breaker("async-api", failure_threshold=1, recovery_timeout=300.0)
    await guarded.trip(60.0)

    async def provider() -> str:
        return "ok"

    with tracer.start_as_current_span("rejected-async"), \
            pytest.raises(flexisync.CircuitOpenError):
        await guarded.acall(provider)
    [event] = rejected_events(exporter, "rejected-async")
    assert event.attributes["flexisync.breaker"] == "async-api"
    assert event.attributes["flexisync.namespace"] == namespace


def test_prometheus_multiprocess_writer_copies_increments_values_and_observations(
        prom: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The writer's copying rules, on a scripted collect(): counter increments (a counter
    found lower restarts from zero), histogram observations per bucket, gauges (a gone
    series reads 0, except the breaker state: its last view stays for newer ones)."""
    from flexisync import metrics

    prometheus, _registry = prom
    name = f"w{uuid.uuid4().hex[:6]}"
    calls = f"{name}_calls_total"
    wait = f"{name}_wait_seconds"
    state = "flexisync_breaker_state"
    lag = f"{name}_lag"
    monkeypatch.setattr(metrics, "CATALOGUE", {
        calls: ("counter", "calls", ("breaker",)), wait: ("histogram", "waits", ("lock",)),
        lag: ("gauge", "lag", ("stream",)),
        state: ("gauge", "state", ("namespace", "breaker", "state"))})
    script: list[list[metrics.Sample]] = []
    monkeypatch.setattr(metrics, "collect", lambda: script[-1])

    def histogram(counts: tuple[int, int, int], total: float) -> metrics.Histogram:
        return metrics.Histogram(((0.1, counts[0]), (1.0, counts[1]), (math.inf, counts[2])),
                                 total, counts[2])

    def step(n: float, counts: tuple[int, int, int], total: float, current: str | None,
             ) -> None:
        samples = [metrics.Sample(calls, "counter", {"breaker": "b"}, n),
                   metrics.Sample(wait, "histogram", {"lock": "l"}, histogram(counts, total))]
        if current is not None:
            samples.append(metrics.Sample(lag, "gauge", {"stream": "s"}, 7.0))
            samples += [metrics.Sample(state, "gauge",
                                       {"namespace": name, "breaker": "b", "state": s},
                                       1.0 if s == current else 0.0)
                        for s in ("closed", "open")]
        script.append(samples)
        writer.flush()

    def exported() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        found = {}
        for obj in writer._objects.values():
            for family in obj.collect():
                for sample in family.samples:
                    if not sample.name.endswith("_created"):
                        found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return found

    writer = prometheus.MultiprocessWriter(interval=60.0)
    step(3, (1, 2, 2), 0.5, "closed")
    step(5, (1, 3, 4), 2.5, "open")
    step(2, (1, 3, 4), 2.5, None)  # counter restarted (re-created), gauges gone
    out = exported()
    assert out[(calls, (("breaker", "b"),))] == 5 + 2
    assert out[(f"{wait}_count", (("lock", "l"),))] == 4
    assert out[(f"{wait}_sum", (("lock", "l"),))] == 2.5
    assert out[(f"{wait}_bucket", (("le", "0.1"), ("lock", "l")))] == 1
    assert out[(f"{wait}_bucket", (("le", "1.0"), ("lock", "l")))] == 3
    assert out[(f"{wait}_bucket", (("le", "+Inf"), ("lock", "l")))] == 4
    states = {dict(labels)["state"]: v for (sample, labels), v in out.items()
              if sample == state and dict(labels).get("namespace") == name}
    assert states == {"closed": 0.0, "open": 1.0}  # the last view, left for newer ones
    assert out[(lag, (("stream", "s"),))] == 0.0  # gone: 0 from this process
    writer.close()
    assert not writer.running
