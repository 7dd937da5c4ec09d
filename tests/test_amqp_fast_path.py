"""The AMQP fast path against a real RabbitMQ: reconnects, refusals, closing.

RabbitMQ is shared: no test restarts it. A restart is simulated by having the broker
close this publisher's own connection (``rabbitmqctl close_connection``), which is what
a restarting node does to every client (``CONNECTION_FORCED``).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from urllib.parse import unquote, urlsplit

import anyio
import kombu
import pytest

from celerybridge import DelegationError
from celerybridge._transports.amqp import AmqpPublisher, amqp_url
from celerybridge._transports.base import OutgoingMessage

from ._brokers import BROKERS, queue_length

pytestmark = pytest.mark.integration
AMQP_URL = BROKERS["amqp"]
needs_rabbitmqctl = pytest.mark.skipif(
    shutil.which("rabbitmqctl") is None, reason="needs rabbitmqctl on the broker's host"
)


@pytest.fixture
def queue() -> Iterator[str]:
    name = f"cb-amqp-{uuid.uuid4().hex[:10]}"
    yield name
    with kombu.Connection(AMQP_URL) as connection:
        connection.default_channel.queue_delete(name)
        connection.default_channel.exchange_delete(name)


def _rabbitmqctl(*args: str) -> str:
    return subprocess.run(
        ["rabbitmqctl", *args], check=True, capture_output=True, text=True, timeout=30
    ).stdout


def _connections(name: str) -> list[str]:
    """The broker's pids of the connections whose client called itself ``name``.

    The JSON listing has the client properties but prints pids in a form that
    ``close_connection`` does not take; the plain one has usable pids: join on the
    connection's name (its address pair).
    """
    listed = json.loads(
        _rabbitmqctl("-q", "list_connections", "name", "client_properties", "--formatter", "json")
    )
    ours = {
        row["name"]
        for row in listed
        if ["connection_name", "longstr", name] in row["client_properties"]
    }
    pids = [
        line.split("\t")
        for line in _rabbitmqctl("-s", "list_connections", "pid", "name").splitlines()
    ]
    return [pid for pid, address in pids if address in ours]


def _close_connection(pid: str) -> None:
    _rabbitmqctl("-q", "close_connection", pid, "celerybridge test: simulated restart")


def _message(queue: str, i: int = 0) -> OutgoingMessage:
    return OutgoingMessage(str(uuid.uuid4()), "amqp.task", queue, (i,), {})


def test_kombu_urls_map_to_aio_pika_urls() -> None:
    assert amqp_url("pyamqp://u:p@h:5672//") == "amqp://u:p@h:5672//"
    assert amqp_url("amqps://u:p@h/vh") == "amqps://u:p@h/vh"


@needs_rabbitmqctl
async def test_publisher_reconnects_after_the_broker_closes_its_connection(queue: str) -> None:
    publisher = AmqpPublisher(AMQP_URL, timeout=10)
    try:
        await publisher.publish(_message(queue))
        [pid] = await anyio.to_thread.run_sync(_connections, publisher.connection_name)
        await anyio.to_thread.run_sync(_close_connection, pid)
        # The next publish waits for the reconnection, declares again and is confirmed.
        with anyio.fail_after(10):
            await publisher.publish(_message(queue, 1))
        [new_pid] = await anyio.to_thread.run_sync(_connections, publisher.connection_name)
        assert new_pid != pid
    finally:
        await publisher.aclose()
    assert queue_length(AMQP_URL, queue) == 2
    assert await anyio.to_thread.run_sync(_connections, publisher.connection_name) == []


@needs_rabbitmqctl
async def test_no_confirmed_publish_is_lost_when_the_connection_drops_mid_stream(
    queue: str, caplog: pytest.LogCaptureFixture
) -> None:
    publisher = AmqpPublisher(AMQP_URL, timeout=10)
    confirmed = 0
    closed = anyio.Event()

    async def stream() -> None:
        # Publishes back to back until the connection was closed, and 50 after.
        nonlocal confirmed
        after = 0
        while after < 50:
            await publisher.publish(_message(queue, confirmed))
            confirmed += 1
            after += closed.is_set()

    try:
        await publisher.publish(_message(queue))  # connected and declared
        [pid] = await anyio.to_thread.run_sync(_connections, publisher.connection_name)
        with anyio.fail_after(60), caplog.at_level("INFO", "celerybridge"):
            async with anyio.create_task_group() as group:
                for _ in range(20):
                    group.start_soon(stream)
                await anyio.sleep(0.1)
                await anyio.to_thread.run_sync(_close_connection, pid)
                closed.set()
        [new_pid] = await anyio.to_thread.run_sync(_connections, publisher.connection_name)
    finally:
        await publisher.aclose()
    assert new_pid != pid
    # Publishes were cut off by the close, and sent again once reconnected.
    resent = [r for r in caplog.records if "sending it again once reconnected" in r.message]
    assert resent
    # Every confirmed publish is on the queue; a resent one may be there twice.
    assert queue_length(AMQP_URL, queue) >= confirmed + 1


async def test_a_refused_declaration_is_a_delegation_error_and_the_channel_recovers(
    queue: str,
) -> None:
    # The queue is missing and an exchange of its name is not Celery's direct one:
    # RabbitMQ refuses the declaration (PRECONDITION_FAILED), exactly as it would refuse
    # Celery's own client. (A queue that exists is published to as it is: test_queues.py.)
    with kombu.Connection(AMQP_URL) as connection:
        connection.default_channel.exchange_declare(
            queue, "fanout", durable=True, auto_delete=False
        )
    other = f"{queue}-ok"
    publisher = AmqpPublisher(AMQP_URL, timeout=5)
    try:
        with pytest.raises(DelegationError) as caught:
            await publisher.publish(_message(queue))
        with anyio.fail_after(10):
            await publisher.publish(_message(other))
        assert queue_length(AMQP_URL, other) == 1
    finally:
        await publisher.aclose()
        with kombu.Connection(AMQP_URL) as connection:
            connection.default_channel.queue_delete(other)
            connection.default_channel.exchange_delete(other)
    message = str(caught.value)
    assert message.startswith(f"RabbitMQ refused to declare queue '{queue}' with arguments {{}}: ")
    assert "PRECONDITION_FAILED" in message


async def test_closed_publisher_refuses_to_publish() -> None:
    publisher = AmqpPublisher(AMQP_URL, timeout=5)
    await publisher.aclose()
    await publisher.aclose()  # idempotent
    with pytest.raises(DelegationError, match=r"^the publisher is closed$"):
        await publisher.publish(_message("unused"))


@needs_rabbitmqctl
async def test_a_nacked_publish_is_a_delegation_error_not_retried(
    queue: str, caplog: pytest.LogCaptureFixture
) -> None:
    # A policy on this one queue (the vhost is the tests' own): full at 0 messages, and
    # RabbitMQ nacks what it cannot take. The queue's declared arguments stay Celery's.
    vhost = unquote(urlsplit(AMQP_URL).path[1:]) or "/"
    policy = f"cb-test-{queue}"
    definition = json.dumps({"max-length": 0, "overflow": "reject-publish"})
    await anyio.to_thread.run_sync(
        _rabbitmqctl, "-q", "set_policy", "-p", vhost, "--apply-to", "queues",
        policy, f"^{queue}$", definition,
    )  # fmt: skip
    publisher = AmqpPublisher(AMQP_URL, timeout=5)
    try:
        with caplog.at_level("INFO", "celerybridge"), pytest.raises(DelegationError) as caught:
            await publisher.publish(_message(queue))
    finally:
        await publisher.aclose()
        await anyio.to_thread.run_sync(_rabbitmqctl, "-q", "clear_policy", "-p", vhost, policy)
    assert str(caught.value).startswith(  # multiple=: RabbitMQ may nack several at once
        f"publishing 'amqp.task' to '{queue}': DeliveryError: "
        "Message delivery failed: Basic.Nack(delivery_tag=1, multiple="
    )
    assert not [r for r in caplog.records if "sending it again" in r.message]
    assert queue_length(AMQP_URL, queue) == 0
