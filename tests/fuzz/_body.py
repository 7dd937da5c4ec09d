"""Mutations of the body: its shape and types, the embed, content type and encoding,
compression, bytes that are not UTF-8, size and depth."""

from __future__ import annotations

import base64
import json
import pickle
import zlib
from collections.abc import Callable
from typing import Any

from hypothesis import strategies as st

from ._model import (
    BOTH,
    EMBED_KEYS,
    MAX_DEPTH,
    MAX_MESSAGE_BYTES,
    MIB,
    TASK,
    Ctx,
    Draft,
    Mutation,
    args_of,
    embed_of,
    kwargs_of,
    signature,
    upload,
)
from ._wire import BrokerName, Expect


def _set_document(family: str, label: str, make: Callable[[Draft, Ctx], Any]) -> Mutation:
    def apply(draft: Draft, ctx: Ctx) -> None:
        draft.document = make(draft, ctx)

    return Mutation(family, label, "refuse", apply)


BODY_SHAPES = [
    _set_document(
        "body-shape", "a dict", lambda d, c: {"args": args_of(d), "kwargs": kwargs_of(d)}
    ),
    _set_document("body-shape", "args alone", lambda d, c: args_of(d)),
    _set_document("body-shape", "[args, kwargs]", lambda d, c: d.document[:2]),
    _set_document("body-shape", "[args]", lambda d, c: d.document[:1]),
    _set_document("body-shape", "[]", lambda d, c: []),
    _set_document("body-shape", "4 items", lambda d, c: [*d.document, None]),
    _set_document("body-shape", "5 items", lambda d, c: [*d.document, {}, {}]),
    _set_document("body-shape", "a string", lambda d, c: c.key),
    _set_document("body-shape", "a number", lambda d, c: 42),
    _set_document("body-shape", "null", lambda d, c: None),
    _set_document("body-shape", "true", lambda d, c: True),
    _set_document("body-shape", "nested once more", lambda d, c: [d.document]),
]


def _a_dict(d: Draft, c: Ctx) -> Any:
    """a dict of the args"""
    return {str(i): a for i, a in enumerate(args_of(d))}


def _the_key(d: Draft, c: Ctx) -> Any:
    """the key (a string)"""
    return c.key


def _key_list(d: Draft, c: Ctx) -> Any:
    """[key]"""
    return [c.key]


def _embed_names(d: Draft, c: Ctx) -> Any:
    """the embed's names in a list"""
    return list(EMBED_KEYS)


_JUNK = {
    "args": [_a_dict, _the_key, 5, None],
    "kwargs": [_key_list, _the_key, 5, None, True],
    "embed": [_key_list, _the_key, 5, True, _embed_names],
}


def _body_type(part: str, index: int, value: Any) -> Mutation:
    def apply(draft: Draft, ctx: Ctx) -> None:
        draft.document[index] = value(draft, ctx) if callable(value) else value

    shown = value.__doc__ if callable(value) else repr(value)
    return Mutation("body-types", f"{part} = {shown}", "refuse", apply)


BODY_TYPES = [
    _body_type(part, index, value)
    for index, part in enumerate(("args", "kwargs", "embed"))
    for value in _JUNK[part]
]


def embed_unknown_key(name: str) -> Mutation:
    def apply(draft: Draft, ctx: Ctx) -> None:
        embed_of(draft)[name] = ctx.marker

    return Mutation("embed-keys", f"embed key {name!r}", "refuse", apply)


EMBED_UNKNOWN = st.text(min_size=1, max_size=16).filter(lambda k: k not in EMBED_KEYS)


def _embed_value(slot: str, label: str, value: Any) -> Mutation:
    def apply(draft: Draft, ctx: Ctx) -> None:
        embed_of(draft)[slot] = value

    # Each slot is null or well-formed signatures (a list of them; one for the chord): a
    # signature naming only its task is not one (Celery cannot apply it without its args,
    # kwargs and options: its tracer failed, and the message ran again).
    return Mutation("embed-values", f"{slot} = {label}", "refuse", apply)


EMBED_GARBAGE = [
    _embed_value(slot, label, value)
    for slot in EMBED_KEYS
    for label, value in (
        ("5", 5),
        ("'x'", "x"),
        ("{}", {}),
        ("[1, 2]", [1, 2]),
        ("[{}]", [{}]),
        ("[{'task': 5}]", [{"task": 5}]),
        ("[{'no task': 1}]", [{"args": [1]}]),
        ("[{'task': send_to_s3}] without args", [{"task": TASK}]),
        ("[[[]]]", [[[]]]),
    )
]


