"""Blocking calls offloaded to worker threads, closed without leaving one behind."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TypeVar

import anyio
import anyio.to_thread

from .._exceptions import CeleryBridgeError

T = TypeVar("T")

log = logging.getLogger("celerybridge")


class ThreadCalls:
    """Runs at most ``limit`` blocking calls at once in worker threads, and knows which run.

    A cancelled caller does not wait for its thread (``abandon_on_cancel``): cancellation
    must be immediate. The thread goes on with the client it uses, though, so ``close``
    first waits for every running call, then the owner may tear the clients down. A call
    that reaches its thread after ``close`` fails instead of reconnecting a closed client.
    ``grace`` is the longest one call can take (its I/O timeouts and retries).
    """

    def __init__(self, limit: int, error: type[CeleryBridgeError], *, grace: float) -> None:
        self._limit = limit
        self._error = error
        self._grace = grace
        self._limiter: anyio.CapacityLimiter | None = None  # created on the caller's loop
        # anyio frees a limiter token when its caller is cancelled, while the abandoned
        # thread still runs: the slots bound the calls really running.
        self._slots = threading.BoundedSemaphore(limit)
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
        with self._slots:
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

    def close(self, grace: float | None = None) -> bool:
        """Refuse new calls and wait for running ones (blocking), at most ``grace`` seconds.

        Returns whether every call had finished; if not, the owner closes its clients
        under the calls still running, and a warning says so.
        """
        grace = self._grace if grace is None else grace
        with self._idle:
            self._closed = True
            if self._idle.wait_for(lambda: self._running == 0, grace):
                return True
            log.warning(
                "closing with %d blocking calls still running after %g s", self._running, grace
            )
            return False
