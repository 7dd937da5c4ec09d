"""The pusher end to end: real ``celery -A pusher worker`` processes, real brokers, and
moto's standalone S3 server reached over HTTP by aiobotocore."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

import anyio
import pytest

from celerybridge import ArgumentError, Bridge, RemoteTaskError
from celerybridge._transports.kombu import close_celery_app
from pusher.bindings import MAX_CONTENT_BYTES, Receipt, send_to_s3, send_to_s3_v2, send_to_s3_v3

from .._brokers import BROKERS, RESULT_BACKEND, dead_letters, purge, queue_length
from .._imports import loaded_by
from .._workers import Worker
from ._s3server import DelayProxy, MotoServer

pytestmark = pytest.mark.integration


def _key(prefix: str = "items") -> str:
    return f"{prefix}/{uuid.uuid4().hex}.json"


async def _get(s3: Any, bucket: str, key: str) -> dict[str, Any]:
    def read() -> dict[str, Any]:
        response = s3.get_object(Bucket=bucket, Key=key)
        response["Bytes"] = response["Body"].read()
        return dict(response)

    return await anyio.to_thread.run_sync(read)


def test_importing_bindings_does_not_import_aiobotocore() -> None:
    assert loaded_by("pusher.bindings") == []
    assert loaded_by("pusher._s3", ("botocore",)) == ["botocore"]  # the check can fail


async def test_v1_and_v2_land_with_bytes_type_and_metadata(
    bridge: Bridge, pusher_worker: Worker, s3: Any, bucket: str
) -> None:
    key1, key2 = _key(), _key()
    v1 = send_to_s3.with_options(queue=pusher_worker.queue)
    v2 = send_to_s3_v2.with_options(queue=pusher_worker.queue)
    content = '{"id": 1, "name": "caf\u00e9"}'
    first = await (await bridge.send(v1, (key1, content), {})).result(timeout=30)
    second = await (await bridge.send(v2, (key2, "[]", {"owner": "svc-b"}), {})).result(timeout=30)

    assert isinstance(first, Receipt)
    assert (
        f"pusher ready: bucket {bucket!r}, 8 uploads in flight per process" in pusher_worker.log()
    )
    stored = await _get(s3, bucket, key1)
    assert stored["Bytes"] == content.encode()
    assert stored["ContentType"] == "application/json"
    assert stored["Metadata"] == {}
    assert (first.bucket, first.key, first.size) == (bucket, key1, len(content.encode()))
    assert first.etag == stored["ETag"].strip('"')

    stored2 = await _get(s3, bucket, key2)
    assert stored2["Bytes"] == b"[]"
    assert stored2["Metadata"] == {"owner": "svc-b"}
    assert second.key == key2


async def test_v3_stores_any_bytes_with_their_content_type(
    bridge: Bridge, pusher_worker: Worker, s3: Any, bucket: str, broker_url: str
) -> None:
    key = _key("images")
    png = b"\x89PNG\r\n\x1a\n\x00\xff" + bytes(range(256))  # not UTF-8
    v3 = send_to_s3_v3.with_options(queue=pusher_worker.queue)
    handle = await bridge.send(v3, (key, png), {"content_type": "image/png"})
    receipt = await handle.result(timeout=30)
    stored = await _get(s3, bucket, key)
    assert stored["Bytes"] == png
    assert (stored["ContentType"], stored["Metadata"]) == ("image/png", {})
    assert receipt.size == len(png)

    refused = send_to_s3_v3.with_options(queue=f"cb-pusher-refuse-{uuid.uuid4().hex[:6]}")
    with pytest.raises(ArgumentError) as caught:
        await bridge.send(refused, (key, png), {"content_type": "png"})
    assert str(caught.value) == (
        "task 'pusher.send_to_s3' v3, parameter 'content_type': Value error, 'png' is not a "
        "media type like 'image/png' (got 'png')"
    )
    assert queue_length(broker_url, refused.queue) == 0


async def test_large_content_goes_multipart(
    bridge: Bridge, pusher_worker: Worker, s3: Any, bucket: str
) -> None:
    key = _key("large")
    content = "0123456789abcdef" * (9 * 1024 * 1024 // 16)  # 9 MiB: above the 8 MiB threshold
    stub = send_to_s3.with_options(queue=pusher_worker.queue)
    receipt = await (await bridge.send(stub, (key, content), {})).result(timeout=60)
    assert receipt.etag.endswith("-2")  # two parts of 8 MiB and 1 MiB
    stored = await _get(s3, bucket, key)
    assert stored["Bytes"] == content.encode()
    assert receipt.size == 9 * 1024 * 1024


async def test_seed_literal_client_reaches_the_pusher(
    broker: str, s3: Any, bucket: str, start_pusher: Callable[..., Worker]
) -> None:
    # The seed's worker command: -Q pusher. Start from an empty queue.
    purge(BROKERS[broker], "pusher")
    worker = start_pusher(broker, queue="pusher")
    from . import seed_bindings

    # The previous parameter used (and closed) the module's app on the other broker.
    seed_bindings.app.conf.update(broker_url=BROKERS[broker], result_backend=RESULT_BACKEND)
    try:
        # --- the seed's call, verbatim ---
        from .seed_bindings import send_to_s3

        serialized_object = '{"id": 7}'
        key = _key("seed")
        args = (key, serialized_object)
        result = send_to_s3.apply_async(args, queue="pusher", serializer="json")
        receipt = await anyio.to_thread.run_sync(lambda: result.get(timeout=30))
    finally:
        close_celery_app(seed_bindings.app)
        worker.stop()  # the demo's tests start a pusher of their own on this queue
    assert receipt["key"] == key
    assert (await _get(s3, bucket, key))["Bytes"] == b'{"id": 7}'


async def test_bad_keys_and_oversized_content_are_refused_before_send(
    bridge: Bridge, broker_url: str
) -> None:
    queue = f"cb-pusher-refuse-{uuid.uuid4().hex[:6]}"
    stub = send_to_s3.with_options(queue=queue)
    cases = [
        (("", "{}"), "task 'pusher.send_to_s3' v1, parameter 'key': Value error, an S3 key "
         "cannot be empty (got '')"),
        (("a\x00b", "{}"), "task 'pusher.send_to_s3' v1, parameter 'key': Value error, an S3 "
         "key cannot contain control characters, found '\\x00' (got 'a\\x00b')"),
        (("k" * 1025, "{}"), "task 'pusher.send_to_s3' v1, parameter 'key': Value error, an S3 "
         "key is at most 1024 bytes of UTF-8, this one is 1025 (got '" + "k" * 79 + ")"),
        (("k", "x" * (MAX_CONTENT_BYTES + 1)), "task 'pusher.send_to_s3' v1, parameter "
         "'content': Value error, content is 67108865 bytes of UTF-8; the pusher takes at most "
         "67108864 (got '" + "x" * 79 + ")"),
    ]  # fmt: skip
    for args, message in cases:
        with pytest.raises(ArgumentError) as caught:
            await bridge.send(stub, args, {})
        assert str(caught.value) == message
    assert queue_length(broker_url, queue) == 0
    # Exactly at the limit is accepted (and sent).
    await bridge.send(stub, ("k", "x" * MAX_CONTENT_BYTES), {})
    assert queue_length(broker_url, queue) == 1
    purge(broker_url, queue)


async def test_permanent_errors_fail_at_once_with_a_clear_error(
    bridge: Bridge, start_pusher: Callable[..., Worker], broker: str
) -> None:
    worker = start_pusher(broker, PUSHER_ALLOWED_PREFIXES="svc-a/")
    stub = send_to_s3.with_options(queue=worker.queue)
    started = time.monotonic()
    with pytest.raises(RemoteTaskError) as caught:
        await (await bridge.send(stub, ("svc-b/1.json", "{}"), {})).result(timeout=30)
    assert caught.value.remote_type == "PermanentUploadError"
    assert caught.value.remote_message.endswith(
        "/svc-b/1.json: key outside the allowed prefixes svc-a/"
    )
    assert time.monotonic() - started < 5  # not retried
    landed = await (await bridge.send(stub, ("svc-a/1.json", "{}"), {})).result(timeout=30)
    assert landed.key == "svc-a/1.json"


async def test_throttled_uploads_are_retried_until_they_land(
    start_pusher: Callable[..., Worker], broker: str, moto_server: MotoServer, s3: Any, bucket: str
) -> None:
    proxy = DelayProxy(moto_server.port)
    queue = f"cb-pusher-throttled-{uuid.uuid4().hex[:6]}"
    start_pusher(broker, queue=queue, AWS_ENDPOINT_URL_S3=proxy.url)
    key = _key("throttled")
    proxy.slow_downs = 2  # botocore's standard retry mode backs off and tries again
    try:
        async with Bridge(broker_url=BROKERS[broker], result_backend=RESULT_BACKEND) as bridge:
            stub = send_to_s3.with_options(queue=queue)
            receipt = await (await bridge.send(stub, (key, "{}"), {})).result(timeout=60)
    finally:
        proxy.close()
    assert proxy.uploads[f"/{bucket}/{key}"] == 3  # two 503 SlowDown, then the upload
    assert (await _get(s3, bucket, key))["Bytes"] == b"{}"
    assert receipt.key == key


async def test_an_upload_that_exhausts_its_retries_goes_to_the_dead_letters(
    start_pusher: Callable[..., Worker], broker: str, moto_server: MotoServer
) -> None:
    proxy = DelayProxy(moto_server.port)
    proxy.slow_downs = 10_000  # S3 throttles for good
    queue = f"cb-pusher-exhausted-{uuid.uuid4().hex[:6]}"
    env = {"AWS_ENDPOINT_URL_S3": proxy.url, "PUSHER_MAX_RETRIES": "1"}
    start_pusher(broker, queue=queue, PUSHER_S3_MAX_ATTEMPTS="2", **env)
    key = _key("throttled-for-good")
    try:
        async with Bridge(broker_url=BROKERS[broker], result_backend=RESULT_BACKEND) as bridge:
            stub = send_to_s3.with_options(queue=queue)
            handle = await bridge.send(stub, (key, "{}"), {})
            with pytest.raises(RemoteTaskError) as caught:
                await handle.result(timeout=60)
    finally:
        proxy.close()
    assert caught.value.remote_type == "TransientUploadError"
    # Copied after Celery stored the failure, so it may arrive just after the caller knew.
    [dead] = await anyio.to_thread.run_sync(dead_letters, BROKERS[broker], queue)
    assert dead["id"] == handle.id
    assert dead["x-celerybridge-dead-reason"].startswith(
        "failed after 1 retries: TransientUploadError: "
    )


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"PUSHER_BUCKET": "no-such-bucket"},
            "the pusher cannot start: bucket 'no-such-bucket' does not exist (PUSHER_BUCKET)",
        ),
        (
            {"PUSHER_BUCKET": ""},
            "the pusher cannot start: PUSHER_BUCKET: String should have at least 3 characters",
        ),
    ],
)
async def test_bad_configuration_refuses_to_start_with_one_clear_error(
    start_pusher: Callable[..., Worker], broker: str, env: dict[str, str], message: str
) -> None:
    worker = start_pusher(broker, wait=False, **env)
    assert worker.process is not None
    await anyio.to_thread.run_sync(worker.process.wait, 60)
    assert worker.process.returncode != 0
    log = worker.log()
    assert message in log
    assert "ready." not in log


async def test_worker_killed_mid_upload_still_lands_the_object_once(
    start_pusher: Callable[..., Worker],
    broker: str,
    moto_server: MotoServer,
    s3: Any,
    bucket: str,
) -> None:
    proxy = DelayProxy(moto_server.port)
    proxy.delay = 3.0
    queue = f"cb-pusher-kill-{uuid.uuid4().hex[:6]}"
    # Small Redis visibility timeout so the redelivery comes quickly (RabbitMQ redelivers
    # as soon as the connection drops).
    env = {
        "AWS_ENDPOINT_URL_S3": proxy.url,
        "PUSHER_VISIBILITY_TIMEOUT": "4",
        "PUSHER_TASK_TIME_LIMIT": "3.5",
    }
    first = start_pusher(broker, queue=queue, **env)
    key = _key("killed")
    content = '{"survives": "a SIGKILL"}'
    try:
        async with Bridge(broker_url=BROKERS[broker], result_backend=RESULT_BACKEND) as bridge:
            handle = await bridge.send(send_to_s3.with_options(queue=queue), (key, content), {})
            proxy.upload_seen.clear()
            assert await anyio.to_thread.run_sync(proxy.upload_seen.wait, 30)
            first.kill()  # mid-upload: the PUT is being held by the proxy
            proxy.delay = 0.0
            start_pusher(broker, queue=queue, **env)
            receipt = await handle.result(timeout=60)
    finally:
        proxy.close()
    path = f"/{bucket}/{key}"
    assert proxy.uploads[path] >= 2  # the killed attempt and the redelivered one
    listed = await anyio.to_thread.run_sync(
        lambda: s3.list_objects_v2(Bucket=bucket, Prefix=key)["Contents"]
    )
    assert [o["Key"] for o in listed] == [key]
    assert (await _get(s3, bucket, key))["Bytes"] == content.encode()
    assert receipt.key == key
