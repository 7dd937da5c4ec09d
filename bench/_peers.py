"""The peers' publishers: FastStream ``broker.publish`` and taskiq ``kiq``, on both brokers.

Each yields a ready call that sends one 1 KiB message the way a service using that
library would, to its own queue (``new_queue``), which is deleted afterwards. Like
celerybridge and the raw clients, the RabbitMQ publishes are persistent, to a durable
classic queue, on a channel with publisher confirms (FastStream's and taskiq-aio-pika's
default channels confirm), so each returns once the broker has the message.

Both libraries are in the ``dev`` extra; without them their rows say "n/a".
"""

from __future__ import annotations

import importlib.util
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager, suppress
from typing import Any

from ._common import delete_queue, payload

FASTSTREAM = "FastStream publish"
TASKIQ = "taskiq kiq"
Publish = Callable[[], Coroutine[Any, Any, object]]


def installed(*modules: str) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in modules)


@asynccontextmanager
async def faststream_publisher(
    broker: str, broker_url: str, queue: str
) -> AsyncIterator[Publish | None]:
    """FastStream's ``broker.publish`` of the call as a JSON document (FastStream has no
    Celery message format): ``LPUSH`` to a Redis list, or to a RabbitMQ queue through the
    default exchange, persistent, confirmed."""
    if not installed("faststream"):
        yield None
        return
    document = {"task": "bench.echo", "args": [payload(1024)], "kwargs": {}}
    try:
        if broker == "redis":
            from faststream.redis import RedisBroker

            async with RedisBroker(broker_url) as redis_broker:

                async def push() -> object:
                    return await redis_broker.publish(document, list=queue)

                yield push
            return
        from faststream.rabbit import RabbitBroker, RabbitQueue

        async with RabbitBroker(broker_url) as rabbit_broker:
            target = await rabbit_broker.declare_queue(RabbitQueue(queue, durable=True))

            async def publish() -> object:
                return await rabbit_broker.publish(document, queue=target.name, persist=True)

            yield publish
    finally:
        delete_queue(broker_url, queue)


@asynccontextmanager
async def taskiq_publisher(
    broker: str, broker_url: str, queue: str
) -> AsyncIterator[Publish | None]:
    """taskiq's ``kiq`` of a task taking the 1 KiB string: taskiq-redis's
    ``ListQueueBroker`` (``LPUSH``) or taskiq-aio-pika's ``AioPikaBroker`` (a durable
    exchange of its own, a classic queue, persistent messages, confirms)."""
    if not installed("taskiq", "taskiq_redis" if broker == "redis" else "taskiq_aio_pika"):
        yield None
        return
    body = payload(1024)
    if broker == "redis":
        from taskiq_redis import ListQueueBroker

        taskiq_broker: Any = ListQueueBroker(broker_url, queue_name=queue)
    else:
        from taskiq_aio_pika import AioPikaBroker, Exchange, Queue, QueueType

        taskiq_broker = AioPikaBroker(
            broker_url,
            exchange=Exchange(name=queue),
            task_queues=[Queue(name=queue, type=QueueType.CLASSIC)],
            dead_letter_queue=Queue(name=f"{queue}-dead", type=QueueType.CLASSIC),
        )

    @taskiq_broker.task(task_name="bench.echo")  # type: ignore[untyped-decorator, unused-ignore]
    async def echo(text: str) -> int:
        return len(text)

    await taskiq_broker.startup()
    try:

        async def kiq() -> object:
            return await echo.kiq(body)

        yield kiq
    finally:
        await taskiq_broker.shutdown()
        if broker == "redis":
            delete_queue(broker_url, queue)
        else:
            await delete_amqp(broker_url, [queue, f"{queue}-dead"], [queue])


async def delete_amqp(broker_url: str, queues: list[str], exchanges: list[str]) -> None:
    """Delete what taskiq-aio-pika declared (its queues carry arguments that kombu's
    ``delete_queue`` would not declare the same way)."""
    import aio_pika

    with suppress(Exception):
        connection = await aio_pika.connect(broker_url)
        async with connection:
            channel = await connection.channel()
            for name in queues:
                with suppress(Exception):
                    await channel.queue_delete(name)
            for name in exchanges:
                with suppress(Exception):
                    await channel.exchange_delete(name)
