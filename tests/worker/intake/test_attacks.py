"""Attacks an outside red team found against the first intake gate, each now refused.

Every case runs against a real worker; after each the worker is the same process and a
good call still runs. The gate's first version let each of these crash, loop or fool it.
"""

from __future__ import annotations

import base64
import json
import re
import struct
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import amqp
import anyio
import kombu
import pytest
import redis
from amqp import serialization

from celerybridge import Bridge, BridgeSettings, DeadLetteredError, remote_task

from ..._brokers import RESULT_BACKEND, dead_letters, publish_message
from ..._workers import Worker, stop_all
from ...workers import bindings
from .conftest import KEY
from .test_live import EMBED, alive, body, good_call_runs, good_headers

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(
    ("changes", "payload", "reason"),
    [
        pytest.param(
            {"get": 0}, body([1, 2], {}, EMBED),
            "header 'get' is reserved: the worker sets it from the body or the broker",
            id="header-shadowing-a-request-method",
        ),
        pytest.param(
            {"_children": ["x"]}, body([1, 2], {}, EMBED),
            "header '_children' is reserved: the worker sets it from the body or the broker",
            id="header-shadowing-request-state",
        ),
        pytest.param(
            {"eta": "9999-12-31T23:59:59-14:00"}, body([1, 2], {}, EMBED),
            "header 'eta' must be an ISO 8601 date and time the worker can convert, "
            "not a string",
            id="eta-past-the-year-9999",
        ),
        pytest.param(
            {"id": "x\u2028[forged] log line"}, body([1, 2], {}, EMBED),
            "header 'id' must be a non-empty string of printable characters, not a string",
            id="id-with-a-line-separator",
        ),
        pytest.param(
            {}, body([1, 2], {"__type__": "bytes", "__value__": "abc"}, EMBED),
            "kwargs must be a JSON object, not bytes",
            id="kombu-typed-object-as-kwargs",
        ),
        pytest.param(
            {}, body([{"__type__": "datetime", "__value__": "zzz"}], {}, EMBED),
            "the body is JSON the worker cannot decode (ValueError)",
            id="kombu-typed-object-it-cannot-decode",
        ),
    ],
)  # fmt: skip
async def test_refused_at_the_gate(
    bridge: Bridge,
    bridge_worker: Worker,
    broker_url: str,
    changes: dict[str, Any],
    payload: bytes,
    reason: str,
) -> None:
    assert bridge_worker.process is not None
    pid = bridge_worker.process.pid
    headers = {**good_headers(str(uuid.uuid4())), **changes}
    publish_message(broker_url, bridge_worker.queue, payload, headers)

    [dead] = await anyio.to_thread.run_sync(dead_letters, broker_url, bridge_worker.queue)
    assert dead["x-celerybridge-dead-reason"] == reason
    await good_call_runs(bridge, bridge_worker)
    alive(bridge_worker, pid)


@pytest.mark.parametrize("broker", ["redis"])
async def test_a_text_body_that_cannot_be_encoded_back_is_kept(
    bridge: Bridge, bridge_worker: Worker, broker_url: str
) -> None:
    """A Redis envelope whose body is a lone surrogate, not base64: kombu hands it over as
    text; writing the dead letter raised UnicodeEncodeError and the worker exited."""
    assert bridge_worker.process is not None
    pid = bridge_worker.process.pid
    envelope = {
        "body": "\ud800",
        "content-type": "application/json",
        "content-encoding": "utf-8",
        "headers": good_headers(str(uuid.uuid4())),
        "properties": {
            "delivery_tag": str(uuid.uuid4()),
            "delivery_info": {"exchange": "", "routing_key": bridge_worker.queue},
        },
    }
    redis.Redis.from_url(broker_url).lpush(bridge_worker.queue, json.dumps(envelope))

    [dead] = await anyio.to_thread.run_sync(dead_letters, broker_url, bridge_worker.queue)
    assert dead["x-celerybridge-dead-kind"] == "malformed"
    await good_call_runs(bridge, bridge_worker)
    alive(bridge_worker, pid)


