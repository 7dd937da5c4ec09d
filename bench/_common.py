"""What every part of ``python -m bench`` shares: brokers, the task, rows, timing helpers."""

from __future__ import annotations

import os
import socket
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from contextlib import suppress
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from tempfile import mkdtemp
from typing import Any

import anyio
import kombu

from celerybridge import remote_task
from tests._loop_lag import burst

ROOT = Path(__file__).resolve().parent.parent
# The same variables as the integration tests, so a bench can be pointed at its own
# Redis databases and RabbitMQ vhost.
BROKERS = {
    "redis": os.environ.get("CELERYBRIDGE_TEST_REDIS_URL", "redis://127.0.0.1:6379/2"),
    "amqp": os.environ.get("CELERYBRIDGE_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//"),
}
RESULT_BACKEND = os.environ.get("CELERYBRIDGE_TEST_RESULT_BACKEND", "redis://127.0.0.1:6379/3")
RUN = uuid.uuid4().hex[:8]
KIB = 1024
WIDTH = 50
"""Calls in flight in every "50 concurrent" / "50 in flight" measurement."""
Call = Callable[[], Coroutine[Any, Any, object]]
"""One call under test, ready to be started."""


@remote_task(name="bench.echo", queue=f"cb-bench-{RUN}")
def echo(payload: str) -> int:
    """Takes the payload; returns its length (so the result stays small)."""
    raise NotImplementedError  # a contract: bench.echo_worker implements it


@cache
def log_dir() -> Path:
    """Where this run's worker and uvicorn logs go (kept after the run, for a look)."""
    return Path(mkdtemp(prefix=f"cb-bench-{RUN}-"))


def payload(size: int) -> str:
    return "x" * size


def new_queue(what: str) -> str:
    return f"cb-bench-{RUN}-{what}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def delete_queue(broker_url: str, queue: str) -> None:
    """Remove a queue and its exchange. Declared first: kombu's Redis transport only
    unbinds what this connection has declared."""
    with suppress(Exception), kombu.Connection(broker_url) as connection:
        exchange = kombu.Exchange(queue, "direct")
        bound = kombu.Queue(queue, exchange, routing_key=queue)(connection.default_channel)
        bound.declare()
        bound.delete()
        bound.exchange.delete()


@dataclass
class Row:
    """One line of the table: a value and, for rates, the unit it is in."""

    section: str
    broker: str
    client: str
    value: float | None
    """``None``: not measured (the tool is not installed, or does not apply)."""
    unit: str
    note: str = ""

    def shown(self) -> str:
        if self.value is None:
            return "n/a"
        if self.unit == "ms":
            return f"{self.value:.2f} ms"
        if self.unit == "MiB":
            return f"{self.value:,.1f} MiB"
        return f"{self.value:,.0f} {self.unit}"


def quantile(samples: list[float], q: float) -> float:
    """The ``q`` quantile (0 < q < 1) of ``samples``, inclusive method."""
    return statistics.quantiles(samples, n=1000, method="inclusive")[round(q * 1000) - 1]


async def rate_sequential(n: int, one: Callable[[], Awaitable[object]]) -> float:
    """Calls per second of ``one``, awaited one after the other."""
    started = time.perf_counter()
    for _ in range(n):
        await one()
    return n / (time.perf_counter() - started)


async def rate_concurrent(n: int, one: Callable[[], Awaitable[object]], width: int) -> float:
    """Calls per second of ``one`` with ``width`` in flight: ``width`` lanes share ``n``."""
    calls = iter(range(n))

    async def lane() -> None:
        for _ in calls:
            await one()

    started = time.perf_counter()
    async with anyio.create_task_group() as group:
        for _ in range(width):
            group.start_soon(lane)
    return n / (time.perf_counter() - started)


@dataclass
class LoopLag:
    """How late the event loop ran while a burst of calls was in flight."""

    p99_ms: float
    """p99 of how late a 1 ms ticker woke up while every call was in flight."""
    samples: int
    start_ms: float
    """The loop iteration in which the calls took their first step (median of the bursts:
    the longest is whichever one a garbage collection of the whole process fell into)."""


async def loop_lag(calls: list[Call], rounds: int = 5) -> LoopLag:
    """Event-loop lag while ``calls`` are all in flight, and what starting them cost
    (``tests._loop_lag.burst``). The burst is repeated ``rounds`` times and the samples
    pooled: a fast burst lasts only a few dozen ticks."""
    lags: list[float] = []
    starts: list[float] = []
    for _ in range(rounds):
        measured = await burst(calls)
        lags += measured.lags
        starts.append(measured.start)
    p99 = max(lags, default=0.0) if len(lags) < 2 else quantile(lags, 0.99)
    return LoopLag(p99 * 1e3, len(lags), statistics.median(starts) * 1e3)
