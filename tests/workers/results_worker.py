"""The bridge worker, plus tasks that fail with a custom exception and report progress.

Run as ``celery -A tests.workers.results_worker worker -Q <queue>`` with the result backend
under test in ``CELERYBRIDGE_RESULT_BACKEND`` (and its transport options, if any).
"""

from __future__ import annotations

import time

from celery import current_task

from . import results_bindings
from .bridge_worker import app
from .explosive import Explosive

# STARTED is published too: on rpc:// every state is a message on the caller's queue.
app.conf.task_track_started = True


@results_bindings.explode.implement(app)
def explode(message: str) -> None:
    raise Explosive(message)


@results_bindings.progress.implement(app)
def progress(steps: int) -> int:
    for step in range(steps):
        current_task.update_state(state="PROGRESS", meta={"step": step})
        time.sleep(0.05)
    return steps


__all__ = ["app"]
