"""Red team: canvas, send options and typed sync results (branch ``canvas-options``).

Each test states what a user would observe if the change were right. None is marked
xfail: a failure here is a finding. The cases that need a worker are in
``tests/test_canvas.py``, on its workers.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery, chain, group
from celery.canvas import Signature
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import celerybridge
from celerybridge import (
    Bridge,
    BridgeSettings,
    CallError,
    CeleryBridgeError,
    ConfigurationError,
    ContractResult,
    DelegationError,
    MemoryTransport,
    RemoteTaskError,
    ResultBackendError,
    remote_task,
)
from celerybridge._registry import registry
from celerybridge._transports._protocol import Origin, task_message

from ._brokers import RESULT_BACKEND
from .workers import canvas_bindings as b

ROOT = Path(__file__).resolve().parents[1]


def _wire(stub: Any) -> Any:
    return task_message(stub.message(stub.bind((1, 2), {})), Origin())


# -- Options that pass validation and then break the publish ---------------------------


@pytest.mark.parametrize("countdown", [1e11, 1e12, 8.6e13])
def test_a_countdown_beyond_the_calendar_is_refused_when_built(countdown: float) -> None:
    """ "Validated when built": a countdown that cannot become an ETA must be refused by
    with_options, not blow up with a bare OverflowError when the message is built."""
    with pytest.raises(ConfigurationError) as caught:
        b.add.with_options(countdown=countdown)
    assert (
        str(caught.value) == f"countdown must be at most 315360000 s (10 years), got {countdown!r}"
    )


@settings(max_examples=150, deadline=None)
@given(seconds=st.floats(min_value=1e-9, max_value=1e15, allow_nan=False))
def test_any_countdown_with_options_accepts_makes_a_message(seconds: float) -> None:
    try:
        stub = b.add.with_options(countdown=seconds)
    except ConfigurationError:
        return
    _wire(stub)


def test_a_task_id_is_bounded_in_utf8_bytes_not_characters() -> None:
    """The task id travels as AMQP's correlation_id, a shortstr of at most 255 *bytes*.
    200 'é' are 200 printable characters and 400 bytes: it must be refused when built
    (as queue names are, by check_identifier), with a ConfigurationError."""
    task_id = "é" * 200
    message = f"task_id must be 1 to 255 bytes of printable UTF-8, got {task_id!r:.80}"
    with pytest.raises(ConfigurationError) as caught:
        b.add.signature((1, 2), task_id=task_id)
    assert str(caught.value) == message
    with pytest.raises(ConfigurationError) as caught:
        b.add.apply_async((1, 2), task_id=task_id)
    assert str(caught.value) == message
    b.add.signature((1, 2), task_id="é" * 127)  # 254 bytes


async def test_a_non_ascii_task_id_that_validation_accepts_is_delivered() -> None:
    """200 printable characters used to pass _task_id; as UTF-8 they are 400 bytes, over
    AMQP's shortstr (correlation_id). Now refused when built, on every per-call path
    (the case ran against a worker when it could still be sent)."""
    task_id = "é" * 200
    transport = MemoryTransport(execute=False)
    async with Bridge(publisher=transport, results=transport) as bridge:
        with pytest.raises(ConfigurationError) as caught:
            await bridge.delegate("canvas.add", 20, 22, send_options={"task_id": task_id})
    assert str(caught.value).startswith("task_id must be 1 to 255 bytes of printable UTF-8")
    assert transport.messages == []


# -- Embedded steps: their options are never validated ---------------------------------

_RESERVED = "is reserved: Celery's protocol, the worker's request or celerybridge set it"
_HOSTILE_EMBEDDED_OPTIONS = [
    pytest.param(
        {"headers": {"task": "canvas.add"}},
        f"header 'task' {_RESERVED}",
        id="header-overrides-task-name",
    ),
    pytest.param(
        {"headers": {"id": "someone-elses-id"}},
        f"header 'id' {_RESERVED}",
        id="header-overrides-task-id",
    ),
    pytest.param(
        {"headers": {"x-celerybridge-signature": "0" * 64}},
        f"header 'x-celerybridge-signature' {_RESERVED}",
        id="signature-header",
    ),
    pytest.param(
        {"priority": 99}, "priority must be an integer from 0 to 9, got 99", id="priority-99"
    ),
    pytest.param(
        {"countdown": float("nan")},
        "countdown must be a positive, finite duration, got nan",
        id="countdown-nan",
    ),
    pytest.param(
        {"countdown": -5},
        "countdown must be a positive, finite duration, got -5",
        id="countdown-negative",
    ),
    pytest.param(
        {"task_id": 5},
        "task_id must be 1 to 255 bytes of printable UTF-8, got 5",
        id="task-id-int",
    ),
    pytest.param(
        {"expires": 1e12},
        "expires must be at most 4.29497e+06 s (49.7 days), RabbitMQ's longest message TTL; "
        "got 1000000000000.0",
        id="expires-beyond-rabbitmq-ttl",
    ),
    pytest.param(
        {"time_limit": 1, "soft_time_limit": 10},
        "soft_time_limit (10 s) must not exceed time_limit (1 s)",
        id="soft-above-hard",
    ),
]


@pytest.mark.parametrize(("options", "message"), _HOSTILE_EMBEDDED_OPTIONS)
def test_a_link_callbacks_own_options_are_validated(options: dict[str, Any], message: str) -> None:
    """with_options(link=...) checks the callback's arguments but not its options: they
    are embedded verbatim in the (signed) body and the worker's Celery sends with them
    (custom headers merged last, over the protocol's)."""
    callback = Signature("canvas.mul", args=(10,), options=dict(options))
    with pytest.raises(ConfigurationError) as caught:
        b.add.with_options(link=callback)
    assert str(caught.value) == message
    with pytest.raises(ConfigurationError) as caught:  # an errback's too
        b.add.with_options(link_error=callback)
    assert str(caught.value) == message


@pytest.mark.parametrize(("options", "message"), _HOSTILE_EMBEDDED_OPTIONS)
async def test_a_chained_steps_own_options_are_validated(
    options: dict[str, Any], message: str
) -> None:
    """send_canvas validates the options of the messages it publishes itself, but not of
    the steps embedded in them (the chain's later steps), which the worker publishes."""
    transport = MemoryTransport(execute=False)
    async with Bridge(publisher=transport, results=transport) as bridge:
        with pytest.raises(ConfigurationError) as caught:
            await bridge.send_canvas(chain(b.add.s(1, 2), b.mul.s(3).set(**options)))
        assert str(caught.value) == message
        with pytest.raises(ConfigurationError) as caught:  # a later step than the second
            await bridge.send_canvas(chain(b.add.s(1, 2), b.mul.s(3), b.add.s(4).set(**options)))
        assert str(caught.value) == message
    assert transport.messages == []


# -- Nothing lost: task ids that collide -------------------------------------------------


@pytest.mark.parametrize(
    "workflow",
    [
        pytest.param(
            lambda: group(
                b.add.signature((1, 2), task_id="dup"), b.add.signature((3, 4), task_id="dup")
            ),
            id="group",
        ),
        pytest.param(
            lambda: chain(
                b.add.signature((1, 2), task_id="dup"), b.mul.signature((3,), task_id="dup")
            ),
            id="chain",
        ),
    ],
)
async def test_a_workflow_whose_steps_share_a_task_id_is_refused(workflow: Any) -> None:
    """Two steps with one id share one result record: one result is lost (and the group
    handle returns the survivor twice). Refuse before anything is sent."""
    transport = MemoryTransport(execute=False)
    async with Bridge(publisher=transport, results=transport) as bridge:
        with pytest.raises(CallError) as caught:
            await bridge.send_canvas(workflow())
    assert str(caught.value) == (
        "task id 'dup' is given to more than one step of the workflow; each step needs its "
        "own (their results would share one record)"
    )
    assert transport.messages == []


async def test_a_stub_with_a_fixed_task_id_does_not_lose_the_first_result() -> None:
    """with_options(task_id=...) returns a reusable stub: every delegate() through it
    reuses the id and the second result overwrites the first."""
    with pytest.raises(CallError) as caught:
        b.add.with_options(task_id=f"sticky-{uuid.uuid4()}")  # type: ignore[arg-type]
    assert str(caught.value) == (
        "task 'canvas.add': task_id is given per call (apply_async, signature, "
        "delegate(send_options=...)), not to with_options(), whose stub sends every call "
        "with it"
    )
    stub = b.add.with_options(priority=1)
    transport = MemoryTransport(execute=False)
    async with Bridge(publisher=transport, results=transport) as bridge:
        first = await stub.via(bridge).delegate(1, 2)
        second = await stub.via(bridge).delegate(30, 40)
        fixed = await bridge.delegate("canvas.add", 5, 6, send_options={"task_id": "per-call"})
    assert first.id != second.id, "two sends, one task id: one result will be lost"
    assert fixed.id == "per-call"


# -- A process that implements contracts cannot send a canvas ------------------------------


async def test_send_canvas_works_in_a_process_that_also_implements_contracts() -> None:
    """A service that implements one contract and delegates others (or a unit test with
    MemoryTransport, which needs @stub.implement): implement() registers a *shared*
    Celery task, so the bridge's CanvasApp gets it too, Celery's Task.apply_async adds
    routing options (exchange, routing_key, delivery_mode, shadow...) and send_canvas
    refuses every workflow with "unsupported option(s)"."""

    @remote_task(name=f"rt.impl.{uuid.uuid4().hex[:6]}", queue="rt-impl")
    def local(x: int, y: int) -> int: ...

    app = Celery("rt-impl", set_as_current=False)
    try:

        @local.implement(app)
        def run(x: int, y: int) -> int:
            return x + y

        transport = MemoryTransport(execute=False)
        async with Bridge(publisher=transport, results=transport) as bridge:
            await bridge.send_canvas(chain(local.s(1, 2), b.mul.s(3)))
        assert [m.task_name for m in transport.messages] == [local.wire_name]
    finally:
        app.close()


async def test_the_memory_test_double_runs_a_chain_as_a_worker_would() -> None:
    """MemoryTransport is the documented test double "with the same interface as the
    real path": with execute=True it runs the first step and drops the embedded chain,
    so the handle on the last step never resolves."""
    registry.implementations[b.add.wire_name] = lambda x, y: x + y
    registry.implementations[b.mul.wire_name] = lambda x, y: x * y
    transport = MemoryTransport()
    async with Bridge(publisher=transport, results=transport) as bridge:
        handle = await bridge.send_canvas(chain(b.add.s(1, 2), b.mul.s(10)))
        assert await handle.result(timeout=2) == 30


# -- Typing ----------------------------------------------------------------------------------


def test_get_with_propagate_false_is_not_typed_as_the_contracts_value(tmp_path: Path) -> None:
    """ContractResult.get(propagate=False) returns a RemoteTaskError for a failed task,
    but is typed as R: `x: int = r.get(propagate=False)` type-checks and holds an
    exception. An overload on Literal[False] should make it `R | RemoteTaskError`."""
    snippet = tmp_path / "snippet.py"
    snippet.write_text(
        textwrap.dedent(
            """
            from tests.workers import canvas_bindings as b
            r = b.add.delay(1, 2)
            reveal_type(r.get(propagate=False))
            """
        )
    )
    run = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", str(snippet)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    revealed = [line for line in run.stdout.splitlines() if "Revealed type" in line]
    assert revealed, run.stdout + run.stderr
    assert "RemoteTaskError" in revealed[0], revealed[0]


# -- ContractResult.get() against hostile records in the result backend ----------------------


@pytest.fixture
def redis_results() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(RESULT_BACKEND)
    yield client
    client.close()


@pytest.fixture
def sync_settings() -> None:
    celerybridge.configure(
        BridgeSettings(broker_url="redis://127.0.0.1:6379/2", result_backend=RESULT_BACKEND)
    )


def _contract_result(task_id: str) -> ContractResult[int]:
    from celerybridge._default import sync_publisher

    publisher = sync_publisher()
    return ContractResult(task_id, b.add, backend=publisher.data_backend(), app=publisher.app)


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=12,
)
_metas = st.one_of(
    _json_values,
    st.fixed_dictionaries(
        {"status": st.sampled_from(["SUCCESS", "FAILURE", "REVOKED"])},
        optional={
            "result": _json_values
            | st.fixed_dictionaries(
                {},
                optional={
                    "exc_type": st.sampled_from(["SystemExit", "KeyboardInterrupt", "Boom"])
                    | _json_values,
                    "exc_module": st.sampled_from(
                        ["builtins", "os", "tests.workers.canvas_bindings"]
                    )
                    | _json_values,
                    "exc_message": _json_values,
                },
            ),
            "traceback": _json_values,
            "children": _json_values,
        },
    ),
)


