"""The fork mark a breaker's closed path reads to notice a fork nobody announced."""

from __future__ import annotations

import ctypes
import os
import sys

import pytest

from flexisync.breaker._hub import FORK_MARK, _PidMark


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_fork_mark_reads_zero_in_a_child_forked_from_c() -> None:
    """The byte the closed path checks reads 1 in this process and 0 in a child forked
    from C (no at-fork hooks ran), both for the wiped page and for the pid fallback;
    on Linux the cheap wiped page is the one in use."""
    if sys.platform == "linux":
        assert not isinstance(FORK_MARK, _PidMark)
    marks = [FORK_MARK, _PidMark()]
    assert [mark[0] for mark in marks] == [1, 1]
    read, write = os.pipe()
    pid = int(ctypes.PyDLL(None).fork())
    if pid == 0:
        try:
            os.write(write, bytes(mark[0] for mark in marks))
        finally:
            os._exit(0)
    try:
        seen = os.read(read, 2)
    finally:
        os.waitpid(pid, 0)
        os.close(read)
        os.close(write)
    assert seen == b"\x00\x00"
    assert [mark[0] for mark in marks] == [1, 1]
