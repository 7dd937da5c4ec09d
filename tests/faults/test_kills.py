"""SIGKILL of pusher workers and of pool children at random moments: nothing lost.

Redelivery comes from the broker: RabbitMQ requeues a dead consumer's unacknowledged
messages as its connection drops; Redis restores them once the visibility timeout
(small here) has passed.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import uuid
from collections.abc import Callable

import anyio
import psutil
import pytest

from .._workers import Worker
from ._ledger import Ledger, Tally
from ._s3_proxy import FaultProxy
from .conftest import CountLedger, Progress, Scale, drive

pytestmark = pytest.mark.integration

# A task runs for some 20 ms here: 5 s is plenty, and Redis redelivers the tasks of a
# killed worker about 6 s (+ a sweep of 1.5 s) after they were taken.
DELIVERY = {"PUSHER_TASK_TIME_LIMIT": "5", "PUSHER_VISIBILITY_TIMEOUT": "6"}


@pytest.fixture
def env(slow_s3: FaultProxy) -> dict[str, str]:
    return {"AWS_ENDPOINT_URL_S3": slow_s3.url, **DELIVERY}


def _kill_moments(scale: Scale, seed: int) -> list[int]:
    """After how many finished calls to strike: spread over the run, jittered."""
    rng = random.Random(seed)
    step = scale.uploads / (scale.kills + 1)
    jitter = step / 3
    return sorted(int(step * (i + 1) + rng.uniform(-jitter, jitter)) for i in range(scale.kills))


def _assert_all_ran(tally: Tally, seed: int) -> None:
    """Every call ran and landed, on both brokers: nothing vanished.

    kombu's own Redis transport took a message off the queue (``BRPOP``) and only then
    recorded it as unacknowledged, so a kill in between lost it (celery/celery#7950);
    workers built by ``celery_app`` take and record in one step
    (``celerybridge._worker.redis_transport``), and this suite allows no loss on Redis either.
    """
    assert tally.vanished == 0, (seed, tally.examples[:5])
    assert tally.ok == tally.landed == tally.calls, (seed, tally)


async def test_killing_whole_workers_loses_nothing(
    start_ledger_pusher: Callable[..., Worker],
    broker: str,
    env: dict[str, str],
    ledger: Ledger,
    scale: Scale,
    count_ledger: CountLedger,
) -> None:
    queue = f"cb-faults-kill-{uuid.uuid4().hex[:6]}"
    workers = [start_ledger_pusher(broker, queue, **env) for _ in range(2)]
    seed = random.randrange(2**32)
    rng = random.Random(seed)

    async def strike(progress: Progress) -> None:
        for moment in _kill_moments(scale, seed):
            await progress.reached(moment)
            victim = workers.pop(rng.randrange(len(workers)))
            assert victim.process is not None
            ledger.fault("worker SIGKILL", victim.process.pid)
            victim.kill()
            workers.append(
                await anyio.to_thread.run_sync(lambda: start_ledger_pusher(broker, queue, **env))
            )

    await drive(broker, queue, ledger, scale.uploads, prefix=queue, during=strike)
    tally = await count_ledger("SIGKILL worker", seed)
    assert tally.faults == {"worker SIGKILL": scale.kills}
    _assert_all_ran(tally, seed)
    assert tally.ok == scale.uploads, (seed, tally)


async def test_killing_pool_children_loses_nothing(
    start_ledger_pusher: Callable[..., Worker],
    broker: str,
    env: dict[str, str],
    ledger: Ledger,
    scale: Scale,
    count_ledger: CountLedger,
) -> None:
    queue = f"cb-faults-child-{uuid.uuid4().hex[:6]}"
    worker = start_ledger_pusher(broker, queue, pool="prefork", **env)
    assert worker.process is not None
    parent = worker.process.pid
    seed = random.randrange(2**32)
    rng = random.Random(seed)

    async def strike(progress: Progress) -> None:
        for moment in _kill_moments(scale, seed):
            await progress.reached(moment)
            with anyio.fail_after(30):  # the pool may be replacing the previous victim
                # Nothing to wait on: poll.
                while not (children := psutil.Process(parent).children()):  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
            victim = rng.choice(children).pid
            ledger.fault("pool child SIGKILL", victim)
            os.kill(victim, signal.SIGKILL)

    await drive(broker, queue, ledger, scale.uploads, prefix=queue, during=strike)
    tally = await count_ledger("SIGKILL pool child", seed)
    assert tally.faults == {"pool child SIGKILL": scale.kills}
    _assert_all_ran(tally, seed)
    assert (tally.ok, tally.landed) == (scale.uploads, scale.uploads), (seed, tally)
    assert "WorkerLostError" in worker.log()  # the pool saw its child die
