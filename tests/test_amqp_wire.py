"""The golden wire test on RabbitMQ: the native AMQP publisher writes what kombu writes.

The same call goes through Celery's own ``send_task`` (kombu on py-amqp) and through
:class:`AmqpPublisher` onto one queue; both raw messages are read back with py-amqp's
``basic_get`` and compared: the body and the encoded content header (every property,
the headers table with its value types and key order) byte for byte, after replacing
only the fields that must differ. The queue, exchange and binding each one declares
are compared as RabbitMQ lists them.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from datetime import datetime
from typing import Any
from urllib.parse import unquote, urlsplit

import amqp
import amqp.serialization
import kombu
import pytest

from celerybridge import BridgeSettings
from celerybridge._transports.amqp import AmqpPublisher
from celerybridge._transports.base import OutgoingMessage
from celerybridge._transports.kombu import KombuPublisher

from ._brokers import BROKERS

pytestmark = pytest.mark.integration
AMQP_URL = BROKERS["amqp"]
VHOST = unquote(urlsplit(AMQP_URL).path[1:]) or "/"


class Got:
    """One message read back: py-amqp's decoded view and the raw content header."""

    def __init__(self, message: amqp.Message, raw_properties: bytes) -> None:
        self.body: bytes = message.body
        self.properties: dict[str, Any] = dict(message.properties)
        self.delivery_info: dict[str, Any] = dict(message.delivery_info)
        self.raw_properties = raw_properties


