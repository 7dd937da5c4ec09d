"""Deadlines of the same length for many operations, with one timer between them.

``asyncio.timeout`` schedules a timer per block and cancels it on the way out: a tenth
of what a delegation costs in Python on the fast path. Every publish of a bridge has
the same limit (``publish_timeout``), so their deadlines come in the order they were
set: one timer, armed for the oldest deadline, does for all of them. When it fires it
cancels the tasks whose deadline has passed, as ``asyncio.timeout`` would, and is armed
again for the oldest deadline left, if any.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import AbstractAsyncContextManager
from types import TracebackType

_RESOLUTION = time.get_clock_info("monotonic").resolution
"""How early asyncio runs a timer (``BaseEventLoop._clock_resolution``)."""


class Deadlines:
    """Bounds blocks to ``seconds`` each, on one event loop at a time:
    ``async with deadlines.bound():`` raises ``TimeoutError`` as ``asyncio.timeout``
    does when the block took longer, and only then (a cancellation from elsewhere stays
    a cancellation)."""

    __slots__ = ("_loop", "_open", "_seconds", "_timer")

    def __init__(self, seconds: float) -> None:
        self._seconds = seconds
        self._loop: asyncio.AbstractEventLoop | None = None
        self._open: dict[_Bound, None] = {}
        """The blocks in progress, oldest (first due) first."""
        self._timer: asyncio.TimerHandle | None = None

    def bound(self) -> _Bound:
        """A block bounded to ``seconds`` from when it is entered."""
        return _Bound(self)

    def _enter(self, bound: _Bound) -> float:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # another loop (a test's): what was open is gone
            if self._timer is not None:
                self._timer.cancel()
            self._loop, self._timer = loop, None
            self._open.clear()
        due = loop.time() + self._seconds
        self._open[bound] = None
        if self._timer is None:
            self._timer = loop.call_at(due, self._expire)
        return due

    def _expire(self) -> None:
        self._timer = None
        loop = self._loop
        assert loop is not None  # armed only once a block was entered on it
        now = loop.time() + _RESOLUTION  # what asyncio counts as due
        for bound in self._open:
            if bound.due > now:  # the oldest not due yet: wake up for it
                self._timer = loop.call_at(bound.due, self._expire)
                return
            bound.expire()


class _Bound(AbstractAsyncContextManager[None]):
    __slots__ = ("_cancelling", "_deadlines", "_expired", "_task", "due")

    def __init__(self, deadlines: Deadlines) -> None:
        self._deadlines = deadlines
        self._expired = False
        self.due = 0.0

    async def __aenter__(self) -> None:
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("a deadline is set from a task")
        self._task = task
        self._cancelling = task.cancelling()
        self.due = self._deadlines._enter(self)

    def expire(self) -> None:
        if not self._expired:
            self._expired = True
            self._task.cancel()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._deadlines._open.pop(self, None)
        # asyncio.timeout's own test: our cancellation, and no other one since.
        if (
            self._expired
            and self._task.uncancel() <= self._cancelling
            and exc_type is asyncio.CancelledError
        ):
            raise TimeoutError from exc
