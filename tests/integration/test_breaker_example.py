"""The LLM-provider example runs standalone and shows the fleet-wide behaviour."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "llm_providers.py"


@pytest.mark.slow
def test_llm_providers_example_runs_and_the_fleet_opens_and_closes_together(
        flexisync_url: str) -> None:
    """The example exits 0; every worker sees the 429 open the breaker and the close."""
    result = subprocess.run(
        [sys.executable, str(EXAMPLE)], capture_output=True, text=True, timeout=120,
        env={**os.environ, "FLEXISYNC_URL": flexisync_url}, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    for worker in range(4):
        assert f"worker {worker}  breaker llm:openai: closed -> open" in out, out
        assert f"worker {worker}  breaker llm:openai: half_open -> closed" in out, out
    assert "rejected by the breaker" in out
    assert "final: closed, opened 2 time(s) fleet-wide" in out, out
