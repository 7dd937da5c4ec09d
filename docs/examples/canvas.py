"""Canvas and send options, on an in-memory transport: no broker, no worker.

``MemoryTransport(execute=False)`` keeps what the bridge publishes; against Redis or
RabbitMQ only the bridge's settings change, and a worker runs the steps.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from celery import chain, chord, group

from celerybridge import ArgumentError, Bridge, ConfigurationError, MemoryTransport, remote_task


# --8<-- [start:contracts]
@remote_task(name="calc.add", queue="calc")
def add(x: int, y: int) -> int: ...


@remote_task(name="calc.total", queue="calc")
def total(values: list[int]) -> int: ...


# --8<-- [end:contracts]


async def main() -> None:
    transport = MemoryTransport(execute=False)
    async with Bridge(publisher=transport, results=transport) as bridge:
        # --8<-- [start:canvas]
        # add.s(3): x is left open, the previous step's result fills it.
        handle = await bridge.send_canvas(chain(add.s(1, 2), add.s(3), add.s(4)))
        transport.set_result(handle.id, 10)  # what the worker of the last step would store
        assert await handle == 10  # typed by the last step's contract: an int

        both = await bridge.send_canvas(group(add.s(1, 1), add.s(2, 2)))
        try:  # a chord keeps count in the result backend: Redis or a database
            await bridge.send_canvas(chord([add.s(1, 1), add.s(2, 2)], total.s()))
        except ConfigurationError as exc:
            assert "needs a result backend that supports chords" in str(exc)

        try:  # checked as it will run, before anything is sent
            await bridge.send_canvas(chain(add.s(1, 2), add.s(3, 4)))
        except ArgumentError as exc:
            assert str(exc) == (
                "task 'calc.add' v1: too many positional arguments "
                "(in a chain, the previous step's result comes first)"
            )
        # --8<-- [end:canvas]
        assert len(both.handles) == 2  # type: ignore[union-attr]

        # --8<-- [start:options]
        soon = datetime.now(UTC) + timedelta(seconds=30)
        stub = add.with_options(
            eta=soon,  # aware datetimes only; or countdown=30
            expires=timedelta(hours=1),  # or an aware datetime, at most 49.7 days ahead
            headers={"x-tenant": "acme"},  # the task's request sees them
            time_limit=60,
            soft_time_limit=50,
            link=total.s(),  # called with the result; link_error= on failure
        )
        await stub.via(bridge).delegate(1, 2)
        await bridge.delegate("calc.add", 1, 2, send_options={"countdown": 5})
        # --8<-- [end:options]
    sent = transport.messages[-2]
    assert sent.options["headers"] == {"x-tenant": "acme"}
    assert [s["task"] for s in sent.options["link"]] == ["calc.total"]


if __name__ == "__main__":
    asyncio.run(main())
