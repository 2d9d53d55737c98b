"""The public surface: exported names, the error tree, and a side-effect-free import."""

from __future__ import annotations

import subprocess
import sys

import flexisync
from flexisync import errors


def test_all_names_are_exported_and_importable() -> None:
    """Every name in __all__ exists; the contract's core names are present."""
    for name in flexisync.__all__:
        assert hasattr(flexisync, name), name
    for name in ("connect", "Coordinator", "StateStore", "FlexiSyncError", "ConfigError",
                 "BackendUnavailable", "CircuitOpenError", "LockError", "LockTimeout",
                 "LockNotOwnedError", "LockLostError", "EventsTrimmed"):
        assert name in flexisync.__all__, name


def test_error_tree_matches_the_design() -> None:
    """Errors subclass FlexiSyncError and the builtins they resemble."""
    assert issubclass(errors.ConfigError, (errors.FlexiSyncError, ValueError))
    assert issubclass(errors.LockTimeout, errors.LockError)
    assert issubclass(errors.LockTimeout, TimeoutError)
    for cls in (errors.LockNotOwnedError, errors.LockLostError):
        assert issubclass(cls, errors.LockError)
    for cls in (errors.BackendUnavailable, errors.BackendError, errors.CircuitOpenError,
                errors.LockError, errors.EventsTrimmed, errors.DecodeError):
        assert issubclass(cls, errors.FlexiSyncError)


def test_errors_carry_their_data_as_attributes() -> None:
    """Errors build their message from attributes callers can read."""
    err = errors.CircuitOpenError("openai", 2.5)
    assert (err.name, err.retry_after) == ("openai", 2.5)
    assert "openai" in str(err)
    assert "2.500" in str(err)
    trimmed = errors.EventsTrimmed("s", "1-0", "5-0")
    assert (trimmed.stream, trimmed.after, trimmed.oldest) == ("s", "1-0", "5-0")
    down = errors.BackendUnavailable("h:1", attempts=3, elapsed=0.5)
    assert (down.address, down.attempts) == ("h:1", 3)


def test_import_opens_no_socket_and_starts_no_thread() -> None:
    """`import flexisync` + connect() leaves the process with one thread and no sockets."""
    code = (
        "import socket, threading\n"
        "opened = []\n"
        "orig = socket.socket.connect\n"
        "socket.socket.connect = lambda self, *a: opened.append(a) or orig(self, *a)\n"
        "import flexisync\n"
        "sync = flexisync.connect('redis://127.0.0.1:1/0')\n"
        "sync.state('s')\n"
        "assert threading.active_count() == 1, threading.enumerate()\n"
        "assert not opened, opened\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.stdout.strip() == "ok", result.stderr


def test_package_ships_py_typed_and_lua_scripts() -> None:
    """py.typed marks the package as typed; each Lua script documents KEYS and ARGV."""
    from importlib import resources

    root = resources.files("flexisync")
    assert root.joinpath("py.typed").is_file()
    scripts = [p for p in root.joinpath("_scripts").iterdir() if p.name.endswith(".lua")]
    assert scripts
    for script in scripts:
        text = script.read_text()
        assert "KEYS[1]" in text.split("\n\n")[0] or text.startswith("--"), script.name


def test_readme_submodule_calls_work_after_import_flexisync_alone() -> None:
    """`flexisync.sse.event_stream` and `flexisync.embedded.start`, as the README writes
    them, resolve after a bare `import flexisync`, and importing still starts no thread."""
    code = (
        "import threading, flexisync\n"
        "assert threading.active_count() == 1\n"
        "assert callable(flexisync.sse.event_stream)\n"
        "assert callable(flexisync.embedded.start)\n"
        "assert callable(flexisync.testing.unique_namespace)\n"
        "assert threading.active_count() == 1\n"
        "try:\n"
        "    flexisync.nonexistent\n"
        "except AttributeError as exc:\n"
        "    assert 'nonexistent' in str(exc)\n"
        "else:\n"
        "    raise SystemExit('no AttributeError')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stderr
