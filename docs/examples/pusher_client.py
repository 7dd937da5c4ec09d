"""Calling the pusher through its real bindings, with MemoryTransport in place of the broker.

Against a running ``celery -A pusher worker`` only the configure() line goes: the default
bridge then reads CELERYBRIDGE_BROKER_URL and CELERYBRIDGE_RESULT_BACKEND.
"""

from __future__ import annotations

import asyncio

import celerybridge
from celerybridge import ArgumentError, MemoryTransport
from pusher.bindings import Receipt, send_to_s3, send_to_s3_v2


async def main() -> None:
    transport = MemoryTransport(execute=False)
    celerybridge.configure(publisher=transport, results=transport)
    payload = '{"id": 1, "name": "first"}'

    # --8<-- [start:call]
    handle = await send_to_s3.delegate("items/1.json", payload)
    v2 = await send_to_s3_v2.delegate("items/2.json", payload, {"owner": "svc-b"})
    # --8<-- [end:call]

    assert [m.task_name for m in transport.messages] == [
        "pusher.send_to_s3",
        "pusher.send_to_s3_v2",
    ]
    assert transport.messages[1].args == ("items/2.json", payload, {"owner": "svc-b"})
    # What the worker stores as the result; the handle turns it into a Receipt.
    transport.set_result(
        handle.id,
        {"bucket": "backups", "key": "items/1.json", "etag": "abc", "size": 26,
         "version_id": None, "checksum_sha256": "..."},
    )  # fmt: skip

    # --8<-- [start:receipt]
    receipt = await handle.result(timeout=30)
    print(receipt.bucket, receipt.key, receipt.etag, receipt.size, receipt.version_id)
    # --8<-- [end:receipt]
    assert isinstance(receipt, Receipt)
    assert v2.task_name == "pusher.send_to_s3_v2"

    # --8<-- [start:refused]
    try:
        await send_to_s3.delegate("bad\nkey.json", payload)
    except ArgumentError as exc:
        print(exc)  # ... parameter 'key': Value error, an S3 key cannot contain control characters
    # --8<-- [end:refused]
    assert len(transport.messages) == 2  # the bad call never left the process
    await celerybridge.close_default_bridge()


if __name__ == "__main__":
    asyncio.run(main())
