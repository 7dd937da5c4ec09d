"""``celerybridge contracts --format asyncapi``: the contracts as an AsyncAPI 3.0 document.

One channel per queue (its address is the queue name: the Redis list, the AMQP queue),
one message per contract version, in Celery's protocol 2 envelope: the headers Celery
reads (``task`` is the wire name, ``id`` the task id) and the body
``[args, kwargs, embed]``. Schemas are AsyncAPI Schema Objects (JSON Schema draft-07):
tuples as ``items`` arrays, models under ``components.schemas``. What a version returns
is under ``x-celerybridge-returns``; AsyncAPI has no place for a result stored in a
result backend.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from ._constants import SERVICE_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER
from ._schema import args_schema, kwargs_schema, returns_schema

if TYPE_CHECKING:
    from ._registry import Contract

ASYNCAPI_VERSION = "3.0.0"
_ID = re.compile(r"[^\w.\-]")
_NULLABLE_STRING = {"type": ["string", "null"]}

# Celery's protocol 2 embed: what runs after the task (celerybridge sends it empty).
_EMBED = {
    "type": "object",
    "properties": {
        "callbacks": {"type": ["array", "null"]},
        "errbacks": {"type": ["array", "null"]},
        "chain": {"type": ["array", "null"]},
        "chord": {"type": ["object", "null"]},
    },
}


def _headers(wire_name: str) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["task", "id"],
        "properties": {
            "lang": {"type": "string", "const": "py"},
            "task": {"type": "string", "const": wire_name},
            "id": {"type": "string", "description": "The task id (also the correlation id)."},
            "root_id": _NULLABLE_STRING,
            "parent_id": _NULLABLE_STRING,
            "group": _NULLABLE_STRING,
            "shadow": _NULLABLE_STRING,
            "eta": {"type": ["string", "null"], "format": "date-time"},
            "expires": {"type": ["string", "null"], "format": "date-time"},
            "retries": {"type": "integer", "minimum": 0},
            "timelimit": {"type": "array", "items": {"type": ["number", "null"]}},
            "argsrepr": {"type": "string"},
            "kwargsrepr": {"type": "string"},
            "origin": {"type": "string"},
            SERVICE_HEADER: {"type": "string", "description": "The sending service's name."},
            SIGNATURE_HEADER: {"type": "string", "description": "HMAC, when messages are signed."},
            TIMESTAMP_HEADER: {"type": "string", "description": "When it was signed."},
        },
    }


def _ident(text: str) -> str:
    return _ID.sub("_", text)


class _Ids:
    """Component ids, one per name: names that differ only in characters an id cannot
    hold (``rt:q``, ``rt_q``) get ids that differ too (``rt_q``, ``rt_q_``)."""

    def __init__(self) -> None:
        self._ids: dict[str, str] = {}
        self._taken: set[str] = set()

    def __call__(self, name: str) -> str:
        known = self._ids.get(name)
        if known is not None:
            return known
        new = _ident(name)
        while new in self._taken:
            new += "_"
        self._ids[name] = new
        self._taken.add(new)
        return new


class _Schemas:
    """``components.schemas``: the models of every contract, one name each."""

    def __init__(self) -> None:
        self.schemas: dict[str, Any] = {}
        self._raw: dict[str, Any] = {}  # as pydantic wrote them, to tell clashes

    def add(self, schema: dict[str, Any]) -> dict[str, Any]:
        """``schema`` as draft-07, its ``$defs`` moved here (renamed on a clash)."""
        definitions = schema.get("$defs", {})
        renamed: dict[str, str] = {}
        for name, definition in definitions.items():
            new = _ident(name)
            while new in self._raw and self._raw[new] != definition:
                new += "_"
            renamed[name] = new
        for name, new in renamed.items():
            if new not in self._raw:
                self._raw[new] = definitions[name]
                self.schemas[new] = _draft7(definitions[name], renamed)
        rest = {k: v for k, v in schema.items() if k not in ("$defs", "$schema")}
        converted: dict[str, Any] = _draft7(rest, renamed)
        return converted


def _draft7(value: Any, renamed: dict[str, str]) -> Any:
    """A 2020-12 schema (as pydantic writes it) in draft-07's words."""
    if isinstance(value, list):
        return [_draft7(v, renamed) for v in value]
    if not isinstance(value, dict):
        return value
    out = {k: _draft7(v, renamed) for k, v in value.items()}
    discriminator = value.get("discriminator")
    if isinstance(discriminator, dict):
        # OpenAPI's {propertyName, mapping} (pydantic's); an AsyncAPI Schema Object's
        # discriminator is the property name. The oneOf branches hold the mapping.
        out["discriminator"] = discriminator.get("propertyName")
    ref = out.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/$defs/"):
        name = ref.removeprefix("#/$defs/")
        out["$ref"] = f"#/components/schemas/{renamed.get(name, _ident(name))}"
    if "prefixItems" in value:
        rest = out.pop("items", None)
        out["items"] = out.pop("prefixItems")
        if rest is not None:
            out["additionalItems"] = rest
    return out


