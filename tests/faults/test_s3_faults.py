"""S3 misbehaving under the pusher: 503 SlowDown, 500, resets, slow and hanging answers.

A fault proxy between the pusher and moto's server meets 10% of uploads with one of
them. Every object must land, each once with the right bytes: botocore's ``standard``
retry mode and the task's own retries absorb the faults. Keys whose uploads always
fail end, after a bounded time, in a typed error for the caller and a dead letter.
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import pytest

from celerybridge import Bridge, RemoteTaskError
from pusher.bindings import send_to_s3

from .._brokers import BROKERS, RESULT_BACKEND, dead_letters
from .._workers import Worker
from ..pusher._s3server import MotoServer
from ._ledger import Ledger, content_for
from ._s3_proxy import FAULTS, FaultProxy
from .conftest import CountLedger, Scale, drive

pytestmark = pytest.mark.integration

# Hung requests are given up after 1 s (slow ones answer within 0.5 s); a task may take
# 20 s in all.
TIMEOUTS = {"PUSHER_S3_READ_TIMEOUT": "1", "PUSHER_TASK_TIME_LIMIT": "20"}


@pytest.fixture
def proxy(moto_server: MotoServer) -> Iterator[FaultProxy]:
    seed = random.randrange(2**32)
    proxy = FaultProxy(moto_server.port, rate=0.10, latency=0.01, slow=0.5, seed=seed)
    yield proxy
    proxy.close()


async def test_uploads_land_through_ten_percent_of_s3_faults(
    start_ledger_pusher: Callable[..., Worker],
    broker: str,
    ledger: Ledger,
    scale: Scale,
    proxy: FaultProxy,
    count_ledger: CountLedger,
) -> None:
    queue = f"cb-faults-s3-{uuid.uuid4().hex[:6]}"
    start_ledger_pusher(broker, queue, AWS_ENDPOINT_URL_S3=proxy.url, **TIMEOUTS)
    # A call unlucky enough to meet faults run after run waits out botocore's attempts and
    # the task's backoff (up to 60 s between runs): give it time to get its receipt.
    await drive(broker, queue, ledger, scale.uploads, prefix=queue, result_timeout=240)
    for fault, count in proxy.injected.items():
        for _ in range(count):
            ledger.fault(f"S3 {fault}")
    tally = await count_ledger("S3 faults at 10%", proxy.seed)
    assert (tally.ok, tally.landed) == (scale.uploads, scale.uploads), tally
    # The faults did happen, every kind of them, and each failed attempt was tried again.
    assert set(proxy.injected) == set(FAULTS), proxy.injected
    failed = sum(n for fault, n in proxy.injected.items() if fault != "slow")
    assert proxy.uploads >= scale.uploads + failed


async def test_an_upload_s3_always_refuses_ends_in_a_typed_error_and_a_dead_letter(
    start_ledger_pusher: Callable[..., Worker], broker: str, moto_server: MotoServer, s3: Any
) -> None:
    proxy = FaultProxy(moto_server.port, doomed=("doomed/",))
    queue = f"cb-faults-doomed-{uuid.uuid4().hex[:6]}"
    limits = {"PUSHER_S3_MAX_ATTEMPTS": "2", "PUSHER_MAX_RETRIES": "2"}
    start_ledger_pusher(broker, queue, AWS_ENDPOINT_URL_S3=proxy.url, **limits)
    key = f"doomed/{uuid.uuid4().hex}.json"
    started = time.monotonic()
    try:
        async with Bridge(broker_url=BROKERS[broker], result_backend=RESULT_BACKEND) as bridge:
            stub = send_to_s3.with_options(queue=queue)
            handle = await bridge.send(stub, (key, content_for(key, 0)), {})
            with pytest.raises(RemoteTaskError) as caught:
                await handle.result(timeout=60)
    finally:
        proxy.close()
    elapsed = time.monotonic() - started
    # 3 runs x 2 attempts, backoff of about 1 + 2 s between runs (with jitter: less).
    assert proxy.uploads == 6
    assert elapsed < 30
    assert caught.value.remote_type == "TransientUploadError"
    assert "SlowDown" in str(caught.value)
    [dead] = await anyio.to_thread.run_sync(dead_letters, BROKERS[broker], queue)
    assert dead["id"] == handle.id
    assert dead["x-celerybridge-dead-reason"].startswith("failed after 2 retries: ")
