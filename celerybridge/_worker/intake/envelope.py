"""Raw Redis list entries: what kombu needs of one before it can make it a message.

kombu's Redis transport pops an entry and parses it as a JSON envelope
(``{"body", "content-type", "content-encoding", "headers", "properties"}``); an entry
that is not one (not JSON, headers a string, a body that is not base64, no
``properties``) raised out of the worker's consumer, which exited, and the entry,
already popped and not yet recorded as unacknowledged, was gone.
:func:`envelope_refusal` says what kombu's ``Message``, acknowledgement and restore
code would trip on; such an entry is kept, as it came, in a dead letter of its own
(:func:`raw_dead_letter`).
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from ..._constants import (
    DEAD_FROM_HEADER,
    DEAD_KIND_HEADER,
    DEAD_KIND_RAW,
    DEAD_REASON_HEADER,
)
from ..._utils import uuid4_str
from .shape import MAX_DEPTH, depth_exceeds, kind_of

RAW_CONTENT_TYPE = "application/octet-stream"

# Envelope fields wrap the body: base64 makes a body a third larger, plus the headers.
_ENVELOPE_SLACK = 64 * 1024
ENVELOPE_DEPTH = MAX_DEPTH + 3  # envelope > properties > delivery_info > ...


def envelope_limit(max_message_bytes: int) -> int:
    """The largest raw entry worth parsing for bodies of ``max_message_bytes``."""
    return max_message_bytes * 4 // 3 + _ENVELOPE_SLACK


def envelope_refusal(item: bytes | str, max_message_bytes: int) -> str | None:
    """Why kombu cannot make a message of this raw Redis entry, or ``None``."""
    size = len(item)
    if size > envelope_limit(max_message_bytes):
        return (
            f"a raw entry of {size} bytes, more than a message of "
            f"{max_message_bytes} bytes can take (CELERYBRIDGE_MAX_MESSAGE_BYTES)"
        )
    try:
        text = item.decode("utf-8") if isinstance(item, bytes) else item
        payload = json.loads(text)
    except RecursionError:
        return f"not a kombu message: JSON nested deeper than {ENVELOPE_DEPTH} levels"
    except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError alike
        return f"not a kombu message: not UTF-8 JSON ({type(exc).__name__})"
    if not isinstance(payload, dict):
        return f"not a kombu message: a JSON {kind_of(payload).split()[-1]}, not an object"
    if depth_exceeds(payload, ENVELOPE_DEPTH):
        return f"not a kombu message: JSON nested deeper than {ENVELOPE_DEPTH} levels"
    properties = payload.get("properties")
    if not isinstance(properties, dict):
        return f"not a kombu message: 'properties' is {kind_of(properties)}, not an object"
    if not isinstance(properties.get("delivery_tag"), str):
        return "not a kombu message: no string 'delivery_tag' in its properties"
    info = properties.get("delivery_info")
    if not (
        isinstance(info, dict)
        and isinstance(info.get("exchange"), str)
        and isinstance(info.get("routing_key"), str)
    ):
        return "not a kombu message: 'delivery_info' lacks a string exchange and routing key"
    # kombu's restore marks a message redelivered in its headers: they must be an object.
    if not isinstance(payload.get("headers"), dict):
        return f"not a kombu message: 'headers' is {kind_of(payload.get('headers'))}, not an object"
    for name in ("content-type", "content-encoding"):
        if payload.get(name) is not None and not isinstance(payload[name], str):
            return f"not a kombu message: {name!r} is {kind_of(payload[name])}, not a string"
    body = payload.get("body")
    if body is not None and not isinstance(body, str):
        return f"not a kombu message: the body is {kind_of(body)}, not a string"
    encoding = properties.get("body_encoding")
    if encoding is not None and encoding != "base64":
        return f"not a kombu message: unknown body encoding ({kind_of(encoding)})"
    if encoding == "base64" and body:
        try:
            base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError):
            return "not a kombu message: the body is not base64"
    priority = properties.get("priority")
    if priority is not None and (not isinstance(priority, int) or isinstance(priority, bool)):
        return f"not a kombu message: 'priority' is {kind_of(priority)}, not an integer"
    return None


def raw_dead_letter(item: bytes | str, queue: str, reason: str) -> dict[str, Any]:
    """A kombu envelope carrying ``item`` untouched (base64) as a dead letter of ``queue``."""
    raw = item.encode("utf-8", "surrogateescape") if isinstance(item, str) else item
    return {
        "body": base64.b64encode(raw).decode("ascii"),
        "content-encoding": "binary",
        "content-type": RAW_CONTENT_TYPE,
        "headers": {
            DEAD_REASON_HEADER: reason,
            DEAD_FROM_HEADER: queue,
            DEAD_KIND_HEADER: DEAD_KIND_RAW,
        },
        "properties": {
            "body_encoding": "base64",
            "delivery_tag": uuid4_str(),
            "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": 0,
        },
    }
