"""The services' routes, in-process, with the public test double in place of the broker."""

from __future__ import annotations

import json

import anyio
import pytest

from celerybridge import DelegationError, MemoryTransport, ResultBackendError
from celerybridge._transports.base import OutgoingMessage
from examples.fastapi_app import service, service_a, service_b

from .conftest import ServiceClient

RECEIPT = {
    "bucket": "backups",
    "key": "service-a/items/1.json",
    "etag": "9a0364b9e99bb480dd25e1f0284c8555",
    "size": 61,
    "version_id": None,
    "checksum_sha256": "x" * 44,
    "written": True,
}


async def test_saving_queues_a_v1_backup_and_answers_before_the_upload(
    service_client: ServiceClient,
) -> None:
    transport = MemoryTransport(execute=False)  # nothing runs the task: the upload never ends
    async with service_client(service_a.SERVICE, publisher=transport, results=transport) as http:
        response = await http.post("/items", json={"name": "lamp", "quantity": 2})
        assert response.status_code == 201
        item = response.json()
        assert item["backup"] == {
            "state": "pending",
            "task_id": transport.messages[0].task_id,
            "receipt": None,
            "error": None,
        }
    [message] = transport.messages
    assert (message.task_name, message.queue, message.kwargs) == ("pusher.send_to_s3", "pusher", {})
    key, content = message.args
    assert key == f"service-a/items/{item['id']}.json"
    assert json.loads(content) == {
        "id": item["id"],
        "service": "service-a",
        "name": "lamp",
        "quantity": 2,
        "note": None,
        "created_at": item["created_at"],
    }


async def test_service_b_calls_v2_with_metadata(service_client: ServiceClient) -> None:
    transport = MemoryTransport(execute=False)
    async with service_client(service_b.SERVICE, publisher=transport, results=transport) as http:
        item = (await http.post("/items", json={"name": "desk", "quantity": 1})).json()
    [message] = transport.messages
    assert message.task_name == "pusher.send_to_s3_v2"
    assert message.args[0] == f"service-b/items/{item['id']}.json"
    assert message.args[2] == {
        "service": "service-b",
        "item-id": str(item["id"]),
        "schema": "item-record-1",
    }


async def test_backup_turns_done_with_the_receipt_or_failed_with_the_error(
    service_client: ServiceClient,
) -> None:
    transport = MemoryTransport(execute=False)
    async with service_client(service_a.SERVICE, publisher=transport, results=transport) as http:
        first = (await http.post("/items", json={"name": "a", "quantity": 1})).json()
        second = (await http.post("/items", json={"name": "b", "quantity": 1})).json()
        assert (await http.get(f"/items/{first['id']}/backup")).json()["state"] == "pending"

        transport.set_result(first["backup"]["task_id"], RECEIPT)
        transport.set_failure(second["backup"]["task_id"], PermissionError("AccessDenied"))
        assert (await http.get(f"/items/{first['id']}/backup")).json() == {
            "state": "done",
            "task_id": first["backup"]["task_id"],
            "receipt": RECEIPT,
            "error": None,
        }
        failed = (await http.get(f"/items/{second['id']}/backup")).json()
        assert (failed["state"], failed["error"]) == ("failed", "PermissionError: AccessDenied")
        listed = (await http.get("/items")).json()
        assert [(i["id"], i["backup"]["state"]) for i in listed] == [
            (second["id"], "failed"),
            (first["id"], "done"),
        ]


@pytest.mark.parametrize(
    ("body", "location", "kind"),
    [
        ({"quantity": 1}, ["body", "name"], "missing"),
        ({"name": "", "quantity": 1}, ["body", "name"], "string_too_short"),
        ({"name": "x", "quantity": -1}, ["body", "quantity"], "greater_than_equal"),
        ({"name": "x", "quantity": "many"}, ["body", "quantity"], "int_parsing"),
    ],
)
async def test_bad_input_is_a_422_with_fastapis_usual_body(
    service_client: ServiceClient, body: dict[str, object], location: list[str], kind: str
) -> None:
    transport = MemoryTransport(execute=False)
    async with service_client(service_a.SERVICE, publisher=transport, results=transport) as http:
        response = await http.post("/items", json=body)
        assert response.status_code == 422
        [error] = response.json()["detail"]
        assert (error["loc"], error["type"]) == (location, kind)
        assert (await http.get("/items")).json() == []
    assert transport.messages == []


