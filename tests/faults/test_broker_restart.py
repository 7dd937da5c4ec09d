"""The broker crashes and comes back in the middle of a publish storm: nothing accepted is lost.

A private broker (``_private_brokers``: Redis with an fsynced append-only file,
RabbitMQ on its own mnesia folder) carries a storm of uploads from a caller to
pushers; half-way through it is SIGKILLed, stays down for 2 s and starts again on
the same data. Then:

- every call the caller saw accepted ran: ``ok`` calls landed (``lost`` = 0), and so
  did those whose publish was confirmed but whose result wait failed;
- a call whose publish failed (``DelegationError`` or ``PublishTimeoutError``, both
  ``unknown`` in the ledger) either landed (the broker had it after all) or never
  reached a worker, and nothing is left on the queue;
- no call took longer than its timeout (plus slack): failing fast or waiting out the
  outage within the publish timeout, never hanging;
- the pushers reconnected by themselves: a call made after the restart lands.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis

from celerybridge import Bridge
from pusher.bindings import send_to_s3

from .._brokers import RESULT_BACKEND, queue_length
from .._workers import Worker
from ._ledger import Ledger, read_object
from ._private_brokers import PrivateRabbit, PrivateRedis, PrivateServer
from .conftest import CountLedger, Progress, Scale, drive

pytestmark = pytest.mark.integration

PUBLISH_TIMEOUT = 5.0
RESULT_TIMEOUT = 30.0
SLACK = 2.0
"""What a call may take beyond its timeout: the event loop is shared by 32 lanes on a
busy 2-core machine."""
DOWN = 2.0
KOMBU_CRASH = "AttributeError(\"'NoneType' object has no attribute 'hostname'\")"
# Redis restores the tasks a worker held when its connection broke once the visibility
# timeout has passed (6 s, swept every 1.5 s); a task takes some 20 ms here.
DELIVERY = {"PUSHER_TASK_TIME_LIMIT": "5", "PUSHER_VISIBILITY_TIMEOUT": "6"}


@pytest.fixture
def private_broker(broker: str, tmp_path: Path) -> Iterator[PrivateServer]:
    """A broker of this test's own, killed at the end whatever happened."""
    server: PrivateServer = (
        PrivateRedis(tmp_path / "redis")
        if broker == "redis"
        else PrivateRabbit(tmp_path / "rabbit")
    )
    try:
        server.start()
        yield server
    finally:
        server.stop()


def _unacked(server: PrivateServer) -> int:
    """Tasks a Redis worker took and has not acknowledged (kombu's ``unacked`` hash)."""
    if not isinstance(server, PrivateRedis):
        return 0  # RabbitMQ keeps them with the consumer's channel; runs settle instead
    with redis.Redis.from_url(server.url) as client:
        return int(client.hlen("unacked"))


def _settle(server: PrivateServer, queue: str, ledger: Ledger, timeout: float = 60) -> None:
    """Wait until the queue is empty, nothing is unacknowledged and no task has started
    for 3 s: every message the broker kept has run."""
    deadline = time.monotonic() + timeout
    runs, quiet_since = -1, time.monotonic()
    while time.monotonic() < deadline:
        now_runs = len(ledger._rows("SELECT key FROM runs"))
        if now_runs != runs:
            runs, quiet_since = now_runs, time.monotonic()
        waiting = queue_length(server.url, queue) + _unacked(server)
        if waiting == 0 and time.monotonic() - quiet_since > 3:
            return
        time.sleep(0.5)
    raise AssertionError(f"{queue} did not settle within {timeout} s")


