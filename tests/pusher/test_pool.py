"""The pusher's pool: ``celery -A pusher worker`` runs ``PUSHER_CONCURRENCY`` uploads at
once in one process, as coroutines on celerybridge's asyncio pool (a thread each with
``-P threads``), all through one S3 client whose connection pool is as large."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from celerybridge import Bridge
from pusher.bindings import send_to_s3

from .._brokers import BROKERS, RESULT_BACKEND
from .._workers import Worker
from ._s3server import DelayProxy, MotoServer

pytestmark = pytest.mark.integration

IN_FLIGHT = 12


def _threads(pid: int) -> int:
    return sum(1 for _ in Path(f"/proc/{pid}/task").iterdir())


@pytest.mark.parametrize(
    ("pool", "banner"), [(None, f"concurrency: {IN_FLIGHT} (pool)"), ("threads", "(thread)")]
)
async def test_uploads_in_flight_follow_pusher_concurrency(
    start_pusher: Callable[..., Worker],
    broker: str,
    moto_server: MotoServer,
    s3: Any,
    bucket: str,
    pool: str | None,
    banner: str,
) -> None:
    proxy = DelayProxy(moto_server.port)
    proxy.delay = 1.0  # every upload held: they pile up to what the worker allows
    queue = f"cb-pusher-pool-{uuid.uuid4().hex[:6]}"
    worker = start_pusher(
        broker,
        queue=queue,
        pool=pool,
        AWS_ENDPOINT_URL_S3=proxy.url,
        PUSHER_CONCURRENCY=str(IN_FLIGHT),
    )
    assert worker.process is not None
    pid = worker.process.pid
    threads_at_peak: dict[int, int] = {}
    proxy.on_peak = lambda held: threads_at_peak.__setitem__(held, _threads(pid))
    keys = [f"pool/{uuid.uuid4().hex}.json" for _ in range(2 * IN_FLIGHT)]
    try:
        async with Bridge(broker_url=BROKERS[broker], result_backend=RESULT_BACKEND) as bridge:
            stub = send_to_s3.with_options(queue=queue)
            handles = [await bridge.send(stub, (key, "{}"), {}) for key in keys]
            receipts = [await handle.result(timeout=90) for handle in handles]
    finally:
        proxy.close()
    assert banner in worker.log()
    assert [r.key for r in receipts] == keys
    listed = await anyio.to_thread.run_sync(
        lambda: s3.list_objects_v2(Bucket=bucket, Prefix="pool/")["Contents"]
    )
    assert set(keys) <= {o["Key"] for o in listed}
    # Exactly PUSHER_CONCURRENCY uploads reached S3 at once: no more (the worker
    # reserves no more), no fewer (one S3 client whose pool has as many connections).
    assert proxy.peak_held == IN_FLIGHT
    if pool is None:  # coroutines: the uploads in flight hold no thread each
        assert threads_at_peak[IN_FLIGHT] < IN_FLIGHT
    else:
        assert threads_at_peak[IN_FLIGHT] > IN_FLIGHT
