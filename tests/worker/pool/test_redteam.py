"""Red-team findings against ``celerybridge.AsyncioPool``: each test names what a Celery
user would expect and fails on the pool as it was reviewed (branch ``pool``).

Real workers (``tests.workers.poolrt_worker``) on real Redis and RabbitMQ.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import pytest
from celery import Celery

from celerybridge import Bridge, RemoteTaskError, ResultTimeoutError

from ..._brokers import BROKERS, RESULT_BACKEND
from ..._workers import Worker, stop_all
from ...workers import poolrt_bindings as bindings
from .conftest import pool_worker, wait_for

pytestmark = pytest.mark.integration

MODULE = "tests.workers.poolrt_worker"


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator[Callable[..., Worker]]:
    """Start red-team workers; every one is stopped (SIGKILL if it will not) at the end."""
    started: list[Worker] = []

    def start(broker: str, concurrency: int = 100, **env: str) -> Worker:
        worker = pool_worker(broker, tmp_path / "markers", concurrency, MODULE, **env)
        started.append(worker)
        return worker.start(tmp_path)

    yield start
    stop_all(started)


def control_app(broker: str) -> Celery:
    return Celery("poolrt-control", broker=BROKERS[broker], backend=RESULT_BACKEND,
                  set_as_current=False)  # fmt: skip


def started(markers: Path, task_id: str) -> list[str]:
    path = markers / f"started-{task_id}"
    return path.read_text().split() if path.exists() else []


async def nap_still_runs(worker: Worker, bridge: Bridge) -> None:
    nap = await bridge.send(bindings.nap.with_options(queue=worker.queue), (0.0,), {})
    assert await nap.result(timeout=20) == nap.id, worker.log()


# -- the loop thread dies -----------------------------------------------------------------


@pytest.mark.parametrize("stub", [bindings.exits, bindings.interrupted], ids=["exit", "kbint"])
async def test_a_body_raising_systemexit_does_not_silently_stop_the_worker(
    start_worker: Callable[..., Worker], bridge: Bridge, broker: str, stub: object
) -> None:
    """A coroutine body that raises ``SystemExit`` (a CLI helper's ``sys.exit``) or
    ``KeyboardInterrupt``: the task fails (Celery's threads pool reports it as
    ``WorkerLostError``) and the worker goes on running the next tasks.

    Found: the exception leaves the asyncio Task, asyncio re-raises it out of
    ``run_forever``, and the loop thread ends. The worker process stays up, keeps taking
    messages and acknowledging nothing: every later task hangs, and nothing is logged
    about the dead loop.
    """
    worker = await anyio.to_thread.run_sync(start_worker, broker)
    handle = await bridge.send(
        stub.with_options(queue=worker.queue), (3,) if stub is bindings.exits else (), {}
    )  # type: ignore[attr-defined]
    try:
        await handle.result(timeout=20)
    except RemoteTaskError:
        pass
    except ResultTimeoutError:
        pytest.fail(f"no outcome for the task in 20 s:\n{worker.log()[-3000:]}")
    await nap_still_runs(worker, bridge)


# -- a body's own CancelledError ---------------------------------------------------------


async def test_a_body_ending_in_its_own_cancelled_error_fails_like_an_exception(
    start_worker: Callable[..., Worker], bridge: Bridge, broker: str
) -> None:
    """A body awaiting a child Task that something else cancelled ends in
    ``CancelledError``. On prefork and threads pools the task fails with
    ``CancelledError`` (``run_coroutine_threadsafe``'s future raises
    ``concurrent.futures.CancelledError``, an ``Exception``).

    Found: on AsyncioPool ``Job.await_`` raises ``asyncio.CancelledError`` (a
    ``BaseException``) into Celery's tracer, which lets it through; the pool reports
    "Celery's tracer failed" and the task fails as ``WorkerLostError``.
    """
    worker = await anyio.to_thread.run_sync(start_worker, broker)
    handle = await bridge.send(bindings.self_cancelled.with_options(queue=worker.queue), (), {})
    with pytest.raises(RemoteTaskError) as raised:
        await handle.result(timeout=20)
    assert raised.value.remote_type == "CancelledError", raised.value.remote_type
    assert "Celery's tracer failed" not in worker.log()


async def test_acks_late_body_ending_in_cancelled_error_runs_once(
    start_worker: Callable[..., Worker], bridge: Bridge, broker: str, tmp_path: Path
) -> None:
    """With ``acks_late`` and ``reject_on_worker_lost`` the same body must fail once.

    Found: the ``WorkerLostError`` the pool makes of the ``CancelledError`` makes Celery
    reject the message with requeue, so the task is redelivered and runs again and again
    (on Redis until celerybridge's delivery limit dead-letters it), although no worker
    was lost.
    """
    worker = await anyio.to_thread.run_sync(start_worker, broker)
    stub = bindings.self_cancelled_late.with_options(queue=worker.queue)
    handle = await bridge.send(stub, (), {})
    markers = tmp_path / "markers"
    await anyio.to_thread.run_sync(
        wait_for, lambda: bool(started(markers, handle.id)), 20, "the task to start"
    )
    try:
        await handle.result(timeout=20)
        outcome = "no error"
    except RemoteTaskError as exc:
        outcome = exc.remote_type
    except ResultTimeoutError:
        outcome = "no result in 20 s"
    await anyio.sleep(3)  # time for a redelivery to run it again
    runs = len(started(markers, handle.id))
    assert runs == 1, f"it ran {runs} times ({outcome})"
    assert outcome == "CancelledError"


# -- revoke terminate of a sync task ------------------------------------------------------


async def test_revoke_terminate_of_a_sync_task_leaves_it_revoked(
    start_worker: Callable[..., Worker], bridge: Bridge, broker: str, tmp_path: Path
) -> None:
    """docs/worker.md: a sync task cannot be interrupted, "it runs to its end; Celery
    records it revoked", and the pool logs that it cannot interrupt it.

    Found: the tracer stores its SUCCESS over the REVOKED state Celery recorded, so the
    result says it ran and was not revoked; and the warning is never logged (the pool's
    ``_terminate`` takes a sync job, never ``started``, for one not started yet).
    """
    worker = await anyio.to_thread.run_sync(start_worker, broker)
    handle = await bridge.send(bindings.sync_sleep.with_options(queue=worker.queue), (2.0,), {})
    markers = tmp_path / "markers"
    await anyio.to_thread.run_sync(
        wait_for, lambda: bool(started(markers, handle.id)), 20, "the task to start"
    )
    control = control_app(broker)
    try:
        await anyio.to_thread.run_sync(lambda: control.control.revoke(handle.id, terminate=True))
        await anyio.to_thread.run_sync(
            wait_for, lambda: f"Terminating {handle.id}" in worker.log(), 10, "the revoke"
        )
        await anyio.sleep(4)  # the thread has run to its end
        state = await anyio.to_thread.run_sync(lambda: control.AsyncResult(handle.id).state)
    finally:
        control.close()
    assert state == "REVOKED"
    assert "cannot be interrupted" in worker.log()


# -- revoke of a prefetched task ---------------------------------------------------------


async def test_a_revoked_task_waiting_in_the_pool_does_not_run(
    start_worker: Callable[..., Worker], bridge: Bridge, broker: str, tmp_path: Path
) -> None:
    """-c 1: B waits in the pool behind A (prefetched, not started). ``revoke(B)``
    without terminate: B must not run, as on prefork (the AsynPool skips a job whose id
    is in ``worker_state.revoked`` before it writes it to a child), and its state stays
    REVOKED (Celery's control marked it so).

    Found: the pool starts B when A ends; Celery checked ``revoked`` only when the
    message came in, so B runs and stores SUCCESS over REVOKED. With prefetch 4 x -c,
    ``-c 400`` holds 1,600 tasks a revoke cannot stop.
    """
    worker = await anyio.to_thread.run_sync(lambda: start_worker(broker, 1))
    stub = bindings.marked_nap.with_options(queue=worker.queue)
    first = await bridge.send(stub, (3.0,), {})
    markers = tmp_path / "markers"
    await anyio.to_thread.run_sync(
        wait_for, lambda: bool(started(markers, first.id)), 20, "A to start"
    )
    second = await bridge.send(stub, (0.0,), {})
    await anyio.to_thread.run_sync(
        wait_for, lambda: f"[{second.id}] received" in worker.log(), 20, "B to be received"
    )
    control = control_app(broker)
    try:
        await anyio.to_thread.run_sync(lambda: control.control.revoke(second.id))
        assert await first.result(timeout=20) == first.id
        await anyio.sleep(2)
        state = await anyio.to_thread.run_sync(lambda: control.AsyncResult(second.id).state)
    finally:
        control.close()
    assert started(markers, second.id) == [], "the revoked task ran"
    assert state == "REVOKED"


# -- hard time limits on a blocked loop ---------------------------------------------------


@pytest.mark.parametrize(
    "stub", [bindings.block_limited, bindings.spin_limited], ids=["blocking-call", "cpu-loop"]
)
async def test_a_hard_time_limit_ends_a_runaway_coroutine(
    start_worker: Callable[..., Worker], bridge: Bridge, broker: str, stub: object
) -> None:
    """The hard time limit exists for runaway tasks: a blocking call without a timeout,
    a CPU-bound loop. On prefork the child is killed at the limit and the task fails
    with ``TimeLimitExceeded``; docs/worker.md says the same of coroutine tasks ("the
    task fails with TimeLimitExceeded at once").

    Found: the limit is a timer of the very loop the body blocks, so it cannot fire: the
    body (limit 1 s) runs its 6 s to the end and the task SUCCEEDS; a body that never
    returns holds the whole worker forever. Nothing outside the loop enforces the limit.
    """
    worker = await anyio.to_thread.run_sync(start_worker, broker)
    handle = await bridge.send(stub.with_options(queue=worker.queue), (6.0,), {})  # type: ignore[attr-defined]
    with pytest.raises(RemoteTaskError) as raised:
        await handle.result(timeout=30)
    assert raised.value.remote_type == "TimeLimitExceeded"


# -- sync tasks waiting for a thread ------------------------------------------------------


async def test_sync_tasks_waiting_for_a_thread_do_not_hold_coroutine_slots(
    start_worker: Callable[..., Worker], bridge: Bridge, broker: str
) -> None:
    """-c 20: the sync thread pool has 8 threads. 20 slow sync tasks, then one coroutine
    task that only awaits: the coroutine needs no thread, and should not wait behind
    the 12 sync tasks that are not running either (they wait for a thread).

    Found: every sync job takes one of the ``-c`` slots when it is handed to the
    executor, running or not, so the nap waits until the first sleepers end (with a
    deep backlog of sync tasks, for all of them, batch by batch of 8).
    """
    worker = await anyio.to_thread.run_sync(lambda: start_worker(broker, 20))
    sleep = bindings.sync_sleep.with_options(queue=worker.queue)
    sleepers = await asyncio.gather(*(bridge.send(sleep, (6.0,), {}) for _ in range(20)))
    await anyio.sleep(0.5)
    nap = await bridge.send(bindings.nap.with_options(queue=worker.queue), (0.0,), {})
    assert await nap.result(timeout=60) == nap.id
    control = control_app(broker)
    try:
        done = [control.AsyncResult(s.id).ready() for s in sleepers]
    finally:
        control.close()
    assert not any(done), f"{sum(done)} sync sleepers ended before the nap ran"


# -- plain Celery async tasks -------------------------------------------------------------


def test_a_plain_celery_async_task_runs_or_is_refused_at_start(broker: str, tmp_path: Path) -> None:
    """``@app.task async def`` (not a celerybridge contract) on a worker whose whole
    point is running coroutines: it should either run on the loop, or the worker should
    refuse to start naming it ("what it cannot support fails clearly at start").

    Found: the worker starts, runs the function in the sync thread pool, and Celery
    tries to store the coroutine object as the result.
    """
    worker = pool_worker(broker, tmp_path / "markers", 100, MODULE, CB_RT_PLAIN_ASYNC="1")
    worker.start(tmp_path, wait=False)
    try:
        deadline = time.monotonic() + 60
        while " ready." not in worker.log() and worker.running and time.monotonic() < deadline:
            time.sleep(0.05)
        if not worker.running:
            assert "poolrt.plain_async" in worker.log()
            return
        client = control_app(broker)
        try:
            result = client.send_task("poolrt.plain_async", args=[21], queue=worker.queue)
            value = result.get(timeout=20, propagate=False)
        finally:
            client.close()
        assert value == 42, f"{value!r}\n{worker.log()[-2000:]}"
    finally:
        worker.stop()


async def test_a_message_celerys_tracer_fails_on_runs_once(broker: str, tmp_path: Path) -> None:
    """A chain step Celery cannot apply (``{"task": ...}`` alone: no args, kwargs or options)
    makes its tracer fail after the body ran, then its failure handling too. The pool
    reported that as a lost worker (``WorkerLostError``): under ``acks_late`` +
    ``reject_on_worker_lost`` the message went back to the broker and ran again, 11 times
    on Redis before the delivery limit (the fuzz suite's pusher), for ever on RabbitMQ. It
    is a failure of the task, as on the prefork pool: it runs once. A plain Celery app
    here: a ``celery_app()`` worker's intake refuses such a chain before Celery reads it."""
    markers = tmp_path / "markers"
    markers.mkdir()
    worker = Worker("tests.workers.plain_pool_worker", BROKERS[broker], RESULT_BACKEND, pool=None)
    worker.extra_env["CB_POOL_MARKERS"] = str(markers)
    worker.start(tmp_path)
    try:
        sender = Celery("sender", broker=BROKERS[broker], backend=RESULT_BACKEND)
        task_id = sender.send_task(
            "plain_pool.mark", queue=worker.queue, chain=[{"task": "plain_pool.mark"}]
        ).id
        ran = markers / f"ran-{task_id}"
        wait_for(ran.exists, 20, "the task to run")
        # Long enough for a requeue (at once) or a visibility sweep (5 s + 10 s) to show.
        await anyio.sleep(16)
        assert len(ran.read_text().splitlines()) == 1, worker.log()
        assert "Celery's tracer failed" in worker.log()
    finally:
        stop_all([worker])
