"""The worker process ends when its event loop is lost.

Two things leave an asyncio-pool worker unable to run its coroutine tasks again: the
loop thread ended (an exception out of a loop callback, ``loop.stop()`` in a task), or
a task past its hard time limit still blocks the loop after a grace period. Celery's
shutdowns cannot help then (a warm one waits for tasks that never end; both run
cleanup on the loop), so the process exits non-zero at once, with a critical log line,
as the prefork pool kills a child it cannot win back: a supervisor restarts it and the
broker redelivers the ``acks_late`` messages it had not acknowledged.

The exit runs on the consumer's thread after the callbacks queued before it (the failed
task's result and acknowledgement); if that thread does not get to it within
:data:`POOL_FATAL_EXIT_DELAY` seconds, the calling thread exits.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from collections.abc import Callable
from typing import Any

from ..._constants import POOL_FATAL_EXIT_CODE, POOL_FATAL_EXIT_DELAY

logger = logging.getLogger("celerybridge.worker.pool")


def stop_process(post: Callable[..., None], message: str, *args: Any) -> None:
    """Log ``message % args`` as critical and end the process (from any thread)."""
    logger.critical(message + f"; the worker process exits ({POOL_FATAL_EXIT_CODE})", *args)
    post(_exit)
    timer = threading.Timer(POOL_FATAL_EXIT_DELAY, _exit)
    timer.daemon = True
    timer.start()


def _exit() -> None:
    streams = [getattr(h, "stream", None) for h in logging.getLogger().handlers]
    for stream in (*streams, sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # exiting anyway
            stream.flush()  # type: ignore[union-attr]
    os._exit(POOL_FATAL_EXIT_CODE)
