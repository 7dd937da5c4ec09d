"""Where the test brokers are, and what is on their queues."""

from __future__ import annotations

import os
import time
from contextlib import suppress
from typing import Any

import kombu
from amqp.exceptions import NotFound
from kombu.exceptions import ChannelError

BROKERS = {
    "redis": os.environ.get("CELERYBRIDGE_TEST_REDIS_URL", "redis://127.0.0.1:6379/2"),
    "amqp": os.environ.get("CELERYBRIDGE_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//"),
}
RESULT_BACKEND = os.environ.get("CELERYBRIDGE_TEST_RESULT_BACKEND", "redis://127.0.0.1:6379/3")


def queue_length(broker_url: str, queue: str) -> int:
    """Messages waiting on ``queue`` (0 if it does not exist)."""
    with kombu.Connection(broker_url) as connection:
        try:
            return int(connection.default_channel.queue_declare(queue=queue, passive=True)[1])
        except (ChannelError, NotFound):
            return 0


def purge(broker_url: str, queue: str) -> None:
    with kombu.Connection(broker_url) as connection, suppress(ChannelError, NotFound):
        connection.default_channel.queue_purge(queue)


def publish_message(
    broker_url: str,
    queue: str,
    body: bytes,
    headers: dict[str, Any],
    content_type: str = "application/json",
    content_encoding: str = "utf-8",
) -> None:
    """A message with exactly these headers and body on ``queue``, sent with kombu as a
    careless (or hostile) sender would."""
    with kombu.Connection(broker_url) as connection:
        connection.Producer().publish(
            body,
            routing_key=queue,
            exchange=queue,
            declare=[kombu.Queue(queue, kombu.Exchange(queue, "direct"), routing_key=queue)],
            headers=headers,
            content_type=content_type,
            content_encoding=content_encoding,
        )


def dead_letters(broker_url: str, queue: str) -> list[dict[str, Any]]:
    """Headers and raw body of each message on ``queue``'s dead-letter queue (consumed)."""
    found = []
    with kombu.Connection(broker_url) as connection:
        channel = connection.default_channel
        # Declared as the worker declares it: on RabbitMQ, reading a queue the worker has
        # not created yet (its first dead letter is still on the way) is an error.
        kombu.Queue(f"{queue}.dead", durable=True)(channel).declare()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            message = channel.basic_get(f"{queue}.dead", no_ack=True)
            if message is not None:
                found.append({**message.headers, "body": message.body})
            elif found:
                break
            else:
                time.sleep(0.1)
    return found
