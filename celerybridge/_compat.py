"""Whether one JSON Schema admits every value another admits: the type check of
``celerybridge check``.

``subset(narrow, wide)`` answers for a practical subset of JSON Schema, the one pydantic
writes for the annotations of contracts: ``type``, ``format`` and ``contentEncoding``,
``enum`` and ``const``, ``anyOf``/``oneOf``, ``$ref`` to ``$defs``, array ``items`` and
``prefixItems``, object ``properties``/``required``/``additionalProperties`` and
``propertyNames``, and the numeric, length and size bounds. What it cannot decide (a
``pattern`` of the wide side the narrow side does not repeat, an ``allOf`` of several
schemas, a keyword outside the subset) is :data:`UNKNOWN`-ish: ``ok is None``, never a
guess. Recursive models are compared coinductively, by pairs of ``$ref`` names.

A ``format`` or ``contentEncoding`` must be the same on both sides: it decides the
Python type a value is validated into (``date-time``: ``datetime``; base64: ``bytes``).
Custom validators (``AfterValidator``...) leave no trace in a schema: not compared.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ._schema import INTEGER_KEY, NUMBER_KEY

_ANNOTATIONS = frozenset(
    {
        "title", "description", "default", "examples", "deprecated", "readOnly",
        "writeOnly", "$schema", "$comment", "$defs", "discriminator",
    }
)  # fmt: skip
_COMPARED = frozenset(
    {
        "type", "format", "contentEncoding", "enum", "const", "anyOf", "oneOf", "allOf",
        "$ref", "items", "prefixItems", "minItems", "maxItems", "uniqueItems",
        "properties", "required", "additionalProperties", "minimum", "maximum",
        "exclusiveMinimum", "exclusiveMaximum", "multipleOf", "minLength", "maxLength",
        "pattern", "propertyNames",
    }
)  # fmt: skip
_MISSING = object()
# Patterns celerybridge writes, as Python expressions (ECMA-262's `$` is not Python's).
_PATTERNS = {
    INTEGER_KEY: re.compile(r"-?[0-9]+", re.ASCII),
    NUMBER_KEY: re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?", re.ASCII),
}


@dataclass(frozen=True, slots=True)
class Verdict:
    """``ok``: ``True`` (every value fits), ``False`` (some do not, ``reason`` says which),
    ``None`` (cannot compare, ``reason`` says why)."""

    ok: bool | None
    reason: str = ""


OK = Verdict(True)


def no(reason: str) -> Verdict:
    return Verdict(False, reason)


def unknown(reason: str) -> Verdict:
    return Verdict(None, reason)


def all_of(verdicts: Iterable[Verdict]) -> Verdict:
    """Every verdict ok: ok; else the first refusal, else the first unknown."""
    undecided = None
    for verdict in verdicts:
        if verdict.ok is False:
            return verdict
        if verdict.ok is None and undecided is None:
            undecided = verdict
    return undecided or OK


def subset(narrow: dict[str, Any], wide: dict[str, Any]) -> Verdict:
    """Whether every JSON value ``narrow`` admits, ``wide`` admits too.

    Both are whole schemas (their ``$ref`` point into their own ``$defs``).
    """
    return _Comparison(narrow, wide).subset(narrow, wide)


def describe(schema: dict[str, Any], root: dict[str, Any] | None = None) -> str:
    """A short name for what ``schema`` admits, for messages: ``array of integer``."""
    root = schema if root is None else root
    schema = _resolve(schema, root)
    if not _strip(schema):
        return "any value"
    if "const" in schema:
        return f"the value {_json(schema['const'])}"
    if "enum" in schema:
        return "one of " + ", ".join(_json(v) for v in schema["enum"])
    branches = schema.get("anyOf") or schema.get("oneOf")
    if branches:
        return " or ".join(describe(b, root) for b in branches)
    kind = schema.get("type")
    if isinstance(kind, list):
        return " or ".join(kind)
    if kind == "string":
        if schema.get("contentEncoding") == "base64":
            return "base64 string"
        return f"string ({schema['format']})" if "format" in schema else "string"
    if kind == "array":
        items = schema.get("items")
        if "prefixItems" in schema:
            inner = ", ".join(describe(i, root) for i in schema["prefixItems"])
            return f"array [{inner}]"
        described = "array" if not isinstance(items, dict) else f"array of {describe(items, root)}"
        return f"{described} (unique items)" if schema.get("uniqueItems") else described
    if kind == "object":
        if "properties" in schema:
            return f"object {schema.get('title', '')}".rstrip()
        extra = schema.get("additionalProperties")
        return "object" if not isinstance(extra, dict) else f"object of {describe(extra, root)}"
    return str(kind or "a schema with no type")


def _json(value: Any) -> str:
    import json

    return json.dumps(value)


def _strip(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` without annotations, but a model's title (for messages)."""
    model = "properties" in schema
    return {k: v for k, v in schema.items() if k not in _ANNOTATIONS or (model and k == "title")}


