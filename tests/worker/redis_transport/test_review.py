"""What the worker side owes after review: a put-back that is not the message's fault
counts no delivery and blocks no one, held entries a dead worker left are not stranded,
and a Redis too old for the take says so once instead of crash-looping the consumer.

Whatever runs the visibility sweep runs against a private ``redis-server``
(``tests/faults/_private_brokers.py``): the sweep restores every stale record of the
broker it runs on.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import kombu
import pytest
import redis

from celerybridge import ConfigurationError
from celerybridge._constants import STORE_RETRY_PAUSE
from celerybridge._worker.intake.consumer import IntakeConsumer

from ...faults._private_brokers import PrivateRedis
from ._envelopes import envelope
from .conftest import reliable

pytestmark = pytest.mark.integration


class _Hub:
    """The event loop's timer as the intake uses it: what it was asked to run later."""

    def __init__(self) -> None:
        self.later: list[tuple[float, Any, tuple[Any, ...]]] = []

    def call_later(self, delay: float, callback: Any, *args: Any) -> None:
        self.later.append((delay, callback, args))


class _Consumer:
    """The part of Celery's consumer the intake's put-back reads."""

    def __init__(self) -> None:
        self.hub = _Hub()


@pytest.fixture(scope="module")
def private(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path_factory.mktemp("review-redis"))
    server.start()
    yield server
    server.stop()


# -- 1, 12: the replay record down -----------------------------------------------------


def test_putting_back_while_the_replay_record_is_down_counts_no_delivery(
    queue: str, raw: redis.Redis
) -> None:
    """The replay record is down: the intake puts each message back (it is not at
    fault). That put-back counted as a delivery, so after CELERYBRIDGE_MAX_DELIVERIES
    put-backs (~10 s) a good message was dead-lettered as ``deliveries``, "its worker
    died or lost the broker while it ran, every time". And each put-back slept 1 s on
    the worker's hub thread: N prefetched messages stalled consumption N seconds."""
    raw.lpush(queue, json.dumps(envelope(queue)))
    consumer = _Consumer()
    with reliable(celerybridge_max_deliveries=1) as connection:
        channel = connection.default_channel
        for _ in range(3):
            message = channel.basic_get(queue)
            began = time.monotonic()
            IntakeConsumer._put_back(consumer, message, "the replay record is down")  # type: ignore[arg-type]
            assert time.monotonic() - began < STORE_RETRY_PAUSE / 2, "the hub thread slept"
            [(delay, callback, args)] = consumer.hub.later
            consumer.hub.later.clear()
            assert delay == STORE_RETRY_PAUSE
            assert raw.llen(queue) == 0  # held meanwhile, not on the queue
            callback(*args)
            assert raw.llen(queue) == 1
        message = channel.basic_get(queue)
        marked = message.delivery_tag in channel.celerybridge_over_limit
        deliveries = message.properties.get("x-celerybridge-deliveries")
        message.ack()
    assert (marked, deliveries) == (False, None)


def test_a_put_back_settled_meanwhile_is_left_alone(queue: str, raw: redis.Redis) -> None:
    """The timer fires after the message was settled (the worker shut down and put it
    back already): nothing is put back twice."""
    raw.lpush(queue, json.dumps(envelope(queue)))
    consumer = _Consumer()
    with reliable() as connection:
        message = connection.default_channel.basic_get(queue)
        IntakeConsumer._put_back(consumer, message, "the replay record is down")  # type: ignore[arg-type]
        message.ack()
        [(_, callback, args)] = consumer.hub.later
        callback(*args)
    assert raw.llen(queue) == 0


# -- 4: entries held by a worker that died before dead-lettering them -------------------


def _dead_reasons(client: redis.Redis, queue: str) -> list[str]:
    letters = [json.loads(e) for e in client.lrange(f"{queue}.dead", 0, -1)]
    return [letter["headers"]["x-celerybridge-dead-reason"] for letter in letters]


def test_held_entries_are_dead_lettered_when_a_consumer_starts(
    queue: str, raw: redis.Redis
) -> None:
    """The take script moved an entry to ``<queue>.dead.held`` and its worker died before
    wrapping it as a dead letter: it waited there until a later take on that queue held
    something too, which may be never."""
    raw.lpush(f"{queue}.dead.held", b"\xff not json")
    with reliable() as connection:
        consumer = kombu.Consumer(connection.default_channel, [kombu.Queue(queue)])
        consumer.consume()
        consumer.cancel()
    assert raw.llen(f"{queue}.dead.held") == 0
    assert _dead_reasons(raw, queue) == ["not a kombu message: not UTF-8 JSON (UnicodeDecodeError)"]


def test_held_entries_are_dead_lettered_by_the_sweep(private: PrivateRedis) -> None:
    """A consumer already running when another worker died holding entries: its
    periodic sweep (``restore_visible``) drains the holding lists of its queues."""
    queue = f"cb-review-{uuid.uuid4().hex[:8]}"
    client = redis.Redis.from_url(private.url)
    with reliable(private.url) as connection:
        consumer = kombu.Consumer(connection.default_channel, [kombu.Queue(queue)])
        consumer.consume()
        client.lpush(f"{queue}.dead.held", b"[1, 2]")
        connection.default_channel.qos.restore_visible()
        consumer.cancel()
    assert client.llen(f"{queue}.dead.held") == 0
    assert len(_dead_reasons(client, queue)) == 1


# -- 11: a Redis without BLMOVE ---------------------------------------------------------


def test_a_redis_older_than_6_2_stops_the_consumer_with_the_way_out(
    queue: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``BLMOVE`` is Redis 6.2: on an older server every wait failed with "unknown
    command", and Celery restarted the consumer forever."""
    monkeypatch.setattr(redis.Redis, "info", lambda self, *a, **k: {"redis_version": "6.0.16"})
    with reliable() as connection:
        consumer = kombu.Consumer(connection.default_channel, [kombu.Queue(queue)])
        with pytest.raises(ConfigurationError) as caught:
            consumer.consume()
    assert str(caught.value) == (
        "the Redis broker runs Redis 6.0.16; celerybridge's reliable Redis transport needs "
        "Redis 6.2 or later (BLMOVE) with Lua scripting. Upgrade Redis, or opt out with "
        "broker_transport=\"redis\" in the app's config (kombu's transport: a worker killed "
        "while it takes a message may lose it)"
    )


def test_a_redis_refusing_info_is_not_refused(queue: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Managed services may rename or disable ``INFO``: the take itself then tells."""

    def refused(self: Any, *args: Any, **kwargs: Any) -> Any:
        raise redis.ResponseError("unknown command 'INFO'")

    monkeypatch.setattr(redis.Redis, "info", refused)
    with reliable() as connection:
        consumer = kombu.Consumer(connection.default_channel, [kombu.Queue(queue)])
        consumer.consume()
        consumer.cancel()
