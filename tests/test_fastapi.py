"""The FastAPI lifespan and dependency, in-process and under uvicorn with several workers."""

from __future__ import annotations

import os
import socket
import sys
import time

import anyio
import httpx
import pytest
from fastapi import FastAPI

from celerybridge import ConfigurationError, MemoryTransport, remote_task
from celerybridge.fastapi import BridgeDep, bridge_lifespan

from ._workers import ROOT, Worker


async def test_dependency_hands_out_the_lifespan_bridge() -> None:
    @remote_task(name="api.echo")
    def echo(text: str) -> str: ...

    transport = MemoryTransport(execute=False)
    app = FastAPI(lifespan=bridge_lifespan(publisher=transport, results=transport))

    @app.post("/echo/{text}")
    async def post(text: str, bridge: BridgeDep) -> dict[str, str]:
        handle = await bridge.send(echo, (text,), {})
        return {"task_id": handle.id}

    async with app.router.lifespan_context(app):
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")
        async with client:
            response = await client.post("/echo/hello")
        bridge = app.state.celerybridge
    assert response.status_code == 200
    assert response.json()["task_id"] == transport.messages[0].task_id
    assert transport.messages[0].args == ("hello",)
    assert bridge._closed  # the lifespan closed it on shutdown
    assert not hasattr(app.state, "celerybridge")


async def test_dependency_without_lifespan_says_how_to_fix() -> None:
    app = FastAPI()

    @app.get("/")
    async def index(bridge: BridgeDep) -> None: ...

    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")
    async with client:
        with pytest.raises(ConfigurationError, match=r"FastAPI\(lifespan=bridge_lifespan\(\)\)"):
            await client.get("/")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.integration
async def test_uvicorn_with_several_workers_delegates_from_each(
    bridge_worker: Worker, broker_url: str
) -> None:
    port = _free_port()
    env = {
        **os.environ,
        "CELERYBRIDGE_BROKER_URL": broker_url,
        "CELERYBRIDGE_RESULT_BACKEND": bridge_worker.result_backend,
        "TEST_QUEUE": bridge_worker.queue,
        "PYTHONPATH": str(ROOT),
    }
    command = [
        sys.executable, "-m", "uvicorn", "tests.fastapi_modules.service:app",
        "--workers", "2", "--port", str(port), "--host", "127.0.0.1",
    ]  # fmt: skip
    server = await anyio.open_process(command, cwd=ROOT, env=env, stdout=None, stderr=None)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            deadline = time.monotonic() + 30
            while True:
                try:
                    await client.get("/add/0/0")
                    break
                except httpx.TransportError:
                    assert time.monotonic() < deadline, "uvicorn did not start"
                    await anyio.sleep(0.2)
            responses: list[httpx.Response] = []

            async def call(i: int) -> None:
                responses.append(await client.get(f"/add/{i}/1", timeout=30))

            async with anyio.create_task_group() as group:
                for i in range(40):
                    group.start_soon(call, i)
        assert sorted(r.json()["value"] for r in responses) == list(range(1, 41))
        assert {r.status_code for r in responses} == {200}
    finally:
        server.terminate()
        with anyio.fail_after(20):
            await server.wait()
