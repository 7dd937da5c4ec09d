"""A plain Celery worker (it never imports celerybridge) whose missing queues are quorum
queues: what Celery 5.5+ offers with ``task_create_missing_queue_type``.

Run as ``celery -A tests.workers.plain_quorum_worker worker -Q <queue>``.
"""

import os
import sys

from celery import Celery

CONFIG = {
    "accept_content": ["json"],
    "task_serializer": "json",
    "result_serializer": "json",
    "task_create_missing_queue_type": "quorum",
}

app = Celery(
    "plain_quorum_worker",
    broker=os.environ.get("CELERYBRIDGE_BROKER_URL"),
    backend=os.environ.get("CELERYBRIDGE_RESULT_BACKEND"),
)
app.conf.update(CONFIG)


@app.task(name="plain.store")
def store(key, content):
    return {"key": key, "content": content, "bridge_loaded": str("celerybridge" in sys.modules)}
