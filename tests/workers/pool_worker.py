"""A celerybridge worker on ``celerybridge.AsyncioPool``, chosen in its configuration.

Run as ``celery -A tests.workers.pool_worker worker -Q <queue>`` (no ``-P``: the app
selects the pool; ``CB_POOL_CONCURRENCY`` sets ``-c``). ``CB_POOL_MARKERS`` is a
directory where tasks leave files the tests read.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
from typing import Any

from celery import current_task

from celerybridge import celery_app

from . import pool_bindings
from ._marks import mark as _mark
from ._marks import task_id as _task_id

# --8<-- [start:app]
app = celery_app(
    "pool_worker",
    worker_pool="celerybridge:AsyncioPool",
    worker_concurrency=int(os.environ.get("CB_POOL_CONCURRENCY", "100")),
    # Redis hands a killed worker's messages back after this (RabbitMQ at once).
    broker_transport_options={"visibility_timeout": 5},
    # A setting the pool cannot honour: the worker must refuse to start with it.
    worker_max_tasks_per_child=int(os.environ.get("CB_POOL_MAX_TASKS_PER_CHILD", "0")) or None,
)
# --8<-- [end:app]


@pool_bindings.nap.implement(app)
async def nap(seconds: float) -> str:
    await asyncio.sleep(seconds)
    return _task_id()


@pool_bindings.nap_late.implement(app, acks_late=True, reject_on_worker_lost=True)
async def nap_late(seconds: float) -> str:
    _mark(f"started-{_task_id()}", str(os.getpid()))
    await asyncio.sleep(seconds)
    return _task_id()


@pool_bindings.context.implement(app)
async def context(seconds: float, steps: int) -> dict[str, list[str]]:
    """What ``current_task`` and ``self.request`` say at each await, while others interleave."""
    seen: dict[str, list[str]] = {"current_task": [], "request": [], "child": []}

    async def child() -> str:
        await asyncio.sleep(0)
        return _task_id()

    for _ in range(steps):
        seen["current_task"].append(_task_id())
        seen["request"].append(str(app.tasks["pool.context"].request.id))
        await asyncio.sleep(seconds)
        seen["child"].append(await asyncio.create_task(child()))
    return seen


@pool_bindings.sync_add.implement(app)
def sync_add(x: int, y: int) -> dict[str, object]:
    return {"sum": x + y, "thread": threading.current_thread().name, "id": _task_id()}


@pool_bindings.soft_limited.implement(app, soft_time_limit=1)
async def soft_limited(seconds: float) -> str:
    await asyncio.sleep(seconds)
    return "not limited"


# --8<-- [start:soft]
@pool_bindings.soft_cleanup.implement(app, soft_time_limit=1)
async def soft_cleanup(seconds: float) -> str:
    try:
        await asyncio.sleep(seconds)
    except asyncio.CancelledError:
        await asyncio.sleep(0.05)  # cleaning up may await
        return f"cleaned up {_task_id()}"
    return "not limited"


# --8<-- [end:soft]


@pool_bindings.hard_limited.implement(app, time_limit=1)
async def hard_limited(seconds: float) -> str:
    try:
        await asyncio.sleep(seconds)
    finally:
        _mark(f"hard-{_task_id()}", "unwound")
    return "not limited"


@pool_bindings.stubborn.implement(app)
async def stubborn(seconds: float) -> str:
    _mark(f"started-{_task_id()}", str(os.getpid()))
    try:
        await asyncio.sleep(seconds)
    except asyncio.CancelledError:
        _mark(f"cancelled-{_task_id()}", "cancelled")
        raise
    return "not terminated"


class Flaky(Exception):
    """The first attempt of ``retry_once`` raises it."""


@pool_bindings.retry_once.implement(
    app, autoretry_for=(Flaky,), default_retry_delay=1, retry_backoff=False, max_retries=2
)
async def retry_once(marker: str) -> dict[str, object]:
    retries = int(current_task.request.retries)
    await asyncio.sleep(0.01)
    if retries == 0:
        raise Flaky(marker)
    return {"retries": retries, "at": time.time()}


@pool_bindings.block.implement(app)
async def block(seconds: float) -> str:
    time.sleep(seconds)  # noqa: ASYNC251 (the mistake the watchdog reports)
    return _task_id()


@pool_bindings.block_hard.implement(app, time_limit=1)
async def block_hard(seconds: float) -> str:
    """Blocks the loop past its hard time limit, then returns."""
    _mark(f"started-{_task_id()}", str(os.getpid()))
    time.sleep(seconds)  # noqa: ASYNC251 (the runaway the hard limit is for)
    await asyncio.sleep(0)
    _mark(f"after-{_task_id()}", "the coroutine went on")
    return "not limited"


@pool_bindings.stop_loop.implement(app)
async def stop_loop() -> str:
    """Ends the loop thread from a loop callback (not the body): nothing can save it."""
    asyncio.get_running_loop().call_soon(sys.exit, 4)
    await asyncio.sleep(1)
    return "the loop went on"


# A plain Celery coroutine task (not a contract), bound, and one calling it directly.
@app.task(name="pool.plain_double", bind=True)
async def plain_double(self: Any, x: int) -> dict[str, object]:
    await asyncio.sleep(0.01)
    return {"double": x * 2, "id": self.request.id}


@app.task(name="pool.plain_calls")
async def plain_calls(x: int) -> int:
    inner = await plain_double(x)
    return int(inner["double"]) + 1
