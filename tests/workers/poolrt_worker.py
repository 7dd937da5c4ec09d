"""The red-team worker on ``celerybridge.AsyncioPool`` (``tests/worker/pool/test_redteam.py``).

Run as ``celery -A tests.workers.poolrt_worker worker -Q <queue>`` (the app selects the
pool; ``CB_POOL_CONCURRENCY`` sets ``-c``). ``CB_POOL_MARKERS`` is a directory where
tasks leave files the tests read. ``CB_RT_PLAIN_ASYNC=1`` also registers a plain Celery
``@app.task async def`` (not a celerybridge contract).
"""

from __future__ import annotations

import asyncio
import os
import time

from celerybridge import celery_app

from . import poolrt_bindings as bindings
from ._marks import mark as _mark
from ._marks import task_id as _task_id

app = celery_app(
    "poolrt_worker",
    worker_pool="celerybridge:AsyncioPool",
    worker_concurrency=int(os.environ.get("CB_POOL_CONCURRENCY", "100")),
    broker_transport_options={"visibility_timeout": 5},
)


@bindings.nap.implement(app)
async def nap(seconds: float) -> str:
    await asyncio.sleep(seconds)
    return _task_id()


@bindings.marked_nap.implement(app)
async def marked_nap(seconds: float) -> str:
    _mark(f"started-{_task_id()}", str(os.getpid()))
    await asyncio.sleep(seconds)
    return _task_id()


@bindings.exits.implement(app)
async def exits(code: int) -> str:
    """A body that calls ``sys.exit`` (a CLI helper reused in a task, say)."""
    await asyncio.sleep(0.01)
    raise SystemExit(code)


@bindings.interrupted.implement(app)
async def interrupted() -> str:
    await asyncio.sleep(0.01)
    raise KeyboardInterrupt


async def _cancelled_inner() -> None:
    # A child Task cancelled by someone else (a closing client, a gather sibling):
    # awaiting it raises CancelledError in the body, which is not the body's own
    # cancellation.
    inner = asyncio.create_task(asyncio.sleep(10))
    await asyncio.sleep(0)
    inner.cancel()
    await inner


@bindings.self_cancelled.implement(app)
async def self_cancelled() -> str:
    _mark(f"started-{_task_id()}", str(os.getpid()))
    await _cancelled_inner()
    return "not cancelled"


@bindings.self_cancelled_late.implement(app, acks_late=True, reject_on_worker_lost=True)
async def self_cancelled_late() -> str:
    _mark(f"started-{_task_id()}", str(os.getpid()))
    await _cancelled_inner()
    return "not cancelled"


@bindings.sync_sleep.implement(app)
def sync_sleep(seconds: float) -> str:
    _mark(f"started-{_task_id()}", str(os.getpid()))
    time.sleep(seconds)
    return _task_id()


@bindings.block_limited.implement(app, time_limit=1)
async def block_limited(seconds: float) -> str:
    """A runaway body: a blocking call (a sync client with no timeout) under a hard limit."""
    _mark(f"started-{_task_id()}", str(os.getpid()))
    time.sleep(seconds)  # noqa: ASYNC251 (the runaway the hard limit is for)
    return "not limited"


@bindings.spin_limited.implement(app, time_limit=1)
async def spin_limited(seconds: float) -> str:
    """A runaway body: a CPU-bound loop under a hard limit."""
    _mark(f"started-{_task_id()}", str(os.getpid()))
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass
    return "not limited"


if os.environ.get("CB_RT_PLAIN_ASYNC"):

    @app.task(name="poolrt.plain_async")  # type: ignore[misc]
    async def plain_async(x: int) -> int:
        await asyncio.sleep(0.01)
        return x * 2
