"""Service B: backs items up with contract v2, ``send_to_s3_v2(key, content, meta)``.

The metadata becomes the object's S3 user metadata. Run:
``uvicorn examples.fastapi_app.service_b:app`` (database: ``SERVICE_B_DATABASE_URL``).
"""

from __future__ import annotations

from celerybridge import Bridge, TaskHandle
from pusher.bindings import Receipt, send_to_s3_v2

from .models import ItemRecord
from .service import Service, ServiceSettings, create_app


async def backup(bridge: Bridge, key: str, content: str, item: ItemRecord) -> TaskHandle[Receipt]:
    meta = {"service": "service-b", "item-id": str(item.id), "schema": "item-record-1"}
    return await send_to_s3_v2.via(bridge).delegate(key, content, meta)


SERVICE = Service(
    name="service-b",
    title="Service B",
    stub=send_to_s3_v2,
    backup=backup,
)

app = create_app(SERVICE, ServiceSettings(_env_prefix="SERVICE_B_"))
