"""``celerybridge.AsyncioPool`` when the event loop is blocked past a hard time limit or
lost, and plain Celery ``async def`` tasks. Real workers on real brokers."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import pytest
from celery import Celery

from celerybridge import Bridge, RemoteTaskError

from ..._brokers import BROKERS, RESULT_BACKEND
from ..._workers import Worker, stop_all
from ...workers import pool_bindings as bindings
from .conftest import pool_worker, wait_for

pytestmark = pytest.mark.integration

FATAL_EXIT = 70


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator[Callable[[str], Worker]]:
    started: list[Worker] = []

    def start(broker: str) -> Worker:
        worker = pool_worker(broker, tmp_path / "markers", concurrency=10)
        started.append(worker)
        return worker.start(tmp_path)

    yield start
    stop_all(started)


def exit_code(worker: Worker, timeout: float) -> int | None:
    assert worker.process is not None
    try:
        return worker.process.wait(timeout)
    except Exception:
        return None


async def test_a_loop_back_within_the_grace_keeps_the_worker(
    start_worker: Callable[[str], Worker], bridge: Bridge, broker: str, tmp_path: Path
) -> None:
    """Limit 1 s, the body blocks the loop 2 s: it fails with ``TimeLimitExceeded`` at
    1 s; at 2 s the loop is back, the coroutine is cancelled at its next await, and
    the worker goes on."""
    worker = await anyio.to_thread.run_sync(start_worker, broker)
    handle = await bridge.send(bindings.block_hard.with_options(queue=worker.queue), (2.0,), {})
    with pytest.raises(RemoteTaskError) as raised:
        await handle.result(timeout=20)
    assert raised.value.remote_type == "TimeLimitExceeded"
    nap = await bridge.send(bindings.nap.with_options(queue=worker.queue), (0.0,), {})
    assert await nap.result(timeout=20) == nap.id
    assert worker.running
    assert not (tmp_path / "markers" / f"after-{handle.id}").exists(), "it was not cancelled"
    with pytest.raises(RemoteTaskError) as again:  # nothing stored over the failure
        await bridge.handle(bindings.block_hard, handle.id).result(timeout=5)
    assert again.value.remote_type == "TimeLimitExceeded"
    assert "CRITICAL" not in worker.log()


async def test_a_loop_blocked_past_the_grace_stops_the_worker(
    start_worker: Callable[[str], Worker], bridge: Bridge, broker: str
) -> None:
    """Limit 1 s, the body blocks the loop 60 s: the task fails at 1 s; 3 s later the
    worker process exits 70 with a critical line naming the task."""
    worker = await anyio.to_thread.run_sync(start_worker, broker)
    handle = await bridge.send(bindings.block_hard.with_options(queue=worker.queue), (60.0,), {})
    with pytest.raises(RemoteTaskError) as raised:
        await handle.result(timeout=20)
    assert raised.value.remote_type == "TimeLimitExceeded"
    assert await anyio.to_thread.run_sync(exit_code, worker, 20) == FATAL_EXIT, worker.log()
    assert (
        f"CRITICAL/MainProcess] task pool.block_hard[{handle.id}] is 3.0s past its hard "
        "time limit (1s) and still blocks the worker's event loop"
    ) in worker.log()


async def test_a_lost_loop_stops_the_worker(
    start_worker: Callable[[str], Worker], bridge: Bridge, broker: str
) -> None:
    """A loop callback raising ``SystemExit`` ends the loop thread: the worker exits 70
    with a critical line instead of taking tasks it can never run."""
    worker = await anyio.to_thread.run_sync(start_worker, broker)
    await bridge.send(bindings.stop_loop.with_options(queue=worker.queue), (), {})
    assert await anyio.to_thread.run_sync(exit_code, worker, 20) == FATAL_EXIT, worker.log()
    assert "the worker's event loop has stopped with 1 task(s) in flight" in worker.log()


def test_plain_celery_async_tasks_run_on_the_loop(
    start_worker: Callable[[str], Worker], broker: str
) -> None:
    """A bound ``@app.task async def`` returns its coroutine's value; another one that
    calls it directly awaits it, as it would without the pool."""
    worker = start_worker(broker)
    client = Celery("pool-plain", broker=BROKERS[broker], backend=RESULT_BACKEND,
                    set_as_current=False)  # fmt: skip
    try:
        double = client.send_task("pool.plain_double", args=[21], queue=worker.queue)
        calls = client.send_task("pool.plain_calls", args=[20], queue=worker.queue)
        assert double.get(timeout=20) == {"double": 42, "id": double.id}
        assert calls.get(timeout=20) == 41
    finally:
        client.close()
    wait_for(lambda: worker.running, 1, "the worker")
