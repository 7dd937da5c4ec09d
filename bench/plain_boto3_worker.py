"""A plain Celery worker that uploads with boto3: the reference ``bench.pusher`` compares to.

Written the way the seed's service was, with nothing from celerybridge or the pusher::

    celery -A bench.plain_boto3_worker worker -Q <queue> --loglevel=info

It implements the same wire name (``pusher.send_to_s3``, JSON positional arguments)
and returns a dict shaped like :class:`pusher.bindings.Receipt`, so the celerybridge
caller awaits it exactly as it awaits the pusher. It sends the same S3 request as the
pusher (``ChecksumSHA256``, ``ContentType``), so both do the same work on the S3 side.

Settings: ``CELERYBRIDGE_BROKER_URL``, ``CELERYBRIDGE_RESULT_BACKEND``, ``PUSHER_BUCKET``,
``PUSHER_CONCURRENCY`` (size of boto3's connection pool, for the threads pool), and the
AWS chain (``AWS_ENDPOINT_URL_S3``, credentials, region).
"""

from __future__ import annotations

import base64
import hashlib
import os
from typing import Any

import boto3
from botocore.config import Config
from celery import Celery

BUCKET = os.environ["PUSHER_BUCKET"]

app = Celery(
    "plain_boto3_worker",
    broker=os.environ["CELERYBRIDGE_BROKER_URL"],
    backend=os.environ["CELERYBRIDGE_RESULT_BACKEND"],
)
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    result_accept_content=["json"],
)

# One client per process, made at import as plain boto3 code does; boto3 clients are
# thread-safe, and a pool as large as the concurrency keeps the threads pool from
# discarding connections.
s3: Any = boto3.client(
    "s3",
    config=Config(max_pool_connections=int(os.environ.get("PUSHER_CONCURRENCY", "10"))),
)


@app.task(name="pusher.send_to_s3")
def send_to_s3(key: str, content: str) -> dict[str, Any]:
    body = content.encode()
    checksum = base64.b64encode(hashlib.sha256(body).digest()).decode()
    response = s3.put_object(
        Bucket=BUCKET,
        Key=key,
        Body=body,
        ChecksumSHA256=checksum,
        ContentType="application/json",
    )
    return {
        "bucket": BUCKET,
        "key": key,
        "etag": str(response["ETag"]).strip('"'),
        "size": len(body),
        "version_id": response.get("VersionId"),
        "checksum_sha256": checksum,
    }
