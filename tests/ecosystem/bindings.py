"""Contracts of the ecosystem tests: each body reports the trace it runs in."""

from __future__ import annotations

from celerybridge import remote_task

QUEUE = "cb-eco"


@remote_task(name="eco.sync_trace", queue=QUEUE)
def sync_trace() -> dict[str, str]: ...


@remote_task(name="eco.async_trace", queue=QUEUE)
async def async_trace() -> dict[str, str]: ...


STUBS = (sync_trace, async_trace)