@contextmanager
def timestamps_out_of_range() -> Iterator[type]:
    """py-amqp writing a header of this class as an AMQP timestamp of 2**63 - 1."""

    class Forever:
        pass

    write_item = serialization._write_item

    def writing(value: Any, write: Any, bits: Any) -> None:
        if isinstance(value, Forever):
            write(struct.pack(">cQ", b"T", 2**63 - 1))
        else:
            write_item(value, write, bits)

    serialization._write_item = writing
    try:
        yield Forever
    finally:
        serialization._write_item = write_item


@pytest.mark.parametrize("broker", ["amqp"])
@pytest.mark.parametrize("case", ["timestamp-out-of-range", "content-type-not-utf-8"])
async def test_amqp_properties_py_amqp_cannot_read_are_set_apart(
    bridge: Bridge, bridge_worker: Worker, broker_url: str, case: str
) -> None:
    """A timestamp out of range made the worker reconnect in a loop (OSError reads as a
    lost connection); invalid UTF-8 in content_type made it exit."""
    assert bridge_worker.process is not None
    pid = bridge_worker.process.pid
    headers: dict[str, Any] = good_headers(str(uuid.uuid4()))
    properties: dict[str, Any] = {"content_type": "application/json", "content_encoding": "utf-8"}
    with timestamps_out_of_range() as forever, kombu.Connection(broker_url) as connection:
        if case == "timestamp-out-of-range":
            headers["x-when"] = forever()
        else:
            properties["content_type"] = b"application/json\xff"
        message = amqp.basic_message.Message(
            body([1, 2], {}, EMBED), application_headers=headers, **properties
        )
        connection.default_channel.basic_publish(
            message, exchange="", routing_key=bridge_worker.queue
        )

    [dead] = await anyio.to_thread.run_sync(dead_letters, broker_url, bridge_worker.queue)
    assert dead["x-celerybridge-dead-reason"] == (
        "unreadable message: its properties or headers cannot be read"
    )
    await good_call_runs(bridge, bridge_worker)
    alive(bridge_worker, pid)
    assert "Connection to broker lost" not in bridge_worker.log()


@pytest.mark.parametrize("broker", ["amqp"])
async def test_a_dead_letter_near_the_frame_limit_still_lands(
    bridge: Bridge, bridge_worker: Worker, broker_url: str
) -> None:
    """Headers just under RabbitMQ's 128 KiB frame: the dead letter's own headers pushed
    it over, RabbitMQ closed the connection, and the letter was lost."""
    headers = {**good_headers(str(uuid.uuid4())), "x-big": "x" * 130_000}
    publish_message(broker_url, bridge_worker.queue, body([1, 2], {}, {"evil": 1}), headers)

    [dead] = await anyio.to_thread.run_sync(dead_letters, broker_url, bridge_worker.queue)
    assert dead["x-celerybridge-dead-reason"] == "unknown keys in the body's third part: 'evil'"
    assert dead["x-celerybridge-dropped-headers"] == ["x-big"]
    await good_call_runs(bridge, bridge_worker)


def first_reason(broker_url: str, queue: str) -> str:
    """The reason of the first letter to arrive on ``queue``, read without declaring it."""
    with kombu.Connection(broker_url) as connection:
        for _ in range(50):
            message = connection.default_channel.basic_get(queue, no_ack=True)
            if message is not None:
                return str(message.headers["x-celerybridge-dead-reason"])
            time.sleep(0.1)
    raise AssertionError(f"no letter on {queue}")


