"""``celerybridge.AsyncioPool`` with real workers on Redis and RabbitMQ: many coroutine
tasks in one process, Celery's request context right across awaits, sync tasks beside
them, retries, time limits, revoke with terminate, the loop-lag watchdog.

The shutdown and kill cases are in ``test_shutdown.py``.
"""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
import time
import uuid
from pathlib import Path

import anyio
import pytest
from celery import Celery

from celerybridge import Bridge, RemoteTaskError

from ... import _summary as summary
from ..._brokers import BROKERS, RESULT_BACKEND
from ..._workers import ROOT, Worker
from ...workers import pool_bindings as bindings
from .conftest import markers_of, pool_worker, wait_for

pytestmark = pytest.mark.integration

NAPS = 400
NAP_DEADLINE = 15.0
MAX_THREADS = 30


def threads_of(worker: Worker) -> int:
    assert worker.process is not None
    return len(os.listdir(f"/proc/{worker.process.pid}/task"))


async def test_400_coroutine_tasks_run_at_once_in_one_process(
    worker: Worker, bridge: Bridge, broker: str
) -> None:
    """400 tasks each awaiting ``asyncio.sleep(1)`` all finish together, in one process
    with fewer than 30 threads (-c 400: today a threads pool would need 400 threads).

    The issue's target is under 4 s; the machine running the tests is shared and loaded,
    so the test's deadline is a generous 15 s (a serial run would take 400 s, a 4-thread
    pool 100 s) and the time measured is reported in the run's summary, not asserted.
    """
    nap = bindings.nap.with_options(queue=worker.queue)
    begun = time.monotonic()
    handles = await asyncio.gather(*(bridge.send(nap, (1.0,), {}) for _ in range(NAPS)))
    peak_threads = threads_of(worker)
    with anyio.fail_after(NAP_DEADLINE):
        results = await asyncio.gather(*(handle.result() for handle in handles))
    elapsed = time.monotonic() - begun
    peak_threads = max(peak_threads, threads_of(worker))
    # Each task saw its own id (its request), and each ran once.
    assert results == [handle.id for handle in handles]
    assert peak_threads < MAX_THREADS
    summary.add(
        "asyncio pool",
        f"{broker:6} {NAPS} x asyncio.sleep(1): all done in {elapsed:.2f}s "
        f"(target < 4 s), worker threads {peak_threads}",
        header="celerybridge.AsyncioPool, one worker process, -c 400",
    )


async def test_the_request_context_stays_right_across_awaits(
    worker: Worker, bridge: Bridge
) -> None:
    """``current_task``, the task's ``request`` and a child asyncio Task's view of them
    name each task's own id at every await, while 200 others interleave."""
    stub = bindings.context.with_options(queue=worker.queue)
    rng = random.Random()
    handles = await asyncio.gather(
        *(bridge.send(stub, (rng.uniform(0, 0.05), 5), {}) for _ in range(200))
    )
    results = await asyncio.gather(*(handle.result(timeout=30) for handle in handles))
    for handle, seen in zip(handles, results, strict=True):
        assert seen == {key: [handle.id] * 5 for key in ("current_task", "request", "child")}


async def test_a_sync_task_runs_in_the_thread_pool_beside_coroutines(
    worker: Worker, bridge: Bridge
) -> None:
    naps = await asyncio.gather(
        *(bridge.send(bindings.nap.with_options(queue=worker.queue), (1.0,), {}) for _ in range(50))
    )
    add = bindings.sync_add.with_options(queue=worker.queue)
    handle = await bridge.send(add, (2, 3), {})
    with anyio.fail_after(10):  # not behind the 50 naps: they do not hold threads
        outcome = await handle.result()
    assert outcome["sum"] == 5
    assert outcome["id"] == handle.id
    assert str(outcome["thread"]).startswith("celerybridge-sync")
    assert [await nap.result(timeout=30) for nap in naps] == [nap.id for nap in naps]


async def test_retries_with_a_countdown(worker: Worker, bridge: Bridge) -> None:
    stub = bindings.retry_once.with_options(queue=worker.queue)
    sent = time.time()
    outcome = await (await bridge.send(stub, ("first fails",), {})).result(timeout=30)
    assert outcome["retries"] == 1
    # The retry waited out its countdown (default_retry_delay=1) before it ran.
    assert float(outcome["at"]) - sent >= 1.0
    assert "pool.retry_once" in worker.log()
    assert "Retry in 1s: Flaky('first fails')" in worker.log()


