"""Per-service key prefixes: each calling service names itself (``CELERYBRIDGE_SERVICE``)
and the pusher lets it write only under its own prefixes (``PUSHER_SERVICE_PREFIXES``)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from celerybridge import Bridge, BridgeSettings, ConfigurationError, RemoteTaskError
from pusher.bindings import send_to_s3

from .._brokers import BROKERS, RESULT_BACKEND
from .._workers import Worker

pytestmark = pytest.mark.integration

POLICY = {"svc-a": ["items/a/"], "svc-b": ["items/b/", "shared/"]}
RUN = uuid.uuid4().hex[:6]


@pytest.fixture
def queue(start_pusher: Callable[..., Worker], broker: str) -> str:
    """One pusher per broker with the policy, for the whole module."""
    name = f"cb-pusher-services-{RUN}"
    start_pusher(broker, queue=name, PUSHER_SERVICE_PREFIXES=json.dumps(POLICY))
    return name


async def _save(broker: str, queue: str, service: str | None, key: str, **settings: Any) -> Any:
    config = BridgeSettings(
        broker_url=BROKERS[broker], result_backend=RESULT_BACKEND, service=service, **settings
    )
    async with Bridge(config) as bridge:
        handle = await bridge.send(send_to_s3.with_options(queue=queue), (key, "{}"), {})
        return await handle.result(timeout=30)


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast path", "kombu path"])
async def test_each_service_writes_under_its_own_prefixes(
    broker: str, queue: str, s3: Any, bucket: str, fast_path: bool
) -> None:
    key = f"items/b/{uuid.uuid4().hex}.json"
    receipt = await _save(broker, queue, "svc-b", key, fast_path=fast_path)
    assert receipt.key == key
    assert s3.get_object(Bucket=bucket, Key=key)["Body"].read() == b"{}"
    with pytest.raises(RemoteTaskError) as caught:
        await _save(broker, queue, "svc-a", f"items/b/{uuid.uuid4().hex}.json")
    assert caught.value.remote_type == "PermanentUploadError"
    assert str(caught.value).endswith("service 'svc-a' may write only under items/a/")


@pytest.mark.parametrize(
    ("service", "why"),
    [
        ("svc-z", "service 'svc-z' may not write here"),
        (None, "a caller that does not name its service may not write here"),
    ],
)
async def test_unknown_or_anonymous_callers_are_refused(
    broker: str, queue: str, service: str | None, why: str
) -> None:
    with pytest.raises(RemoteTaskError) as caught:
        await _save(broker, queue, service, f"items/a/{uuid.uuid4().hex}.json")
    assert str(caught.value).endswith(f"{why} (PUSHER_SERVICE_PREFIXES lists svc-a, svc-b)")


def test_the_sync_seed_path_names_the_service_too(
    broker: str, queue: str, s3: Any, bucket: str
) -> None:
    import celerybridge

    celerybridge.configure(
        broker_url=BROKERS[broker], result_backend=RESULT_BACKEND, service="svc-a"
    )
    key = f"items/a/{uuid.uuid4().hex}.json"
    result = send_to_s3.with_options(queue=queue).apply_async((key, "{}"), serializer="json")
    assert result.get(timeout=30).key == key  # a typed Receipt, decoded through the contract


@pytest.mark.parametrize("name", ["", "-svc", "svc a", "x" * 65, "svc/a"])
def test_service_names_are_checked(name: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        BridgeSettings(service=name)
    assert "CELERYBRIDGE_SERVICE" in str(caught.value)
