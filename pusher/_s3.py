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
from .bindings import REVISION_META, Receipt, key_problem
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
        retries={"mode": "standard", "total_max_attempts": settings.s3_max_attempts},
        max_pool_connections=settings.concurrency,
        connect_timeout=settings.s3_connect_timeout,
        read_timeout=settings.s3_read_timeout,
    )


def _status(exc: ClientError) -> int:
    """The HTTP status of S3's answer (0 if there was none)."""
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)


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
        status = _status(exc)
        message = f"{where}: {code}: {error.get('Message', exc)}"
        permanent = code in PERMANENT_CODES or (
            400 <= status < 500 and status not in RETRYABLE_STATUS
        )
        raise (PermanentUploadError if permanent else TransientUploadError)(message) from exc
    except (NoCredentialsError, PartialCredentialsError, ParamValidationError) as exc:
        raise PermanentUploadError(f"{where}: {exc}") from exc
    except (BotoCoreError, aiohttp.ClientError, OSError, TimeoutError) as exc:
        raise TransientUploadError(f"{where}: {type(exc).__name__}: {exc}") from exc


def under_prefix(key: str, prefixes: tuple[str, ...]) -> bool:
    """Whether ``key`` lies in one of the folders ``prefixes`` name, segment by segment.

    ``key`` must already follow the key rules: then ``startswith("items/")`` means its
    first segment is ``items`` and at least one segment follows.
    """
    return any(key.startswith(prefix.removesuffix("/") + "/") for prefix in prefixes)


def check_key(settings: PusherSettings, key: str, service: str | None) -> None:
    """Refuse a key that breaks the key rules, or lies outside ``PUSHER_ALLOWED_PREFIXES``
    or the calling service's prefixes, with a :class:`PermanentUploadError`.

    The rules (:func:`pusher.bindings.key_problem`: no ``.`` or ``..`` segment, no empty
    segment, no leading ``/``, no backslash, no control character...) make a key its
    own normal form, so ``svc-a/../svc-b/x.json`` cannot pass ``svc-a/`` and land under
    ``svc-b/`` on a server that normalises paths. The contract checks them too, on the
    caller and again on receipt; this check holds for any caller of :func:`upload`.
    Prefixes are folders compared segment by segment: ``svc-a`` and ``svc-a/`` both
    admit ``svc-a/x.json``, neither admits ``svc-ab/x.json``.
    """
    problem = key_problem(key)
    if problem is not None:
        shown = repr(key) if len(key) <= 100 else f"{key[:100]!r}..."
        raise PermanentUploadError(f"s3://{settings.bucket}: key {shown} refused: {problem}")
    where = f"s3://{settings.bucket}/{key}"
    prefixes = settings.prefixes
    if prefixes and not under_prefix(key, prefixes):
        raise PermanentUploadError(
            f"{where}: key outside the allowed prefixes {', '.join(prefixes)}"
        )
    if not settings.service_prefixes:
        return
    mine = settings.service_prefixes.get(service or "")
    if mine is None:
        who = f"service {service!r}" if service else "a caller that does not name its service"
        raise PermanentUploadError(
            f"{where}: {who} may not write here (PUSHER_SERVICE_PREFIXES lists "
            f"{', '.join(sorted(settings.service_prefixes))})"
        )
    if not under_prefix(key, mine):
        raise PermanentUploadError(
            f"{where}: service {service!r} may write only under {', '.join(mine)}"
        )


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
    revision: int | None = None,
    service: str | None = None,
) -> Receipt:
    """Store ``body`` under ``key`` and return what landed.

    S3 verifies a SHA-256 checksum of every request body (each part, for multipart),
    and we check the checksum it reports back. With ``revision``, see :func:`_ordered`.
    ``service`` is the calling service, checked against ``PUSHER_SERVICE_PREFIXES``.
    """
    bucket = settings.bucket
    check_key(settings, key, service)
    checksum = sha256_b64(body)
    common: dict[str, Any] = {
        "Bucket": bucket,
        "Key": key,
        "ContentType": content_type or settings.content_type,
        "Metadata": dict(metadata),
    }
    async with translate(bucket, key), asyncio.timeout(settings.task_time_limit):
        if revision is None:
            response = await _put(client, settings, common, body, checksum, {})
        else:
            common["Metadata"][REVISION_META] = str(revision)
            ordered = await _ordered(client, settings, common, body, checksum, revision)
            if isinstance(ordered, Receipt):
                return ordered  # S3 holds this revision or a newer one
            response = ordered
    return Receipt(
        bucket=bucket,
        key=key,
        etag=str(response["ETag"]).strip('"'),
        size=len(body),
        version_id=response.get("VersionId"),
        checksum_sha256=checksum,
    )


