"""Side-by-side publish benchmark: ``python -m bench [--n 2000] [--brokers redis,amqp]``.

Measures, in one run and against the same brokers, how fast one process can hand
tasks to the broker:

- celerybridge ``delegate``, one at a time and 50 in flight;
- Celery's own ``send_task`` (sync), the reference;
- event-loop lag p99 while 1,000 delegations are in flight.

Absolute numbers depend on the machine; compare the rows of one run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
import uuid
from contextlib import suppress

import anyio
import kombu
from celery import Celery

from celerybridge import Bridge, BridgeSettings, remote_task

BROKERS = {
    "redis": os.environ.get("CELERYBRIDGE_TEST_REDIS_URL", "redis://127.0.0.1:6379/2"),
    "amqp": os.environ.get("CELERYBRIDGE_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//"),
}
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


async def run(brokers: list[str], n: int) -> list[tuple[str, str, str]]:
    rows = []
    for name in brokers:
        url = BROKERS[name]
        async with Bridge(BridgeSettings(broker_url=url)) as bridge:
            await bridge.send(echo, (PAYLOAD,), {})  # connect first
            seq = await delegate_sequential(bridge, n)
            conc = await delegate_concurrent(bridge, n)
            ref = await anyio.to_thread.run_sync(celery_send_task, url, n)
            lag = await loop_lag_p99(bridge)
        delete_queue(url, QUEUE)
        rows += [
            (name, "celerybridge delegate, sequential", f"{seq:,.0f} msg/s"),
            (name, "celerybridge delegate, 50 in flight", f"{conc:,.0f} msg/s"),
            (name, "Celery send_task (sync), sequential", f"{ref:,.0f} msg/s"),
            (name, "loop lag p99, 1,000 in flight", f"{lag:.2f} ms"),
        ]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="messages per measurement")
    parser.add_argument("--brokers", default="redis,amqp")
    args = parser.parse_args()
    rows = asyncio.run(run(args.brokers.split(","), args.n))
    print(f"| broker | measurement ({args.n} x 1 KiB) | result |")
    print("|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