def _embed_signature(slot: str, label: str, make: Callable[[Ctx, str], Any]) -> Mutation:
    """An embed entry that would make the worker call ``send_to_s3`` (or another task)."""

    def apply(draft: Draft, ctx: Ctx) -> None:
        key = ctx.link_key(len(draft.links))
        draft.links.append(key)
        embed_of(draft)[slot] = make(ctx, key)

    return Mutation("embed-signatures", f"{slot}: {label}", "either", apply)


EMBED_SIGNATURES = [
    *(
        _embed_signature(slot, "send_to_s3", lambda c, k: [upload(c, k)])
        for slot in ("callbacks", "chain")
    ),
    _embed_signature("chord", "send_to_s3", upload),
    _embed_signature(
        "chain",
        "celery.starmap of send_to_s3",
        lambda c, k: [signature("celery.starmap", [upload(c, k), [[k, c.content]]], c.queue)],
    ),
    _embed_signature(
        "callbacks",
        "celery.backend_cleanup",
        lambda c, k: [signature("celery.backend_cleanup", [], c.queue)],
    ),
    _embed_signature(
        "chain", "a task nobody has", lambda c, k: [signature("fuzz.no_such_task", [k], c.queue)]
    ),
    _embed_signature(
        "chain",
        "send_to_s3 v2",
        lambda c, k: [signature(f"{TASK}_v2", [k, c.content, {}], c.queue)],
    ),
]


def errback_on_failure() -> Mutation:
    """A call that fails the contract, with an errback that uploads: Celery runs errbacks
    when the task fails."""

    def apply(draft: Draft, ctx: Ctx) -> None:
        key = ctx.link_key(len(draft.links))
        draft.links.append(key)
        draft.document[0] = ["", ctx.content]
        embed_of(draft)["errbacks"] = [upload(ctx, key)]

    return Mutation("embed-signatures", "errback of a failing call", "refuse", apply)


def _content_type(value: str | None, expect: Expect = "refuse", body: str = "json") -> Mutation:
    def apply(draft: Draft, ctx: Ctx) -> None:
        draft.content_type = value
        if body == "pickle":
            draft.body = pickle.dumps(
                (tuple(args_of(draft)), kwargs_of(draft), embed_of(draft)), protocol=2
            )
        elif body == "3 bytes":
            draft.body = b"abc"

    suffix = "" if body == "json" else f", {body} body"
    return Mutation("content-type", f"{value!r}{suffix}", expect, apply)


CONTENT_TYPES = [
    _content_type("application/data"),
    _content_type("application/data", body="3 bytes"),
    _content_type("application/x-python-serialize", body="pickle"),
    _content_type("application/x-python-serialize"),
    _content_type("text/plain"),
    _content_type("application/x-yaml"),
    _content_type("application/x-msgpack"),
    _content_type(None),
    _content_type(""),
    _content_type("application/json; charset=utf-8"),
    _content_type("Application/JSON"),
]


def _content_encoding(
    value: str | None, codec: str = "utf-8", expect: Expect = "refuse"
) -> Mutation:
    def apply(draft: Draft, ctx: Ctx) -> None:
        draft.content_encoding = value
        draft.codec = codec
        if value == "base64":
            draft.body = base64.b64encode(draft.encoded())

    suffix = "" if codec == "utf-8" else f", body in {codec}"
    return Mutation("content-encoding", f"{value!r}{suffix}", expect, apply)


CONTENT_ENCODINGS = [
    # kombu labels bytes it was handed "binary": the gate reads those as UTF-8 too.
    _content_encoding("binary", expect="either"),
    _content_encoding("latin-1", "latin-1"),
    _content_encoding("utf-16", "utf-16"),
    _content_encoding("utf-8", "utf-16"),
    _content_encoding("x-fuzz-bogus"),
    _content_encoding("base64"),
    _content_encoding(None),
    _content_encoding("UTF-8", expect="either"),
    _content_encoding("utf8", expect="either"),
]


