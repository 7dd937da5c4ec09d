"""Measuring how late the event loop runs while work is in flight."""

from __future__ import annotations

import time

import anyio


async def ticker(lags: list[tuple[float, float]], stop: anyio.Event) -> None:
    """Record (when, how late) for 1 ms sleeps until ``stop``."""
    interval = 0.001
    while not stop.is_set():
        started = time.perf_counter()
        await anyio.sleep(interval)
        lags.append((started, time.perf_counter() - started - interval))
