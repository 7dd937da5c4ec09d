"""rpc:// reply queues and backend settings against a hostile peer or a careless user.

Anyone who may publish to the broker can put messages on a bridge's reply queue (its
name is in every task message): junk, forged replies for tasks it never sent, floods,
compressed bodies that inflate. None of it may reach a caller as anything but a
timeout, push out a real result, or hold memory.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from typing import Any

import anyio
import anyio.to_thread
import kombu
import pytest

from celerybridge import Bridge, ConfigurationError, ResultTimeoutError
from celerybridge._config import BridgeSettings
from celerybridge._transports.celery_results import KombuRpcResultSource
from celerybridge._transports.rpc_results import RpcResultSource

from ._brokers import BROKERS
from .workers import bindings


def _publish(broker_url: str, queue: str, messages: list[tuple[Any, str | None]]) -> None:
    """Publish ``(body, correlation_id)`` pairs to ``queue`` as any broker client could."""
    with kombu.Connection(broker_url) as connection:
        producer = connection.Producer()
        for body, correlation_id in messages:
            raw = body if isinstance(body, bytes) else json.dumps(body).encode()
            producer.publish(
                raw,
                exchange="",
                routing_key=queue,
                content_type="application/json",
                content_encoding="utf-8",
                correlation_id=correlation_id,
            )


def _unique_queue() -> str:
    return f"cb-rpc-hostile-{uuid.uuid4()}"


@pytest.mark.parametrize("broker", ["redis", "amqp"])
@pytest.mark.integration
async def test_a_junk_status_on_the_reply_queue_is_never_a_raw_error(broker: str) -> None:
    # The kombu drain (any broker; the only rpc:// source under trio or with Redis).
    async with Bridge(
        broker_url=BROKERS[broker], result_backend="rpc://", fast_path=False, publish_timeout=5
    ) as bridge:
        source = bridge._get_results()
        assert isinstance(source, KombuRpcResultSource)
        await source.prepare()
        # Any broker client that knows the reply queue (it is in every task message).
        junk = {"status": ["SUCCESS"], "task_id": "some-task", "result": None}
        handle = bridge.handle(bindings.add, "some-task")
        reply = [(junk, "some-task")]
        await anyio.to_thread.run_sync(_publish, BROKERS[broker], source.reply_to, reply)
        with pytest.raises(ResultTimeoutError):  # junk is nobody's result
            await handle.result(timeout=2)


@pytest.mark.integration
async def test_a_flood_of_forged_replies_does_not_push_out_a_real_result() -> None:
    queue = _unique_queue()
    async with Bridge(
        broker_url=BROKERS["amqp"], result_backend="rpc://", publish_timeout=5
    ) as bridge:
        handle = await bridge.send(bindings.add.with_options(queue=queue), (1, 2), {})
        source = bridge._get_results()
        assert isinstance(source, RpcResultSource)
        try:
            # The worker replies (as Celery's rpc backend does) before the caller awaits...
            real = {"status": "SUCCESS", "task_id": handle.id, "result": {"value": 3, "pid": 1}}
            await anyio.to_thread.run_sync(
                _publish, BROKERS["amqp"], source.reply_to, [(real, handle.id)]
            )
            for _ in range(100):
                if source._replies.get(handle.id) is not None:
                    break
                await anyio.sleep(0.05)
            assert source._replies.get(handle.id) is not None
            # ...then anyone on the broker sends 10 001 small replies for made-up task ids.
            forged = [({"status": "SUCCESS", "result": None}, f"forged-{i}") for i in range(10_001)]
            await anyio.to_thread.run_sync(_publish, BROKERS["amqp"], source.reply_to, forged)
            await anyio.sleep(3)  # the flood is consumed (and dropped) meanwhile
            assert (await handle.result(timeout=2)).value == 3
        finally:
            await anyio.to_thread.run_sync(_delete_queue, BROKERS["amqp"], queue)


def _delete_queue(broker_url: str, queue: str) -> None:
    with kombu.Connection(broker_url) as connection, contextlib.suppress(Exception):
        connection.default_channel.queue_delete(queue)


@pytest.mark.integration
async def test_replies_for_tasks_never_sent_are_not_kept() -> None:
    async with Bridge(
        broker_url=BROKERS["amqp"], result_backend="rpc://", publish_timeout=5
    ) as bridge:
        source = bridge._get_results()
        assert isinstance(source, RpcResultSource)
        await source.prepare()
        blob = "x" * (4 * 1024 * 1024)  # 4 MiB: RabbitMQ takes up to 128 MiB a message
        forged = [({"status": "SUCCESS", "result": blob}, f"big-{i}") for i in range(16)]
        await anyio.to_thread.run_sync(_publish, BROKERS["amqp"], source.reply_to, forged)
        await anyio.sleep(3)
        kept = sum(len(outcome.result or "") for outcome in source._replies._outcomes.values())
        # Replies for tasks this bridge never sent (nor awaits) are dropped at once.
        assert kept == 0, f"{kept / 2**20:.0f} MiB kept for unknown task ids"


def test_deeply_nested_transport_options_are_a_configuration_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    nested = '{"a":' * 100_000 + "1" + "}" * 100_000
    monkeypatch.setenv("CELERYBRIDGE_BROKER_TRANSPORT_OPTIONS", nested)
    with pytest.raises(ConfigurationError):
        BridgeSettings()


def test_sqlite_in_memory_result_backend_is_refused_at_bridge() -> None:
    # Like cache+memory://: each process (and each connection) has its own database,
    # a worker's results never reach the bridge; the issue asks for a clear error at Bridge().
    for url in ("db+sqlite://", "db+sqlite:///:memory:"):
        with pytest.raises(ConfigurationError):
            Bridge(broker_url="memory://", result_backend=url)


def _publish_bomb(broker_url: str, queue: str, inflated: int) -> int:
    import zlib

    payload = zlib.compress(b'{"status": "PENDING", "pad": "' + b"A" * inflated + b'"}', 9)
    with kombu.Connection(broker_url) as connection:
        connection.Producer().publish(
            payload,
            exchange="",
            routing_key=queue,
            content_type="application/json",
            content_encoding="utf-8",
            headers={"compression": "application/x-gzip"},  # kombu's zlib codec
            correlation_id="bomb",
        )
    return len(payload)


@pytest.mark.parametrize("broker", ["redis", "amqp"])
@pytest.mark.integration
async def test_a_compressed_reply_is_not_inflated(broker: str) -> None:
    import tracemalloc

    async with Bridge(
        broker_url=BROKERS[broker], result_backend="rpc://", fast_path=False, publish_timeout=10
    ) as bridge:
        source = bridge._get_results()
        assert isinstance(source, KombuRpcResultSource)
        await source.prepare()
        inflated = 200 * 1024 * 1024
        sent = await anyio.to_thread.run_sync(
            _publish_bomb, BROKERS[broker], source.reply_to, inflated
        )
        assert sent < 300 * 1024  # ~200 KiB on the wire
        tracemalloc.start()
        try:
            assert await bridge.poll("some-task") is None
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        # kombu's Message would inflate it (headers["compression"]) before anyone looked.
        assert peak < 50 * 1024 * 1024, (
            f"peak {peak / 2**20:.0f} MiB for {sent / 2**10:.0f} KiB sent"
        )
