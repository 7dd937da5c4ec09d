"""Queue definitions shared by a test worker and the callers configured like it."""

from __future__ import annotations

from kombu import Queue

QUORUM = {"x-queue-type": "quorum"}


def quorum_task_queues(queue: str) -> list[Queue]:
    """Celery's ``task_queues`` for one quorum queue, as a service would write them."""
    return [Queue(queue, routing_key=queue, queue_arguments=dict(QUORUM))]