class FlakyBroker(MemoryTransport):
    """Refuses messages while ``down``, like an unreachable broker."""

    def __init__(self) -> None:
        super().__init__(execute=False)
        self.down = True

    async def publish(self, message: OutgoingMessage) -> None:
        if self.down:
            raise DelegationError("publishing 'pusher.send_to_s3': Connection refused")
        await super().publish(message)


async def test_broker_down_saves_the_item_pending_and_queues_it_later(
    service_client: ServiceClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(service, "RESEND_INTERVAL", 0.05)
    broker = FlakyBroker()
    async with service_client(service_a.SERVICE, publisher=broker, results=broker) as http:
        response = await http.post("/items", json={"name": "kept", "quantity": 3})
        assert response.status_code == 201
        item = response.json()
        assert item["backup"] == {
            "state": "pending",
            "task_id": None,
            "receipt": None,
            "error": "not queued yet, will retry: publishing 'pusher.send_to_s3': "
            "Connection refused",
        }
        broker.down = False
        with anyio.fail_after(5):
            while True:  # the retry loop queues it within a few ticks
                backup = (await http.get(f"/items/{item['id']}/backup")).json()
                if backup["task_id"] is not None:
                    break
                await anyio.sleep(0.02)
        assert backup == {
            "state": "pending",
            "task_id": broker.messages[0].task_id,
            "receipt": None,
            "error": None,
        }
    assert len(broker.messages) == 1  # queued once, not once per retry tick


async def test_the_page_and_unknown_items(service_client: ServiceClient) -> None:
    transport = MemoryTransport(execute=False)
    async with service_client(service_b.SERVICE, publisher=transport, results=transport) as http:
        page = await http.get("/")
        assert page.headers["content-type"].startswith("text/html")
        assert "<title>Service B — items</title>" in page.text
        assert "<h1>Service B — items</h1>" in page.text
        assert "<code>service-b</code>" in page.text
        assert "pusher.send_to_s3 v2 (key, content, meta)" in page.text
        missing = await http.get("/items/42/backup")
        assert (missing.status_code, missing.json()) == (404, {"detail": "no item 42"})


@pytest.mark.parametrize("which", [service_a.SERVICE, service_b.SERVICE], ids=lambda s: s.name)
async def test_healthz_names_the_service(
    service_client: ServiceClient, which: service.Service
) -> None:
    # What the demo waits for: no other server on the port answers this.
    transport = MemoryTransport(execute=False)
    async with service_client(which, publisher=transport, results=transport) as http:
        response = await http.get("/healthz")
        assert (response.status_code, response.json()) == (200, {"service": which.name})


async def test_an_unreachable_broker_is_never_a_500(service_client: ServiceClient) -> None:
    # The real kombu path against a port nobody listens on: refused within the timeout.
    unreachable = {"broker_url": "redis://127.0.0.1:1/0", "publish_timeout": 2}
    async with service_client(service_b.SERVICE, **unreachable) as http:
        with anyio.fail_after(10):
            response = await http.post("/items", json={"name": "offline", "quantity": 1})
        assert response.status_code == 201
        backup = response.json()["backup"]
        assert (backup["state"], backup["task_id"]) == ("pending", None)
        assert backup["error"].startswith("not queued yet, will retry: ")
        listed = (await http.get("/items")).json()
        assert [item["name"] for item in listed] == ["offline"]


class BackendDown(MemoryTransport):
    """A result backend that cannot be reached."""

    async def poll(self, task_id: str) -> None:
        raise ResultBackendError(f"reading the result of task {task_id}: Connection refused")


async def test_a_result_backend_that_is_down_leaves_the_backup_pending(
    service_client: ServiceClient,
) -> None:
    transport = BackendDown(execute=False)
    async with service_client(service_a.SERVICE, publisher=transport, results=transport) as http:
        item = (await http.post("/items", json={"name": "x", "quantity": 1})).json()
        backup = (await http.get(f"/items/{item['id']}/backup")).json()
    assert backup["state"] == "pending"
    assert backup["error"] == (
        f"state unknown for now: reading the result of task {backup['task_id']}: Connection refused"
    )