@pytest.mark.integration
@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(meta=_metas)
def test_contract_result_get_survives_any_stored_record(
    meta: Any, redis_results: redis.Redis, sync_settings: None
) -> None:
    """Whatever JSON the backend holds, get() returns a value of the contract's type or
    raises one of ours, and a RemoteTaskError's fields have their declared types."""
    task_id = f"rt-meta-{uuid.uuid4()}"
    key = f"celery-task-meta-{task_id}"
    redis_results.set(key, json.dumps(meta), ex=60)
    created = b.Boom.created
    try:
        value = _contract_result(task_id).get(timeout=0.05, interval=0.01)
    except RemoteTaskError as exc:
        assert isinstance(exc.remote_type, str)  # noqa: PT017
        assert exc.remote_traceback is None or isinstance(exc.remote_traceback, str)  # noqa: PT017
        assert exc.remote_module is None or isinstance(exc.remote_module, str)  # noqa: PT017
    except CeleryBridgeError:
        pass
    else:
        assert type(value) is int
    finally:
        redis_results.delete(key)
    assert b.Boom.created == created


@pytest.mark.integration
@pytest.mark.parametrize(
    "raw",
    [b"\xff\xfe not json", b"[1, 2, 3]", b'"PENDING"', b"null"],
    ids=["garbage", "json-list", "json-string", "json-null"],
)
def test_contract_result_get_on_a_corrupt_record_raises_ours(
    raw: bytes, redis_results: redis.Redis, sync_settings: None
) -> None:
    task_id = f"rt-raw-{uuid.uuid4()}"
    key = f"celery-task-meta-{task_id}"
    redis_results.set(key, raw, ex=60)
    try:
        with pytest.raises(CeleryBridgeError) as caught:
            _contract_result(task_id).get(timeout=0.05, interval=0.01)
    finally:
        redis_results.delete(key)
    kind = {b"[1, 2, 3]": "an array", b'"PENDING"': "a string", b"null": "null"}.get(raw)
    if kind is not None:
        assert type(caught.value) is ResultBackendError
        assert str(caught.value) == (
            f"the result backend holds a record for task {task_id} that is not a JSON "
            f"object but {kind}: not a task's result"
        )


