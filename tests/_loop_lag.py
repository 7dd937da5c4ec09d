"""Measuring how late the event loop runs while work is in flight."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import anyio

INTERVAL = 0.001
"""The ticker's period, in seconds."""


async def ticker(lags: list[tuple[float, float]], stop: anyio.Event) -> None:
    """Record (when, how late) for 1 ms sleeps until ``stop``."""
    while not stop.is_set():
        started = time.perf_counter()
        await anyio.sleep(INTERVAL)
        lags.append((started, time.perf_counter() - started - INTERVAL))


@dataclass
class Burst:
    """How the loop fared while a burst of calls ran (seconds)."""

    lags: list[float]
    """How late each tick was that ran while every call was in flight."""
    start: float
    """The loop iteration in which all the calls took their first step."""
    elapsed: float
    """From starting the calls to the last one's end."""


async def burst(calls: Sequence[Callable[[], Awaitable[object]]]) -> Burst:
    """Start ``calls`` at once, with a ticker running, and measure the loop's lag.

    Started at once, the calls all take their first step (up to their first wait) in
    one iteration of the loop: that iteration is the cost of starting them, reported
    apart. From the next iteration on every call is in flight; only ticks that start
    after that and end before the last call finished count, so neither the start nor
    idle time before or after can dilute or inflate the lag.
    """
    samples: list[tuple[float, float]] = []
    stop = anyio.Event()
    pending = len(calls)
    flying = math.inf

    def all_in_flight() -> None:
        nonlocal flying
        flying = time.perf_counter()

    async def one(call: Callable[[], Awaitable[object]]) -> None:
        nonlocal pending
        pending -= 1
        if not pending:  # the last first step: the next iteration sees every call in flight
            asyncio.get_running_loop().call_soon(all_in_flight)
        await call()

    async with anyio.create_task_group() as outer:
        outer.start_soon(ticker, samples, stop)
        await anyio.sleep(10 * INTERVAL)
        async with anyio.create_task_group() as group:
            for call in calls:
                group.start_soon(one, call)
            begun = time.perf_counter()
        ended = time.perf_counter()
        stop.set()
    lags = [lag for when, lag in samples if when >= flying and when + INTERVAL + lag <= ended]
    return Burst(lags, flying - begun, ended - begun)
