"""Small helpers with no better home."""

from __future__ import annotations

import asyncio
import math
import os
import threading
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import timedelta
from typing import Any

import anyio
import sniffio

from ._exceptions import ConfigurationError

Timeout = float | int | timedelta
"""A duration as users may pass it: seconds, or a ``timedelta``."""


def to_seconds(value: Timeout | None, *, what: str = "timeout") -> float | None:
    """Normalise a user's timeout to seconds, refusing nonsense early.

    ``None`` means "no limit" and is passed through.
    """
    if value is None:
        return None
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigurationError(f"{what} must be seconds or a timedelta, got {value!r}")
    else:
        seconds = float(value)
    if not math.isfinite(seconds) or seconds <= 0:
        raise ConfigurationError(f"{what} must be a positive, finite duration, got {value!r}")
    return seconds


def fail_after(seconds: float, *, on_asyncio: bool = False) -> AbstractAsyncContextManager[object]:
    """``anyio.fail_after`` as an async context manager: raises ``TimeoutError`` if the
    block takes longer than ``seconds``. Under asyncio it is ``asyncio.timeout``, which
    does the same at a third of the cost, on every delegation. ``on_asyncio``: the
    caller knows it runs under asyncio (no need to ask sniffio)."""
    if on_asyncio or sniffio.current_async_library() == "asyncio":
        return asyncio.timeout(seconds)
    return _anyio_fail_after(seconds)


@asynccontextmanager
async def _anyio_fail_after(seconds: float) -> AsyncIterator[None]:
    with anyio.fail_after(seconds):
        yield


class _RandomHex(threading.local):
    """Random hex digits drawn from ``os.urandom`` ``_RANDOM_BYTES`` at a time, per thread."""

    def __init__(self) -> None:
        self.digits = ""
        self.offset = 0


_RANDOM_BYTES = 4096
"""Random bytes drawn at once for :func:`uuid4_str`: 256 ids."""
_random = _RandomHex()
_VARIANT = {digit: "89ab"[int(digit, 16) & 3] for digit in "0123456789abcdef"}
"""The 17th hex digit of a version 4 UUID, from a random one: the RFC 4122 variant."""


def _forked() -> None:
    # The child must not hand out the ids its parent will hand out too.
    _random.digits, _random.offset = "", 0


os.register_at_fork(after_in_child=_forked)


def uuid4_str() -> str:
    """``str(uuid.uuid4())`` at a fraction of the cost: every delegation takes two (its
    task id, and on Redis kombu's delivery tag). As random (``os.urandom``), drawn a few
    kilobytes at a time per thread, and drawn afresh in a forked child."""
    pool = _random
    at, digits = pool.offset, pool.digits
    if at >= len(digits):
        digits = pool.digits = os.urandom(_RANDOM_BYTES).hex()
        at = 0
    pool.offset = at + 32
    return (
        f"{digits[at : at + 8]}-{digits[at + 8 : at + 12]}-4{digits[at + 13 : at + 16]}-"
        f"{_VARIANT[digits[at + 16]]}{digits[at + 17 : at + 20]}-{digits[at + 20 : at + 32]}"
    )


def as_list(value: Any) -> list[Any]:
    """``value`` as a list, as Celery's ``maybe_list`` reads a ``link`` option: ``None``
    is none, a list or tuple its items, anything else one item."""
    if value is None:
        return []
    return list(value) if isinstance(value, list | tuple) else [value]


def printable(text: object) -> str:
    """``str(text)`` safe to print on one line of a terminal: backslashes and every
    character Python does not call printable (control characters, newlines, ANSI escapes,
    line separators, bidirectional overrides, lone surrogates) escaped as in a Python
    string literal (``\\n``, ``\\x1b``, ``\\u202e``)."""
    text = str(text)
    if text.isprintable() and "\\" not in text:
        return text
    return "".join("\\\\" if c == "\\" else c if c.isprintable() else repr(c)[1:-1] for c in text)
