"""Fixtures for tests that need S3 and the pusher: moto's server, a bucket, pusher workers."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ._brokers import BROKERS, RESULT_BACKEND
from ._workers import Worker, stop_all
from .pusher._s3server import MotoServer


@pytest.fixture(scope="session")
def moto_server() -> Iterator[MotoServer]:
    """moto's standalone S3 server, reached over HTTP like any S3."""
    server = MotoServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3(moto_server: MotoServer) -> Any:
    return moto_server.client()


@pytest.fixture(scope="session")
def bucket(s3: Any) -> str:
    name = f"cb-backups-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def pusher_env(moto_server: MotoServer, bucket: str) -> dict[str, str]:
    """The standard AWS chain plus PUSHER_*: all the pusher is configured with."""
    return {
        "AWS_ENDPOINT_URL_S3": moto_server.url,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "PUSHER_BUCKET": bucket,
        "PUSHER_CONCURRENCY": "8",
    }


@pytest.fixture(scope="session")
def start_pusher(
    pusher_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., Worker]]:
    """Start ``celery -A pusher worker -Q <queue> --loglevel=info``, as the seed does."""
    started: list[Worker] = []
    shared: dict[tuple[object, ...], Worker] = {}
    log_dir: Path = tmp_path_factory.mktemp("pushers")

    def start(
        broker: str,
        *,
        queue: str | None = None,
        wait: bool = True,
        pool: str | None = None,
        **env: str,
    ) -> Worker:
        """A pusher on ``broker``, on its own pool or ``-P pool`` (its concurrency still
        ``PUSHER_CONCURRENCY``); one per (broker, queue, pool, env), reused while it runs."""
        key = (broker, queue, pool, tuple(sorted(env.items())))
        if wait and key in shared and shared[key].running:
            return shared[key]
        worker = Worker("pusher", BROKERS[broker], RESULT_BACKEND, pool=pool, concurrency=None)
        if queue is not None:
            worker.queue = queue
        worker.extra_env.update(pusher_env)
        worker.extra_env.update(env)
        started.append(worker)
        worker.start(log_dir, wait=wait)
        if wait:
            shared[key] = worker
        return worker

    yield start
    stop_all(started)


@pytest.fixture
def pusher_worker(start_pusher: Callable[..., Worker], broker: str) -> Worker:
    return start_pusher(broker)


@pytest.fixture
def seed_queue_pusher(start_pusher: Callable[..., Worker], broker: str) -> Iterator[Worker]:
    """A pusher on the seed's own queue, ``pusher``, stopped when the test ends: the demo's
    tests start a pusher of their own on that queue, with another S3 bucket, and two
    pushers would share its messages."""
    worker = start_pusher(broker, queue="pusher")
    yield worker
    worker.stop()
