"""The GitHub Actions workflow is valid (checked offline against the schema)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_ci_workflow_matches_the_github_schema() -> None:
    """check-jsonschema's bundled GitHub workflow schema accepts ci.yml."""
    exe = shutil.which("check-jsonschema") or str(Path(sys.executable).parent / "check-jsonschema")
    result = subprocess.run(
        [exe, "--builtin-schema", "vendor.github-workflows",
         str(ROOT / ".github" / "workflows" / "ci.yml")],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_ci_runs_the_readme_commands_against_a_redis_service() -> None:
    """The workflow has a Redis service with a health check and runs make test/lint."""
    text = (ROOT / ".github" / "workflows" / "ci.yml").read_text()
    for needle in ("services:", "redis:", "--health-cmd", "make test", "make lint",
                   '"3.10"', '"3.13"'):
        assert needle in text, needle
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci
    assert "make test" in (ROOT / "README.md").read_text()


def test_make_demo_installs_only_what_the_demo_needs() -> None:
    """`make demo` installs flexisync with the embedded-server extra, not the test and
    benchmark tooling (which took most of a fresh clone's demo time)."""
    makefile = (ROOT / "Makefile").read_text()
    demo_rule = makefile.split("$(DEMO_STAMP): pyproject.toml", 1)[1].split("\n\n", 1)[0]
    assert "pip install" in demo_rule
    assert "'.[embedded]'" in demo_rule
    assert "dev" not in demo_rule
    assert "bench" not in demo_rule
    assert "demo: $(DEMO_STAMP)" in makefile
