"""A task's last stored state is its final one: on a celerybridge worker, a late RETRY
(or STARTED...) never replaces the FAILURE or SUCCESS already stored for that task id."""

from __future__ import annotations

import fcntl
import json
import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis
from celery import Celery, states

from celerybridge import Bridge, BridgeSettings, RemoteTaskError, celery_app
from celerybridge._contracts import RemoteTask
from celerybridge._transports.kombu import close_celery_app
from celerybridge._worker import final_state as _final_state
from celerybridge._worker.final_state import (
    FinalStateFilesystemBackend,
    FinalStateRedisBackend,
    FinalStateSentinelBackend,
)

from .._brokers import BROKERS, RESULT_BACKEND, dead_letters
from .._workers import Worker
from ..workers import retry_bindings

# Celery's Redis backend stores final states with SETEX, which redis-py deprecates.
pytestmark = pytest.mark.filterwarnings("ignore:Call to deprecated setex:DeprecationWarning")

CALLS = 30
BATCH = 2


class Flaky(Exception):
    pass


@pytest.fixture
def app() -> Iterator[Celery]:
    """A worker app as ``celery_app`` builds it, storing results in the test Redis."""
    app = celery_app(
        "final-state", BridgeSettings(broker_url=BROKERS["redis"], result_backend=RESULT_BACKEND)
    )
    yield app
    close_celery_app(app)


@pytest.fixture
def results() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(RESULT_BACKEND)
    yield client
    client.close()


def stored(results: redis.Redis, task_id: str) -> dict[str, Any]:
    """The meta stored for ``task_id``, read as any client reads it."""
    raw = results.get(f"celery-task-meta-{task_id}")
    assert raw is not None
    meta: dict[str, Any] = json.loads(raw)
    return meta


def published(pubsub: Any) -> list[str]:
    """The states announced on a subscribed result channel so far."""
    announced = []
    while (message := pubsub.get_message(ignore_subscribe_messages=True, timeout=0.3)) is not None:
        announced.append(json.loads(message["data"])["status"])
    return announced


@pytest.fixture
def channel(results: redis.Redis) -> Callable[[str], Any]:
    """Subscribe to a task's result channel (Celery publishes each stored meta there)."""
    subscriptions = []

    def subscribe(task_id: str) -> Any:
        pubsub = results.pubsub()
        pubsub.subscribe(f"celery-task-meta-{task_id}")
        assert pubsub.get_message(timeout=2)["type"] == "subscribe"
        subscriptions.append(pubsub)
        return pubsub

    yield subscribe
    for pubsub in subscriptions:
        pubsub.close()


@pytest.mark.integration
@pytest.mark.parametrize("late", [states.RETRY, states.STARTED, states.PENDING])
def test_a_late_unready_state_does_not_replace_a_failure_on_redis(
    app: Celery, results: redis.Redis, channel: Callable[[str], Any], late: str
) -> None:
    task_id = str(uuid.uuid4())
    pubsub = channel(task_id)
    app.backend.mark_as_failure(task_id, Flaky("retries exhausted"))
    if late == states.RETRY:
        app.backend.mark_as_retry(task_id, Flaky("the first attempt's retry"))
    else:
        app.backend.store_result(task_id, {"attempt": 1}, late)

    meta = stored(results, task_id)
    assert meta["status"] == states.FAILURE
    assert meta["result"]["exc_message"] == ["retries exhausted"]
    assert published(pubsub) == [states.FAILURE]  # the late state was not announced either


@pytest.mark.integration
def test_unready_states_follow_each_other_until_a_final_one_on_redis(
    app: Celery, results: redis.Redis, channel: Callable[[str], Any]
) -> None:
    task_id = str(uuid.uuid4())
    pubsub = channel(task_id)
    app.backend.mark_as_started(task_id)
    app.backend.mark_as_retry(task_id, Flaky("first attempt"))
    assert stored(results, task_id)["status"] == states.RETRY
    app.backend.mark_as_done(task_id, {"value": 1})
    app.backend.mark_as_retry(task_id, Flaky("stale"))

    assert stored(results, task_id)["status"] == states.SUCCESS
    assert published(pubsub) == [states.STARTED, states.RETRY, states.SUCCESS]


