"""A flood: thousands of delegations from one process while the pusher is stopped, then started.

Phase 1 publishes every call (``scale.flood_width`` in flight) to a queue nobody
consumes, and measures the caller: the first half for speed (publish rate, event-loop
lag), the second half for memory (tracemalloc, which slows every allocation about
threefold and so would distort the lag). Phase 2 starts the pusher and awaits every
handle: each task runs, each object lands, no result subscription stays behind and
the memory the calls took is given back.
"""

from __future__ import annotations

import gc
import json
import time
import tracemalloc
import uuid
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import anyio
import psutil
import pytest
import redis
from pydantic import TypeAdapter

from celerybridge import Bridge, ResultTimeoutError, TaskHandle
from celerybridge._transports.redis_results import RedisResultSource
from pusher.bindings import Receipt, send_to_s3

from .._brokers import BROKERS, RESULT_BACKEND, purge, queue_length
from .._loop_lag import ticker
from .._workers import Worker
from ._ledger import Ledger, content_for
from .conftest import CountLedger, Scale, outcome

pytestmark = pytest.mark.integration

WARM_UP = 32
"""Delegations sent before measuring: connections, the queue's declaration, first-use
imports and caches are paid once per bridge, not per delegation."""

RETAINED_PER_CALL = 1024
"""Bytes the caller may keep per published delegation while its handle is kept: a
handle and its task id come to about 200 (the flood measures ~0.2 KiB). A per-message
leak in a publisher (its encoded body, a future, a confirm) is at least the message's
size, over 1 KiB here."""

IN_FLIGHT_PER_CALL = 16 * 1024
"""Bytes per delegation in flight at the peak, above what is retained: the encoded
message (~1.3 KiB), its batch entry or confirm future, the sender's frames (measured
~8 KiB). Divided by the width, not the count: the peak must not grow with the flood."""

RELEASED_FIXED = 512 * 1024
RELEASED_PER_CALL = 64
"""Bytes still held once every result was awaited and every handle dropped: the result
client's connection pool grows while 500 results are awaited (a fixed cost), but
nothing per task may stay behind (a waiter, a channel, a decoded meta)."""

# Loop lag: a 1 ms ticker's overshoot while the first half is published. The loop's own
# work comes in short steps: validating a call, encoding one of at most 32 messages at a
# time, resuming the senders of an acknowledged batch; the longest step is the flood's
# start, 500 senders validating their first call in one iteration (~30 ms here). A
# blocking call on the loop (a connect, a publish or a confirm wait) would add the
# broker's round trip to every step, and a pause that grows with the pending handles
# would grow with the flood; both show in p99 and max. Time spent in CPython's garbage
# collector is taken out: a full collection walks every object of the test process
# (pytest, boto3, Celery: 20-100 ms here, reported), whatever the library does. Measured
# without it, p99 4-30 ms and max 20-55 ms (in CI the first half lasts a fraction of a
# second and its p99 is close to its max); the bounds leave a margin for this shared
# 2-core machine, where the OS alone pauses a process for tens of ms now and then.
LAG_P99 = 0.1
LAG_MAX = 0.25


async def _in_lanes(
    width: int, work: Callable[[Iterator[int]], Coroutine[Any, Any, None]], todo: range
) -> None:
    """Run ``work`` in ``width`` concurrent lanes that share the numbers in ``todo``."""
    numbers = iter(todo)
    async with anyio.create_task_group() as lanes:
        for _ in range(width):
            lanes.start_soon(work, numbers)


