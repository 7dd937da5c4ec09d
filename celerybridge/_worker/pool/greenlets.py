"""Celery's tracer in a greenlet on the event loop's thread, awaiting without blocking.

Each coroutine job runs Celery's unchanged tracer (``fast_trace_task``) in a greenlet
whose parent is the loop thread's main greenlet, the one running the asyncio loop. When
the tracer reaches the task body and the body hands its coroutine to
:meth:`celerybridge._worker.loop.WorkerLoop.run`, :meth:`Job.await_` makes it an asyncio
Task and switches back to the loop; the Task's completion switches into the greenlet
again, and the tracer goes on (result stored, callbacks queued) as if ``run`` had
blocked. Only :meth:`Job.await_` switches, so Celery's own code between two switches
runs as it would in a thread of its own (the way SQLAlchemy's ``greenlet_spawn`` and
``await_only`` bridge sync code to asyncio).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from celery.exceptions import SoftTimeLimitExceeded
from greenlet import GreenletExit, getcurrent, greenlet

from .context import current_job

T = TypeVar("T")


class Job:
    """One task message handed to the pool: its tracer call and Celery's callbacks."""

    on_loop: Job | None = None
    """The job whose greenlet is running on the loop thread right now (for the watchdog)."""

    def __init__(
        self,
        target: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        callbacks: dict[str, Any],
        is_async: bool,
    ) -> None:
        self.target = target
        self.args = args
        self.kwargs = kwargs
        self.callback: Callable[[Any], Any] | None = callbacks.get("callback")
        self.accept_callback: Callable[[int, float], Any] | None = callbacks.get("accept_callback")
        self.timeout_callback: Callable[[bool, float], Any] | None = callbacks.get(
            "timeout_callback"
        )
        self.timeout: float | None = callbacks.get("timeout")
        self.soft_timeout: float | None = callbacks.get("soft_timeout")
        self.is_async = is_async
        self.name = str(args[0]) if args else "?"
        self.task_id = str(callbacks.get("correlation_id") or (args[1] if len(args) > 1 else "?"))
        self.greenlet: greenlet | None = None
        self.task: asyncio.Task[Any] | None = None
        self.started = False
        self.finished = False
        self.soft_expired = False
        self.killed = False  # hard time limit, terminate, cold shutdown: no result callback
        self.timers: list[asyncio.TimerHandle] = []
        self.handle: object = None  # the pool's ApplyResult for this job
        self.seq = 0  # arrival order in the pool
        self._outcome = threading.Lock()

    @property
    def request(self) -> Any:
        """Celery's ``Request`` for this job (whose ``on_success`` is the callback), if any."""
        return getattr(self.callback, "__self__", None)

    def claim(self) -> bool:
        """True for the first caller only: the one that reports the job's outcome to
        Celery (the tracer's result, a hard time limit, a kill). Any thread."""
        return self._outcome.acquire(blocking=False)

    def __repr__(self) -> str:
        return f"{self.name}[{self.task_id}]"

    def start(self, run: Callable[[Job], None], parent: greenlet) -> None:
        """Run ``run(self)`` in a new greenlet until its first await (on the loop thread,
        whose main greenlet is ``parent``)."""
        self.started = True
        self.greenlet = greenlet(run, parent=parent)
        # A context of its own: the job variable set in it is what the coroutine's Task
        # copies (context.py), and no job sees another's variables.
        self.greenlet.gr_context = contextvars.Context()
        self._switch(self)

    def _switch(self, *args: Any) -> None:
        assert self.greenlet is not None
        Job.on_loop = self
        try:
            self.greenlet.switch(*args)
        finally:
            Job.on_loop = None

    def in_greenlet(self) -> None:
        """Called first thing in the job's greenlet."""
        current_job.set(self)

    def await_(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` as an asyncio Task on this (the running) loop and return its result,
        switching out of the job's greenlet while it runs."""
        loop = asyncio.get_running_loop()
        me = self.greenlet
        assert me is not None
        assert me.parent is not None
        task = loop.create_task(guard(coro), context=contextvars.copy_context())
        self.task = task

        def resume(done: asyncio.Task[Any]) -> None:
            if self.task is not done or me.dead:
                return
            if self.killed:
                self._unwind()  # the body has stopped: now the tracer, without a result
            else:
                self._switch()

        task.add_done_callback(resume)
        try:
            me.parent.switch()
        except GreenletExit:
            task.cancel()
            raise
        finally:
            self.task = None
        if task.cancelled():
            if self.soft_expired:
                raise SoftTimeLimitExceeded(f"soft time limit ({self.soft_timeout}s) exceeded")
            # The body ended in a CancelledError of its own (it awaited a Task that
            # something else cancelled): the pool's own cancellations (hard limit,
            # terminate, cold shutdown) never get here. It fails as an exception, as on
            # Celery's other pools (concurrent.futures.CancelledError is an Exception);
            # asyncio's is a BaseException, which Celery's tracer would let through.
            try:
                task.result()
            except asyncio.CancelledError as exc:
                raise concurrent.futures.CancelledError(*exc.args) from exc
        return unwrap(task)

    def kill(self) -> None:
        """End the job without a result (on the loop thread, from outside its greenlet).

        The coroutine is cancelled first, and the tracer unwound once it has stopped, so
        the body's cleanup still sees its request; a body that will not stop gets
        :data:`KILL_GRACE` seconds, then the tracer is unwound under it.
        """
        self.claim()  # whoever kills it has reported its outcome (or Celery has)
        self.killed = True
        task = self.task
        if task is not None and not task.done():
            task.cancel()
            task.get_loop().call_later(KILL_GRACE, self._unwind)
        else:
            self._unwind()

    def _unwind(self) -> None:
        if self.greenlet is not None and not self.greenlet.dead:
            Job.on_loop = self
            try:
                self.greenlet.throw(GreenletExit)
            finally:
                Job.on_loop = None


KILL_GRACE = 1.0
"""Seconds a cancelled coroutine has to stop before its tracer is unwound under it."""


class BodyExit(Exception):
    """Carries a body's ``SystemExit`` or ``KeyboardInterrupt`` out of its asyncio Task.

    asyncio re-raises those two out of ``run_forever``, which would end the loop thread
    and every task on it; :func:`unwrap` raises the original again where the coroutine
    was awaited (a job's greenlet, or a thread of another pool).
    """

    def __init__(self, exc: BaseException) -> None:
        super().__init__(repr(exc))
        self.exc = exc


async def guard(coro: Coroutine[Any, Any, T]) -> T:
    """``await coro``, a ``SystemExit`` or ``KeyboardInterrupt`` wrapped in :class:`BodyExit`."""
    try:
        return await coro
    except (SystemExit, KeyboardInterrupt) as exc:
        raise BodyExit(exc) from None


def unwrap(future: asyncio.Future[T] | concurrent.futures.Future[T]) -> T:
    """``future.result()``, raising a :class:`BodyExit`'s original exception again."""
    try:
        return future.result()
    except BodyExit as wrapped:
        raise wrapped.exc from None


def running_job() -> Job | None:
    """The job whose greenlet is running the current code, if any."""
    job = current_job.get()
    if job is not None and job.greenlet is getcurrent():
        return job
    return None
