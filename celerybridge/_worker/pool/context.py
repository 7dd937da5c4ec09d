"""Celery's request context (``current_task``, ``self.request``) right across awaits.

Celery keeps the running task and its request in ``LocalStack`` objects keyed by
``greenlet.getcurrent()``. A job's tracer runs in a greenlet of its own, so its pushes
land under that greenlet. The coroutine body, though, runs as an asyncio Task in the
loop thread's main greenlet, where every job's coroutine runs: keyed by
``getcurrent()``, they would all read one (empty) entry.

:func:`ident` keys them by the job instead: the job is kept in a context variable set
in the job greenlet's own context, which the asyncio Task of its coroutine copies (and
so does every Task that one creates). Outside a job (the consumer thread, the sync
thread pool, a prefork child) the variable is unset and the key is ``getcurrent()``, as
Celery's own.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from celery._state import _task_stack  # type: ignore[attr-defined]
from celery.utils.threads import _LocalStack
from greenlet import getcurrent

from ..._exceptions import ConfigurationError

if TYPE_CHECKING:
    from celery import Celery

    from .greenlets import Job

current_job: ContextVar[Job | None] = ContextVar("celerybridge_pool_job", default=None)
"""The pool job whose tracer or coroutine is running in this context, if any."""

sync_job: ContextVar[Job | None] = ContextVar("celerybridge_pool_sync_job", default=None)
"""The sync pool job running in this thread of the pool's thread pool, if any."""


def terminated_in_thread() -> bool:
    """Whether this thread runs a sync job that ``revoke(terminate=True)`` has ended:
    Celery has recorded it revoked, so its result must not be stored over that."""
    job = sync_job.get()
    return job is not None and job.killed


def ident() -> object:
    """The key of Celery's task-local stacks: the current job, else the greenlet."""
    job = current_job.get()
    return job if job is not None else getcurrent()


def _bind(stack: Any, what: str) -> None:
    if not isinstance(stack, _LocalStack):
        # USE_FAST_LOCALS swaps in a threading.local stack: one per thread, so every
        # coroutine of the loop thread would share it.
        raise ConfigurationError(
            f"celerybridge.AsyncioPool needs Celery's greenlet-aware LocalStack for {what}, "
            f"found {type(stack).__name__} (unset USE_FAST_LOCALS)"
        )
    if stack.__ident_func__ is not ident:
        setattr(stack, "__ident_func__", ident)  # noqa: B010 (a property celery-types omits)


def bind_current_task() -> None:
    """Key ``celery.current_task`` by job (at pool start)."""
    _bind(_task_stack, "current_task")


def bind_task(app: Celery, name: str) -> None:
    """Key the request stack of task ``name`` by job (per job: tasks may be registered late)."""
    task = app.tasks.get(name)
    if task is not None:
        _bind(task.request_stack, f"the requests of task {name!r}")
