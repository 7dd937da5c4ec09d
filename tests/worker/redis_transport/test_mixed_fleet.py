"""A stock Celery worker (kombu's own Redis transport) and a celerybridge worker on one
Redis queue, fed by a stock Celery producer and by a bridge: both workers get work, and
every call has its result."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import anyio
import pytest
from celery import Celery

from celerybridge import Bridge
from tests.workers import bindings

from ..._brokers import BROKERS, RESULT_BACKEND
from ..._workers import Worker, stop_all
from .test_delivery import _wait_ready

pytestmark = pytest.mark.integration

URL = BROKERS["redis"]
CALLS = 100  # from each producer


async def test_stock_and_celerybridge_workers_share_a_queue(tmp_path: Path) -> None:
    queue = f"cb-mixed-{uuid.uuid4().hex[:8]}"
    workers = [
        Worker("tests.workers.plain_worker", URL, RESULT_BACKEND, queue=queue),
        Worker("tests.workers.reliable_worker", URL, RESULT_BACKEND, queue=queue),
    ]
    for n, worker in enumerate(workers):
        folder = tmp_path / str(n)
        folder.mkdir()
        worker.start(folder, wait=False)
    stock = Celery("stock_producer", broker=URL, backend=RESULT_BACKEND)
    try:
        _wait_ready(workers)
        assert "celerybridge._worker.redis_transport:Transport" in workers[1].log()
        assert "transport:   redis://" in workers[0].log()

        def stock_calls() -> list[Any]:
            sent = [
                stock.send_task("plain.store", args=[f"stock-{n}", str(n)], queue=queue)
                for n in range(CALLS)
            ]
            return [result.get(timeout=60) for result in sent]

        async with Bridge(broker_url=URL, result_backend=RESULT_BACKEND) as bridge:
            stub = bindings.store.with_options(queue=queue)
            handles = [await bridge.send(stub, (f"bridge-{n}", str(n)), {}) for n in range(CALLS)]
            from_stock, from_bridge = await asyncio.gather(
                anyio.to_thread.run_sync(stock_calls),
                asyncio.gather(*(handle.result(timeout=60) for handle in handles)),
            )
    finally:
        stock.close()
        stop_all(workers)
    results = [*from_stock, *from_bridge]
    expected = {f"{who}-{n}": str(n) for who in ("stock", "bridge") for n in range(CALLS)}
    assert {r["key"]: r["content"] for r in results} == expected  # nothing lost
    ran_by = [r["bridge_loaded"] for r in results]
    assert ran_by.count("True") > 0, "the celerybridge worker got no work"
    assert ran_by.count("False") > 0, "the stock worker got no work"
