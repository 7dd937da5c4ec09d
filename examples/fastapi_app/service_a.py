"""Service A: backs items up with the pusher's contract v1, ``send_to_s3(key, content)``.

Run: ``uvicorn examples.fastapi_app.service_a:app`` (database: ``SERVICE_A_DATABASE_URL``).
"""

from __future__ import annotations

from celerybridge import Bridge, TaskHandle
from pusher.bindings import Receipt, send_to_s3

from .models import ItemRecord
from .service import Service, ServiceSettings, create_app


async def backup(bridge: Bridge, key: str, content: str, item: ItemRecord) -> TaskHandle[Receipt]:
    return await send_to_s3.via(bridge).delegate(key, content)


SERVICE = Service(
    name="service-a",
    title="Service A",
    stub=send_to_s3,
    backup=backup,
)

app = create_app(SERVICE, ServiceSettings(_env_prefix="SERVICE_A_"))
