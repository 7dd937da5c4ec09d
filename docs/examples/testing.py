"""Unit-testing a service that delegates, with ``MemoryTransport`` as the test double.

``save_item`` and ``announce_item`` are the service's code; ``main()`` does what its tests would
do (in pytest, the bridge would come from a fixture).
"""

from __future__ import annotations

import asyncio

from bindings import Receipt, send_to_s3_v2

from celerybridge import Bridge, MemoryTransport, RemoteTaskError


# --8<-- [start:service]
async def save_item(bridge: Bridge, item_id: int, body: str) -> str:
    """Store the item through the pusher; return the key it was stored under."""
    meta = {"source": "service-a"}
    handle = await send_to_s3_v2.via(bridge).delegate(f"items/{item_id}.json", body, meta)
    receipt = await handle.result(timeout=10)
    return receipt.key


async def announce_item(bridge: Bridge, item_id: int) -> None:
    """Fire and forget: ask the pusher to store a marker, do not wait."""
    await bridge.delegate("pusher.send_to_s3", f"markers/{item_id}", "", meta={})


# --8<-- [end:service]


# --8<-- [start:fake]
# A fake pusher, registered for the test session (a conftest.py is a good home):
# with execute=True, MemoryTransport runs it as a worker would.
@send_to_s3_v2.implement()
def fake_pusher(key: str, content: str, meta: dict[str, str]) -> Receipt:
    if content == "too big":
        raise OverflowError("object larger than 5 GB")
    return Receipt(key=key, size=len(content))


# --8<-- [end:fake]


async def main() -> None:
    # --8<-- [start:execute]
    transport = MemoryTransport()  # execute=True: registered implementations run at once
    async with Bridge(publisher=transport, results=transport) as bridge:
        assert await save_item(bridge, 1, "{}") == "items/1.json"
        try:
            await save_item(bridge, 2, "too big")
        except RemoteTaskError as exc:
            assert (exc.remote_type, exc.remote_message) == (
                "OverflowError",
                "object larger than 5 GB",
            )
        # --8<-- [end:execute]
        else:
            raise AssertionError("the fake's failure did not reach the caller")

    # --8<-- [start:messages]
    transport = MemoryTransport(execute=False)  # nothing runs; the test decides the outcomes
    async with Bridge(publisher=transport, results=transport) as bridge:
        await announce_item(bridge, 7)
        [message] = transport.messages  # what a worker would receive
        assert (message.task_name, message.queue) == ("pusher.send_to_s3_v2", "pusher")
        assert message.args == ("markers/7", "", {})
        assert message.kwargs == {}

        handle = await send_to_s3_v2.via(bridge).delegate("a.json", "{}", {})
        transport.set_result(handle.id, {"key": "a.json", "size": 2})
        assert await handle == Receipt(key="a.json", size=2)

        handle = await send_to_s3_v2.via(bridge).delegate("b.json", "{}", {})
        transport.set_failure(handle.id, PermissionError("bucket is read-only"))
        try:
            await handle
        except RemoteTaskError as exc:
            assert exc.remote_type == "PermissionError"
            assert exc.remote_module == "builtins"
            assert exc.remote_message == "bucket is read-only"
        # --8<-- [end:messages]
        else:
            raise AssertionError("set_failure did not reach the caller")


if __name__ == "__main__":
    asyncio.run(main())
