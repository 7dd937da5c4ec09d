"""Send options and contract signatures, checked when built: no broker needed."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import anyio
import pytest
from celery import chain, chord, group
from celery.canvas import Signature
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from celerybridge import (
    ArgumentError,
    Bridge,
    CallError,
    ConfigurationError,
    ContractError,
    DelegationError,
    MemoryTransport,
    remote_task,
)
from celerybridge._canvas import CanvasApp, capture
from celerybridge._options import MAX_EXPIRES, SUPPORTED_OPTIONS
from celerybridge._signing import BAD_SIGNATURE, Signer
from celerybridge._transports._protocol import Origin, task_message

from .workers import canvas_bindings as b

KEY = "k" * 40


# -- Options ---------------------------------------------------------------------------


def test_every_supported_option_is_accepted_and_carried() -> None:
    eta = datetime(2031, 1, 1, tzinfo=UTC)
    expires = datetime.now(UTC) + timedelta(days=1)
    stub = b.add.with_options(
        queue="q",
        eta=eta,
        expires=expires,
        priority=3,
        headers={"x-tenant": "acme"},
        time_limit=10,
        soft_time_limit=timedelta(seconds=5),
        retry=False,
        retry_policy={"max_retries": 2},
        link=b.mul.s(2),
        link_error=Signature("audit.failed"),
    )
    message = stub.message(stub.bind((1, 2), {}))
    assert message.queue == "q"
    assert stub.signature((1, 2), task_id="t-1").options["task_id"] == "t-1"  # per call
    options = message.options
    assert options["eta"] == eta
    assert options["expires"] == expires
    assert (options["time_limit"], options["soft_time_limit"]) == (10.0, 5.0)
    assert options["headers"] == {"x-tenant": "acme"}
    assert [s["task"] for s in options["link"]] == ["canvas.mul"]
    assert [s["task"] for s in options["link_error"]] == ["audit.failed"]


def test_unsupported_options_name_the_supported_ones() -> None:
    with pytest.raises(CallError) as caught:
        b.add.apply_async((1, 2), exchange="x", routing_key="y")
    assert str(caught.value) == (
        "task 'canvas.add': unsupported option(s) exchange, routing_key; supported: "
        + ", ".join(SUPPORTED_OPTIONS)
    )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"eta": datetime(2030, 1, 1)},
            "eta must be a timezone-aware datetime (e.g. datetime.now(UTC) + "
            "timedelta(seconds=5)), got the naive 2030-01-01T00:00:00",
        ),
        ({"eta": "2030-01-01"}, "eta must be a timezone-aware datetime, got '2030-01-01'"),
        (
            {"countdown": 1, "eta": datetime.now(UTC)},
            "give countdown or eta, not both",
        ),
        (
            {"expires": 10**8},
            "expires must be at most 4.29497e+06 s (49.7 days), RabbitMQ's longest "
            "message TTL; got 100000000",
        ),
        (
            {"expires": datetime(2000, 1, 1, tzinfo=UTC)},
            "expires is in the past: 2000-01-01T00:00:00+00:00",
        ),
        ({"expires": -1}, "expires must be a positive, finite duration, got -1"),
        ({"time_limit": math.inf}, "time_limit must be a positive, finite duration, got inf"),
        (
            {"time_limit": 5, "soft_time_limit": 6},
            "soft_time_limit (6 s) must not exceed time_limit (5 s)",
        ),
        ({"task_id": ""}, "task_id must be 1 to 255 bytes of printable UTF-8, got ''"),
        (
            {"task_id": "a\nb"},
            "task_id must be 1 to 255 bytes of printable UTF-8, got 'a\\nb'",
        ),
        (
            {"task_id": "\udc80"},
            "task_id must be 1 to 255 bytes of printable UTF-8, got '\\udc80'",
        ),
        (
            {"expires": 1e-9},
            "expires must be at least 1 ms (RabbitMQ counts a TTL in whole "
            "milliseconds), got 1e-09",
        ),
        (
            {"countdown": timedelta(days=3651)},
            "countdown must be at most 315360000 s (10 years), got datetime.timedelta(days=3651)",
        ),
        (
            {"headers": {"task": "other.task"}},
            "header 'task' is reserved: Celery's protocol, "
            "the worker's request or celerybridge set it",
        ),
        (
            {"headers": {"x-celerybridge-service": "me"}},
            "header 'x-celerybridge-service' is "
            "reserved: Celery's protocol, the worker's request or celerybridge set it",
        ),
        (
            {"headers": {"callbacks": []}},
            "header 'callbacks' is reserved: Celery's protocol, "
            "the worker's request or celerybridge set it",
        ),
        (
            {"headers": {"x": math.nan}},
            "headers must hold JSON values only: Out of range float values are not JSON compliant",
        ),
        ({"headers": {"x": "y" * 70000}}, "headers must be at most 65536 bytes as JSON"),
        ({"retry": "yes"}, "retry must be True or False, got 'yes'"),
        (
            {"retry_policy": {"max_retries": 1, "bogus": 2}},
            "retry_policy: unknown key(s) bogus; known: interval_max, interval_start, "
            "interval_step, max_retries",
        ),
        (
            {"link": "canvas.mul"},
            "link must be a signature or a list of them (stub.s(...), stub.si(...)), got str",
        ),
        ({"priority": 10}, "priority must be an integer from 0 to 9, got 10"),
        # An option value, not a contract: a ConfigurationError (it was a ContractError).
        ({"queue": "a b"}, "queue must be a non-empty string without spaces, got 'a b'"),
        ({"queue": "\ud800"}, "queue must be valid UTF-8, got '\\ud800'"),
        ({"queue": "q" * 256}, "queue must be at most 255 bytes of UTF-8, got 256 bytes"),
    ],
)
def test_bad_option_values_are_refused_with_exact_words(
    options: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigurationError) as caught:
        b.add.apply_async((1, 2), **options)
    assert str(caught.value) == message


def test_a_bad_queue_in_a_signature_or_workflow_step_is_a_configuration_error() -> None:
    message = "queue must be a non-empty string without spaces, got 'a b'"
    with pytest.raises(ConfigurationError) as caught:
        b.add.signature((1, 2), queue="a b")
    assert str(caught.value) == message
    with pytest.raises(ConfigurationError) as caught:
        b.add.with_options(queue="a b")
    assert str(caught.value) == message
    with pytest.raises(ContractError) as contract:  # a contract's definition: still that
        remote_task(name="svc.bad_queue", queue="a b")(lambda: None)
    assert str(contract.value) == message


async def test_an_absolute_expires_is_checked_again_when_each_message_is_built() -> None:
    """An aware datetime given to with_options was checked once: calls after that moment
    sent a TTL of 0 (RabbitMQ drops such a message unseen; the caller only timed out)."""
    soon = datetime.now(UTC) + timedelta(milliseconds=200)
    stub = b.add.with_options(expires=soon)
    transport = MemoryTransport(execute=False)
    async with Bridge(publisher=transport, results=transport) as bridge:
        await stub.via(bridge).delegate(1, 2)  # still ahead
        await anyio.sleep(0.3)
        with pytest.raises(ConfigurationError) as caught:
            await stub.via(bridge).delegate(1, 2)
        assert str(caught.value) == f"expires is in the past: {soon.isoformat()}"
        with pytest.raises(ConfigurationError) as caught:  # a workflow: checked at send too
            await bridge.send_canvas(chain(stub.s(1, 2), b.mul.s(3)))
        assert str(caught.value) == f"expires is in the past: {soon.isoformat()}"
    assert len(transport.messages) == 1


def test_a_link_that_cannot_take_the_result_is_refused_when_built() -> None:
    with pytest.raises(ArgumentError) as caught:
        b.add.with_options(link=b.mul.s(1, 2))
    assert str(caught.value) == (
        "task 'canvas.mul' v1: too many positional arguments (as a link callback, the "
        "result of the task it follows comes first)"
    )


# Hostile and odd values at the boundaries: each is refused with a ConfigurationError
# or accepted and then carried by a message the worker's
# intake would take.
_names = st.text(min_size=0, max_size=300)
_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
_json = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(headers=st.dictionaries(_names, _json, max_size=4))
def test_hostile_headers_are_refused_or_carried_intact(headers: dict[str, Any]) -> None:
    from celerybridge._worker.intake.shape import header_refusal

    try:
        stub = b.add.with_options(headers=headers)
    except ConfigurationError:
        return
    wire = task_message(stub.message(stub.bind((1, 2), {})), Origin())
    assert header_refusal(wire.headers) is None  # the worker's intake takes it
    for name, value in headers.items():
        assert wire.headers[name] == json.loads(json.dumps(value))
    assert (wire.headers["task"], wire.headers["id"]) == (
        "canvas.add",
        wire.properties["correlation_id"],
    )


_moments = st.datetimes(
    min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30),
    timezones=st.none() | st.timezones() | st.just(timezone(timedelta(hours=23, minutes=59))),
)  # fmt: skip


@settings(max_examples=200, deadline=None)
@given(eta=_moments, expires=st.one_of(_moments, st.floats(), st.integers()))
def test_odd_datetimes_are_refused_or_make_valid_headers(eta: datetime, expires: Any) -> None:
    from celerybridge._worker.intake.shape import header_refusal

    for options in ({"eta": eta}, {"expires": expires}):
        try:
            stub = b.add.with_options(**options)
        except ConfigurationError:
            continue
        wire = task_message(stub.message(stub.bind((1, 2), {})), Origin())
        assert header_refusal(wire.headers) is None
        ttl = float(wire.properties.get("expiration", 0)) / 1000
        assert 0 <= ttl <= MAX_EXPIRES
        if "eta" in options:
            assert eta.utcoffset() is not None
            assert datetime.fromisoformat(wire.headers["eta"]).timestamp() == eta.timestamp()


# -- Contract signatures ---------------------------------------------------------------


def test_signatures_are_validated_when_built() -> None:
    sig = b.add.s(1, "2")
    assert (sig["task"], sig["args"], sig["immutable"]) == ("canvas.add", (1, 2), False)
    assert sig.options["queue"] == b.QUEUE
    assert b.add.s(2)["args"] == (2,)  # partial: x comes from the previous step
    assert b.add.si(1, 2)["immutable"] is True
    assert b.add.signature((1, 2), countdown=3).options["countdown"] == 3.0
    with pytest.raises(ArgumentError) as caught:
        b.add.s("two")
    assert str(caught.value) == (
        "task 'canvas.add' v1, parameter 'y': Input should be a valid integer, unable to "
        "parse string as an integer (got 'two')"
    )
    with pytest.raises(ArgumentError) as caught:
        b.add.si(1)
    assert (
        str(caught.value) == "task 'canvas.add' v1, parameter 'y': missing a required argument: 'y'"
    )
    with pytest.raises(ArgumentError) as caught:
        b.add.s(y=1, x=2, z=3)
    assert str(caught.value) == (
        "task 'canvas.add' v1, parameter 'z': got an unexpected keyword argument 'z'"
    )
    assert b.add.s(y=1)["kwargs"] == {"y": 1}  # x still open for the previous step
    with pytest.raises(ArgumentError) as caught:
        b.add.s(x=1)  # x given: y is what is missing
    assert str(caught.value) == (
        "task 'canvas.add' v1, parameter 'y': missing a required argument: 'y'"
    )


def test_deprecated_contract_signature_warns() -> None:
    @remote_task(name="svc.old", queue="q", deprecated="use svc.new")
    def old(x: int) -> int: ...

    with pytest.warns(DeprecationWarning, match="task 'svc.old' v1 is deprecated: use svc.new"):
        old.s()


@pytest.mark.parametrize(
    ("workflow", "message"),
    [
        (
            lambda: chain(b.add.s(1), b.mul.s(2)),
            "task 'canvas.add' v1, parameter 'y': missing a required argument: 'y' "
            "(as the first step, nothing comes before it)",
        ),
        (
            lambda: chain(b.add.s(1, 2), b.add.s(3, 4)),
            "task 'canvas.add' v1: too many positional arguments "
            "(in a chain, the previous step's result comes first)",
        ),
        (
            lambda: chord([b.add.s(1, 1)], b.add.s(1, 2)),
            "task 'canvas.add' v1: too many positional arguments "
            "(as a chord's body, the list of the header's results comes first)",
        ),
        (
            lambda: group(b.add.s(1, 1), b.add.s(2)),
            "task 'canvas.add' v1, parameter 'y': missing a required argument: 'y' "
            "(as the first step, nothing comes before it)",
        ),
    ],
)
async def test_a_workflow_is_checked_again_as_it_will_run(workflow: Any, message: str) -> None:
    transport = MemoryTransport(execute=False)
    async with Bridge(publisher=transport, results=transport) as bridge:
        with pytest.raises(ArgumentError) as caught:
            await bridge.send_canvas(workflow())
    assert str(caught.value) == message
    assert transport.messages == []  # nothing was sent


async def test_an_immutable_step_ignores_the_previous_result() -> None:
    transport = MemoryTransport(execute=False)
    async with Bridge(publisher=transport, results=transport) as bridge:
        handle = await bridge.send_canvas(chain(b.add.si(1, 2), b.add.si(3, 4)))
    assert [m.task_name for m in transport.messages] == ["canvas.add"]
    assert list(transport.messages[0].options["chain"][0]["args"]) == [3, 4]
    assert handle.task_name == "canvas.add"  # type: ignore[union-attr]


async def test_a_chord_needs_a_backend_with_chords() -> None:
    async with Bridge(
        broker_url="amqp://guest:guest@127.0.0.1:5672//", result_backend="rpc://"
    ) as bridge:
        with pytest.raises(ConfigurationError) as caught:
            await bridge.send_canvas(chord([b.add.s(1, 1)], b.tsum.s()))
    assert str(caught.value) == (
        "this workflow needs a result backend that supports chords (redis://, a database); "
        'the bridge\'s result backend does not: The "rpc" result backend does not support chords!'
    )


@pytest.mark.parametrize(
    ("raised", "error", "message"),
    [
        (
            KeyError("size"),
            CallError,
            "Celery's canvas could not lay out the workflow: KeyError: 'size'",
        ),
        (
            OSError("disk full"),
            DelegationError,
            "the workflow's bookkeeping could not be stored in the result backend: OSError: "
            "disk full",
        ),
    ],
)
def test_what_celerys_canvas_raises_while_recording_is_ours(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, raised: Exception, error: type, message: str
) -> None:
    """A bare ValueError escaped from a chord on a database backend; whatever else Celery's
    canvas or its backend raises while a workflow is recorded is one of ours."""
    app = CanvasApp(f"db+sqlite:///{tmp_path / 'r.sqlite'}", None, 5.0)

    def fail(*args: Any, **kwargs: Any) -> None:
        raise raised

    monkeypatch.setattr(type(app.backend), "apply_chord", fail)
    with pytest.raises(error) as caught:
        capture(app, chord([b.add.s(1, 1)], b.tsum.s()))
    assert str(caught.value) == message


def test_the_callers_workflow_is_not_changed() -> None:
    workflow = chain(b.add.s(1, 2), b.mul.s(3))
    before = json.dumps(workflow, sort_keys=True, default=str)
    app = CanvasApp(None, None, 5)
    try:
        capture(app, workflow)
    finally:
        app.close()
    assert json.dumps(workflow, sort_keys=True, default=str) == before


def test_every_embedded_step_is_signed_as_a_whole() -> None:
    app = CanvasApp(None, None, 5)
    try:
        _, messages = capture(app, chain(b.add.s(1, 2), b.add.s(3), b.mul.s(10)))
    finally:
        app.close()
    (message,) = messages
    signer = Signer(KEY, 300)
    wire = task_message(message, Origin(), signer=signer)
    assert signer.refusal(wire.headers, wire.body) is None
    args, kwargs, embed = json.loads(wire.body)
    assert [step["task"] for step in embed["chain"]] == ["canvas.mul", "canvas.add"]
    embed["chain"][0]["args"] = [1000]  # a later step changed on the way
    altered = json.dumps([args, kwargs, embed]).encode()
    assert signer.refusal(wire.headers, altered) == BAD_SIGNATURE
