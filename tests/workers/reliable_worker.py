"""A celerybridge worker for the tests of the reliable Redis transport.

Run as ``celery -A tests.workers.reliable_worker worker -Q <queue>``. Late
acknowledgement, and a task whose pool process dies is delivered again (as the pusher
is configured). With ``CB_TEST_KILL_AT_DELIVERY=<file>`` the worker SIGKILLs itself the
first time a message of its task queue is handed to kombu (after the broker gave it,
before it runs), and creates the file; with ``CB_TEST_STOCK_TRANSPORT=1`` it takes
messages with kombu's own Redis transport instead of celerybridge's.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from kombu.transport import virtual

from celerybridge import celery_app

from . import bindings, reliable_bindings

app = celery_app(
    "reliable_worker",
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
)
if os.environ.get("CB_TEST_STOCK_TRANSPORT"):
    app.conf.broker_transport = "kombu.transport.redis:Transport"


@reliable_bindings.add.implement(app)
def add(x: int, y: int) -> list[int]:
    return [x + y, os.getpid()]


@reliable_bindings.sleep.implement(app)
def sleep(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


@bindings.store.implement(app)
def store(key: str, content: str) -> dict[str, str]:
    # As tests.workers.plain_worker answers, so a caller tells which worker ran it.
    return {"key": key, "content": content, "bridge_loaded": str("celerybridge" in sys.modules)}


@reliable_bindings.crash.implement(app)
def crash() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


_marker = os.environ.get("CB_TEST_KILL_AT_DELIVERY")
if _marker:
    _deliver = virtual.Transport._deliver

    def _kill_first(self: Any, message: Any, queue: str) -> Any:
        if queue.startswith("cb-") and not Path(_marker).exists():
            Path(_marker).touch()
            os.kill(os.getpid(), signal.SIGKILL)
        return _deliver(self, message, queue)

    virtual.Transport._deliver = _kill_first
