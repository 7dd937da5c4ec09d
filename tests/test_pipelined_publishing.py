"""Publishing with many messages in flight: several Redis batches at once, many
unconfirmed RabbitMQ publishes per channel. Order per caller, a batch cut midway, and
publish timeouts while batches are on the wire, against the real brokers through a proxy
(``tests._proxy``) that delays or cuts the connections."""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import kombu
import pytest
import redis

from celerybridge import Bridge, DelegationError, PublishTimeoutError, remote_task
from celerybridge._constants import PUBLISH_RETRIES
from celerybridge._transports import redis as redis_transport
from celerybridge._transports.amqp import AmqpPublisher
from celerybridge._transports.base import NativePublisher, OutgoingMessage
from celerybridge._transports.redis import RedisPublisher

from ._brokers import BROKERS
from ._proxy import cut_after_replies, proxy

pytestmark = pytest.mark.integration
REDIS_URL, AMQP_URL = BROKERS["redis"], BROKERS["amqp"]
CALLERS, EACH = 12, 10


@remote_task(name="pipelined.note")
def note(caller: int, i: int) -> None: ...


def _queue(broker_url: str) -> Iterator[str]:
    name = f"cb-pipe-{uuid.uuid4().hex[:10]}"
    yield name
    with kombu.Connection(broker_url) as connection:
        connection.default_channel.queue_delete(name)
        if broker_url.startswith("amqp"):
            connection.default_channel.exchange_delete(name)


@pytest.fixture
def queue(broker_url: str) -> Iterator[str]:
    yield from _queue(broker_url)


@pytest.fixture
def redis_queue() -> Iterator[str]:
    yield from _queue(REDIS_URL)


