"""Binding call arguments to a contract's signature and validating them.

A :class:`Binder` is built once per contract version, when the stub is declared, so
bad annotations fail at import time. ``bind`` is used twice per call: by the caller
before anything is sent, and by the worker on receipt.
"""

from __future__ import annotations

import inspect
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ConfigDict, PydanticSchemaGenerationError, TypeAdapter, ValidationError
from pydantic.errors import PydanticUserError
from pydantic_core import PydanticSerializationError

from ._constants import MAX_ARGUMENT_DEPTH
from ._exceptions import ArgumentError, ContractError

_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
_VARIADIC = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
_QUOTED = re.compile(r"'([^']+)'")
MAX_DEPTH = MAX_ARGUMENT_DEPTH
"""Deepest nesting of containers accepted in an argument: what the worker's intake
accepts in a body (``MAX_BODY_DEPTH``) less the body's own two levels."""
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
"""Integers JSON peers can carry (Java's long, Go's int64, ...); beyond, refused."""
_PLAIN_ANNOTATIONS = (str, int, float, bool)


@dataclass(frozen=True, slots=True)
class BoundCall:
    """A call that passed validation: Python values for the body, JSON values for the wire."""

    values: Mapping[str, Any]
    """Validated (coerced) values, by parameter name, as the implementation receives them."""
    args: tuple[Any, ...]
    """JSON-compatible positional arguments, as sent on the wire."""
    kwargs: Mapping[str, Any]
    """JSON-compatible keyword-only arguments, as sent on the wire."""


