"""``flexisync dashboard`` in a real browser: headless Chromium shows a breaker open
within a second of a trip made by ANOTHER process, its Reset button closes it for the
fleet (a same-origin POST that passes the CSRF guard), and a screenshot is saved to
``build/test-artifacts/dashboard.png`` for review.

Chromium is driven exactly as in ``test_sse_browser.py`` (the system package over the
DevTools pipe; skipped with the same message when there is none). Every wait polls the
page with a deadline.
"""

from __future__ import annotations

import base64
import contextlib
import json
import multiprocessing
import pathlib
import time
from typing import Any

import pytest

import flexisync
from tests.helpers import join_all, wait_until
from tests.integration.test_dashboard import running_dashboard
from tests.integration.test_sse_browser import Chromium, chromium  # noqa: F401  (fixture)

pytestmark = pytest.mark.slow

ARTIFACTS = pathlib.Path(__file__).resolve().parents[2] / "build" / "test-artifacts"


def trip_worker(url: str, namespace: str, go: Any, out: Any) -> None:
    """Another process: wait for ``go``, trip ``payments`` for 60 s, report the time
    just before the trip (Unix seconds: the clock is the machine's, shared)."""
    with flexisync.connect(url, namespace=namespace) as coordinator:
        breaker = coordinator.breaker("payments")
        breaker.info()  # connected before the clock starts
        assert go.wait(30)
        before = time.time()
        breaker.trip(retry_after=60)
        out.put(before)


def row(browser: Chromium, session: str, name: str) -> dict[str, Any] | None:
    """What the page shows for breaker ``name``: state, time left, transitions, bars."""
    found = browser.evaluate(session, f"""(() => {{
        const tr = document.querySelector('tr[data-breaker={json.dumps(name)}]');
        if (!tr) return null;
        return JSON.stringify({{
            state: tr.querySelector('.state').textContent,
            left: tr.querySelector('.left').textContent,
            transitions: tr.querySelector('.transitions').textContent,
            sparkline: tr.querySelectorAll('svg.spark').length,
            frames: window.dashboard.frames,
        }});
    }})()""")
    return json.loads(found) if found else None


def bars(browser: Chromium, session: str, name: str, outcome: str) -> int:
    """How many ``outcome`` bars breaker ``name``'s sparkline draws."""
    count: int = browser.evaluate(session, (
        f"document.querySelectorAll('tr[data-breaker={json.dumps(name)}] "
        f"svg.spark rect.{outcome}').length"))
    return count


def text_of(browser: Chromium, session: str, selector: str) -> str:
    found: str = browser.evaluate(
        session, f"document.querySelector({json.dumps(selector)})?.textContent ?? ''")
    return found


def _fail() -> None:
    raise RuntimeError("provider down")


def test_the_page_shows_a_trip_by_another_process_within_a_second(
        chromium: Chromium, flexisync_url: str, namespace: str,  # noqa: F811
        tmp_path: pathlib.Path) -> None:
    """The page lists two breakers (closed), a held lock and a stream; a spawned worker
    trips ``payments``; the page shows it "open" within 1 s of the trip, with time left
    and the transition; the screenshot is saved; the page's Reset button closes it in
    Redis and the page shows it closed again."""
    mp = multiprocessing.get_context("spawn")
    go, out = mp.Event(), mp.Queue()
    worker = mp.Process(target=trip_worker, args=(flexisync_url, namespace, go, out))
    worker.start()
    try:
        _watch_the_trip(chromium, flexisync_url, namespace, tmp_path, go=go, out=out)
    finally:
        if worker.is_alive() and not go.is_set():
            worker.kill()
    join_all([worker], timeout=30)


def _watch_the_trip(chromium: Chromium, flexisync_url: str, namespace: str,  # noqa: F811
                    tmp_path: pathlib.Path, *, go: Any, out: Any) -> None:
    with flexisync.connect(flexisync_url, namespace=namespace) as sync, \
            running_dashboard(flexisync_url, namespace, tmp_path, "--allow-write") as running:
        payments = sync.breaker("payments", failure_threshold=5)
        payments.reset()
        search = sync.breaker("search", failure_threshold=5)
        search.reset()
        for _ in range(3):
            payments.call(lambda: None)
            search.call(lambda: None)
            with contextlib.suppress(RuntimeError):
                search.call(_fail)
        sync.stream("orders").append({"order": 1})
        with sync.lock("nightly-report", ttl=60):
            session = chromium.open(f"{running.base}/")
            chromium.command("Emulation.setDeviceMetricsOverride", session, width=1360,
                             height=760, deviceScaleFactor=1, mobile=False)
            wait_until(lambda: (r := row(chromium, session, "payments"))
                       and r["state"] == "closed", timeout=30, interval=0.05,
                       message="the page showing payments closed")
            assert "nightly-report" in text_of(chromium, session, "#locks")
            assert "orders" in text_of(chromium, session, "#streams")
            assert text_of(chromium, session, "#status") == "live"
            wait_until(lambda: bars(chromium, session, "search", "failure"), timeout=10,
                       interval=0.05, message="the fleet's outcomes in search's sparkline")

            go.set()
            before = out.get(timeout=30)
            shown = wait_until(lambda: (r := row(chromium, session, "payments"))
                               and r["state"] == "open" and (r, time.time()),
                               timeout=10, interval=0.02,
                               message="the page showing payments open")
            seen, at = shown
            assert at - before < 1.0, f"shown {at - before:.2f}s after the trip"
            assert seen["left"].endswith(" s"), seen  # time left open, counting down
            assert "closed \u2192 open" in seen["transitions"]
            assert seen["sparkline"] == 1
            assert (row(chromium, session, "search") or {}).get("state") == "closed"
            for _ in range(5):  # rejected by the open breaker: amber bars
                with contextlib.suppress(flexisync.CircuitOpenError):
                    payments.call(lambda: None)
            wait_until(lambda: bars(chromium, session, "payments", "rejected"), timeout=10,
                       interval=0.05, message="the rejections in payments' sparkline")

            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            shot = chromium.command("Page.captureScreenshot", session, format="png")
            path = ARTIFACTS / "dashboard.png"
            path.write_bytes(base64.b64decode(shot["data"]))
            print(f"dashboard screenshot: {path}")
            assert path.stat().st_size > 10_000
            assert chromium.evaluate(session, "window.dashboard.scriptErrors") == 0

            chromium.evaluate(session, "document.querySelector('tr[data-breaker=\"payments\"]"
                                       " .controls button:last-of-type').click()")
            wait_until(lambda: payments.info().state == "closed", timeout=10, interval=0.05,
                       message="the Reset button closing the breaker in Redis")
            wait_until(lambda: (r := row(chromium, session, "payments"))
                       and r["state"] == "closed", timeout=10, interval=0.05,
                       message="the page showing payments closed again")
