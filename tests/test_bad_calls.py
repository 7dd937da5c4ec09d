"""The bad-call corpus: every call is refused before send, with the exact error text.

Run against both real brokers; after each refusal the queue is checked to be empty.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

import pytest
from pydantic import BaseModel

from celerybridge import (
    ArgumentError,
    Bridge,
    CeleryBridgeError,
    UnknownTaskError,
    UnknownVersionError,
    remote_task,
)
from pusher.bindings import MAX_CONTENT_BYTES

from ._brokers import purge, queue_length

pytestmark = pytest.mark.integration
QUEUE = f"cb-corpus-{uuid.uuid4().hex[:8]}"


class Meta(BaseModel):
    owner: str
    size: int


@remote_task(name="corpus.store", queue=QUEUE)
def store(key: str, content: str, count: int = 1) -> None: ...


@remote_task(name="corpus.store", queue=QUEUE, version=2)
def store_v2(key: str, content: str, meta: dict[str, str]) -> None: ...


@remote_task(name="corpus.free", queue=QUEUE)
def free(value, *, flag: bool = False) -> None: ...  # type: ignore[no-untyped-def]


@remote_task(name="corpus.typed", queue=QUEUE)
def typed(when: datetime, ratio: float, tags: list[str], meta: Meta) -> None: ...


def _nested(depth: int) -> list[Any]:
    root: list[Any] = []
    node = root
    for _ in range(depth):
        child: list[Any] = []
        node.append(child)
        node = child
    return root


GOOD = {
    "when": "2024-01-01T00:00:00",
    "ratio": 0.5,
    "tags": ["a"],
    "meta": {"owner": "o", "size": 1},
}
S1 = "task 'corpus.store' v1"
S2 = "task 'corpus.store' v2"
FREE = "task 'corpus.free' v1, parameter 'value'"
TYPED = "task 'corpus.typed' v1, parameter"
PUSH = "task 'pusher.send_to_s3' v1"
INT64 = (
    "integer outside the signed 64-bit range (-2**63 to 2**63-1); most JSON peers cannot carry it"
)

# (name, args, kwargs, version, error type, exact message)
CORPUS: list[tuple[str, tuple[Any, ...], dict[str, Any], Any, type[CeleryBridgeError], str]] = [
    ("corpus.store", ("k",), {}, None, ArgumentError,
     f"{S1}, parameter 'content': missing a required argument: 'content'"),
    ("corpus.store", ("k", "c", 1, 2), {}, None, ArgumentError,
     f"{S1}: too many positional arguments"),
    ("corpus.store", ("k", "c"), {"colour": "red"}, None, ArgumentError,
     f"{S1}, parameter 'colour': got an unexpected keyword argument 'colour'"),
    ("corpus.store", ("k", "c"), {"key": "x"}, None, ArgumentError,
     f"{S1}, parameter 'key': multiple values for argument 'key'"),
    ("corpus.store", ("k", 123), {}, None, ArgumentError,
     f"{S1}, parameter 'content': Input should be a valid string (got 123)"),
    ("corpus.store", ("k", "c", "many"), {}, None, ArgumentError,
     f"{S1}, parameter 'count': Input should be a valid integer, unable to parse string as an "
     "integer (got 'many')"),
    ("corpus.store", ("k", "c", 1.5), {}, None, ArgumentError,
     f"{S1}, parameter 'count': Input should be a valid integer, got a number with a fractional "
     "part (got 1.5)"),
    ("corpus.store", (None, "c"), {}, None, ArgumentError,
     f"{S1}, parameter 'key': Input should be a valid string (got None)"),
    ("corpus.store", ("k", "c", "meta"), {}, 2, ArgumentError,
     f"{S2}, parameter 'meta': Input should be a valid dictionary (got 'meta')"),
    ("corpus.store", ("k", "c", {"a": 1}), {}, 2, ArgumentError,
     f"{S2}, parameter 'meta': Input should be a valid string at ['a'] (got 1)"),
    # version= selects the version; it is never taken for a task parameter.
    ("corpus.store", ("k", "c"), {}, 2, ArgumentError,
     f"{S2}, parameter 'meta': missing a required argument: 'meta'"),
    ("corpus.stor", ("k", "c"), {}, None, UnknownTaskError,
     "unknown task 'corpus.stor'; did you mean 'corpus.store'?"),
    ("zzz", (), {}, None, UnknownTaskError,
     "unknown task 'zzz'; is the bindings module that declares it imported?"),
    ("corpus.store", ("k", "c"), {}, 9, UnknownVersionError,
     "task 'corpus.store' has no version 9; known versions: 1, 2"),
    ("corpus.store", ("k", "c"), {}, "two", UnknownVersionError,
     "task 'corpus.store' has no version 'two'; known versions: 1, 2"),
    ("corpus.store", ("k", "c"), {}, True, UnknownVersionError,
     "task 'corpus.store' has no version True; known versions: 1, 2"),
    ("corpus.free", (float("nan"),), {}, None, ArgumentError,
     f"{FREE}: nan is not a finite number; JSON cannot carry it"),
    ("corpus.free", ({"a": [float("inf")]},), {}, None, ArgumentError,
     f"{FREE}: inf is not a finite number; JSON cannot carry it"),
    ("corpus.free", ({1, 2},), {}, None, ArgumentError, f"{FREE}: set is not JSON-serialisable"),
    ("corpus.free", (object(),), {}, None, ArgumentError,
     f"{FREE}: object is not JSON-serialisable"),
    ("corpus.free", ({1: "a"},), {}, None, ArgumentError, f"{FREE}: object key 1 is not a string"),
    ("corpus.free", (_nested(100),), {}, None, ArgumentError,
     f"{FREE}: nesting deeper than 30 levels"),
    # 31 lists: the body would nest 33 deep, and the worker's intake reads 32.
    ("corpus.free", (_nested(30),), {}, None, ArgumentError,
     f"{FREE}: nesting deeper than 30 levels"),
    ("corpus.free", (b"x",), {}, None, ArgumentError, f"{FREE}: bytes is not JSON-serialisable"),
    ("corpus.free", (1, True), {}, None, ArgumentError,
     "task 'corpus.free' v1: too many positional arguments"),
    ("corpus.free", (1,), {"flag": "maybe"}, None, ArgumentError,
     "task 'corpus.free' v1, parameter 'flag': Input should be a valid boolean, unable to "
     "interpret input (got 'maybe')"),
    ("corpus.typed", (), {**GOOD, "when": "not a date"}, None, ArgumentError,
     f"{TYPED} 'when': Input should be a valid datetime or date, invalid character in year "
     "(got 'not a date')"),
    ("corpus.typed", (), {**GOOD, "ratio": float("nan")}, None, ArgumentError,
     f"{TYPED} 'ratio': Input should be a finite number (got nan)"),
    ("corpus.typed", (), {**GOOD, "tags": "abc"}, None, ArgumentError,
     f"{TYPED} 'tags': Input should be a valid list (got 'abc')"),
    ("corpus.typed", (), {**GOOD, "meta": {"owner": "x"}}, None, ArgumentError,
     f"{TYPED} 'meta': Field required at ['size'] (got {{'owner': 'x'}})"),
    ("corpus.typed", (), {**GOOD, "meta": {"owner": "x", "size": "big"}}, None, ArgumentError,
     f"{TYPED} 'meta': Input should be a valid integer, unable to parse string as an integer "
     "at ['size'] (got 'big')"),
    # Integers beyond 64 bits, typed or not, top level or nested.
    ("corpus.store", ("k", "c", 2**63), {}, None, ArgumentError,
     f"{S1}, parameter 'count': {INT64}"),
    ("corpus.store", ("k", "c", -(2**63) - 1), {}, None, ArgumentError,
     f"{S1}, parameter 'count': {INT64}"),
    ("corpus.free", ({"ids": [1, 10**30]},), {}, None, ArgumentError, f"{FREE}: {INT64}"),
    ("corpus.free", (10**5000,), {}, None, ArgumentError, f"{FREE}: {INT64}"),
    # More shapes that JSON cannot carry faithfully.
    ("corpus.free", ((1, {2}),), {}, None, ArgumentError, f"{FREE}: set is not JSON-serialisable"),
    ("corpus.free", (-float("inf"),), {}, None, ArgumentError,
     f"{FREE}: -inf is not a finite number; JSON cannot carry it"),
    ("corpus.free", (datetime(2024, 1, 1),), {}, None, ArgumentError,
     f"{FREE}: datetime is not JSON-serialisable"),
    ("corpus.free", ({"k": 1j},), {}, None, ArgumentError,
     f"{FREE}: complex is not JSON-serialisable"),
    # The pusher's contract: keys and sizes checked before anything is sent.
    ("pusher.send_to_s3", ("", "{}"), {}, None, ArgumentError,
     f"{PUSH}, parameter 'key': Value error, an S3 key cannot be empty (got '')"),
    ("pusher.send_to_s3", ("a\nb", "{}"), {}, None, ArgumentError,
     f"{PUSH}, parameter 'key': Value error, an S3 key cannot contain control characters, "
     "found '\\n' (got 'a\\nb')"),
    ("pusher.send_to_s3", ("\u00e9" * 513, "{}"), {}, None, ArgumentError,
     f"{PUSH}, parameter 'key': Value error, an S3 key is at most 1024 bytes of UTF-8, this "
     "one is 1026 (got '" + "\u00e9" * 79 + ")"),
    ("pusher.send_to_s3", (7, "{}"), {}, None, ArgumentError,
     f"{PUSH}, parameter 'key': Input should be a valid string (got 7)"),
    ("pusher.send_to_s3", ("k", "x" * (MAX_CONTENT_BYTES + 1)), {}, None, ArgumentError,
     f"{PUSH}, parameter 'content': Value error, content is 67108865 bytes of UTF-8; the "
     "pusher takes at most 67108864 (got '" + "x" * 79 + ")"),
    ("pusher.send_to_s3", ("k", "{}"), {}, 2, ArgumentError,
     "task 'pusher.send_to_s3' v2, parameter 'meta': missing a required argument: 'meta'"),
    ("pusher.send_to_s3", ("k", "{}", {"caf\u00e9": "x"}), {}, 2, ArgumentError,
     "task 'pusher.send_to_s3' v2, parameter 'meta': Value error, metadata 'caf\u00e9' must "
     "be ASCII, its name letters, digits and '-' (got {'caf\u00e9': 'x'})"),
    ("pusher.send_to_s3", ("k", b"\x00" * (MAX_CONTENT_BYTES + 1)), {}, 3, ArgumentError,
     "task 'pusher.send_to_s3' v3, parameter 'content': Value error, content is 67108865 "
     "bytes; the pusher takes at most 67108864 (got b'" + "\\x00" * 19 + "\\x)"),
    ("pusher.send_to_s3", ("k", b"x"), {"content_type": "text/plain\r\nX-Evil: 1"}, 3,
     ArgumentError, "task 'pusher.send_to_s3' v3, parameter 'content_type': Value error, "
     "'text/plain\\r\\nX-Evil: 1' is not a media type like 'image/png' "
     "(got 'text/plain\\r\\nX-Evil: 1')"),
    ("pusher.send_to_s3", ("k", b"x"), {"content_type": 'text/plain; charset="utf-8'}, 3,
     ArgumentError, "task 'pusher.send_to_s3' v3, parameter 'content_type': Value error, "
     "'text/plain; charset=\"utf-8' is not a media type like 'image/png' "
     "(got 'text/plain; charset=\"utf-8')"),
    ("pusher.send_to_s3", ("k", "{}"), {}, 4, UnknownVersionError,
     "task 'pusher.send_to_s3' has no version 4; known versions: 1, 2, 3"),
]  # fmt: skip


async def test_corpus_is_refused_before_send(bridge: Bridge, broker_url: str) -> None:
    assert len(CORPUS) >= 40
    for name, args, kwargs, version, error, message in CORPUS:
        with pytest.raises(error) as caught:
            await bridge.delegate(name, *args, version=version, **kwargs)
        assert str(caught.value) == message
        assert queue_length(broker_url, QUEUE) == 0, f"{name}{args} reached the broker"
    # The control: a good call does reach the queue we watched.
    await bridge.delegate("corpus.store", "k", "c")
    assert queue_length(broker_url, QUEUE) == 1
    purge(broker_url, QUEUE)


def test_argument_error_names_task_version_and_parameter() -> None:
    with pytest.raises(ArgumentError) as caught:
        store.bind(("k", 5), {})
    error = caught.value
    assert (error.task, error.version, error.parameter) == ("corpus.store", 1, "content")
    assert isinstance(error, ValueError)


def test_sync_apply_async_refuses_before_send(broker_url: str) -> None:
    import celerybridge

    celerybridge.configure(broker_url=broker_url)
    with pytest.raises(ArgumentError, match="parameter 'content'"):
        store.apply_async(("k", 1), queue=QUEUE, serializer="json")
    with pytest.raises(celerybridge.ConfigurationError, match="JSON only, not 'pickle'"):
        store.apply_async(("k", "c"), queue=QUEUE, serializer="pickle")
    with pytest.raises(celerybridge.CallError, match="unsupported option"):
        store.apply_async(("k", "c"), exchange="x")
    with pytest.raises(celerybridge.ConfigurationError, match="link must be a signature"):
        store.apply_async(("k", "c"), link="x")
    assert queue_length(broker_url, QUEUE) == 0
