"""Contracts of the result-backend tests (tests/test_result_backends.py)."""

from __future__ import annotations

from celerybridge import remote_task

QUEUE = "cb-test-results"


@remote_task(name="results.explode", queue=QUEUE)
def explode(message: str) -> None: ...


@remote_task(name="results.progress", queue=QUEUE)
def progress(steps: int) -> int: ...
