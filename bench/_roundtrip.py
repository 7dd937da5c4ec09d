"""Round trips against a real Celery worker: delegate, then await the result.

One ``bench.echo_worker`` process per broker (threads pool). Its queue is filled before
it starts, so the first measurement is how fast it drains a backlog: the ceiling for any
client's round trips. Then celerybridge, ``send_task().get()`` and the same in threads
take turns against it. Last, the same drain on the other pools: prefork, and
``celerybridge.AsyncioPool`` with the echo as an ``async def`` (its coroutine path).
"""

from __future__ import annotations

import json
import time
from datetime import datetime
from functools import partial
from typing import Any

import anyio
import anyio.to_thread
import redis.asyncio
from celery import Celery

from celerybridge import Bridge
from celerybridge._transports.kombu import close_celery_app
from tests._workers import Worker

from ._common import RESULT_BACKEND, WIDTH, Row, delete_queue, echo, log_dir, payload, quantile
from ._publish import REPEATS, path_label

SECTION = "round trip"
DRAIN = "worker drain rate (pre-filled queue)"
GET = "send_task().get()"
GET_THREADS = f"send_task().get() in anyio.to_thread, {WIDTH} in flight"
WORKER_POOL, WORKER_CONCURRENCY = "threads", 8
# The other pools drained: (label, -P, -c, environment). Celery's -P names a pool class
# only as "custom", given in CELERY_CUSTOM_WORKER_POOL.
OTHER_POOLS = (
    ("prefork", "prefork", 2, {}),
    (
        "celerybridge.AsyncioPool, async echo",
        "custom",
        100,
        {"CELERY_CUSTOM_WORKER_POOL": "celerybridge:AsyncioPool", "BENCH_ASYNC_ECHO": "1"},
    ),
)
TIMEOUT = 60.0


async def drain_rate(bridge: Bridge, worker: Worker, n: int) -> float:
    """Fill the worker's queue with ``n`` calls, start it, and time how fast it empties it.

    The rate counts from the result stored after the first tenth to the last (Celery's
    ``date_done``), so the worker's start-up and warm-up are not in it. Meanwhile this
    process only looks, every 0.1 s, whether all results are there: the worker has the
    machine to itself, as a ceiling should.
    """
    stub = echo.with_options(queue=worker.queue)
    body = payload(1024)
    handles = [await bridge.send(stub, (body,), {}) for _ in range(n)]
    keys = [f"celery-task-meta-{h.id}" for h in handles]
    client = redis.asyncio.Redis.from_url(RESULT_BACKEND)
    try:
        await anyio.to_thread.run_sync(partial(worker.start, log_dir()))
        for _ in range(int(TIMEOUT / 0.1)):
            if await client.exists(*keys) == n:
                break
            await anyio.sleep(0.1)
        else:
            raise TimeoutError(f"the worker did not drain {n} calls in {TIMEOUT:g} s")
        metas = await client.mget(keys)
    finally:
        await client.aclose()
    done = sorted(datetime.fromisoformat(json.loads(meta or "")["date_done"]) for meta in metas)
    first = n // 10
    return (n - 1 - first) / (done[-1] - done[first]).total_seconds()


async def bridge_round_trips(bridge: Bridge, queue: str, n: int) -> list[float]:
    stub = echo.with_options(queue=queue)
    body = payload(1024)
    samples = []
    for _ in range(n):
        started = time.perf_counter()
        await (await bridge.send(stub, (body,), {})).result(timeout=TIMEOUT)
        samples.append(time.perf_counter() - started)
    return samples


async def bridge_in_flight(bridge: Bridge, queue: str, n: int) -> float:
    """Round trips per second with ``WIDTH`` in flight."""
    stub = echo.with_options(queue=queue)
    body = payload(1024)
    calls = iter(range(n))

    async def lane() -> None:
        for _ in calls:
            await (await bridge.send(stub, (body,), {})).result(timeout=TIMEOUT)

    started = time.perf_counter()
    async with anyio.create_task_group() as group:
        for _ in range(WIDTH):
            group.start_soon(lane)
    return n / (time.perf_counter() - started)


def celery_round_trip(app: Celery, queue: str, body: str, backends: list[Any]) -> float:
    """One ``send_task().get()``, blocking; seconds. Records the thread's backend."""
    started = time.perf_counter()
    result = app.send_task("bench.echo", args=(body,), queue=queue, serializer="json")
    result.get(timeout=TIMEOUT)
    backends.append(result.backend)
    return time.perf_counter() - started


