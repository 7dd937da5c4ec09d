# mypy: disable-error-code="empty-body"
"""The pusher's contract, for the services that call it. Light: pydantic only.

``pusher.send_to_s3(key, content)`` (v1, the default),
``pusher.send_to_s3_v2(key, content, meta)`` (v2: ``meta`` becomes S3 user metadata) and
``pusher.send_to_s3_v3(key, content: bytes, meta=None, content_type=...)`` (v3: any bytes,
base64 on the wire), all on the ``pusher`` queue, all returning a :class:`Receipt`.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Annotated, Final

from pydantic import AfterValidator, BaseModel, NonNegativeInt

from celerybridge import remote_task

QUEUE: Final = "pusher"
MAX_KEY_BYTES: Final = 1024
REVISION_META: Final = "pusher-revision"
"""The user-metadata entry holding an object's revision (reserved: callers cannot set it)."""
MAX_CONTENT_BYTES: Final = 64 * 1024 * 1024
"""Largest content accepted, checked by the caller before anything is sent."""
# RFC 9110: type "/" subtype *( OWS ";" OWS name "=" ( token / quoted-string ) ), OWS being
# spaces and tabs only: the value becomes an HTTP header, so no CR, LF or other controls.
_TOKEN: Final = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_QUOTED: Final = r'"(?:[\t !#-\[\]-~]|\\[\t -~])*"'
_MEDIA_TYPE: Final = re.compile(
    rf"{_TOKEN}/{_TOKEN}(?:[ \t]*;[ \t]*{_TOKEN}=(?:{_TOKEN}|{_QUOTED}))*"
)


def key_problem(key: str) -> str | None:
    """Why the pusher refuses ``key``, or ``None`` if it is a key it writes.

    A key is a relative path of ``/``-separated names that no server reads as another
    path: not empty, at most :data:`MAX_KEY_BYTES` bytes of UTF-8, no control
    characters, no backslash (some servers read it as ``/``), no leading ``/``, no empty
    segment (``//`` or a trailing ``/``), no ``.`` or ``..`` segment. So a key is its own
    ``posixpath.normpath``, and a server that normalises paths, or stores objects as
    files, stores it where a prefix check on its text says it goes.
    """
    if not key:
        return "an S3 key cannot be empty"
    size = len(key.encode())
    if size > MAX_KEY_BYTES:
        return f"an S3 key is at most {MAX_KEY_BYTES} bytes of UTF-8, this one is {size}"
    bad = next((c for c in key if unicodedata.category(c) == "Cc"), None)
    if bad is not None:
        return f"an S3 key cannot contain control characters, found {bad!r}"
    if "\\" in key:
        return "an S3 key cannot contain a backslash (some S3 servers read it as '/')"
    if key.startswith("/"):
        return "an S3 key cannot start with '/'"
    segments = key.split("/")
    if "" in segments:
        return "an S3 key cannot have an empty segment ('//', or a '/' at the end)"
    dots = next((s for s in segments if s in {".", ".."}), None)
    if dots is not None:
        return f"an S3 key cannot have a {dots!r} segment"
    return None


def _check_key(key: str) -> str:
    problem = key_problem(key)
    if problem is not None:
        raise ValueError(problem)
    return key


def _check_content(content: str) -> str:
    size = len(content.encode())
    if size > MAX_CONTENT_BYTES:
        raise ValueError(
            f"content is {size} bytes of UTF-8; the pusher takes at most {MAX_CONTENT_BYTES}"
        )
    return content


def _check_binary(content: bytes) -> bytes:
    if len(content) > MAX_CONTENT_BYTES:
        raise ValueError(
            f"content is {len(content)} bytes; the pusher takes at most {MAX_CONTENT_BYTES}"
        )
    return content


def _check_content_type(value: str) -> str:
    if not _MEDIA_TYPE.fullmatch(value):
        raise ValueError(f"{value!r} is not a media type like 'image/png'")
    return value


def _check_meta(meta: dict[str, str]) -> dict[str, str]:
    # S3 sends user metadata as HTTP headers: keep it printable ASCII, small.
    for name, value in meta.items():
        if name.lower() == REVISION_META:
            raise ValueError(f"metadata {name!r} is reserved: pass revision= instead")
        if not name.isascii() or not value.isascii() or not name.replace("-", "").isalnum():
            raise ValueError(f"metadata {name!r} must be ASCII, its name letters, digits and '-'")
    if sum(len(k) + len(v) for k, v in meta.items()) > 2048:
        raise ValueError("user metadata is limited to 2 KiB in all")
    return meta


S3Key = Annotated[str, AfterValidator(_check_key)]
Content = Annotated[str, AfterValidator(_check_content)]
BinaryContent = Annotated[bytes, AfterValidator(_check_binary)]
"""Any bytes: base64 in the task message, stored as they are."""
MediaType = Annotated[str, AfterValidator(_check_content_type)]
Metadata = Annotated[dict[str, str], AfterValidator(_check_meta)]


class Receipt(BaseModel):
    """What landed in S3."""

    bucket: str
    key: str
    etag: str
    size: int
    """Bytes stored (for ``str`` content, its UTF-8 encoding)."""
    version_id: str | None = None
    """The object version, when the bucket has versioning on."""
    checksum_sha256: str
    """Base64 SHA-256 of the stored bytes, verified by S3 on upload."""
    written: bool = True
    """``False`` when the call carried a ``revision`` and S3 already held that revision or
    a newer one: nothing was written, and the other fields describe the stored object."""


# --8<-- [start:contracts]
@remote_task(name="pusher.send_to_s3", queue=QUEUE)
def send_to_s3(key: S3Key, content: Content) -> Receipt:
    """Store ``content`` (UTF-8) under ``key`` with content type ``application/json``."""


@remote_task(name="pusher.send_to_s3", queue=QUEUE, version=2)
def send_to_s3_v2(key: S3Key, content: Content, meta: Metadata) -> Receipt:
    """As v1, and store ``meta`` as the object's S3 user metadata."""


@remote_task(name="pusher.send_to_s3", queue=QUEUE, version=3)
def send_to_s3_v3(
    key: S3Key,
    content: BinaryContent,
    meta: Metadata | None = None,
    content_type: MediaType = "application/octet-stream",
    revision: NonNegativeInt | None = None,
) -> Receipt:
    """Store any bytes (base64 on the wire) with a content type and optional metadata.

    With ``revision`` (a number that grows with every save of ``key``, e.g. the saved
    record's version), writes are ordered: content older than what S3 holds is never
    written, so a late or redelivered call cannot replace newer content. The receipt
    then says ``written=False``.
    """


# --8<-- [end:contracts]
