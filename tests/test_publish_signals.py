"""Celery's publish signals on the fast path, exactly as ``send_task`` sends them.

The same message goes through Celery's own ``send_task`` (the kombu path) and through
the native publisher of each broker; a receiver records what it is given and changes
the headers, properties and arguments, and the message read back from the broker must
carry those changes, signed.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import kombu
import pytest
from amqp.serialization import loads as amqp_loads
from celery.signals import after_task_publish, before_task_publish, task_sent
from hypothesis import given, settings
from hypothesis import strategies as st

from celerybridge import BridgeSettings, DelegationError
from celerybridge._constants import SERVICE_HEADER
from celerybridge._queues import QueuePlan
from celerybridge._signing import Signer
from celerybridge._transports._errors import UNBUILDABLE
from celerybridge._transports.amqp import AmqpPublisher
from celerybridge._transports.base import NativePublisher, OutgoingMessage, Publisher
from celerybridge._transports.kombu import KombuPublisher
from celerybridge._transports.redis import RedisPublisher

from ._brokers import BROKERS, purge
from ._strategies import ANYTHING

pytestmark = pytest.mark.integration
KEY = "signals-test-key-" + "s" * 32


class Receivers:
    """Connected to both publish signals: records each call, and (``change``) changes a
    header, a property and an argument of the message, as instrumentation may."""

    def __init__(self, *, change: bool) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.change = change

    def before(self, signal: object, **kwargs: Any) -> None:
        self.calls.append(("before", copy.deepcopy(kwargs)))
        if self.change:
            kwargs["headers"]["traceparent"] = "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"
            kwargs["headers"][SERVICE_HEADER] = "changed-by-receiver"  # a signed header
            kwargs["properties"]["priority"] = 7
            kwargs["body"][1]["added"] = "by a receiver"

    def after(self, signal: object, **kwargs: Any) -> None:
        self.calls.append(("after", copy.deepcopy(kwargs)))

    def sent(self, signal: object, **kwargs: Any) -> None:  # Celery's deprecated task_sent
        self.calls.append(("sent", copy.deepcopy(kwargs)))


@pytest.fixture
def receivers(request: pytest.FixtureRequest) -> Iterator[Receivers]:
    spy = Receivers(change=getattr(request, "param", False))
    before_task_publish.connect(spy.before)
    after_task_publish.connect(spy.after)
    task_sent.connect(spy.sent)
    yield spy
    before_task_publish.disconnect(spy.before)
    after_task_publish.disconnect(spy.after)
    task_sent.disconnect(spy.sent)


def _publisher(path: str, broker_url: str, signer: Signer | None) -> Publisher:
    if path == "kombu":
        key = signer and KEY
        return KombuPublisher(BridgeSettings(broker_url=broker_url, signing_key=key))
    if broker_url.startswith("redis"):
        return RedisPublisher(broker_url, timeout=5, signer=signer)
    return AmqpPublisher(broker_url, timeout=5, signer=signer)


def _message(queue: str) -> OutgoingMessage:
    return OutgoingMessage(
        task_id=str(uuid.uuid4()),
        task_name="calc.add",
        queue=queue,
        args=(1, "two"),
        kwargs={"z": [3]},
        options={"countdown": 5, "expires": 60, "priority": 3, "headers": {"custom": "x"}},
    )


def _take(broker_url: str, queue: str) -> kombu.Message:
    """The one message on ``queue``, as a worker's kombu receives it."""
    with kombu.Connection(broker_url) as connection:
        message = connection.default_channel.basic_get(queue, no_ack=True)
        assert message is not None, f"nothing on {queue}"
        return message


