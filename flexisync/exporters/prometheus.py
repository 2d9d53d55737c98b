"""Export :mod:`flexisync.metrics` to Prometheus through ``prometheus_client``.

Install the extra: ``pip install 'flexisync[prometheus]'`` (``prometheus_client>=0.17``).
Importing this module imports ``prometheus_client``; ``import flexisync`` never does.

One call, at start-up (any time before or after ``flexisync.connect``)::

    from flexisync.exporters import prometheus
    prometheus.register()

* **One process** (no ``PROMETHEUS_MULTIPROC_DIR``): :func:`register` adds a
  :class:`FlexisyncCollector` to the registry (default: ``prometheus_client.REGISTRY``).
  It reads :func:`flexisync.metrics.collect` at each scrape: nothing runs in between and
  the hot paths pay nothing.
* **Multiprocess mode** (``PROMETHEUS_MULTIPROC_DIR`` set, e.g. gunicorn with
  ``prometheus_client.multiprocess.MultiProcessCollector`` serving ``/metrics``):
  prometheus_client aggregates only its own metric objects' files, never custom
  collectors. :func:`register` then starts (via :func:`enable_multiprocess`) one
  :class:`MultiprocessWriter` per process: a named daemon thread
  (``flexisync-prometheus``) that every ``interval`` seconds (default 1.0) copies the
  counters' increments, the gauges' current values and the histograms' new observations
  into prometheus_client metric objects, whose per-process files the
  ``MultiProcessCollector`` sums. Counters and histograms add up over the workers.
  ``flexisync_breaker_state`` uses ``multiprocess_mode="mostrecent"`` and is written
  only when this process's view of a breaker changes, so a fleet of workers yields ONE
  series per (namespace, breaker, state), holding the most recent view any worker
  had; ``flexisync_events_queued`` and ``flexisync_stream_followers`` use ``"livesum"``
  and the other gauges (follower lag) ``"livemax"`` (the worst live worker): call
  ``prometheus_client.multiprocess.mark_process_dead(worker.pid)`` from gunicorn's
  ``child_exit`` hook, as prometheus_client documents, to drop a dead worker's values.
  The writer is rebuilt in a forked child (gunicorn ``--preload`` forks workers after
  import) and stopped by :func:`close` (which flushes once more); it also flushes at
  interpreter exit. Counts are exported at most ``interval`` seconds late.

Names, labels and help texts are :data:`flexisync.metrics.CATALOGUE`'s; see
docs/observability.md.
"""

from __future__ import annotations

import atexit
import math
import os
import threading
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client import Counter as PromCounter
from prometheus_client import Gauge as PromGauge
from prometheus_client import Histogram as PromHistogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.utils import floatToGoString

from flexisync import metrics
from flexisync._log import get_logger
from flexisync.errors import ConfigError

__all__ = ["FlexisyncCollector", "MultiprocessWriter", "close", "enable_multiprocess",
           "multiprocess_mode", "register"]

#: Gauges whose fleet value is the most recent view of any worker (one series).
MOST_RECENT_GAUGES = frozenset({"flexisync_breaker_state"})
#: Gauges that add up over the live workers (queued events, running followers).
SUMMED_GAUGES = frozenset({"flexisync_events_queued", "flexisync_stream_followers"})
DEFAULT_INTERVAL = 1.0  # seconds between two flushes of the multiprocess writer

_log = get_logger("exporters.prometheus")
_state_lock = threading.Lock()
_collectors: dict[int, tuple[CollectorRegistry, FlexisyncCollector]] = {}
_writer: MultiprocessWriter | None = None


def multiprocess_mode() -> bool:
    """Whether prometheus_client runs in multiprocess mode in this process
    (``PROMETHEUS_MULTIPROC_DIR``, or the deprecated lower-case name, is set)."""
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR")
                or os.environ.get("prometheus_multiproc_dir"))  # noqa: SIM112


