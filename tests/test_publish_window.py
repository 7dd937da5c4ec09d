"""The admission window of native publishers (``_transports._window``): turns to build, the
count and bytes in flight, first come first served, cancellation, paced finishing."""

from __future__ import annotations

import asyncio
import contextlib
import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from celerybridge._transports._window import Window, current_ticket


class Iterations:
    """Counts iterations of the event loop (a callback that reschedules itself)."""

    def __init__(self) -> None:
        self.count = 0
        self._loop = asyncio.get_running_loop()
        self._handle = self._loop.call_soon(self._tick)

    def _tick(self) -> None:
        self.count += 1
        self._handle = self._loop.call_soon(self._tick)

    def stop(self) -> None:
        self._handle.cancel()


async def _until(condition: object, turns: int = 100) -> None:
    for _ in range(turns):
        if condition():  # type: ignore[operator]
            return
        await asyncio.sleep(0)
    raise AssertionError("never happened")


async def test_at_most_its_turns_build_per_iteration() -> None:
    window = Window(turns=2, messages=10, size=10**6)
    iterations = Iterations()
    started: dict[int, int] = {}

    async def publish(i: int) -> None:
        async with window.ticket() as ticket:
            assert current_ticket() is ticket
            started[i] = iterations.count
            ticket.built(1)
            await asyncio.sleep(0.01)  # waiting for the broker holds no turn

    await asyncio.gather(*(publish(i) for i in range(6)))
    iterations.stop()
    assert current_ticket() is None
    per_iteration = [len(list(g)) for _, g in itertools.groupby(sorted(started.values()))]
    assert max(per_iteration) == 2
    assert sorted(started) == list(range(6))
    assert (window.messages, window.size) == (0, 0)


async def test_the_window_admits_its_count_then_the_first_to_come() -> None:
    window = Window(turns=8, messages=3, size=10**6)
    order: list[int] = []
    release = asyncio.Event()

    async def publish(i: int) -> None:
        async with window.ticket() as ticket:
            order.append(i)
            ticket.built(10)
            await release.wait()

    tasks = [asyncio.ensure_future(publish(i)) for i in range(7)]
    await _until(lambda: len(order) == 3)
    for _ in range(10):
        await asyncio.sleep(0)
    assert order == [0, 1, 2]
    assert (window.messages, window.size) == (3, 30)
    release.set()
    await asyncio.gather(*tasks)
    assert order == list(range(7))
    assert (window.messages, window.size) == (0, 0)


async def test_the_byte_bound_holds_back_the_next_until_room_is_made() -> None:
    window = Window(turns=8, messages=100, size=100)
    leave = asyncio.Event()
    entered: list[str] = []

    async def big() -> None:
        async with window.ticket() as ticket:
            entered.append("big")
            ticket.built(150)  # over the bound once built: counted all the same
            await leave.wait()

    async def small() -> None:
        async with window.ticket() as ticket:
            entered.append("small")
            ticket.built(1)

    first = asyncio.ensure_future(big())
    await _until(lambda: entered == ["big"])
    second = asyncio.ensure_future(small())
    for _ in range(10):
        await asyncio.sleep(0)
    assert entered == ["big"]
    assert window.size == 150
    leave.set()
    await asyncio.gather(first, second)
    assert entered == ["big", "small"]
    assert (window.messages, window.size) == (0, 0)


async def test_a_caller_cancelled_while_waiting_or_just_woken_passes_its_turn_on() -> None:
    window = Window(turns=8, messages=1, size=10**6)
    entered: list[str] = []

    async def publish(name: str) -> None:
        async with window.ticket():
            entered.append(name)

    holder = window.ticket()
    await holder.__aenter__()
    waiting = asyncio.ensure_future(publish("cancelled while waiting"))
    woken = asyncio.ensure_future(publish("cancelled once woken"))
    last = asyncio.ensure_future(publish("last"))
    await asyncio.sleep(0)  # all three wait, in this order
    waiting.cancel()
    await asyncio.sleep(0)
    await holder.__aexit__(None, None, None)  # wakes "woken", its place counted for it...
    woken.cancel()  # ... which is cancelled before it runs: the place goes to "last"
    await last
    for task in (waiting, woken):
        with pytest.raises(asyncio.CancelledError):
            await task
    assert entered == ["last"]
    assert (window.messages, window.size) == (0, 0)


async def test_finishing_is_paced_to_the_turns_per_iteration() -> None:
    window = Window(turns=4, messages=100, size=10**6)
    iterations = Iterations()
    finished: list[int] = []

    async def finish() -> None:
        await window.finish()
        finished.append(iterations.count)

    await asyncio.gather(*(finish() for _ in range(30)))
    iterations.stop()
    per_iteration = [len(list(g)) for _, g in itertools.groupby(finished)]
    assert sum(per_iteration) == 30
    assert max(per_iteration) == 4


async def test_settled_outcomes_resume_their_callers_a_few_per_iteration() -> None:
    window = Window(turns=4, messages=100, size=10**6)
    loop = asyncio.get_running_loop()
    outcomes = [loop.create_future() for _ in range(30)]
    iterations = Iterations()
    resumed: list[int] = []

    async def caller(outcome: asyncio.Future[None]) -> None:
        with contextlib.suppress(ValueError):
            await outcome
        resumed.append(iterations.count)

    callers = [asyncio.ensure_future(caller(o)) for o in outcomes]
    await asyncio.sleep(0)
    outcomes[5].cancel()  # its caller gave up: skipped, no turn spent on it
    for i, outcome in enumerate(outcomes):  # all answered at once, as a batch's replies
        window.settle(outcome, ValueError("refused") if i % 3 else None)
    await asyncio.gather(*callers, return_exceptions=True)
    iterations.stop()
    per_iteration = [len(list(g)) for _, g in itertools.groupby(resumed)]
    assert sum(per_iteration) == 29
    assert max(per_iteration) == 4
    assert [o.exception() is None for o in outcomes if not o.cancelled()] == [
        i % 3 == 0 for i in range(30) if i != 5
    ]


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 50), st.sampled_from(["leave", "cancel", "fail"])),
        min_size=1,
        max_size=30,
    ),
    st.integers(1, 4),
    st.integers(1, 60),
)
def test_the_window_never_holds_more_than_its_bounds_and_ends_empty(
    calls: list[tuple[int, str]], messages: int, size: int
) -> None:
    async def main() -> None:
        window = Window(turns=2, messages=messages, size=size)
        inside = 0
        most = 0

        async def publish(bytes_: int, end: str) -> None:
            nonlocal inside, most
            async with window.ticket() as ticket:
                inside += 1
                most = max(most, inside)
                ticket.built(bytes_)
                try:
                    await asyncio.sleep(0)
                    if end == "fail":
                        raise ValueError("the broker refused")
                    await asyncio.sleep(0)
                finally:
                    inside -= 1

        tasks = [asyncio.ensure_future(publish(b, end)) for b, end in calls]
        await asyncio.sleep(0)
        for task, (_, end) in zip(tasks, calls, strict=True):
            if end == "cancel":
                task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        assert most <= messages
        assert (window.messages, window.size) == (0, 0)

    asyncio.run(main())


def test_bounds_must_be_positive() -> None:
    with pytest.raises(ValueError, match="window bounds must be positive: 0, 1, 1"):
        Window(turns=0, messages=1, size=1)
