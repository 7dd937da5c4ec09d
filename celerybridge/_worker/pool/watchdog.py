"""The loop-lag watchdog: a blocking call inside a coroutine task is reported, by name.

Every coroutine task of an asyncio-pool worker shares one event loop: a body that
blocks (``time.sleep``, a sync HTTP client, a CPU-bound loop) stalls all of them. A
daemon thread asks the loop to run a tiny callback every fraction of the threshold; when
the loop has not run it for longer than the threshold, the thread logs a warning naming
the task (name and id) whose code holds the loop: the job whose greenlet is running, or
the job whose coroutine (or a Task it created) is the loop's current Task.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable

from ..._constants import LOOP_LAG_CHECKS_PER_THRESHOLD
from .greenlets import Job

logger = logging.getLogger("celerybridge.worker.pool")


class Watchdog:
    """Watches ``loop`` from a thread of its own; ``culprit()`` names what holds it."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        threshold: float,
        culprit: Callable[[], Job | str | None],
    ) -> None:
        self._loop = loop
        self._threshold = threshold
        self._culprit = culprit
        self._beat = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._watch, name="celerybridge-loop-watchdog", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(self._threshold + 1)

    def _tick(self) -> None:
        self._beat = time.monotonic()

    def _watch(self) -> None:
        interval = self._threshold / LOOP_LAG_CHECKS_PER_THRESHOLD
        reported = 0.0  # the beat already reported: one warning per stall
        while not self._stop.wait(interval):
            beat = self._beat
            lag = time.monotonic() - beat
            if lag > self._threshold and beat != reported:
                reported = beat
                culprit = self._culprit()
                logger.warning(
                    "the worker's event loop has been blocked for %.2fs (over %ss) by %s: "
                    "a blocking call in a coroutine task stalls every task of this worker",
                    lag,
                    self._threshold,
                    f"task {culprit}" if culprit is not None else "code outside any task",
                )
            try:
                self._loop.call_soon_threadsafe(self._tick)
            except RuntimeError:  # the loop is closed: the worker is stopping
                return