def _normalised(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Signal arguments with what must differ between two publishers blanked: the
    ``reply_to`` oid (one per publisher), the eta/expires instants, and so the
    signature over them."""
    kwargs = copy.deepcopy(kwargs)
    if "headers" not in kwargs:  # task_sent: the eta alone
        assert kwargs["eta"] is not None
        return {**kwargs, "eta": "<instant>"}
    if "properties" in kwargs:  # before_task_publish only
        uuid.UUID(kwargs["properties"].pop("reply_to"))
    for field in ("eta", "expires"):
        assert kwargs["headers"][field] is not None
        kwargs["headers"][field] = "<instant>"
    if "x-celerybridge-signature" in kwargs["headers"]:
        kwargs["headers"]["x-celerybridge-signature"] = "<signature>"
    if "declare" in kwargs:
        kwargs["declare"] = [
            (q.name, q.exchange.name, q.exchange.type, q.routing_key, q.queue_arguments)
            for q in kwargs["declare"]
        ]
    return kwargs


async def _publish(path: str, broker: str, queue: str, message: OutgoingMessage) -> None:
    signer = Signer(KEY, 300)
    publisher = _publisher(path, BROKERS[broker], signer)
    try:
        await publisher.publish(message)
    finally:
        await publisher.aclose()


@pytest.mark.parametrize("broker", sorted(BROKERS))
async def test_the_fast_path_sends_the_signals_send_task_sends(
    broker: str, receivers: Receivers
) -> None:
    queue = f"cb-signals-{uuid.uuid4().hex[:8]}"
    message = _message(queue)
    try:
        await _publish("kombu", broker, queue, message)
        kombus, receivers.calls[:] = list(receivers.calls), []
        await _publish("fast", broker, queue, message)
        natives = list(receivers.calls)
    finally:
        purge(BROKERS[broker], queue)
    assert [name for name, _ in kombus] == ["before", "after", "sent"]
    assert [name for name, _ in natives] == ["before", "after", "sent"]
    for (_, native), (_, kombu_) in zip(natives, kombus, strict=True):
        assert _normalised(native) == _normalised(kombu_)
    before = natives[0][1]
    assert before["sender"] == "calc.add"
    assert before["body"] == ((1, "two"), {"z": [3]}, {
        "callbacks": None, "errbacks": None, "chain": None, "chord": None,
    })  # fmt: skip
    assert (before["exchange"], before["routing_key"]) == ("", queue)
    assert before["properties"]["priority"] == 3
    assert before["properties"]["expiration"] == 60
    assert before["headers"]["custom"] == "x"
    # The signature is the last thing added, after every receiver ran: after_task_publish
    # sees it, before_task_publish does not.
    assert "x-celerybridge-signature" not in before["headers"]
    assert "x-celerybridge-signature" in natives[1][1]["headers"]


@pytest.mark.parametrize("receivers", [True], indirect=True)
@pytest.mark.parametrize("path", ["fast", "kombu"])
@pytest.mark.parametrize("broker", sorted(BROKERS))
async def test_what_a_receiver_changes_is_sent_and_signed(
    broker: str, path: str, receivers: Receivers
) -> None:
    queue = f"cb-signals-{uuid.uuid4().hex[:8]}"
    try:
        await _publish(path, broker, queue, _message(queue))
        sent = _take(BROKERS[broker], queue)
    finally:
        purge(BROKERS[broker], queue)
    assert sent.headers["traceparent"].startswith("00-abab")
    assert sent.headers[SERVICE_HEADER] == "changed-by-receiver"
    assert json.loads(sent.body)[1] == {"z": [3], "added": "by a receiver"}
    assert sent.properties["priority"] == 7
    refusal = Signer(KEY, 300).refusal(
        sent.headers,
        sent.body,
        content_type=sent.content_type,
        content_encoding=sent.content_encoding,
    )
    assert refusal is None


@pytest.mark.parametrize("broker", sorted(BROKERS))
async def test_after_task_publish_is_not_sent_for_a_message_the_broker_never_took(
    broker: str, receivers: Receivers
) -> None:
    closed_port = BROKERS[broker].replace("6379", "1").replace("5672", "1")
    publisher = _publisher("fast", closed_port, None)
    try:
        with pytest.raises(DelegationError):
            await publisher.publish(_message("cb-signals-nowhere"))
    finally:
        await publisher.aclose()
    assert [name for name, _ in receivers.calls] == ["before"]


# -- receivers that break the message ---------------------------------------------------


def _object_in_kwargs(**kwargs: Any) -> None:
    kwargs["body"][1]["when"] = object()  # JSON cannot carry it


def _object_in_header(**kwargs: Any) -> None:
    kwargs["headers"]["x-opaque"] = object()


def _datetime_in_signed_header(**kwargs: Any) -> None:
    kwargs["headers"]["headers"] = {"sent": datetime.now(UTC)}


def _priority_word(**kwargs: Any) -> None:
    kwargs["properties"]["priority"] = "high"


def _expiration_word(**kwargs: Any) -> None:
    kwargs["properties"]["expiration"] = "soon"


def _priority_too_large(**kwargs: Any) -> None:
    kwargs["properties"]["priority"] = 300  # AMQP's priority is one octet


@pytest.fixture
def receiver(request: pytest.FixtureRequest) -> Iterator[Callable[..., None]]:
    """Connects ``request.param`` (a function of the signal's arguments) to
    ``before_task_publish`` for one test."""
    change: Callable[..., None] = request.param

    def before(signal: object, **kwargs: Any) -> None:
        change(**kwargs)

    before_task_publish.connect(before, weak=False)
    yield change
    before_task_publish.disconnect(before)


@pytest.mark.parametrize(
    "receiver",
    [
        _object_in_kwargs,
        _object_in_header,
        _datetime_in_signed_header,
        _priority_word,
        _expiration_word,
        _priority_too_large,
    ],
    indirect=True,
    ids=lambda f: f.__name__.strip("_"),
)
@pytest.mark.parametrize("path", ["fast", "kombu"])
@pytest.mark.parametrize("broker", sorted(BROKERS))
async def test_a_receiver_breaking_the_message_is_a_delegation_error(
    broker: str, path: str, receiver: Callable[..., None]
) -> None:
    queue = f"cb-signals-{uuid.uuid4().hex[:8]}"
    publisher = _publisher(path, BROKERS[broker], Signer(KEY, 300))
    try:
        try:
            await asyncio.wait_for(publisher.publish(_message(queue)), 10)
        except DelegationError:
            return  # refused, nothing sent (the kombu path may turn some values into JSON)
        sent = _take(BROKERS[broker], queue)
    finally:
        await publisher.aclose()
        purge(BROKERS[broker], queue)
    # Sent: then exactly as signed.
    refusal = Signer(KEY, 300).refusal(
        sent.headers,
        sent.body,
        content_type=sent.content_type,
        content_encoding=sent.content_encoding,
    )
    assert refusal is None


def _native(kind: str) -> NativePublisher[Any]:
    """A native publisher, never connected: only its message building is used."""
    if kind == "redis":
        return RedisPublisher(BROKERS["redis"], timeout=5, signer=Signer(KEY, 300))
    return AmqpPublisher(BROKERS["amqp"], timeout=5, signer=Signer(KEY, 300))


@settings(max_examples=150, deadline=None)
@given(
    kind=st.sampled_from(["redis", "amqp"]),
    header=ANYTHING,
    prop=st.sampled_from(["priority", "expiration", "correlation_id", "reply_to", "other"]),
    value=ANYTHING,
    argument=ANYTHING,
)
def test_whatever_a_receiver_leaves_is_built_and_signed_or_refused(
    kind: str, header: Any, prop: str, value: Any, argument: Any
) -> None:
    def before(signal: object, **kwargs: Any) -> None:
        kwargs["headers"]["x-anything"] = header
        kwargs["properties"][prop] = value
        kwargs["body"][1]["anything"] = argument

    publisher = _native(kind)
    message = _message("cb-signals-built")
    before_task_publish.connect(before, weak=False)
    try:
        _, framed = publisher._build(message)
    except UNBUILDABLE:
        return  # publish() turns it into a DelegationError; nothing was built
    finally:
        before_task_publish.disconnect(before)
    if kind == "redis":
        document = json.loads(framed[1])
        headers, body = document["headers"], base64.b64decode(document["body"])
    else:
        headers, body = amqp_loads("F", framed[1].encoded_headers, 0)[0][0], framed[0]
    refusal = Signer(KEY, 300).refusal(headers, body)
    assert refusal is None


@pytest.mark.parametrize(
    "poison",
    [
        pytest.param({"headers": {"x-context": "b" * 200_000}}, id="header-over-frame-max"),
        pytest.param({"properties": {"expiration": -5}}, id="negative-expiration"),
    ],
)
@pytest.mark.parametrize("path", ["fast", "kombu"])
async def test_one_message_a_receiver_broke_fails_alone(path: str, poison: dict[str, Any]) -> None:
    """RabbitMQ closes the connection for a header frame over ``frame_max`` and the
    channel for a negative TTL: every publish sharing them would fail with it. Such a
    message is refused before it is sent."""
    url, queue = BROKERS["amqp"], f"cb-signals-{uuid.uuid4().hex[:8]}"

    def bad(signal: object, **kwargs: Any) -> None:
        if kwargs["headers"]["id"].startswith("bad-"):
            for part, values in poison.items():
                kwargs[part].update(values)

    before_task_publish.connect(bad, weak=False)
    publisher = _publisher(path, url, None)
    try:
        await publisher.publish(_message(queue))  # connected, the queue declared
        poisoned = replace(_message(queue), task_id="bad-" + str(uuid.uuid4()))

        async def outcome(message: OutgoingMessage) -> str:
            try:
                await asyncio.wait_for(publisher.publish(message), 20)
            except DelegationError:
                return "refused"
            return "sent"

        results = await asyncio.gather(
            outcome(poisoned), *(outcome(_message(queue)) for _ in range(20))
        )
    finally:
        before_task_publish.disconnect(bad)
        await publisher.aclose()
        purge(url, queue)
    assert results == ["refused"] + ["sent"] * 20


@pytest.mark.parametrize("path", ["fast", "kombu"])
async def test_a_failed_publish_leaves_no_opentelemetry_span_current(path: str) -> None:
    """OpenTelemetry's receiver keeps its publish span current until
    ``after_task_publish``, which a failed publish never gets: the span must stay with
    that publish, not become the parent of everything the caller does next. (It does so
    for a task the process's current Celery app knows, as a worker delegating to a task
    it also serves.)"""
    from celery import current_app
    from opentelemetry import trace
    from opentelemetry.instrumentation.celery import CeleryInstrumentor
    from opentelemetry.sdk.trace import TracerProvider

    name = f"signals.registered_{uuid.uuid4().hex[:6]}"

    def body() -> None:
        pass

    current_app.task(name=name)(body)
    provider = TracerProvider()
    instrumentor = CeleryInstrumentor()
    instrumentor.instrument(tracer_provider=provider)
    publisher = _publisher(path, BROKERS["redis"].replace("6379", "1"), None)  # closed port
    try:
        with provider.get_tracer("test").start_as_current_span("request") as request:
            with pytest.raises(DelegationError):
                await publisher.publish(replace(_message("cb-signals-nowhere"), task_name=name))
            current = trace.get_current_span()
    finally:
        await publisher.aclose()
        instrumentor.uninstrument()
        current_app.tasks.pop(name, None)
    assert current is request


async def test_the_signals_show_the_queue_as_configured_on_both_paths(receivers: Receivers) -> None:
    """``declare`` lists the queue as the publisher would declare it: with the
    arguments ``CELERYBRIDGE_QUEUES`` gives (here a priority queue), on both paths."""
    queue = f"cb-signals-{uuid.uuid4().hex[:8]}"
    queues = {queue: {"x-max-priority": 10}}
    url = BROKERS["amqp"]
    fast = AmqpPublisher(url, timeout=5, queues=QueuePlan(queues))
    slow = KombuPublisher(BridgeSettings(broker_url=url, queues=queues))
    try:
        for publisher in (fast, slow):
            await publisher.publish(_message(queue))
            await publisher.aclose()
    finally:
        with kombu.Connection(url) as connection:
            connection.default_channel.queue_delete(queue)
            connection.default_channel.exchange_delete(queue)
    declared = [
        [(q.name, q.exchange.name, q.exchange.type, q.routing_key, q.queue_arguments)
         for q in kwargs["declare"]]
        for name, kwargs in receivers.calls
        if name == "before"
    ]  # fmt: skip
    assert declared == [[(queue, queue, "direct", queue, {"x-max-priority": 10})]] * 2


def _app_id(**kwargs: Any) -> None:
    kwargs["properties"]["app_id"] = "billing"


@pytest.mark.parametrize("receiver", [_app_id], indirect=True, ids=["app_id"])
@pytest.mark.parametrize("broker", sorted(BROKERS))
async def test_other_properties_a_receiver_adds_are_not_sent_on_the_fast_path(
    broker: str, receiver: Callable[..., None]
) -> None:
    """The fast path frames the properties Celery's messages have; one a receiver adds
    (``app_id`` here) reaches the broker on the kombu path only (docs/delegation.md)."""
    sent: dict[str, Any] = {}
    for path in ("fast", "kombu"):
        queue = f"cb-signals-{uuid.uuid4().hex[:8]}"
        try:
            await _publish(path, broker, queue, _message(queue))
            sent[path] = _take(BROKERS[broker], queue).properties
        finally:
            purge(BROKERS[broker], queue)
    assert "app_id" not in sent["fast"]
    assert sent["kombu"]["app_id"] == "billing"