def _catalogue_entry(name: str, sample: metrics.Sample) -> tuple[str, str, tuple[str, ...]]:
    """``(kind, help, label names)`` of ``name``: the catalogue's, else the sample's."""
    entry = metrics.CATALOGUE.get(name)
    if entry is not None:
        return entry
    return sample.kind, name, tuple(sample.labels)


def _label_values(names: tuple[str, ...], labels: Mapping[str, str]) -> list[str]:
    return [str(labels.get(label, "")) for label in names]


def _le(bound: float) -> str:
    """A bucket bound as prometheus_client writes it (``0.005``, ``1.0``, ``+Inf``)."""
    return str(floatToGoString(bound))  # type: ignore[no-untyped-call]


def _buckets(histogram: metrics.Histogram) -> list[tuple[str, float]]:
    """Prometheus bucket pairs ``(le, cumulative count)``, ending with ``+Inf``."""
    pairs = [(_le(bound), float(count)) for bound, count in histogram.buckets]
    if not pairs or pairs[-1][0] != "+Inf":
        pairs.append(("+Inf", float(histogram.count)))
    return pairs


class FlexisyncCollector:
    """A prometheus_client collector reading :func:`flexisync.metrics.collect` at each
    scrape (single-process apps). ``describe()`` returns nothing, so registering it
    never collects."""

    def describe(self) -> Iterable[Metric]:
        """Nothing: the metric names depend on what the process uses."""
        return []

    def collect(self) -> Iterator[Metric]:
        """One metric family per name of the catalogue that has samples now."""
        families: dict[str, tuple[Any, tuple[str, ...]]] = {}
        for sample in metrics.collect():
            found = families.get(sample.name)
            if found is None:
                kind, text, names = _catalogue_entry(sample.name, sample)
                if kind == "counter":
                    base = sample.name.removesuffix("_total")
                    family: Any = CounterMetricFamily(base, text, labels=names)
                elif kind == "histogram":
                    family = HistogramMetricFamily(sample.name, text, labels=names)
                else:
                    family = GaugeMetricFamily(sample.name, text, labels=names)
                found = families[sample.name] = (family, names)
            family, names = found
            values = _label_values(names, sample.labels)
            if isinstance(sample.value, metrics.Histogram):
                family.add_metric(values, _buckets(sample.value), sample.value.sum)
            else:
                family.add_metric(values, float(sample.value))
        for family, _names in families.values():
            yield family


