"""A worker whose implementations drifted in their types, not their call shape."""

from __future__ import annotations

from typing import Literal

from celery import Celery
from pydantic import BaseModel

from celerybridge import remote_task

app = Celery("typed", set_as_current=False)


class Receipt(BaseModel):
    key: str
    size: int


@remote_task(name="cli.typed.store", queue="cli")
def store(key: str, content: str, meta: dict[str, str]) -> Receipt: ...


@remote_task(name="cli.typed.store", queue="cli", version=2)
def store_v2(key: str, content: bytes, meta: dict[str, str] | None = None) -> Receipt: ...


@remote_task(name="cli.typed.mode", queue="cli")
def mode(mode: Literal["fast", "safe"], retries: int) -> float: ...


@store.implement(app)
def store_impl(key: int, content: bytes, meta: list[int]) -> str:
    return ""


@app.task(name="cli.typed.store_v2")
def plain_store_v2(key: str, content: bytes, meta: dict[str, str]) -> Receipt:
    return Receipt(key=key, size=len(content))


@mode.implement(app)
def mode_impl(mode: str, retries: float) -> int:
    return 0
