"""Property tests of argument validation (hypothesis): our error or a faithful message."""

from __future__ import annotations

import copy
import json
import math
from typing import Any

import anyio
from hypothesis import example, given, settings
from hypothesis import strategies as st

from celerybridge import Bridge, CallError, MemoryTransport, remote_task

from ._strategies import ANYTHING

INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
# What JSON carries faithfully: the values an unannotated parameter must accept as they are.
JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | INT64
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


@remote_task(name="prop.typed")
def typed(key: str, count: int, tags: list[str], meta: dict[str, str]) -> None: ...


@remote_task(name="prop.free")
def free(value, *, other=None) -> None: ...  # type: ignore[no-untyped-def]


def send(stub: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, MemoryTransport]:
    """Send through a fresh MemoryTransport: (the error or None, the transport)."""
    transport = MemoryTransport(execute=False)

    async def main() -> BaseException | None:
        async with Bridge(publisher=transport, results=transport) as bridge:
            try:
                await bridge.send(stub, args, kwargs)
            except CallError as exc:
                return exc
        return None

    return anyio.run(main), transport


def same_json(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    return bool(json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True))


@settings(max_examples=150, deadline=None)
@given(args=st.lists(ANYTHING, max_size=5), kwargs=st.dictionaries(st.text(max_size=6), ANYTHING))
def test_any_call_is_sent_as_json_or_refused_with_our_error(
    args: list[Any], kwargs: dict[str, Any]
) -> None:
    error, transport = send(typed, tuple(args), kwargs)
    if error is not None:
        assert transport.messages == []  # nothing published on refusal
        assert str(error).startswith("task 'prop.typed' v1")
        return
    [message] = transport.messages
    wire = [list(message.args), message.kwargs]
    assert json.loads(json.dumps(wire, allow_nan=False)) == wire


@settings(max_examples=150, deadline=None)
@given(value=JSON_VALUES, other=JSON_VALUES)
def test_json_values_cross_unchanged(value: Any, other: Any) -> None:
    error, transport = send(free, (value,), {"other": other})
    assert error is None
    [message] = transport.messages
    assert same_json(message.args[0], value)
    assert same_json(message.kwargs["other"], other)


@settings(max_examples=150, deadline=None)
@given(value=ANYTHING)
def test_unannotated_values_json_cannot_carry_are_refused(value: Any) -> None:
    error, transport = send(free, (value,), {})
    if error is None:
        [message] = transport.messages
        assert same_json(message.args[0], value)
    else:
        assert transport.messages == []
        assert str(error).startswith("task 'prop.free' v1, parameter 'value': ")


@settings(max_examples=100, deadline=None)
@given(
    call=st.tuples(
        st.text(), INT64, st.lists(st.text(), max_size=4), st.dictionaries(st.text(), st.text())
    )
)
def test_well_typed_calls_are_always_sent(call: tuple[Any, ...]) -> None:
    error, transport = send(typed, call, {})
    assert error is None
    [message] = transport.messages
    assert message.args == (call[0], call[1], call[2], call[3])


@remote_task(name="prop.blob")
def blob(data: bytes, sizes: list[int], labels: dict[str, str]) -> None: ...


@settings(max_examples=150, deadline=None)
@given(data=st.binary(), sizes=st.lists(INT64), labels=st.dictionaries(st.text(), st.text()))
def test_what_the_caller_sends_the_worker_receives_unchanged(
    data: bytes, sizes: list[int], labels: dict[str, str]
) -> None:
    sent = blob.binder.bind((data, sizes, labels), {})
    wire = json.loads(json.dumps([list(sent.args), sent.kwargs]))  # across the broker
    received = blob.binder.receive(wire[0], wire[1])
    assert received.values == {"data": data, "sizes": sizes, "labels": labels}


@remote_task(name="prop.scalars")
def scalars(text: str, count: int, ratio: float, flag: bool, free) -> None: ...  # type: ignore[no-untyped-def]


def _bound(binder: Any, args: tuple[Any, ...]) -> str:
    try:
        call = binder.bind(args, {})
    except CallError as exc:
        return f"{type(exc).__name__}: {exc}"
    return repr((call.values, call.args, call.kwargs, [type(v) for v in call.args]))


@given(st.tuples(ANYTHING, ANYTHING, ANYTHING, ANYTHING, ANYTHING))
@example(("s", 2**63, 1.5, True, "free"))
@example(("s", 3, float("nan"), 1, 2**64))
@example(("s", 3, 1.0, True, float("inf")))
def test_plain_parameters_bind_as_the_general_way_binds(args: tuple[Any, ...]) -> None:
    """str, int, float, bool and unannotated parameters skip the serialisers when the
    validated value is a JSON scalar as it is: the same values, or the same refusal."""
    general = copy.copy(scalars.binder)
    general._plain = frozenset()
    assert _bound(scalars.binder, args) == _bound(general, args)
