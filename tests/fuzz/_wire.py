"""Fuzz messages as they go on a broker, and what comes back on the dead-letter queue.

A :class:`Wire` is one message at the broker's level: body bytes, headers (any value,
not only a dict), content type and encoding (``None``: the field is absent) and
properties, or, on Redis, a raw list entry pushed as it is. :class:`Broker` puts wires
on a queue without kombu's producer, which would normalise what the fuzz wants odd:
on Redis it writes the envelope kombu's Redis transport writes (``Channel._put``) and
LPUSHes it; on RabbitMQ it publishes with py-amqp, with publisher confirms, so a
message the broker refuses is known as unsendable rather than counted as sent.

It also reads dead letters without kombu's consumer: an entry kombu cannot parse must
still be counted, not crash the reader.
"""

from __future__ import annotations

import base64
import contextlib
import json
import struct
import sys
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

import amqp
import kombu
import redis
from amqp.exceptions import AMQPError
from kombu.utils.json import dumps as kombu_dumps
from kombu.utils.json import loads as kombu_loads

from celerybridge._constants import KOMBU_PRIORITY_STEPS
from celerybridge._transports._protocol import redis_queue_key

BrokerName = Literal["redis", "amqp"]
Expect = Literal["refuse", "either", "run", "once"]
"""What the worker must do with a case: dead-letter it; dead-letter it or run it (one of
the two); run it; run the first copy and dead-letter the others (a replay)."""


@dataclass(frozen=True)
class Wire:
    """One message at the broker's level."""

    body: bytes = b""
    headers: Any = None
    """Usually a dict; ``None``: no headers at all (on Redis, the key is left out)."""
    content_type: str | None = None
    content_encoding: str | None = None
    properties: dict[str, Any] = field(default_factory=dict)
    """AMQP basic properties; on Redis, what goes into the envelope's ``properties``."""
    envelope: dict[str, Any] | None = None
    """Redis only: changes to the envelope before it is written (``None`` values delete)."""
    raw: bytes | None = None
    """Redis only: the list entry, pushed as it is (everything else is ignored)."""

    def size(self) -> int:
        return len(self.raw) if self.raw is not None else len(self.body)

    def to_json(self) -> dict[str, Any]:
        """A JSON form that keeps every value's type (kombu's JSON: bytes, datetimes...);
        a header nested deeper than JSON encoders go is kept as its depth and innermost
        value."""
        headers = self.headers
        if isinstance(headers, dict):
            headers = {k: _shallow(v) for k, v in headers.items()}
        document: dict[str, Any] = json.loads(
            kombu_dumps(
                {
                    "body": base64.b64encode(self.body).decode(),
                    "headers": headers,
                    "content_type": self.content_type,
                    "content_encoding": self.content_encoding,
                    "properties": self.properties,
                    "envelope": self.envelope,
                    "raw": None if self.raw is None else base64.b64encode(self.raw).decode(),
                }
            )
        )
        return document

    @classmethod
    def from_json(cls, document: dict[str, Any]) -> Wire:
        values = kombu_loads(json.dumps(document))
        if isinstance(values["headers"], dict):
            values["headers"] = {k: _deepen(v) for k, v in values["headers"].items()}
        raw = values.pop("raw")
        return cls(
            body=base64.b64decode(values.pop("body")),
            raw=None if raw is None else base64.b64decode(raw),
            **values,
        )


_NESTED = "__fuzz_nested__"


def _shallow(value: Any, limit: int = 200) -> Any:
    """``value``, or ``{NESTED: depth, "leaf": innermost}`` for a list nested past ``limit``."""
    depth, inner = 0, value
    while isinstance(inner, list) and len(inner) == 1:
        depth, inner = depth + 1, inner[0]
    return {_NESTED: depth, "leaf": inner} if depth > limit else value


def _deepen(value: Any) -> Any:
    if isinstance(value, dict) and set(value) == {_NESTED, "leaf"}:
        inner = value["leaf"]
        for _ in range(value[_NESTED]):
            inner = [inner]
        return inner
    return value


@dataclass(frozen=True)
class DeadEntry:
    """One message taken off a dead-letter queue."""

    headers: dict[str, Any]
    body: bytes
    readable: bool = True
    """``False``: the entry was not even a kombu envelope (Redis); ``body`` is all of it."""

    def text(self) -> str:
        """Everything a marker could be found in."""
        return text_of(self.headers) + " " + self.body.decode("latin-1")


