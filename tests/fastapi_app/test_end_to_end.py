"""Both services, a real ``celery -A pusher worker``, a real broker and moto's S3 server."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import anyio
import httpx
import pytest

from examples.fastapi_app import service_a, service_b
from examples.fastapi_app.service import Service

from .._brokers import BROKERS, RESULT_BACKEND
from .._workers import Worker
from .conftest import ServiceClient

pytestmark = pytest.mark.integration


async def backup_when_final(http: httpx.AsyncClient, item_id: int) -> dict[str, Any]:
    with anyio.fail_after(30):
        while True:
            backup: dict[str, Any] = (await http.get(f"/items/{item_id}/backup")).json()
            if backup["state"] != "pending":
                return backup
            await anyio.sleep(0.1)


@pytest.mark.parametrize(
    ("service", "metadata"),
    [
        (service_a.SERVICE, lambda item_id: {}),
        (
            service_b.SERVICE,
            lambda item_id: {
                "service": "service-b",
                "item-id": str(item_id),
                "schema": "item-record-1",
            },
        ),
    ],
    ids=["service-a-v1", "service-b-v2"],
)
async def test_saved_items_land_in_s3_through_the_pusher(
    service_client: ServiceClient,
    start_pusher: Callable[..., Worker],
    broker: str,
    s3: Any,
    bucket: str,
    service: Service,
    metadata: Callable[[int], dict[str, str]],
) -> None:
    start_pusher(broker, queue="pusher")  # the bindings' own queue, as deployed
    bridge_options = {"broker_url": BROKERS[broker], "result_backend": RESULT_BACKEND}
    async with service_client(service, **bridge_options) as http:
        item = (await http.post("/items", json={"name": "lamp", "quantity": 2})).json()
        backup = await backup_when_final(http, item["id"])

    key = f"{service.name}/items/{item['id']}.json"
    stored = await anyio.to_thread.run_sync(lambda: s3.get_object(Bucket=bucket, Key=key))
    body = stored["Body"].read()
    assert json.loads(body) == {k: v for k, v in item.items() if k != "backup"}
    assert stored["ContentType"] == "application/json"
    assert stored["Metadata"] == metadata(item["id"])
    assert backup["state"] == "done"
    receipt = backup["receipt"]
    assert (receipt["bucket"], receipt["key"], receipt["size"]) == (bucket, key, len(body))
    assert receipt["etag"] == stored["ETag"].strip('"')
