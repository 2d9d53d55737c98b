"""Session fixture: a private Redis Cluster (3 masters + 3 replicas) for the suite."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.topologies import Cluster, start_cluster


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    """A session-wide private cluster (one per xdist worker). Tests that kill or
    reshard nodes start their own with :func:`tests.topologies.start_cluster`."""
    found = start_cluster()
    yield found
    found.stop()


@pytest.fixture(scope="session")
def cluster_url(cluster: Cluster) -> str:
    """``redis+cluster://`` URL of the session's private cluster."""
    return cluster.url
