# mypy: disable-error-code="empty-body"
"""A taste of celerybridge: a contract, its implementation, and a typed call.

Here one process plays both services, with ``MemoryTransport`` in place of the broker.
"""

import asyncio

from pydantic import BaseModel

from celerybridge import Bridge, MemoryTransport, remote_task


class Receipt(BaseModel):
    key: str
    size: int


# --8<-- [start:taste]
# bindings.py, shipped by the pusher to every service that calls it
@remote_task(name="pusher.send_to_s3", queue="pusher")
def send_to_s3(key: str, content: str) -> Receipt: ...


# in the pusher (its Celery worker runs with -Q pusher)
@send_to_s3.implement()
async def upload(key: str, content: str) -> Receipt:
    return Receipt(key=key, size=len(content))


# in any other service
async def save(bridge: Bridge) -> Receipt:
    handle = await bridge.send(send_to_s3, ("items/1.json", '{"id": 1}'), {})
    return await handle.result(timeout=10)  # a Receipt, or RemoteTaskError


# --8<-- [end:taste]


async def main() -> None:
    transport = MemoryTransport()
    async with Bridge(publisher=transport, results=transport) as bridge:
        assert await save(bridge) == Receipt(key="items/1.json", size=9)
    assert transport.messages[0].task_name == "pusher.send_to_s3"


if __name__ == "__main__":
    asyncio.run(main())
