"""The worker of the canvas and send-option tests: prefork, so time limits are enforced.

Run as ``celery -A tests.workers.canvas_worker worker -Q <queue>``.
"""

from __future__ import annotations

import time
from typing import Any

from celery import current_task

from celerybridge import celery_app

from . import canvas_bindings as b

app = celery_app("canvas_worker")


@b.add.implement(app)
def add(x: int, y: int) -> int:
    return x + y


@b.mul.implement(app)
def mul(x: int, y: int) -> int:
    return x * y


@b.tsum.implement(app)
def tsum(values: list[int]) -> int:
    return sum(values)


@b.request.implement(app)
def request(tag: str = "") -> dict[str, Any]:
    req = current_task.request
    return {
        "tag": tag,
        "id": req.id,
        "tenant": req.get("x-tenant"),
        "timelimit": list(req.timelimit or ()),
        "eta": req.eta,
        "expires": req.expires,
        "started": time.time(),
    }


@b.sleep.implement(app)
def sleep(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


@b.boom.implement(app)
def boom(message: str) -> None:
    raise b.Boom(message)