def document(contracts: Iterable[Contract], *, title: str, version: str) -> dict[str, Any]:
    """The AsyncAPI 3.0 document of ``contracts``."""
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    messages: dict[str, Any] = {}
    schemas = _Schemas()
    channel_ids, message_ids = _Ids(), _Ids()
    for contract in contracts:
        for number, stub in sorted(contract.versions.items()):
            channel_id = channel_ids(stub.queue)
            message_id = message_ids(stub.wire_name)
            channel = channels.setdefault(
                channel_id,
                {
                    "address": stub.queue,
                    "title": stub.queue,
                    "description": f"The queue {stub.queue!r}: tasks for its workers.",
                    "messages": {},
                    "bindings": {
                        "amqp": {
                            "is": "queue",
                            "queue": {"name": stub.queue, "durable": True},
                            "bindingVersion": "0.3.0",
                        }
                    },
                },
            )
            channel["messages"][message_id] = {"$ref": f"#/components/messages/{message_id}"}
            doc = inspect.getdoc(stub.__wrapped__) or ""
            body = {
                "type": "array",
                "description": "Celery protocol 2 body: [args, kwargs, embed].",
                "items": [
                    schemas.add(args_schema(stub.binder)),
                    schemas.add(kwargs_schema(stub.binder)),
                    _EMBED,
                ],
                "minItems": 3,
                "maxItems": 3,
            }
            message: dict[str, Any] = {
                "name": stub.wire_name,
                "title": f"{stub.name} v{number}",
                "contentType": "application/json",
                "headers": _headers(stub.wire_name),
                "payload": body,
                "correlationId": {"location": "$message.header#/id"},
                "bindings": {"amqp": {"contentEncoding": "utf-8", "bindingVersion": "0.3.0"}},
                "x-celerybridge-task": stub.name,
                "x-celerybridge-version": number,
                "x-celerybridge-default": number == contract.default_version,
                "x-celerybridge-deprecated": stub.deprecated,
                "x-celerybridge-returns": schemas.add(returns_schema(stub.binder)),
            }
            if doc:
                message["summary"] = doc.splitlines()[0]
                message["description"] = doc
            messages[message_id] = message
            operations[message_id] = {
                "action": "receive",
                "channel": {"$ref": f"#/channels/{channel_id}"},
                "messages": [{"$ref": f"#/channels/{channel_id}/messages/{message_id}"}],
                "title": f"run {stub.name} v{number}",
            }
    return {
        "asyncapi": ASYNCAPI_VERSION,
        "info": {
            "title": title,
            "version": version,
            "description": "Celery tasks declared as celerybridge contracts.",
        },
        "defaultContentType": "application/json",
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages, "schemas": schemas.schemas},
    }
