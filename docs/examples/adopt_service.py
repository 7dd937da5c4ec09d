"""Acme's orders service: saves orders and archives each one through Acme's pusher.

Serve it with ``uvicorn adopt_service:app``. Running the file calls it in-process with httpx,
with ``MemoryTransport`` in place of the broker and the result backend.
"""

from __future__ import annotations

import asyncio
import itertools
import sys
from pathlib import Path
from typing import Any, Literal

import httpx
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel

from celerybridge import DelegationError, MemoryTransport, RemoteTaskError
from celerybridge.fastapi import BridgeDep, bridge_lifespan

# Stands in for `pip install acme-pusher-bindings`: the examples run from a checkout.
sys.path.insert(0, str(Path(__file__).parent / "adopt_bindings"))

from acme_pusher_bindings import Archived, archive


# --8<-- [start:models]
class OrderIn(BaseModel):
    customer: str
    total_cents: int


class Order(OrderIn):
    id: int
    archive_task: str
    """The pusher task's id: kept with the order, in your database."""


class ArchiveOut(BaseModel):
    state: Literal["pending", "done", "failed"]
    archived: Archived | None = None
    error: str | None = None


# --8<-- [end:models]


# --8<-- [start:app]
def create_app(**bridge_options: Any) -> FastAPI:
    """The service; ``bridge_options`` go to ``Bridge(...)`` (tests pass a MemoryTransport)."""
    app = FastAPI(lifespan=bridge_lifespan(**bridge_options))
    orders: dict[int, Order] = {}  # stands in for the database
    ids = itertools.count(1)

    @app.post("/orders", status_code=201)
    async def save(new: OrderIn, bridge: BridgeDep) -> Order:
        """Queue the order's archive and answer at once, without waiting for the worker."""
        order_id = next(ids)
        try:
            handle = await archive.via(bridge).delegate(
                f"orders/{order_id}.json", new.model_dump_json()
            )
        except DelegationError as exc:  # the broker is down, or slow (PublishTimeoutError)
            raise HTTPException(503, f"cannot archive the order now: {exc}") from exc
        orders[order_id] = Order(id=order_id, archive_task=handle.id, **new.model_dump())
        return orders[order_id]

    @app.get("/orders/{order_id}/archive")
    async def archive_state(order_id: int, bridge: BridgeDep) -> ArchiveOut:
        """Where the archive stands, read from the result backend without waiting."""
        if order_id not in orders:
            raise HTTPException(404, f"no order {order_id}")
        handle = bridge.handle(archive, orders[order_id].archive_task)
        if not await handle.done():
            return ArchiveOut(state="pending")
        try:
            archived = await handle.result(timeout=5)  # finished: this returns at once
        except RemoteTaskError as exc:
            return ArchiveOut(state="failed", error=f"{exc.remote_type}: {exc.remote_message}")
        return ArchiveOut(state="done", archived=archived)

    return app


app = create_app()  # uvicorn adopt_service:app; settings from CELERYBRIDGE_* at startup
# --8<-- [end:app]


async def main() -> None:
    # --8<-- [start:walkthrough]
    transport = MemoryTransport(execute=False)  # nothing runs: we play the worker below
    service = create_app(publisher=transport, results=transport)
    async with service.router.lifespan_context(service):
        client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=service), base_url="http://test"
        )
        async with client:
            order = await client.post("/orders", json={"customer": "ada", "total_cents": 1200})
            task_id = order.json()["archive_task"]
            response = await client.get("/orders/1/archive")
            assert response.json() == {"state": "pending", "archived": None, "error": None}

            transport.set_result(task_id, {"key": "orders/1.json", "size": 40})  # the worker
            response = await client.get("/orders/1/archive")
            assert response.json() == {
                "state": "done",
                "archived": {"key": "orders/1.json", "size": 40},
                "error": None,
            }
    # --8<-- [end:walkthrough]
    [message] = transport.messages
    assert (message.task_name, message.queue, message.task_id) == (
        "acme_pusher.archive",
        "acme-pusher",
        task_id,
    )


if __name__ == "__main__":
    asyncio.run(main())