class MultiprocessWriter:
    """Copies :func:`flexisync.metrics.collect` into prometheus_client metric objects
    every ``interval`` seconds, from one named daemon thread per process, for
    prometheus_client's multiprocess mode. Use :func:`enable_multiprocess`.

    Counters: the increase since the last flush (a counter found lower than last time,
    e.g. a closed Coordinator's breaker re-created, counts from zero again). Gauges: the
    current value (``flexisync_breaker_state``: only when it changed; other gauges read
    0 once their series is gone). Histograms: the new observations per bucket and their
    sum.
    """

    def __init__(self, interval: float = DEFAULT_INTERVAL) -> None:
        if not (isinstance(interval, (int, float)) and math.isfinite(interval)
                and interval > 0):
            raise ConfigError("interval must be a positive number of seconds")
        self.interval = float(interval)
        self._objects: dict[str, Any] = {}
        self._seen: dict[tuple[str, tuple[str, ...]], Any] = {}
        self._lock = threading.Lock()  # one flush at a time; held across fork()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._running = False

    # --- lifetime -----------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """Whether the flusher thread runs in this process."""
        thread = self._thread
        return thread is not None and thread.is_alive()

    def start(self) -> None:
        """Start the flusher thread (no-op if it runs)."""
        with self._lock:
            self._running = True
            if self._thread is None or not self._thread.is_alive():
                self._start_locked()

    def _start_locked(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(self._stop,),
                                        name="flexisync-prometheus", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 5.0) -> None:
        """Stop the thread (waiting up to ``timeout`` seconds), then flush once more.
        Idempotent."""
        with self._lock:
            self._running = False
            self._stop.set()
            thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        self.flush()

    def _before_fork(self) -> None:
        self._lock.acquire()  # no flush is half done in the child (prometheus' lock)

    def _after_fork_in_parent(self) -> None:
        self._lock.release()

    def _after_fork_in_child(self) -> None:
        """Fresh lock, baseline and thread: a forked child's flexisync counters start
        from zero (its parent's counts are the parent's), and so do prometheus_client's
        files for the child's pid."""
        self._lock = threading.Lock()
        self._seen = {}
        self._thread = None
        if self._running:
            self._start_locked()

    def _loop(self, stop: threading.Event) -> None:
        while not stop.wait(self.interval):
            try:
                self.flush()
            except Exception:
                _log.exception("metrics.export_failed", exporter="prometheus")

    # --- copying ------------------------------------------------------------------------

    def flush(self) -> None:
        """Copy the metrics now (the thread does this every ``interval`` seconds)."""
        with self._lock:
            current: dict[tuple[str, tuple[str, ...]], Any] = {}
            for sample in metrics.collect():
                kind, text, names = _catalogue_entry(sample.name, sample)
                key = (sample.name, tuple(_label_values(names, sample.labels)))
                value = sample.value
                if key in current:  # defensive: two sources of one series
                    value = _merge(current[key], value, kind)
                current[key] = value
                if sample.name not in self._objects:
                    self._objects[sample.name] = _metric_object(sample, kind, text, names)
            for key, value in current.items():
                self._copy(key, value)
            for key, value in self._seen.items():
                # A gauge series that went away (a follower ended) reads 0 from this
                # process; the breaker state is left as last written (other workers'
                # newer views replace it; this process no longer has one).
                if key not in current and key[0] not in MOST_RECENT_GAUGES \
                        and isinstance(self._objects.get(key[0]), PromGauge) and value != 0:
                    self._copy(key, 0.0)
            self._seen = current

    def _copy(self, key: tuple[str, tuple[str, ...]], value: Any) -> None:
        name, labels = key
        target = self._objects[name]
        before = self._seen.get(key)
        child = target.labels(*labels) if labels else target
        if isinstance(target, PromCounter):
            now = float(value)
            delta = now - float(before) if before is not None and now >= before else now
            if delta > 0:
                child.inc(delta)
        elif isinstance(target, PromHistogram):
            if isinstance(value, metrics.Histogram):
                _add_observations(child, before, value)
        elif isinstance(target, PromGauge) and (
                name not in MOST_RECENT_GAUGES or before is None or before != value):
            child.set(float(value))


def _merge(first: Any, second: Any, kind: str) -> Any:
    if kind == "counter":
        return float(first) + float(second)
    if kind == "gauge":
        return max(float(first), float(second))
    if isinstance(first, metrics.Histogram) and isinstance(second, metrics.Histogram) \
            and [b for b, _c in first.buckets] == [b for b, _c in second.buckets]:
        return metrics.Histogram(
            buckets=tuple((bound, count + other) for (bound, count), (_b, other)
                          in zip(first.buckets, second.buckets, strict=True)),
            sum=first.sum + second.sum, count=first.count + second.count)
    return second


def _metric_object(sample: metrics.Sample, kind: str, text: str,
                   names: tuple[str, ...]) -> Any:
    """The prometheus_client object (registered nowhere: multiprocess mode reads files)."""
    if kind == "counter":
        return PromCounter(sample.name, text, names, registry=None)
    if kind == "histogram" and isinstance(sample.value, metrics.Histogram):
        bounds = [bound for bound, _count in sample.value.buckets]
        if not bounds or bounds[-1] != math.inf:
            bounds.append(math.inf)
        return PromHistogram(sample.name, text, names, buckets=bounds, registry=None)
    if sample.name in MOST_RECENT_GAUGES:
        return PromGauge(sample.name, text, names, registry=None,
                         multiprocess_mode="mostrecent")
    if sample.name in SUMMED_GAUGES:
        return PromGauge(sample.name, text, names, registry=None, multiprocess_mode="livesum")
    return PromGauge(sample.name, text, names, registry=None, multiprocess_mode="livemax")


