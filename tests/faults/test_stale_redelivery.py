"""A stale redelivery must not overwrite newer content.

Two saves of one key: the older one is taken by a worker that dies mid-upload, the
newer one lands meanwhile, and the broker hands the older message to a worker last.
With ``revision`` (contract v3) the pusher writes conditionally and keeps the newer
content; without it (v1, the seed's contract) the old content wins, which the control
case shows happens.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import anyio
import pytest

from celerybridge import ArgumentError, Bridge
from pusher.bindings import Receipt, send_to_s3, send_to_s3_v3

from .._brokers import BROKERS, RESULT_BACKEND
from .._workers import Worker
from ..pusher._s3server import DelayProxy, MotoServer

pytestmark = pytest.mark.integration

# The held upload must not time out before the test kills its worker; Redis hands the
# message out again some 12 s (+ a 3 s sweep) after the dead worker took it.
DELIVERY = {"PUSHER_TASK_TIME_LIMIT": "10", "PUSHER_VISIBILITY_TIMEOUT": "12"}


def _stored(s3: Any, bucket: str, key: str) -> tuple[bytes, dict[str, str]]:
    stored = s3.get_object(Bucket=bucket, Key=key)
    return stored["Body"].read(), stored["Metadata"]


@pytest.mark.parametrize("ordered", [True, False], ids=["v3 with revision", "v1 control"])
async def test_a_stale_redelivery_does_not_overwrite_newer_content(
    start_pusher: Callable[..., Worker],
    broker: str,
    moto_server: MotoServer,
    s3: Any,
    bucket: str,
    ordered: bool,
) -> None:
    queue = f"cb-faults-stale-{uuid.uuid4().hex[:6]}"
    key = f"stale/{uuid.uuid4().hex}.json"
    hold = DelayProxy(moto_server.port)
    hold.delay = 60.0  # the first worker's upload never gets through
    doomed = start_pusher(
        broker, queue=queue, AWS_ENDPOINT_URL_S3=hold.url, PUSHER_CONCURRENCY="1", **DELIVERY
    )

    async def save(bridge: Bridge, content: str, revision: int) -> Any:
        if ordered:
            stub = send_to_s3_v3.with_options(queue=queue)
            return await bridge.send(stub, (key, content.encode()), {"revision": revision})
        return await bridge.send(send_to_s3.with_options(queue=queue), (key, content), {})

    try:
        async with Bridge(broker_url=BROKERS[broker], result_backend=RESULT_BACKEND) as bridge:
            older = await save(bridge, '{"rev": 1}', 1)
            assert await anyio.to_thread.run_sync(hold.upload_seen.wait, 30)
            # The first worker holds the older save (its one slot); the newer one goes
            # to a second worker, straight to S3.
            await anyio.to_thread.run_sync(
                lambda: start_pusher(broker, queue=queue, PUSHER_CONCURRENCY="1", **DELIVERY)
            )
            newer = await (await save(bridge, '{"rev": 2}', 2)).result(timeout=30)
            assert newer.written
            doomed.kill()
            hold.close()  # the dead worker's held request never reaches S3
            late: Receipt = await older.result(timeout=60)
    finally:
        hold.close()
    content, metadata = await anyio.to_thread.run_sync(_stored, s3, bucket, key)
    if ordered:
        assert content == b'{"rev": 2}'
        assert metadata == {"pusher-revision": "2"}
        assert not late.written
        assert (late.etag, late.size) == (newer.etag, newer.size)
    else:  # the seed's contract: last delivery wins, the stale one
        assert content == b'{"rev": 1}'
        assert late.written


async def test_revisions_order_writes_whatever_order_calls_arrive_in(
    bridge: Bridge, pusher_worker: Worker, s3: Any, bucket: str
) -> None:
    stub = send_to_s3_v3.with_options(queue=pusher_worker.queue)
    key = f"ordered/{uuid.uuid4().hex}.json"

    async def save(revision: int) -> Receipt:
        content = f'{{"rev": {revision}}}'.encode()
        handle = await bridge.send(stub, (key, content), {"revision": revision})
        receipt: Receipt = await handle.result(timeout=30)
        return receipt

    assert (await save(3)).written
    assert not (await save(2)).written  # older: refused
    assert not (await save(3)).written  # the same revision again: a redelivery
    assert (await save(10)).written
    content, metadata = await anyio.to_thread.run_sync(_stored, s3, bucket, key)
    assert (content, metadata) == (b'{"rev": 10}', {"pusher-revision": "10"})


async def test_the_revision_metadata_name_is_reserved(bridge: Bridge) -> None:
    with pytest.raises(ArgumentError) as caught:
        await bridge.send(send_to_s3_v3, ("k.json", b"{}"), {"meta": {"Pusher-Revision": "9"}})
    assert "metadata 'Pusher-Revision' is reserved: pass revision= instead" in str(caught.value)
