"""Soft and hard time limits of coroutine jobs, as loop timers.

- Soft: the coroutine's asyncio Task is cancelled. The body sees ``CancelledError``
  at its current ``await`` and may clean up (or even return a value); if the
  cancellation comes out of it, the tracer sees
  :class:`celery.exceptions.SoftTimeLimitExceeded`, as a body in a prefork child would,
  and Celery records the failure (or retries, with ``autoretry_for``).
- Hard: the job ends at once. Celery's ``Request.on_timeout`` marks the task failed with
  ``TimeLimitExceeded`` and acknowledges (or requeues) the message as it does for
  prefork; the coroutine's Task is cancelled and the tracer's greenlet unwound, so no
  result of the job reaches Celery after that. A body that swallows the cancellation
  keeps running as an orphan Task, which is logged.

Sync jobs in the thread pool have no time limits, as in Celery's threads pool: a thread
cannot be interrupted.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from .greenlets import KILL_GRACE, Job

logger = logging.getLogger("celerybridge.worker.pool")


def arm(
    job: Job,
    loop: asyncio.AbstractEventLoop,
    post: Callable[..., None],
    finish: Callable[[Job], None],
) -> None:
    """Start ``job``'s time limit timers (on the loop thread, as the job starts)."""
    if job.soft_timeout:
        job.timers.append(loop.call_later(job.soft_timeout, _soft, job, post))
    if job.timeout:
        job.timers.append(loop.call_later(job.timeout, _hard, job, post, finish))


def disarm(job: Job) -> None:
    for timer in job.timers:
        timer.cancel()
    job.timers.clear()


def _soft(job: Job, post: Callable[..., None]) -> None:
    if job.finished:
        return
    job.soft_expired = True
    post(job.timeout_callback, True, job.soft_timeout)
    if job.task is not None:
        job.task.cancel(f"soft time limit ({job.soft_timeout}s) exceeded")


def _hard(job: Job, post: Callable[..., None], finish: Callable[[Job], None]) -> None:
    if job.finished:
        return
    post(job.timeout_callback, False, job.timeout)
    task = job.task
    job.kill()
    finish(job)
    if task is not None:
        asyncio.get_running_loop().call_later(KILL_GRACE, _check_stopped, job, task)


def _check_stopped(job: Job, task: asyncio.Task[object]) -> None:
    if not task.done():
        logger.warning(
            "task %r: its coroutine has not stopped %ss after the hard time limit (%ss) "
            "cancelled it; it keeps running on the worker's loop",
            job,
            KILL_GRACE,
            job.timeout,
        )
