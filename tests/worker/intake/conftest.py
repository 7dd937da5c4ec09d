"""Workers with a signing key, shared by the intake tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ..._brokers import BROKERS, RESULT_BACKEND
from ..._workers import Worker, stop_all

KEY = "intake-test-key-" + "k" * 32


@pytest.fixture(scope="package")
def keyed_workers() -> Iterator[dict[str, Worker]]:
    started: dict[str, Worker] = {}
    yield started
    stop_all(started.values())


@pytest.fixture
def keyed_worker(
    keyed_workers: dict[str, Worker], broker: str, tmp_path_factory: pytest.TempPathFactory
) -> Worker:
    """A celerybridge worker (tests.workers.bridge_worker) with ``KEY``, one per broker."""
    if broker not in keyed_workers:
        worker = Worker("tests.workers.bridge_worker", BROKERS[broker], RESULT_BACKEND)
        worker.extra_env["CELERYBRIDGE_SIGNING_KEY"] = KEY
        keyed_workers[broker] = worker.start(tmp_path_factory.mktemp("keyed"))
    return keyed_workers[broker]
