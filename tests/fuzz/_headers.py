"""Mutations of the headers and properties, the task named, the arguments against the
contract, and the signature headers of a keyed worker."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from celerybridge._signing import Signer

from ._model import (
    AMQP,
    BOTH,
    EMBED_KEYS,
    MAX_MESSAGE_BYTES,
    REDIS,
    TASK,
    Apply,
    Ctx,
    Draft,
    Mutation,
    args_of,
    header,
    kwargs_of,
    upload,
)
from ._wire import DELETE, BrokerName, Expect


def _in_a_list(ctx: Ctx) -> list[str]:
    """[task id]"""
    return [ctx.task_id]


_HEADER_JUNK: dict[str, list[Any]] = {
    "task": [[TASK], 7, None, True, {"name": TASK}, ""],
    "id": [_in_a_list, 12345, None, {"id": 1}, "", False],
    "root_id": [_in_a_list, 1, {"a": 1}, True],
    "parent_id": [_in_a_list, 2, {"a": 1}],
    "group": [["g"], 3, {"g": 1}],
    "retries": ["0", "3", 1.5, -1, -(2**40), [0], {}],
    "eta": ["tomorrow", "2024-13-45T99:99:99", 1_700_000_000, [2024, 1, 1], {"iso": "x"}],
    "expires": ["never", "2024-02-30T00:00:00", 1_700_000_000, [2024], {"iso": "x"}],
    "timelimit": ["abc", [1], ["a", "b"], [1, 2, 3], {"soft": 1}, 5, [None]],
}
HEADER_TYPES = [
    header("header-types", name, value) for name, values in _HEADER_JUNK.items() for value in values
]

HEADER_NAMES = (
    "lang", "task", "id", "shadow", "eta", "expires", "group", "group_index", "retries",
    "timelimit", "root_id", "parent_id", "argsrepr", "kwargsrepr", "origin", "ignore_result",
    "replaced_task_nesting", "stamped_headers", "stamps",
)  # fmt: skip


def drop_headers(names: frozenset[str]) -> Mutation:
    def apply(draft: Draft, ctx: Ctx) -> None:
        for name in names:
            draft.headers.pop(name, None)

    expect: Expect = "refuse" if names & {"task", "id"} else "either"
    return Mutation("header-missing", f"without {', '.join(sorted(names))}", expect, apply)


def no_headers(value: Any) -> Mutation:
    def apply(draft: Draft, ctx: Ctx) -> None:
        draft.headers = value

    # AMQP headers are a table or absent: only a Redis envelope can hold anything else.
    brokers = BOTH if value is None or isinstance(value, dict) else REDIS
    return Mutation("header-missing", f"headers = {value!r}", "refuse", apply, brokers)


def huge_header(name: str, size: int) -> Mutation:
    def apply(draft: Draft, ctx: Ctx) -> None:
        draft.headers[name] = ctx.marker + "x" * size

    # Identifiers are at most MAX_NAME characters; argsrepr is free text.
    expect: Expect = "either" if name == "argsrepr" and size <= MAX_MESSAGE_BYTES else "refuse"
    return Mutation("header-huge", f"{name} of {size:,} characters", expect, apply)


def protocol_v1(with_task_header: bool) -> Mutation:
    """The protocol 1 message Celery 3 sent: everything in a dict body."""

    def apply(draft: Draft, ctx: Ctx) -> None:
        args, kwargs = args_of(draft), kwargs_of(draft)
        draft.headers = {"task": draft.headers["task"]} if with_task_header else {}
        draft.document = {
            "task": TASK if not isinstance(args, list) or len(args) != 3 else f"{TASK}_v2",
            "id": ctx.task_id,
            "args": args,
            "kwargs": kwargs,
            "retries": 0,
            "eta": None,
            "expires": None,
            "utc": True,
            "callbacks": None,
            "errbacks": None,
            "timelimit": [None, None],
            "taskset": None,
            "chord": None,
        }

    label = "dict body, task header kept" if with_task_header else "no task header, dict body"
    return Mutation("protocol-v1", label, "refuse", apply)


def _typed_header(name: str, value: Any, expect: Expect = "refuse") -> Mutation:
    return header("header-typed", name, value, expect)


# py-amqp writes bytes as a long string, which the worker reads back as text when it is
# UTF-8: only bytes that are not UTF-8 arrive as bytes on RabbitMQ (on Redis, kombu's
# JSON keeps them bytes).
TYPED_HEADERS = [
    _typed_header("task", TASK.encode() + b"\xff"),
    _typed_header("id", b"fuzz-id\xff"),
    _typed_header("id", uuid.UUID(int=1)),
    _typed_header("root_id", b"root\xff"),
    _typed_header("retries", Decimal("1")),
    _typed_header("task", datetime(2024, 1, 1, tzinfo=UTC)),
    _typed_header("eta", datetime(2024, 1, 1, tzinfo=UTC)),
    _typed_header("timelimit", [Decimal("1.5"), None]),
]


def _properties(
    label: str, values: dict[str, Any], brokers: frozenset[BrokerName], expect: Expect = "either"
) -> Mutation:
    def apply(draft: Draft, ctx: Ctx) -> None:
        draft.properties.update(values)

    return Mutation("properties", label, expect, apply, brokers)


PROPERTIES = [
    _properties("priority 255", {"priority": 255}, AMQP),
    _properties("delivery_mode 1", {"delivery_mode": 1}, AMQP),
    _properties("empty correlation_id", {"correlation_id": ""}, BOTH),
    _properties("255-character correlation_id", {"correlation_id": "c" * 255}, BOTH),
    _properties("255-character reply_to", {"reply_to": "r" * 255}, BOTH),
    _properties(
        "message_id, type, app_id, cluster_id",
        {"message_id": "m", "type": "fuzz", "app_id": "fuzz", "cluster_id": "c"},
        AMQP,
    ),
    _properties("timestamp at the epoch", {"timestamp": 86_400}, AMQP),
    _properties("correlation_id a list", {"correlation_id": [1, 2]}, REDIS, "refuse"),
    _properties("reply_to a dict", {"reply_to": {"a": 1}}, REDIS, "refuse"),
    _properties("priority a string", {"priority": "9"}, REDIS, "refuse"),
]


def custom_header(name: str, value: Any) -> Mutation:
    def apply(draft: Draft, ctx: Ctx) -> None:
        draft.headers[f"x-fuzz-{name}"] = value

    return Mutation("header-custom", f"x-fuzz-{name} = {value!r}"[:80], "either", apply)


def _task(
    name: str, label: str, expect: Expect, body: Callable[[Ctx], list[Any]] | None
) -> Mutation:
    def apply(draft: Draft, ctx: Ctx) -> None:
        draft.headers["task"] = name
        if body is not None:
            draft.document = [*body(ctx), {c: None for c in EMBED_KEYS}]

    family = "unknown-task" if expect == "refuse" else "builtin-task"
    return Mutation(family, label, expect, apply)


def _starmap(ctx: Ctx) -> list[Any]:
    return [[upload(ctx, ctx.key), [[ctx.key, ctx.content]]], {}]


UNKNOWN_TASKS = [
    _task(f"{TASK}_v9", "send_to_s3_v9", "refuse", None),
    _task(TASK.upper(), "the name in capitals", "refuse", None),
    _task(TASK + " ", "a trailing space", "refuse", None),
    _task("pusher.celery.store", "the implementation's Python name", "refuse", None),
    _task("os.system", "os.system", "refuse", None),
]
BUILTIN_TASKS = [
    _task("celery.starmap", "celery.starmap of send_to_s3", "either", _starmap),
    _task("celery.chunks", "celery.chunks of send_to_s3", "either",
          lambda c: [[upload(c, c.key), [[c.key, c.content]], 1], {}]),
    _task("celery.map", "celery.map of send_to_s3", "either",
          lambda c: [[upload(c, c.key), [[c.key, c.content]]], {}]),
    _task("celery.group", "celery.group of garbage", "either",
          lambda c: [[[5], None, c.marker], {}]),
    _task("celery.chord_unlock", "celery.chord_unlock of garbage", "either",
          lambda c: [[c.marker, {"task": 5}], {"max_retries": 0}]),
    _task("celery.chain", "celery.chain", "either", lambda c: [[c.marker], {}]),
    _task("celery.backend_cleanup", "celery.backend_cleanup", "either", lambda c: [[], {}]),
    _task("celery.accumulate", "celery.accumulate", "either", lambda c: [[c.marker, 2], {}]),
]  # fmt: skip


def _contract(
    label: str, make: Callable[[Draft, Ctx], tuple[Any, Any]], expect: Expect = "refuse"
) -> Mutation:
    def apply(draft: Draft, ctx: Ctx) -> None:
        draft.headers["task"] = TASK
        draft.document[0], draft.document[1] = make(draft, ctx)

    return Mutation("contract" if expect == "refuse" else "valid", label, expect, apply)


CONTRACT = [
    _contract("no arguments", lambda d, c: ([], {})),
    _contract("only the key", lambda d, c: ([c.key], {})),
    _contract("a third argument", lambda d, c: ([c.key, c.content, c.marker], {})),
    _contract("the key an int", lambda d, c: ([5, c.content], {})),
    _contract("the content an int", lambda d, c: ([c.key, 5], {})),
    _contract("the content null", lambda d, c: ([c.key, None], {})),
    _contract("an empty key", lambda d, c: (["", c.content], {})),
    _contract("a 1025-byte key", lambda d, c: ([c.key + "k" * 1025, c.content], {})),
    _contract("an unknown keyword", lambda d, c: ([c.key, c.content], {"bogus": c.marker})),
    _contract("the key twice", lambda d, c: ([c.key], {"key": c.key, "content": c.content})),
    _contract("version=2 as a keyword", lambda d, c: ([c.key, c.content], {"version": 2})),
    _contract("by keyword", lambda d, c: ([], {"key": c.key, "content": c.content}), "run"),
    _contract("key by position, content by keyword",
              lambda d, c: ([c.key], {"content": c.content}), "run"),
]  # fmt: skip


# -- signatures (keyed workers) -------------------------------------------------------


def _signature(label: str, apply: Apply) -> Mutation:
    return Mutation("signature", label, "refuse", apply)


def _resign(draft: Draft, ctx: Ctx, signer: Signer, now: float) -> None:
    """Sign the draft as it is now, with ``signer``, at ``now``."""
    unsigned = {k: v for k, v in draft.headers.items() if k not in SIGNATURE_HEADERS}
    content: Any = {"content_type": draft.content_type, "content_encoding": draft.content_encoding}
    draft.headers = {**unsigned, **signer.headers(unsigned, draft.encoded(), now=now, **content)}


def _content_encoding_after(value: str) -> Apply:
    """An encoding the gate reads the same way, changed after signing (it is signed)."""

    def apply(draft: Draft, ctx: Ctx) -> None:
        draft.content_encoding = value

    return apply


def _reencode(draft: Draft, ctx: Ctx) -> None:
    """The same JSON values in other bytes (indented): only the signer's bytes count."""
    draft.body = json.dumps(draft.document, indent=1).encode()


