"""Optional exporters of :mod:`flexisync.metrics` to monitoring systems.

Importing this package imports nothing optional: each exporter lives in its own module and
imports its library only when that module is imported.

* :mod:`flexisync.exporters.prometheus` - ``prometheus_client`` (extra ``prometheus``):
  a collector read at scrape time, and under gunicorn's multiprocess mode
  (``PROMETHEUS_MULTIPROC_DIR``) a per-process writer into prometheus_client's files.
* :mod:`flexisync.exporters.otel` - OpenTelemetry metrics (extra ``otel``): observable
  instruments read at collection time, plus a span event when an open breaker rejects a
  call.
"""

from __future__ import annotations

__all__: list[str] = []
