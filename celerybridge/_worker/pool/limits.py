"""Soft and hard time limits of coroutine jobs.

- Soft, a loop timer: the coroutine's asyncio Task is cancelled. The body sees
  ``CancelledError`` at its current ``await`` and may clean up (or even return a
  value); if the cancellation comes out of it, the tracer sees
  :class:`celery.exceptions.SoftTimeLimitExceeded`, as a body in a prefork child would,
  and Celery records the failure (or retries, with ``autoretry_for``). A body blocking
  the loop sees it only once it awaits again.
- Hard, enforced by :class:`HardLimits`' thread, outside the loop the body may be
  blocking: at the limit the job's outcome is claimed and Celery's
  ``Request.on_timeout`` runs on the consumer's thread (``TimeLimitExceeded`` stored,
  the message acknowledged or requeued, as for prefork). When the loop next runs, the
  coroutine's Task is cancelled and the tracer's greenlet unwound, so no result of the
  job reaches Celery after that; a body that swallows the cancellation keeps running as
  an orphan Task, which is logged. If the loop has not come back
  :data:`POOL_HARD_LIMIT_GRACE` seconds after the limit, the worker process exits
  (:mod:`.fatal`), as prefork kills the child.

Sync jobs in the thread pool have no time limits, as in Celery's threads pool: a thread
cannot be interrupted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable

from ..._constants import POOL_HARD_LIMIT_GRACE
from .fatal import stop_process
from .greenlets import KILL_GRACE, Job

logger = logging.getLogger("celerybridge.worker.pool")


def arm(job: Job, loop: asyncio.AbstractEventLoop, post: Callable[..., None]) -> None:
    """Start ``job``'s soft time limit timer (on the loop thread, as the job starts)."""
    if job.soft_timeout:
        job.timers.append(loop.call_later(job.soft_timeout, _soft, job, post))


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


class HardLimits:
    """The hard time limits of running coroutine jobs, watched from a thread of its own."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        post: Callable[..., None],
        finish: Callable[[Job], None],
        grace: float = POOL_HARD_LIMIT_GRACE,
    ) -> None:
        self._loop = loop
        self._post = post
        self._finish = finish
        self._grace = grace
        self._deadlines: dict[Job, float] = {}  # running jobs with a hard limit
        self._expired: dict[Job, float] = {}  # past it, until the loop has ended them
        self._wake = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(
            target=self._watch, name="celerybridge-hard-limits", daemon=True
        )

    def stop(self) -> None:
        with self._wake:
            self._stopped = True
            self._wake.notify()
        if self._thread.is_alive():
            self._thread.join(1)

    def add(self, job: Job) -> None:
        """Watch ``job``'s hard limit from now (any thread)."""
        if not job.timeout:
            return
        with self._wake:
            if not self._thread.is_alive() and not self._stopped:
                self._thread.start()  # with the first hard limit: no thread without one
            self._deadlines[job] = time.monotonic() + job.timeout
            self._wake.notify()

    def remove(self, job: Job) -> None:
        """``job`` has finished (any thread)."""
        with self._wake:
            self._deadlines.pop(job, None)
            self._expired.pop(job, None)

    def _watch(self) -> None:
        with self._wake:
            while not self._stopped:
                now = time.monotonic()
                for job, deadline in list(self._deadlines.items()):
                    if deadline <= now:
                        del self._deadlines[job]
                        self._expire(job, now)
                for job, deadline in list(self._expired.items()):
                    if deadline <= now:
                        del self._expired[job]
                        self._lost(job)
                soonest = min((*self._deadlines.values(), *self._expired.values()), default=None)
                self._wake.wait(None if soonest is None else max(soonest - now, 0.0))

    def _expire(self, job: Job, now: float) -> None:
        if job.finished or not job.claim():
            return  # its outcome has gone to Celery already
        job.killed = True  # the tracer reports nothing from now on
        self._post(job.timeout_callback, False, job.timeout)
        self._expired[job] = now + self._grace
        with contextlib.suppress(RuntimeError):  # the loop is closed: the worker is stopping
            self._loop.call_soon_threadsafe(self._end, job)

    def _end(self, job: Job) -> None:
        """On the loop, back after the limit: cancel the coroutine, free the slot."""
        if job.finished:
            return
        task = job.task
        job.kill()
        self._finish(job)
        if task is not None:
            self._loop.call_later(KILL_GRACE, _check_stopped, job, task)

    def _lost(self, job: Job) -> None:
        if job.finished:
            return
        stop_process(
            self._post,
            "task %r is %.1fs past its hard time limit (%ss) and still blocks the "
            "worker's event loop (a blocking call or a CPU-bound loop in a coroutine)",
            job,
            self._grace,
            job.timeout,
        )


def _check_stopped(job: Job, task: asyncio.Task[object]) -> None:
    if not task.done():
        logger.warning(
            "task %r: its coroutine has not stopped %ss after the hard time limit (%ss) "
            "cancelled it; it keeps running on the worker's loop",
            job,
            KILL_GRACE,
            job.timeout,
        )
