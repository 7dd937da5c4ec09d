"""Unit tests of the orders service (``adopt_service.py``), with ``MemoryTransport``.

Plain pytest, with the pytest plugin that comes with anyio; no broker, no worker. Run them with
``pytest adopt_test_service.py``, or run the file.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
from adopt_service import create_app

# Stands in for `pip install acme-pusher-bindings`: the examples run from a checkout.
sys.path.insert(0, str(Path(__file__).parent / "adopt_bindings"))

from acme_pusher_bindings import Archived, archive

from celerybridge import MemoryTransport

# --8<-- [start:setup]
pytestmark = pytest.mark.anyio  # async tests, with the pytest plugin that comes with anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # FastAPI runs on asyncio


# A fake pusher for the whole test session (a conftest.py is its usual home): with
# execute=True, MemoryTransport runs it as the worker would, arguments checked again.
@archive.implement()
def fake_archive(key: str, document: str) -> Archived:
    if "refused" in document:
        raise PermissionError("bucket is read-only")
    return Archived(key=key, size=len(document))


@asynccontextmanager
async def service(transport: MemoryTransport) -> AsyncIterator[httpx.AsyncClient]:
    """The app, started as the server would start it, on ``transport``."""
    app = create_app(publisher=transport, results=transport)
    async with (
        app.router.lifespan_context(app),  # one bridge, on the transport
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client,
    ):
        yield client


# --8<-- [end:setup]


# --8<-- [start:tests]
async def test_an_order_is_archived() -> None:
    transport = MemoryTransport()
    async with service(transport) as client:
        order = (await client.post("/orders", json={"customer": "ada", "total_cents": 1})).json()
        state = (await client.get("/orders/1/archive")).json()

    [message] = transport.messages  # what the worker would receive
    assert (message.task_name, message.queue) == ("acme_pusher.archive", "acme-pusher")
    assert message.args == ("orders/1.json", '{"customer":"ada","total_cents":1}')
    assert order["archive_task"] == message.task_id
    assert state == {
        "state": "done",
        "archived": {"key": "orders/1.json", "size": 34},
        "error": None,
    }


async def test_a_failed_archive_is_reported() -> None:
    async with service(MemoryTransport()) as client:
        await client.post("/orders", json={"customer": "refused", "total_cents": 1})
        state = (await client.get("/orders/1/archive")).json()
    assert state["error"] == "PermissionError: bucket is read-only"


async def test_an_unfinished_archive_is_pending() -> None:
    transport = MemoryTransport(execute=False)  # nothing runs: the test decides when it ends
    async with service(transport) as client:
        order = (await client.post("/orders", json={"customer": "bob", "total_cents": 5})).json()
        assert (await client.get("/orders/1/archive")).json()["state"] == "pending"

        transport.set_result(order["archive_task"], {"key": "orders/1.json", "size": 35})
        assert (await client.get("/orders/1/archive")).json()["state"] == "done"


# --8<-- [end:tests]

if __name__ == "__main__":
    # In a fresh interpreter, so that pytest imports (and rewrites) what it needs first.
    # -p no:cacheprovider: leave no .pytest_cache behind.
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__]
    sys.exit(subprocess.call(command))
