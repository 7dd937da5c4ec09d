"""Quorum queues and priority queues: workers and callers declare a queue alike, whichever
starts first. Nothing here connects: a bridge opens its connections on first use."""

from __future__ import annotations

import asyncio

from celery import Celery
from kombu import Queue

from celerybridge import Bridge, BridgeSettings, celery_app

# --8<-- [start:settings]
# The same as CELERYBRIDGE_QUEUES='{"pusher": {"x-queue-type": "quorum"}, ...}' in the
# environment of the workers and of every caller.
settings = BridgeSettings(
    queues={"pusher": {"x-queue-type": "quorum"}, "mail": {"x-max-priority": 10}}
)
pusher = celery_app("pusher", settings)  # `celery worker -Q pusher` declares a quorum queue
bridge = Bridge(settings)  # publishing first, declares "pusher" as that worker will
# --8<-- [end:settings]
assert pusher.amqp.queues["pusher"].queue_arguments == {"x-queue-type": "quorum"}


# --8<-- [start:celery]
# Queues defined in Celery's own configuration, as a Celery shop already has them.
task_queues = [Queue("pusher", routing_key="pusher", queue_arguments={"x-queue-type": "quorum"})]

worker = celery_app("pusher", task_queues=task_queues)  # the service's worker


def caller_bridge() -> Bridge:
    """A caller's bridge, given a Celery app configured like the worker: only its queue
    definitions are read (task_queues, task_create_missing_queue_type, ...)."""
    caller = Celery("caller", set_as_current=False)
    caller.conf.task_queues = task_queues
    # Its first delegate to "pusher" declares it as a quorum queue, if it is missing.
    return Bridge(celery=caller)


# --8<-- [end:celery]


async def main() -> None:
    async with caller_bridge() as bridge:
        assert not bridge.settings.queues  # the definitions come from the Celery app


asyncio.run(main())