def celery_round_trips(app: Celery, queue: str, n: int, backends: list[Any]) -> list[float]:
    body = payload(1024)
    return [celery_round_trip(app, queue, body, backends) for _ in range(n)]


async def celery_in_threads(app: Celery, queue: str, n: int, backends: list[Any]) -> float:
    """``send_task().get()`` in ``anyio.to_thread``, ``WIDTH`` threads at a time; calls/s."""
    limiter = anyio.CapacityLimiter(WIDTH)
    body = payload(1024)
    calls = iter(range(n))

    async def lane() -> None:
        for _ in calls:
            await anyio.to_thread.run_sync(
                celery_round_trip, app, queue, body, backends, limiter=limiter
            )

    started = time.perf_counter()
    async with anyio.create_task_group() as group:
        for _ in range(WIDTH):
            group.start_soon(lane)
    return n / (time.perf_counter() - started)


def latency_rows(broker: str, client: str, samples: list[float]) -> list[Row]:
    note = f"{len(samples)} one at a time"
    return [
        Row(SECTION, broker, f"{client}, p50", quantile(samples, 0.5) * 1e3, "ms", note),
        Row(SECTION, broker, f"{client}, p99", quantile(samples, 0.99) * 1e3, "ms", note),
    ]


async def round_trip_rows(broker: str, broker_url: str, n: int, in_flight: int) -> list[Row]:
    """Drain rate, ``n`` round trips one at a time, and ``in_flight`` calls with ``WIDTH``
    in flight, for celerybridge (default path) and Celery's client.

    The machine is shared: the drain rate is the better of two (at the start and at the
    end, each on a freshly filled queue and a fresh worker), and the rates with ``WIDTH``
    in flight are the best of ``REPEATS`` rounds in which both clients take turns.
    """
    worker = Worker(
        "bench.echo_worker", broker_url, RESULT_BACKEND, WORKER_POOL, WORKER_CONCURRENCY
    )
    ours = path_label(broker)
    app = Celery("bench-rt", broker=broker_url, backend=RESULT_BACKEND, set_as_current=False)
    if broker_url.startswith("amqp"):
        app.conf.broker_transport_options = {"confirm_publish": True}
    backends: list[Any] = []
    rows: list[Row] = []
    others: list[Row] = []
    try:
        async with Bridge(broker_url=broker_url, result_backend=RESULT_BACKEND) as bridge:
            drains = [await drain_rate(bridge, worker, in_flight)]
            await bridge_round_trips(bridge, worker.queue, 5)  # warm-up
            rows += latency_rows(broker, ours, await bridge_round_trips(bridge, worker.queue, n))
            run = partial(celery_round_trips, app, worker.queue)
            await anyio.to_thread.run_sync(run, 5, backends)  # warm-up
            rows += latency_rows(broker, GET, await anyio.to_thread.run_sync(run, n, backends))
            rates: dict[str, list[float]] = {ours: [], GET_THREADS: []}
            for _ in range(REPEATS):
                rates[ours].append(await bridge_in_flight(bridge, worker.queue, in_flight))
                threads = await celery_in_threads(app, worker.queue, in_flight, backends)
                rates[GET_THREADS].append(threads)
            await anyio.to_thread.run_sync(worker.stop)
            drains.append(await drain_rate(bridge, worker, in_flight))
            for label, pool, concurrency, env in OTHER_POOLS:
                other = Worker("bench.echo_worker", broker_url, RESULT_BACKEND, pool, concurrency)
                other.extra_env.update(env)
                try:
                    rate = await drain_rate(bridge, other, in_flight)
                finally:
                    await anyio.to_thread.run_sync(other.stop)
                    delete_queue(broker_url, other.queue)
                note = f"{in_flight} queued, {label} x{concurrency}, once"
                others.append(Row(SECTION, broker, f"{DRAIN}, {label}", rate, "tasks/s", note))
        note = f"{in_flight} queued, {WORKER_POOL} pool x{WORKER_CONCURRENCY}, best of 2"
        rows[0:0] = [Row(SECTION, broker, DRAIN, max(drains), "tasks/s", note), *others]
        note = f"{in_flight} calls, best of {REPEATS}"
        rows += [
            Row(SECTION, broker, f"{ours}, {WIDTH} in flight", max(rates[ours]), "tasks/s", note),
            Row(SECTION, broker, GET_THREADS, max(rates[GET_THREADS]), "tasks/s", note),
        ]
    finally:
        await anyio.to_thread.run_sync(close_celery_app, app, *backends)
        worker.stop()
        delete_queue(broker_url, worker.queue)
    return rows
