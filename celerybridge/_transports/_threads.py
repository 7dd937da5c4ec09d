"""Blocking calls offloaded to worker threads, closed without leaving one behind."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

import anyio
import anyio.to_thread

from .._exceptions import CeleryBridgeError

T = TypeVar("T")

CLOSE_GRACE = 5.0
"""Seconds ``close`` waits for calls that are still running in their threads."""


class ThreadCalls:
    """Runs blocking calls in at most ``limit`` threads and knows which still run.

    A cancelled caller does not wait for its thread (``abandon_on_cancel``): cancellation
    must be immediate. The thread goes on with the client it uses, though, so ``close``
    first waits for every running call, then the owner may tear the clients down. A call
    that reaches its thread after ``close`` fails instead of reconnecting a closed client.
    """

    def __init__(self, limit: int, error: type[CeleryBridgeError]) -> None:
        self._limit = limit
        self._error = error
        self._limiter: anyio.CapacityLimiter | None = None  # created on the caller's loop
        self._idle = threading.Condition()
        self._running = 0
        self._closed = False

    async def run(self, func: Callable[..., T], *args: object) -> T:
        """Call ``func(*args)`` in a worker thread; cancelling abandons the thread."""
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(self._limit)
        return await anyio.to_thread.run_sync(
            self._tracked, func, *args, limiter=self._limiter, abandon_on_cancel=True
        )

    def _tracked(self, func: Callable[..., T], *args: object) -> T:
        with self._idle:
            if self._closed:
                raise self._error("the connection was closed before the call started")
            self._running += 1
        try:
            return func(*args)
        finally:
            with self._idle:
                self._running -= 1
                self._idle.notify_all()

    def close(self, grace: float = CLOSE_GRACE) -> bool:
        """Refuse new calls and wait up to ``grace`` seconds for running ones (blocking).

        Returns whether every call had finished.
        """
        with self._idle:
            self._closed = True
            return self._idle.wait_for(lambda: self._running == 0, grace)
