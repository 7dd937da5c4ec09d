"""The JSON Schema comparison behind ``celerybridge check`` (celerybridge._compat).

Generated pairs of annotations, each with a strategy for the JSON values it admits:
whenever the comparison says every value of A fits B, a value of A must validate
against B's schema (jsonschema decides, not our code). And the Python half
(celerybridge._received): what an implementation receives, with the exact findings.
"""

from __future__ import annotations

import base64
import enum
from collections.abc import Sequence
from decimal import Decimal
from typing import Annotated, Any, Literal

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, Field

from celerybridge import remote_task
from celerybridge._check import check_implementation, type_name
from celerybridge._compat import subset
from celerybridge._received import received_fits
from celerybridge._schema import type_schema

Typed = tuple[Any, st.SearchStrategy[Any]]

LEAVES: list[Typed] = [
    (int, st.integers(-(2**63), 2**63 - 1)),
    (Annotated[int, Field(ge=0)], st.integers(0, 2**63 - 1)),
    (Annotated[int, Field(ge=0, lt=10)], st.integers(0, 9)),
    (float, st.floats(allow_nan=False, allow_infinity=False) | st.integers(-100, 100)),
    (str, st.text(max_size=5)),
    (Annotated[str, Field(max_length=3)], st.text(max_size=3)),
    (bool, st.booleans()),
    (None, st.none()),
    (bytes, st.binary(max_size=6).map(lambda b: base64.urlsafe_b64encode(b).decode())),
    (Literal["a", "b"], st.sampled_from(["a", "b"])),
    (Literal["a"], st.just("a")),
    (Literal[1, 2], st.sampled_from([1, 2])),
]


def _nullable(annotation: Any) -> Any:
    return type(None) if annotation is None else annotation


def _extend(children: st.SearchStrategy[Typed]) -> st.SearchStrategy[Typed]:
    def listed(t: Typed) -> Typed:
        return (list[t[0]], st.lists(t[1], max_size=3))  # type: ignore[name-defined]

    def mapped(t: Typed) -> Typed:
        return (dict[str, t[0]], st.dictionaries(st.text(max_size=3), t[1], max_size=3))  # type: ignore[name-defined]

    def union(pair: tuple[Typed, Typed]) -> Typed:
        (a, values_a), (b, values_b) = pair
        return (_nullable(a) | _nullable(b), values_a | values_b)

    def pair(ab: tuple[Typed, Typed]) -> Typed:
        (a, values_a), (b, values_b) = ab
        return (tuple[a, b], st.tuples(values_a, values_b).map(list))

    return st.one_of(
        children.map(listed),
        children.map(mapped),
        st.tuples(children, children).map(union),
        st.tuples(children, children).map(pair),
    )


TYPES = st.recursive(st.sampled_from(LEAVES), _extend, max_leaves=4)


def _schema(annotation: Any) -> dict[str, Any]:
    return type_schema(annotation)


@settings(max_examples=300, deadline=None)
@given(narrow=TYPES, wide=TYPES, data=st.data())
def test_a_subset_verdict_holds_for_the_narrow_sides_values(
    narrow: Typed, wide: Typed, data: st.DataObject
) -> None:
    _check_pair(narrow, wide, data)


@settings(max_examples=200, deadline=None)
@given(narrow=st.sampled_from(LEAVES), wide=st.sampled_from(LEAVES), data=st.data())
def test_a_subset_verdict_holds_for_simple_types(
    narrow: Typed, wide: Typed, data: st.DataObject
) -> None:
    # Bounds and literals meet often here; in nested types, rarely.
    _check_pair(narrow, wide, data)


def _check_pair(narrow: Typed, wide: Typed, data: st.DataObject) -> None:
    a, b = _schema(narrow[0]), _schema(wide[0])
    verdict = subset(a, b)
    assert verdict.ok in (True, False, None)
    assert verdict.ok is True or verdict.reason
    value = data.draw(narrow[1])
    assert jsonschema.Draft202012Validator(a).is_valid(value)  # the strategy is right
    if verdict.ok:
        assert jsonschema.Draft202012Validator(b).is_valid(value), (narrow[0], wide[0])


@settings(max_examples=150, deadline=None)
@given(typed=TYPES, other=TYPES)
def test_a_type_fits_itself_and_any_union_with_it(typed: Typed, other: Typed) -> None:
    a = typed[0]
    assert subset(_schema(a), _schema(a)).ok is True
    assert subset(_schema(a), _schema(_nullable(a) | _nullable(other[0]))).ok is True


