"""Real workers on the reliable Redis transport: a kill after the take, long tasks with a
short visibility timeout, and a message that kills its worker every time.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from celerybridge import Bridge, DeadLetteredError
from tests.workers import reliable_bindings

from ..._brokers import BROKERS, RESULT_BACKEND
from ..._workers import Worker, stop_all

pytestmark = pytest.mark.integration

URL = BROKERS["redis"]
# Redelivery after a crash within ~2 s: the sweep looks every 0.5 s.
FAST_REDELIVERY = {
    "visibility_timeout": 2,
    "unacked_restore_interval": 0.5,
    "unacked_restore_throttle": 1,
}


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator[Callable[..., Worker]]:
    """Start ``tests.workers.reliable_worker`` processes; stopped after the test."""
    started: list[Worker] = []

    def start(queue: str, *, pool: str = "threads", wait: bool = True, **env: str) -> Worker:
        worker = Worker(
            "tests.workers.reliable_worker", URL, RESULT_BACKEND, pool=pool, queue=queue
        )
        worker.concurrency = 2
        worker.extra_env.update(
            CELERYBRIDGE_BROKER_TRANSPORT_OPTIONS=json.dumps(FAST_REDELIVERY), **env
        )
        started.append(worker)
        folder = tmp_path / f"w{len(started)}"
        folder.mkdir()
        return worker.start(folder, wait=wait)

    yield start
    stop_all(started)


def _records_of(task_id: str) -> list[str]:
    """The delivery tags of the ``unacked`` records holding ``task_id``'s message."""
    with redis.Redis.from_url(URL) as client:
        return [
            tag.decode() for tag, value in client.hscan_iter("unacked") if task_id.encode() in value
        ]


def _records_after_ack(task_id: str, timeout: float = 5) -> list[str]:
    """``_records_of(task_id)`` once they are gone, or as they are after ``timeout``."""
    deadline = time.monotonic() + timeout
    while (records := _records_of(task_id)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return records


def _wait_ready(workers: list[Worker], timeout: float = 60) -> None:
    """Wait until workers started side by side are all ready."""
    deadline = time.monotonic() + timeout
    while not all(" ready." in w.log() for w in workers):
        assert time.monotonic() < deadline, [w.log()[-2000:] for w in workers]
        time.sleep(0.05)


def _wait_exit(worker: Worker, timeout: float = 20) -> None:
    assert worker.process is not None
    worker.process.wait(timeout)


@pytest.mark.parametrize("transport", ["celerybridge", "kombu"])
async def test_a_worker_killed_after_the_take_loses_nothing(
    transport: str, start_worker: Callable[..., Worker], tmp_path: Path
) -> None:
    """The worker dies after Redis handed it the message and before it runs it. On
    celerybridge's transport the message is recorded as unacknowledged and another worker
    runs it once the visibility timeout has passed; kombu's own transport (the control)
    had popped it without a record: gone."""
    queue = f"cb-take-kill-{uuid.uuid4().hex[:8]}"
    marker = tmp_path / "killed"
    env = {"CB_TEST_KILL_AT_DELIVERY": str(marker)}
    if transport == "kombu":
        env["CB_TEST_STOCK_TRANSPORT"] = "1"
    victim = start_worker(queue, **env)
    async with Bridge(broker_url=URL, result_backend=RESULT_BACKEND) as bridge:
        handle = await bridge.send(reliable_bindings.add.with_options(queue=queue), (2, 3), {})
        _wait_exit(victim)
        assert marker.exists()  # killed where the test put the fault
        with redis.Redis.from_url(URL) as client:
            assert client.llen(queue) == 0  # taken off the queue either way
        if transport == "kombu":
            assert _records_of(handle.id) == [], "kombu's transport recorded it after all"
            return
        assert len(_records_of(handle.id)) == 1
        rescuer = start_worker(queue)
        assert rescuer.process is not None
        began = time.monotonic()
        assert await handle.result(timeout=20) == [5, rescuer.process.pid]
        assert time.monotonic() - began < 10
    # The acknowledgement follows the stored result (acks_late): give it a moment.
    assert await asyncio.to_thread(_records_after_ack, handle.id) == []
    assert rescuer.log().count(f"[{handle.id}] received") == 1


async def test_a_task_longer_than_the_visibility_timeout_runs_once(
    start_worker: Callable[..., Worker],
) -> None:
    """Visibility timeout 2 s, a task of 5 s, two workers sweeping every 0.5 s: the
    running task's record is refreshed, so neither worker restores it."""
    queue = f"cb-take-long-{uuid.uuid4().hex[:8]}"
    workers = [start_worker(queue, wait=False) for _ in range(2)]
    _wait_ready(workers)
    async with Bridge(broker_url=URL, result_backend=RESULT_BACKEND) as bridge:
        handle = await bridge.send(reliable_bindings.sleep.with_options(queue=queue), (5.0,), {})
        await handle.result(timeout=30)
        await asyncio.sleep(1.5)  # a restored copy would have been taken by now
    received = sum(w.log().count(f"[{handle.id}] received") for w in workers)
    assert received == 1, [w.log()[-3000:] for w in workers]


async def test_a_message_that_kills_its_worker_every_time_is_dead_lettered(
    start_worker: Callable[..., Worker],
) -> None:
    """Each delivery kills the pool process (Celery puts it back: task_reject_on_worker_lost);
    the third delivery is over CELERYBRIDGE_MAX_DELIVERIES=2 and goes to the dead letters,
    its caller told at once."""
    queue = f"cb-take-crash-{uuid.uuid4().hex[:8]}"
    worker = start_worker(queue, pool="prefork", CELERYBRIDGE_MAX_DELIVERIES="2")
    async with Bridge(broker_url=URL, result_backend=RESULT_BACKEND) as bridge:
        handle = await bridge.send(reliable_bindings.crash.with_options(queue=queue), (), {})
        with pytest.raises(DeadLetteredError) as caught:
            await handle.result(timeout=30)
    reason = "delivered 3 times, more than CELERYBRIDGE_MAX_DELIVERIES (2)"
    assert str(caught.value).endswith(f"failed: DeadLettered: {reason}")
    assert worker.log().count("Task handler raised error: WorkerLostError") == 2
    with redis.Redis.from_url(URL) as client:
        letters = [json.loads(e) for e in client.lrange(f"{queue}.dead", 0, -1)]
        client.delete(f"{queue}.dead")
    assert [letter["headers"]["id"] for letter in letters] == [handle.id]
    assert letters[0]["headers"]["x-celerybridge-dead-kind"] == "deliveries"
    assert _records_of(handle.id) == []
