"""Plain Celery ``@app.task async def`` tasks run on the worker's loop, like contracts'.

Celery itself does not await a task whose ``run`` is a coroutine function: on its own
pools the tracer stores the coroutine object as the result (and fails to encode it).
At the asyncio pool's start, each such task's ``run`` is replaced (on the task object of
this worker process, before the consumer builds its tracers) by a function that runs
the coroutine to its end where it is called:

- in the task's own job (Celery's tracer in its greenlet), as a contract's coroutine:
  the pool runs these jobs on the loop;
- in code already running on the loop (another coroutine calling the task object
  directly), the coroutine is returned, for the caller to await as before;
- in any other thread, on the worker's loop, blocking that thread.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
from collections.abc import Callable
from typing import Any

from celery import Celery

from ..._registry import registry
from ..loop import worker_loop
from .greenlets import running_job

ADOPTED = "__celerybridge_async_run__"


def adopt_async_tasks(app: Celery) -> frozenset[str]:
    """Make ``app``'s plain ``async def`` tasks run their coroutine; their names."""
    names = set()
    for name, task in list(app.tasks.items()):
        run = getattr(task, "run", None)
        if name in registry.implementations or run is None:
            continue
        if getattr(run, ADOPTED, False):
            names.add(name)
        elif inspect.iscoroutinefunction(run):
            task.run = _awaiting(run)  # type: ignore[method-assign]
            names.add(name)
    return frozenset(names)


def _awaiting(run: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(run)
    def call(*args: Any, **kwargs: Any) -> Any:
        coro = run(*args, **kwargs)
        job = running_job()
        if job is not None:
            return job.await_(coro)
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return worker_loop.run(coro)
        return coro

    setattr(call, ADOPTED, True)
    return call
