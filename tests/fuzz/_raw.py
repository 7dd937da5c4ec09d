"""Redis list entries that are not kombu envelopes, or not quite."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from ._model import MIB, Ctx, Raw
from ._wire import DELETE, Expect

# -- raw Redis entries ----------------------------------------------------------------


def _raw(label: str, make: Callable[[Ctx, bytes], bytes], expect: Expect = "refuse") -> Raw:
    return Raw("redis-raw", label, expect, make)


def _envelope_change(label: str, path: str, value: Any, expect: Expect = "refuse") -> Raw:
    """The valid envelope with one field changed (``DELETE``: removed)."""

    def make(ctx: Ctx, valid: bytes) -> bytes:
        document = json.loads(valid)
        target = document
        parts = path.split(".")
        for part in parts[:-1]:
            target = target[part]
        new = value(ctx) if callable(value) else value
        if new is DELETE:
            del target[parts[-1]]
        else:
            target[parts[-1]] = new
        return json.dumps(document).encode()

    return _raw(label, make, expect)


def _marked(text: str) -> Callable[[Ctx], str]:
    return lambda ctx: f"{text} {ctx.marker}"


RAW_ENTRIES = [
    _raw("empty", lambda c, v: b""),
    _raw("not JSON", lambda c, v: b"not json " + c.marker.encode()),
    _raw("NUL then marker", lambda c, v: b"\x00" + c.marker.encode()),
    _raw("cut short after its headers", lambda c, v: v[: v.index(b'"properties"')]),
    _raw("a JSON list", lambda c, v: json.dumps([c.marker, 1, None]).encode()),
    _raw("a JSON string", lambda c, v: json.dumps(c.marker).encode()),
    _raw("the envelope in a list", lambda c, v: b"[" + v + b"]"),
    _raw("the envelope twice", lambda c, v: v + v),
    _raw("not UTF-8", lambda c, v: v.replace(b'"body"', b'"b\xffody"', 1)),
    _raw("megabytes of junk", lambda c, v: c.marker.encode() + b"j" * (3 * MIB)),
    _raw("100,000 brackets", lambda c, v: b"[" * 100_000 + c.marker.encode()),
    _raw(
        "headers 100,000 deep",
        lambda c, v: v.replace(b'"headers": {', b'"headers": {"x": ' + b"[" * 100_000, 1),
    ),
    _envelope_change("headers a string", "headers", _marked("headers")),
    _envelope_change("headers a list", "headers", lambda c: [c.marker]),
    _envelope_change("headers a number", "headers", 7),
    _envelope_change("headers null", "headers", None),
    _envelope_change("body not base64", "body", _marked("%%% not base64 %%%")),
    _envelope_change("body missing", "body", DELETE),
    _envelope_change("body null", "body", None),
    _envelope_change("body a number", "body", 12),
    _envelope_change("body a dict", "body", lambda c: {"m": c.marker}),
    _envelope_change("no properties", "properties", DELETE),
    _envelope_change("properties a string", "properties", _marked("props")),
    _envelope_change("properties a list", "properties", lambda c: [c.marker]),
    _envelope_change("properties null", "properties", None),
    _envelope_change("delivery_info missing", "properties.delivery_info", DELETE),
    _envelope_change("delivery_info a string", "properties.delivery_info", _marked("di")),
    _envelope_change("delivery_info empty", "properties.delivery_info", {}),
    _envelope_change("delivery_tag missing", "properties.delivery_tag", DELETE),
    _envelope_change("delivery_tag a list", "properties.delivery_tag", lambda c: [c.marker]),
    _envelope_change("delivery_tag a dict", "properties.delivery_tag", lambda c: {"t": c.marker}),
    _envelope_change("body_encoding rot13", "properties.body_encoding", "rot13"),
    _envelope_change("body_encoding missing", "properties.body_encoding", DELETE),
    _envelope_change("content-type a number", "content-type", 5),
    _envelope_change("content-encoding a list", "content-encoding", ["utf-8"]),
    _envelope_change("an extra top-level key", "x-fuzz", _marked("extra"), "either"),
    _envelope_change(
        "routing_key of another queue",
        "properties.delivery_info.routing_key",
        lambda c: f"{c.queue}-elsewhere",
        "either",
    ),
]


def _forged_route() -> Raw:
    """A malformed message claiming to come from another queue: its dead letter belongs
    on this queue's dead-letter queue, not the other's."""

    def make(ctx: Ctx, valid: bytes) -> bytes:
        document = json.loads(valid)
        document["properties"]["delivery_info"]["routing_key"] = f"{ctx.queue}-victim"
        document["content-type"] = "application/x-python-serialize"
        return json.dumps(document).encode()

    return _raw("malformed, routing_key of another queue", make)


RAW_ENTRIES.append(_forged_route())
