"""Queue declaration against careless settings and a connection that goes away."""

from __future__ import annotations

import asyncio
import json
import subprocess
import uuid
from collections.abc import Iterator
from typing import Any

import kombu
import pytest

from celerybridge import Bridge, BridgeSettings, ConfigurationError
from celerybridge._constants import DEAD_FROM_HEADER, DEAD_KIND_HEADER, DEAD_REASON_HEADER
from celerybridge._dlq import list_dead_letters, replay
from celerybridge._transports import amqp as amqp_transport

from ._brokers import BROKERS, RESULT_BACKEND
from .workers import bindings

AMQP_URL = BROKERS["amqp"]


@pytest.fixture
def queue() -> Iterator[str]:
    """A queue name of its own, deleted (with its exchange) at the end."""
    name = f"cb-queues-hostile-{uuid.uuid4().hex[:10]}"
    yield name
    with kombu.Connection(AMQP_URL) as connection:
        connection.default_channel.queue_delete(name)
        connection.default_channel.exchange_delete(name)


def _close_connection_named(name: str) -> None:
    """Close (only) the RabbitMQ connection whose client properties carry ``name``."""
    listed = subprocess.run(
        ["rabbitmqctl", "-q", "list_connections", "pid", "client_properties"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    pids = [line.split("\t")[0] for line in listed.splitlines() if name in line]
    assert len(pids) == 1, listed
    subprocess.run(
        ["rabbitmqctl", "-q", "close_connection", pids[0], "test"], capture_output=True, check=True
    )


def test_a_locator_rabbitmq_would_answer_by_closing_the_connection_is_refused() -> None:
    # RabbitMQ 3.10 answers a bad x-queue-master-locator with connection.close (541),
    # under every publish sharing the connection.
    with pytest.raises(ConfigurationError) as raised:
        BridgeSettings(queues={"pusher": {"x-queue-master-locator": "min-master"}})
    assert "x-queue-master-locator must be 'min-masters' or 'client-local' or 'random'" in str(
        raised.value
    )


@pytest.mark.parametrize(
    ("queue_name", "message"),
    [
        ("cb-\udc80", "queue must be valid UTF-8, got 'cb-\\udc80'"),
        ("q" * 256, "queue must be at most 255 bytes of UTF-8, got 256 bytes"),
    ],
    ids=["lone-surrogate", "too-long"],
)
def test_a_queue_name_no_broker_can_hold_is_refused_before_anything_is_sent(
    queue_name: str, message: str
) -> None:
    # A lone surrogate reaches RabbitMQ as invalid UTF-8: `rabbitmqctl list_queues` then
    # fails for every user of the broker until the queue is deleted.
    with pytest.raises(ConfigurationError) as raised:  # a bad option value
        bindings.add.with_options(queue=queue_name)
    assert str(raised.value) == message


@pytest.mark.integration
async def test_a_connection_lost_after_the_check_is_sent_again(
    queue: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RabbitMQ drops the connection right after the passive check found no queue: the
    declaration's channel cannot open; the publish goes again once reconnected."""
    checked = amqp_transport._queue_exists
    state: dict[str, Any] = {}

    async def then_the_connection_drops(connection: Any, name: str) -> bool:
        exists = await checked(connection, name)
        if not state.get("closed"):
            state["closed"] = True
            await asyncio.to_thread(_close_connection_named, state["name"])
            for _ in range(100):
                if connection.is_closed:
                    break
                await asyncio.sleep(0.05)
        return exists

    monkeypatch.setattr(amqp_transport, "_queue_exists", then_the_connection_drops)
    settings = BridgeSettings(
        broker_url=AMQP_URL, result_backend=RESULT_BACKEND, publish_timeout=10
    )
    async with Bridge(settings) as bridge:
        publisher: Any = bridge._get_publisher()
        state["name"] = publisher.connection_name
        await bridge.send(bindings.add.with_options(queue=queue), (1, 2), {})
    assert state["closed"]
    with kombu.Connection(AMQP_URL) as connection:
        assert connection.default_channel.queue_declare(queue, passive=True).message_count == 1


def _dead_letter(queue: str) -> None:
    """One dead letter of ``queue``, as a worker's intake would have set it apart."""
    with kombu.Connection(AMQP_URL) as connection:
        connection.Producer().publish(
            json.dumps([[1, 2], {}, {}]),
            exchange="",
            routing_key=f"{queue}.dead",
            content_type="application/json",
            content_encoding="utf-8",
            headers={
                "id": str(uuid.uuid4()),
                "task": "calc.add",
                DEAD_REASON_HEADER: "contract",
                DEAD_FROM_HEADER: queue,
                DEAD_KIND_HEADER: "contract",
            },
        )


@pytest.mark.integration
@pytest.mark.parametrize("quorum", ["queue", "dead-letter queue"])
def test_dead_letters_are_listed_and_replayed_on_quorum_queues(queue: str, quorum: str) -> None:
    with kombu.Connection(AMQP_URL) as connection:
        channel = connection.default_channel
        for name in (queue, f"{queue}.dead"):
            is_quorum = (name == queue) == (quorum == "queue")
            arguments = {"x-queue-type": "quorum"} if is_quorum else None
            channel.queue_declare(name, durable=True, auto_delete=False, arguments=arguments)
    try:
        _dead_letter(queue)
        assert len(list_dead_letters(AMQP_URL, queue)) == 1
        assert len(replay(AMQP_URL, queue, None).replayed) == 1
        with kombu.Connection(AMQP_URL) as connection:
            assert connection.default_channel.queue_declare(queue, passive=True).message_count == 1
    finally:
        with kombu.Connection(AMQP_URL) as connection:
            connection.default_channel.queue_delete(f"{queue}.dead")
