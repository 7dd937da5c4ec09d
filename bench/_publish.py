"""Fire-and-forget publishing: how fast one asyncio process hands a task to the broker.

Every client sends the same call (``bench.echo`` with one string argument) to a queue
nobody consumes, once one at a time and once ``WIDTH`` in flight, after one untimed
call that opens its connections. The peers (FastStream, taskiq: ``bench._peers``) send
the same 1 KiB argument in their own message formats, to queues of their own.
"""

from __future__ import annotations

import importlib.util
import signal
import subprocess
import sys
import time
import tracemalloc
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import IO, Any

import anyio
import anyio.to_thread
import httpx
import redis.asyncio
from celery import Celery

from celerybridge import Bridge
from celerybridge._transports._protocol import Origin, redis_payload, task_message
from celerybridge._transports.base import OutgoingMessage

from ._common import (
    RESULT_BACKEND,
    ROOT,
    WIDTH,
    LoopLag,
    Row,
    delete_queue,
    echo,
    free_port,
    log_dir,
    loop_lag,
    new_queue,
    payload,
    rate_concurrent,
    rate_sequential,
)
from ._peers import FASTSTREAM, TASKIQ, faststream_publisher, taskiq_publisher

SECTION = "publish"
Rates = tuple[float | None, float | None]
"""(one at a time, ``WIDTH`` in flight) messages per second; ``None``: not measured."""
CELERYBRIDGE = "celerybridge"
SEND_TASK = "Celery send_task (sync)"
SEND_TASK_THREADS = "send_task in anyio.to_thread"
HTTP = "httpx POST to FastAPI (uvicorn)"
RAW = {"redis": "raw: redis.asyncio LPUSH", "amqp": "raw: aio-pika publish, confirms"}
REPEATS = 3
"""Publish rates are the best of this many rounds: the machine is shared and noisy."""
LAG = "loop lag"
LAG_BURSTS = 5
"""Loop lag pools the samples of this many bursts: one burst lasts a few dozen ticks."""


def path_label(broker: str, fast_path: bool = True) -> str:
    """The client column for celerybridge on ``broker``: which path its default takes."""
    # Both brokers have a native asyncio publisher (the fast path, on by default).
    return f"{CELERYBRIDGE} ({'fast path' if fast_path else 'kombu path'})"


def celery_client(broker_url: str) -> Celery:
    """A plain Celery client app, as a service using Celery directly would have one.

    On RabbitMQ with publisher confirms, as celerybridge publishes: ``send_task``
    returns once the broker has the message.
    """
    app = Celery("bench-client", broker=broker_url, set_as_current=False)
    if broker_url.startswith("amqp"):
        app.conf.broker_transport_options = {"confirm_publish": True}
    return app


def send_task(app: Celery, queue: str, body: str) -> None:
    app.send_task("bench.echo", args=(body,), queue=queue, serializer="json")


def send_task_loop(app: Celery, queue: str, body: str, n: int) -> float:
    """``n`` ``send_task`` calls back to back in this thread; calls/s."""
    send_task(app, queue, body)  # connects
    started = time.perf_counter()
    for _ in range(n):
        send_task(app, queue, body)
    return n / (time.perf_counter() - started)


async def measure(n: int, one: Callable[[], Awaitable[object]]) -> Rates:
    """(sequential, ``WIDTH`` in flight) calls/s of ``one``, after an untimed call."""
    await one()
    seq = await rate_sequential(n, one)
    return seq, await rate_concurrent(n, one, WIDTH)


def rows_for(broker: str, client: str, rates: Rates) -> list[Row]:
    seq, conc = rates
    note = f"best of {REPEATS}"
    return [
        Row(SECTION, broker, f"{client}, sequential", seq, "msg/s", note),
        Row(SECTION, broker, f"{client}, {WIDTH} concurrent", conc, "msg/s", note),
    ]


async def celerybridge_rates(
    broker: str, broker_url: str, queue: str, n: int, fast_path: bool
) -> dict[str, Rates]:
    stub = echo.with_options(queue=queue)
    body = payload(1024)
    async with Bridge(
        broker_url=broker_url, result_backend=RESULT_BACKEND, fast_path=fast_path
    ) as bridge:
        rates = await measure(n, partial(bridge.send, stub, (body,), {}))
    return {path_label(broker, fast_path): rates}


async def send_task_rates(broker_url: str, queue: str, n: int) -> dict[str, Rates]:
    app = celery_client(broker_url)
    body = payload(1024)
    try:
        sync = await anyio.to_thread.run_sync(send_task_loop, app, queue, body, n)
        limiter = anyio.CapacityLimiter(WIDTH)
        threads = await measure(
            n, partial(anyio.to_thread.run_sync, send_task, app, queue, body, limiter=limiter)
        )
    finally:
        app.close()
    # A sync call blocks the event loop: without threads there is no concurrency.
    return {SEND_TASK: (sync, None), SEND_TASK_THREADS: threads}


