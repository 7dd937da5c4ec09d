"""Contracts the test workers implement: what a service's bindings package would ship."""

from __future__ import annotations

from pydantic import BaseModel

from celerybridge import remote_task

QUEUE = "cb-test"


class Total(BaseModel):
    value: int
    pid: int


@remote_task(name="calc.add", queue=QUEUE)
def add(x: int, y: int) -> Total: ...


@remote_task(name="calc.add", queue=QUEUE, version=2)
def add_v2(x: int, y: int, z: int = 0) -> Total: ...


@remote_task(name="calc.fail", queue=QUEUE)
def fail(message: str) -> None: ...


@remote_task(name="calc.sleep", queue=QUEUE)
def sleep(seconds: float) -> float: ...


@remote_task(name="calc.loop_identity", queue=QUEUE)
async def loop_identity() -> dict[str, int]: ...


# Seed-shaped contracts implemented only by the plain Celery worker.
@remote_task(name="plain.store", queue=QUEUE)
def store(key: str, content: str) -> dict[str, str]: ...


@remote_task(name="plain.store", queue=QUEUE, version=2)
def store_v2(key: str, content: str, meta: dict[str, str]) -> dict[str, str]: ...
