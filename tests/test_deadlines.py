"""One timer for the deadlines of many publishes (``_deadlines``): each block is bounded
as ``asyncio.timeout`` bounds it."""

from __future__ import annotations

import asyncio

import pytest

from celerybridge._deadlines import Deadlines

SHORT = 0.05


async def test_a_block_past_its_deadline_raises_timeout_error() -> None:
    deadlines = Deadlines(SHORT)
    with pytest.raises(TimeoutError):
        async with deadlines.bound():
            await asyncio.sleep(10)


async def test_blocks_in_time_finish_and_a_later_slow_one_still_times_out() -> None:
    deadlines = Deadlines(SHORT)
    for _ in range(100):
        async with deadlines.bound():
            await asyncio.sleep(0)
    await asyncio.sleep(SHORT * 2)  # the timer set for the first block has fired
    for _ in range(2):  # ... and is armed again for each slow one
        with pytest.raises(TimeoutError):
            async with deadlines.bound():
                await asyncio.sleep(10)


async def test_each_open_block_is_bounded_from_its_own_start() -> None:
    deadlines = Deadlines(SHORT * 4)
    outcomes: list[str] = []

    async def block(pause: float, name: str) -> None:
        try:
            async with deadlines.bound():
                await asyncio.sleep(pause)
            outcomes.append(f"{name} done")
        except TimeoutError:
            outcomes.append(f"{name} timed out")

    async with asyncio.TaskGroup() as group:
        group.create_task(block(10, "slow"))
        await asyncio.sleep(SHORT * 2)  # halfway through the first one's time
        group.create_task(block(SHORT * 3, "quick"))  # due after the first one's deadline
        group.create_task(block(10, "late"))
    assert sorted(outcomes) == ["late timed out", "quick done", "slow timed out"]


async def test_a_cancellation_from_elsewhere_stays_a_cancellation() -> None:
    deadlines = Deadlines(10)

    async def block() -> None:
        async with deadlines.bound():
            await asyncio.sleep(10)

    task = asyncio.create_task(block())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_cancellation_after_the_deadline_is_not_swallowed() -> None:
    """As asyncio.timeout: the deadline passed, then someone else cancelled too."""
    deadlines = Deadlines(SHORT)
    entered = asyncio.Event()

    async def block() -> None:
        async with deadlines.bound():
            entered.set()
            try:
                await asyncio.sleep(10)
            finally:
                asyncio.current_task().cancel()  # type: ignore[union-attr]
                await asyncio.sleep(0)

    task = asyncio.create_task(block())
    await entered.wait()
    with pytest.raises(asyncio.CancelledError):
        await task


def test_deadlines_in_a_second_event_loop_get_a_timer_there() -> None:
    deadlines = Deadlines(SHORT)

    async def block(pause: float) -> None:
        async with deadlines.bound():
            await asyncio.sleep(pause)

    asyncio.run(block(0))  # its timer, armed on that loop, never fires: the loop is gone
    with pytest.raises(TimeoutError):
        asyncio.run(block(10))
