"""A plain Celery app (no ``celery_app()``, so no intake gate) on ``celerybridge.AsyncioPool``,
with ``acks_late`` and ``reject_on_worker_lost``: what reaches Celery's tracer unchecked.

Run as ``celery -A tests.workers.plain_pool_worker worker -Q <queue>``; ``CB_POOL_MARKERS``
is a directory where each run of ``plain_pool.mark`` appends a line.
"""

from __future__ import annotations

import os

from celery import Celery

from ._marks import mark as _mark
from ._marks import task_id as _task_id

app = Celery(
    "plain_pool_worker",
    broker=os.environ["CELERYBRIDGE_BROKER_URL"],
    backend=os.environ["CELERYBRIDGE_RESULT_BACKEND"],
)
app.conf.update(
    accept_content=["json"],
    task_serializer="json",
    result_serializer="json",
    worker_pool="celerybridge:AsyncioPool",
    worker_concurrency=10,
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    broker_transport_options={"visibility_timeout": 5},
)


@app.task(name="plain_pool.mark")
async def mark() -> str:
    _mark(f"ran-{_task_id()}", str(os.getpid()))
    return _task_id()
