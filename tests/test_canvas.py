"""Canvas, send options and typed sync results against real brokers and a real worker.

One prefork worker per broker serves every test here (prefork: hard time limits are
enforced only there); delays are one to two seconds.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio
import kombu
import pytest
from celery import Celery, chain, chord, group
from celery.canvas import Signature
from celery.result import AsyncResult

import celerybridge
from celerybridge import (
    Bridge,
    BridgeSettings,
    ConfigurationError,
    ContractResult,
    GroupHandle,
    RemoteTaskError,
    TaskHandle,
)
from celerybridge._transports.kombu import close_celery_app

from ._brokers import BROKERS, RESULT_BACKEND
from ._workers import Worker
from .workers import canvas_bindings as b

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module", params=sorted(BROKERS))
def canvas_worker(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Worker]:
    """One prefork worker on the contracts' queue, per broker, for the whole module."""
    worker = Worker(
        "tests.workers.canvas_worker",
        BROKERS[str(request.param)],
        RESULT_BACKEND,
        pool="prefork",
        concurrency=2,
        queue=b.QUEUE,
    )
    log_dir: Path = tmp_path_factory.mktemp("canvas-workers")
    worker.start(log_dir)
    yield worker
    worker.stop()


@pytest.fixture
def canvas_settings(canvas_worker: Worker) -> BridgeSettings:
    return BridgeSettings(
        broker_url=canvas_worker.broker_url,
        result_backend=RESULT_BACKEND,
        publish_timeout=10,
        result_timeout=20,
    )


@pytest.fixture
async def cbridge(canvas_settings: BridgeSettings) -> AsyncIterator[Bridge]:
    async with Bridge(canvas_settings) as bridge:
        yield bridge


# -- Canvas ---------------------------------------------------------------------------


async def test_chain_of_three_contract_steps(cbridge: Bridge) -> None:
    workflow = chain(b.add.s(1, 2), b.add.s(3), b.mul.s(10))
    handle = await cbridge.send_canvas(workflow)
    assert isinstance(handle, TaskHandle)
    assert handle.task_name == "canvas.mul"  # the last step's contract decodes the result
    assert await handle.result(timeout=15) == 60


async def test_group_of_contract_steps(cbridge: Bridge) -> None:
    handle = await cbridge.send_canvas(group(b.add.s(i, i) for i in range(3)))
    assert isinstance(handle, GroupHandle)
    assert len(handle) == 3
    assert await handle.result(timeout=15) == [0, 2, 4]


async def test_chord_with_a_contract_callback(cbridge: Bridge) -> None:
    workflow = chord([b.add.s(1, 1), b.mul.s(2, 3)], b.tsum.s())
    handle = await cbridge.send_canvas(workflow)
    assert isinstance(handle, TaskHandle)
    assert handle.task_name == "canvas.tsum"
    assert await handle.result(timeout=15) == 8


async def test_chord_on_a_database_result_backend(tmp_path: Path) -> None:
    """A database backend has no native chords: Celery's client sends a
    ``celery.chord_unlock`` task (no task id of its own, routing options of its own),
    which polls the header's results. Recorded with an id, sent, run by a real worker."""
    backend = f"db+sqlite:///{tmp_path / 'results.sqlite'}"
    queue = f"cb-chord-db-{uuid.uuid4().hex[:8]}"
    worker = Worker(
        "tests.workers.canvas_worker", BROKERS["redis"], backend, concurrency=2, queue=queue
    )
    worker.start(tmp_path)
    try:
        settings = BridgeSettings(
            broker_url=BROKERS["redis"], result_backend=backend, result_timeout=20
        )
        async with Bridge(settings) as bridge:
            workflow = chord(
                [b.add.s(1, 1).set(queue=queue), b.mul.s(2, 3).set(queue=queue)],
                b.tsum.s().set(queue=queue),
            )
            handle = await bridge.send_canvas(workflow)
            assert isinstance(handle, TaskHandle)
            assert handle.task_name == "canvas.tsum"
            assert await handle.result(timeout=20) == 8
    finally:
        worker.stop()


async def test_link_callback_gets_the_result_and_link_error_runs_on_failure(
    cbridge: Bridge,
) -> None:
    callback_id = str(uuid.uuid4())
    linked = b.add.with_options(link=b.mul.signature((10,), task_id=callback_id))
    first = await linked.via(cbridge).delegate(1, 2)
    assert await first.result(timeout=15) == 3
    assert await cbridge.handle(b.mul, callback_id).result(timeout=15) == 30

    # A plain by-name errback on a queue nobody consumes: the worker publishes it there,
    # old style, with the failed task's id.
    side = f"cb-errback-{uuid.uuid4().hex[:8]}"
    errback = Signature("audit.failed", options={"queue": side})
    failing = await b.boom.with_options(link_error=errback).via(cbridge).delegate("x")
    with pytest.raises(RemoteTaskError):
        await failing.result(timeout=15)
    body = await anyio.to_thread.run_sync(_take_one, cbridge.settings.broker_url, side)
    assert body[0] == [failing.id]


async def test_a_chain_step_header_cannot_swap_the_task_that_runs(cbridge: Bridge) -> None:
    """Red team (moved from tests/test_canvas_attacks.py, on this module's workers): the
    contract check validated canvas.mul(3, 10); a custom header on the embedded step
    would replace the task name when the worker sends it, so canvas.add would run and
    its result be decoded through mul's contract. Refused before anything is sent."""
    workflow = chain(b.add.s(1, 2), b.mul.s(10).set(headers={"task": b.add.wire_name}))
    with pytest.raises(ConfigurationError) as caught:
        await cbridge.send_canvas(workflow)
    assert str(caught.value) == (
        "header 'task' is reserved: Celery's protocol, the worker's request or celerybridge set it"
    )
    handle = await cbridge.send_canvas(chain(b.add.s(1, 2), b.mul.s(10)))
    assert await handle.result(timeout=15) == 30