async def raw_rates(broker: str, broker_url: str, queue: str, n: int) -> dict[str, Rates]:
    async with raw_publisher(broker, broker_url, queue) as raw:
        return {RAW[broker]: await measure(n, raw) if raw else (None, None)}


async def peer_rates(broker: str, broker_url: str, n: int, peer: str) -> dict[str, Rates]:
    """FastStream's or taskiq's publish (``bench._peers``), to a queue of its own."""
    opener = faststream_publisher if peer == FASTSTREAM else taskiq_publisher
    slug = peer.split()[0].lower()
    async with opener(broker, broker_url, new_queue(f"publish-{broker}-{slug}")) as one:
        return {peer: await measure(n, one) if one else (None, None)}


def best(rounds: list[dict[str, Rates]]) -> dict[str, Rates]:
    """Each client's best sequential and best concurrent rate over the rounds."""
    merged: dict[str, Rates] = {}
    for found in rounds:
        for client, rates in found.items():
            old = merged.get(client, (None, None))
            merged[client] = (
                max((v for v in (old[0], rates[0]) if v is not None), default=None),
                max((v for v in (old[1], rates[1]) if v is not None), default=None),
            )
    return merged


def wire_message(queue: str, body: str) -> tuple[Any, bytes]:
    """The protocol v2 message celerybridge would send, and its Redis framing."""
    message = OutgoingMessage(str(uuid.uuid4()), "bench.echo", queue, (body,), {})
    wire = task_message(message, Origin())
    return wire, redis_payload(wire, queue)


@asynccontextmanager
async def raw_publisher(
    broker: str, broker_url: str, queue: str, *, connections: int | None = None
) -> AsyncIterator[Callable[[], Coroutine[Any, Any, object]] | None]:
    """The ceiling: one ready-made message of the same bytes, sent by the broker's plain
    asyncio client. Redis: redis-py ``LPUSH``, on its default connection pool, or on a
    blocking pool of ``connections`` (a thousand at once exceed the default pool's
    limit). RabbitMQ: aio-pika publish with confirms; ``None`` when aio-pika is not
    installed."""
    wire, framed = wire_message(queue, payload(1024))
    if broker == "redis":
        if connections is None:
            client = redis.asyncio.Redis.from_url(broker_url)
        else:
            pool = redis.asyncio.BlockingConnectionPool.from_url(
                broker_url, max_connections=connections
            )
            client = redis.asyncio.Redis.from_pool(pool)

        async def push() -> None:
            await client.lpush(queue, framed)

        try:
            yield push
        finally:
            await client.aclose()
        return
    if importlib.util.find_spec("aio_pika") is None:
        yield None
        return
    import aio_pika  # type: ignore[import-not-found, unused-ignore]

    connection = await aio_pika.connect(broker_url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        await channel.declare_queue(queue, durable=True)
        message = aio_pika.Message(
            wire.body,
            headers=wire.headers,
            content_type=wire.content_type,
            content_encoding=wire.content_encoding,
            correlation_id=wire.properties["correlation_id"],
            reply_to=wire.properties["reply_to"],
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
        yield partial(channel.default_exchange.publish, message, queue)
    finally:
        await connection.close()


def start_uvicorn(port: int, log: IO[bytes]) -> subprocess.Popen[bytes]:
    command = [
        sys.executable, "-m", "uvicorn", "bench.http_app:app",
        "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning", "--no-access-log",
    ]  # fmt: skip
    return subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)


@asynccontextmanager
async def http_endpoint() -> AsyncIterator[str]:
    """``bench.http_app`` under uvicorn in a subprocess on a free port; yields its URL."""
    port = free_port()
    log = (log_dir() / "uvicorn.log").open("wb")
    process = start_uvicorn(port, log)
    url = f"http://127.0.0.1:{port}/tasks"
    try:
        async with httpx.AsyncClient() as probe:
            deadline = time.monotonic() + 30
            while True:
                try:
                    await probe.post(url, json={})
                    break
                except httpx.TransportError:
                    if process.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"uvicorn did not start, see {log.name}") from None
                    await anyio.sleep(0.05)
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


async def http_rates(n: int) -> Rates:
    """httpx POSTs of the same call as JSON, over keep-alive connections; best of
    ``REPEATS`` against one server."""
    document = {"task": "bench.echo", "args": [payload(1024)], "kwargs": {}}
    limits = httpx.Limits(max_connections=WIDTH, max_keepalive_connections=WIDTH)
    async with http_endpoint() as url, httpx.AsyncClient(limits=limits) as client:

        async def post() -> None:
            response = await client.post(url, json=document)
            response.raise_for_status()

        return best([{HTTP: await measure(n, post)} for _ in range(REPEATS)])[HTTP]