class Receipt(BaseModel):
    key: str
    size: int
    version_id: str | None = None


class Slim(BaseModel):
    key: str


@pytest.mark.parametrize(
    ("narrow", "wide", "ok", "reason"),
    [
        (int, float, True, ""),
        (float, int, False, "number is not integer"),
        (bool, int, False, "boolean is not integer"),
        (str, bytes, False, "string is not base64 string"),
        (bytes, str, False, "base64 string is not string"),
        (
            list[int],
            set[int],
            False,
            "array of integer may repeat items; array of integer (unique items) may not",
        ),
        (int | None, int, False, "null is not integer"),
        (Literal["a", "c"], Literal["a", "b"], False, '"c" is not one of "a", "b"'),
        (
            Annotated[int, Field(ge=-1)],
            Annotated[int, Field(ge=0)],
            False,
            "numbers from -1 are below the minimum 0",
        ),
        (Annotated[int, Field(gt=0)], Annotated[int, Field(ge=1)], True, ""),
        (
            Annotated[str, Field(max_length=9)],
            Annotated[str, Field(max_length=8)],
            False,
            "length up to 9 is above the maximum 8",
        ),
        (
            Annotated[str, Field(pattern="^a")],
            Annotated[str, Field(pattern="^b")],
            None,
            "pattern '^b' is not compared",
        ),
        (Receipt, Slim, True, ""),
        (
            Slim,
            Receipt,
            False,
            "property 'size' is required by object Receipt, not declared in object Slim",
        ),
        (
            dict[str, str],
            Receipt,
            False,
            "property 'key' is required by object Receipt, not declared in object of string",
        ),
        (tuple[int, str], tuple[int, int], False, "item 1: string is not integer"),
        (Any, int, False, "any value is not integer"),
        (int, Any, True, ""),
    ],
)
def test_verdicts_and_their_reasons(narrow: Any, wide: Any, ok: bool | None, reason: str) -> None:
    verdict = subset(_schema(narrow), _schema(wide))
    assert (verdict.ok, verdict.reason) == (ok, reason)


class Node(BaseModel):
    value: int
    children: list[Node] = []


class Shade(enum.Enum):  # a plain Enum: its members are not str
    DARK = "dark"


@pytest.mark.parametrize(
    ("narrow", "wide", "ok", "reason"),
    [
        (dict[int, int], dict[str, int], True, ""),  # "1" is a str key too
        (dict[str, int], dict[int, int], None, "pattern '^-?[0-9]+$' is not compared"),
        (Slim, dict[int, str], False, "property 'key' is not a key of object of string"),
        (Node, Node, True, ""),
    ],
)
def test_dict_keys_and_recursive_models(
    narrow: Any, wide: Any, ok: bool | None, reason: str
) -> None:
    verdict = subset(_schema(narrow), _schema(wide))
    assert (verdict.ok, verdict.reason) == (ok, reason)


@pytest.mark.parametrize(
    ("sent", "taken", "finding"),
    [
        (Slim, dict[str, Any], "it receives Slim objects, not dict[str, Any]"),
        (Shade, str, "it receives <Shade.DARK: 'dark'>, not str"),
        (tuple[int, int], list[int], "it receives a tuple, not list[int]"),
        (dict[str, int], dict[int, int], "keys: it receives str objects, not int"),
        (list[float], list[Decimal], "items: it receives float objects, not Decimal"),
    ],
)
def test_check_names_the_python_objects_an_implementation_receives(
    sent: Any, taken: Any, finding: str
) -> None:
    def declared(value):  # type: ignore[no-untyped-def]  # annotated below
        ...

    def impl(value):  # type: ignore[no-untyped-def]
        return None

    declared.__annotations__ = {"value": sent, "return": None}
    impl.__annotations__ = {"value": taken, "return": None}
    contract = remote_task(name="compat.received", queue="compat")(declared)
    assert [(f.ok, f.text) for f in check_implementation(contract, impl)] == [
        (
            False,
            f"parameter 'value': the contract sends {type_name(sent)}, "
            f"test_check_names_the_python_objects_an_implementation_receives.<locals>.impl "
            f"takes {type_name(taken)} ({finding})",
        )
    ]


@pytest.mark.parametrize(
    ("sent", "taken"),
    [(int, float), (list[int], Sequence[int]), (Literal["a"], str), (Receipt, Slim), (Node, Node)],
)
def test_check_takes_what_python_takes(sent: Any, taken: Any) -> None:
    assert received_fits(sent, taken).ok is True
