"""A plain Celery worker, written as the seed writes it; it never imports celerybridge.

Run as ``celery -A tests.workers.plain_worker worker -Q <queue>``.
"""

import os
import sys

from celery import Celery

app = Celery(
    "plain_worker",
    broker=os.environ["CELERYBRIDGE_BROKER_URL"],
    backend=os.environ["CELERYBRIDGE_RESULT_BACKEND"],
)
app.conf.update(accept_content=["json"], task_serializer="json", result_serializer="json")


@app.task(name="plain.store")
def store(key, content):
    return {"key": key, "content": content, "bridge_loaded": str("celerybridge" in sys.modules)}


@app.task(name="plain.store_v2")
def store_v2(key, content, meta):
    return {"key": key, "content": content, **meta}