async def publish_rows(broker: str, broker_url: str, n: int, http: Rates) -> list[Row]:
    """Every client's publish rates on one broker, best of ``REPEATS`` rounds in which the
    clients take turns (``http`` was measured once, for both brokers)."""
    queue = new_queue(f"publish-{broker}")
    measurers = [
        partial(celerybridge_rates, broker, broker_url, queue, n, True),
        partial(celerybridge_rates, broker, broker_url, queue, n, False),
        partial(peer_rates, broker, broker_url, n, FASTSTREAM),
        partial(peer_rates, broker, broker_url, n, TASKIQ),
        partial(send_task_rates, broker_url, queue, n),
        partial(raw_rates, broker, broker_url, queue, n),
    ]
    rounds = []
    try:
        for _ in range(REPEATS):
            for measurer in measurers:
                rounds.append(await measurer())
            delete_queue(broker_url, queue)  # a queue of millions would slow Redis down
    finally:
        delete_queue(broker_url, queue)
    merged = best(rounds)
    raw = merged.pop(RAW[broker])
    rows: list[Row] = []
    for client, rates in [*merged.items(), (HTTP, http), (RAW[broker], raw)]:
        rows += rows_for(broker, client, rates)
    return rows


async def loop_lag_rows(broker: str, broker_url: str, in_flight: int = 1000) -> list[Row]:
    """Event-loop lag while ``in_flight`` publishes run at once, and what starting them
    cost: celerybridge (default path), and the raw client as the floor of what the loop
    can do here."""
    queue = new_queue(f"lag-{broker}")
    stub = echo.with_options(queue=queue)
    body = payload(1024)
    found: dict[str, LoopLag | None] = {}
    try:
        async with Bridge(broker_url=broker_url, result_backend=RESULT_BACKEND) as bridge:
            await bridge.send(stub, (body,), {})  # connects
            send = partial(bridge.send, stub, (body,), {})
            found[path_label(broker)] = await loop_lag([send] * in_flight, LAG_BURSTS)
        async with raw_publisher(broker, broker_url, queue, connections=WIDTH) as raw:
            if raw is not None:
                await raw()  # connects
            found[RAW[broker]] = await loop_lag([raw] * in_flight, LAG_BURSTS) if raw else None
    finally:
        delete_queue(broker_url, queue)
    rows = []
    for client, lag in found.items():
        note = f"p99 of {lag.samples} ticks of a 1 ms ticker, {LAG_BURSTS} bursts" if lag else ""
        rows += [
            Row(LAG, broker, lag_label(client, in_flight), lag.p99_ms if lag else None, "ms", note),
            Row(
                LAG,
                broker,
                f"{client}, starting {in_flight:,} at once",
                lag.start_ms if lag else None,
                "ms",
                "one loop iteration: every call's first step, median of the bursts",
            ),
        ]
    return rows


def lag_label(client: str, in_flight: int = 1000) -> str:
    """The client column of the loop-lag row that issue 5's target reads."""
    return f"{client}, {in_flight:,} in flight"


# -- payload size -------------------------------------------------------------------------

SIZES = {"1 KiB": 1024, "64 KiB": 64 * 1024, "1 MiB": 1024**2, "16 MiB": 16 * 1024**2}


def count_for(size: int, n: int) -> int:
    """Fewer messages for bigger payloads: about 40 MiB per measurement, at least 4."""
    return max(4, min(n, (40 * 1024**2) // size))


async def peak_mib(publish: Callable[[], Awaitable[object]], times: int = 2) -> float:
    """Peak Python memory (tracemalloc) above the start while ``publish`` runs ``times``."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base, _ = tracemalloc.get_traced_memory()
        for _ in range(times):
            await publish()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return (peak - base) / 1024**2


@dataclass
class SizeRow:
    """Publish cost of one client at one payload size."""

    broker: str
    client: str
    size: int
    count: int
    rate: float
    """Messages per second, one at a time."""
    peak_mib: float
    """Peak traced Python memory while publishing, above what was allocated before."""


async def size_rows(broker: str, broker_url: str, n: int) -> list[SizeRow]:
    """Publish rate and peak memory by payload size: celerybridge vs ``send_task``."""
    queue = new_queue(f"size-{broker}")
    rows: list[SizeRow] = []
    app = celery_client(broker_url)
    try:
        async with Bridge(broker_url=broker_url, result_backend=RESULT_BACKEND) as bridge:
            for size in SIZES.values():
                body, count = payload(size), count_for(size, n)
                ours = partial(bridge.send, echo.with_options(queue=queue), (body,), {})
                theirs = partial(anyio.to_thread.run_sync, send_task, app, queue, body)
                for client, one in ((path_label(broker), ours), (SEND_TASK_THREADS, theirs)):
                    await one()
                    rate = await rate_sequential(count, one)
                    peak = await peak_mib(one)
                    rows.append(SizeRow(broker, client, size, count, rate, peak))
                    delete_queue(broker_url, queue)  # 16 MiB x 7 is enough on a shared broker
    finally:
        app.close()
        delete_queue(broker_url, queue)
    return rows
