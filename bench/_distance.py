"""Publishing to a distant broker: bursts of delegations through a delay proxy.

For each broker, each added latency (``bench._proxy``) and each celerybridge path (fast,
kombu), ``BURST`` calls are started at once, after one untimed call that opens the
connections, and each ends accepted (the broker took it), timed out (``PublishTimeoutError``
after the bridge's ``publish_timeout``, which counts the wait for room in the publishing
window too) or failed otherwise. The rate is accepted calls per second of the whole burst. Once
the bridge is closed, the queue's length says how many messages really arrived: a publish
that timed out may still have reached the broker.

Only the broker is behind the proxy: fire-and-forget publishing does not touch the result
backend.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import kombu

from celerybridge import Bridge, PublishTimeoutError

from ._common import RESULT_BACKEND, delete_queue, echo, new_queue, payload
from ._proxy import broker_proxy

BURST = 1000
LATENCIES = (0.0, 2.0, 20.0, 100.0)
"""Added round-trip latencies (ms) when ``--broker-latency-ms`` is given without a list."""
PATHS = {"fast path": True, "kombu path": False}


@dataclass
class BurstRow:
    broker: str
    path: str
    latency_ms: float
    calls: int
    accepted: int
    timed_out: int
    failed: int
    seconds: float
    """From starting the calls to the last one's end."""
    landed: int | None
    """Messages of the burst in the queue afterwards; ``None``: could not be counted."""
    publish_timeout: float

    @property
    def rate(self) -> float:
        return self.accepted / self.seconds if self.seconds else 0.0


def queue_length(broker_url: str, queue: str) -> int | None:
    """Messages waiting in ``queue`` (a passive declare: RabbitMQ's count, Redis's LLEN)."""
    try:
        with kombu.Connection(broker_url) as connection:
            exchange = kombu.Exchange(queue, "direct")
            bound = kombu.Queue(queue, exchange, routing_key=queue)(connection.default_channel)
            return int(bound.queue_declare(passive=True).message_count)
    except Exception:
        return None


async def one_burst(
    broker: str, broker_url: str, latency_ms: float, path: str, calls: int
) -> BurstRow:
    queue = new_queue(f"distance-{broker}-{path.split()[0]}-{latency_ms:g}")
    stub = echo.with_options(queue=queue)
    body = payload(1024)
    outcomes: list[str] = []
    try:
        with broker_proxy(broker_url, latency_ms) as url:
            async with Bridge(
                broker_url=url, result_backend=RESULT_BACKEND, fast_path=PATHS[path]
            ) as bridge:
                timeout = bridge.settings.publish_timeout
                await bridge.send(stub, (body,), {})  # connects, declares: untimed

                async def call() -> None:
                    try:
                        await bridge.send(stub, (body,), {})
                        outcomes.append("accepted")
                    except PublishTimeoutError:
                        outcomes.append("timed out")
                    except Exception:
                        outcomes.append("failed")

                started = time.perf_counter()
                await asyncio.gather(*(call() for _ in range(calls)))
                seconds = time.perf_counter() - started
        in_queue = queue_length(broker_url, queue)
    finally:
        delete_queue(broker_url, queue)
    return BurstRow(
        broker,
        path,
        latency_ms,
        calls,
        outcomes.count("accepted"),
        outcomes.count("timed out"),
        outcomes.count("failed"),
        seconds,
        None if in_queue is None else in_queue - 1,  # the untimed first call
        timeout,
    )


async def distance_rows(
    brokers: dict[str, str], latencies: list[float], calls: int = BURST
) -> list[BurstRow]:
    """A burst per broker, latency and path (``brokers``: name to URL)."""
    rows = []
    for broker, url in brokers.items():
        for latency in latencies:
            for path in PATHS:
                row = await one_burst(broker, url, latency, path, calls)
                print(
                    f"  {broker} +{latency:g} ms, {path}: {row.accepted}/{calls} accepted "
                    f"in {row.seconds:.1f} s ({row.rate:,.0f}/s)",
                    flush=True,
                )
                rows.append(row)
    return rows


def print_distance_table(rows: list[BurstRow]) -> None:
    if not rows:
        return
    timeout = rows[0].publish_timeout
    print(
        f"\n| broker | added latency | path | accepted/s | accepted within {timeout:g} s "
        "| timed out | failed | burst took | in the queue after |"
    )
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        landed = "n/a" if r.landed is None else f"{r.landed:,}"
        print(
            f"| {r.broker} | {r.latency_ms:g} ms | {r.path} | {r.rate:,.0f} "
            f"| {r.accepted:,}/{r.calls:,} | {r.timed_out:,} | {r.failed:,} "
            f"| {r.seconds:.2f} s | {landed} |"
        )
