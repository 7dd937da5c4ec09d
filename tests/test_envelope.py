"""The Redis envelope and the body's depth check, on their fast ways.

The envelope kombu LPUSHes (body in base64, headers, properties) is written by orjson
when every header is a plain JSON value, by kombu's encoder otherwise; a worker decodes
either to the same document. The body's depth is settled by counting brackets when
that cannot be wrong, by decoding it otherwise.
"""

from __future__ import annotations

import enum
import json
import math
import uuid
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from kombu.utils import json as kombu_json

from celerybridge import CallError
from celerybridge._constants import MAX_BODY_DEPTH
from celerybridge._transports._protocol import (
    Origin,
    TaskMessage,
    check_body_depth,
    redis_payload,
    task_message,
)
from celerybridge._transports.base import OutgoingMessage

from ._strategies import ANYTHING


class Colour(enum.Enum):
    RED = "red"


class Level(enum.IntEnum):
    HIGH = 9


class Name(str):
    pass


# Values orjson writes otherwise than kombu's encoder, or refuses where it does not.
ODD = st.sampled_from(
    [
        uuid.UUID(int=7),
        Colour.RED,
        Level.HIGH,
        Name("subclassed"),
        math.nan,
        math.inf,
        2**64,
        -(2**70),
        "lone \ud800 surrogate",
        (1, "two"),
        {1: "int key"},
    ]
)
HEADER_VALUES = st.recursive(
    ANYTHING | ODD,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(), children),
    max_leaves=10,
)


def wire_message(**extra_headers: Any) -> TaskMessage:
    message = OutgoingMessage(str(uuid.uuid4()), "env.task", "env-queue", ("é", 1), {"k": None})
    wire = task_message(message, Origin())
    wire.headers.update(extra_headers)
    return wire


def kombus(wire: TaskMessage, extra: dict[str, Any]) -> Any:
    """The envelope of ``wire`` as kombu's encoder writes it, decoded (``None``: it
    refuses it). ``extra``: the headers added to the plain message."""
    plain = {k: v for k, v in wire.headers.items() if k not in extra}
    document = json.loads(redis_payload(replace(wire, headers=plain), "env-queue"))
    document["headers"] = wire.headers
    try:
        return json.loads(kombu_json.dumps(document))
    except (TypeError, ValueError, RecursionError):
        return None


def decoded(wire: TaskMessage) -> Any:
    """What a worker reads of the envelope we write (``None``: it cannot be written)."""
    try:
        return json.loads(redis_payload(wire, "env-queue"))
    except (TypeError, ValueError, RecursionError):
        return None


def same(a: Any, b: Any) -> bool:
    """Equal as JSON documents, NaN equal to NaN, key order included."""
    return json.dumps(a) == json.dumps(b)


@given(st.dictionaries(st.text(max_size=8), HEADER_VALUES, max_size=4))
def test_a_worker_reads_the_headers_kombus_encoder_would_have_written(
    headers: dict[str, Any],
) -> None:
    wire = wire_message(**headers)
    ours, theirs = decoded(wire), kombus(wire, headers)
    assert (ours is None) == (theirs is None)
    if ours is not None:
        for document in (ours, theirs):
            assert uuid.UUID(document["properties"].pop("delivery_tag")).version == 4
        assert same(ours, theirs)


@pytest.mark.parametrize(
    ("value", "read"),
    [
        pytest.param(
            uuid.UUID(int=7),
            {"__type__": "uuid", "__value__": {"hex": "00000000000000000000000000000007"}},
        ),
        pytest.param(Level.HIGH, 9),
        pytest.param(2**70, 2**70),
        pytest.param([1.5, {"a": ["é", None]}], [1.5, {"a": ["é", None]}]),
    ],
)
def test_a_header_arrives_as_kombus_encoder_writes_it(value: Any, read: Any) -> None:
    assert decoded(wire_message(custom=value))["headers"]["custom"] == read


def test_a_nan_header_stays_nan_rather_than_null() -> None:
    assert math.isnan(decoded(wire_message(custom=math.nan))["headers"]["custom"])


def test_a_header_kombus_encoder_refuses_is_refused() -> None:
    with pytest.raises(TypeError, match="Colour is not JSON serializable"):
        redis_payload(wire_message(custom=Colour.RED), "env-queue")


def test_plain_headers_are_written_as_compact_utf8() -> None:
    """The orjson way is taken for the usual message (what makes it fast)."""
    raw = redis_payload(wire_message(), "env-queue")
    assert raw.startswith(b'{"body":"')
    assert "('é', 1)".encode() in raw  # argsrepr in UTF-8, not \\u escapes


# -- the body's depth ----------------------------------------------------------------------


def body_of(value: Any) -> bytes:
    return kombu_json.dumps([[value], {}, {}]).encode()


def nested(levels: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(levels - 1):
        value = [value]
    return value


def test_brackets_inside_strings_do_not_make_a_body_too_deep() -> None:
    check_body_depth("env.task", body_of("[{" * 100))


@pytest.mark.parametrize("levels", [MAX_BODY_DEPTH - 2, MAX_BODY_DEPTH - 1])
def test_a_body_at_the_limit_is_judged_by_its_depth(levels: int) -> None:
    body = body_of(nested(levels))  # the body's list and args list around it
    if levels + 2 > MAX_BODY_DEPTH:
        with pytest.raises(CallError, match="nest deeper than 32 levels"):
            check_body_depth("env.task", body)
    else:
        check_body_depth("env.task", body)


class Deep:
    """A type kombu's encoder writes as a small marked object and decodes into a deep
    list: the text has few brackets, the decoded body is too deep."""


@pytest.fixture
def deep_type() -> Iterator[None]:
    kombu_json.register_type(Deep, "cb-test-deep", lambda _: 0, lambda _: nested(40))
    try:
        yield
    finally:
        del kombu_json._encoders[Deep]
        del kombu_json._decoders["cb-test-deep"]


@pytest.mark.usefixtures("deep_type")
def test_a_marked_object_that_decodes_deep_is_refused() -> None:
    body = body_of(Deep())
    assert body.count(b"[") + body.count(b"{") < MAX_BODY_DEPTH
    with pytest.raises(CallError, match="nest deeper than 32 levels"):
        check_body_depth("env.task", body)
