"""Uploading to S3 with aiobotocore: checksums, multipart, retries, error classes.

Everything here runs on the worker process's event loop. The one place where
botocore and aiohttp exceptions become :mod:`pusher.errors` is :func:`translate`.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    NoCredentialsError,
    ParamValidationError,
    PartialCredentialsError,
)

from ._settings import PusherSettings
from .bindings import Receipt
from .errors import PermanentUploadError, TransientUploadError, UploadError

# Error codes that retrying cannot fix. Other 4xx are permanent too, except these
# throttling and timeout statuses.
PERMANENT_CODES = frozenset(
    {
        "AccessDenied",
        "AccountProblem",
        "AllAccessDisabled",
        "InvalidAccessKeyId",
        "InvalidArgument",
        "InvalidBucketName",
        "InvalidRequest",
        "KeyTooLongError",
        "NoSuchBucket",
        "SignatureDoesNotMatch",
    }
)
RETRYABLE_STATUS = frozenset({408, 429})


def client_config(settings: PusherSettings) -> Config:
    """botocore config: the ``standard`` retry mode (set explicitly, botocore still
    defaults to ``legacy``), and a connection pool as large as the concurrency."""
    return Config(
        retries={"mode": "standard", "max_attempts": settings.s3_max_attempts},
        max_pool_connections=settings.concurrency,
        connect_timeout=10,
        read_timeout=60,
    )


@asynccontextmanager
async def translate(bucket: str, key: str) -> AsyncIterator[None]:
    """Turn botocore/aiohttp failures into a permanent or transient :class:`UploadError`."""
    where = f"s3://{bucket}/{key}"
    try:
        yield
    except UploadError:
        raise
    except ClientError as exc:
        error = exc.response.get("Error", {})
        code = str(error.get("Code", "Unknown"))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        message = f"{where}: {code}: {error.get('Message', exc)}"
        permanent = code in PERMANENT_CODES or (
            400 <= status < 500 and status not in RETRYABLE_STATUS
        )
        raise (PermanentUploadError if permanent else TransientUploadError)(message) from exc
    except (NoCredentialsError, PartialCredentialsError, ParamValidationError) as exc:
        raise PermanentUploadError(f"{where}: {exc}") from exc
    except (BotoCoreError, aiohttp.ClientError, OSError, TimeoutError) as exc:
        raise TransientUploadError(f"{where}: {type(exc).__name__}: {exc}") from exc


def sha256_b64(data: bytes) -> str:
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


async def upload(
    client: Any,
    settings: PusherSettings,
    key: str,
    body: bytes,
    metadata: Mapping[str, str],
    *,
    content_type: str = "",
) -> Receipt:
    """Store ``body`` under ``key`` and return what landed.

    S3 verifies a SHA-256 checksum of every request body (each part, for multipart),
    and we check the checksum it reports back.
    """
    bucket = settings.bucket
    prefixes = settings.prefixes
    if prefixes and not key.startswith(prefixes):
        raise PermanentUploadError(
            f"s3://{bucket}/{key}: key outside the allowed prefixes {', '.join(prefixes)}"
        )
    checksum = sha256_b64(body)
    common: dict[str, Any] = {
        "Bucket": bucket,
        "Key": key,
        "ContentType": content_type or settings.content_type,
        "Metadata": dict(metadata),
    }
    async with translate(bucket, key), asyncio.timeout(settings.task_time_limit):
        if len(body) >= settings.multipart_threshold:
            response = await _multipart(client, settings, common, body)
        else:
            response = await client.put_object(Body=body, ChecksumSHA256=checksum, **common)
            echoed = response.get("ChecksumSHA256")
            if echoed is not None and echoed != checksum:
                raise TransientUploadError(
                    f"s3://{bucket}/{key}: S3 stored checksum {echoed}, we sent {checksum}"
                )
    return Receipt(
        bucket=bucket,
        key=key,
        etag=str(response["ETag"]).strip('"'),
        size=len(body),
        version_id=response.get("VersionId"),
        checksum_sha256=checksum,
    )


async def _multipart(
    client: Any, settings: PusherSettings, common: dict[str, Any], body: bytes
) -> dict[str, Any]:
    created = await client.create_multipart_upload(ChecksumAlgorithm="SHA256", **common)
    ids = {"Bucket": common["Bucket"], "Key": common["Key"], "UploadId": created["UploadId"]}
    try:
        parts = []
        for number, start in enumerate(range(0, len(body), settings.part_size), start=1):
            chunk = body[start : start + settings.part_size]
            checksum = sha256_b64(chunk)
            part = await client.upload_part(
                Body=chunk, PartNumber=number, ChecksumSHA256=checksum, **ids
            )
            parts.append({"ETag": part["ETag"], "PartNumber": number, "ChecksumSHA256": checksum})
        result: dict[str, Any] = await client.complete_multipart_upload(
            MultipartUpload={"Parts": parts}, **ids
        )
        return result
    except BaseException:
        # Never leave an incomplete upload (and its stored parts) behind.
        await asyncio.shield(client.abort_multipart_upload(**ids))
        raise


async def check_bucket(client: Any, bucket: str) -> None:
    """Fail with one clear message if the bucket is missing or unreachable."""
    try:
        await client.head_bucket(Bucket=bucket)
    except ClientError as exc:
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        if status == 404:
            raise PermanentUploadError(f"bucket {bucket!r} does not exist (PUSHER_BUCKET)") from exc
        if status == 403:
            raise PermanentUploadError(
                f"access to bucket {bucket!r} denied: check the AWS credentials"
            ) from exc
        raise PermanentUploadError(f"bucket {bucket!r}: {exc}") from exc
    except (NoCredentialsError, PartialCredentialsError) as exc:
        raise PermanentUploadError(
            f"no usable AWS credentials ({exc}); set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY or another source of the AWS chain"
        ) from exc
    except (BotoCoreError, aiohttp.ClientError, OSError) as exc:
        raise PermanentUploadError(f"cannot reach S3 to check bucket {bucket!r}: {exc}") from exc
