"""Whether an implementation receives the Python objects its annotations expect: the
second half of ``celerybridge check``'s type comparison.

A worker validates a call with the *contract's* annotations and hands the resulting
objects to the implementation: a contract parameter ``Receipt`` gives the implementation
a ``Receipt`` even when it is annotated ``dict[str, Any]``, whose JSON Schema admits the
same JSON. :func:`received_fits` compares the two annotations as Python types: the
class of each object the contract's side produces (a model, an enum member, a tuple, a
set, a ``float``...) must be one the other side's annotation names, recursively through
items, dict keys and values, and the fields of models and TypedDicts.

What it cannot compare (type variables, protocols, abstract containers it does not
know) is ``ok is None``, never a guess. Constraints (``Field(ge=0)``) are the JSON
Schema comparison's business: :mod:`celerybridge._compat`.
"""

from __future__ import annotations

import collections
import collections.abc as abc
import dataclasses
import enum
import inspect
import types
import typing
from typing import Any

from pydantic import BaseModel, ValidationError
from typing_extensions import TypeAliasType, is_typeddict

from ._compat import OK, Verdict, all_of, no, unknown

_EMPTY = inspect.Parameter.empty
_UNIONS = (typing.Union, types.UnionType)

# The class pydantic builds for a JSON array or object validated as these origins.
_BUILT: dict[Any, type] = {
    list: list,
    tuple: tuple,
    set: set,
    frozenset: frozenset,
    dict: dict,
    collections.deque: collections.deque,
}
# Origins whose items (first argument) are compared one by one.
_ITEMS = frozenset(
    {
        list, set, frozenset, collections.deque, abc.Sequence, abc.MutableSequence,
        abc.Set, abc.MutableSet, abc.Collection, abc.Iterable,
    }
)  # fmt: skip
_MAPPINGS = frozenset({dict, abc.Mapping, abc.MutableMapping})


def _bare(annotation: Any) -> Any:
    """``annotation`` without ``Annotated``, ``NewType`` and type aliases; ``Any`` for none."""
    for _ in range(32):
        if annotation is _EMPTY or annotation is object:
            return Any
        if annotation is None:
            return type(None)
        if typing.get_origin(annotation) is typing.Annotated:
            annotation = typing.get_args(annotation)[0]
        elif hasattr(annotation, "__supertype__"):  # NewType
            annotation = annotation.__supertype__
        elif isinstance(annotation, TypeAliasType):
            annotation = annotation.__value__
        else:
            return annotation
    return annotation


def _name(annotation: Any) -> str:
    from ._check import type_name

    return type_name(annotation)


def _any_of(verdicts: list[Verdict], reason: str) -> Verdict:
    if any(v.ok for v in verdicts):
        return OK
    if all(v.ok is False for v in verdicts):
        return no(reason)
    return next(v for v in verdicts if v.ok is None)


def received_fits(sent: Any, taken: Any) -> Verdict:
    """Whether the objects a ``sent`` annotation validates into are objects of the
    ``taken`` annotation (the contract's parameter, the implementation's)."""
    return _Comparison().fits(sent, taken)


