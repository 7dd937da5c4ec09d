"""Contracts of ``tests.workers.reliable_worker`` (the reliable Redis transport's tests)."""

from __future__ import annotations

from celerybridge import remote_task

QUEUE = "cb-test"


@remote_task(name="reliable.add", queue=QUEUE)
def add(x: int, y: int) -> list[int]:
    """``[x + y, pid of the worker that ran it]``."""


@remote_task(name="reliable.sleep", queue=QUEUE)
def sleep(seconds: float) -> int:
    """Sleeps, returns the worker's pid."""


@remote_task(name="reliable.crash", queue=QUEUE)
def crash() -> None:
    """Kills the process that runs it."""