@pytest.fixture
def on_wire(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many Redis batches were on the wire, sampled as each one started."""
    counts: list[int] = []
    original = redis_transport._Batch.run
    running = 0

    async def counted(self: Any) -> None:
        nonlocal running
        running += 1
        counts.append(running)
        try:
            await original(self)
        finally:
            running -= 1

    monkeypatch.setattr(redis_transport._Batch, "run", counted)
    return counts


def _message(queue: str, *args: int) -> OutgoingMessage:
    return OutgoingMessage(str(uuid.uuid4()), "pipelined.note", queue, args, {})


def _publisher(broker: str, url: str, timeout: float = 10) -> NativePublisher[Any]:
    if broker == "redis":
        return RedisPublisher(url, timeout=timeout)
    return AmqpPublisher(url, timeout=timeout)


def _arguments(broker_url: str, queue: str) -> list[list[Any]]:
    """The positional arguments of the messages on ``queue``, in the order a worker
    takes them (oldest first), read without consuming on Redis, consumed on RabbitMQ."""
    if broker_url.startswith("redis"):
        with redis.Redis.from_url(broker_url) as client:
            raw = client.lrange(queue, 0, -1)
        bodies = [base64.b64decode(json.loads(item)["body"]) for item in reversed(raw)]
    else:
        bodies = []
        with kombu.Connection(broker_url) as connection:
            channel = connection.default_channel
            while (message := channel.basic_get(queue, no_ack=True)) is not None:
                bodies.append(message.body)
    return [json.loads(body)[0] for body in bodies]


async def test_each_callers_publishes_land_in_the_order_it_made_them(
    broker: str, broker_url: str, queue: str, on_wire: list[int]
) -> None:
    # Through a delay, so that many publishes (several Redis batches, many unconfirmed
    # AMQP publishes) are on the wire at once while each caller waits for its own.
    async with (
        proxy(broker_url, delay=0.01) as (url, _),
        Bridge(publisher=_publisher(broker, url), publish_timeout=30) as bridge,
    ):
        await bridge.send(note.with_options(queue=queue), (-1, -1), {})  # connects

        async def caller(c: int) -> None:
            for i in range(EACH):
                await bridge.send(note.with_options(queue=queue), (c, i), {})

        if broker == "amqp":  # publishes sent and not yet confirmed, sampled
            channel = await bridge._publisher._underlay()  # type: ignore[union-attr]
            watcher = asyncio.ensure_future(_sample(on_wire, lambda: len(channel.confirmations)))
        with anyio.fail_after(60):
            async with anyio.create_task_group() as group:
                for c in range(CALLERS):
                    group.start_soon(caller, c)
        if broker == "amqp":
            watcher.cancel()
    landed = _arguments(broker_url, queue)[1:]
    assert Counter(c for c, _ in landed) == dict.fromkeys(range(CALLERS), EACH)
    for c in range(CALLERS):
        assert [i for caller, i in landed if caller == c] == list(range(EACH))
    assert max(on_wire) > 1  # not one batch (one confirm) at a time


async def _sample(into: list[int], count: Callable[[], int]) -> None:
    while True:
        into.append(count())
        await asyncio.sleep(0.001)


async def _burst(publisher: RedisPublisher, queue: str, n: int) -> list[BaseException | None]:
    """``n`` publishes started at once (one batch: publish admits without a window)."""
    results = await asyncio.gather(
        *(publisher.publish(_message(queue, i)) for i in range(n)), return_exceptions=True
    )
    return [r if isinstance(r, BaseException) else None for r in results]


async def test_a_redis_batch_cut_midway_accepts_what_was_answered_and_resends_the_rest(
    redis_queue: str,
) -> None:
    queue = redis_queue
    # The first connection forwards the two binding replies and 7 LPUSH replies, then
    # is cut: Redis ran the whole batch, its client heard of 7.
    async with proxy(REDIS_URL, replies=cut_after_replies(2 + 7, then=10**6)) as (url, state):
        publisher = RedisPublisher(url, timeout=10)
        try:
            with anyio.fail_after(30):
                outcomes = await _burst(publisher, queue, 20)
        finally:
            await publisher.aclose()
    assert outcomes == [None] * 20
    assert state.cut == 1
    # The 7 answered ones were not sent again; the 13 unanswered were (at least once).
    landed = Counter(args[0] for args in _arguments(REDIS_URL, queue))
    assert landed == {i: 1 if i < 7 else 2 for i in range(20)}


async def test_unanswered_publishes_of_a_cut_batch_are_told_they_may_not_have_arrived(
    redis_queue: str,
) -> None:
    queue = redis_queue
    # The first connection answers 5 of the 12 LPUSHes; every later one is cut at once.
    async with proxy(REDIS_URL, replies=cut_after_replies(2 + 5, then=0)) as (url, state):
        publisher = RedisPublisher(url, timeout=10)
        try:
            with anyio.fail_after(30):
                outcomes = await _burst(publisher, queue, 12)
            assert state.cut == 1 + PUBLISH_RETRIES
            state.replies = None  # the network heals: the publisher still works
            with anyio.fail_after(10):
                await publisher.publish(_message(queue, 99))
        finally:
            await publisher.aclose()
    assert outcomes[:5] == [None] * 5
    for failure in outcomes[5:]:
        assert isinstance(failure, DelegationError)
        assert str(failure).startswith(f"publishing 'pipelined.note' to {queue!r}: ConnectionError")
        assert str(failure).endswith("; it may or may not have been delivered")
    landed = Counter(args[0] for args in _arguments(REDIS_URL, queue))
    assert all(landed[i] == 1 for i in range(5))  # accepted, and never sent again
    assert landed[99] == 1


async def test_publish_timeouts_while_batches_are_in_flight_leave_the_publisher_usable(
    broker: str, broker_url: str, queue: str
) -> None:
    # Each way 0.2 s: a round trip takes longer than the hasty bridge's publish timeout.
    async with proxy(broker_url, delay=0.2) as (url, _):
        publisher = _publisher(broker, url)
        async with (
            Bridge(publisher=publisher, publish_timeout=30) as patient,
            Bridge(publisher=publisher, publish_timeout=0.1) as hasty,
        ):
            stub = note.with_options(queue=queue)
            await patient.send(stub, (0, 0), {})  # connects and declares: many round trips

            async def hurry(i: int) -> BaseException | None:
                try:
                    await hasty.send(stub, (1, i), {})
                except PublishTimeoutError as exc:
                    return exc
                return None

            with anyio.fail_after(20):  # nothing hangs
                outcomes = await asyncio.gather(*(hurry(i) for i in range(40)))
                await patient.send(stub, (2, 0), {})
            window = publisher._window
            assert (window.messages, window.size) == (0, 0)  # every place given back
    assert all(isinstance(o, PublishTimeoutError) for o in outcomes), outcomes
    # Those beyond the window (32 on RabbitMQ) may have found no room before their
    # deadline: they say they were not sent, and were not.
    sent = [i for i, o in enumerate(outcomes) if str(o).endswith("may not have been delivered")]
    unsent = [i for i, o in enumerate(outcomes) if str(o).endswith("and was not sent")]
    assert len(sent) >= min(40, publisher.window_messages)
    assert len(sent) + len(unsent) == 40
    landed = _arguments(broker_url, queue)
    assert [0, 0] in landed
    assert [2, 0] in landed
    assert len(landed) <= 2 + len(sent)  # the timed-out ones may have arrived, none twice
    assert all([1, i] not in landed for i in unsent)


async def test_closing_the_publisher_with_publishes_in_flight_tells_their_callers(
    broker: str, broker_url: str, queue: str
) -> None:
    async with proxy(broker_url, delay=0.2) as (url, _):
        publisher = _publisher(broker, url)
        await publisher.publish(_message(queue, 0))  # connects and declares
        in_flight = [asyncio.ensure_future(publisher.publish(_message(queue, i))) for i in range(5)]
        await asyncio.sleep(0.05)  # on the wire, not answered
        with anyio.fail_after(10):  # nobody is left waiting
            await publisher.aclose()
            outcomes = await asyncio.gather(*in_flight, return_exceptions=True)
    # Each is accepted (a lone Redis LPUSH may be resent and answered) or told it may
    # or may not have been delivered; none sees a CancelledError it did not ask for.
    failed = [o for o in outcomes if o is not None]
    assert failed
    for failure in failed:
        assert isinstance(failure, DelegationError), repr(failure)
        assert str(failure).endswith("it may or may not have been delivered")
    landed = _arguments(broker_url, queue)
    assert all([i] in landed for i, o in enumerate(outcomes) if o is None)


async def test_a_command_redis_refuses_fails_its_own_publish_not_its_batchs(
    redis_queue: str,
) -> None:
    wrong = f"{redis_queue}-wrong"
    with redis.Redis.from_url(REDIS_URL) as client:
        client.set(wrong, "not a list")  # LPUSH onto it: WRONGTYPE
    publisher = RedisPublisher(REDIS_URL, timeout=10)
    try:
        outcomes = await asyncio.gather(  # one batch: both queues are new
            publisher.publish(_message(redis_queue, 1)),
            publisher.publish(_message(wrong, 2)),
            publisher.publish(_message(redis_queue, 3)),
            return_exceptions=True,
        )
    finally:
        await publisher.aclose()
        with redis.Redis.from_url(REDIS_URL) as client:
            client.delete(wrong, f"_kombu.binding.{wrong}", f"_kombu.binding_permanent.{wrong}")
    assert outcomes[0] is None
    assert outcomes[2] is None
    assert isinstance(outcomes[1], DelegationError)
    assert str(outcomes[1]).startswith(
        f"publishing 'pipelined.note' to {wrong!r}: ResponseError: WRONGTYPE"
    )
    assert _arguments(REDIS_URL, redis_queue) == [[1], [3]]


@pytest.mark.parametrize(("near", "one_at_a_time"), [(10.0, True), (0.0, False)])
async def test_a_near_redis_gets_one_batch_at_a_time_a_far_one_several(
    redis_queue: str,
    monkeypatch: pytest.MonkeyPatch,
    on_wire: list[int],
    near: float,
    one_at_a_time: bool,
) -> None:
    # The same Redis, seen as near (any round trip is under 10 s) or far (none under 0 s).
    monkeypatch.setattr(redis_transport, "REDIS_NEAR", near)
    async with (
        proxy(REDIS_URL, delay=0.005) as (url, _),
        Bridge(publisher=RedisPublisher(url, timeout=10), publish_timeout=30) as bridge,
    ):
        stub = note.with_options(queue=redis_queue)
        await bridge.send(stub, (0, 0), {})  # a first batch: how near Redis is
        await asyncio.gather(*(bridge.send(stub, (1, i), {}) for i in range(200)))
    assert (max(on_wire) == 1) is one_at_a_time
    assert len(_arguments(REDIS_URL, redis_queue)) == 201


async def test_a_lone_publish_whose_connection_keeps_breaking_may_or_may_not_have_arrived(
    redis_queue: str,
) -> None:
    # The first connection (the batch that declares the queue) works; every later one,
    # the lone LPUSH's and its retries', is cut when Redis answers.
    async with proxy(REDIS_URL, replies=cut_after_replies(10**6, then=0)) as (url, state):
        publisher = RedisPublisher(url, timeout=10)
        try:
            await publisher.publish(_message(redis_queue, 0))  # declares: a batch
            with anyio.fail_after(30), pytest.raises(DelegationError) as caught:
                await publisher.publish(_message(redis_queue, 1))  # alone
        finally:
            await publisher.aclose()
    assert state.cut == 1 + PUBLISH_RETRIES
    assert str(caught.value).startswith(
        f"publishing 'pipelined.note' to {redis_queue!r}: ConnectionError"
    )
    assert str(caught.value).endswith("; it may or may not have been delivered")
    assert Counter(args[0] for args in _arguments(REDIS_URL, redis_queue))[1] >= 1  # it did