class Broker:
    """Puts wires on one broker's queues and takes dead letters off them."""

    def __init__(self, name: BrokerName, url: str) -> None:
        self.name, self.url = name, url
        self._redis: redis.Redis | None = None
        self._amqp: amqp.Connection | None = None
        self._channel: Any = None

    # -- connections ------------------------------------------------------------------

    def redis(self) -> redis.Redis:
        if self._redis is None:
            self._redis = redis.Redis.from_url(self.url)
        return self._redis

    def channel(self) -> Any:
        """An open py-amqp channel in confirm mode, that does not decode bodies."""
        if self._amqp is None or not self._amqp.connected:
            parsed = kombu.Connection(self.url)
            self._amqp = amqp.Connection(
                host=f"{parsed.hostname}:{parsed.port or 5672}",
                userid=parsed.userid or "guest",
                password=parsed.password or "guest",
                virtual_host=parsed.virtual_host or "/",
                confirm_publish=True,
            )
            self._amqp.connect()
            self._channel = None
        if self._channel is None or not self._channel.is_open:
            self._channel = self._amqp.channel()
            self._channel.auto_decode = False
        return self._channel

    def close(self) -> None:
        if self._redis is not None:
            self._redis.close()
        if self._amqp is not None:
            with contextlib.suppress(Exception):
                self._amqp.close()
        self._redis = self._amqp = self._channel = None

    # -- sending ----------------------------------------------------------------------

    def send(self, wire: Wire, queue: str) -> str | None:
        """Put ``wire`` on ``queue``; why it could not be sent, or ``None`` once it is."""
        try:
            if self.name == "redis":
                self.redis().lpush(redis_queue_key(queue, 0), redis_entry(wire, queue))
            else:
                self._publish(wire, queue)
        except (
            AMQPError,
            OSError,
            ValueError,
            TypeError,
            OverflowError,
            RecursionError,
            struct.error,
        ) as exc:
            # py-amqp may have written part of a frame: start again on a new connection.
            self.close()
            return f"{type(exc).__name__}: {exc}"[:300]
        return None

    def _publish(self, wire: Wire, queue: str) -> None:
        if wire.raw is not None or wire.envelope is not None:
            raise ValueError("a Redis envelope cannot go to RabbitMQ")
        props = dict(wire.properties)
        if wire.content_type is not None:
            props["content_type"] = wire.content_type
        if wire.content_encoding is not None:
            props["content_encoding"] = wire.content_encoding
        if wire.headers is not None:
            if not isinstance(wire.headers, dict):
                raise TypeError("AMQP headers are a table")
            props["application_headers"] = wire.headers
        message = amqp.Message(wire.body, **props)
        # py-amqp encodes header tables recursively: deep ones need a deeper stack.
        limit = sys.getrecursionlimit()
        sys.setrecursionlimit(max(limit, 100_000))
        try:
            self.channel().basic_publish(message, exchange="", routing_key=queue)
        finally:
            sys.setrecursionlimit(limit)

    # -- queues -----------------------------------------------------------------------

    def length(self, queue: str) -> int:
        """Messages waiting on ``queue`` (not those a worker holds unacknowledged)."""
        if self.name == "redis":
            return sum(int(self.redis().llen(redis_queue_key(queue, p))) for p in _STEPS)
        try:
            return int(self.channel().queue_declare(queue, passive=True).message_count)
        except AMQPError:
            self._channel = None
            return 0

    def take_dead(self, queue: str) -> list[DeadEntry]:
        """Every message on ``queue`` (a dead-letter queue), consumed."""
        taken: list[DeadEntry] = []
        if self.name == "redis":
            client = self.redis()
            for priority in _STEPS:
                key = redis_queue_key(queue, priority)
                while (entry := client.rpop(key)) is not None:
                    assert isinstance(entry, bytes)
                    taken.append(parse_redis_entry(entry))
            return taken
        try:
            channel = self.channel()
            while (message := channel.basic_get(queue, no_ack=True)) is not None:
                body = message.body
                headers = dict(message.properties.get("application_headers") or {})
                taken.append(DeadEntry(headers, body if isinstance(body, bytes) else body.encode()))
        except AMQPError:  # the queue does not exist yet: nothing refused so far
            self._channel = None
        return taken

    def purge(self, *queues: str) -> None:
        for queue in queues:
            if self.name == "redis":
                self.redis().delete(*(redis_queue_key(queue, p) for p in _STEPS))
            else:
                try:
                    self.channel().queue_delete(queue)
                except AMQPError:
                    self._channel = None


_STEPS = KOMBU_PRIORITY_STEPS


def redis_entry(wire: Wire, queue: str) -> bytes:
    """The list entry for ``wire``: kombu's Redis envelope, or the raw bytes."""
    if wire.raw is not None:
        return wire.raw
    properties: dict[str, Any] = {
        "delivery_mode": 2,
        "delivery_info": {"exchange": "", "routing_key": queue},
        "priority": 0,
        "body_encoding": "base64",
        "delivery_tag": str(uuid.uuid4()),
        **wire.properties,
    }
    envelope: dict[str, Any] = {
        "body": base64.b64encode(wire.body).decode("ascii"),
        "content-encoding": wire.content_encoding,
        "content-type": wire.content_type,
        "headers": wire.headers,
        "properties": properties,
    }
    for name in ("content-encoding", "content-type", "headers"):
        if envelope[name] is None:
            del envelope[name]
    for path, value in (wire.envelope or {}).items():
        _set(envelope, path.split("."), value)
    return kombu_dumps(envelope).encode()


_DELETE = object()


def _set(document: dict[str, Any], path: list[str], value: Any) -> None:
    """Set (or delete, for ``DELETE``) ``a.b.c`` in nested dicts; a missing or non-dict
    parent is left alone."""
    for name in path[:-1]:
        document = document.get(name)  # type: ignore[assignment]
        if not isinstance(document, dict):
            return
    if value is _DELETE:
        document.pop(path[-1], None)
    else:
        document[path[-1]] = value


DELETE: Any = _DELETE
"""An ``envelope`` value that deletes the field."""


def parse_redis_entry(entry: bytes) -> DeadEntry:
    """A Redis list entry as a message, or as opaque bytes when it is not an envelope."""
    try:
        envelope = json.loads(entry)
        headers = envelope.get("headers") or {}
        body = envelope.get("body", "")
        encoding = (envelope.get("properties") or {}).get("body_encoding")
        data = base64.b64decode(body) if encoding == "base64" else str(body).encode()
        if not isinstance(headers, dict):
            raise TypeError("headers are not a dict")
        return DeadEntry(headers, data)
    except (ValueError, TypeError, AttributeError, RecursionError):
        return DeadEntry({}, entry, readable=False)


def text_of(value: Any) -> str:
    """The strings, bytes and numbers in ``value`` (keys too), joined: what a marker can
    be found in, however deep (no recursion, unlike ``repr``)."""
    parts: list[str] = []
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)
        elif isinstance(item, bytes):
            parts.append(item.decode("latin-1"))
        else:
            parts.append(str(item))
    return " ".join(parts)
