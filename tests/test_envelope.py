"""The body, the Redis envelope and the body's depth check, on their fast ways (``_json``).

A flat body (plain arguments, no workflow) is written byte for byte as kombu's encoder
writes it. The envelope kombu LPUSHes (body in base64, headers, properties) is written
by orjson when every header is a plain JSON value, by kombu's encoder otherwise; a
worker decodes either to the same document. The body's depth is settled by counting
brackets when that cannot be wrong, by decoding it otherwise.
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
from hypothesis import example, given
from hypothesis import strategies as st
from kombu.utils import json as kombu_module

from celerybridge import CallError
from celerybridge._constants import MAX_BODY_DEPTH
from celerybridge._transports._json import flat_body, kombu_json
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
        return json.loads(kombu_module.dumps(document))
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


# -- the body -----------------------------------------------------------------------------

NO_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
# Every character class the encoder treats apart: quotes, backslashes, control
# characters, DEL, non-ASCII, astral, lone surrogates.
TEXTS = st.text() | st.text(alphabet='\x00\x1f\x7f"\\ aé\u2028\ud800\U0001f642')
FLAT = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | TEXTS
    | st.sampled_from([2**100, -(2**63), 1e16, 5e-324, -0.0, 0.1])
)


@given(st.lists(FLAT, max_size=5), st.dictionaries(TEXTS, FLAT, max_size=3))
@example(["DEL \x7f", 'quote "', "back \\ slash", "tab \t", "é", "\ud800"], {"\x7f": 1.5})
def test_a_flat_body_is_kombus_byte_for_byte(args: list[Any], kwargs: dict[str, Any]) -> None:
    body = flat_body(tuple(args), kwargs, dict(NO_EMBED))
    if any(isinstance(v, float) and not math.isfinite(v) for v in [*args, *kwargs.values()]):
        assert body is None  # NaN and infinities: left to kombu's encoder
    else:
        assert body == kombu_json((tuple(args), kwargs, NO_EMBED))


@pytest.mark.parametrize(
    ("args", "kwargs", "embed"),
    [
        pytest.param((Name("s"),), {}, NO_EMBED, id="str-subclass"),
        pytest.param((Level.HIGH,), {}, NO_EMBED, id="int-subclass"),
        pytest.param(([1],), {}, NO_EMBED, id="nested"),
        pytest.param((), {1: "x"}, NO_EMBED, id="int-key"),
        pytest.param((), {}, {**NO_EMBED, "callbacks": [{"task": "t"}]}, id="callback"),
        pytest.param((), {}, dict(reversed(NO_EMBED.items())), id="reordered-embed"),
    ],
)
def test_a_body_that_is_not_flat_is_left_to_kombus_encoder(
    args: tuple[Any, ...], kwargs: dict[Any, Any], embed: dict[str, Any]
) -> None:
    assert flat_body(args, kwargs, embed) is None


def test_a_task_message_body_is_kombus_either_way() -> None:
    for args in [("x" * 1024, 7, None, 2.5, True), ('é\x7f"', [1, {"a": ()}])]:
        message = OutgoingMessage("id", "env.task", "env-queue", args, {"k": "v"})
        wire = task_message(message, Origin())
        assert wire.body == kombu_json((args, {"k": "v"}, NO_EMBED))


# -- the body's depth ----------------------------------------------------------------------


def body_of(value: Any) -> bytes:
    return kombu_module.dumps([[value], {}, {}]).encode()


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
    kombu_module.register_type(Deep, "cb-test-deep", lambda _: 0, lambda _: nested(40))
    try:
        yield
    finally:
        del kombu_module._encoders[Deep]
        del kombu_module._decoders["cb-test-deep"]


@pytest.mark.usefixtures("deep_type")
def test_a_marked_object_that_decodes_deep_is_refused() -> None:
    body = body_of(Deep())
    assert body.count(b"[") + body.count(b"{") < MAX_BODY_DEPTH
    with pytest.raises(CallError, match="nest deeper than 32 levels"):
        check_body_depth("env.task", body)
