"""The Prometheus exporter under a real gunicorn (4 sync workers) in prometheus_client's
multiprocess mode: ``/metrics`` (MultiProcessCollector, served by whichever worker
answers) adds up what every worker did, and the breaker state gauge is one series per
state for the whole fleet.

The app is ``tests/servers/metrics_wsgi_app.py``; it calls
``flexisync.exporters.prometheus.register()`` at import (in the master with
``--preload``: the writer thread is then rebuilt in each forked worker).
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import wait_until
from tests.servers.conftest import (
    BIN,
    WORKERS,
    Server,
    free_port,
    gunicorn_command,
    reach_every_worker,
    server_env,
)

prometheus_client = pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

pytestmark = pytest.mark.slow

SERVERS = Path(__file__).resolve().parents[1] / "servers"
OUTCOME = {"ok": "success", "failed": "failure", "rejected": "rejected"}


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    """Servers started by the test; all stopped after it."""
    started: list[Server] = []
    yield started
    for server in started:
        server.stop()


def start_metrics_app(servers: list[Server], tmp_path: Path, url: str, namespace: str,
                      breaker: str, *, preload: bool) -> Server:
    if not (BIN / "gunicorn").exists():
        pytest.skip("gunicorn is not installed: pip install 'flexisync[servers]'")
    multiproc = tmp_path / "prometheus"
    multiproc.mkdir()
    env = server_env(url, namespace)
    env.update(PROMETHEUS_MULTIPROC_DIR=str(multiproc), METRICS_BREAKER=breaker,
               METRICS_FLUSH_INTERVAL="0.2")
    port = free_port()
    command = gunicorn_command(port, preload=preload, app="metrics_wsgi_app:application",
                               chdir=SERVERS)
    server = Server("gunicorn", command, env, tmp_path / f"gunicorn-{port}.log", port)
    servers.append(server)
    server.wait_ready()
    return server


def scrape(server: Server) -> dict[str, list[tuple[dict[str, str], float]]]:
    """``/metrics`` parsed: sample name -> [(labels, value)]."""
    response = server.http.get("/metrics")
    assert response.status_code == 200, response.text
    found: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            found.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return found


def total(samples: dict[str, list[tuple[dict[str, str], float]]], name: str,
          **labels: str) -> float:
    return sum(value for found, value in samples.get(name, [])
               if all(found.get(key) == wanted for key, wanted in labels.items()))


@pytest.mark.parametrize("preload", [True, False], ids=["preload", "import-per-worker"])
def test_gunicorn_multiprocess_metrics_add_up_over_workers(
        servers: list[Server], tmp_path: Path, flexisync_url: str, namespace: str,
        preload: bool) -> None:
    breaker = f"provider-{uuid.uuid4().hex[:6]}"
    server = start_metrics_app(servers, tmp_path, flexisync_url, namespace, breaker,
                               preload=preload)
    pids = reach_every_worker(server, "/pid", accept=lambda r: r["exporter_running"])
    assert len(pids) == WORKERS

    made: Counter[str] = Counter()
    by_pid: Counter[int] = Counter()

    def call(**query: Any) -> dict[str, Any]:
        reply = server.get("/call", **query)
        made[OUTCOME[reply["result"]]] += 1
        by_pid[reply["pid"]] += 1
        return reply

    # Closed: successes through every worker, and lock acquisitions.
    deadline = time.monotonic() + 30.0
    while len(by_pid) < WORKERS or sum(made.values()) < 40:
        assert time.monotonic() < deadline, f"calls reached only workers {set(by_pid)}"
        assert call()["result"] == "ok"
    locks = 12
    for _ in range(locks):
        assert server.get("/lock", name="job")["locked"] is True

    # One failure through one worker trips it; then every worker rejects.
    assert call(fail="1")["result"] == "failed"
    rejected_by: set[int] = set()
    deadline = time.monotonic() + 30.0
    while len(rejected_by) < WORKERS:
        assert time.monotonic() < deadline, f"only {rejected_by} rejected within 30 s"
        reply = call()
        if reply["result"] == "rejected":
            rejected_by.add(reply["pid"])
    assert set(by_pid) == set(pids)

    calls = "flexisync_breaker_calls_total"
    mine = {"namespace": namespace, "breaker": breaker}

    def settled() -> dict[str, list[tuple[dict[str, str], float]]] | None:
        samples = scrape(server)
        seen = {outcome: total(samples, calls, **mine, outcome=outcome)
                for outcome in ("success", "failure", "rejected", "ignored", "probe")}
        state = {labels["state"]: value for labels, value in
                 samples.get("flexisync_breaker_state", [])
                 if labels.get("breaker") == breaker}
        ok = (seen == {k: float(made.get(k, 0)) for k in seen} and state.get("open") == 1.0
              and total(samples, "flexisync_lock_acquisitions_total",
                        namespace=namespace, lock="job") == locks)
        return samples if ok else None

    samples = wait_until(settled, timeout=15.0, interval=0.1,
                         message=f"/metrics to show {dict(made)} calls, {locks} locks, open")

    # Calls by outcome: exactly what the workers answered, over every worker.
    assert sum(total(samples, calls, **mine, outcome=o) for o in
               ("success", "failure", "rejected", "ignored", "probe")) == sum(made.values())
    # The state gauge: ONE series per state for the fleet (no pid label), open = 1.
    state_samples = [(labels, value) for labels, value in
                     samples["flexisync_breaker_state"] if labels.get("breaker") == breaker]
    states = [labels["state"] for labels, _value in state_samples]
    assert len(states) == len(set(states)), f"several series per state: {state_samples}"
    assert all("pid" not in labels for labels, _value in state_samples)
    assert {labels["state"]: value for labels, value in state_samples}["open"] == 1.0
    assert sum(value for _labels, value in state_samples) == 1.0
    # The trip is counted once, by the worker whose script made it.
    assert total(samples, "flexisync_breaker_transitions_total", **mine, to="open") == 1.0
    # Lock waits: one observation per acquisition, summed over workers.
    assert total(samples, "flexisync_lock_wait_seconds_count",
                 namespace=namespace, lock="job") == locks
    assert total(samples, "flexisync_lock_wait_seconds_bucket",
                 namespace=namespace, lock="job", le="+Inf") == locks
