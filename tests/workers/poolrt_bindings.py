"""Contracts of ``tests.workers.poolrt_worker``, the red-team worker on ``AsyncioPool``."""

from __future__ import annotations

from celerybridge import remote_task

QUEUE = "cb-test"


@remote_task(name="poolrt.nap", queue=QUEUE)
async def nap(seconds: float) -> str: ...


@remote_task(name="poolrt.exits", queue=QUEUE)
async def exits(code: int) -> str: ...


@remote_task(name="poolrt.interrupted", queue=QUEUE)
async def interrupted() -> str: ...


@remote_task(name="poolrt.self_cancelled", queue=QUEUE)
async def self_cancelled() -> str: ...


@remote_task(name="poolrt.self_cancelled_late", queue=QUEUE)
async def self_cancelled_late() -> str: ...


@remote_task(name="poolrt.sync_sleep", queue=QUEUE)
def sync_sleep(seconds: float) -> str: ...


@remote_task(name="poolrt.block_limited", queue=QUEUE)
async def block_limited(seconds: float) -> str: ...


@remote_task(name="poolrt.spin_limited", queue=QUEUE)
async def spin_limited(seconds: float) -> str: ...


@remote_task(name="poolrt.marked_nap", queue=QUEUE)
async def marked_nap(seconds: float) -> str: ...
