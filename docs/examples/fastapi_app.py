"""A FastAPI service that delegates to the pusher: one bridge per worker process.

Serve it with ``uvicorn fastapi_app:app``. Running the file calls it in-process with httpx, with
``MemoryTransport`` in place of the broker so no broker is needed.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
from bindings import Receipt, send_to_s3_v2
from fastapi import FastAPI
from pydantic import BaseModel

from celerybridge import ConfigurationError, MemoryTransport
from celerybridge.fastapi import BridgeDep, bridge_lifespan

# Stands in for broker and result backend; in production, drop it and the two keywords below.
transport = MemoryTransport()


@send_to_s3_v2.implement()
def fake_pusher(key: str, content: str, meta: dict[str, str]) -> Receipt:
    return Receipt(key=key, size=len(content))


# --8<-- [start:app]
class Item(BaseModel):
    id: int
    name: str


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
    # Your own startup here. bridge_lifespan's keywords go to Bridge(...).
    async with bridge_lifespan(publisher=transport, results=transport)(app) as state:
        yield {**state, "started": True}
    # Your own shutdown here; the bridge is already closed.


app = FastAPI(lifespan=lifespan)


@app.post("/items")
async def save_item(item: Item, bridge: BridgeDep) -> dict[str, Any]:
    # via(bridge).delegate(...) is checked by mypy against the contract's signature.
    handle = await send_to_s3_v2.via(bridge).delegate(
        f"items/{item.id}.json", item.model_dump_json(), {"by": "api"}
    )
    receipt = await handle.result(timeout=5)
    return {"task_id": handle.id, "stored": receipt.key}


# --8<-- [end:app]


async def main() -> None:
    # --8<-- [start:client]
    async with app.router.lifespan_context(app):  # what the server does at startup
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")
        async with client:
            response = await client.post("/items", json={"id": 7, "name": "seven"})
    # --8<-- [end:client]
    assert response.status_code == 200
    body = response.json()
    assert body["stored"] == "items/7.json"
    assert transport.messages[-1].task_id == body["task_id"]
    assert transport.messages[-1].args[2] == {"by": "api"}

    # --8<-- [start:no-lifespan]
    # Without the lifespan there is no bridge, and the dependency says so.
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")
    async with client:
        try:
            await client.post("/items", json={"id": 8, "name": "eight"})
        except ConfigurationError as exc:
            assert str(exc) == (
                "no celerybridge Bridge in the app's state; create the app with "
                "FastAPI(lifespan=bridge_lifespan())"
            )
        # --8<-- [end:no-lifespan]
        else:
            raise AssertionError("the request found a bridge")


if __name__ == "__main__":
    asyncio.run(main())
