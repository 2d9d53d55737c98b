"""The one JSON codec of flexisync: what it writes and how it reads foreign bytes.

Everything flexisync stores or publishes (state values, event and stream payloads) is
compact JSON written by :func:`dumps`, and everything it reads back goes through
:func:`loads`, which treats the bytes as untrusted: another program may have written
them. The promises:

* :func:`loads` returns a value or raises :class:`~flexisync.DecodeError`, never
  anything else: not ``UnicodeDecodeError`` (bytes that are not UTF-8), not
  ``RecursionError`` (absurdly deep nesting), not a ``float('nan')`` smuggled in as
  ``NaN`` (JSON has no such constant; :func:`dumps` refuses to write one).
* Nesting is limited to :data:`MAX_DEPTH` levels (arrays and objects) both ways, so a
  value flexisync writes can always be read back. The depth is checked *before* the
  parser runs, so the parser never recurses deeply: when the document holds fewer
  ``[`` and ``{`` characters than the limit (almost always) the check costs two
  ``str.count`` calls; otherwise a linear scan that skips string literals measures it.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable
from itertools import accumulate
from typing import Any

from flexisync.errors import DecodeError

__all__ = ["MAX_DEPTH", "dumps", "loads"]

MAX_DEPTH = 512
"""Deepest nesting of arrays/objects that :func:`dumps` writes and :func:`loads` reads."""


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


_decoder = json.JSONDecoder(parse_constant=_reject_constant)
_decode = _decoder.decode
_scan: Callable[[str, int], tuple[Any, int]] = getattr(_decoder, "scan_once")  # noqa: B009
_encoder = json.JSONEncoder(separators=(",", ":"), allow_nan=False)
_encode = _encoder.encode


def _c_encode() -> Callable[[Any], str] | None:
    """``_encode`` without its Python wrapper (the C encoder called directly), or
    ``None`` when this interpreter's C encoder is missing or builds different text.

    Same settings as ``_encode``: compact separators, ASCII output, no NaN/Infinity and
    circular references detected (a fresh ``markers`` dict per call).
    """
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:
        return None
    default, escape = _encoder.default, json.encoder.encode_basestring_ascii
    spare = threading.local()  # one idle encoder per thread (building one costs ~0.3 µs)

    def encode(value: Any) -> str:
        if isinstance(value, str):
            return escape(value)
        # Taken, not borrowed: a nested call (a user's mapping calling dumps) builds its
        # own, and an encoder whose markers a failure may have left dirty is dropped.
        encoder = spare.__dict__.pop("encoder", None) or make(
            {}, default, escape, None, ":", ",", False, False, False)
        text = "".join(encoder(value, 0))
        spare.encoder = encoder
        return text

    probe = {"a": [1, 2.5, None, True, "\u00e9\n"], "b": {"c": -3}}
    try:
        if encode(probe) != _encode(probe):
            return None
    except TypeError:  # another signature
        return None
    return encode


_fast_encode = _c_encode() or _encode

# String literals (removed before measuring depth: brackets inside them do not nest)
# and runs of characters that are neither brackets nor quotes.
_NOISE = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[^\[\]{}"]+', re.DOTALL)
_RUNS = re.compile(r"[\[{]+|[\]}]+")
_PAIRS = re.compile(r"\[\]|\{\}")


def _depth(text: str, limit: int = MAX_DEPTH) -> int:
    """How deeply arrays/objects nest in ``text``, or 0 when it surely stays within ``limit``.

    Exact for valid JSON whose ``[``/``{`` count exceeds ``limit``. For invalid
    JSON it is at least the depth a parser reaches before it finds the error, so it is
    safe as a guard in front of one.
    """
    if len(text) <= limit or text.count("[") + text.count("{") <= limit:
        return 0
    brackets = _NOISE.sub("", text).replace('"', "")
    # Dropping every innermost pair lowers the deepest point by exactly one (an upper
    # bound for invalid JSON) and leaves far fewer runs to add up in Python.
    inner = _PAIRS.sub("", brackets)
    bonus = 1 if len(inner) < len(brackets) else 0
    steps = (len(run) if run[0] in "[{" else -len(run) for run in _RUNS.findall(inner))
    return max(accumulate(steps, initial=0)) + bonus


def dumps(value: Any, what: str = "value") -> str:
    """``value`` as compact JSON text.

    Args:
        value: any JSON-serializable value, nested at most :data:`MAX_DEPTH` levels.
        what: what the value is, for the error message (``"data"``, ``"value"``).

    Raises:
        TypeError: ``value`` (or something inside it) is not JSON-serializable: an
            unsupported type, NaN or infinity, a circular reference, or nesting deeper
            than :data:`MAX_DEPTH`. Raised before anything is written anywhere.
    """
    try:
        text: str = _fast_encode(value)
    except (TypeError, ValueError, RecursionError) as exc:
        reason = "it nests too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise TypeError(f"{what} is not JSON-serializable: {reason}") from None
    if _depth(text) > MAX_DEPTH:
        raise TypeError(f"{what} is not JSON-serializable: it nests deeper than "
                        f"{MAX_DEPTH} levels")
    return text


def loads(raw: bytes | str, what: str, *, max_depth: int = MAX_DEPTH) -> Any:
    """Parse JSON read from Redis, which another program may have written.

    Args:
        raw: the stored bytes (UTF-8) or text.
        what: the flexisync key, topic or stream entry the bytes came from; it names
            the culprit in the error.
        max_depth: the nesting allowed; a wrapper around a value :func:`dumps` wrote
            (the events envelope) passes ``MAX_DEPTH + 1``.

    Raises:
        DecodeError: ``raw`` is not UTF-8, not JSON, uses ``NaN``/``Infinity``, or
            nests deeper than ``max_depth`` levels.
    """
    if type(raw) is bytes:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DecodeError(what, f"not UTF-8 ({exc.reason} at byte {exc.start})") from None
    elif isinstance(raw, (bytes, bytearray, memoryview)):
        try:
            text = bytes(raw).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DecodeError(what, f"not UTF-8 ({exc.reason} at byte {exc.start})") from None
    elif isinstance(raw, str):
        text = raw
    else:
        raise DecodeError(what, f"expected bytes, got {type(raw).__name__}")
    levels = _depth(text, max_depth)
    if levels > max_depth:
        raise DecodeError(what, f"nested {levels} levels deep (the limit is {max_depth})")
    try:
        # Fast path: a document that starts at 0 and ends at the last character (what
        # dumps() writes); anything else (surrounding whitespace, extra data, errors)
        # goes through the full decoder, for its exact result and message.
        try:
            value, end = _scan(text, 0)
        except (StopIteration, ValueError):
            return _decode(text)
        if end != len(text):
            return _decode(text)
        return value
    except RecursionError:  # only if the caller's stack was already nearly full
        raise DecodeError(what, "nested too deeply to parse here") from None
    except ValueError as exc:  # JSONDecodeError, huge integer literals, NaN/Infinity
        raise DecodeError(what, str(exc)) from None