@pytest.fixture(autouse=True)
def _no_leftover_implementations() -> Iterator[None]:
    before = dict(registry.implementations)
    yield
    registry.implementations.clear()
    registry.implementations.update(before)


@pytest.mark.integration
def test_a_forged_failure_record_gives_a_remote_task_error_with_declared_types(
    redis_results: redis.Redis, sync_settings: None
) -> None:
    """A forged FAILURE naming an importable class is read as data (good), but its
    traceback and module are passed on unchecked: remote_traceback is declared
    ``str | None`` and arrives as a dict."""
    task_id = f"rt-forged-{uuid.uuid4()}"
    key = f"celery-task-meta-{task_id}"
    meta = {
        "status": "FAILURE",
        "result": {"exc_type": "SystemExit", "exc_module": ["builtins"], "exc_message": ["x"]},
        "traceback": {"not": "a string"},
    }
    redis_results.set(key, json.dumps(meta), ex=60)
    try:
        with pytest.raises(RemoteTaskError) as caught:
            _contract_result(task_id).get(timeout=1, interval=0.01)
    finally:
        redis_results.delete(key)
    assert caught.value.remote_type == "SystemExit"
    assert caught.value.remote_module is None or isinstance(caught.value.remote_module, str)
    assert caught.value.remote_traceback is None or isinstance(caught.value.remote_traceback, str)


