"""Hostile messages against a real ``celery worker`` on Redis and RabbitMQ.

Each case is one that took the worker down, wedged it or ran with the wrong shape before
the intake gate (issue: "Worker intake that no message can crash, wedge or fool"). After
each: the message is on ``<queue>.dead`` with its reason and kind, the worker is the same
process, and a good call still runs.
"""

from __future__ import annotations

import json
import sys
import uuid
from typing import Any

import amqp
import anyio
import kombu
import pytest
import redis

from celerybridge import Bridge, DeadLetteredError
from celerybridge._transports._protocol import Origin, task_message
from celerybridge._transports.base import OutgoingMessage

from ..._brokers import dead_letters, publish_message, queue_length
from ..._workers import Worker
from ...workers import bindings

pytestmark = pytest.mark.integration

EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


def good_headers(task_id: str, task: str = "calc.add") -> dict[str, Any]:
    """The headers celerybridge's own publisher writes for ``task``."""
    message = OutgoingMessage(task_id, task, "q", (1, 2), {})
    return dict(task_message(message, Origin()).headers)


def body(*parts: Any) -> bytes:
    return json.dumps(list(parts)).encode()


# (case id, body, header changes, content type, the reason's start, the kind)
CASES: list[tuple[str, bytes, dict[str, Any], str, str, str]] = [
    ("one-item body", body(["k", "x"]), {}, "application/json",
     "the body must be a JSON array [args, kwargs, embed]", "malformed"),
    ("object body", b'{"args": [1, 2]}', {}, "application/json",
     "the body must be a JSON array [args, kwargs, embed]", "malformed"),
    ("embed a string", body([1, 2], {}, "zzz"), {}, "application/json",
     "the body's third part must be a JSON object, not a string", "malformed"),
    ("args a string", body("☃x", {}, EMBED), {}, "application/json",
     "args must be a JSON array, not a string", "malformed"),
    ("args an object", body({"x": 1}, {}, EMBED), {}, "application/json",
     "args must be a JSON array, not an object", "malformed"),
    ("kwargs an array", body([1, 2], [], EMBED), {}, "application/json",
     "kwargs must be a JSON object, not an array", "malformed"),
    ("unknown embed key", body([1, 2], {}, {**EMBED, "link": None}), {}, "application/json",
     "unknown keys in the body's third part: 'link'", "malformed"),
    ("callbacks garbage", body([1, 2], {}, {**EMBED, "callbacks": [7]}), {}, "application/json",
     "callbacks: a signature must be an object, not an integer", "malformed"),
    ("timelimit abc", body([1, 2], {}, EMBED), {"timelimit": "abc"}, "application/json",
     "header 'timelimit' must be a pair of seconds (numbers >= 0) or nulls, not a string",
     "malformed"),
    ("retries a string", body([1, 2], {}, EMBED), {"retries": "1"}, "application/json",
     "header 'retries' must be a non-negative integer, not a string", "malformed"),
    ("eta not a date", body([1, 2], {}, EMBED), {"eta": "tomorrow"}, "application/json",
     "header 'eta' must be an ISO 8601 date and time the worker can convert, not a string",
     "malformed"),
    ("callbacks header", body([1, 2], {}, {}), {"callbacks": [{"task": "calc.fail"}]},
     "application/json",
     "header 'callbacks' is reserved: the worker sets it from the body or the broker",
     "malformed"),
    ("application/data", body([1, 2], {}, EMBED), {}, "application/data",
     "content type 'application/data' refused: only application/json is accepted",
     "malformed"),
    ("pickle", b"\x80\x04K\x01.", {}, "application/x-python-serialize",
     "content type 'application/x-python-serialize' refused", "malformed"),
    ("deep nesting", b"[" * 100_000 + b"]" * 100_000, {}, "application/json",
     "the body nests deeper than 32 levels", "malformed"),
    ("not utf-8", b"[[\xff], {}, {}]", {}, "application/json",
     "the body is not UTF-8", "malformed"),
]  # fmt: skip

# Headers whose value makes the id unreadable: the message is kept, no task is failed.
ID_CASES: list[tuple[str, dict[str, Any], str]] = [
    ("task a list", {"task": ["calc.add"]},
     "header 'task' must be a non-empty string of printable characters, not an array"),
    ("id a list", {"id": ["x"]},
     "header 'id' must be a non-empty string of printable characters, not an array"),
    ("protocol 1", {"task": None},
     "header 'task' must be a non-empty string of printable characters, not null"),
]  # fmt: skip


