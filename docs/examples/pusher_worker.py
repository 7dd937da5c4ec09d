"""The pusher's worker: implements the contracts of ``bindings.py``.

Started as any Celery worker, from this directory::

    celery -A pusher_worker worker -Q pusher

Running the file instead calls the tasks in this process with Celery's ``task.apply()``, so the
example needs no broker.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import anyio
from bindings import Receipt, purge, send_to_s3, send_to_s3_v2
from celery import signals

from celerybridge import ArgumentError, celery_app, run_on_worker_loop, worker_resource

HERE = Path(__file__).parent


# --8<-- [start:worker]
app = celery_app("pusher")  # broker and result backend from CELERYBRIDGE_* variables


class Bucket:
    """Stands in for an async S3 client: expensive to make, meant to be shared."""

    made = 0

    def __init__(self) -> None:
        Bucket.made += 1
        self.objects: dict[str, str] = {}


@worker_resource
async def bucket() -> AsyncIterator[Bucket]:
    client = Bucket()  # e.g. ``async with session.create_client("s3") as client:``
    yield client
    # Code here runs when the worker process shuts down.


@send_to_s3.implement(app)
def send(key: str, content: str) -> Receipt:
    return Receipt(key=key, size=len(content))


@send_to_s3_v2.implement(app)
async def send_v2(key: str, content: str, meta: dict[str, str]) -> Receipt:
    store = await bucket()  # made on first use, then reused by every task of this process
    store.objects[key] = content
    return Receipt(key=key, size=len(content))


@purge.implement(app)
def purge_objects(prefix: str, older_than: datetime, dry_run: bool = False) -> int:
    assert isinstance(older_than, datetime)  # validated and coerced again on receipt
    return 0


async def stored_count() -> int:
    return len((await bucket()).objects)


@signals.worker_process_init.connect
def warm_up(**_: Any) -> None:
    """A sync hook (each prefork child runs it): do async work on the worker loop."""
    run_on_worker_loop(stored_count())


# --8<-- [end:worker]


def run_tasks_here() -> None:
    """What a worker does with messages, done in this process."""
    # --8<-- [start:apply]
    task = app.tasks["pusher.send_to_s3_v2"]  # registered under the contract's wire name
    first = task.apply(args=("a.json", "{}", {"owner": "a"}))
    second = task.apply(args=("b.json", "[1]", {"owner": "b"}))
    # The result is the JSON form of the contract's return type.
    assert (first.get(), second.get()) == (
        {"key": "a.json", "size": 2},
        {"key": "b.json", "size": 3},
    )
    # Both async bodies ran on the one worker loop and shared one Bucket.
    assert run_on_worker_loop(stored_count()) == 2
    assert Bucket.made == 1

    # A sender that skipped validation (a plain Celery client, say) gets a failed task.
    bad = task.apply(args=("c.json", 5, {}))
    assert bad.state == "FAILURE"
    assert isinstance(bad.result, ArgumentError)
    assert str(bad.result) == (
        "task 'pusher.send_to_s3' v2, parameter 'content': Input should be a valid string (got 5)"
    )
    # --8<-- [end:apply]
    assert app.conf.accept_content == ["json"]
    assert app.conf.task_routes["pusher.send_to_s3"] == {"queue": "pusher"}


async def main() -> None:
    # Celery's apply() blocks; keep it off the event loop.
    await anyio.to_thread.run_sync(run_tasks_here)

    # --8<-- [start:cli]
    command = [sys.executable, "-m", "celerybridge", "check", "pusher_worker"]
    checked = await anyio.run_process(command, cwd=HERE)  # raises if the exit code is not 0
    assert checked.stdout.decode().splitlines() == [
        "ok        pusher.purge v1 (pusher.purge, queue pusher)",
        "ok        pusher.send_to_s3 v1 (pusher.send_to_s3, queue pusher)",
        "ok        pusher.send_to_s3 v2 (pusher.send_to_s3_v2, queue pusher)",
    ]
    command = [sys.executable, "-m", "celerybridge", "contracts", "bindings"]
    schema = json.loads((await anyio.run_process(command, cwd=HERE)).stdout)
    v2 = next(c for c in schema if c["wire_name"] == "pusher.send_to_s3_v2")
    # Positional arguments travel as a JSON array: one schema per position.
    args = v2["args"]
    assert (v2["version"], v2["default"], args["type"], args["minItems"]) == (2, True, "array", 3)
    assert [item["title"] for item in args["prefixItems"]] == ["key", "content", "meta"]
    # --8<-- [end:cli]


if __name__ == "__main__":
    asyncio.run(main())