async def test_a_soft_time_limit_cancels_the_coroutine(worker: Worker, bridge: Bridge) -> None:
    stub = bindings.soft_limited.with_options(queue=worker.queue)
    handle = await bridge.send(stub, (30.0,), {})
    with pytest.raises(RemoteTaskError) as raised:
        await handle.result(timeout=20)
    assert raised.value.remote_type == "SoftTimeLimitExceeded"
    assert raised.value.remote_message == "soft time limit (1s) exceeded"
    # Celery logs it from the consumer's thread, which may come after the stored result.
    line = f"Soft time limit (1s) exceeded for pool.soft_limited[{handle.id}]"
    await anyio.to_thread.run_sync(wait_for, lambda: line in worker.log(), 5, "the log line")


async def test_a_body_may_handle_the_soft_time_limit(worker: Worker, bridge: Bridge) -> None:
    stub = bindings.soft_cleanup.with_options(queue=worker.queue)
    handle = await bridge.send(stub, (30.0,), {})
    assert await handle.result(timeout=20) == f"cleaned up {handle.id}"


async def test_a_hard_time_limit_ends_the_task(worker: Worker, bridge: Bridge) -> None:
    stub = bindings.hard_limited.with_options(queue=worker.queue)
    handle = await bridge.send(stub, (30.0,), {})
    with pytest.raises(RemoteTaskError) as raised:
        await handle.result(timeout=20)
    assert raised.value.remote_type == "TimeLimitExceeded"
    assert f"Hard time limit (1s) exceeded for pool.hard_limited[{handle.id}]" in worker.log()
    # The coroutine was cancelled (its finally ran), and the worker goes on.
    marker = markers_of(worker) / f"hard-{handle.id}"
    await anyio.to_thread.run_sync(wait_for, marker.exists, 5, "the body's finally")
    assert marker.read_text() == "unwound\n"
    nap = await bridge.send(bindings.nap.with_options(queue=worker.queue), (0.0,), {})
    assert await nap.result(timeout=20) == nap.id


async def test_revoke_with_terminate_cancels_a_coroutine(
    worker: Worker, bridge: Bridge, broker: str
) -> None:
    stub = bindings.stubborn.with_options(queue=worker.queue)
    handle = await bridge.send(stub, (60.0,), {})
    markers = markers_of(worker)
    started = markers / f"started-{handle.id}"
    await anyio.to_thread.run_sync(wait_for, started.exists, 20, "the task to start")
    control = Celery(
        "revoker", broker=BROKERS[broker], backend=RESULT_BACKEND, set_as_current=False
    )
    try:
        await anyio.to_thread.run_sync(lambda: control.control.revoke(handle.id, terminate=True))
        cancelled = markers / f"cancelled-{handle.id}"
        await anyio.to_thread.run_sync(wait_for, cancelled.exists, 10, "the cancellation")
        state = await anyio.to_thread.run_sync(lambda: control.AsyncResult(handle.id).state)
    finally:
        control.close()
    assert state == "REVOKED"
    assert f"Terminating {handle.id} (15)" in worker.log()
    nap = await bridge.send(bindings.nap.with_options(queue=worker.queue), (0.0,), {})
    assert await nap.result(timeout=20) == nap.id


async def test_a_blocking_call_in_a_coroutine_is_reported(worker: Worker, bridge: Bridge) -> None:
    stub = bindings.block.with_options(queue=worker.queue)
    handle = await bridge.send(stub, (1.5,), {})
    assert await handle.result(timeout=20) == handle.id
    assert "the worker's event loop has been blocked for" in worker.log()
    assert f"by task pool.block[{handle.id}]" in worker.log()


def test_a_setting_the_pool_cannot_honour_stops_the_worker(broker: str, tmp_path: Path) -> None:
    worker = pool_worker(broker, tmp_path / "markers", CB_POOL_MAX_TASKS_PER_CHILD="10")
    with pytest.raises(RuntimeError, match="worker did not start"):
        worker.start(tmp_path, timeout=30)
    assert (
        "celerybridge.AsyncioPool does not support --max-tasks-per-child: its tasks share "
        "one process and one event loop (use the prefork pool for them)"
    ) in worker.log()
    assert worker.process is not None
    assert worker.process.returncode != 0


def test_autoscale_stops_the_worker(broker: str) -> None:
    command = [
        sys.executable, "-m", "celery", "-A", "tests.workers.pool_worker", "worker",
        "-P", "custom", "--autoscale=10,2", "-Q", f"cb-autoscale-{uuid.uuid4().hex[:8]}",
        "--without-gossip", "--without-mingle", "--without-heartbeat",
    ]  # fmt: skip
    env = {
        **os.environ,
        "CELERY_CUSTOM_WORKER_POOL": "celerybridge:AsyncioPool",
        "CELERYBRIDGE_BROKER_URL": BROKERS[broker],
        "CELERYBRIDGE_RESULT_BACKEND": RESULT_BACKEND,
        "PYTHONPATH": str(ROOT),
    }
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert (
        "celerybridge.AsyncioPool does not support --autoscale: its tasks share one process "
        "and one event loop (use the prefork pool for them)"
    ) in done.stdout + done.stderr