class _FailsSecond(MemoryTransport):
    async def publish(self, message: Any) -> None:
        if len(self.messages) == 1:
            raise DelegationError("the broker went away")
        await super().publish(message)


async def test_a_group_half_sent_says_how_many_went_out() -> None:
    """Suspicion: send_canvas half-sent on a mid-group failure. What was sent stays sent;
    the error says how many."""
    transport = _FailsSecond(execute=False)
    async with Bridge(publisher=transport, results=transport) as bridge:
        with pytest.raises(DelegationError) as caught:
            await bridge.send_canvas(group(b.add.s(1, 2), b.add.s(3, 4), b.add.s(5, 6)))
    assert str(caught.value) == (
        "task 'canvas.add' of the workflow (1 of its 3 messages were sent before it): "
        "the broker went away"
    )
    assert len(transport.messages) == 1


def test_an_expiry_under_a_millisecond_is_refused_like_a_past_one() -> None:
    """Suspicion: expires=1e-9 was accepted (a TTL of 0) while a past datetime was not."""
    with pytest.raises(ConfigurationError) as caught:
        b.add.with_options(expires=1e-9)
    assert str(caught.value) == (
        "expires must be at least 1 ms (RabbitMQ counts a TTL in whole milliseconds), got 1e-09"
    )
    b.add.with_options(expires=0.001)


