"""Contracts of ``tests.workers.pool_worker``, the worker on ``celerybridge.AsyncioPool``."""

from __future__ import annotations

from celerybridge import remote_task

QUEUE = "cb-test"


@remote_task(name="pool.nap", queue=QUEUE)
async def nap(seconds: float) -> str: ...


@remote_task(name="pool.nap_late", queue=QUEUE)
async def nap_late(seconds: float) -> str: ...


@remote_task(name="pool.context", queue=QUEUE)
async def context(seconds: float, steps: int) -> dict[str, list[str]]: ...


@remote_task(name="pool.sync_add", queue=QUEUE)
def sync_add(x: int, y: int) -> dict[str, object]: ...


@remote_task(name="pool.soft_limited", queue=QUEUE)
async def soft_limited(seconds: float) -> str: ...


@remote_task(name="pool.soft_cleanup", queue=QUEUE)
async def soft_cleanup(seconds: float) -> str: ...


@remote_task(name="pool.hard_limited", queue=QUEUE)
async def hard_limited(seconds: float) -> str: ...


@remote_task(name="pool.stubborn", queue=QUEUE)
async def stubborn(seconds: float) -> str: ...


@remote_task(name="pool.retry_once", queue=QUEUE)
async def retry_once(marker: str) -> dict[str, object]: ...


@remote_task(name="pool.block", queue=QUEUE)
async def block(seconds: float) -> str: ...


@remote_task(name="pool.block_hard", queue=QUEUE)
async def block_hard(seconds: float) -> str: ...


@remote_task(name="pool.stop_loop", queue=QUEUE)
async def stop_loop() -> str: ...