@pytest.fixture
def channel(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A py-amqp channel whose ``basic_get`` messages keep their raw property bytes."""
    original = amqp.serialization.GenericContent.inbound_header

    def keep_raw(self: Any, buf: Any, offset: int = 0) -> int:
        self.raw_properties = bytes(buf[offset + 12 :])  # after class, weight, body size
        return original(self, buf, offset)  # type: ignore[no-any-return]

    monkeypatch.setattr(amqp.serialization.GenericContent, "inbound_header", keep_raw)
    with kombu.Connection(AMQP_URL) as connection:
        yield connection.default_channel


def _get(channel: Any, queue: str) -> Got:
    message = channel.basic_get(queue, no_ack=True)
    assert message is not None, f"no message on {queue}"
    assert channel.basic_get(queue, no_ack=True) is None  # exactly one
    return Got(message, message.raw_properties)


def _cleanup(channel: Any, *queues: str) -> None:
    for queue in queues:
        channel.queue_delete(queue)
        channel.exchange_delete(queue)


CALLS = [
    pytest.param((1, "x"), {"z": 3}, {}, id="plain"),
    pytest.param(("é🙂" * 600,), {"nested": {"a": [1, None, True, 2.5]}}, {}, id="long-unicode"),
    pytest.param((2,), {}, {"priority": 5, "countdown": 30, "expires": 60}, id="priority-eta"),
    pytest.param((3,), {}, {"priority": 9}, id="priority-9"),
    pytest.param((), {}, {"expires": 2.5}, id="expires-fraction"),
]


@pytest.mark.parametrize(("args", "kwargs", "options"), CALLS)
async def test_native_amqp_message_equals_kombus(
    channel: Any, args: tuple[Any, ...], kwargs: dict[str, Any], options: dict[str, Any]
) -> None:
    queue = f"cb-wire-{uuid.uuid4().hex[:10]}"
    message = OutgoingMessage(str(uuid.uuid4()), "wire.task", queue, args, kwargs, options)
    try:
        kombu_publisher = KombuPublisher(BridgeSettings(broker_url=AMQP_URL, fast_path=False))
        try:
            kombu_publisher.send(message)
        finally:
            kombu_publisher.close()
        theirs = _get(channel, queue)

        # Declares the queue kombu declared: different arguments would be PRECONDITION_FAILED.
        native = AmqpPublisher(AMQP_URL, timeout=5)
        try:
            await native.publish(message)
        finally:
            await native.aclose()
        ours = _get(channel, queue)
    finally:
        _cleanup(channel, queue)

    # The body is identical byte for byte, and is what Celery's protocol v2 says.
    assert ours.body == theirs.body
    body = json.loads(ours.body)
    assert body == [list(args), kwargs, dict.fromkeys(["callbacks", "errbacks", "chain", "chord"])]
    # Routing: the default exchange, routing key = the queue name.
    for got in (theirs, ours):
        assert (got.delivery_info["exchange"], got.delivery_info["routing_key"]) == ("", queue)
        assert got.delivery_info["redelivered"] is False

    # Every property, decoded; only these may differ, each checked before it is replaced:
    # - reply_to: Celery's per-app, per-thread oid (read only by the rpc:// backend);
    #   each publisher has its own;
    # - headers eta / expires: "now + seconds" at the moment of each publish.
    # origin is not normalised: both run in this process, so both say gen<pid>@host.
    expected_keys = {
        "content_type",
        "content_encoding",
        "application_headers",
        "delivery_mode",
        "priority",
        "correlation_id",
        "reply_to",
    } | ({"expiration"} if "expires" in options else set())
    assert set(theirs.properties) == expected_keys
    assert set(ours.properties) == expected_keys
    assert theirs.properties["delivery_mode"] == 2  # persistent
    assert ours.properties["priority"] == options.get("priority", 0)
    assert ours.properties["correlation_id"] == message.task_id
    replacements = [(ours.properties["reply_to"], theirs.properties["reply_to"])]
    for got in (theirs, ours):
        uuid.UUID(got.properties["reply_to"])
    ours_headers = ours.properties["application_headers"]
    theirs_headers = theirs.properties["application_headers"]
    assert list(ours_headers) == list(theirs_headers)  # same keys, same order
    for field in ("eta", "expires"):
        a, b = theirs_headers[field], ours_headers[field]
        assert (a is None) == (b is None), field
        if a is not None:
            stamps = datetime.fromisoformat(a), datetime.fromisoformat(b)
            assert all(s.utcoffset() is not None for s in stamps)  # aware, as Celery sends
            assert abs((stamps[0] - stamps[1]).total_seconds()) < 5
            replacements.append((b, a))
    for old, new in replacements:
        assert len(old.encode()) == len(new.encode())  # so the byte comparison stays exact
        ours.raw_properties = ours.raw_properties.replace(old.encode(), new.encode())
        ours.properties = _replaced(ours.properties, old, new)
    for field, value in theirs.properties.items():
        assert ours.properties[field] == value, field
    # And the encoded content header: flags, every property, the headers table with
    # py-amqp's value types (I for ints, V for None, S, A, F) and key order.
    assert ours.raw_properties == theirs.raw_properties


def _replaced(value: Any, old: str, new: str) -> Any:
    if isinstance(value, dict):
        return {k: _replaced(v, old, new) for k, v in value.items()}
    return new if value == old else value


def _rabbitmqctl(*args: str) -> list[dict[str, Any]]:
    out = subprocess.run(
        ["rabbitmqctl", "-q", *args, "-p", VHOST, "--formatter", "json"],
        check=True,
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout
    rows: list[dict[str, Any]] = json.loads(out)
    return rows


def _declared(queue: str) -> dict[str, Any]:
    """How RabbitMQ lists ``queue``, its exchange and bindings, with the name blanked."""
    queues = _rabbitmqctl(
        "list_queues", "name", "durable", "auto_delete", "exclusive", "arguments", "type"
    )
    exchanges = _rabbitmqctl(
        "list_exchanges", "name", "type", "durable", "auto_delete", "internal", "arguments"
    )
    bindings = _rabbitmqctl(
        "list_bindings",
        "source_name",
        "source_kind",
        "destination_name",
        "destination_kind",
        "routing_key",
        "arguments",
    )

    def blank(row: dict[str, Any]) -> str:
        return json.dumps(row, sort_keys=True).replace(queue, "<queue>")

    return {
        "queue": [blank(q) for q in queues if q["name"] == queue],
        "exchange": [blank(e) for e in exchanges if e["name"] == queue],
        "bindings": sorted(blank(b) for b in bindings if b["destination_name"] == queue),
    }


@pytest.mark.skipif(shutil.which("rabbitmqctl") is None, reason="needs rabbitmqctl on this host")
async def test_native_declares_queue_exchange_and_binding_as_kombu(channel: Any) -> None:
    by_kombu, by_native = (f"cb-decl-{uuid.uuid4().hex[:10]}" for _ in range(2))
    try:
        kombu_publisher = KombuPublisher(BridgeSettings(broker_url=AMQP_URL, fast_path=False))
        native = AmqpPublisher(AMQP_URL, timeout=5)
        try:
            kombu_publisher.send(OutgoingMessage(str(uuid.uuid4()), "t", by_kombu, (), {}))
            await native.publish(OutgoingMessage(str(uuid.uuid4()), "t", by_native, (), {}))
            reference, ours = _declared(by_kombu), _declared(by_native)
            # Celery's queue: durable classic, no arguments, bound to a durable direct
            # exchange of its name (and to the default exchange, as every queue is).
            assert len(reference["queue"]) == len(reference["exchange"]) == 1
            assert len(reference["bindings"]) == 2
            assert ours == reference
            # Each accepts the other's declaration (a mismatch is PRECONDITION_FAILED).
            kombu_publisher.send(OutgoingMessage(str(uuid.uuid4()), "t", by_native, (), {}))
            await native.publish(OutgoingMessage(str(uuid.uuid4()), "t", by_kombu, (), {}))
        finally:
            kombu_publisher.close()
            await native.aclose()
        for queue in (by_kombu, by_native):
            _get_two(channel, queue)
    finally:
        _cleanup(channel, by_kombu, by_native)


def _get_two(channel: Any, queue: str) -> None:
    assert channel.basic_get(queue, no_ack=True) is not None
    assert channel.basic_get(queue, no_ack=True) is not None
    assert channel.basic_get(queue, no_ack=True) is None
