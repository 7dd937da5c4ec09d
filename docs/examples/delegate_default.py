"""The module-level API and the seed's sync path, on kombu's in-process ``memory://`` broker.

No worker runs here: the example reads the messages off the ``pusher`` queue, which is what the
pusher's worker would receive. Against Redis or RabbitMQ only the broker URL changes.
"""

from __future__ import annotations

import asyncio
from queue import Empty
from typing import Any

import anyio
import kombu
import trio
from bindings import send_to_s3_v2

import celerybridge


async def service_code() -> list[str]:
    # --8<-- [start:module-level]
    # Typed: mypy checks these arguments against the contract's signature.
    handle = await send_to_s3_v2.delegate("items/1.json", "{}", {"owner": "a"})

    # By name, with the version picked at run time (the seed's version map).
    by_name = await celerybridge.delegate(
        "pusher.send_to_s3", "items/2.json", "[]", version="2", meta={}
    )
    assert by_name.task_name == handle.task_name == "pusher.send_to_s3_v2"

    await celerybridge.close_default_bridge()  # at shutdown: this event loop's default bridge
    # --8<-- [end:module-level]
    return [handle.id, by_name.id]


def seed_code() -> list[str]:
    # --8<-- [start:sync]
    # Sync code, exactly as in the seed; the arguments are validated first.
    args = ("items/3.json", "{}", {"owner": "b"})
    result = send_to_s3_v2.apply_async(args, queue="pusher", serializer="json")
    later = send_to_s3_v2.delay("items/4.json", "", {})
    # --8<-- [end:sync]
    return [result.id, later.id]


def pusher_queue() -> list[dict[str, Any]]:
    """The messages waiting on the ``pusher`` queue, as the pusher's worker would get them."""
    received = []
    with kombu.Connection("memory://") as connection:
        queue = connection.SimpleQueue("pusher")
        while True:
            try:
                message = queue.get(block=False)
            except Empty:
                break
            args, kwargs, _ = message.payload
            received.append(
                {
                    "id": message.headers["id"],
                    "task": message.headers["task"],
                    "content_type": message.content_type,
                    "args": args,
                    "kwargs": kwargs,
                }
            )
            message.ack()
        queue.close()
    return received


async def main() -> None:
    # --8<-- [start:configure]
    celerybridge.configure(broker_url="memory://")  # else CELERYBRIDGE_* variables are read
    # --8<-- [end:configure]
    sent = await service_code()  # under asyncio
    sent += await anyio.to_thread.run_sync(trio.run, service_code)  # the same code under trio
    sent += await anyio.to_thread.run_sync(seed_code)

    received = await anyio.to_thread.run_sync(pusher_queue)
    assert [m["id"] for m in received] == sent
    assert {m["task"] for m in received} == {"pusher.send_to_s3_v2"}
    assert {m["content_type"] for m in received} == {"application/json"}
    assert received[0]["args"] == ["items/1.json", "{}", {"owner": "a"}]
    assert received[-1]["args"] == ["items/4.json", "", {}]


if __name__ == "__main__":
    asyncio.run(main())
