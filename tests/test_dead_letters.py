"""What a celerybridge worker cannot accept goes to ``<queue>.dead``; the caller gets a
typed error instead of waiting for nothing."""

from __future__ import annotations

import pickle
import time
import uuid
from typing import Any

import kombu
import pytest

from celerybridge import Bridge, DeadLetteredError

from ._brokers import purge, queue_length
from ._workers import Worker
from .workers import bindings

pytestmark = pytest.mark.integration


def publish_raw(broker_url: str, queue: str, body: bytes, content_type: str, task: str) -> str:
    """A protocol-v2 task message with any body, as a careless sender would send it."""
    task_id = str(uuid.uuid4())
    headers = {"lang": "py", "task": task, "id": task_id, "root_id": task_id}
    with kombu.Connection(broker_url) as connection:
        connection.Producer().publish(
            body,
            routing_key=queue,
            exchange=queue,
            declare=[kombu.Queue(queue, kombu.Exchange(queue, "direct"), routing_key=queue)],
            headers=headers,
            content_type=content_type,
            content_encoding="binary",
        )
    return task_id


def dead_letters(broker_url: str, queue: str) -> list[dict[str, Any]]:
    """Headers and raw body of each message on ``queue``'s dead-letter queue (consumed)."""
    found = []
    with kombu.Connection(broker_url) as connection:
        channel = connection.default_channel
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


@pytest.mark.parametrize(
    ("content_type", "task", "reason"),
    [
        (
            "application/x-python-serialize",
            "calc.add",
            "cannot decode a 'application/x-python-serialize' body: Refusing to deserialize "
            "untrusted content of type pickle (application/x-python-serialize)",
        ),
        ("application/json", "calc.add_v9", "no task 'calc.add_v9' on this worker"),
    ],
    ids=["pickle", "unknown-version"],
)
async def test_refused_message_goes_to_the_dead_letter_queue_and_the_caller_hears(
    bridge: Bridge,
    bridge_worker: Worker,
    broker_url: str,
    content_type: str,
    task: str,
    reason: str,
) -> None:
    queue = bridge_worker.queue
    body = (
        pickle.dumps(((1, 2), {}, {}))
        if content_type == "application/x-python-serialize"
        else b'[[1, 2], {}, {"callbacks": null, "errbacks": null, "chain": null, "chord": null}]'
    )
    task_id = publish_raw(broker_url, queue, body, content_type, task)

    with pytest.raises(DeadLetteredError) as caught:
        await bridge.handle(bindings.add, task_id).result(timeout=20)
    assert caught.value.remote_type == "DeadLettered"
    assert caught.value.remote_message == reason

    [dead] = dead_letters(broker_url, queue)
    assert dead["id"] == task_id
    assert dead["task"] == task
    assert dead["x-celerybridge-dead-reason"] == reason
    assert dead["x-celerybridge-dead-from"] == queue
    assert dead["body"] == body  # untouched: it can be fixed and replayed
    assert queue_length(broker_url, queue) == 0
    purge(broker_url, f"{queue}.dead")