def _set_sig(name: str, value: Any) -> Apply:
    def apply(draft: Draft, ctx: Ctx) -> None:
        if value is DELETE:
            draft.headers.pop(name, None)
        else:
            draft.headers[name] = value(draft.headers.get(name)) if callable(value) else value

    return apply


SIG = "x-celerybridge-signature"
STAMP = "x-celerybridge-timestamp"
KEY_ID = "x-celerybridge-key-id"
SIGNATURE_HEADERS = frozenset({SIG, STAMP, KEY_ID})
SIGNATURES = [
    _signature("forged signature", _set_sig(SIG, "0" * 64)),
    _signature("signature in capitals", _set_sig(SIG, lambda s: str(s).upper())),
    _signature("signature an int", _set_sig(SIG, 123)),
    _signature("signature a list", _set_sig(SIG, ["x"])),
    _signature("signature not ASCII", _set_sig(SIG, "\u00e9" * 64)),
    _signature("signature null", _set_sig(SIG, None)),
    _signature("no signature, timestamp kept", _set_sig(SIG, DELETE)),
    _signature("no timestamp, signature kept", _set_sig(STAMP, DELETE)),
    _signature("timestamp a string", _set_sig(STAMP, lambda t: str(t))),
    _signature("timestamp a float", _set_sig(STAMP, lambda t: float(t or 0) + 0.5)),
    _signature("timestamp true", _set_sig(STAMP, True)),
    _signature("timestamp 2**62", _set_sig(STAMP, 2**62)),
    _signature("timestamp negative", _set_sig(STAMP, -1)),
    _signature("no key id (the v1 scheme)", _set_sig(KEY_ID, DELETE)),
    _signature("key id of no known key", _set_sig(KEY_ID, "0" * 16)),
    _signature("key id not hex", _set_sig(KEY_ID, "key-of-mallory!!")),
    _signature("key id a list", _set_sig(KEY_ID, ["x"])),
    _signature(
        "signed with another key",
        lambda d, c: _resign(d, c, c.other_signer or Signer("x" * 40, 300), _now()),
    ),
    _signature("signed an hour ago", lambda d, c: _resign(d, c, _signer(c), _now() - 3600)),
    _signature("signed an hour ahead", lambda d, c: _resign(d, c, _signer(c), _now() + 3600)),
    _signature("service added after signing", _set_sig("x-celerybridge-service", "svc-evil")),
    _signature("task renamed after signing", _set_sig("task", f"{TASK}_v2")),
    _signature("id changed after signing", _set_sig("id", lambda i: f"{i}-2")),
    _signature("eta added after signing", _set_sig("eta", "2020-01-01T00:00:00+00:00")),
    _signature("retries changed after signing", _set_sig("retries", 3)),
    _signature("stamps added after signing", _set_sig("stamps", {"a": ["b"]})),
    _signature(
        "key changed after signing",
        lambda d, c: d.document.__setitem__(0, [c.key + "-2", *args_of(d)[1:]]),
    ),
    _signature(
        "callback added after signing",
        lambda d, c: d.document[2].__setitem__("callbacks", [upload(c, c.link_key(0))]),
    ),
    _signature("content encoding binary after signing", _content_encoding_after("binary")),
    _signature("body re-encoded after signing", _reencode),
    # Headers the signature leaves out on purpose (instrumentation adds them): the
    # message still runs.
    Mutation("signature", "origin changed after signing", "either", _set_sig("origin", "x@y")),
    Mutation(
        "signature",
        "traceparent added after signing",
        "either",
        _set_sig("traceparent", "00-1-2-01"),
    ),
]