class Binder:
    """Validates calls against one contract version's signature and annotations."""

    def __init__(self, task: str, version: int, signature: inspect.Signature) -> None:
        self.task = task
        self.version = version
        self.signature = signature
        parameters = signature.parameters.values()
        self.positional = tuple(p.name for p in parameters if p.kind in _POSITIONAL)
        # Every parameter can be passed by position: a call with one positional argument
        # per parameter and no keywords binds in order, without inspect's machinery.
        self._by_position = all(
            p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in parameters
        )
        self._adapters: dict[str, TypeAdapter[Any]] = {}
        for param in signature.parameters.values():
            if param.kind in _VARIADIC:
                raise ContractError(
                    f"task {task!r} v{version}: parameter {param.name!r} is variadic; "
                    "a contract needs an explicit signature"
                )
            self._adapters[param.name] = _adapter(task, version, param.name, param.annotation)
        self._result = _adapter(task, version, "return", signature.return_annotation)
        # Parameters whose validated value, when a plain JSON scalar, is also what is
        # sent: no serialiser of their own to run (str, int, float, bool, unannotated).
        self._plain = frozenset(
            p.name
            for p in parameters
            if p.annotation in _PLAIN_ANNOTATIONS or self._adapters[p.name] is _ANY
        )

    def bind(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> BoundCall:
        """Bind, validate and serialise one call, or raise :class:`ArgumentError`."""
        return self._bind(args, kwargs, from_wire=False)

    def bind_given(
        self, args: Sequence[Any], kwargs: Mapping[str, Any], *, open_first: bool
    ) -> BoundCall:
        """Validate the arguments given for a signature, defaults not applied.

        ``open_first``: the first positional parameter is left for whatever comes
        before the signature in a workflow (``args`` start at the second). The wire
        form holds only what was given, so a value prepended later lands where Celery
        puts it, in front.
        """
        signature = self.signature
        if open_first:
            if not self.positional:
                raise ArgumentError(
                    self.task,
                    self.version,
                    None,
                    "no positional parameter to receive the previous result",
                )
            first = self.positional[0]
            if first in kwargs:
                raise ArgumentError(
                    self.task,
                    self.version,
                    first,
                    "left open for the previous result; it cannot be passed by keyword",
                )
            parameters = [p for p in signature.parameters.values() if p.name != first]
            signature = signature.replace(parameters=parameters)
        bound = self._bound(signature, args, kwargs)
        values: dict[str, Any] = {}
        wire: dict[str, Any] = {}
        for name, raw in bound.arguments.items():
            values[name], wire[name] = self._validate(name, raw, from_wire=False)
        positional = self.positional[1:] if open_first else self.positional
        return BoundCall(
            values=values,
            args=tuple(wire[name] for name in positional[: len(args)]),
            kwargs={name: wire[name] for name in kwargs},
        )

    def receive(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> BoundCall:
        """Bind and validate a call as it arrived from the broker, on the worker.

        Arguments are validated in pydantic's JSON mode, as the JSON they crossed the
        broker as: ``bytes`` come back from base64, for instance.
        """
        return self._bind(args, kwargs, from_wire=True)

    def _bind(
        self, args: Sequence[Any], kwargs: Mapping[str, Any], *, from_wire: bool
    ) -> BoundCall:
        values: dict[str, Any] = {}
        wire: dict[str, Any] = {}
        for name, raw in self._arguments(args, kwargs).items():
            values[name], wire[name] = self._validate(name, raw, from_wire)
        positional = self.positional
        return BoundCall(
            values=values,
            args=tuple(wire[name] for name in positional),
            kwargs={}
            if self._by_position
            else {k: v for k, v in wire.items() if k not in positional},
        )

    def _arguments(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Mapping[str, Any]:
        """Each parameter's argument, defaults applied, or :class:`ArgumentError`."""
        if self._by_position and not kwargs and len(args) == len(self.positional):
            return dict(zip(self.positional, args, strict=True))
        bound = self._bound(self.signature, args, kwargs)
        bound.apply_defaults()
        return bound.arguments

    def _bound(
        self, signature: inspect.Signature, args: Sequence[Any], kwargs: Mapping[str, Any]
    ) -> inspect.BoundArguments:
        """``signature.bind``, its ``TypeError`` as :class:`ArgumentError` naming the
        parameter Python quoted."""
        try:
            return signature.bind(*args, **kwargs)
        except TypeError as exc:
            message = str(exc)
            match = _QUOTED.search(message)
            raise ArgumentError(
                self.task, self.version, match.group(1) if match else None, message
            ) from None

    def call_arguments(self, call: BoundCall) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Split validated values into the positional and keyword arguments of a body."""
        args = tuple(call.values[name] for name in self.positional)
        return args, {k: v for k, v in call.values.items() if k not in self.positional}

    def dump_result(self, value: Any) -> Any:
        """Turn what an implementation returned into the JSON value stored as its result."""
        return self._result.dump_python(value, mode="json")

    def load_result(self, value: Any) -> Any:
        """Coerce a stored result (decoded JSON) into the contract's declared return type."""
        return self._result.validate_json(json.dumps(value))

    def _validate(self, name: str, raw: Any, from_wire: bool) -> tuple[Any, Any]:
        adapter = self._adapters[name]
        try:
            if from_wire:
                value = adapter.validate_json(_as_json(raw))
            else:
                value = adapter.validate_python(raw)
                if name in self._plain and _json_scalar(value):
                    return value, value  # what the dumps and the check below would find
            _check_json(adapter.dump_python(value), strict=adapter is _ANY, depth=0)
            if from_wire:  # the worker never sends it on: no wire form to build
                return value, value
            return value, adapter.dump_python(value, mode="json")
        except ValidationError as exc:
            raise ArgumentError(self.task, self.version, name, _first_error(exc)) from None
        except (_NotJSON, PydanticSerializationError, RecursionError) as exc:
            problem = str(exc) if isinstance(exc, _NotJSON) else "value is not JSON-serialisable"
            raise ArgumentError(self.task, self.version, name, problem) from None


class _NotJSON(Exception):
    pass


def _as_json(value: Any) -> str:
    try:
        return json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:  # not decoded JSON after all
        raise _NotJSON(f"value is not JSON: {exc}") from None


_ANY: TypeAdapter[Any] = TypeAdapter(Any)
# bytes cross JSON as base64, both ways (pydantic's default is raw UTF-8): URL-safe
# alphabet when sending, either alphabet on receipt. Models and dataclasses keep their
# own config: give them ser_json_bytes/val_json_bytes="base64" for the same.
_CONFIG = ConfigDict(allow_inf_nan=False, ser_json_bytes="base64", val_json_bytes="base64")


def _adapter(task: str, version: int, name: str, annotation: Any) -> TypeAdapter[Any]:
    if annotation is inspect.Parameter.empty or annotation is Any:
        return _ANY
    try:
        try:
            return TypeAdapter(annotation, config=_CONFIG)
        except PydanticUserError:
            # Models and dataclasses carry their own config and refuse ours.
            return TypeAdapter(annotation)
    except (PydanticSchemaGenerationError, PydanticUserError, TypeError, NameError) as exc:
        raise ContractError(
            f"task {task!r} v{version}: annotation of {name!r} cannot be validated: {exc}"
        ) from exc


def _json_scalar(value: Any) -> bool:
    """Whether ``value`` is a JSON scalar as it is: a string, a boolean, ``None``, a
    64-bit integer or a finite float (exact types: subclasses may serialise otherwise)."""
    kind = type(value)
    if kind is str or kind is bool or value is None:
        return True
    if kind is int:
        return bool(INT64_MIN <= value <= INT64_MAX)
    return kind is float and math.isfinite(value)


def _check_json(value: Any, *, strict: bool, depth: int) -> None:
    """Refuse what JSON cannot carry faithfully.

    pydantic would silently turn NaN into ``null`` and a set into a list; a remote
    call must not change its arguments on the way, so we refuse instead. ``strict``
    (unannotated parameters) also refuses any non-JSON type.
    """
    if depth >= MAX_DEPTH and isinstance(value, dict | list | tuple):
        # Containers counted as the worker's intake counts them: this is level depth + 1.
        raise _NotJSON(f"nesting deeper than {MAX_DEPTH} levels")
    if isinstance(value, float):
        if not math.isfinite(value):
            raise _NotJSON(f"{value!r} is not a finite number; JSON cannot carry it")
    elif isinstance(value, int) and not isinstance(value, bool):
        if not INT64_MIN <= value <= INT64_MAX:
            raise _NotJSON(
                "integer outside the signed 64-bit range (-2**63 to 2**63-1); "
                "most JSON peers cannot carry it"
            )
    elif isinstance(value, dict):
        for key, item in value.items():
            if strict and not isinstance(key, str):
                raise _NotJSON(f"object key {key!r} is not a string")
            _check_json(item, strict=strict, depth=depth + 1)
    elif isinstance(value, list | tuple):
        for item in value:
            _check_json(item, strict=strict, depth=depth + 1)
    elif strict and not (value is None or isinstance(value, str | int | bool)):
        raise _NotJSON(f"{type(value).__name__} is not JSON-serialisable")


def _first_error(exc: ValidationError) -> str:
    error = exc.errors(include_url=False)[0]
    where = "".join(f"[{p!r}]" for p in error["loc"])
    return f"{error['msg']}{' at ' + where if where else ''} (got {error['input']!r:.80})"