def _resolve(schema: Any, root: dict[str, Any]) -> dict[str, Any]:
    """``schema`` without ``$ref`` and single-schema ``allOf`` (as pydantic writes them)."""
    for _ in range(64):
        if not isinstance(schema, dict):
            return {} if schema is True else {"not": {}}
        if "$ref" in schema:
            ref = schema["$ref"]
            if not ref.startswith("#/$defs/"):
                return {"$ref": ref}  # left as is: an unknown keyword
            target = root.get("$defs", {}).get(ref.removeprefix("#/$defs/"))
            if target is None:
                return {"$ref": ref}
            schema = {**target, **{k: v for k, v in schema.items() if k != "$ref"}}
        elif isinstance(schema.get("allOf"), list) and len(schema["allOf"]) == 1:
            rest = {k: v for k, v in schema.items() if k != "allOf"}
            schema = {**schema["allOf"][0], **rest}
        else:
            return dict(schema)
    return {"$ref": "a chain of 64 references"}  # left as is: an unknown keyword


def _reference(schema: Any) -> str | None:
    """The ``$ref`` of a schema that is only a reference (and annotations)."""
    only = isinstance(schema, dict) and set(schema) - {"$ref"} <= _ANNOTATIONS
    return str(schema["$ref"]) if only and isinstance(schema.get("$ref"), str) else None