def _signer(ctx: Ctx) -> Signer:
    assert ctx.signer is not None
    return ctx.signer


def _now() -> float:
    return time.time()


SURROGATE_TASK = header("non-utf8", "task", TASK + "\udcff")

# Every header becomes an attribute of the task's request: those the worker sets from
# the body or the broker are refused (``RESERVED_HEADERS``), the others are free.
REQUEST_FIELDS = [
    *(
        header("header-request-fields", name, value)
        for name, value in (
            ("hostname", "evil@host"),
            ("is_eager", True),
            ("delivery_info", {"routing_key": "elsewhere"}),
            ("reply_to", "amq.rabbitmq.reply-to"),
            ("correlation_id", "someone-else"),
            ("called_directly", True),
            ("utc", False),
            ("args", ["x"]),
            ("kwargs", {"content": "x"}),
            ("callbacks", None),
            ("chain", []),
        )
    ),
    *(
        header("header-request-fields", name, value, "either")
        for name, value in (
            ("taskset", "group-1"),
            ("properties", {"priority": 9}),
            ("logfile", "/tmp/fuzz.log"),
            ("loglevel", 10),
            ("priority", 9),
            ("delivery_mode", 1),
            ("periodic_task_name", "fuzz"),
            ("headers", {"x-a": 1}),
            ("soft_time_limit", 0.001),
            ("time_limit", 0.001),
        )
    ),
]
