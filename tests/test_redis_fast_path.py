"""The Redis fast path against a real Redis: push-based results, reconnects, failures."""

from __future__ import annotations

import asyncio
import json
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis

from celerybridge import (
    Bridge,
    BridgeSettings,
    DelegationError,
    PublishTimeoutError,
    ResultBackendError,
)
from celerybridge._transports.base import OutgoingMessage
from celerybridge._transports.redis import RedisPublisher
from celerybridge._transports.redis_results import RedisResultSource

from ._brokers import BROKERS, RESULT_BACKEND, purge, queue_length
from ._workers import Worker
from .workers import bindings

pytestmark = pytest.mark.integration
REDIS_URL = BROKERS["redis"]


@pytest.fixture
def backend() -> Iterator[redis.Redis]:
    with redis.Redis.from_url(RESULT_BACKEND) as client:
        yield client


@pytest.fixture
async def source() -> AsyncIterator[RedisResultSource]:
    results = RedisResultSource(RESULT_BACKEND, timeout=5)
    yield results
    await results.aclose()


def _store(client: redis.Redis, task_id: str, status: str = "SUCCESS", *, publish: bool) -> None:
    """Store a result the way Celery's Redis backend does: SET and PUBLISH, atomically."""
    meta = json.dumps({"status": status, "result": 42, "traceback": None, "task_id": task_id})
    key = f"celery-task-meta-{task_id}"
    with client.pipeline() as pipe:
        pipe.set(key, meta, ex=60)
        if publish:
            pipe.publish(key, meta)
        pipe.execute()


def _subscribers(client: redis.Redis, task_id: str) -> int:
    return int(
        dict(client.pubsub_numsub(f"celery-task-meta-{task_id}"))[
            b"celery-task-meta-" + task_id.encode()
        ]
    )


def _address(source: RedisResultSource) -> str:
    writer = source._conn._writer  # type: ignore[union-attr]
    host, port = writer.get_extra_info("sockname")[:2]
    return f"{host}:{port}"


async def _until(condition: Callable[[], bool], seconds: float = 5) -> None:
    # The condition is the Redis server's state (PUBSUB NUMSUB): no event to wait on.
    with anyio.fail_after(seconds):
        while not condition():  # noqa: ASYNC110
            await anyio.sleep(0.005)


