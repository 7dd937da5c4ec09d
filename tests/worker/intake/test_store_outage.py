"""A worker with a signing key whose replay record (its Redis result backend) is down,
on a Redis broker that is up: good messages wait the outage out, they are not refused."""

from __future__ import annotations

import json
import time
from pathlib import Path

import anyio
import pytest
import redis

from celerybridge import Bridge

from ..._brokers import BROKERS, RESULT_BACKEND
from ..._workers import Worker
from ...faults._private_brokers import PrivateRedis
from ...workers import bindings
from .conftest import KEY

pytestmark = pytest.mark.integration
URL = BROKERS["redis"]


async def test_good_messages_wait_out_a_replay_record_outage(tmp_path: Path) -> None:
    """Each put-back while the record was down counted as a delivery: past
    CELERYBRIDGE_MAX_DELIVERIES (2 here, 10 by default: ~10 s) a good message was
    dead-lettered as ``deliveries``, "its worker died or lost the broker while it ran,
    every time". It must wait, held or queued, and run once the record is back."""
    store = PrivateRedis(tmp_path / "store")
    store.start()
    worker = Worker("tests.workers.bridge_worker", URL, store.url, pool="prefork")
    worker.extra_env.update(CELERYBRIDGE_SIGNING_KEY=KEY, CELERYBRIDGE_MAX_DELIVERIES="2")
    try:
        worker.start(tmp_path)
        store.stop()
        async with Bridge(broker_url=URL, result_backend=RESULT_BACKEND, signing_key=KEY) as bridge:
            handle = await bridge.send(bindings.add.with_options(queue=worker.queue), (2, 3), {})
        for _ in range(150):  # 30 s at most
            if worker.log().count("a message waits") >= 5:
                break
            await anyio.sleep(0.2)
        assert worker.log().count("a message waits") >= 5, worker.log()[-3000:]
        with redis.Redis.from_url(URL) as broker:
            assert broker.llen(f"{worker.queue}.dead") == 0, "a good message was dead-lettered"
        store.start()
        with redis.Redis.from_url(store.url) as backend:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                if backend.get(f"celery-task-meta-{handle.id}") is not None:
                    break
                await anyio.sleep(0.2)
            meta = backend.get(f"celery-task-meta-{handle.id}")
        assert meta is not None, worker.log()[-3000:]
        assert json.loads(meta)["status"] == "SUCCESS"
    finally:
        worker.stop()
        store.stop()
        with redis.Redis.from_url(URL) as broker:
            broker.delete(worker.queue, f"{worker.queue}.dead")
