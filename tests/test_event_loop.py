"""Broker I/O never runs on the event-loop thread; delegation works under trio too."""

from __future__ import annotations

import json
import threading
import time
import uuid
from typing import NoReturn

import anyio
import pytest
import redis

from celerybridge import Bridge, BridgeSettings, remote_task
from celerybridge._transports.amqp import AmqpPublisher
from celerybridge._transports.kombu import KombuPublisher, KombuResultSource
from celerybridge._transports.redis import RedisPublisher
from celerybridge._transports.redis_results import RedisResultSource

from ._brokers import RESULT_BACKEND, purge, queue_length
from ._loop_lag import ticker

pytestmark = pytest.mark.integration
QUEUE = f"cb-lag-{uuid.uuid4().hex[:8]}"


@remote_task(name="lag.echo", queue=QUEUE)
def echo(payload: str) -> str: ...


async def test_loop_lag_with_1000_delegations_in_flight(
    bridge: Bridge, broker: str, broker_url: str
) -> None:
    payload = "x" * 1024
    samples: list[tuple[float, float]] = []
    stop = anyio.Event()
    async with anyio.create_task_group() as group:
        group.start_soon(ticker, samples, stop)
        await anyio.sleep(0.05)
        started = time.perf_counter()
        async with anyio.create_task_group() as senders:
            for _ in range(1000):
                senders.start_soon(bridge.send, echo, (payload,), {})
        elapsed = time.perf_counter() - started
        stop.set()
    assert queue_length(broker_url, QUEUE) == 1000
    purge(broker_url, QUEUE)
    # Only while delegations are in flight: idle samples before or after would dilute it.
    lags = sorted(lag for when, lag in samples if when >= started)
    p99 = lags[int(len(lags) * 0.99)]
    print(
        f"\n[{broker}] 1000 in flight: {1000 / elapsed:.0f} msg/s, loop lag p99 {p99 * 1e3:.2f} ms"
        f" (max {lags[-1] * 1e3:.2f} ms)"
    )
    # Measured, reported (issue 5's target is p99 <= 2 ms; not met yet: starting 1,000
    # delegations in one tick costs tens of ms of validation and task creation on the
    # loop, and on the fast path the whole run is short enough for that to be the p99).
    # The bound catches a loop stalled again and again (a blocking connect or publish per
    # call); one long pause can be the OS on this shared 2-core machine. That no broker
    # I/O runs on the loop thread is proven directly by the next two tests.
    assert p99 < 0.25


async def test_kombu_path_publishes_off_the_loop_thread(
    monkeypatch: pytest.MonkeyPatch, settings: BridgeSettings, broker_url: str
) -> None:
    threads: list[int] = []
    original = KombuPublisher.send

    def spy(self: KombuPublisher, message: object) -> object:
        threads.append(threading.get_ident())
        return original(self, message)  # type: ignore[arg-type]

    monkeypatch.setattr(KombuPublisher, "send", spy)
    async with Bridge(settings, fast_path=False) as bridge:
        await bridge.send(echo, ("x",), {})
    assert threads
    assert threading.get_ident() not in threads
    purge(broker_url, QUEUE)


async def test_fast_path_publishes_and_awaits_without_threads(
    monkeypatch: pytest.MonkeyPatch, broker: str, broker_url: str
) -> None:
    # Both brokers have a native publisher; results come from Redis in both cases.
    native = {"redis": RedisPublisher, "amqp": AmqpPublisher}[broker]
    settings = BridgeSettings(broker_url=broker_url, result_backend=RESULT_BACKEND)

    def no_threads(*args: object, **kwargs: object) -> NoReturn:
        raise AssertionError("the fast path must not use a worker thread")

    monkeypatch.setattr(anyio.to_thread, "run_sync", no_threads)
    async with Bridge(settings) as bridge:
        handle = await bridge.send(echo, ("x",), {})
        assert isinstance(bridge._publisher, native)
        with redis.Redis.from_url(RESULT_BACKEND) as client:
            client.set(f"celery-task-meta-{handle.id}", json.dumps({"status": "SUCCESS"}))
        assert await handle.done()
        assert isinstance(bridge._results, RedisResultSource)
    assert queue_length(broker_url, QUEUE) == 1
    purge(broker_url, QUEUE)


def test_delegation_and_results_work_under_trio(broker_url: str) -> None:
    import trio

    from celerybridge import MemoryTransport

    @remote_task(name="lag.trio")
    def under_trio(x: int) -> int: ...

    async def main() -> tuple[int, int]:
        settings = BridgeSettings(broker_url=broker_url, result_backend=RESULT_BACKEND)
        async with Bridge(settings) as bridge:
            handle = await bridge.send(echo, ("from trio",), {})
            assert queue_length(broker_url, QUEUE) == 1
            # Store an outcome the way a worker does, then await it through the real backend.
            record = {
                "status": "SUCCESS",
                "result": "done",
                "traceback": None,
                "task_id": handle.id,
            }
            with redis.Redis.from_url(RESULT_BACKEND) as client:
                client.set(f"celery-task-meta-{handle.id}", json.dumps(record))
            value = await handle.result(timeout=5)
            # redis.asyncio and aio-pika cannot run under trio: the fast path (on by
            # default) falls back.
            assert settings.fast_path
            assert isinstance(bridge._publisher, KombuPublisher)
            assert isinstance(bridge._results, KombuResultSource)
        transport = MemoryTransport(execute=False)
        async with Bridge(publisher=transport, results=transport) as memory:
            other = await memory.send(under_trio, ("7",), {})
            transport.set_result(other.id, 7)
            return len(value), await other

    assert trio.run(main) == (len("done"), 7)
    purge(broker_url, QUEUE)
