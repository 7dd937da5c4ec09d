"""Contracts of the canvas and send-option tests (``tests/test_canvas.py``)."""

from __future__ import annotations

import os
import uuid
from typing import Any

from celerybridge import remote_task

# One queue per test run: the test process draws it, its worker reads it from the environment.
QUEUE = os.environ.setdefault("CB_CANVAS_QUEUE", f"cb-canvas-{uuid.uuid4().hex[:10]}")


class Boom(Exception):
    """Raised by the worker; counts its instances in whichever process builds one."""

    created = 0

    def __init__(self, *args: object) -> None:
        Boom.created += 1
        super().__init__(*args)


@remote_task(name="canvas.add", queue=QUEUE)
def add(x: int, y: int) -> int: ...


@remote_task(name="canvas.mul", queue=QUEUE)
def mul(x: int, y: int) -> int: ...


@remote_task(name="canvas.tsum", queue=QUEUE)
def tsum(values: list[int]) -> int: ...


@remote_task(name="canvas.request", queue=QUEUE)
def request(tag: str = "") -> dict[str, Any]: ...


@remote_task(name="canvas.sleep", queue=QUEUE)
def sleep(seconds: float) -> float: ...


@remote_task(name="canvas.boom", queue=QUEUE)
def boom(message: str) -> None: ...
