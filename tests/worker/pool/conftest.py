"""Workers on ``celerybridge.AsyncioPool`` (``tests.workers.pool_worker``)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from celerybridge import Bridge

from ..._brokers import BROKERS, RESULT_BACKEND
from ..._workers import Worker, stop_all

MODULE = "tests.workers.pool_worker"


def pool_worker(
    broker: str, markers: Path, concurrency: int = 400, module: str = MODULE, **env: str
) -> Worker:
    """A worker of ``module``: no ``-P``, the app's ``worker_pool`` selects the pool."""
    markers.mkdir(exist_ok=True)
    worker = Worker(module, BROKERS[broker], RESULT_BACKEND, pool=None)
    worker.extra_env.update(
        CB_POOL_CONCURRENCY=str(concurrency), CB_POOL_MARKERS=str(markers), **env
    )
    return worker


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str], Worker]]:
    """One 400-task worker per broker for the module's tests that leave it as it was."""
    started: dict[str, Worker] = {}
    folder = tmp_path_factory.mktemp("pool")

    def start(broker: str) -> Worker:
        if broker not in started:
            started[broker] = pool_worker(broker, folder / f"markers-{broker}").start(folder)
        return started[broker]

    yield start
    stop_all(started.values())


@pytest.fixture
def worker(shared: Callable[[str], Worker], broker: str) -> Worker:
    return shared(broker)


def markers_of(worker: Worker) -> Path:
    return Path(worker.extra_env["CB_POOL_MARKERS"])


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


@pytest.fixture
async def bridge(broker: str) -> AsyncIterator[Bridge]:
    """A bridge on the test's broker, the results on the test result backend."""
    async with Bridge(
        broker_url=BROKERS[broker], result_backend=RESULT_BACKEND, result_timeout=60
    ) as bridge:
        yield bridge