def compression(name: str, how: str, megabytes: int = 0) -> Mutation:
    def apply(draft: Draft, ctx: Ctx) -> None:
        draft.headers["compression"] = name
        if how == "bomb":  # a valid call whose content is megabytes of spaces
            args = args_of(draft)
            draft.document[0] = [args[0], " " * (megabytes * MIB), *args[2:]]
        if how in ("valid", "bomb"):
            draft.body = zlib.compress(draft.encoded(), 9)
        elif how == "garbage":
            draft.body = b"\x78\x9c" + ctx.marker.encode() + b"\x00\xff"

    label = {
        "none": f"{name}, body not compressed",
        "valid": f"{name}, body compressed",
        "garbage": f"{name}, body not zlib",
        "bomb": f"{name}, {megabytes} MiB once decompressed",
    }[how]
    return Mutation("compression", label, "refuse", apply)


COMPRESSION = [
    compression("application/x-gzip", "none"),
    compression("application/x-gzip", "valid"),
    compression("application/x-gzip", "garbage"),
    compression("application/x-fuzz", "valid"),
    compression("application/x-bz2", "valid"),
]


def _bytes_in_key(label: str, inserted: bytes) -> Mutation:
    def apply(draft: Draft, ctx: Ctx) -> None:
        encoded = draft.encoded()
        key = ctx.key.encode()
        draft.body = encoded.replace(key, key + inserted, 1)

    return Mutation("non-utf8", label, "refuse", apply)


def _text_in_key(label: str, appended: str) -> Mutation:
    def apply(draft: Draft, ctx: Ctx) -> None:
        args = args_of(draft)
        if isinstance(args, list) and args:
            draft.document[0] = [args[0] + appended, *args[1:]]
        else:
            kwargs_of(draft)["key"] += appended

    return Mutation("non-utf8", label, "refuse", apply)


def _bom() -> Mutation:
    def apply(draft: Draft, ctx: Ctx) -> None:
        draft.body = b"\xef\xbb\xbf" + draft.encoded()

    return Mutation("non-utf8", "UTF-8 BOM first", "refuse", apply)


NON_UTF8 = [
    _bytes_in_key("\\xff\\xfe in the key", b"\xff\xfe"),
    _bytes_in_key("overlong '/' in the key", b"\xc0\xaf"),
    _bytes_in_key("CESU surrogate in the key", b"\xed\xa0\x80"),
    _bytes_in_key("lone continuation byte in the key", b"\x80"),
    _bytes_in_key("raw control byte in a JSON string", b"\x01"),
    _text_in_key("lone surrogate escape in the key", "\udcff"),
    _text_in_key("NUL escape in the key", "\x00"),
    _bom(),
]


def oversized(size: int) -> Mutation:
    """A valid call whose content makes the body ``size`` bytes."""

    def apply(draft: Draft, ctx: Ctx) -> None:
        args = args_of(draft)
        padding = "p" * max(0, size - len(draft.encoded()))
        if isinstance(args, list) and len(args) >= 2:
            draft.document[0] = [args[0], args[1] + padding, *args[2:]]
        else:
            kwargs_of(draft)["content"] += padding

    expect: Expect = "refuse" if size > MAX_MESSAGE_BYTES else "either"
    return Mutation("oversized", f"body of {size:,} bytes", expect, apply)


def deep(shape: str, depth: int, brokers: frozenset[BrokerName] = BOTH) -> Mutation:
    def apply(draft: Draft, ctx: Ctx) -> None:
        marker = json.dumps(ctx.key).encode()
        if shape == "open brackets":
            draft.body = b"[" * depth + marker
        elif shape == "balanced brackets":
            draft.body = b"[" * depth + marker + b"]" * depth
        elif shape == "in args":
            deep = b"[" * depth + b"]" * depth
            draft.body = b"[[" + marker + b", " + deep + b'], {}, {"callbacks": null}]'
        elif shape == "in kwargs":
            deep = b'{"a": ' * depth + b"1" + b"}" * depth
            draft.body = b"[[" + marker + b'], {"x": ' + deep + b"}, {}]"
        elif shape == "in a header":
            value: Any = ctx.marker
            for _ in range(depth):
                value = [value]
            draft.headers["x-fuzz-deep"] = value

    expect: Expect = "refuse" if depth > MAX_DEPTH else "either"
    return Mutation("deep-nesting", f"{shape}, depth {depth:,}", expect, apply, brokers)
