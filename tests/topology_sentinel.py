"""A private master + replica + 3 sentinels started from binaries on PATH.

Stub: the sentinel work of issue 12 fills this in.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session")
def sentinel_url() -> Iterator[str]:
    """``redis+sentinel://`` URL of a session-wide private sentinel deployment."""
    pytest.skip("sentinel topology not built yet")
    yield ""
