from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from examples.fastapi_app.service import Service, ServiceSettings, create_app

ServiceClient = Callable[..., AbstractAsyncContextManager[httpx.AsyncClient]]


@pytest.fixture
def service_client(tmp_path: Path) -> ServiceClient:
    """Run a service's lifespan and talk to it in-process through httpx's ASGI transport."""

    @asynccontextmanager
    async def open_client(
        service: Service, **bridge_options: Any
    ) -> AsyncIterator[httpx.AsyncClient]:
        database = f"sqlite+aiosqlite:///{tmp_path / service.name}.db"
        app = create_app(service, ServiceSettings(database_url=database), **bridge_options)
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://test") as client,
        ):
            yield client

    return open_client