# -- Nesting the worker refuses is refused before it is sent -----------------------------


@remote_task(name="attack.deep", queue="cb-attack-deep")
def deep(value: Any, other: Any = None) -> Any: ...


def _lists(levels: int) -> list[Any]:
    """``levels`` lists, each inside the one before."""
    value: list[Any] = []
    for _ in range(levels - 1):
        value = [value]
    return value


_TOO_DEEP = (
    "task 'attack.deep' cannot be sent: its message body would nest deeper than 32 levels, "
    "which the worker refuses (arguments, and the workflow steps and callbacks the message "
    "carries, nest in it)"
)


def test_the_deepest_argument_the_caller_accepts_is_one_the_worker_accepts() -> None:
    """The caller accepted 64 levels and the worker's intake 32: a 40-deep argument was
    sent, then dead-lettered. One limit now, counted the same way on both sides."""
    from celerybridge._worker.intake import shape

    wire = task_message(deep.message(deep.bind((_lists(30),), {})), Origin())
    document, refusal = shape.parse_body(wire.body, 1 << 20)
    assert refusal is None
    assert shape.body_refusal(document) is None
    with pytest.raises(celerybridge.ArgumentError) as caught:
        deep.bind((_lists(31),), {})
    assert str(caught.value) == (
        "task 'attack.deep' v1, parameter 'value': nesting deeper than 30 levels"
    )


async def test_a_chain_step_nested_past_the_workers_limit_is_refused() -> None:
    """A later step of a chain sits five levels down in the first message's body
    (body, embed, chain, step, args): 28 levels of argument there were sent and
    dead-lettered. The encoded body is checked before anything is published."""
    transport = MemoryTransport(execute=False)
    async with Bridge(publisher=transport, results=transport) as bridge:
        with pytest.raises(CallError) as caught:
            await bridge.send_canvas(chain(deep.si(1), deep.si(_lists(28))))
        assert str(caught.value) == _TOO_DEEP
        with pytest.raises(CallError) as caught:  # a link callback, on a single call
            await deep.with_options(link=deep.si(_lists(28))).via(bridge).delegate(1)
        assert str(caught.value) == _TOO_DEEP
        assert transport.messages == []
        await bridge.send_canvas(chain(deep.si(1), deep.si(_lists(27))))  # 32: accepted
        assert len(transport.messages) == 1


def test_the_fast_path_checks_the_body_it_encodes() -> None:
    """``task_message`` (the native publishers) refuses a body the worker would refuse,
    whatever built the message."""
    from celerybridge._transports.base import OutgoingMessage

    step = {"task": "attack.deep", "args": [_lists(28)], "kwargs": {}, "options": {}}
    message = OutgoingMessage("id-1", "attack.deep", "q", (1,), {}, {"chain": [step]})
    with pytest.raises(CallError) as caught:
        task_message(message, Origin())
    assert str(caught.value) == _TOO_DEEP
