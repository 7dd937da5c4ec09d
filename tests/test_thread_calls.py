"""Blocking calls in worker threads: cancelling abandons the thread, closing waits for it."""

from __future__ import annotations

import threading

import anyio
import pytest

from celerybridge import ResultBackendError
from celerybridge._transports._threads import ThreadCalls
from celerybridge._transports.kombu import KombuResultSource

from ._brokers import RESULT_BACKEND


async def test_cancelled_call_is_abandoned_and_close_waits_for_it() -> None:
    calls = ThreadCalls(4, ResultBackendError, grace=5)
    started, release, finished = threading.Event(), threading.Event(), threading.Event()

    def blocking() -> None:
        started.set()
        release.wait(5)
        finished.set()

    with anyio.move_on_after(0.1) as scope:
        await calls.run(blocking)
    assert scope.cancelled_caught  # the caller did not wait for the thread
    assert started.is_set()
    assert not finished.is_set()

    assert not await anyio.to_thread.run_sync(calls.close, 0.05)  # still running
    release.set()
    assert await anyio.to_thread.run_sync(calls.close, 5)
    assert finished.is_set()


async def test_abandoned_calls_still_count_against_the_limit() -> None:
    calls = ThreadCalls(2, ResultBackendError, grace=5)
    running, peak, lock = 0, 0, threading.Lock()
    release = threading.Event()

    def blocking() -> None:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        release.wait(5)
        with lock:
            running -= 1

    for _ in range(5):  # each caller gives up at once: anyio frees its limiter token
        with anyio.move_on_after(0.05):
            await calls.run(blocking)
    await anyio.sleep(0.2)
    assert peak == 2
    release.set()
    assert await anyio.to_thread.run_sync(calls.close, 5)
    assert peak == 2


async def test_call_after_close_fails_with_the_given_error() -> None:
    calls = ThreadCalls(4, ResultBackendError, grace=5)
    assert calls.close()
    with pytest.raises(ResultBackendError, match="closed before the call started"):
        await calls.run(lambda: None)


def open_sockets(source: KombuResultSource) -> int:
    """Connected sockets in the result backend's Redis connection pool."""
    pool = source._backend.client.connection_pool
    connections = [*pool._available_connections, *pool._in_use_connections]
    return sum(1 for connection in connections if connection._sock is not None)


@pytest.mark.integration
async def test_closing_with_an_abandoned_fetch_in_flight_leaves_no_socket_open() -> None:
    # Before ThreadCalls, the fetch abandoned by its cancelled caller went on after
    # close, reconnected the closed pool and left the socket to the garbage collector.
    source = KombuResultSource(RESULT_BACKEND, io_timeout=5)
    real_fetch = source.fetch
    entered, release, done = threading.Event(), threading.Event(), threading.Event()

    def slow_fetch(task_id: str) -> object:
        entered.set()
        release.wait(5)  # a slow backend
        try:
            return real_fetch(task_id)
        finally:
            done.set()

    source.fetch = slow_fetch  # type: ignore[method-assign]
    async with anyio.create_task_group() as group:
        group.start_soon(source.wait, "never-stored")
        await anyio.to_thread.run_sync(entered.wait, 5)
        group.cancel_scope.cancel()  # the caller gives up: its thread is abandoned
    threading.Timer(0.2, release.set).start()  # the backend answers while closing
    await source.aclose()
    assert await anyio.to_thread.run_sync(done.wait, 5)
    assert open_sockets(source) == 0