async def good_call_runs(bridge: Bridge, worker: Worker) -> None:
    add = bindings.add.with_options(queue=worker.queue)
    handle = await bridge.send(add, (20, 22), {})
    assert (await handle.result(timeout=10)).value == 42


def alive(worker: Worker, pid: int) -> None:
    assert worker.running, worker.log()
    assert worker.process is not None
    assert worker.process.pid == pid
    assert "Unrecoverable error" not in worker.log()


@pytest.mark.parametrize(
    ("body_bytes", "changes", "content_type", "reason", "kind"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
async def test_a_malformed_message_is_dead_lettered_and_its_caller_hears(
    bridge: Bridge,
    bridge_worker: Worker,
    broker_url: str,
    body_bytes: bytes,
    changes: dict[str, Any],
    content_type: str,
    reason: str,
    kind: str,
) -> None:
    assert bridge_worker.process is not None
    pid = bridge_worker.process.pid
    task_id = str(uuid.uuid4())
    headers = {**good_headers(task_id), **changes}
    publish_message(broker_url, bridge_worker.queue, body_bytes, headers, content_type)

    with pytest.raises(DeadLetteredError) as caught:
        await bridge.handle(bindings.add, task_id).result(timeout=10)
    assert caught.value.remote_message.startswith(reason)
    [dead] = await anyio.to_thread.run_sync(dead_letters, broker_url, bridge_worker.queue)
    assert dead["id"] == task_id
    assert dead["x-celerybridge-dead-reason"].startswith(reason)
    assert dead["x-celerybridge-dead-kind"] == kind
    assert dead["x-celerybridge-dead-from"] == bridge_worker.queue
    sent = body_bytes if isinstance(dead["body"], bytes) else body_bytes.decode()
    assert dead["body"] == sent  # kept as it came
    await good_call_runs(bridge, bridge_worker)
    alive(bridge_worker, pid)
    assert f"calc.add[{task_id}] received" not in bridge_worker.log()


@pytest.mark.parametrize(
    ("changes", "reason"), [case[1:] for case in ID_CASES], ids=[case[0] for case in ID_CASES]
)
async def test_a_message_without_a_readable_task_or_id_is_kept_and_the_worker_goes_on(
    bridge: Bridge,
    bridge_worker: Worker,
    broker_url: str,
    changes: dict[str, Any],
    reason: str,
) -> None:
    assert bridge_worker.process is not None
    pid = bridge_worker.process.pid
    headers = {**good_headers(str(uuid.uuid4())), **changes}
    publish_message(broker_url, bridge_worker.queue, body([1, 2], {}, EMBED), headers)

    [dead] = await anyio.to_thread.run_sync(dead_letters, broker_url, bridge_worker.queue)
    assert dead["x-celerybridge-dead-reason"] == reason
    assert dead["x-celerybridge-dead-kind"] == "malformed"
    await good_call_runs(bridge, bridge_worker)
    alive(bridge_worker, pid)


async def test_messages_that_wedged_a_worker_no_longer_hold_its_pool(
    bridge: Bridge, bridge_worker: Worker, broker_url: str
) -> None:
    """A string as the body's third part was never finished nor acked: the pool's four
    slots filled up and the worker took no more work. Now each is refused at once."""
    for _ in range(bridge_worker.concurrency * 2):
        headers = good_headers(str(uuid.uuid4()))
        publish_message(broker_url, bridge_worker.queue, body(["k"], {}, "zzz"), headers)
    await good_call_runs(bridge, bridge_worker)
    dead = await anyio.to_thread.run_sync(dead_letters, broker_url, bridge_worker.queue)
    assert len(dead) == bridge_worker.concurrency * 2
    assert queue_length(broker_url, bridge_worker.queue) == 0


RAW_ENTRIES = [
    b"not json at all",
    b"\xff\xfe\x00garbage",
    b"[1, 2, 3]",
    b'{"body": "e30=", "headers": "a string", "properties": {}}',
    b'{"body": "!!! not base64 !!!", "headers": {}, "content-type": "application/json",'
    b' "properties": {"body_encoding": "base64", "delivery_tag": "t",'
    b' "delivery_info": {"exchange": "", "routing_key": "q"}}}',
    b'{"body": "e30=", "headers": {}}',
    b'{"body": "e30=", "headers": null, "properties": {"delivery_tag": "t",'
    b' "delivery_info": {"exchange": "", "routing_key": "q"}}}',
    b"[" * 100_000,
]


@pytest.mark.parametrize("broker", ["redis"])
@pytest.mark.parametrize("entry", RAW_ENTRIES, ids=range(len(RAW_ENTRIES)))
async def test_a_raw_redis_entry_that_is_no_message_is_kept_raw_and_the_worker_goes_on(
    bridge: Bridge, bridge_worker: Worker, broker_url: str, entry: bytes
) -> None:
    assert bridge_worker.process is not None
    pid = bridge_worker.process.pid
    client = redis.Redis.from_url(broker_url)
    client.lpush(bridge_worker.queue, entry)

    [dead] = await anyio.to_thread.run_sync(dead_letters, broker_url, bridge_worker.queue)
    assert dead["body"] == entry  # exactly what was pushed, nothing lost
    assert dead["x-celerybridge-dead-kind"] == "raw"
    assert dead["x-celerybridge-dead-reason"].startswith(("not a kombu message", "a raw entry"))
    assert dead["x-celerybridge-dead-from"] == bridge_worker.queue
    await good_call_runs(bridge, bridge_worker)
    alive(bridge_worker, pid)


def publish_deep_headers(broker_url: str, queue: str, depth: int, task_id: str) -> None:
    """An AMQP message whose header table nests ``depth`` levels (py-amqp writes tables
    recursively, so the sender needs a high recursion limit; the reader needed one too)."""
    nested: dict[str, Any] = {}
    innermost = nested
    for _ in range(depth):
        innermost["a"] = innermost = {}
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, depth * 3 + 1000))
    try:
        with kombu.Connection(broker_url) as connection:
            connection.default_channel.basic_publish(
                amqp.basic_message.Message(
                    body([1, 2], {}, EMBED),
                    content_type="application/json",
                    content_encoding="utf-8",
                    application_headers={"task": "calc.add", "id": task_id, "x": nested},
                ),
                exchange="",
                routing_key=queue,
            )
    finally:
        sys.setrecursionlimit(limit)


