"""Delegation and results, with MemoryTransport standing in for broker, worker and backend.

``MemoryTransport`` runs implementations registered in this process as a worker would, so the
pusher's side is a small fake here. Against a real broker the calls are the same.
"""

from __future__ import annotations

import asyncio
import warnings
from datetime import datetime, timedelta

import anyio
from bindings import Receipt, purge, send_to_s3_v2

from celerybridge import (
    Bridge,
    MemoryTransport,
    RemoteTaskError,
    ResultTimeoutError,
    TaskHandle,
)


@send_to_s3_v2.implement()
async def fake_send_v2(key: str, content: str, meta: dict[str, str]) -> Receipt:
    if key.startswith("/"):
        raise ValueError(f"key must be relative, got {key!r}")
    return Receipt(key=key, size=len(content))


async def main() -> None:
    # --8<-- [start:delegate]
    transport = MemoryTransport()  # in place of broker and result backend, for this example
    async with Bridge(publisher=transport, results=transport) as bridge:
        # By name, as the seed's delegate_send_to_s3 did: the default version (here v2).
        handle = await bridge.delegate("pusher.send_to_s3", "items/1.json", "{}", meta={})
        assert (handle.task_name, handle.version) == ("pusher.send_to_s3_v2", 2)
        receipt = await handle  # coerced to the contract's return type
        assert receipt == Receipt(key="items/1.json", size=2)

        # Typed: the stub itself says which task and version.
        handle = await bridge.send(send_to_s3_v2, ("items/2.json", "[]", {"owner": "a"}), {})
        assert await handle.result(timeout=timedelta(seconds=5)) == Receipt(
            key="items/2.json", size=2
        )
        # --8<-- [end:delegate]

        # --8<-- [start:version]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            old = await bridge.delegate("pusher.send_to_s3", "items/3.json", "{}", version="1")
        assert old.task_name == "pusher.send_to_s3"
        assert str(caught[0].message) == "task 'pusher.send_to_s3' v1 is deprecated: use version 2"
        assert caught[0].category is DeprecationWarning
        # --8<-- [end:version]

        # --8<-- [start:remote-error]
        handle = await bridge.delegate("pusher.send_to_s3", "/etc/passwd", "x", meta={})
        try:
            await handle
        except RemoteTaskError as exc:
            assert exc.remote_type == "ValueError"
            assert exc.remote_message == "key must be relative, got '/etc/passwd'"
            assert exc.remote_traceback is not None
            assert "raise ValueError" in exc.remote_traceback
            assert str(exc) == (
                f"task 'pusher.send_to_s3' v2 ({handle.id}) failed: "
                "ValueError: key must be relative, got '/etc/passwd'"
            )
        # --8<-- [end:remote-error]
        else:
            raise AssertionError("the failure was not raised")

    # --8<-- [start:timeouts]
    # Nobody implements pusher.purge in this process: nothing answers, as with a stopped worker.
    idle = MemoryTransport()
    async with Bridge(publisher=idle, results=idle, result_timeout=0.05) as bridge:
        handle = await bridge.send(purge, ("tmp/", datetime(2024, 1, 1)), {})
        try:
            await handle  # no timeout given: the bridge's result_timeout
        except TimeoutError as exc:  # ResultTimeoutError is also a TimeoutError
            assert isinstance(exc, ResultTimeoutError)
            assert str(exc) == f"task 'pusher.purge' v1 ({handle.id}) did not finish within 0.05 s"
        # --8<-- [end:timeouts]
        else:
            raise AssertionError("the wait did not time out")

        # --8<-- [start:cancel]
        # Waiting is cancellable; the task itself is not revoked, and the handle stays usable.
        with anyio.move_on_after(0.05):
            await handle.result(timeout=30)
        assert idle.waiting == 0
        idle.set_result(handle.id, 3)
        assert await handle == 3
        # --8<-- [end:cancel]

        # --8<-- [start:fire-and-forget]
        # Fire and forget: once delegate returns, the broker has the message. A handle
        # you never await costs nothing.
        for prefix in ("a/", "b/"):
            await bridge.send(purge, (prefix, "2024-01-01T00:00:00"), {"dry_run": "yes"})
        sent = idle.messages[-1]
        assert (sent.task_name, sent.queue) == ("pusher.purge", "pusher")
        # Validated and coerced before sending; only JSON goes on the wire.
        assert sent.args == ("b/", "2024-01-01T00:00:00", True)
        # --8<-- [end:fire-and-forget]
        assert isinstance(handle, TaskHandle)


if __name__ == "__main__":
    asyncio.run(main())
