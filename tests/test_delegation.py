"""Delegation through real brokers to real ``celery worker`` processes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import anyio
import pytest
from celery import Celery
from celery.result import AsyncResult

import celerybridge
from celerybridge import (
    Bridge,
    RemoteTaskError,
    ResultTimeoutError,
    TaskHandle,
)
from celerybridge._transports.kombu import close_celery_app

from ._brokers import dead_letters
from ._workers import Worker
from .workers import bindings

pytestmark = pytest.mark.integration


async def test_typed_stub_round_trip(bridge: Bridge, bridge_worker: Worker) -> None:
    add = bindings.add.with_options(queue=bridge_worker.queue)
    handle = await bridge.send(add, (2, "40"), {})
    total = await handle.result(timeout=20)
    # "40" was coerced to int before sending; the result comes back as the contract's model.
    assert isinstance(total, bindings.Total)
    assert total.value == 42


async def test_delegate_by_name_picks_default_and_explicit_version(
    bridge: Bridge, bridge_worker: Worker
) -> None:
    queue = {"queue": bridge_worker.queue}
    registry_stubs = (bindings.add.with_options(**queue), bindings.add_v2.with_options(**queue))
    v1 = await bridge.send(registry_stubs[0], (1, 2), {})
    v2 = await bridge.send(registry_stubs[1], (1, 2), {"z": 3})
    assert (await v1).value == 3
    assert (await v2).value == 6
    assert (v1.task_name, v2.task_name) == ("calc.add", "calc.add_v2")


async def test_module_level_delegate_by_name(
    settings: celerybridge.BridgeSettings, bridge_worker: Worker
) -> None:
    celerybridge.configure(settings)
    try:
        # The worker consumes its own queue; route the contract there for this test.
        from celerybridge._registry import registry

        contract = registry._contracts["calc.add"]
        for version, stub in list(contract.versions.items()):
            contract.versions[version] = stub.with_options(queue=bridge_worker.queue)
        handle = await celerybridge.delegate("calc.add", 20, 22)
        v2 = await celerybridge.delegate("calc.add", 1, 1, version="2", z=1)
        assert (await handle).value == 42
        assert (await v2).value == 3
    finally:
        await celerybridge.close_default_bridge()


async def test_remote_failure_carries_type_message_and_traceback(
    bridge: Bridge, bridge_worker: Worker
) -> None:
    handle = await bridge.send(bindings.fail.with_options(queue=bridge_worker.queue), ("boom",), {})
    with pytest.raises(RemoteTaskError) as caught:
        await handle.result(timeout=20)
    error = caught.value
    assert (error.remote_type, error.remote_message) == ("ValueError", "boom")
    assert error.remote_traceback is not None
    assert "raise ValueError(message)" in error.remote_traceback
    assert str(error) == f"task 'calc.fail' v1 ({handle.id}) failed: ValueError: boom"


async def test_result_timeout_is_a_timeout_error(bridge: Bridge, bridge_worker: Worker) -> None:
    handle = await bridge.send(bindings.sleep.with_options(queue=bridge_worker.queue), (2,), {})
    with pytest.raises(TimeoutError) as caught:
        await handle.result(timeout=0.2)
    assert isinstance(caught.value, ResultTimeoutError)
    assert str(caught.value) == f"task 'calc.sleep' v1 ({handle.id}) did not finish within 0.2 s"
    assert await handle.result(timeout=20) == 2.0


async def test_cancelling_a_waiter_leaves_nothing_behind(
    bridge: Bridge, bridge_worker: Worker
) -> None:
    handle = await bridge.send(bindings.sleep.with_options(queue=bridge_worker.queue), (1,), {})
    results = bridge._get_results()
    with anyio.move_on_after(0.3) as scope:
        async with anyio.create_task_group() as group:
            group.start_soon(handle.result, 20)
            await anyio.sleep(0.1)
            assert results.waiting == 1
    assert scope.cancelled_caught
    assert results.waiting == 0
    assert await handle == 1.0


async def test_fire_and_forget_creates_no_waiting_state(
    bridge: Bridge, bridge_worker: Worker
) -> None:
    handles = [
        await bridge.send(bindings.add.with_options(queue=bridge_worker.queue), (i, i), {})
        for i in range(20)
    ]
    assert all(isinstance(h, TaskHandle) for h in handles)
    # No result source was even created: nothing polls, nothing subscribes.
    assert bridge._results is None


async def test_async_bodies_share_one_persistent_loop_per_process(
    start_worker: Callable[..., Worker], settings: celerybridge.BridgeSettings, broker: str
) -> None:
    worker = start_worker("tests.workers.bridge_worker", broker, pool="prefork", concurrency=2)
    async with Bridge(settings) as bridge:
        stub = bindings.loop_identity.with_options(queue=worker.queue)
        outcomes = [await (await bridge.send(stub, (), {})).result(timeout=20) for _ in range(12)]
    by_pid: dict[int, set[int]] = {}
    for outcome in outcomes:
        by_pid.setdefault(outcome["pid"], set()).add(outcome["loop"])
        assert outcome["loop"] == outcome["resource_loop"]
        assert outcome["created"] == 1  # the resource was made once in each process
    assert all(len(loops) == 1 for loops in by_pid.values())


async def test_seed_style_sync_apply_async_reaches_worker(
    settings: celerybridge.BridgeSettings, bridge_worker: Worker
) -> None:
    celerybridge.configure(settings)
    args = (5, 6)
    result = bindings.add.apply_async(args, queue=bridge_worker.queue, serializer="json")
    value = await anyio.to_thread.run_sync(lambda: result.get(timeout=20))
    assert isinstance(result, AsyncResult)  # still Celery's, for code that expects one
    close_celery_app(result.app, result.backend)
    assert isinstance(value, bindings.Total)  # decoded through the contract
    assert value.value == 11
    assert bindings.add.delay(1, 1).id  # goes to the declared queue; nobody consumes it


def _plain_client(broker_url: str, backend: str) -> Celery:
    return Celery("plain_client", broker=broker_url, backend=backend, set_as_current=False)


def test_a_closed_app_publishes_to_its_new_broker_url() -> None:
    app = Celery("reused", broker="memory://one", set_as_current=False)
    assert app.amqp.producer_pool.connections.connection.hostname == "one"
    close_celery_app(app)
    app.conf.update(broker_url="memory://two")
    assert app.amqp.producer_pool.connections.connection.hostname == "two"


async def test_plain_celery_send_task_reaches_celerybridge_worker(
    bridge: Bridge, bridge_worker: Worker
) -> None:
    settings = bridge.settings
    app = _plain_client(settings.broker_url, str(settings.result_backend))
    try:
        result = app.send_task("calc.add", args=(3, 4), queue=bridge_worker.queue)
        value = await anyio.to_thread.run_sync(lambda: result.get(timeout=20))
        assert value["value"] == 7
        bad = app.send_task("calc.add", args=("three", 4), queue=bridge_worker.queue)
    finally:
        close_celery_app(app, result.backend)
    # The worker validated on receipt and failed the task with our error; the body never ran.
    with pytest.raises(RemoteTaskError) as caught:
        await TaskHandle(bridge, bindings.add, bad.id).result(timeout=20)
    assert caught.value.remote_type == "ArgumentError"
    assert caught.value.remote_message == (
        "task 'calc.add' v1, parameter 'x': Input should be a valid integer, "
        "unable to parse string as an integer (got 'three')"
    )
    # ...and copied the call to the dead letters, to be fixed and replayed.
    dead = dead_letters(settings.broker_url, bridge_worker.queue)
    assert [letter["id"] for letter in dead] == [bad.id]


async def test_delegate_reaches_a_plain_celery_worker(bridge: Bridge, plain_worker: Worker) -> None:
    v1 = bindings.store.with_options(queue=plain_worker.queue)
    v2 = bindings.store_v2.with_options(queue=plain_worker.queue)
    first = await (await bridge.send(v1, ("a/b.json", "{}"), {})).result(timeout=20)
    second = await (await bridge.send(v2, ("c.json", "[]", {"owner": "b"}), {})).result(timeout=20)
    assert first == {"key": "a/b.json", "content": "{}", "bridge_loaded": "False"}
    assert second == {"key": "c.json", "content": "[]", "owner": "b"}


async def test_embedded_filesystem_broker_and_file_results(tmp_path: Path) -> None:
    # No server at all: the demo's default. Worker and bridge share two folders.
    broker, results = f"filesystem://{tmp_path / 'broker'}", tmp_path / "results"
    results.mkdir()
    worker = Worker("tests.workers.bridge_worker", broker, f"file://{results}")
    worker.start(tmp_path)
    try:
        async with Bridge(broker_url=broker, result_backend=f"file://{results}") as bridge:
            handle = await bridge.send(bindings.add.with_options(queue=worker.queue), (2, 3), {})
            assert (await handle.result(timeout=20)).value == 5
    finally:
        worker.stop()
