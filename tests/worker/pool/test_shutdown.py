"""``celerybridge.AsyncioPool`` workers stopped with tasks in flight: a warm shutdown
lets them finish, a SIGKILL loses none of those sent with ``acks_late``."""

from __future__ import annotations

import asyncio
from pathlib import Path

import anyio
import pytest

from celerybridge import Bridge

from ..._brokers import BROKERS, RESULT_BACKEND, queue_length
from ...workers import pool_bindings as bindings
from .conftest import pool_worker, wait_for

pytestmark = pytest.mark.integration

IN_FLIGHT = 50


def _started(markers: Path, ids: list[str]) -> list[list[str]]:
    """The pids that started each task, in order (one line per start)."""
    return [
        (markers / f"started-{task_id}").read_text().split()
        if (markers / f"started-{task_id}").exists()
        else []
        for task_id in ids
    ]


async def test_sigterm_lets_50_tasks_in_flight_finish(broker: str, tmp_path: Path) -> None:
    markers = tmp_path / "markers"
    worker = pool_worker(broker, markers, concurrency=100)
    await anyio.to_thread.run_sync(worker.start, tmp_path)
    try:
        async with Bridge(broker_url=BROKERS[broker], result_backend=RESULT_BACKEND) as bridge:
            stub = bindings.nap_late.with_options(queue=worker.queue)
            handles = await asyncio.gather(
                *(bridge.send(stub, (3.0,), {}) for _ in range(IN_FLIGHT))
            )
            ids = [handle.id for handle in handles]
            await anyio.to_thread.run_sync(
                wait_for, lambda: all(_started(markers, ids)), 20, "all 50 to start"
            )
            worker.terminate()
            assert worker.process is not None
            returncode = await anyio.to_thread.run_sync(lambda: worker.process.wait(30))  # type: ignore[union-attr]
            results = await asyncio.gather(*(handle.result(timeout=5) for handle in handles))
    finally:
        worker.stop()
    assert returncode == 0, worker.log()
    assert results == ids
    # Each ran once, and each was acknowledged before the worker exited: none is back.
    assert all(len(pids) == 1 for pids in _started(markers, ids))
    assert queue_length(BROKERS[broker], worker.queue) == 0
    assert "Warm shutdown" in worker.log()


async def test_sigkill_with_acks_late_redelivers_every_task(broker: str, tmp_path: Path) -> None:
    markers = tmp_path / "markers"
    first = pool_worker(broker, markers, concurrency=100)
    await anyio.to_thread.run_sync(first.start, tmp_path)
    second = pool_worker(broker, markers, concurrency=100)
    second.queue = first.queue
    try:
        async with Bridge(
            broker_url=BROKERS[broker], result_backend=RESULT_BACKEND, result_timeout=60
        ) as bridge:
            stub = bindings.nap_late.with_options(queue=first.queue)
            handles = await asyncio.gather(*(bridge.send(stub, (3.0,), {}) for _ in range(30)))
            ids = [handle.id for handle in handles]
            await anyio.to_thread.run_sync(
                wait_for, lambda: all(_started(markers, ids)), 20, "all 30 to start"
            )
            first.kill()
            await anyio.to_thread.run_sync(second.start, tmp_path)
            with anyio.fail_after(60):  # Redis gives them back after its visibility timeout
                results = await asyncio.gather(*(handle.result() for handle in handles))
    finally:
        first.stop()
        second.stop()
    assert results == ids
    assert first.process is not None
    assert second.process is not None
    killed, survivor = str(first.process.pid), str(second.process.pid)
    assert _started(markers, ids) == [[killed, survivor]] * len(ids)