def _take_one(broker_url: str, queue: str) -> list[object]:
    with kombu.Connection(broker_url) as connection:
        simple = connection.SimpleQueue(queue)
        try:
            message = simple.get(timeout=10)
            message.ack()
            payload: list[object] = message.decode()
            return payload
        finally:
            simple.close()


# -- Send options, honoured by the worker ---------------------------------------------


async def test_headers_task_id_and_time_limits_reach_the_request(cbridge: Bridge) -> None:
    task_id = f"fixed-{uuid.uuid4()}"
    options = {"headers": {"x-tenant": "acme"}, "time_limit": 30, "soft_time_limit": 20}
    handle = await cbridge.delegate(  # task_id is per call, not with_options'
        "canvas.request", "h", send_options={**options, "task_id": task_id}
    )
    seen = await handle.result(timeout=15)
    assert handle.id == task_id
    assert (seen["id"], seen["tenant"], seen["timelimit"]) == (task_id, "acme", [30, 20])


async def test_delegate_by_name_takes_send_options(cbridge: Bridge) -> None:
    handle = await cbridge.delegate(
        "canvas.request", "by-name", send_options={"headers": {"x-tenant": "beta"}}
    )
    seen = await handle.result(timeout=15)
    assert (seen["tag"], seen["tenant"]) == ("by-name", "beta")


async def test_eta_and_countdown_delay_the_task(cbridge: Bridge) -> None:
    sent = time.time()
    eta = datetime.now(UTC) + timedelta(seconds=1.5)
    by_eta = await b.request.with_options(eta=eta).via(cbridge).delegate("eta")
    by_countdown = await b.request.with_options(countdown=1).via(cbridge).delegate("cd")
    started_eta = (await by_eta.result(timeout=15))["started"]
    started_countdown = (await by_countdown.result(timeout=15))["started"]
    assert started_eta >= eta.timestamp() - 0.05
    assert started_countdown - sent >= 0.95


async def test_expires_makes_the_task_expire(cbridge: Bridge) -> None:
    now = datetime.now(UTC)
    stub = b.request.with_options(
        eta=now + timedelta(seconds=1.5), expires=now + timedelta(seconds=0.5)
    )
    handle = await stub.via(cbridge).delegate("late")
    with pytest.raises(RemoteTaskError) as caught:
        await handle.result(timeout=15)
    assert caught.value.remote_type == "TaskRevokedError"
    assert "expired" in caught.value.remote_message


async def test_time_limit_kills_a_long_task(cbridge: Bridge) -> None:
    handle = await b.sleep.with_options(time_limit=1).via(cbridge).delegate(30)
    with pytest.raises(RemoteTaskError) as caught:
        await handle.result(timeout=15)
    assert caught.value.remote_type == "TimeLimitExceeded"


# -- Sync results, typed ---------------------------------------------------------------


async def test_sync_results_decode_through_the_contract(canvas_settings: BridgeSettings) -> None:
    celerybridge.configure(canvas_settings)
    result = b.add.apply_async((20, 22))
    assert isinstance(result, ContractResult)
    assert isinstance(result, AsyncResult)  # still Celery's, for code that expects one
    value = await anyio.to_thread.run_sync(lambda: result.get(timeout=15))
    assert value == 42
    assert (result.state, result.ready(), result.successful()) == ("SUCCESS", True, True)


async def test_sync_failure_is_a_remote_task_error_never_an_instance(
    canvas_settings: BridgeSettings,
) -> None:
    celerybridge.configure(canvas_settings)
    Boom = b.Boom
    created = Boom.created
    result = b.boom.delay("kaboom")
    with pytest.raises(RemoteTaskError) as caught:
        await anyio.to_thread.run_sync(lambda: result.get(timeout=15))
    error = caught.value
    assert (error.remote_type, error.remote_message, error.task_id) == ("Boom", "kaboom", result.id)
    assert str(error) == f"task 'canvas.boom' v1 ({result.id}) failed: Boom: kaboom"
    assert result.state == "FAILURE"
    assert isinstance(result.result, dict)  # the stored record, as data
    assert Boom.created == created  # the class named by the backend was never instantiated
    returned = await anyio.to_thread.run_sync(lambda: result.get(timeout=15, propagate=False))
    assert isinstance(returned, RemoteTaskError)

    # The control: Celery's own AsyncResult rebuilds the remote class in this process.
    app = Celery("control", backend=RESULT_BACKEND, set_as_current=False)
    try:
        plain: AsyncResult[object] = AsyncResult(result.id, app=app)
        rebuilt = await anyio.to_thread.run_sync(lambda: plain.get(timeout=15, propagate=False))
        assert isinstance(rebuilt, Boom)
        assert Boom.created == created + 1
    finally:
        close_celery_app(app, app.backend)


async def test_sync_get_times_out_with_our_error(canvas_settings: BridgeSettings) -> None:
    celerybridge.configure(canvas_settings)
    result = b.sleep.delay(2)
    started = time.monotonic()
    with pytest.raises(celerybridge.ResultTimeoutError) as caught:
        await anyio.to_thread.run_sync(lambda: result.get(timeout=0.3))
    assert time.monotonic() - started < 1.5
    assert str(caught.value) == f"task 'canvas.sleep' v1 ({result.id}) did not finish within 0.3 s"