@pytest.mark.integration
def test_a_final_state_stored_between_the_check_and_the_write_wins_on_redis(
    app: Celery,
    results: redis.Redis,
    channel: Callable[[str], Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    task_id = str(uuid.uuid4())
    pubsub = channel(task_id)
    app.backend.mark_as_started(task_id)
    checks = []
    real_check = _final_state.is_final

    def check_then_fail_meanwhile(backend: Any, raw: Any) -> bool:
        verdict = real_check(backend, raw)
        checks.append(verdict)
        if len(checks) == 1:  # another worker thread stores the failure just now
            app.backend.mark_as_failure(task_id, Flaky("retries exhausted"))
        return verdict

    monkeypatch.setattr(_final_state, "is_final", check_then_fail_meanwhile)
    app.backend.mark_as_retry(task_id, Flaky("the first attempt's retry"))

    assert checks == [False, True]  # the write saw the key change, looked again, gave up
    assert stored(results, task_id)["status"] == states.FAILURE
    assert published(pubsub) == [states.STARTED, states.FAILURE]


@pytest.mark.parametrize(
    ("url", "guarded"),
    [
        ("redis://127.0.0.1:6379/3", FinalStateRedisBackend),
        ("rediss://127.0.0.1:6380/3?ssl_cert_reqs=required", FinalStateRedisBackend),
        ("sentinel://127.0.0.1:26379/3", FinalStateSentinelBackend),
        ("file:///", FinalStateFilesystemBackend),
    ],
)
def test_worker_apps_guard_every_supported_result_backend(
    url: str, guarded: type[Any], tmp_path: Path
) -> None:
    url = url.replace("file:///", f"file://{tmp_path}")
    # A Sentinel backend needs its master's name (nothing connects here).
    options = {"master_name": "mymaster"} if url.startswith("sentinel") else {}
    settings = BridgeSettings(
        broker_url=BROKERS["redis"], result_backend=url, result_backend_transport_options=options
    )
    app = celery_app("guarded", settings)
    try:
        assert type(app.backend) is guarded
    finally:
        close_celery_app(app)


@pytest.fixture
def file_app(tmp_path: Path) -> Iterator[Celery]:
    settings = BridgeSettings(broker_url=BROKERS["redis"], result_backend=f"file://{tmp_path}")
    app = celery_app("final-state-file", settings)
    yield app
    close_celery_app(app)


def stored_file(app: Celery, task_id: str) -> str:
    meta = app.backend.decode_result(app.backend.get(app.backend.get_key_for_task(task_id)))
    return str(meta["status"])


def test_a_late_unready_state_does_not_replace_a_failure_on_file(file_app: Celery) -> None:
    task_id = str(uuid.uuid4())
    file_app.backend.mark_as_started(task_id)
    file_app.backend.mark_as_retry(task_id, Flaky("first attempt"))
    assert stored_file(file_app, task_id) == states.RETRY
    file_app.backend.mark_as_failure(task_id, Flaky("retries exhausted"))
    file_app.backend.mark_as_retry(task_id, Flaky("the first attempt's retry"))
    file_app.backend.mark_as_started(task_id)
    assert stored_file(file_app, task_id) == states.FAILURE


def test_file_results_are_compared_and_written_under_a_lock(
    file_app: Celery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    task_id = str(uuid.uuid4())
    file_app.backend.mark_as_failure(task_id, Flaky("retries exhausted"))
    held = []
    real_check = _final_state.is_final

    def check(backend: Any, raw: Any) -> bool:
        # What another process trying to write now would do: wait for the lock.
        fd = os.open(tmp_path / ".celerybridge-results.lock", os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            held.append(True)
        finally:
            os.close(fd)
        return real_check(backend, raw)

    monkeypatch.setattr(_final_state, "is_final", check)
    file_app.backend.mark_as_retry(task_id, Flaky("the first attempt's retry"))
    assert held == [True]
    assert stored_file(file_app, task_id) == states.FAILURE


async def _expect_failure(bridge: Bridge, stub: RemoteTask[Any, Any], task_id: str) -> str:
    """``Flaky`` if awaiting ``task_id`` raises the remote failure, else what happened."""
    try:
        await bridge.handle(stub, task_id).result(timeout=20)
    except RemoteTaskError as exc:
        return exc.remote_type
    except Exception as exc:  # reported, not raised: the test counts every caller
        return type(exc).__name__
    return "a value"


@pytest.mark.integration
@pytest.mark.parametrize(
    "stub", [retry_bindings.flaky, retry_bindings.flaky_late], ids=["at-once", "late-retry-store"]
)
async def test_every_caller_of_a_task_failing_after_immediate_retries_sees_the_failure(
    bridge: Bridge,
    start_worker: Callable[..., Worker],
    broker: str,
    broker_url: str,
    results: redis.Redis,
    stub: RemoteTask[Any, Any],
) -> None:
    worker = start_worker("tests.workers.retry_worker", broker)
    target = stub.with_options(queue=worker.queue)
    ids: list[str] = []
    seen: dict[str, str] = {}

    async def wait(task_id: str) -> None:
        seen[task_id] = await _expect_failure(bridge, target, task_id)

    # BATCH calls at a time on 4 pool threads: each retry finds a free thread at once.
    started = time.monotonic()
    for first in range(0, CALLS, BATCH):
        batch = [(await bridge.send(target, (n,), {})).id for n in range(first, first + BATCH)]
        async with anyio.create_task_group() as group:
            for task_id in batch:
                group.start_soon(wait, task_id)
        ids += batch
    assert sorted(seen.values()) == ["Flaky"] * CALLS
    assert time.monotonic() - started < 40

    # Both attempts of every call have stored their state by the time they log it.
    for _ in range(200):
        log = worker.log()
        if all(f"[{i}] retry:" in log and f"[{i}] raised unexpected" in log for i in ids):
            break
        await anyio.sleep(0.1)
    log = worker.log()
    raced = [i for i in ids if log.index(f"[{i}] raised unexpected") < log.index(f"[{i}] retry:")]
    if stub is retry_bindings.flaky_late:  # the retry's FAILURE came before the RETRY
        assert len(raced) >= CALLS // 2
    final = {i: stored(results, i)["status"] for i in ids}
    assert [i for i, state in final.items() if state != states.FAILURE] == []

    # A caller awaiting now (or again) sees the failure too, at once.
    seen.clear()
    async with anyio.create_task_group() as group:
        for task_id in ids:
            group.start_soon(wait, task_id)
    assert sorted(seen.values()) == ["Flaky"] * CALLS

    copied = dead_letters(broker_url, worker.queue)
    assert sorted(d["id"] for d in copied) == sorted(ids)  # each call copied once
