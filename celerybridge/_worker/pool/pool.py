"""``celerybridge.AsyncioPool``: a Celery pool where ``-c N`` means N tasks in flight.

Coroutine tasks (``async def`` implementations) run concurrently on the worker's one
event loop (:mod:`celerybridge._worker.loop`), each under Celery's own tracer running
in a greenlet on the loop's thread (:mod:`.greenlets`); plain ``def`` tasks run in a
small bounded thread pool. Celery's request, tracer and acknowledgement machinery stay
in charge: the pool only decides where and when the tracer runs, and hands Celery's
callbacks to the consumer's thread (:mod:`.callbacks`).

The loop thread owns the pool's bookkeeping (pending jobs, running jobs, limits): every
change is a loop callback. Jobs beyond the concurrency wait, in arrival order, unstarted
and unacknowledged; a warm shutdown drops them (the broker redelivers them) and waits
for the running ones.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import logging
import os
import sys
import time
import weakref
from collections import deque
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any

from billiard.einfo import ExceptionInfo
from billiard.exceptions import WorkerLostError
from celery import signals
from celery.concurrency.base import BasePool
from celery.worker import state as worker_state
from greenlet import GreenletExit, getcurrent, greenlet

from ..._constants import LOOP_LAG_WARNING, POOL_SYNC_THREADS
from ..._exceptions import ConfigurationError
from ..._registry import registry
from ..loop import worker_loop
from . import limits
from .callbacks import Callbacks
from .context import bind_current_task, bind_task, current_job, sync_job
from .fatal import stop_process
from .greenlets import Job
from .plain_async import adopt_async_tasks
from .watchdog import Watchdog

logger = logging.getLogger("celerybridge.worker.pool")

# Celery's tracer entry points, by name: importing celery.app.trace with celerybridge
# would bind its tracer before Sentry can patch it (tests/test_exported_members.py).
_TRACERS = frozenset(
    {("celery.app.trace", "fast_trace_task"), ("celery.app.trace", "trace_task_ret")}
)
THREADS_SETTING = "celerybridge_pool_threads"
LAG_SETTING = "celerybridge_loop_lag_warning"

_worker: weakref.ReferenceType[Any] | None = None


def _remember_worker(sender: Any = None, **_: Any) -> None:
    # The pool is not given its worker; its start checks the options set on it.
    global _worker
    _worker = weakref.ref(sender) if sender is not None else None


signals.worker_init.connect(_remember_worker, weak=False)


class ApplyResult:
    """What ``on_apply`` returns: Celery's request terminates its job through it."""

    def __init__(self, pool: AsyncioPool, job: Job) -> None:
        self._pool = pool
        self._job = job

    def terminate(self, signal: Any = None) -> None:
        self._pool.terminate_job_of(self._job)

    def ready(self) -> bool:
        return self._job.finished


