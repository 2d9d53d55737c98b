"""Export :mod:`flexisync.metrics` through OpenTelemetry, and mark rejected calls on spans.

Install the extra: ``pip install 'flexisync[otel]'`` (``opentelemetry-api>=1.20``; an SDK
and an exporter are the application's choice). Importing this module imports
``opentelemetry``; ``import flexisync`` never does.

One call, at start-up, after the application configured its MeterProvider::

    from flexisync.exporters import otel
    otel.install()                  # or install(meter_provider=provider)

* Metrics: one observable instrument per name of :data:`flexisync.metrics.CATALOGUE`,
  on the meter ``"flexisync"``. Their callbacks read :func:`flexisync.metrics.collect`
  when the SDK collects (each export interval): no cost on any hot path, no thread.
  Counters are observable counters named without the ``_total`` suffix (the
  OpenTelemetry-to-Prometheus conversion adds it back), gauges observable gauges with
  the catalogue's name. The API cannot take pre-bucketed histograms, so each wait
  histogram ``X`` is three observable counters: ``X_count`` (observations), ``X_sum``
  (seconds) and ``X_bucket`` (cumulative count per ``le`` attribute, Prometheus-style).
  Attributes are the catalogue's labels (``namespace``, ``breaker``, ``state``...);
  unit ``s`` for names with ``seconds``.
* Traces: when an open (or forced-open, or half-open and busy) breaker rejects a call,
  the span current in that thread or task gets the event ``flexisync.breaker.rejected``
  with attributes ``flexisync.namespace``, ``flexisync.breaker`` and
  ``flexisync.retry_after`` (seconds; absent when the breaker is forced open). Nothing is
  recorded when no span is recording. The hook runs on the rejection path only
  (:data:`flexisync.metrics.on_reject`), never on an admitted call.

:func:`install` is idempotent per MeterProvider; :func:`uninstall` mutes the callbacks
(OpenTelemetry cannot remove instruments) and removes the span hook.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable
from typing import Any

from opentelemetry import metrics as otel_metrics
from opentelemetry import trace
from opentelemetry.metrics import CallbackOptions, MeterProvider, Observation

from flexisync import metrics

__all__ = ["REJECTED_EVENT", "Installation", "install", "uninstall"]

#: The span event added when an open breaker rejects a call.
REJECTED_EVENT = "flexisync.breaker.rejected"

_lock = threading.Lock()
_installations: dict[int, Installation] = {}


def _version() -> str:
    try:
        from importlib.metadata import version  # noqa: PLC0415

        return version("flexisync")
    except Exception:
        return "unknown"


def _unit(name: str) -> str:
    return "s" if "seconds" in name else ""


def _attributes(sample: metrics.Sample) -> dict[str, str]:
    return {str(key): str(value) for key, value in sample.labels.items()}


class Installation:
    """The instruments :func:`install` created on one MeterProvider."""

    def __init__(self, provider: MeterProvider) -> None:
        self.provider = provider
        self.active = True
        self.meter = provider.get_meter("flexisync", _version())
        self.instruments: list[Any] = []
        for name, (kind, text, _labels) in metrics.CATALOGUE.items():
            self._instrument(name, kind, text)

    def _instrument(self, name: str, kind: str, text: str) -> None:
        meter = self.meter
        if kind == "counter":
            self.instruments.append(meter.create_observable_counter(
                name.removesuffix("_total"), [self._counter(name)], _unit(name), text))
        elif kind == "gauge":
            self.instruments.append(meter.create_observable_gauge(
                name, [self._gauge(name)], _unit(name), text))
        elif kind == "histogram":
            for part in ("count", "sum", "bucket"):
                unit = "s" if part == "sum" else ""
                self.instruments.append(meter.create_observable_counter(
                    f"{name}_{part}", [self._histogram(name, part)], unit,
                    f"{text} ({part})"))

    def _samples(self, name: str) -> Iterable[metrics.Sample]:
        if not self.active:
            return []
        return [sample for sample in metrics.collect() if sample.name == name]

    def _counter(self, name: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def observe(_options: CallbackOptions) -> Iterable[Observation]:
            return [Observation(float(sample.value), _attributes(sample))
                    for sample in self._samples(name)
                    if not isinstance(sample.value, metrics.Histogram)]
        return observe

    _gauge = _counter

    def _histogram(self, name: str, part: str,
                   ) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def observe(_options: CallbackOptions) -> Iterable[Observation]:
            found: list[Observation] = []
            for sample in self._samples(name):
                value = sample.value
                if not isinstance(value, metrics.Histogram):
                    continue
                attributes = _attributes(sample)
                if part == "count":
                    found.append(Observation(value.count, attributes))
                elif part == "sum":
                    found.append(Observation(value.sum, attributes))
                else:
                    for bound, count in value.buckets:
                        le = "+Inf" if math.isinf(bound) else repr(float(bound))
                        found.append(Observation(count, {**attributes, "le": le}))
            return found
        return observe


def _on_reject(namespace: str, breaker: str, retry_after: float) -> None:
    """Add :data:`REJECTED_EVENT` to the current span (a no-op when none records)."""
    span = trace.get_current_span()
    if not span.is_recording():
        return
    attributes: dict[str, str | float] = {"flexisync.namespace": namespace,
                                          "flexisync.breaker": breaker}
    if math.isfinite(retry_after):
        attributes["flexisync.retry_after"] = float(retry_after)
    span.add_event(REJECTED_EVENT, attributes)


def install(meter_provider: MeterProvider | None = None, *,
            span_events: bool = True) -> Installation:
    """Create flexisync's observable instruments on ``meter_provider`` (default: the
    global one, ``opentelemetry.metrics.get_meter_provider()``) and, with
    ``span_events``, add the rejection span event hook. Idempotent per provider.

    Call it after the application set its MeterProvider: instruments made on the
    global API's default proxy provider follow it once one is set.
    """
    provider = meter_provider if meter_provider is not None \
        else otel_metrics.get_meter_provider()
    with _lock:
        found = _installations.get(id(provider))
        if found is None or found.provider is not provider:
            found = _installations[id(provider)] = Installation(provider)
        found.active = True
        if span_events and _on_reject not in metrics.on_reject:
            metrics.on_reject.append(_on_reject)
        return found


def uninstall() -> None:
    """Mute every installation's callbacks and remove the span event hook. Idempotent;
    :func:`install` works again afterwards."""
    with _lock:
        for installation in _installations.values():
            installation.active = False
        while _on_reject in metrics.on_reject:
            metrics.on_reject.remove(_on_reject)
