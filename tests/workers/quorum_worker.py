"""A celerybridge worker whose queue is a quorum queue defined in Celery's own
``task_queues`` (not in ``CELERYBRIDGE_QUEUES``).

Run as ``CB_TEST_QUEUE=<queue> celery -A tests.workers.quorum_worker worker -Q <queue>``.
"""

from __future__ import annotations

import os

from celerybridge import celery_app

from . import bindings
from .queues import quorum_task_queues

app = celery_app(
    "quorum_worker", task_queues=quorum_task_queues(os.environ.get("CB_TEST_QUEUE", "cb-test"))
)


@bindings.add.implement(app)
def add(x: int, y: int) -> bindings.Total:
    return bindings.Total(value=x + y, pid=os.getpid())
