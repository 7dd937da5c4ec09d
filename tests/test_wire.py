"""The golden wire test: the native Redis publisher writes what kombu writes.

The same call goes through Celery's own ``send_task`` (kombu's Redis transport) and
through :class:`RedisPublisher`; both raw messages are read back from Redis and
compared field by field, with the queue keys and binding tables they touched.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest
import redis

from celerybridge import BridgeSettings
from celerybridge._transports.base import OutgoingMessage
from celerybridge._transports.kombu import KombuPublisher
from celerybridge._transports.redis import RedisPublisher

from ._brokers import BROKERS

pytestmark = pytest.mark.integration
REDIS_URL = BROKERS["redis"]


@pytest.fixture
def raw() -> Iterator[redis.Redis]:
    with redis.Redis.from_url(REDIS_URL) as client:
        yield client


def _queue() -> str:
    return f"cb-wire-{uuid.uuid4().hex[:10]}"


def _keys_of(client: redis.Redis, queue: str) -> set[bytes]:
    return {k for k in client.keys(f"*{queue}*")}


def _drain(client: redis.Redis, queue: str) -> dict[bytes, Any]:
    """Every key mentioning ``queue``: lists popped (one message each), sets read, deleted."""
    found: dict[bytes, Any] = {}
    for key in _keys_of(client, queue):
        if client.type(key) == b"list":
            assert client.llen(key) == 1
            found[key] = json.loads(client.rpop(key) or b"")
        else:
            found[key] = client.smembers(key)
        client.delete(key)
    return found


def _normalise(message: dict[str, Any], queue: str) -> dict[str, Any]:
    """Blank the fields that must differ between two publishers, after checking them.

    - ``delivery_tag``: kombu draws a fresh uuid4 for every message;
    - ``reply_to``: Celery's per-app, per-thread oid (read only by the ``rpc://``
      backend); each publisher has its own;
    - ``eta`` / ``expires``: "now + seconds" at the moment of each publish.
    ``origin`` is not normalised: both run in this process, so both say ``gen<pid>@host``.
    """
    props = message["properties"]
    assert uuid.UUID(props.pop("delivery_tag")).version == 4
    uuid.UUID(props.pop("reply_to"))
    headers = message["headers"]
    for field in ("eta", "expires"):
        if headers[field] is not None:
            stamp = datetime.fromisoformat(headers[field])
            assert stamp.utcoffset() is not None  # timezone-aware, as Celery sends it
            headers[field] = stamp.timestamp()
    return message


CALLS = [
    pytest.param((1, "x"), {"z": 3}, {}, id="plain"),
    pytest.param(("é🙂" * 600,), {"nested": {"a": [1, None, True]}}, {}, id="long-unicode"),
    pytest.param(("x" * 1024,), {}, {}, id="1-KiB-string"),
    pytest.param(("it's a test " * 90, 7, None, 2.5), {}, {}, id="truncated-quoted-args"),
    pytest.param((2,), {}, {"priority": 5, "countdown": 30, "expires": 60}, id="priority-eta"),
    pytest.param((3,), {}, {"priority": 9}, id="priority-9"),
    pytest.param((), {}, {"expires": 2.5}, id="expires-fraction"),
]


@pytest.mark.parametrize(("args", "kwargs", "options"), CALLS)
async def test_native_redis_message_equals_kombus(
    raw: redis.Redis, args: tuple[Any, ...], kwargs: dict[str, Any], options: dict[str, Any]
) -> None:
    settings = BridgeSettings(broker_url=REDIS_URL, fast_path=False)
    queue = _queue()
    task_id = str(uuid.uuid4())
    message = OutgoingMessage(task_id, "wire.task", queue, args, kwargs, options)

    kombu = KombuPublisher(settings)
    try:
        kombu.send(message)
    finally:
        kombu.close()
    reference = _drain(raw, queue)

    native = RedisPublisher(REDIS_URL, timeout=5)
    try:
        await native.publish(message)
    finally:
        await native.aclose()
    ours = _drain(raw, queue)

    # The same keys: the queue list (or its priority list) and both binding tables.
    assert set(ours) == set(reference)
    lists = [k for k, v in reference.items() if isinstance(v, dict)]
    assert len(lists) == 1
    key = lists[0]
    priority = options.get("priority", 0)
    step = {0: b"", 5: b"\x06\x163", 9: b"\x06\x169"}[priority]
    assert key == queue.encode() + step
    assert reference[f"_kombu.binding.{queue}".encode()] == {
        f"{queue}\x06\x16\x06\x16{queue}".encode()
    }
    for name in (f"_kombu.binding.{queue}", f"_kombu.binding_permanent.{queue}"):
        assert ours[name.encode()] == reference[name.encode()]

    theirs_msg, ours_msg = reference[key], ours[key]
    assert list(ours_msg) == list(theirs_msg)  # same top-level fields, same order
    assert list(ours_msg["headers"]) == list(theirs_msg["headers"])
    assert list(ours_msg["properties"]) == list(theirs_msg["properties"])
    # The body is identical byte for byte before any normalisation.
    assert ours_msg["body"] == theirs_msg["body"]
    body = json.loads(base64.b64decode(ours_msg["body"]))
    assert body == [list(args), kwargs, dict.fromkeys(["callbacks", "errbacks", "chain", "chord"])]

    theirs_n, ours_n = _normalise(theirs_msg, queue), _normalise(ours_msg, queue)
    for field in ("eta", "expires"):
        a, b = theirs_n["headers"][field], ours_n["headers"][field]
        assert (a is None) == (b is None)
        if a is not None:
            assert abs(a - b) < 5  # both are "now + the same seconds"
            theirs_n["headers"][field] = ours_n["headers"][field] = "normalised"
    for part in ("headers", "properties"):
        for field, value in theirs_n[part].items():
            assert ours_n[part][field] == value, f"{part}.{field}"
    assert ours_n == theirs_n
