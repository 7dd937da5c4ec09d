"""``celerybridge check``: does an implementation fit its contract, call shape and types?

The call shape is :func:`celerybridge._worker.app.check_signature`'s. The types are compared
as JSON Schema (:mod:`celerybridge._compat`): each parameter of the implementation must
accept every value the contract lets callers send, and its return annotation must
promise no more than the contract's return type allows. Where the schemas agree, the
Python types are compared too (:mod:`celerybridge._received`): the implementation
receives the objects the contract's annotations validate into.
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import PydanticSchemaGenerationError
from pydantic.errors import PydanticUserError

from ._compat import Verdict, subset
from ._received import received_fits
from ._schema import type_schema
from ._worker.app import check_signature

if TYPE_CHECKING:
    from ._contracts import RemoteTask

_EMPTY = inspect.Parameter.empty


@dataclass(frozen=True, slots=True)
class Finding:
    """One thing ``check`` reports about an implementation: a mismatch (``ok`` False) or
    something it cannot compare (``ok`` None)."""

    ok: bool | None
    text: str


def type_name(annotation: Any) -> str:
    """An annotation as a reader writes it: ``dict[str, str] | None``, no ``Annotated``."""
    if annotation is _EMPTY:
        return "(not annotated)"
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return type_name(args[0])
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is typing.Literal:
        return f"Literal[{', '.join(repr(a) for a in args)}]"
    if annotation is None or annotation is type(None):
        return "None"
    if origin is not None:
        name = getattr(origin, "__qualname__", None) or repr(origin).removeprefix("typing.")
        return f"{name}[{', '.join(type_name(a) for a in args)}]" if args else name
    if isinstance(annotation, type):
        return annotation.__qualname__
    return repr(annotation).removeprefix("typing.")


def _signature(fn: Callable[..., Any]) -> inspect.Signature:
    try:
        return inspect.signature(fn, eval_str=True)
    except NameError:
        return inspect.signature(fn)


def _schema(annotation: Any, *, returned: bool = False) -> dict[str, Any] | str:
    """The JSON Schema of ``annotation``, or why pydantic cannot write one."""
    try:
        return type_schema(annotation, returned=returned)
    except (PydanticSchemaGenerationError, PydanticUserError, TypeError, NameError) as exc:
        return f"{type_name(annotation)} has no JSON Schema ({type(exc).__name__})"


def _compare(narrow: Any, wide: Any, *, returned: bool) -> Verdict:
    a = _schema(narrow, returned=returned)
    b = _schema(wide)
    if isinstance(a, str) or isinstance(b, str):
        return Verdict(None, a if isinstance(a, str) else str(b))
    try:
        verdict = subset(a, b)
        if verdict.ok is False:
            return verdict
        # The schemas agree (or cannot tell): the Python objects must agree too.
        received = received_fits(narrow, wide)
        return verdict if verdict.ok is None and received.ok is not False else received
    except RecursionError:
        return Verdict(None, "the types are nested too deeply to compare")


def _receivers(
    contract: inspect.Signature, positional: tuple[str, ...], impl: inspect.Signature
) -> dict[str, Any]:
    """For each contract parameter, the annotation of the implementation parameter that
    receives it when the call arrives as the bridge sends it (``*args``/``**kwargs``:
    their item annotation)."""
    markers = {name: object() for name in contract.parameters}
    keywords = {n: markers[n] for n in contract.parameters if n not in positional}
    bound = impl.bind(*(markers[n] for n in positional), **keywords)
    by_marker: dict[int, Any] = {}
    for name, value in bound.arguments.items():
        param = impl.parameters[name]
        if param.kind is inspect.Parameter.VAR_POSITIONAL:
            by_marker.update((id(v), param.annotation) for v in value)
        elif param.kind is inspect.Parameter.VAR_KEYWORD:
            by_marker.update((id(v), param.annotation) for v in value.values())
        else:
            by_marker[id(value)] = param.annotation
    return {name: by_marker[id(marker)] for name, marker in markers.items()}


def check_implementation(stub: RemoteTask[Any, Any], fn: Callable[..., Any]) -> list[Finding]:
    """What ``check`` reports about ``fn`` as the implementation of ``stub`` (empty: fits)."""
    problem = check_signature(stub, fn)
    if problem is not None:
        return [Finding(False, problem)]
    contract = stub.binder.signature
    try:
        impl = _signature(fn)
    except (TypeError, ValueError) as exc:  # check_signature read it: not expected
        return [Finding(None, f"its signature cannot be read: {exc}")]
    who = getattr(fn, "__qualname__", repr(fn))
    findings = []
    for name, annotation in _receivers(contract, stub.binder.positional, impl).items():
        declared = contract.parameters[name].annotation
        verdict = _compare(declared, annotation, returned=False)
        if verdict.ok is not True:
            findings.append(
                _finding(
                    verdict,
                    f"parameter {name!r}: the contract sends {type_name(declared)}, "
                    f"{who} takes {type_name(annotation)}",
                )
            )
    promised, returned = contract.return_annotation, impl.return_annotation
    if returned is _EMPTY:
        findings.append(Finding(None, f"return: {who} has no return annotation: cannot compare"))
    else:
        verdict = _compare(returned, promised, returned=True)
        if verdict.ok is not True:
            findings.append(
                _finding(
                    verdict,
                    f"return: the contract promises {type_name(promised)}, "
                    f"{who} returns {type_name(returned)}",
                )
            )
    return findings


def _finding(verdict: Verdict, what: str) -> Finding:
    """A mismatch (``what (why)``) or an undecided comparison (``what: cannot compare: why``)."""
    if verdict.ok is False:
        return Finding(False, f"{what} ({verdict.reason})")
    return Finding(None, f"{what}: cannot compare: {verdict.reason}")