@pytest.mark.parametrize("broker", ["amqp"])
async def test_a_dead_letter_queue_declared_otherwise_still_takes_letters(
    bridge: Bridge, broker_url: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """``<queue>.dead`` declared beforehand with other arguments: the worker's own
    declaration failed (PRECONDITION_FAILED) and it exited."""
    worker = Worker("tests.workers.bridge_worker", broker_url, RESULT_BACKEND)
    with kombu.Connection(broker_url) as connection:
        kombu.Queue(f"{worker.queue}.dead", durable=False)(connection.default_channel).declare()
    worker.start(tmp_path_factory.mktemp("predeclared"))
    try:
        assert worker.process is not None
        pid = worker.process.pid
        publish_message(broker_url, worker.queue, body("x", {}, EMBED), good_headers("t-1"))
        reason = await anyio.to_thread.run_sync(first_reason, broker_url, f"{worker.queue}.dead")
        assert reason == "args must be a JSON array, not a string"
        await good_call_runs(bridge, worker)
        alive(worker, pid)
    finally:
        stop_all([worker])
        with kombu.Connection(broker_url) as connection:
            connection.default_channel.queue_delete(f"{worker.queue}.dead")


async def test_a_forger_cannot_fail_a_task_through_a_body_kombu_cannot_decompress(
    settings: BridgeSettings, keyed_worker: Worker, broker_url: str
) -> None:
    """kombu decompresses before the task handler and calls on_decode_error itself: that
    path marked the victim's task failed without asking for a signature."""
    keyed = BridgeSettings(**{**settings.model_dump(), "signing_key": KEY})
    async with Bridge(keyed) as bridge:
        sleep = bindings.sleep.with_options(queue=keyed_worker.queue)
        handle = await bridge.send(sleep, (1.0,), {})
        headers = {
            "lang": "py",
            "task": "calc.add",
            "id": handle.id,
            "compression": "application/x-gzip",
        }
        publish_message(broker_url, keyed_worker.queue, b"not gzip", headers)
        assert await handle.result(timeout=10) == 1.0  # not DeadLetteredError
        [dead] = await anyio.to_thread.run_sync(dead_letters, broker_url, keyed_worker.queue)
        assert dead["x-celerybridge-dead-reason"] == "compressed bodies are refused"


async def test_a_keyed_worker_does_not_obey_unsigned_remote_control(
    settings: BridgeSettings, keyed_worker: Worker, broker_url: str
) -> None:
    """Celery's remote control is unauthenticated: anyone who could write to the broker
    could revoke tasks, cancel the worker's consumer or shut it down."""
    from celery import Celery

    # Aimed at this worker alone: other workers on the broker obey remote control.
    [node] = re.findall(r"(\S+@\S+) ready\.", keyed_worker.log())
    intruder = Celery("intruder", broker=broker_url, set_as_current=False)
    try:
        await anyio.to_thread.run_sync(
            lambda: intruder.control.broadcast("shutdown", destination=[node])
        )
        await anyio.sleep(2)
    finally:
        intruder.close()
    assert keyed_worker.running, keyed_worker.log()
    keyed = BridgeSettings(**{**settings.model_dump(), "signing_key": KEY})
    async with Bridge(keyed) as bridge:
        add = bindings.add.with_options(queue=keyed_worker.queue)
        assert (await (await bridge.send(add, (1, 2), {})).result(timeout=10)).value == 3


async def test_a_signed_call_of_a_task_the_worker_lacks_is_refused_as_unknown(
    settings: BridgeSettings, keyed_worker: Worker, broker_url: str
) -> None:
    """Celery's own unknown-task refusal asked the gate again, whose replay record then
    read the message as a replay: the caller was never told."""

    @remote_task(name="calc.nope", queue=keyed_worker.queue)
    def nope(x: int) -> int: ...

    keyed = BridgeSettings(**{**settings.model_dump(), "signing_key": KEY})
    async with Bridge(keyed) as bridge:
        handle = await bridge.send(nope, (1,), {})
        with pytest.raises(DeadLetteredError) as caught:
            await handle.result(timeout=10)
    assert caught.value.remote_message == "no task 'calc.nope' on this worker"
    [dead] = await anyio.to_thread.run_sync(dead_letters, broker_url, keyed_worker.queue)
    assert dead["x-celerybridge-dead-kind"] == "unknown-task"


@pytest.mark.parametrize("broker", ["redis"])
async def test_a_redis_letter_goes_to_the_dead_letters_of_the_list_it_was_popped_from(
    bridge: Bridge, bridge_worker: Worker, broker_url: str
) -> None:
    """The envelope names a routing key of the sender's choosing."""
    envelope = {
        "body": base64.b64encode(body([1, 2], {}, EMBED)).decode(),
        "content-type": "application/x-python-serialize",
        "content-encoding": "binary",
        "headers": good_headers(str(uuid.uuid4())),
        "properties": {
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
            "delivery_info": {"exchange": "", "routing_key": "somewhere-else"},
        },
    }
    redis.Redis.from_url(broker_url).lpush(bridge_worker.queue, json.dumps(envelope))

    [dead] = await anyio.to_thread.run_sync(dead_letters, broker_url, bridge_worker.queue)
    assert dead["x-celerybridge-dead-from"] == bridge_worker.queue