class _Comparison:
    def __init__(self) -> None:
        self._assumed: set[tuple[type, type]] = set()  # recursive models: coinduction

    def fits(self, sent: Any, taken: Any) -> Verdict:
        sent, taken = _bare(sent), _bare(taken)
        if taken is Any or sent == taken:
            return OK
        if sent is Any:
            return unknown(f"what {_name(taken)} receives from Any is not compared")
        if typing.get_origin(sent) in _UNIONS:
            return all_of([self.fits(branch, taken) for branch in typing.get_args(sent)])
        values = _values(sent)
        if values is not None:
            return all_of([self._value(value, taken) for value in values])
        if typing.get_origin(taken) in _UNIONS:
            verdicts = [self.fits(sent, branch) for branch in typing.get_args(taken)]
            return _any_of(verdicts, self._other(sent, taken))
        if sent is type(None):  # None into a taken side that is not optional
            return no(self._other(sent, taken))
        if isinstance(sent, type) and typing.get_origin(sent) is None:
            return self._class(sent, taken)
        return self._generic(sent, taken)

    def _other(self, sent: Any, taken: Any) -> str:
        return f"it receives {_received(sent)}, not {_name(taken)}"

    def _value(self, value: Any, taken: Any) -> Verdict:
        """Whether the object ``value`` is one of ``taken``: the class's instance, one of
        the literal values, or (anything else) accepted by pydantic's strict mode."""
        taken = _bare(taken)
        refused = no(f"it receives {value!r}, not {_name(taken)}")
        if taken is Any:
            return OK
        if typing.get_origin(taken) in _UNIONS:
            return _any_of([self._value(value, b) for b in typing.get_args(taken)], refused.reason)
        if typing.get_origin(taken) is typing.Literal:
            same = any(value == v and type(value) is type(v) for v in typing.get_args(taken))
            return OK if same else refused
        if isinstance(taken, type) and typing.get_origin(taken) is None:
            return OK if _instance(value, taken) else refused
        from ._schema import _adapter

        try:
            _adapter(taken).validate_python(value, strict=True)
        except ValidationError:
            return refused
        except Exception as exc:  # an annotation pydantic cannot validate
            return unknown(f"whether {_name(taken)} takes {value!r} is not decided: {exc}")
        return OK

    def _class(self, sent: type, taken: Any) -> Verdict:
        if is_typeddict(sent):
            return self._typeddict(sent, taken)
        if typing.get_origin(taken) is not None or not isinstance(taken, type):
            if sent in _BUILT and typing.get_origin(taken) is not None:
                return self._generic(sent, taken)  # bare list into list[int]: items Any
            return no(self._other(sent, taken))
        if _subclass(sent, taken):
            return OK
        if (
            isinstance(sent, type)
            and issubclass(sent, BaseModel)
            and isinstance(taken, type)
            and issubclass(taken, BaseModel)
        ):
            return self._fields(sent, taken, _model_fields(sent), _model_fields(taken))
        if dataclasses.is_dataclass(sent) and dataclasses.is_dataclass(taken):
            return self._fields(sent, taken, _dataclass_fields(sent), _dataclass_fields(taken))
        return no(self._other(sent, taken))

    def _fields(
        self, sent: type, taken: type, sent_fields: dict[str, Any], taken_fields: dict[str, Any]
    ) -> Verdict:
        """Two model (or dataclass) classes: their common fields compared as the
        implementation reads them (the JSON Schema comparison did the rest)."""
        key = (sent, taken)
        if key in self._assumed:
            return OK
        self._assumed.add(key)
        try:
            checks = []
            for name, annotation in taken_fields.items():
                if name in sent_fields:
                    verdict = self.fits(sent_fields[name], annotation)
                    if verdict.ok is False:
                        return no(f"field {name!r}: {verdict.reason}")
                    checks.append(verdict)
            return all_of(checks)
        finally:
            self._assumed.discard(key)

    def _typeddict(self, sent: type, taken: Any) -> Verdict:
        fields = typing.get_type_hints(sent, include_extras=True)
        origin = typing.get_origin(taken) or taken
        if is_typeddict(taken):
            return self._fields(
                sent, taken, fields, typing.get_type_hints(taken, include_extras=True)
            )
        if origin in _MAPPINGS:
            args = typing.get_args(taken) or (Any, Any)
            keys = self.fits(str, args[0])
            if keys.ok is False:
                return no(f"keys: {keys.reason}")
            return all_of([keys, *(self.fits(f, args[1]) for f in fields.values())])
        return no(self._other(sent, taken))

    def _generic(self, sent: Any, taken: Any) -> Verdict:
        origin_sent = typing.get_origin(sent) or sent
        origin_taken = typing.get_origin(taken) or taken
        args_sent, args_taken = typing.get_args(sent), typing.get_args(taken)
        built = _BUILT.get(origin_sent)
        if built is None:
            if origin_sent == origin_taken and len(args_sent) == len(args_taken):
                return all_of([self.fits(a, b) for a, b in zip(args_sent, args_taken, strict=True)])
            return unknown(f"what {_name(sent)} is validated into is not compared")
        if not isinstance(origin_taken, type) or not issubclass(built, origin_taken):
            return no(self._other(sent, taken))
        if built is dict:
            if origin_taken not in _MAPPINGS:
                return unknown(f"{_name(taken)} is not compared")
            keys_sent, values_sent = args_sent or (Any, Any)
            keys_taken, values_taken = args_taken or (Any, Any)
            keys = self.fits(keys_sent, keys_taken)
            if keys.ok is False:
                return no(f"keys: {keys.reason}")
            values = self.fits(values_sent, values_taken)
            if values.ok is False:
                return no(f"values: {values.reason}")
            return all_of([keys, values])
        items_sent = _items(built, args_sent)
        if origin_taken is tuple and args_taken and args_taken[-1] is not Ellipsis:
            if items_sent is None or len(items_sent) != len(args_taken):
                return unknown(f"the items of {_name(sent)} and {_name(taken)} are not compared")
            pairs = list(zip(items_sent, args_taken, strict=True))
        elif origin_taken is tuple or origin_taken in _ITEMS:
            item_taken = args_taken[0] if args_taken else Any
            pairs = [(item, item_taken) for item in (items_sent or [_rest(args_sent)])]
        else:
            return unknown(f"{_name(taken)} is not compared")
        for index, (a, b) in enumerate(pairs):
            verdict = self.fits(a, b)
            if verdict.ok is not True:
                what = f"item {index}" if built is tuple and items_sent else "items"
                return Verdict(verdict.ok, f"{what}: {verdict.reason}")
        return OK


def _items(built: type, args: tuple[Any, ...]) -> list[Any] | None:
    """A fixed tuple's item annotations (``None``: any number of items)."""
    if built is tuple and args and args[-1] is not Ellipsis:
        return [] if args == ((),) else list(args)
    return None


def _rest(args: tuple[Any, ...]) -> Any:
    return args[0] if args else Any


def _values(annotation: Any) -> list[Any] | None:
    """The objects a ``Literal`` or an enum validates into."""
    if typing.get_origin(annotation) is typing.Literal:
        return list(typing.get_args(annotation))
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return list(annotation)
    return None


def _subclass(sent: type, taken: type) -> bool:
    """``sent`` instances are ``taken`` instances, or ``int`` for ``float`` (PEP 484's
    numeric tower, as pydantic's strict mode)."""
    if issubclass(sent, taken):
        return True
    return (sent is int and taken in (float, complex)) or (sent is float and taken is complex)


def _instance(value: Any, taken: type) -> bool:
    return _subclass(type(value), taken)


def _received(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if annotation is type(None):
        return "None"
    if is_typeddict(annotation):
        return "a dict"
    if isinstance(annotation, type) and origin is None:
        return f"{annotation.__qualname__} objects"
    built = _BUILT.get(origin)
    return f"a {built.__name__}" if built is not None else _name(annotation)


def _model_fields(model: type[BaseModel]) -> dict[str, Any]:
    return {name: field.annotation for name, field in model.model_fields.items()}


def _dataclass_fields(cls: Any) -> dict[str, Any]:
    hints = typing.get_type_hints(cls, include_extras=True)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls)}
