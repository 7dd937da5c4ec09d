"""Side-by-side publish benchmark: ``python -m bench [--n 2000] [--brokers redis,amqp]``.

Measures, in one run and against the same brokers, how fast one process can hand
tasks to the broker:

- celerybridge ``delegate`` on the fast path (native asyncio Redis client) and on the
  kombu path (Celery's client in threads), one at a time and 50 in flight;
- Celery's own ``send_task`` (sync), the reference;
- the raw ceiling on Redis: redis-py asyncio ``LPUSH`` of the same bytes;
- event-loop lag p99 while 1,000 delegations are in flight;
- round trips against a real Celery worker (``tests.workers.bridge_worker``): p50/p99 one
  at a time, and throughput with 50 in flight, vs ``send_task().get()``.

Absolute numbers depend on the machine; compare the rows of one run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
import uuid
from contextlib import suppress
from pathlib import Path

import anyio
import kombu
from celery import Celery

from celerybridge import Bridge, BridgeSettings, remote_task
from celerybridge._transports._protocol import Origin, redis_payload, task_message
from celerybridge._transports.base import OutgoingMessage
from celerybridge._transports.kombu import close_celery_app
from tests._workers import Worker
from tests.workers import bindings

BROKERS = {
    "redis": os.environ.get("CELERYBRIDGE_TEST_REDIS_URL", "redis://127.0.0.1:6379/2"),
    "amqp": os.environ.get("CELERYBRIDGE_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//"),
}
RESULT_BACKEND = os.environ.get("CELERYBRIDGE_TEST_RESULT_BACKEND", "redis://127.0.0.1:6379/3")
QUEUE = f"cb-bench-{uuid.uuid4().hex[:8]}"
PAYLOAD = "x" * 1024


@remote_task(name="bench.echo", queue=QUEUE)
def echo(payload: str) -> str: ...


async def delegate_sequential(bridge: Bridge, n: int) -> float:
    started = time.perf_counter()
    for _ in range(n):
        await bridge.send(echo, (PAYLOAD,), {})
    return n / (time.perf_counter() - started)


async def delegate_concurrent(bridge: Bridge, n: int, width: int = 50) -> float:
    limiter = anyio.Semaphore(width)

    async def one() -> None:
        async with limiter:
            await bridge.send(echo, (PAYLOAD,), {})

    started = time.perf_counter()
    async with anyio.create_task_group() as group:
        for _ in range(n):
            group.start_soon(one)
    return n / (time.perf_counter() - started)


def celery_send_task(broker_url: str, n: int) -> float:
    app = Celery("bench", broker=broker_url, set_as_current=False)
    if broker_url.startswith("amqp"):
        app.conf.broker_transport_options = {"confirm_publish": True}
    app.send_task("bench.echo", args=(PAYLOAD,), queue=QUEUE)  # connect first
    started = time.perf_counter()
    for _ in range(n):
        app.send_task("bench.echo", args=(PAYLOAD,), queue=QUEUE, serializer="json")
    rate = n / (time.perf_counter() - started)
    app.close()
    return rate


async def loop_lag_p99(bridge: Bridge, in_flight: int = 1000) -> float:
    lags: list[float] = []
    done = anyio.Event()

    async def ticker() -> None:
        while not done.is_set():
            started = time.perf_counter()
            await anyio.sleep(0.001)
            lags.append(time.perf_counter() - started - 0.001)

    async with anyio.create_task_group() as group:
        group.start_soon(ticker)
        async with anyio.create_task_group() as senders:
            for _ in range(in_flight):
                senders.start_soon(bridge.send, echo, (PAYLOAD,), {})
        done.set()
    return statistics.quantiles(lags, n=100)[98] * 1e3


def delete_queue(broker_url: str, queue: str) -> None:
    """Remove the run's queue and exchange. Declared first: kombu's Redis transport only
    unbinds what this connection has declared (same as ``bench.pusher.delete_queue``)."""
    with suppress(Exception), kombu.Connection(broker_url) as connection:
        exchange = kombu.Exchange(queue, "direct")
        bound = kombu.Queue(queue, exchange, routing_key=queue)(connection.default_channel)
        bound.declare()
        bound.delete()
        bound.exchange.delete()


async def raw_lpush(broker_url: str, n: int) -> float:
    """The ceiling: redis-py asyncio LPUSH of a ready-made message of the same size."""
    import redis.asyncio

    message = OutgoingMessage(str(uuid.uuid4()), "bench.echo", QUEUE, (PAYLOAD,), {})
    payload = redis_payload(task_message(message, Origin()), QUEUE)
    client = redis.asyncio.Redis.from_url(broker_url)
    try:
        await client.lpush(QUEUE, payload)
        started = time.perf_counter()
        for _ in range(n):
            await client.lpush(QUEUE, payload)
        return n / (time.perf_counter() - started)
    finally:
        await client.aclose()


def percentiles(samples: list[float]) -> str:
    cuts = statistics.quantiles(samples, n=100)
    return f"p50 {cuts[49] * 1e3:.2f} ms, p99 {cuts[98] * 1e3:.2f} ms"


async def round_trips(bridge: Bridge, queue: str, n: int) -> list[float]:
    add = bindings.add.with_options(queue=queue)
    samples = []
    for i in range(n):
        started = time.perf_counter()
        await (await bridge.send(add, (i, 1), {})).result(timeout=30)
        samples.append(time.perf_counter() - started)
    return samples


async def round_trips_concurrent(bridge: Bridge, queue: str, n: int, width: int = 50) -> float:
    add = bindings.add.with_options(queue=queue)
    limiter = anyio.Semaphore(width)

    async def one(i: int) -> None:
        async with limiter:
            await (await bridge.send(add, (i, 1), {})).result(timeout=60)

    started = time.perf_counter()
    async with anyio.create_task_group() as group:
        for i in range(n):
            group.start_soon(one, i)
    return n / (time.perf_counter() - started)


def celery_round_trips(broker_url: str, queue: str, n: int) -> list[float]:
    app = Celery("bench-rt", broker=broker_url, backend=RESULT_BACKEND, set_as_current=False)
    if broker_url.startswith("amqp"):
        app.conf.broker_transport_options = {"confirm_publish": True}
    samples, backends = [], []
    for i in range(n + 1):
        started = time.perf_counter()
        result = app.send_task("calc.add", args=(i, 1), queue=queue, serializer="json")
        result.get(timeout=30)
        backends.append(result.backend)
        if i:  # the first one connects
            samples.append(time.perf_counter() - started)
    close_celery_app(app, *backends)
    return samples


async def run(brokers: list[str], n: int, rt: int) -> list[tuple[str, str, str]]:
    rows = []
    log_dir = Path(tempfile.mkdtemp(prefix="cb-bench-"))
    for name in brokers:
        url = BROKERS[name]
        paths = [("fast path", True), ("kombu path", False)] if name == "redis" else []
        paths = paths or [("kombu path", False)]
        for label, fast in paths:
            settings = BridgeSettings(broker_url=url, result_backend=RESULT_BACKEND, fast_path=fast)
            async with Bridge(settings) as bridge:
                await bridge.send(echo, (PAYLOAD,), {})  # connect first
                seq = await delegate_sequential(bridge, n)
                conc = await delegate_concurrent(bridge, n)
                lag = await loop_lag_p99(bridge)
            rows += [
                (name, f"celerybridge delegate ({label}), sequential", f"{seq:,.0f} msg/s"),
                (name, f"celerybridge delegate ({label}), 50 in flight", f"{conc:,.0f} msg/s"),
                (name, f"loop lag p99, 1,000 in flight ({label})", f"{lag:.2f} ms"),
            ]
        ref = await anyio.to_thread.run_sync(celery_send_task, url, n)
        rows.append((name, "Celery send_task (sync), sequential", f"{ref:,.0f} msg/s"))
        if name == "redis":
            raw = await raw_lpush(url, n)
            rows.append((name, "raw ceiling: redis.asyncio LPUSH, sequential", f"{raw:,.0f} msg/s"))
        delete_queue(url, QUEUE)
        worker = Worker("tests.workers.bridge_worker", url, RESULT_BACKEND, "threads", 8)
        worker.start(log_dir)
        try:
            for label, fast in paths:
                settings = BridgeSettings(
                    broker_url=url, result_backend=RESULT_BACKEND, fast_path=fast
                )
                async with Bridge(settings) as bridge:
                    await round_trips(bridge, worker.queue, 5)  # connect, warm up
                    samples = await round_trips(bridge, worker.queue, rt)
                    rate = await round_trips_concurrent(bridge, worker.queue, rt)
                rows += [
                    (name, f"round trip ({label}), sequential", percentiles(samples)),
                    (name, f"round trips ({label}), 50 in flight", f"{rate:,.0f} tasks/s"),
                ]
            samples = await anyio.to_thread.run_sync(celery_round_trips, url, worker.queue, rt)
            rows.append((name, "round trip send_task().get(), sequential", percentiles(samples)))
        finally:
            worker.stop()
        delete_queue(url, worker.queue)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="messages per measurement")
    parser.add_argument("--rt", type=int, default=300, help="round trips per measurement")
    parser.add_argument("--brokers", default="redis,amqp")
    args = parser.parse_args()
    rows = asyncio.run(run(args.brokers.split(","), args.n, args.rt))
    print(f"| broker | measurement ({args.n} x 1 KiB) | result |")
    print("|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
