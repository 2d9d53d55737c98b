"""Measurement helpers shared by the benchmark scripts (not part of the package)."""

from __future__ import annotations

import time
from collections.abc import Callable


def per_op_us(fn: Callable[[], object], n: int) -> float:
    """Mean µs per call of ``fn`` over ``n`` calls."""
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n * 1e6


def pct(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values``, nearest-rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def quiet_logs() -> None:
    """Drop flexisync's structured log lines below ERROR: a benchmark prints its table."""
    import logging

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))


def print_checks(checks: dict[str, bool]) -> None:
    """Print each target as ``- met: ...`` or ``- MISSED: ...``."""
    print()
    for what, ok in checks.items():
        print(f"- {'met' if ok else 'MISSED'}: {what}")