@pytest.mark.parametrize("broker", ["amqp"])
@pytest.mark.parametrize(
    ("depth", "reason"),
    [
        (3_000, "unreadable message: its properties or headers cannot be read"),
        (15_000, "unreadable message: its properties or headers cannot be read"),
        (600, "the headers nest deeper than 32 levels"),
    ],
)
async def test_amqp_headers_nested_too_deep_for_the_reader_are_dead_lettered(
    bridge: Bridge, bridge_worker: Worker, broker_url: str, depth: int, reason: str
) -> None:
    """py-amqp raised RecursionError out of the consumer: the worker died, and every
    restarted one on the same message."""
    assert bridge_worker.process is not None
    pid = bridge_worker.process.pid
    task_id = str(uuid.uuid4())
    await anyio.to_thread.run_sync(
        publish_deep_headers, broker_url, bridge_worker.queue, depth, task_id
    )

    [dead] = await anyio.to_thread.run_sync(dead_letters, broker_url, bridge_worker.queue)
    assert dead["x-celerybridge-dead-reason"] == reason
    kept = dead["body"] if isinstance(dead["body"], bytes) else dead["body"].encode()
    assert kept == body([1, 2], {}, EMBED)  # the body is kept
    await good_call_runs(bridge, bridge_worker)
    alive(bridge_worker, pid)


async def test_a_protocol_1_message_is_refused(
    bridge: Bridge, bridge_worker: Worker, broker_url: str
) -> None:
    """Protocol 1 carries the task in the body; Celery's worker still runs it."""
    assert bridge_worker.process is not None
    pid = bridge_worker.process.pid
    task_id = str(uuid.uuid4())
    v1 = {"task": "calc.add", "id": task_id, "args": [1, 2], "kwargs": {}, "retries": 0}
    publish_message(broker_url, bridge_worker.queue, json.dumps(v1).encode(), {})

    [dead] = await anyio.to_thread.run_sync(dead_letters, broker_url, bridge_worker.queue)
    assert dead["x-celerybridge-dead-reason"] == (
        "not a Celery protocol 2 task message (no 'task' header; protocol 1 is refused)"
    )
    await good_call_runs(bridge, bridge_worker)
    alive(bridge_worker, pid)
    assert f"calc.add[{task_id}]" not in bridge_worker.log()
