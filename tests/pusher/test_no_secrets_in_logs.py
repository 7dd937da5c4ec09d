"""Credentials reach the pusher only through the environment and never show in its logs."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from urllib.parse import urlsplit

import pytest

from celerybridge import Bridge, RemoteTaskError
from pusher.bindings import send_to_s3

from .._brokers import BROKERS, RESULT_BACKEND
from .._workers import Worker

pytestmark = pytest.mark.integration


async def test_worker_logs_show_no_credentials(
    start_pusher: Callable[..., Worker], broker: str
) -> None:
    secret = f"aws-secret-{uuid.uuid4().hex}"  # moto takes any secret key
    worker = start_pusher(
        broker,
        queue=f"cb-pusher-secrets-{uuid.uuid4().hex[:6]}",
        AWS_SECRET_ACCESS_KEY=secret,
        PUSHER_ALLOWED_PREFIXES="ok/",
    )
    stub = send_to_s3.with_options(queue=worker.queue)
    async with Bridge(broker_url=BROKERS[broker], result_backend=RESULT_BACKEND) as bridge:
        await (await bridge.send(stub, ("ok/a.json", "{}"), {})).result(timeout=30)
        with pytest.raises(RemoteTaskError):  # a failure is logged with its traceback
            await (await bridge.send(stub, ("other/a.json", "{}"), {})).result(timeout=30)
    log = worker.log()
    assert "Task pusher.send_to_s3[" in log  # the log is the real one, and says things
    assert secret not in log
    password = urlsplit(BROKERS[broker]).password
    if password:  # e.g. RabbitMQ's guest:guest
        assert f":{password}@" not in log
        assert ":**@" in log  # Celery's banner masks it