async def test_pushed_result_wakes_the_waiter_without_polling(
    source: RedisResultSource, backend: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    task_id = str(uuid.uuid4())
    gets: list[bytes] = []
    original = source._client.get

    async def counting_get(key: Any) -> Any:
        gets.append(key)
        return await original(key)

    monkeypatch.setattr(source._client, "get", counting_get)
    async with anyio.create_task_group() as group:
        outcomes: list[Any] = []

        async def waiter() -> None:
            outcomes.append(await source.wait(task_id))

        group.start_soon(waiter)
        await _until(lambda: len(gets) == 1)  # subscribed, confirmed, key read once
        assert _subscribers(backend, task_id) == 1
        await anyio.sleep(0.2)
        assert len(gets) == 1  # nothing polls while the task runs
        _store(backend, task_id, "STARTED", publish=True)  # not final: keep waiting
        await anyio.sleep(0.05)
        assert outcomes == []
        _store(backend, task_id, publish=True)
    assert outcomes[0].state == "SUCCESS"
    assert outcomes[0].result == 42
    assert len(gets) == 1  # the result came by push
    await _until(lambda: _subscribers(backend, task_id) == 0)
    assert (source.waiting, source.channels) == (0, 0)


async def test_result_stored_before_the_wait_is_found(
    source: RedisResultSource, backend: redis.Redis
) -> None:
    task_id = str(uuid.uuid4())
    _store(backend, task_id, publish=False)  # nobody was subscribed when it finished
    with anyio.fail_after(5):
        outcome = await source.wait(task_id)
    assert outcome.result == 42
    assert await source.poll(task_id) == outcome
    assert await source.poll(str(uuid.uuid4())) is None


async def test_one_subscriber_connection_multiplexes_every_waiter(
    source: RedisResultSource, backend: redis.Redis
) -> None:
    ids = [str(uuid.uuid4()) for _ in range(50)]
    outcomes: dict[str, Any] = {}

    async def waiter(task_id: str) -> None:
        outcomes[task_id] = await source.wait(task_id)

    async with anyio.create_task_group() as group:
        for task_id in ids:
            group.start_soon(waiter, task_id)
        group.start_soon(waiter, ids[0])  # two handles on one task share its channel
        await _until(lambda: all(_subscribers(backend, t) == 1 for t in ids))
        clients = [c for c in backend.client_list() if c["addr"] == _address(source)]
        assert [int(c["sub"]) for c in clients] == [50]
        assert source.waiting == 51
        for task_id in ids:
            _store(backend, task_id, publish=True)
    assert set(outcomes) == set(ids)
    await _until(lambda: source.channels == 0 and _subscribers(backend, ids[0]) == 0)


async def test_timeout_and_cancellation_unsubscribe(
    source: RedisResultSource, backend: redis.Redis
) -> None:
    timed_out, cancelled = str(uuid.uuid4()), str(uuid.uuid4())
    with anyio.move_on_after(0.2) as scope:
        await source.wait(timed_out)
    assert scope.cancelled_caught
    task = asyncio.get_running_loop().create_task(source.wait(cancelled))
    await _until(lambda: _subscribers(backend, cancelled) == 1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await _until(lambda: _subscribers(backend, timed_out) + _subscribers(backend, cancelled) == 0)
    assert (source.waiting, source.channels) == (0, 0)


async def test_subscriber_reconnects_and_reads_what_it_missed(
    source: RedisResultSource, backend: redis.Redis
) -> None:
    task_id = str(uuid.uuid4())
    async with anyio.create_task_group() as group:
        outcomes: list[Any] = []

        async def waiter() -> None:
            outcomes.append(await source.wait(task_id))

        group.start_soon(waiter)
        await _until(lambda: _subscribers(backend, task_id) == 1)
        # What a server restart does to the connection: the server closes it.
        backend.client_kill(_address(source))
        # Stored while nobody listened: found on the resubscription's re-read.
        _store(backend, task_id, publish=True)
    assert outcomes[0].result == 42


async def test_publisher_reconnects_after_its_connections_are_dropped(
    backend: redis.Redis,
) -> None:
    queue = f"cb-fast-{uuid.uuid4().hex[:8]}"
    message = OutgoingMessage(str(uuid.uuid4()), "t", queue, (1,), {})
    publisher = RedisPublisher(REDIS_URL, timeout=5)
    try:
        await publisher.publish(message)  # declares the queue: a pipeline from the pool
        await publisher.publish(message)  # alone, on the publisher's own connection
        connections = publisher._connections
        assert connections
        with redis.Redis.from_url(REDIS_URL) as broker:
            for connection in [*connections, publisher._lone]:  # only ours: the server is shared
                host, port = connection._writer.get_extra_info("sockname")[:2]  # type: ignore[attr-defined]
                assert broker.client_kill(f"{host}:{port}")
        await publisher.publish(message)  # alone, on a dead connection
        async with anyio.create_task_group() as group:  # batched, on dead pooled connections
            for _ in range(3):
                group.start_soon(publisher.publish, message)
    finally:
        await publisher.aclose()
    assert queue_length(REDIS_URL, queue) == 6
    purge(REDIS_URL, queue)


async def test_unreachable_redis_is_a_delegation_or_result_backend_error() -> None:
    url = "redis://127.0.0.1:1/0"  # nothing listens on port 1
    publisher = RedisPublisher(url, timeout=1)
    try:
        with pytest.raises(DelegationError) as caught:
            await publisher.publish(OutgoingMessage("id", "calc.add", "q", (), {}))
    finally:
        await publisher.aclose()
    assert str(caught.value).startswith("publishing 'calc.add' to 'q': ConnectionError: ")
    results = RedisResultSource(url, timeout=1)
    try:
        with pytest.raises(ResultBackendError) as failed:
            await results.wait("id")
    finally:
        await results.aclose()
    assert str(failed.value).startswith("subscribing to the result of task id: ConnectionError: ")


@pytest.fixture
async def silent_redis() -> AsyncIterator[str]:
    """The URL of a server that accepts connections and reads, and never answers."""

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(-1)
        writer.close()

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    try:
        yield f"redis://127.0.0.1:{server.sockets[0].getsockname()[1]}/0"
    finally:
        server.close()
        await server.wait_closed()


async def test_a_silent_broker_is_a_publish_timeout(silent_redis: str) -> None:
    settings = BridgeSettings(broker_url=silent_redis, publish_timeout=0.3)
    async with Bridge(settings) as bridge:
        with pytest.raises(PublishTimeoutError) as caught:
            await bridge.send(bindings.add, (1, 2), {})
    assert str(caught.value).startswith("the broker did not accept task 'calc.add' v1 (")
    assert str(caught.value).endswith(") within 0.3 s; it may or may not have been delivered")


async def test_a_batch_nobody_waits_for_still_times_out(silent_redis: str) -> None:
    # The publisher's own bound, for a batch whose callers have no deadline of their own.
    publisher = RedisPublisher(silent_redis, timeout=0.3)
    try:
        with anyio.fail_after(5), pytest.raises(PublishTimeoutError) as caught:
            await publisher.publish(OutgoingMessage("id", "calc.add", "q", (), {}))
    finally:
        await publisher.aclose()
    assert str(caught.value) == (
        "Redis did not answer a batch of 1 publishes within 0.3 s; "
        "they may or may not have been delivered"
    )


async def test_priorities_and_countdown_reach_a_real_worker(
    start_worker: Callable[..., Worker],
) -> None:
    worker = start_worker("tests.workers.bridge_worker", "redis")
    settings = BridgeSettings(broker_url=REDIS_URL, result_backend=RESULT_BACKEND)
    async with Bridge(settings) as bridge:
        assert isinstance(bridge._get_publisher(), RedisPublisher)
        handles = [
            await bridge.send(bindings.add.with_options(queue=worker.queue, **options), (i, 1), {})
            for i, options in enumerate(
                [{"priority": 0}, {"priority": 4}, {"priority": 9}, {"countdown": 0.5}]
            )
        ]
        values = [(await handle.result(timeout=20)).value for handle in handles]
    assert values == [1, 2, 3, 4]


async def test_closing_with_an_abandoned_read_in_flight_leaves_no_connection_open() -> None:
    # A GET abandoned by its cancelled caller went on after aclose and reconnected the
    # closed pool, leaving a socket for the garbage collector (seen as a ResourceWarning).
    source = RedisResultSource(RESULT_BACKEND, timeout=5)
    real_get, started, done = source._client.get, asyncio.Event(), asyncio.Event()

    async def slow_get(key: Any) -> Any:
        started.set()
        await asyncio.sleep(0.3)  # a slow backend; the caller gives up meanwhile
        try:
            return await real_get(key)
        finally:
            done.set()

    source._client.get = slow_get  # type: ignore[method-assign]
    reader = asyncio.ensure_future(source.poll("never-stored"))
    await started.wait()
    reader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reader
    await source.aclose()
    await asyncio.wait_for(done.wait(), 5)  # the abandoned read has ended, one way or another
    pool = source._client.connection_pool
    connections = [*pool._get_free_connections(), *pool._get_in_use_connections()]
    assert [c for c in connections if c.is_connected] == []


async def test_redis_transport_options_that_rewire_keys_leave_publishing_to_kombu() -> None:
    """kombu's ``global_keyprefix`` (like ``sep`` and ``priority_steps``) changes the keys
    messages are written to; the fast path does not know them, so kombu publishes."""
    queue, prefix = f"cb-prefix-{uuid.uuid4().hex[:8]}", "tenant-a:"
    stub = bindings.add.with_options(queue=queue)
    options = {"global_keyprefix": prefix}
    async with Bridge(broker_url=BROKERS["redis"], broker_transport_options=options) as bridge:
        await bridge.send(stub, (1, 2), {})
        assert type(bridge._publisher).__name__ == "KombuPublisher"
    with redis.Redis.from_url(BROKERS["redis"]) as client:
        try:
            assert client.llen(prefix + queue) == 1
            assert client.llen(queue) == 0
        finally:
            client.delete(prefix + queue, queue)
            for key in client.keys(f"{prefix}_kombu.binding*{queue}*"):
                client.delete(key)


async def test_a_result_backend_key_prefix_is_read_as_the_worker_writes_it() -> None:
    """A worker given ``global_keyprefix`` for its Redis result backend stores results
    under that prefix; a bridge with the same setting reads them there."""
    options = json.dumps({"global_keyprefix": "tenant-b:"})
    worker = Worker(
        "tests.workers.bridge_worker",
        BROKERS["redis"],
        RESULT_BACKEND,
        extra_env={"CELERYBRIDGE_RESULT_BACKEND_TRANSPORT_OPTIONS": options},
    )
    worker.start(Path(tempfile.mkdtemp()))
    try:
        async with Bridge(
            broker_url=BROKERS["redis"],
            result_backend=RESULT_BACKEND,
            result_backend_transport_options=json.loads(options),
        ) as bridge:
            handle = await bridge.send(bindings.add.with_options(queue=worker.queue), (2, 3), {})
            assert (await handle.result(timeout=20)).value == 5
        with redis.Redis.from_url(RESULT_BACKEND) as client:
            assert client.exists(f"tenant-b:celery-task-meta-{handle.id}")
    finally:
        worker.stop()
