"""Replay refusal: a signed message runs once while its signature is valid."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import anyio
import kombu
import pytest
from celery import Celery
from kombu.message import Message

from celerybridge import Bridge, BridgeSettings
from celerybridge._signing import Signer
from celerybridge._worker.intake.consumer import Gate, StoreUnavailable
from celerybridge._worker.intake.replay import (
    REPLAYED,
    MemorySeen,
    RedisSeen,
    ReplayGuard,
    finished_in,
)

from ..._brokers import RESULT_BACKEND, dead_letters, publish_message
from ..._workers import Worker
from ...workers import bindings
from .conftest import KEY


@pytest.fixture(scope="module")
def results() -> Iterator[Celery]:
    """An app on the test result backend: where a worker reads whether a task finished."""
    app = Celery("replay-test", backend=RESULT_BACKEND, set_as_current=False)
    yield app
    app.close()


@pytest.fixture(params=["memory", "redis"])
def guard(request: pytest.FixtureRequest, results: Celery) -> ReplayGuard:
    store = MemorySeen() if request.param == "memory" else RedisSeen(RESULT_BACKEND)
    return ReplayGuard(store, window=60, finished=finished_in(results))


@pytest.mark.integration
def test_a_signature_passes_once(guard: ReplayGuard) -> None:
    signature, task_id = uuid.uuid4().hex, str(uuid.uuid4())
    assert guard.refusal(signature, redelivered=False, task_id=task_id) is None
    assert guard.refusal(signature, redelivered=False, task_id=task_id) == REPLAYED
    assert guard.refusal(uuid.uuid4().hex, redelivered=False, task_id=task_id) is None


@pytest.mark.integration
# Celery's Redis backend stores with SETEX, which redis-py deprecates.
@pytest.mark.filterwarnings("ignore:Call to deprecated setex:DeprecationWarning")
def test_a_redelivery_of_a_message_that_never_finished_passes(
    guard: ReplayGuard, results: Celery
) -> None:
    signature, task_id = uuid.uuid4().hex, str(uuid.uuid4())
    assert guard.refusal(signature, redelivered=False, task_id=task_id) is None
    # The worker died while the task ran: the broker hands the message out again.
    assert guard.refusal(signature, redelivered=True, task_id=task_id) is None
    results.backend.mark_as_retry(task_id, ValueError("again"))  # not finished yet
    assert guard.refusal(signature, redelivered=True, task_id=task_id) is None
    results.backend.mark_as_done(task_id, 42)
    # Once it ran, a copy is a replay, whatever it claims.
    assert guard.refusal(signature, redelivered=True, task_id=task_id) == REPLAYED
    assert guard.refusal(signature, redelivered=False, task_id=task_id) == REPLAYED


@pytest.mark.integration
def test_the_record_lives_as_long_as_the_window_and_the_clock_skew() -> None:
    store = RedisSeen(RESULT_BACKEND)
    guard = ReplayGuard(store, window=100, finished=lambda task_id: False)
    signature = uuid.uuid4().hex
    guard.refusal(signature, redelivered=False, task_id="t")
    ttl = store._client.pttl("celerybridge-seen-" + signature)
    assert 129_000 < ttl <= 130_000  # 100 s window + 30 s skew


def capture(broker_url: str, queue: str) -> tuple[dict[str, Any], bytes]:
    """The message waiting on ``queue``, as an eavesdropper on the broker would copy it."""
    with kombu.Connection(broker_url) as connection:
        channel = connection.default_channel
        message = channel.basic_get(queue, no_ack=True)
        assert message is not None
        channel.queue_delete(queue)
        body = message.body
        return dict(message.headers), body.encode() if isinstance(body, str) else body


@pytest.mark.integration
async def test_a_captured_signed_message_sent_again_is_refused_as_a_replay(
    settings: BridgeSettings, keyed_worker: Worker, broker_url: str
) -> None:
    keyed = BridgeSettings(**{**settings.model_dump(), "signing_key": KEY})
    nowhere = f"cb-capture-{uuid.uuid4().hex[:8]}"
    async with Bridge(keyed) as bridge:
        handle = await bridge.send(bindings.add.with_options(queue=nowhere), (20, 22), {})
        headers, body = await anyio.to_thread.run_sync(capture, broker_url, nowhere)

        for _ in range(2):  # the original, then the replay
            publish_message(broker_url, keyed_worker.queue, body, headers)
        assert (await handle.result(timeout=10)).value == 42
        [dead] = await anyio.to_thread.run_sync(dead_letters, broker_url, keyed_worker.queue)
        assert dead["id"] == handle.id
        assert dead["x-celerybridge-dead-kind"] == "replay"
        assert dead["x-celerybridge-dead-reason"] == REPLAYED
        # The replay did not overwrite the result of the copy that ran.
        assert (await bridge.handle(bindings.add, handle.id).result(timeout=5)).value == 42
    assert keyed_worker.log().count(f"calc.add[{handle.id}] succeeded") == 1


@pytest.mark.integration
async def test_a_forged_message_naming_a_task_id_does_not_fail_that_task(
    settings: BridgeSettings, keyed_worker: Worker, broker_url: str
) -> None:
    """Someone without the key sends a message with a waiting caller's task id."""
    keyed = BridgeSettings(**{**settings.model_dump(), "signing_key": KEY})
    async with Bridge(keyed) as bridge:
        sleep = bindings.sleep.with_options(queue=keyed_worker.queue)
        handle = await bridge.send(sleep, (1.0,), {})
        headers = {"lang": "py", "task": "calc.add", "id": handle.id, "root_id": handle.id}
        publish_message(broker_url, keyed_worker.queue, b"[[1, 2], {}, {}]", headers)
        assert await handle.result(timeout=10) == 1.0
        dead = await anyio.to_thread.run_sync(dead_letters, broker_url, keyed_worker.queue)
        assert [d["x-celerybridge-dead-kind"] for d in dead] == ["signature"]


class DownStore:
    """A replay record whose server does not answer."""

    def add(self, key: str, ttl: float) -> bool:
        raise ConnectionError("the record's server is down")


def test_a_message_waits_rather_than_being_refused_while_the_record_is_down() -> None:
    """Genuine signed traffic was dead-lettered as malformed while Redis was down."""
    signer = Signer(KEY, 300)
    payload = b'[[1, 2], {}, {"callbacks": null, "errbacks": null, "chain": null, "chord": null}]'
    headers = {"lang": "py", "task": "calc.add", "id": str(uuid.uuid4()), "retries": 0}
    headers.update(signer.headers(headers, payload))
    message = Message(
        body=payload,
        content_type="application/json",
        content_encoding="utf-8",
        headers=headers,
        properties={},
        delivery_info={"routing_key": "q"},
    )
    gate = Gate(
        signer,
        ReplayGuard(DownStore(), window=300, finished=lambda task_id: False),
        max_bytes=1 << 20,
    )
    with pytest.raises(StoreUnavailable, match="goes back to its queue"):
        gate.refusal(message)
    healthy = Gate(
        signer,
        ReplayGuard(MemorySeen(), window=300, finished=lambda task_id: False),
        max_bytes=1 << 20,
    )
    assert healthy.refusal(message) is None
