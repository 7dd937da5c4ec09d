"""kombu's Redis envelope of a small task message, as a producer pushes it."""

from __future__ import annotations

import base64
import uuid
from typing import Any


def envelope(queue: str = "q", *, tag: str | None = None, headers: Any = None) -> dict[str, Any]:
    """The envelope kombu pushes for ``{"x": 1}`` to ``queue`` (a fresh delivery tag)."""
    return {
        "body": base64.b64encode(b'{"x": 1}').decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {} if headers is None else headers,
        "properties": {
            "body_encoding": "base64",
            "delivery_tag": tag or str(uuid.uuid4()),
            "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": 0,
        },
    }