async def test_a_broker_restart_in_a_publish_storm_loses_nothing_accepted(
    private_broker: PrivateServer,
    start_ledger_pusher: Callable[..., Worker],
    broker: str,
    ledger: Ledger,
    scale: Scale,
    count_ledger: CountLedger,
    s3: Any,
    bucket: str,
) -> None:
    url = private_broker.url
    queue = f"cb-faults-restart-{uuid.uuid4().hex[:6]}"
    # One pusher: two would share one log file (it is named after the queue).
    pusher = [start_ledger_pusher(broker, queue, broker_url=url, **DELIVERY)]
    options = {"broker_url": url, "publish_timeout": PUBLISH_TIMEOUT}
    restarts = 1 if scale.uploads < 1000 else 3
    outage: list[float] = []

    def restart_broker() -> None:
        began = time.monotonic()
        private_broker.restart(DOWN)
        outage.append(time.monotonic() - began)
        worker = pusher[0]
        if broker == "redis" and "Unrecoverable error" in worker.log():
            # A known kombu bug, not fixed here: a Redis consumer that loses its
            # connection while it holds unacknowledged tasks crashes closing its
            # channel, and the worker exits. What it held stays in Redis's unacked
            # hash: the next pusher (as a supervisor would start) gets it back.
            assert worker.process is not None
            worker.process.wait(30)
            assert KOMBU_CRASH in worker.log(), worker.log()[-3000:]
            ledger.fault("pusher exited (kombu)", worker.process.pid)
            pusher[0] = start_ledger_pusher(broker, queue, broker_url=url, **DELIVERY)

    async def restart(progress: Progress) -> None:
        for n in range(restarts):
            await progress.reached(scale.uploads * (n + 1) // (restarts + 2))
            ledger.fault(f"{broker} restart")
            await anyio.to_thread.run_sync(restart_broker)

    timings = await drive(
        broker,
        queue,
        ledger,
        scale.uploads,
        prefix=queue,
        during=restart,
        result_timeout=RESULT_TIMEOUT,
        bridge_options=options,
    )

    # The pushers came back by themselves: a call made now lands.
    async with Bridge(broker_url=url, result_backend=RESULT_BACKEND) as bridge:
        key = f"{queue}/after-restart.json"
        handle = await bridge.send(send_to_s3.with_options(queue=queue), (key, "back"), {})
        assert (await handle.result(timeout=60)).key == key
    assert pusher[0].running, pusher[0].log()[-3000:]

    await anyio.to_thread.run_sync(_settle, private_broker, queue, ledger)
    tally = await count_ledger("broker restart")
    assert tally.faults[f"{broker} restart"] == restarts

    # Unknown outcomes: a publish that failed may still have reached the broker (it
    # then ran); a publish confirmed before its result wait failed must have run.
    ran = {key for (key,) in ledger._rows("SELECT DISTINCT key FROM runs")}
    unknown = ledger._rows("SELECT key, content, detail FROM calls WHERE outcome = 'unknown'")
    landed = {
        key for key, content, _ in unknown if read_object(s3, bucket, key) == content.encode()
    }
    waited_out = {key for key, _, detail in unknown if not detail.startswith(_PUBLISH_ERRORS)}
    stranded = waited_out - landed
    # Every accepted call had its result in time, on both brokers: the pusher took tasks
    # again at once (it used to stall for minutes after a RabbitMQ reconnection, see
    # pusher/celery.py), and on Redis no message is lost between the broker and the
    # worker (kombu's own transport lost one per restart: BRPOP's reply lost with the
    # connection; celerybridge's takes and records it in one step).
    assert not waited_out, [d for k, _, d in unknown if k in waited_out][:5]
    never_ran = {key for key, _, _ in unknown if key not in landed}
    assert not never_ran & ran, "a task ran, but its object is not in S3"
    kinds = sorted({detail.split(":")[0] for _, _, detail in unknown})
    print(
        f"\n{broker}: {tally.ok} ok, {len(unknown)} unknown ({', '.join(kinds) or '-'}): "
        f"{len(landed)} landed all the same, {len(never_ran)} never reached a worker "
        f"({len(stranded)} of them accepted by the broker); "
        f"outage {', '.join(f'{s:.1f}' for s in outage)} s (start "
        f"{private_broker.last_start_s:.1f} s)"
    )
    # Enough of the storm went through the broker, before and after the restart.
    assert tally.ok >= scale.uploads // 3, tally

    slowest_publish = max(publish for publish, _ in timings)
    slowest_result = max(result for _, result in timings)
    assert slowest_publish <= PUBLISH_TIMEOUT + SLACK, slowest_publish
    assert slowest_result <= RESULT_TIMEOUT + SLACK, slowest_result


# What drive() writes for a publish that failed (its detail starts with the type).
_PUBLISH_ERRORS = ("DelegationError", "PublishTimeoutError")
