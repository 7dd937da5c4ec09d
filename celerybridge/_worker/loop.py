"""One persistent asyncio event loop per worker process, and resources that live on it.

``async def`` task bodies run here instead of ``asyncio.run`` per task, so clients
created by a :class:`WorkerResource` are made once and reused by every task of the
process, including tasks running concurrently in a ``threads`` pool. The loop and its
resources are closed when the worker process shuts down.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from typing import Any, Generic, TypeVar

from celery import signals

from .pool.greenlets import guard, running_job, unwrap

T = TypeVar("T")
logger = logging.getLogger("celerybridge.worker")

SHUTDOWN_TIMEOUT = 30.0
"""Seconds resources get to close when the worker process stops."""


class WorkerLoop:
    """An event loop running in a daemon thread, created lazily once per process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._pid = 0
        self.resources = AsyncExitStack()
        self.values: dict[WorkerResource[Any], Any] = {}
        self.creating = asyncio.Lock()  # serialises first uses of resources
        self.on_lost: Callable[[], None] | None = None
        """Called (on the dying loop thread) if the loop stops without :meth:`shutdown`."""

    def start(self) -> asyncio.AbstractEventLoop:
        """The running loop of this process, started now if it was not yet."""
        return self._ensure()

    def _ensure(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None or self._pid != os.getpid():
                # After a fork the parent's thread is gone: start afresh in this process.
                self._loop = asyncio.new_event_loop()
                self._pid = os.getpid()
                self.resources = AsyncExitStack()
                self.values = {}
                self.creating = asyncio.Lock()
                self._thread = threading.Thread(
                    target=self._run, args=(self._loop,), name="celerybridge-loop", daemon=True
                )
                self._thread.start()
            return self._loop

    def _run(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            loop.run_forever()
        except BaseException:
            logger.critical("the worker's event loop thread failed", exc_info=True)
        if self._loop is not loop:
            return  # shutdown() stopped it
        # An exception out of a loop callback, or loop.stop() in a task: every coroutine
        # of this process is frozen from now on.
        logger.critical(
            "the worker's event loop has stopped: no coroutine of this process runs any more"
        )
        if self.on_lost is not None:
            self.on_lost()

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The running loop of this process, if one was started."""
        return self._loop if self._pid == os.getpid() else None

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the loop and block the calling (task) thread until it finishes.

        The coroutine runs in a copy of the calling thread's context (``call_soon_threadsafe``
        schedules in the caller's current context), as a coroutine awaited there would:
        the worker's tracing span and Sentry's scope for the task are current inside it
        (``tests/ecosystem``).

        Inside a job of :class:`celerybridge.AsyncioPool` (the tracer's greenlet on the
        loop's own thread) nothing blocks: the coroutine becomes a Task of the loop and the
        greenlet switches out until it is done (``pool/greenlets.py``).
        """
        job = running_job()
        if job is not None:
            return job.await_(coro)
        future = asyncio.run_coroutine_threadsafe(guard(coro), self._ensure())
        try:
            return unwrap(future)
        except BaseException:
            # A soft time limit or shutdown interrupted us: do not leave the coroutine running.
            future.cancel()
            raise

    def shutdown(self, timeout: float = SHUTDOWN_TIMEOUT) -> None:
        """Close the resources, then stop and close the loop. Idempotent."""
        with self._lock:
            loop, thread = self.loop, self._thread
            self._loop = self._thread = None
        if loop is None or thread is None:
            return
        if not thread.is_alive():  # it died (on_lost): nothing can run on it
            loop.close()
            return
        try:
            asyncio.run_coroutine_threadsafe(self.resources.aclose(), loop).result(timeout)
        except Exception:
            logger.exception("closing worker resources failed")
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)
        loop.close()


worker_loop = WorkerLoop()


def _on_shutdown(**_: Any) -> None:
    worker_loop.shutdown()


# Prefork children stop through worker_process_shutdown; solo and threads pools through
# worker_shutdown in the main process. Both are safe to fire; shutdown is idempotent.
signals.worker_process_shutdown.connect(_on_shutdown, weak=False)
signals.worker_shutdown.connect(_on_shutdown, weak=False)


class WorkerResource(Generic[T]):
    """A value made once per worker process, on its event loop, and closed at shutdown.

    Build one with :func:`worker_resource`; ``await resource()`` inside an async task
    body returns the value, entering the factory's context on first use.
    """

    def __init__(self, factory: Callable[[], AbstractAsyncContextManager[T]]) -> None:
        self._factory = factory
        self.__doc__ = factory.__doc__

    async def __call__(self) -> T:
        if asyncio.get_running_loop() is not worker_loop.loop:
            raise RuntimeError(
                "a worker resource can only be used inside a task body running on the "
                "worker's event loop (or in run_on_worker_loop)"
            )
        if self not in worker_loop.values:
            async with worker_loop.creating:
                if self not in worker_loop.values:
                    value = await worker_loop.resources.enter_async_context(self._factory())
                    worker_loop.values[self] = value
        value_: T = worker_loop.values[self]
        return value_


def worker_resource(fn: Callable[[], AsyncIterator[T]]) -> WorkerResource[T]:
    """Declare a per-worker-process resource from an async generator.

    The code before ``yield`` runs on first use, the code after it when the worker
    process shuts down::

        @worker_resource
        async def s3_client():
            async with session.create_client("s3") as client:
                yield client

        @send_to_s3.implement(app)
        async def send_to_s3_impl(key: str, content: str) -> Receipt:
            client = await s3_client()
            ...
    """
    return WorkerResource(asynccontextmanager(fn))


def run_on_worker_loop(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on this process's worker loop from sync code (e.g. a startup check)."""
    return worker_loop.run(coro)
