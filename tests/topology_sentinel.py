"""Session fixture: a private master + replica + 3 sentinels for the suite."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.topologies import SentinelSetup, start_sentinel


@pytest.fixture(scope="session")
def sentinel_setup() -> Iterator[SentinelSetup]:
    """A session-wide private sentinel set-up (one per xdist worker). Tests that fail
    the master over start their own with :func:`tests.topologies.start_sentinel`."""
    found = start_sentinel()
    yield found
    found.stop()


@pytest.fixture(scope="session")
def sentinel_url(sentinel_setup: SentinelSetup) -> str:
    """``redis+sentinel://`` URL of the session's private sentinel set-up."""
    return sentinel_setup.url
