"""Fixtures of the fault suite: its scale, the ledger, pushers that write to it, the load.

The README's test command runs the short version; ``make faults`` sets
``CELERYBRIDGE_FAULTS=long`` for the long one and ``CELERYBRIDGE_FAULTS_REPORT`` to a
file that gets one JSON line per case (the table of docs/reliability.md).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest

from celerybridge import Bridge, CeleryBridgeError, RemoteTaskError
from pusher.bindings import Receipt, send_to_s3

from .. import _summary as summary
from .._brokers import BROKERS, RESULT_BACKEND
from .._workers import Worker, stop_all
from ..pusher._s3server import MotoServer
from ._ledger import Ledger, Tally, content_for
from ._s3_proxy import FaultProxy

LONG = os.environ.get("CELERYBRIDGE_FAULTS", "short") == "long"
CountLedger = Callable[..., Awaitable[Tally]]
"""The ``count_ledger`` fixture: ``await count_ledger(case, *context)``."""
# The ledger's table at the end of the run (tests/_summary.py).
LEDGER_SECTION = "fault suite ledger"
LEDGER_COLUMNS = (
    "case", "broker", "calls", "ok", "unknown", "landed", "lost", "unexpected", "vanished",
    "duplicated_runs", "faults", "redelivered", "redelivery_max_s",
)  # fmt: skip


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Fault cases get 5 minutes each (the suite's default is 2); ``make faults`` sets its
    own limit for the long run."""
    if LONG:
        return
    here = Path(__file__).parent
    for item in items:
        if here in item.path.parents:
            item.add_marker(pytest.mark.timeout(300))


@dataclass(frozen=True)
class Scale:
    uploads: int
    kills: int
    flood: int = 2_000
    """Delegations of the flood case, published while no worker runs."""
    flood_width: int = 500
    """How many of them are in flight at once."""


@pytest.fixture(scope="session")
def scale() -> Scale:
    """300 uploads and 3 kills per case in CI; 5,000 and 20 with ``make faults``.
    The flood: 2,000 delegations in CI, 20,000 with ``make faults``; 500 in flight."""
    return Scale(5000, 20, flood=20_000) if LONG else Scale(300, 3)


@pytest.fixture
def ledger(tmp_path: Path) -> Ledger:
    return Ledger(tmp_path / "ledger.sqlite")


@pytest.fixture
def slow_s3(moto_server: MotoServer) -> Iterator[FaultProxy]:
    """moto behind 20 ms of latency per upload: enough to be killed mid-upload."""
    proxy = FaultProxy(moto_server.port, latency=0.02)
    yield proxy
    proxy.close()


@pytest.fixture
def start_ledger_pusher(
    pusher_env: dict[str, str], ledger: Ledger, tmp_path: Path
) -> Iterator[Callable[..., Worker]]:
    """Start pushers (``celery -A tests.faults.ledger_pusher worker``); ``env`` adds to
    or overrides the pusher's environment, ``broker_url`` and ``result_backend`` replace
    the shared test servers (a fault case's private ones)."""
    started: list[Worker] = []

    def start(
        broker: str,
        queue: str,
        *,
        pool: str | None = None,
        broker_url: str | None = None,
        result_backend: str | None = None,
        **env: str,
    ) -> Worker:
        worker = Worker(
            "tests.faults.ledger_pusher",
            broker_url or BROKERS[broker],
            result_backend or RESULT_BACKEND,
            pool=pool,
            queue=queue,
        )
        if pool is not None:
            worker.concurrency = 2
            env["FAULTS_POOL"] = pool
        worker.extra_env.update(pusher_env, FAULTS_LEDGER=str(ledger.path), **env)
        started.append(worker)
        return worker.start(tmp_path)

    yield start
    stop_all(started)


