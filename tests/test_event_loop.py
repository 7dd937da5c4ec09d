"""Broker I/O never runs on the event-loop thread; delegation works under trio too."""

from __future__ import annotations

import asyncio
import gc
import json
import threading
import uuid
from functools import partial
from typing import Any, NoReturn

import anyio
import anyio.lowlevel
import pytest
import redis

from celerybridge import Bridge, BridgeSettings, PublishTimeoutError, RemoteTask, remote_task
from celerybridge._constants import PUBLISH_BUILDERS, PUBLISH_WINDOW_MESSAGES
from celerybridge._transports._protocol import TaskMessage
from celerybridge._transports.amqp import AmqpPublisher
from celerybridge._transports.base import NativePublisher, OutgoingMessage
from celerybridge._transports.kombu import KombuPublisher, KombuResultSource
from celerybridge._transports.redis import RedisPublisher
from celerybridge._transports.redis_results import RedisResultSource
from celerybridge._validation import BoundCall

from ._brokers import RESULT_BACKEND, purge, queue_length
from ._loop_lag import burst

pytestmark = pytest.mark.integration
QUEUE = f"cb-lag-{uuid.uuid4().hex[:8]}"


@remote_task(name="lag.echo", queue=QUEUE)
def echo(payload: str) -> str: ...


async def test_loop_lag_with_1000_delegations_in_flight(
    bridge: Bridge, broker: str, broker_url: str
) -> None:
    send = partial(bridge.send, echo, ("x" * 1024,), {})
    # The objects earlier tests left in this process are not the publisher's: a full
    # collection walking them (a 318 ms tick late in a suite run) is frozen out; what
    # the burst itself allocates is still collected while it is measured.
    gc.collect()
    gc.freeze()
    try:
        measured = await burst([send] * 1000)
    finally:
        gc.unfreeze()
    assert queue_length(broker_url, QUEUE) == 1000
    purge(broker_url, QUEUE)
    lags = sorted(measured.lags)
    p99 = lags[int(len(lags) * 0.99)]
    print(
        f"\n[{broker}] 1000 in flight: {1000 / measured.elapsed:.0f} msg/s, loop lag p99 "
        f"{p99 * 1e3:.2f} ms (max {lags[-1] * 1e3:.2f} ms); their first steps took "
        f"{measured.start * 1e3:.1f} ms"
    )
    # Measured and printed; issue 5's 2 ms target is judged by `python -m bench` on a
    # quiet machine, not here, where other tests' workers share two cores. The bound
    # catches a loop stalled again and again (a blocking connect or publish per call).
    # That no broker I/O runs on the loop thread is proven directly by the next two tests.
    assert p99 < 0.1


class _Gate(NativePublisher[None]):
    """A native publisher that sends nothing until its gate opens."""

    def __init__(self) -> None:
        super().__init__()
        self.open = asyncio.Event()
        self.sent: list[OutgoingMessage] = []

    def _frame(self, message: OutgoingMessage, wire: TaskMessage) -> None:
        return None

    def _size(self, framed: None) -> int:
        return 1

    async def _send(self, message: OutgoingMessage, framed: None) -> None:
        self._waiting += 1
        await self.open.wait()
        self.sent.append(message)

    _waiting = 0

    async def waiting(self, count: int) -> None:
        """Until ``count`` publishes are sending at once (behind the closed gate)."""
        with anyio.fail_after(10):
            while self._waiting < count:  # noqa: ASYNC110
                await anyio.sleep(0.001)

    async def aclose(self) -> None:
        self._closed = True


@pytest.fixture
def binds(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The tasks of the calls validated so far."""
    seen: list[str] = []
    original = RemoteTask.bind

    def counting(self: RemoteTask[..., object], *args: Any, **kwargs: Any) -> BoundCall:
        seen.append(self.name)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(RemoteTask, "bind", counting)
    return seen


async def test_a_burst_is_validated_as_it_is_admitted_not_in_one_go(binds: list[str]) -> None:
    gate = _Gate()
    async with Bridge(publisher=gate) as bridge, anyio.create_task_group() as group:
        for _ in range(200):
            group.start_soon(bridge.send, echo, ("x",), {})
        await anyio.lowlevel.checkpoint()  # every sender has taken its first step
        assert len(binds) == PUBLISH_BUILDERS
        await gate.waiting(200)  # all on the wire at once, not a few at a time
        gate.open.set()
    assert len(binds) == len(gate.sent) == 200


async def test_a_publish_that_never_got_room_says_it_was_not_sent(binds: list[str]) -> None:
    gate = _Gate()  # two bridges on one publisher: one fills its window, one times out
    async with (
        Bridge(publisher=gate) as patient,
        Bridge(publisher=gate, publish_timeout=0.2) as hasty,
        anyio.create_task_group() as group,
    ):
        for _ in range(PUBLISH_WINDOW_MESSAGES):
            group.start_soon(patient.send, echo, ("x",), {})
        await gate.waiting(PUBLISH_WINDOW_MESSAGES)
        with pytest.raises(PublishTimeoutError) as caught:
            await hasty.send(echo, ("y",), {})
        # The hasty call was never validated either.
        assert len(binds) == PUBLISH_WINDOW_MESSAGES
        gate.open.set()
        # Its place was given back: the window admits again.
        await hasty.send(echo, ("z",), {})
    assert str(caught.value) == (
        "task 'lag.echo' v1 waited 0.2 s for other publishes to make room and was not sent"
    )
    assert sorted(m.args for m in gate.sent) == [("x",)] * PUBLISH_WINDOW_MESSAGES + [("z",)]


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
