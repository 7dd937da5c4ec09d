"""JSON Schema of contracts as their calls travel: for ``celerybridge contracts``, its
AsyncAPI document, and the type comparison of ``celerybridge check``.

A call crosses the broker as Celery's protocol 2 body ``[args, kwargs, embed]``: the
positional parameters in order as a JSON array, the keyword-only ones as an object.
``bytes`` travel as base64 strings (a model's ``bytes`` fields as its config says:
UTF-8 text by default). The schemas say exactly that (JSON Schema 2020-12).
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any, NotRequired, Required, cast

from pydantic import TypeAdapter
from pydantic.errors import PydanticUserError
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaValue
from pydantic_core import CoreSchema, PydanticSerializationError
from typing_extensions import TypedDict  # pydantic needs it on Python < 3.12

from ._validation import _CONFIG

if TYPE_CHECKING:
    from ._contracts import RemoteTask
    from ._validation import Binder

DIALECT = "https://json-schema.org/draft/2020-12/schema"
"""The ``$schema`` of every schema celerybridge writes."""


INTEGER_KEY = "^-?[0-9]+$"
"""The ``propertyNames`` pattern of ``int`` dict keys (as JSON writes them)."""
NUMBER_KEY = "^-?(0|[1-9][0-9]*)(\\.[0-9]+)?([eE][+-]?[0-9]+)?$"
"""The ``propertyNames`` pattern of ``float`` dict keys (JSON numbers)."""
_KEYS: dict[str, dict[str, Any]] = {
    "int": {"pattern": INTEGER_KEY},
    "float": {"pattern": NUMBER_KEY},
    "bool": {"enum": ["true", "false"]},
}


class WireJsonSchema(GenerateJsonSchema):
    """pydantic's JSON Schema, with ``bytes`` as they travel (base64 strings, or UTF-8
    text in a model that keeps pydantic's default) and the keys of ``dict[int, ...]``,
    ``dict[float, ...]`` and ``dict[bool, ...]`` as ``propertyNames`` (pydantic leaves
    them out: such a dict looks like ``dict[str, ...]``)."""

    def bytes_schema(self, schema: CoreSchema) -> JsonSchemaValue:
        # The config in force (a model's own, or the bridge's _CONFIG) decides the wire.
        config = self._config
        encoding = config.ser_json_bytes if self.mode == "serialization" else config.val_json_bytes
        if encoding == "base64":
            # minLength/maxLength would count bytes, not base64 characters: left out.
            return {"type": "string", "contentEncoding": "base64"}
        if encoding == "hex":
            return {"type": "string", "contentEncoding": "base16"}
        return {"type": "string"}  # pydantic's default: the bytes as UTF-8 text

    def dict_schema(self, schema: CoreSchema) -> JsonSchemaValue:
        json_schema = super().dict_schema(schema)  # type: ignore[arg-type]
        keys = schema.get("keys_schema", {}).get("type")
        if "propertyNames" not in json_schema and keys in _KEYS:
            json_schema["propertyNames"] = dict(_KEYS[keys])
        return json_schema


def _annotation(param: inspect.Parameter | Any) -> Any:
    annotation = param.annotation if isinstance(param, inspect.Parameter) else param
    empty = annotation is inspect.Parameter.empty or annotation is inspect.Signature.empty
    return Any if empty else annotation


def _adapter(annotation: Any) -> TypeAdapter[Any]:
    try:
        return TypeAdapter(annotation, config=_CONFIG)
    except PydanticUserError:  # models and dataclasses carry their own config
        return TypeAdapter(annotation)


def type_schema(annotation: Any, *, returned: bool = False) -> dict[str, Any]:
    """The JSON Schema of one annotation (``{}`` for none), ``$defs`` included: of the
    values it accepts, or with ``returned``, of the values it is serialised to.

    Raises pydantic's errors for annotations it cannot describe.
    """
    adapter = _adapter(_annotation(annotation))
    return adapter.json_schema(
        schema_generator=WireJsonSchema, mode="serialization" if returned else "validation"
    )


def _default(annotation: Any, default: Any) -> tuple[bool, Any]:
    try:
        return True, _adapter(annotation).dump_python(default, mode="json")
    except (PydanticSerializationError, ValueError, TypeError):
        return False, None


def args_schema(binder: Binder) -> dict[str, Any]:
    """The positional arguments as they travel: a JSON array, one item per parameter."""
    params = [binder.signature.parameters[name] for name in binder.positional]
    annotations = tuple(_annotation(p) for p in params)
    schema = type_schema(tuple[annotations] if annotations else tuple[()])  # type: ignore[valid-type]
    items = schema.get("prefixItems", [])
    for index, param in enumerate(params):
        item = {"title": param.name, **items[index]}
        if param.default is not inspect.Parameter.empty:
            known, value = _default(annotations[index], param.default)
            if known:
                item["default"] = value
        items[index] = item
    required = sum(p.default is inspect.Parameter.empty for p in params)
    schema.update(minItems=required, maxItems=len(params))
    if items:
        schema["prefixItems"] = items
    return {"$schema": DIALECT, "title": f"{binder.task} v{binder.version} args", **schema}


def kwargs_schema(binder: Binder) -> dict[str, Any]:
    """The keyword-only arguments as they travel: a JSON object (empty when there are none)."""
    params = [p for name, p in binder.signature.parameters.items() if name not in binder.positional]
    fields = {
        p.name: (NotRequired if p.default is not inspect.Parameter.empty else Required)[
            _annotation(p)
        ]
        for p in params
    }
    typed: Any = cast(Any, TypedDict)("kwargs", fields)
    typed.__pydantic_config__ = _CONFIG
    schema = type_schema(typed)
    schema.pop("title", None)
    properties = schema.setdefault("properties", {})
    for param in params:
        if param.default is not inspect.Parameter.empty:
            known, value = _default(_annotation(param), param.default)
            if known:
                properties[param.name]["default"] = value
    schema["additionalProperties"] = False
    return {"$schema": DIALECT, "title": f"{binder.task} v{binder.version} kwargs", **schema}


def returns_schema(binder: Binder) -> dict[str, Any]:
    """What the task returns, as stored in the result backend."""
    schema = type_schema(binder.signature.return_annotation, returned=True)
    return {"$schema": DIALECT, **schema}


def describe(stub: RemoteTask[Any, Any], *, default: bool) -> dict[str, Any]:
    """One contract version as ``celerybridge contracts`` prints it."""
    doc = inspect.getdoc(stub.__wrapped__)
    return {
        "name": stub.name,
        "version": stub.version,
        "wire_name": stub.wire_name,
        "queue": stub.queue,
        "default": default,
        "deprecated": stub.deprecated,
        "description": doc,
        "args": args_schema(stub.binder),
        "kwargs": kwargs_schema(stub.binder),
        "returns": returns_schema(stub.binder),
    }