def _has_reference(value: Any) -> bool:
    if isinstance(value, dict):
        return "$ref" in value or any(_has_reference(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_reference(v) for v in value)
    return False


def _types(schema: dict[str, Any]) -> set[str] | None:
    kind = schema.get("type")
    if isinstance(kind, str):
        return {kind}
    if isinstance(kind, list):
        return set(kind)
    return None


class _Comparison:
    def __init__(self, narrow_root: dict[str, Any], wide_root: dict[str, Any]) -> None:
        self.narrow_root = narrow_root
        self.wide_root = wide_root
        self.same_defs = narrow_root.get("$defs") == wide_root.get("$defs")
        # Recursive models: the pairs of definitions being compared (coinduction).
        self._assumed: set[tuple[str, str]] = set()

    def subset(self, narrow: Any, wide: Any) -> Verdict:
        key = (_reference(narrow), _reference(wide))
        if key[0] is None or key[1] is None:
            return self._subset(
                _strip(_resolve(narrow, self.narrow_root)), _strip(_resolve(wide, self.wide_root))
            )
        pair = (key[0], key[1])
        if pair in self._assumed:
            return OK
        self._assumed.add(pair)
        try:
            return self._subset(
                _strip(_resolve(narrow, self.narrow_root)), _strip(_resolve(wide, self.wide_root))
            )
        finally:
            self._assumed.discard(pair)

    def _subset(self, a: dict[str, Any], b: dict[str, Any]) -> Verdict:
        if not b:
            return OK
        odd = sorted((set(a) | set(b)) - _COMPARED - {"title"})
        if odd:
            return unknown(f"keyword {odd[0]!r} is not compared")
        if a == b and (self.same_defs or not _has_reference(a)):
            return OK
        if not a:
            return no(f"any value is not {self.wide(b)}")
        for side in (a, b):
            if isinstance(side.get("allOf"), list):
                return unknown("allOf of several schemas is not compared")
        values = _values(a, few="const" in b or "enum" in b)
        if values is not None:
            return all_of(self._value(v, b) for v in values)
        branches = a.get("anyOf") or a.get("oneOf")
        if branches:
            return all_of(self.subset(branch, b) for branch in branches)
        if "const" in b or "enum" in b:
            return no(f"{self.narrow(a)} is not {self.wide(b)}")
        branches = b.get("anyOf") or b.get("oneOf")
        if branches:
            verdicts = [self.subset(a, branch) for branch in branches]
            if any(v.ok for v in verdicts):
                return OK
            if all(v.ok is False for v in verdicts):
                return no(f"{self.narrow(a)} is not {self.wide(b)}")
            return next(v for v in verdicts if v.ok is None)
        types_a, types_b = _types(a), _types(b)
        if types_a is None or types_b is None:
            return unknown("a schema without a type is not compared")
        checks = []
        for kind in sorted(types_a):
            if kind not in types_b and not (kind == "integer" and "number" in types_b):
                return no(f"{self.narrow(a)} is not {self.wide(b)}")
            checks.append(self._same_kind(kind, a, b))
        return all_of(checks)

    def narrow(self, schema: dict[str, Any]) -> str:
        return describe(schema, self.narrow_root)

    def wide(self, schema: dict[str, Any]) -> str:
        return describe(schema, self.wide_root)

    def _value(self, value: Any, b: dict[str, Any]) -> Verdict:
        fits = _admits(value, b, self.wide_root)
        if fits is None:
            return unknown(f"whether {self.wide(b)} admits {_json(value)} is not decided")
        return OK if fits else no(f"{_json(value)} is not {self.wide(b)}")

    def _same_kind(self, kind: str, a: dict[str, Any], b: dict[str, Any]) -> Verdict:
        if kind == "string":
            for keyword in ("format", "contentEncoding"):
                if a.get(keyword) != b.get(keyword):
                    return no(f"{self.narrow(a)} is not {self.wide(b)}")
            if "pattern" in b and a.get("pattern") != b["pattern"]:
                return unknown(f"pattern {b['pattern']!r} is not compared")
            return _bounds(a, b, "minLength", "maxLength", "length")
        if kind == "integer":
            return _numbers(_closed(a), b)
        if kind == "number":
            return _numbers(a, b)
        if kind == "array":
            return self._arrays(a, b)
        if kind == "object":
            return self._objects(a, b)
        return OK  # boolean, null: no keywords to compare

    def _names(self, a: dict[str, Any], b: dict[str, Any]) -> Verdict:
        """The property names ``a`` allows are names ``b`` allows (dict keys: pydantic
        leaves int keys out of a schema, :class:`~celerybridge._schema.WireJsonSchema`
        does not)."""
        if "propertyNames" not in b:
            return OK
        names_b = _names_of(b)
        checks = []
        for name in a.get("properties", {}):
            fits = _admits(name, names_b, self.wide_root)
            if fits is False:
                return no(f"property {name!r} is not a key of {self.wide(b)}")
            checks.append(OK if fits else unknown(f"whether key {name!r} fits is not decided"))
        if a.get("additionalProperties", False if "properties" in a else {}) is not False:
            verdict = self.subset(_names_of(a), names_b)
            if verdict.ok is False:
                return no(f"keys: {verdict.reason}")
            checks.append(verdict)
        return all_of(checks)

    def _arrays(self, a: dict[str, Any], b: dict[str, Any]) -> Verdict:
        if b.get("uniqueItems") and not a.get("uniqueItems"):
            return no(f"{self.narrow(a)} may repeat items; {self.wide(b)} may not")
        size = _bounds(a, b, "minItems", "maxItems", "number of items")
        if size.ok is not True:
            return size
        prefix_a, prefix_b = a.get("prefixItems", []), b.get("prefixItems", [])
        most = a.get("maxItems", math.inf)
        checks = []
        for index in range(max(len(prefix_a), len(prefix_b)) + 1):
            if index >= most:
                break
            item_a = prefix_a[index] if index < len(prefix_a) else a.get("items", {})
            item_b = prefix_b[index] if index < len(prefix_b) else b.get("items", {})
            if item_a is False:
                break
            if item_b is False:
                return no(f"{self.narrow(a)} may have more items than {self.wide(b)}")
            verdict = self.subset(item_a, item_b)
            if verdict.ok is False:
                return no(
                    f"item {index}: {verdict.reason}" if prefix_a or prefix_b else verdict.reason
                )
            checks.append(verdict)
        return all_of(checks)

    def _objects(self, a: dict[str, Any], b: dict[str, Any]) -> Verdict:
        props_a, props_b = a.get("properties", {}), b.get("properties", {})
        # A model or TypedDict that does not say (extra="ignore", pydantic's default)
        # drops other keys: the narrow side's values have none.
        extra_a = a.get("additionalProperties", False if "properties" in a else {})
        extra_b = b.get("additionalProperties", {})
        required_a = set(a.get("required", []))
        for name in b.get("required", []):
            if name not in required_a:
                where = "optional" if name in props_a else "not declared"
                return no(
                    f"property {name!r} is required by {self.wide(b)}, {where} in {self.narrow(a)}"
                )
        checks = []
        names = self._names(a, b)
        if names.ok is not True:
            return names
        for name, schema in props_a.items():
            target = props_b.get(name, extra_b)
            if target is False:
                return no(f"property {name!r} is not allowed by {self.wide(b)}")
            verdict = self.subset(schema, target)
            if verdict.ok is False:
                return no(f"property {name!r}: {verdict.reason}")
            checks.append(verdict)
        if extra_a is not False:
            # Other keys with extra_a values: each must fit wherever b puts such a key.
            for name, target in [
                *((n, s) for n, s in props_b.items() if n not in props_a),
                ("", extra_b),
            ]:
                if target is False:
                    return no(f"{self.narrow(a)} may have properties {self.wide(b)} does not allow")
                verdict = self.subset(extra_a, target)
                if verdict.ok is False:
                    what = f"property {name!r}" if name else "other properties"
                    return no(f"{what}: {verdict.reason}")
                checks.append(verdict)
        return all_of(checks)


def _names_of(schema: dict[str, Any]) -> dict[str, Any]:
    names = schema.get("propertyNames", {})
    return {"type": "string", **names} if isinstance(names, dict) else {"not": {}}


def _values(schema: dict[str, Any], *, few: bool) -> list[Any] | None:
    """The values a schema admits, when it lists them (or, with ``few``, when they are
    few: null, the booleans)."""
    if "const" in schema:
        return [schema["const"]]
    if "enum" in schema:
        return list(schema["enum"])
    if few and set(schema) == {"type"}:
        few_values: dict[str, list[Any]] = {"null": [None], "boolean": [True, False]}
        return few_values.get(str(schema["type"]))
    return None


def _bounds(a: dict[str, Any], b: dict[str, Any], low: str, high: str, what: str) -> Verdict:
    if a.get(low, 0) < b.get(low, 0):
        return no(f"{what} from {a.get(low, 0)} is below the minimum {b[low]}")
    if a.get(high, math.inf) > b.get(high, math.inf):
        return no(f"{what} up to {a.get(high, 'any')} is above the maximum {b[high]}")
    return OK


def _numbers(a: dict[str, Any], b: dict[str, Any]) -> Verdict:
    # A bound is (value, exclusive); at one value an exclusive bound is the tighter one.
    def lower(s: dict[str, Any]) -> tuple[float, bool]:
        closed, open_ = s.get("minimum", -math.inf), s.get("exclusiveMinimum", -math.inf)
        return (open_, True) if open_ >= closed else (closed, False)

    def upper(s: dict[str, Any]) -> tuple[float, bool]:
        closed, open_ = s.get("maximum", math.inf), s.get("exclusiveMaximum", math.inf)
        return (open_, True) if open_ <= closed else (closed, False)

    (low_a, open_a), (low_b, open_b) = lower(a), lower(b)
    if low_a < low_b or (low_a == low_b and open_b and not open_a):
        return no(f"numbers from {_edge(low_a)} are below the minimum {_edge(low_b)}")
    (high_a, open_a), (high_b, open_b) = upper(a), upper(b)
    if high_a > high_b or (high_a == high_b and open_b and not open_a):
        return no(f"numbers up to {_edge(high_a)} are above the maximum {_edge(high_b)}")
    step_b = b.get("multipleOf")
    if step_b is not None:
        step_a = a.get("multipleOf")
        if step_a is None or (step_a / step_b) % 1:
            return unknown(f"multipleOf {step_b} is not compared")
    return OK


def _closed(schema: dict[str, Any]) -> dict[str, Any]:
    """An integer schema's exclusive bounds as inclusive ones (``> 0`` is ``>= 1``)."""
    out = dict(schema)
    if "exclusiveMinimum" in out:
        out["minimum"] = max(
            out.get("minimum", -math.inf), math.floor(out.pop("exclusiveMinimum")) + 1
        )
    if "exclusiveMaximum" in out:
        out["maximum"] = min(
            out.get("maximum", math.inf), math.ceil(out.pop("exclusiveMaximum")) - 1
        )
    return out


def _edge(value: float) -> str:
    return f"{value:g}" if math.isfinite(value) else ("-" if value < 0 else "") + "infinity"


def _admits(value: Any, schema: Any, root: dict[str, Any]) -> bool | None:
    """Whether ``schema`` admits the JSON ``value`` (``None``: not decided)."""
    schema = _strip(_resolve(schema, root))
    if not schema:
        return True
    if set(schema) - _COMPARED:
        return None
    if "const" in schema:
        return bool(value == schema["const"] and type(value) is type(schema["const"]))
    if "enum" in schema:
        return any(value == v and type(value) is type(v) for v in schema["enum"])
    branches = schema.get("anyOf") or schema.get("oneOf")
    if branches:
        answers = [_admits(value, branch, root) for branch in branches]
        return True if any(answers) else (None if None in answers else False)
    kinds = _types(schema)
    if kinds is None:
        return None
    kind = {
        type(None): "null", bool: "boolean", int: "integer", float: "number", str: "string",
        list: "array", dict: "object",
    }.get(type(value))  # fmt: skip
    if kind not in kinds and not (kind == "integer" and "number" in kinds):
        return False
    if kind == "null" or kind == "boolean":
        return True
    if kind == "string":
        if "format" in schema or "contentEncoding" in schema:
            return None
        if "pattern" in schema:
            known = _PATTERNS.get(schema["pattern"])
            if known is None:
                return None  # ECMA-262 regular expressions: not Python's
            if not known.fullmatch(value):
                return False
        return bool(schema.get("minLength", 0) <= len(value) <= schema.get("maxLength", math.inf))
    if kind in ("integer", "number"):
        return _numbers({"minimum": value, "maximum": value}, schema).ok
    return None  # arrays and objects as enum values: rare, not decided
