"""The intake's checks on generated messages: they never raise, and whatever they let
through is something Celery's own request code takes without an error."""

from __future__ import annotations

import json
from typing import Any

import pytest
from celery import Celery
from celery.worker.request import Request
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kombu.message import Message

from celerybridge._transports._protocol import Origin, task_message
from celerybridge._transports.base import OutgoingMessage
from celerybridge._worker.intake import shape
from celerybridge._worker.intake.envelope import envelope_refusal

EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
# What a hostile sender would try for a header: JSON of any kind, or a plausible value.
header_values = (
    json_values
    | st.datetimes().map(lambda d: d.isoformat())
    | st.sampled_from(["", "2026-13-01", "2026-01-01T25:00", "NaN", "1e400", "\x00", "☃" * 300])
    | st.lists(st.none() | st.floats() | st.integers() | st.text(max_size=3), max_size=3)
    | st.integers(min_value=0, max_value=10**7)
)
header_names = st.sampled_from(sorted(shape._HEADER_TYPES)) | st.text(max_size=12)


def good_headers() -> dict[str, Any]:
    message = OutgoingMessage("6b1c3c9e-3d10-4bb6-8a85-1d0f4f6b3b7e", "calc.add", "q", (1, 2), {})
    return dict(task_message(message, Origin()).headers)


@pytest.fixture(scope="module")
def app() -> Celery:
    app = Celery("shape", set_as_current=False)

    @app.task(name="calc.add", shared=False)  # type: ignore[untyped-decorator]
    def add(x: int, y: int) -> int:
        return x + y

    return app


def celery_takes(app: Celery, headers: dict[str, Any], body: bytes) -> None:
    """What the worker's strategy does with a message before the pool runs it."""
    message = Message(
        body=body,
        content_type="application/json",
        content_encoding="utf-8",
        headers=headers,
        properties={"correlation_id": headers["id"], "reply_to": ""},
        delivery_info={"exchange": "", "routing_key": "q"},
    )
    request = Request(
        message,
        app=app,
        task=app.tasks[headers["task"]] if headers["task"] in app.tasks else app.tasks["calc.add"],
        body=body,
        headers=headers,
        decoded=False,
        utc=True,
    )
    request.info()
    request.humaninfo()
    if request.eta:
        request.eta.timestamp()
    if request.expires:
        request.expires.timestamp()
    assert request.time_limits is None or len(request.time_limits) == 2
    args, kwargs, embed = json.loads(body)
    assert isinstance(args, list)
    assert isinstance(kwargs, dict)
    assert isinstance(embed, dict)


@settings(max_examples=400, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(changes=st.dictionaries(header_names, header_values, max_size=4), drop=st.sets(header_names))
def test_headers_the_gate_lets_through_are_headers_celery_takes(
    app: Celery, changes: dict[str, Any], drop: set[str]
) -> None:
    headers = {k: v for k, v in {**good_headers(), **changes}.items() if k not in drop}
    reason = shape.header_refusal(headers)
    assert reason is None or isinstance(reason, str)
    if reason is None:
        celery_takes(app, headers, json.dumps([[1, 2], {}, EMBED]).encode())


@settings(max_examples=400)
@given(document=json_values)
def test_the_body_checks_never_raise_and_accept_only_the_triple(document: Any) -> None:
    raw = json.dumps(document).encode()
    parsed, reason = shape.parse_body(raw, 1 << 20)
    if reason is not None:
        return
    if shape.body_refusal(parsed) is None:
        args, kwargs, embed = parsed
        assert isinstance(args, list)
        assert isinstance(kwargs, dict)
        assert isinstance(embed, dict)
        assert set(embed) <= shape.EMBED_KEYS


@settings(max_examples=300)
@given(raw=st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode()))
def test_the_checks_never_raise_on_arbitrary_bytes(raw: bytes) -> None:
    document, reason = shape.parse_body(raw, 1 << 20)
    if reason is None:
        assert json.dumps(document) == json.dumps(json.loads(raw))  # NaN != NaN
    else:
        assert document is None
        assert isinstance(reason, str)
    result = envelope_refusal(raw, 1 << 20)
    assert result is None or isinstance(result, str)
    assert shape.content_refusal(raw, raw, {}) is not None


@settings(max_examples=300)
@given(properties=json_values, headers=json_values)
def test_property_and_header_checks_take_any_value(properties: Any, headers: Any) -> None:
    for reason in (shape.property_refusal(properties), shape.header_refusal(headers)):
        assert reason is None or isinstance(reason, str)


@pytest.mark.parametrize("depth", [shape.MAX_DEPTH + 1, 999, 5_000, 200_000])
def test_deep_nesting_is_refused_at_any_depth_without_recursion(depth: int) -> None:
    raw = b"[" * depth + b"]" * depth
    assert shape.parse_body(raw, 1 << 20) == (
        None,
        f"the body nests deeper than {shape.MAX_DEPTH} levels",
    )


def test_nesting_up_to_the_limit_is_read() -> None:
    depth = shape.MAX_DEPTH
    document, reason = shape.parse_body(b"[" * depth + b"]" * depth, 1 << 20)
    assert reason is None
    for _ in range(depth - 1):
        [document] = document
    assert document == []


def test_the_size_is_checked_before_parsing() -> None:
    assert shape.parse_body(b"x" * 2048, 1024) == (
        None,
        "the body has 2048 bytes, more than the 1024 this worker accepts "
        "(CELERYBRIDGE_MAX_MESSAGE_BYTES)",
    )


@pytest.mark.parametrize(
    ("step", "reason"),
    [
        ({"task": "t", "args": [], "kwargs": {}, "options": {}, "subtask_type": None,
          "immutable": False, "chord_size": None}, None),
        ({"task": "t", "evil": 1}, "unknown signature keys 'evil'"),
        ({"args": []}, "a signature needs a 'task' name"),
        ({"task": "t", "args": "x"}, "signature 'args' must be an array"),
        ({"task": "t", "args": [], "kwargs": []}, "signature 'kwargs' must be an object"),
        ({"task": "t", "args": [], "kwargs": {}, "options": {}, "immutable": "yes"},
         "signature 'immutable' must be a boolean"),
        ({"task": "t"}, "signature 'args' must be an array"),
        ({"task": "t", "args": [], "kwargs": {}}, "signature 'options' must be an object"),
        ("t", "a signature must be an object, not a string"),
    ],
)  # fmt: skip
def test_signatures_in_the_embed(step: Any, reason: str | None) -> None:
    assert shape.signature_refusal(step) == reason
