"""Worker-side guarantees: resources closed at shutdown, JSON only, confirms on AMQP."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest
from celery import Celery

from celerybridge import Bridge, BridgeSettings, ConfigurationError, celery_app
from celerybridge._transports.kombu import client_app, close_celery_app

from .._brokers import BROKERS, RESULT_BACKEND, dead_letters
from .._workers import Worker
from ..workers import bindings

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("pool", ["prefork", "threads"])
async def test_worker_resources_are_closed_at_shutdown(
    broker: str, pool: str, tmp_path: Path
) -> None:
    marker = tmp_path / "closed.txt"
    worker = Worker("tests.workers.bridge_worker", BROKERS[broker], RESULT_BACKEND, pool, 1)
    worker.extra_env["CB_TEST_SHUTDOWN_MARKER"] = str(marker)
    await anyio.to_thread.run_sync(worker.start, tmp_path)
    try:
        async with Bridge(broker_url=BROKERS[broker], result_backend=RESULT_BACKEND) as bridge:
            stub = bindings.loop_identity.with_options(queue=worker.queue)
            outcome = await (await bridge.send(stub, (), {})).result(timeout=20)
    finally:
        worker.stop()
    assert worker.process is not None
    assert worker.process.returncode == 0, worker.log()
    assert marker.read_text() == f"closed pid={outcome['pid']} same_loop=True\n"


async def test_worker_refuses_pickle(bridge_worker: Worker, broker_url: str) -> None:
    app = Celery("pickler", broker=broker_url, backend=RESULT_BACKEND, set_as_current=False)
    app.conf.update(accept_content=["json", "pickle"], result_accept_content=["json", "pickle"])
    try:
        pickled = app.send_task(
            "calc.add", args=(1, 2), queue=bridge_worker.queue, serializer="pickle"
        )
        control = app.send_task("calc.add", args=(1, 2), queue=bridge_worker.queue)
        assert (await anyio.to_thread.run_sync(lambda: control.get(timeout=20)))["value"] == 3
        # The pickled message was ahead of the control one: never executed, dead-lettered.
        assert pickled.state == "FAILURE"
    finally:
        close_celery_app(app, control.backend, pickled.backend)
    assert (
        f"task {pickled.id} moved to {bridge_worker.queue}.dead: content type "
        "'application/x-python-serialize' refused" in bridge_worker.log()
    )
    dead = dead_letters(broker_url, bridge_worker.queue)  # consumed: nothing left behind
    assert pickled.id in [letter["id"] for letter in dead]


def test_amqp_publishes_with_publisher_confirms() -> None:
    app = client_app(BridgeSettings(broker_url=BROKERS["amqp"]), with_backend=False, main="t")
    with app.connection_for_write() as connection:
        channel = connection.default_channel
        # py-amqp swaps in the publish that waits for the broker's ack (basic.ack/nack).
        assert channel.basic_publish == channel.basic_publish_confirm
    app.close()


def test_a_worker_refuses_compression_its_intake_would_refuse() -> None:
    with pytest.raises(ConfigurationError) as raised:
        celery_app("compressing", task_compression="gzip")
    assert str(raised.value) == (
        "celery_app() does not support task_compression: workers accept uncompressed "
        "JSON messages only, and would dead-letter their own retries"
    )