async def _put(
    client: Any,
    settings: PusherSettings,
    common: dict[str, Any],
    body: bytes,
    checksum: str,
    condition: dict[str, str],
) -> dict[str, Any]:
    if len(body) >= settings.multipart_threshold:
        return await _multipart(client, settings, common, body, condition)
    response: dict[str, Any] = await client.put_object(
        Body=body, ChecksumSHA256=checksum, **common, **condition
    )
    echoed = response.get("ChecksumSHA256")
    if echoed is not None and echoed != checksum:
        raise TransientUploadError(
            f"s3://{common['Bucket']}/{common['Key']}: S3 stored checksum {echoed}, "
            f"we sent {checksum}"
        )
    return response


# What a conditional write meets when another writer got there between our read and
# our write (or deleted the object): read again and decide again.
_LOST_RACE = frozenset({"PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey"})
ORDERED_ATTEMPTS = 5


async def _ordered(
    client: Any,
    settings: PusherSettings,
    common: dict[str, Any],
    body: bytes,
    checksum: str,
    revision: int,
) -> dict[str, Any] | Receipt:
    """Write only if S3 holds an older revision of the key, or none.

    Reads the stored object's revision (user metadata), then writes on condition that
    the object is still the one read (``If-Match`` its ETag, or ``If-None-Match: *``
    when there was none): a concurrent writer makes S3 refuse, and we decide again.
    Returns the stored object's :class:`Receipt` (``written=False``) when it is as new
    as ``revision`` or newer. The write of a revision equal to the stored one is
    skipped too: it is a redelivery of the same save.
    """
    where = f"s3://{common['Bucket']}/{common['Key']}"
    for _ in range(ORDERED_ATTEMPTS):
        stored = await _head(client, common["Bucket"], common["Key"])
        if stored is not None and _revision_of(stored) >= revision:
            return Receipt(
                bucket=common["Bucket"],
                key=common["Key"],
                etag=str(stored["ETag"]).strip('"'),
                size=int(stored["ContentLength"]),
                version_id=stored.get("VersionId"),
                checksum_sha256=str(stored.get("ChecksumSHA256", "")),
                written=False,
            )
        condition = {"IfMatch": stored["ETag"]} if stored else {"IfNoneMatch": "*"}
        try:
            return await _put(client, settings, common, body, checksum, condition)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in _LOST_RACE:
                raise
    raise TransientUploadError(
        f"{where}: other writers replaced the object {ORDERED_ATTEMPTS} times while we "
        f"wrote revision {revision}"
    )


async def _head(client: Any, bucket: str, key: str) -> dict[str, Any] | None:
    try:
        stored: dict[str, Any] = await client.head_object(
            Bucket=bucket, Key=key, ChecksumMode="ENABLED"
        )
    except ClientError as exc:
        if _status(exc) == 404:
            return None
        raise
    return stored


def _revision_of(stored: Mapping[str, Any]) -> int:
    """The revision an object was written with; -1 for objects written without one."""
    value = stored.get("Metadata", {}).get(REVISION_META, "")
    return int(value) if value.isdigit() else -1


async def _multipart(
    client: Any,
    settings: PusherSettings,
    common: dict[str, Any],
    body: bytes,
    condition: dict[str, str],
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
            MultipartUpload={"Parts": parts}, **ids, **condition
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
        status = _status(exc)
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
