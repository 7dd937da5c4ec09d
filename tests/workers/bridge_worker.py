"""A worker implementing the test contracts with celerybridge.

Run as ``celery -A tests.workers.bridge_worker worker -Q <queue>``.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator

import anyio

from celerybridge import celery_app, worker_resource

from . import bindings

app = celery_app("bridge_worker")


class Counter:
    """Stands in for an async client: counts how often it was created and closed."""

    created = 0

    def __init__(self) -> None:
        Counter.created += 1
        self.loop = asyncio.get_running_loop()


@worker_resource
async def counter() -> AsyncIterator[Counter]:
    value = Counter()
    yield value
    # Tests that stop the worker read this to see the resource closed, on its own loop.
    marker = os.environ.get("CB_TEST_SHUTDOWN_MARKER")
    if marker:
        same_loop = asyncio.get_running_loop() is value.loop
        async with await anyio.open_file(marker, "a") as out:
            await out.write(f"closed pid={os.getpid()} same_loop={same_loop}\n")


@bindings.add.implement(app)
def add(x: int, y: int) -> bindings.Total:
    return bindings.Total(value=x + y, pid=os.getpid())


@bindings.add_v2.implement(app)
def add_v2(x: int, y: int, z: int = 0) -> bindings.Total:
    return bindings.Total(value=x + y + z, pid=os.getpid())


@bindings.fail.implement(app)
def fail(message: str) -> None:
    raise ValueError(message)


@bindings.sleep.implement(app)
def sleep(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


@bindings.loop_identity.implement(app)
async def loop_identity() -> dict[str, int]:
    resource = await counter()
    await asyncio.sleep(0)
    return {
        "pid": os.getpid(),
        "loop": id(asyncio.get_running_loop()),
        "resource_loop": id(resource.loop),
        "created": Counter.created,
    }
