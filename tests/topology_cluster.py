"""A private Redis Cluster (3 masters + 3 replicas) started from binaries on PATH.

Stub: the cluster work of issue 12 fills this in.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session")
def cluster_url() -> Iterator[str]:
    """``redis+cluster://`` URL of a session-wide private cluster."""
    pytest.skip("cluster topology not built yet")
    yield ""