class AsyncioPool(BasePool):
    """A Celery worker pool running coroutine tasks concurrently on one event loop.

    Select it with ``worker_pool="celerybridge:AsyncioPool"`` (in ``celery_app(...)`` or
    the app's configuration), or on the command line with ``celery worker -P custom``
    and ``CELERY_CUSTOM_WORKER_POOL=celerybridge:AsyncioPool`` (Celery's ``-P`` takes
    only its own pool names).
    ``--concurrency N`` is the number of tasks in flight in the one worker process:
    ``async def`` implementations run on the worker's event loop, plain ``def`` ones in
    a thread pool of at most ``celerybridge_pool_threads`` threads (default 8).

    Plain Celery ``@app.task async def`` tasks run on the loop as well.

    Supported: acks_late and reject_on_worker_lost, retries, result storing, task
    events, ``self.request``/``current_task`` across awaits, soft and hard time limits
    on coroutine tasks (the hard one even when the body blocks the loop: the process
    exits if the loop stays blocked), ``revoke(terminate=True)`` of coroutine tasks,
    ``revoke`` of tasks waiting in the pool, warm shutdown.
    Refused at start: ``--max-tasks-per-child``, ``--max-memory-per-child``,
    ``--autoscale``. Sync tasks have no time limits and cannot be interrupted (threads).
    """

    signal_safe = False
    body_can_be_buffer = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._refused = [
            f"--{flag}"
            for option, flag in (
                ("maxtasksperchild", "max-tasks-per-child"),
                ("max_memory_per_child", "max-memory-per-child"),
            )
            if self.options.get(option)
        ]
        self._callbacks = Callbacks()
        self._pending: deque[Job] = deque()  # coroutine jobs waiting for a slot
        self._pending_sync: deque[Job] = deque()  # sync jobs waiting for a slot and a thread
        self._running: set[Job] = set()  # coroutine jobs, and sync jobs holding a thread
        self._sync_running = 0
        self._threads = 0
        self._arrived = 0
        self._active = 0  # pending and running, counted on the loop thread
        self._closing = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_greenlet: greenlet | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._watchdog: Watchdog | None = None
        self._hard: limits.HardLimits | None = None
        self._owners: weakref.WeakKeyDictionary[asyncio.Task[Any], Job] = (
            weakref.WeakKeyDictionary()
        )
        self._async_names: dict[str, bool] = {}
        self._plain_async: frozenset[str] = frozenset()

    # -- start and stop (the worker's main thread) --------------------------------------

    def on_start(self) -> None:
        worker = _worker() if _worker is not None else None
        if worker is not None and getattr(worker, "autoscale", None):
            self._refused.append("--autoscale")
        if self._refused:
            raise ConfigurationError(
                f"celerybridge.AsyncioPool does not support {', '.join(self._refused)}: its "
                "tasks share one process and one event loop (use the prefork pool for them)"
            )
        if self.limit is None or self.limit < 1:
            raise ConfigurationError(
                f"celerybridge.AsyncioPool needs a concurrency of at least 1, got {self.limit!r}"
            )
        bind_current_task()
        if self.app is not None:
            self._plain_async = adopt_async_tasks(self.app)
        conf = self.app.conf if self.app is not None else {}
        self._threads = min(self.limit, int(conf.get(THREADS_SETTING) or POOL_SYNC_THREADS))
        self._executor = ThreadPoolExecutor(self._threads, thread_name_prefix="celerybridge-sync")
        self._loop = loop = worker_loop.start()
        worker_loop.on_lost = self._loop_lost
        asyncio.run_coroutine_threadsafe(self._setup(), loop).result()
        self._hard = limits.HardLimits(loop, self._callbacks.post, self._finish)
        lag = conf.get(LAG_SETTING)
        threshold = LOOP_LAG_WARNING if lag is None else float(lag)
        if threshold > 0:
            self._watchdog = Watchdog(loop, threshold, self._culprit)
            self._watchdog.start()

    async def _setup(self) -> None:
        self._loop_greenlet = getcurrent()
        loop = asyncio.get_running_loop()
        previous = loop.get_task_factory()

        def factory(
            loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, Any], **kw: Any
        ) -> asyncio.Future[Any]:
            task = previous(loop, coro, **kw) if previous else asyncio.Task(coro, loop=loop, **kw)
            context = kw.get("context")
            job = context.get(current_job) if context is not None else current_job.get()
            if job is not None and isinstance(task, asyncio.Task):
                self._owners[task] = job
            return task

        loop.set_task_factory(factory)  # type: ignore[arg-type]

    def register_with_event_loop(self, loop: Any) -> None:
        self._callbacks.register(loop)

    def on_stop(self) -> None:
        """Warm shutdown: drop the jobs not started, wait for the running ones."""
        self._wait_closed()
        while self._active > 0:
            if worker_state.should_terminate:
                self.on_terminate()
                return
            self._callbacks.drain()
            time.sleep(0.02)
        self._teardown(wait=True)

    def on_terminate(self) -> None:
        """Cold shutdown: end the coroutine jobs now, without results."""
        if self._loop is not None and self._loop.is_running():
            self._call(self._kill_all).result(timeout=5)
        self._teardown(wait=False)

    def on_close(self) -> None:
        self._wait_closed()

    def _wait_closed(self) -> None:
        if self._loop is not None and self._loop.is_running():
            self._call(self._close).result(timeout=5)

    def _loop_lost(self) -> None:
        stop_process(
            self._callbacks.post,
            "the worker's event loop has stopped with %d task(s) in flight, which can never end",
            self._active,
        )

    def _teardown(self, wait: bool) -> None:
        if self._hard is not None:
            self._hard.stop()
            self._hard = None
        if self._watchdog is not None:
            self._watchdog.stop()
            self._watchdog = None
        if self._executor is not None:
            self._executor.shutdown(wait=wait, cancel_futures=True)
        self._callbacks.close()

    def _call(self, fn: Callable[[], None]) -> concurrent.futures.Future[None]:
        assert self._loop is not None

        async def call() -> None:
            fn()

        return asyncio.run_coroutine_threadsafe(call(), self._loop)

    # -- jobs in (the consumer's thread) ------------------------------------------------

    def on_apply(  # type: ignore[override]
        self,
        target: Callable[..., Any],
        args: tuple[Any, ...] | None = None,
        kwargs: dict[str, Any] | None = None,
        **options: Any,
    ) -> ApplyResult:
        args = tuple(args or ())
        job = Job(target, args, kwargs or {}, options, self._is_async(target, args))
        assert self._loop is not None, "the pool was not started"
        # Celery keeps only a weak reference to what on_apply returns: the job keeps it
        # alive for as long as a request may terminate it.
        job.handle = ApplyResult(self, job)
        self._loop.call_soon_threadsafe(self._enqueue, job)
        return job.handle

    def _is_async(self, target: Callable[..., Any], args: tuple[Any, ...]) -> bool:
        where = (getattr(target, "__module__", None), getattr(target, "__name__", None))
        if where not in _TRACERS or not args or not isinstance(args[0], str):
            return False
        name = args[0]
        if name not in self._async_names:
            fn = registry.implementations.get(name)
            self._async_names[name] = name in self._plain_async or (
                fn is not None and inspect.iscoroutinefunction(fn)
            )
        return self._async_names[name]

    def terminate_job(self, pid: int, signal: Any = None) -> None:
        # Every job shares this process's pid: Celery's request terminates its own job
        # through the ApplyResult it was given (Request.terminate calls both).
        pass

    def terminate_job_of(self, job: Job) -> None:
        if self._loop is not None and not job.finished:
            self._loop.call_soon_threadsafe(self._terminate, job)

    # -- bookkeeping (the loop's thread) ------------------------------------------------

    def _enqueue(self, job: Job) -> None:
        if self._closing:
            return  # never accepted, never acknowledged: the broker redelivers it
        self._active += 1
        self._arrived += 1
        job.seq = self._arrived
        (self._pending if job.is_async else self._pending_sync).append(job)
        self._pump()

    def _pump(self) -> None:
        """Start waiting jobs in arrival order while there are slots; a sync job takes
        a slot only with a thread, so sync jobs waiting for one never hold back a
        coroutine job behind them."""
        assert self.limit is not None
        while len(self._running) < self.limit and not self._closing:
            job = self._pending[0] if self._pending else None
            if self._pending_sync and self._sync_running < self._threads:
                first_sync = self._pending_sync[0]
                if job is None or first_sync.seq < job.seq:
                    job = first_sync
            if job is None:
                return
            (self._pending if job.is_async else self._pending_sync).popleft()
            self._running.add(job)
            if not job.is_async:
                self._sync_running += 1
            self._start(job)

    def _start(self, job: Job) -> None:
        if job.killed:  # terminated while it waited: Celery revokes it once accepted
            self._callbacks.post(job.accept_callback, os.getpid(), time.monotonic())
            self._finish(job)
        elif self._revoked(job):
            self._callbacks.post(job.request.revoked)  # REVOKED stored, acknowledged
            self._finish(job)
        elif job.is_async:
            assert self._loop is not None
            assert self._loop_greenlet is not None
            bind_task(self.app, job.name)
            limits.arm(job, self._loop, self._callbacks.post)
            if self._hard is not None:
                self._hard.add(job)
            job.start(self._run_in_greenlet, self._loop_greenlet)
        else:
            assert self._executor is not None
            job.started = True
            self._executor.submit(self._run_in_thread, job)

    @staticmethod
    def _revoked(job: Job) -> bool:
        """Revoked (or expired) while it waited in the pool, as Celery's ``Request.revoked``
        sees it (read here; the request itself records it on the consumer's thread)."""
        request = job.request
        if request is None or not callable(getattr(request, "revoked", None)):
            return False
        if job.task_id in worker_state.revoked:
            return True
        expires = getattr(request, "expires", None)
        if isinstance(expires, datetime):
            return datetime.now(expires.tzinfo) > expires
        return False

    def _finish(self, job: Job) -> None:
        if job.finished:
            return
        job.finished = True
        limits.disarm(job)
        if self._hard is not None:
            self._hard.remove(job)
        if job in self._running:
            self._running.discard(job)
            if not job.is_async:
                self._sync_running -= 1
        self._active -= 1
        assert self._loop is not None
        self._loop.call_soon(self._pump)  # not from inside the finishing greenlet

    def _close(self) -> None:
        self._closing = True
        self._active -= len(self._pending) + len(self._pending_sync)
        self._pending.clear()
        self._pending_sync.clear()

    def _kill_all(self) -> None:
        self._close()
        for job in list(self._running):
            if job.is_async:
                job.kill()
                self._finish(job)
            else:
                job.killed = True

    def _terminate(self, job: Job) -> None:
        if job.finished:
            return
        if not job.started:
            job.killed = True  # accepted (then revoked by Celery) when its turn comes
        elif job.is_async:
            job.kill()
            self._finish(job)
        else:
            job.killed = True
            logger.warning(
                "task %r runs in a thread and cannot be interrupted: it runs to its end, "
                "its result is dropped, and Celery has already recorded it as revoked",
                job,
            )

    # -- running a job ------------------------------------------------------------------

    def _run_in_greenlet(self, job: Job) -> None:
        job.in_greenlet()
        try:
            self._trace(job)
        finally:
            self._finish(job)

    def _run_in_thread(self, job: Job) -> None:
        token = sync_job.set(job)
        try:
            self._trace(job)
        finally:
            sync_job.reset(token)
            assert self._loop is not None
            self._loop.call_soon_threadsafe(self._finish, job)

    def _trace(self, job: Job) -> None:
        """Run Celery's tracer as ``celery.concurrency.base.apply_target`` does."""
        post = self._callbacks.post
        post(job.accept_callback, os.getpid(), time.monotonic())
        try:
            ret = job.target(*job.args, **job.kwargs)
        except GreenletExit:
            return  # killed: Celery has recorded the outcome already
        except BaseException as exc:
            if job.killed or not job.claim():
                return
            if not isinstance(exc, (SystemExit, KeyboardInterrupt)):
                # Celery's tracer failed (its own error handling raised): the task fails
                # with that error, as on the prefork pool. A WorkerLostError would hand a
                # message that fails this way every time back to the broker (acks_late with
                # reject_on_worker_lost), to run again, for ever on RabbitMQ.
                logger.exception("task %r: Celery's tracer failed", job)
                post(job.callback, (1, ExceptionInfo(), 0.0))
                return
            # The body raised it (Celery's tracer lets these through): the task fails as on
            # Celery's threads pool, and the worker goes on.
            logger.error(
                "task %r raised %r: it fails with WorkerLostError, the worker goes on", job, exc
            )
            try:
                raise WorkerLostError(repr(exc)).with_traceback(sys.exc_info()[2]) from exc
            except WorkerLostError:
                post(job.callback, (1, ExceptionInfo(), 0.0))
        else:
            if not job.killed and job.claim():
                post(job.callback, ret)

    def _culprit(self) -> Job | str | None:
        """What holds the loop now (read from the watchdog's thread)."""
        if Job.on_loop is not None:
            return Job.on_loop
        loop = self._loop
        task = asyncio.current_task(loop) if loop is not None else None
        if task is None:
            return None
        owner = self._owners.get(task)
        return owner if owner is not None else f"<asyncio task {task.get_name()}>"

    def _get_info(self) -> dict[str, Any]:
        return {
            "implementation": f"{type(self).__module__}:{type(self).__name__}",
            "max-concurrency": self.limit,
            "running": len(self._running),
            "pending": len(self._pending) + len(self._pending_sync),
            "threads": len(getattr(self._executor, "_threads", ())),
        }