def report(tally: Tally) -> None:
    """Add the tally to the run's summary and, with ``make faults``, to the report file."""
    row = tally.row()
    summary.add(
        LEDGER_SECTION,
        " | ".join(str(row[c]) for c in LEDGER_COLUMNS),
        header=" | ".join(LEDGER_COLUMNS),
    )
    target = os.environ.get("CELERYBRIDGE_FAULTS_REPORT")
    if target:
        with open(target, "a") as out:
            out.write(json.dumps(tally.row()) + "\n")


@pytest.fixture
def count_ledger(ledger: Ledger, broker: str, s3: Any, bucket: str) -> CountLedger:
    """``await count_ledger(case, *context)``: count the ledger against what S3 holds,
    report the tally, and assert that nothing was lost or unexpected (``context``, e.g.
    the random seed, goes into the failure message)."""

    async def count(case: str, *context: object) -> Tally:
        tally = await anyio.to_thread.run_sync(ledger.tally, case, broker, s3, bucket)
        report(tally)
        assert (tally.lost, tally.unexpected) == (0, 0), (*context, tally.examples[:5])
        return tally

    return count


class Progress:
    """How many calls of a run have an outcome so far."""

    def __init__(self) -> None:
        self.count = 0
        self._changed = asyncio.Condition()

    async def one_more(self) -> None:
        async with self._changed:
            self.count += 1
            self._changed.notify_all()

    async def reached(self, count: int) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: self.count >= count)


async def outcome(result: Awaitable[Receipt], key: str, content: str) -> tuple[str, str]:
    """What the ledger records of a call, once ``result`` is in: ``ok`` (the right key
    and size), ``error`` (the task failed) or ``unknown``, and the detail."""
    try:
        receipt = await result
    except RemoteTaskError as exc:
        return "error", f"{exc.remote_type}: {exc}"
    except (CeleryBridgeError, TimeoutError) as exc:
        return "unknown", f"{type(exc).__name__}: {exc}"
    right = receipt.key == key and receipt.size == len(content.encode())
    return "ok" if right else "unknown", repr(receipt)


async def drive(
    broker: str,
    queue: str,
    ledger: Ledger,
    uploads: int,
    *,
    width: int = 32,
    prefix: str = "faults",
    during: Callable[[Progress], Awaitable[None]] | None = None,
    result_timeout: float = 60,
    bridge_options: Mapping[str, Any] | None = None,
) -> list[tuple[float, float]]:
    """Delegate ``uploads`` v1 calls, ``width`` in flight, each to a key of its own,
    and write every caller-side outcome to the ledger. ``during(progress)`` runs alongside
    (injecting faults), ``progress`` counting the calls that have an outcome.
    ``bridge_options`` override the Bridge's settings (``broker_url``, ``publish_timeout``...).

    Returns each call's (seconds publishing, seconds awaiting the result)."""
    stub = send_to_s3.with_options(queue=queue)
    keys = iter(range(uploads))
    progress = Progress()
    timings: list[tuple[float, float]] = []

    async def lane(bridge: Bridge) -> None:
        for n in keys:
            key = f"{prefix}/{n:06d}.json"
            content = content_for(key, n)
            began, published = time.monotonic(), 0.0

            async def call(key: str, content: str) -> Receipt:
                nonlocal published
                handle = await bridge.send(stub, (key, content), {})
                published = time.monotonic()
                return await handle.result(timeout=result_timeout)

            ledger.call(key, content, *await outcome(call(key, content), key, content))
            ended = time.monotonic()
            timings.append(
                (published - began, ended - published) if published else (ended - began, 0.0)
            )
            await progress.one_more()

    options = {"broker_url": BROKERS[broker], "result_backend": RESULT_BACKEND}
    async with Bridge(**{**options, **(bridge_options or {})}) as bridge:
        lanes = [asyncio.create_task(lane(bridge)) for _ in range(width)]
        try:
            if during is not None:
                await during(progress)
            await asyncio.gather(*lanes)
        finally:
            for task in lanes:
                task.cancel()
    return timings
