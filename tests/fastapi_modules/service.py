"""A FastAPI service that delegates through celerybridge (run by uvicorn in tests)."""

from __future__ import annotations

import os

from fastapi import FastAPI

from celerybridge.fastapi import BridgeDep, bridge_lifespan

from ..workers import bindings

app = FastAPI(lifespan=bridge_lifespan())
QUEUE = os.environ.get("TEST_QUEUE", bindings.QUEUE)


@app.get("/add/{x}/{y}")
async def add(x: int, y: int, bridge: BridgeDep) -> dict[str, int]:
    handle = await bridge.send(bindings.add.with_options(queue=QUEUE), (x, y), {})
    total = await handle.result(timeout=20)
    return {"value": total.value, "server_pid": os.getpid()}
