"""Records of the unacknowledged hash, and moving a raw entry to the dead letters.

kombu's restore reads a record as ``[message, exchange, routing_key]`` and logs and drops
one it cannot read; here such a record, an entry the intake refuses, and an entry the
take script set apart on ``<queue>.dead.held`` all go, as they came, to
``<queue>.dead`` through :func:`dead_letter`: one transaction that moves the entry and
drops where it was, then one log line.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from typing import Any

from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps, loads

from ..._constants import DEAD_LETTER_SUFFIX
from ..intake.envelope import raw_dead_letter

log = logging.getLogger("celerybridge.redis")

_RECORD_TAIL = re.compile(rb',\s*("(?:[^"\\]|\\.)*")\s*,\s*("(?:[^"\\]|\\.)*")\s*\]\s*\Z', re.S)

Found = tuple[bytes, str, str]
"""An entry to dead-letter: its bytes as they came, its queue, and why."""


class Unrestorable(Exception):
    """A record kombu's restore cannot put back (it logged and dropped such records)."""


def key_for(client: Any, command: str, key: str) -> str:
    """``key`` as ``command`` must name it on ``client``: kombu's prefixing client and
    pipeline prefix only the commands they list (not ``ZSCORE``, ``LINDEX``, ``LRANGE``
    nor ``LREM``)."""
    prefix = getattr(client, "global_keyprefix", "") or ""
    if prefix and command not in getattr(client, "PREFIXED_SIMPLE_COMMANDS", ()):
        return prefix + key
    return key


def read_record(payload: bytes) -> tuple[dict[str, Any], Any, Any]:
    """A record of ``unacked`` as kombu's restore reads it; :class:`Unrestorable` when
    Python cannot parse it, or kombu's restore would raise on it."""
    try:
        message, exchange, routing_key = loads(bytes_to_str(payload))
    except (ValueError, TypeError) as exc:
        raise Unrestorable(f"an unacknowledged record Python cannot read ({exc})") from exc
    properties = message.get("properties") if isinstance(message, dict) else None
    if not (
        isinstance(message, dict)
        and isinstance(message.get("headers"), dict)
        and isinstance(properties, dict)
        and isinstance(properties.get("delivery_info"), dict)
    ):
        raise Unrestorable("an unacknowledged record kombu cannot put back (not an envelope)")
    return message, exchange, routing_key


def split_record(payload: bytes) -> tuple[bytes, str | None]:
    """The entry a record holds, as it came, and its routing key (``None`` if unreadable)."""
    match = _RECORD_TAIL.search(payload)
    if not payload.startswith(b"[") or match is None:
        return payload, None
    try:
        routing_key = json.loads(match.group(2))
    except ValueError:
        routing_key = None
    return payload[1 : match.start()], routing_key if isinstance(routing_key, str) else None


def dead_letter(
    client: Any,
    read: Callable[[Any], Found | None],
    drop: Callable[[Any], None],
    *watched: str,
) -> bool:
    """In one transaction (watching ``watched``): ``read`` the entry on the pipeline,
    ``drop`` it where it was, and push it as a raw dead letter to ``<queue>.dead``; then
    log. Whether an entry was found and moved."""
    moved: list[tuple[int, str, str, str]] = []

    def move(pipe: Any) -> None:
        found = read(pipe)
        pipe.multi()
        drop(pipe)
        moved.clear()
        if found is not None:
            item, queue, reason = found
            dead = queue + DEAD_LETTER_SUFFIX
            pipe.lpush(dead, dumps(raw_dead_letter(item, queue, reason)))
            moved.append((len(item), queue, dead, reason))

    client.transaction(move, *watched)
    for size, queue, dead, reason in moved:
        log.error("a raw entry of %d bytes on %s moved to %s: %s", size, queue, dead, reason)
    return bool(moved)
