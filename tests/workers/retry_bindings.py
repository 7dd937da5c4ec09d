"""Contracts of ``tests.workers.retry_worker``: calls that fail after retrying at once."""

from __future__ import annotations

from celerybridge import remote_task

QUEUE = "cb-test"


@remote_task(name="retry.flaky", queue=QUEUE)
def flaky(n: int) -> None: ...


@remote_task(name="retry.flaky_late", queue=QUEUE)
def flaky_late(n: int) -> None: ...