class _Collections:
    """The garbage collector's runs while in the ``with`` block, as (start, end) times."""

    def __init__(self) -> None:
        self.spans: list[tuple[float, float]] = []
        self._start = 0.0

    def __enter__(self) -> _Collections:
        gc.callbacks.append(self._record)
        return self

    def __exit__(self, *exc_info: object) -> None:
        gc.callbacks.remove(self._record)

    def _record(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.spans.append((self._start, time.perf_counter()))

    def longest(self) -> float:
        return max((end - start for start, end in self.spans), default=0.0)

    def within(self, start: float, end: float) -> float:
        """Seconds of collection between ``start`` and ``end``."""
        return sum(max(0.0, min(b, end) - max(a, start)) for a, b in self.spans)


def _fill_string_cache() -> None:
    """Fill pydantic-core's process-wide cache of strings read from JSON.

    Every result is decoded from JSON, and pydantic-core keeps the short strings it
    reads (the receipt's key, etag, checksum) in a cache of 16,384 slots, some 1.5 MiB
    once full. Bounded, but it would be counted as kept per result until then: filled
    beforehand, a new string only takes the place of an old one.
    """
    strings = json.dumps([f"{n:048d}" for n in range(100_000)])
    TypeAdapter(list[str]).validate_json(strings)


def _subscribers(channels: list[bytes]) -> int:
    """Subscribers, on the result backend's Redis, to any of ``channels``."""
    with redis.Redis.from_url(RESULT_BACKEND) as client:
        counts: list[tuple[bytes, int]] = client.pubsub_numsub(*channels)
    return sum(n for _, n in counts)


async def test_a_flood_published_while_the_pusher_is_stopped_is_all_executed(
    start_ledger_pusher: Callable[..., Worker],
    broker: str,
    ledger: Ledger,
    scale: Scale,
    count_ledger: CountLedger,
) -> None:
    queue = f"cb-faults-flood-{uuid.uuid4().hex[:6]}"
    stub = send_to_s3.with_options(queue=queue)
    count, width = scale.flood, scale.flood_width
    half = WARM_UP + (count - WARM_UP) // 2
    keys = [f"{queue}/{n:06d}.json" for n in range(count)]
    handles: list[TaskHandle[Receipt] | None] = [None] * count
    outcomes: list[tuple[str, str, str, str]] = []

    async def publish(numbers: Iterator[int]) -> None:
        for n in numbers:
            handles[n] = await bridge.send(stub, (keys[n], content_for(keys[n], n)), {})

    async def await_result(numbers: Iterator[int]) -> None:
        for n in numbers:
            handle, content = handles[n], content_for(keys[n], n)
            assert handle is not None
            result = handle.result(timeout=120)
            outcomes.append((keys[n], content, *await outcome(result, keys[n], content)))

    try:
        async with Bridge(broker_url=BROKERS[broker], result_backend=RESULT_BACKEND) as bridge:
            # -- phase 1: publish all of them, no worker running ------------------------------
            await publish(iter(range(WARM_UP)))
            first = handles[0]
            assert first is not None
            assert not await first.done()  # the result client, connected
            with pytest.raises(ResultTimeoutError):  # the subscriber, connected
                await first.result(timeout=0.05)
            rss_before = psutil.Process().memory_info().rss

            samples: list[tuple[float, float]] = []
            stop = anyio.Event()
            with _Collections() as collections:
                async with anyio.create_task_group() as group:
                    group.start_soon(ticker, samples, stop)
                    await anyio.sleep(0.05)
                    started = time.perf_counter()
                    await _in_lanes(width, publish, range(WARM_UP, half))
                    elapsed = time.perf_counter() - started
                    stop.set()
                # Before tracemalloc, whose own tables would count.
                rss_after = psutil.Process().memory_info().rss
            lags = sorted(
                lag - collections.within(when, when + 0.001 + lag)
                for when, lag in samples
                if when >= started
            )
            p50, p99 = lags[len(lags) // 2], lags[int(len(lags) * 0.99)]
            raw_max = max(lag for when, lag in samples if when >= started)
            del samples

            tracemalloc.start()
            _fill_string_cache()
            gc.collect()
            baseline = tracemalloc.get_traced_memory()[0]
            tracemalloc.reset_peak()
            await _in_lanes(width, publish, range(half, count))
            gc.collect()
            current, peak = tracemalloc.get_traced_memory()
            retained = (current - baseline) / (count - half)
            in_flight = (peak - current) / width

            waiting = await anyio.to_thread.run_sync(queue_length, BROKERS[broker], queue)
            print(
                f"\n[{broker}] flood of {count} ({width} in flight): {half - WARM_UP} at "
                f"{(half - WARM_UP) / elapsed:.0f} msg/s, loop lag p50 {p50 * 1e3:.1f} ms, "
                f"p99 {p99 * 1e3:.1f} ms, max {lags[-1] * 1e3:.1f} ms ({len(lags)} ticks; with GC "
                f"{raw_max * 1e3:.1f} ms, longest GC {collections.longest() * 1e3:.1f} ms), RSS "
                f"{(rss_after - rss_before) / 2**20:+.1f} MiB; "
                f"{count - half} traced: kept {retained:.0f} B/call, peak "
                f"{(peak - baseline) / 2**20:.1f} MiB ({in_flight / 1024:.1f} KiB per call in "
                f"flight); {waiting} queued"
            )
            assert waiting == count
            assert retained < RETAINED_PER_CALL
            assert in_flight < IN_FLIGHT_PER_CALL
            assert p99 < LAG_P99
            assert lags[-1] < LAG_MAX

            # -- phase 2: start the pusher, await every handle --------------------------------
            await anyio.to_thread.run_sync(start_ledger_pusher, broker, queue)
            started = time.perf_counter()
            await _in_lanes(width, await_result, range(count))
            drained = time.perf_counter() - started

            # Every wait subscribed to its task's channel; none may stay subscribed.
            results = bridge._results
            assert isinstance(results, RedisResultSource)
            assert (results.waiting, results.channels) == (0, 0)
            channels = [f"celery-task-meta-{h.id}".encode() for h in handles if h is not None]
            with anyio.fail_after(10):
                # The unsubscriptions go out in the background: nothing to wait on but Redis.
                while await anyio.to_thread.run_sync(_subscribers, channels):  # noqa: ASYNC110
                    await anyio.sleep(0.1)
            await anyio.to_thread.run_sync(ledger.calls, outcomes)
            del channels, outcomes[:]
            handles.clear()
            gc.collect()
            released = tracemalloc.get_traced_memory()[0] - baseline
            print(
                f"[{broker}] drained {count} in {drained:.1f} s ({count / drained:.0f} tasks/s); "
                f"then kept {released / 1024:.0f} KiB ({released / count:.0f} B/call)"
            )
            assert released < RELEASED_FIXED + RELEASED_PER_CALL * count
    finally:
        tracemalloc.stop()
        await anyio.to_thread.run_sync(purge, BROKERS[broker], queue)

    tally = await count_ledger("flood, worker stopped")
    assert (tally.calls, tally.ok, tally.landed) == (count, count, count), tally