def _add_observations(child: Any, before: metrics.Histogram | None,
                      now: metrics.Histogram) -> None:
    """Add the observations made since ``before`` to a prometheus_client histogram child.

    prometheus_client has no public way to add pre-bucketed observations: this uses the
    per-bucket values (``_buckets``) and ``_sum`` its ``observe`` itself increments.
    """
    if before is not None and (now.count < before.count
                               or len(before.buckets) != len(now.buckets)):
        before = None  # reset: count from zero
    buckets = child._buckets
    previous = 0
    previous_before = 0
    for index, (_bound, cumulative) in enumerate(now.buckets):
        if index >= len(buckets):
            break
        own = cumulative - previous
        previous = cumulative
        own_before = 0
        if before is not None:
            cumulative_before = before.buckets[index][1]
            own_before = cumulative_before - previous_before
            previous_before = cumulative_before
        if own > own_before:
            buckets[index].inc(own - own_before)
    added = now.sum - (before.sum if before is not None else 0.0)
    if added > 0:
        child._sum.inc(added)


# --- the module's API ---------------------------------------------------------------------


def register(registry: CollectorRegistry | None = None, *,
             interval: float = DEFAULT_INTERVAL) -> FlexisyncCollector | MultiprocessWriter:
    """Export flexisync's metrics to Prometheus; idempotent.

    Without ``PROMETHEUS_MULTIPROC_DIR``: registers (once per registry) a
    :class:`FlexisyncCollector` on ``registry`` (default ``prometheus_client.REGISTRY``)
    and returns it. With it: ``registry`` is not used (serve
    ``MultiProcessCollector``), and this returns :func:`enable_multiprocess`'s writer.

    Raises:
        ConfigError: ``interval`` is not a positive number of seconds.
    """
    if multiprocess_mode():
        return enable_multiprocess(interval)
    target = REGISTRY if registry is None else registry
    with _state_lock:
        found = _collectors.get(id(target))
        if found is not None:
            return found[1]
        collector = FlexisyncCollector()
        target.register(collector)
        _collectors[id(target)] = (target, collector)
        return collector


def enable_multiprocess(interval: float = DEFAULT_INTERVAL) -> MultiprocessWriter:
    """Start (once per process; again in a forked child) the multiprocess writer and
    return it. Needs ``PROMETHEUS_MULTIPROC_DIR`` set before prometheus_client was
    imported (prometheus_client decides its storage at import).

    Raises:
        ConfigError: ``PROMETHEUS_MULTIPROC_DIR`` is not set, or a bad ``interval``.
    """
    global _writer
    if not multiprocess_mode():
        raise ConfigError("PROMETHEUS_MULTIPROC_DIR is not set: use register() instead")
    with _state_lock:
        writer = _writer
        if writer is None:
            writer = _writer = MultiprocessWriter(interval)
            if hasattr(os, "register_at_fork"):
                os.register_at_fork(before=writer._before_fork,
                                    after_in_parent=writer._after_fork_in_parent,
                                    after_in_child=writer._after_fork_in_child)
            atexit.register(writer.close)
            _log.debug("metrics.exporter_started", exporter="prometheus",
                       mode="multiprocess", interval=writer.interval)
    writer.start()
    return writer


def close() -> None:
    """Stop the multiprocess writer (after a last flush) and unregister the collectors
    :func:`register` added. Idempotent; :func:`register` works again afterwards."""
    with _state_lock:
        found = list(_collectors.values())
        _collectors.clear()
        writer = _writer
    for registry, collector in found:
        registry.unregister(collector)
    if writer is not None:
        writer.close()
