"""Celery's callbacks (accepted, done, timed out) run on the consumer's thread.

The callbacks a pool gets from a request acknowledge or reject the message, send task
events and update the worker's state (``active_requests``). Celery's threads pool calls
them from its executor threads; the prefork pool from the main process's event loop,
the thread that owns the broker connection. The asyncio pool does as prefork does: jobs
(on the loop thread or in the sync thread pool) queue their callbacks here, a pipe
wakes the consumer's hub (kombu's event loop), and the hub runs them in order. So no
other thread ever writes on the consumer's py-amqp socket (whose frames two threads
could interleave) or uses its Redis channel, and ``worker.state`` is touched by one thread.

Without a hub (a transport without an event loop) the callbacks run where they are
queued, as in Celery's threads pool.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

logger = logging.getLogger("celerybridge.worker.pool")


class Callbacks:
    """A queue of calls that the consumer's thread runs, woken through a pipe."""

    def __init__(self) -> None:
        self._queue: deque[tuple[Callable[..., Any], tuple[Any, ...]]] = deque()
        self._hub: Any = None
        self._pipe: tuple[int, int] | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.RLock()

    def register(self, hub: Any) -> None:
        """Run the callbacks on ``hub``'s thread (the caller's) from now on."""
        read, write = os.pipe()
        os.set_blocking(read, False)
        os.set_blocking(write, False)
        self._pipe = (read, write)
        self._hub = hub
        self._thread = threading.current_thread()
        hub.add_reader(read, self.drain)

    def post(self, fn: Callable[..., Any] | None, *args: Any) -> None:
        """Have ``fn(*args)`` called on the consumer's thread (from any thread)."""
        if fn is None:
            return
        if self._pipe is None:
            self._call(fn, args)
            return
        self._queue.append((fn, args))
        with contextlib.suppress(BlockingIOError, OSError):  # full: a wakeup is pending
            os.write(self._pipe[1], b"\0")

    def drain(self) -> None:
        """Run what is queued (on the consumer's thread)."""
        if self._pipe is not None:
            with contextlib.suppress(BlockingIOError, InterruptedError, OSError):
                while os.read(self._pipe[0], 4096):
                    pass
        with self._lock:  # a signal handler's drain never interleaves with the hub's
            while self._queue:
                fn, args = self._queue.popleft()
                self._call(fn, args)

    @staticmethod
    def _call(fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        try:
            fn(*args)
        except Exception:
            logger.exception("pool callback %r failed", fn)

    @property
    def on_consumer_thread(self) -> bool:
        return self._thread is None or threading.current_thread() is self._thread

    def close(self) -> None:
        """Run what is left and stop listening on the hub."""
        self.drain()
        if self._pipe is None:
            return
        read, write = self._pipe
        self._pipe = None
        with contextlib.suppress(Exception):  # the hub may be closed already
            self._hub.remove_reader(read)
        self._hub = None
        os.close(read)
        os.close(write)
