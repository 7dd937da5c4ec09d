"""Hypothesis strategies for fuzz messages to a pusher worker, and the cases they build.

A :class:`Recipe` is what hypothesis draws: a valid call of ``pusher.send_to_s3``
(v1 positional, v1 by keyword, v2 or v3, written by celerybridge's own
``task_message``) plus one or two :class:`Mutation` s, or a raw Redis entry
(:class:`Raw`), and, for a worker with a signing key, when the message is signed
(``before`` the mutations, ``after`` them as a careless key holder would, or not at all).
Everything a recipe needs is drawn from small choices (a family, a variant, a size):
the bytes themselves (several megabytes, 100,000 brackets) are built afterwards, so
draws stay cheap and reproducible.

:func:`build` turns a recipe into a :class:`Case` for one run: a numbered marker
(``fz<run>n<number>``) goes into the task id, the S3 key and the content, so whatever
comes back on the dead-letter queue, and whatever lands in S3, names its case. The S3
key says what must become of the call: ``fuzz/<run>/bad/...`` must never be written,
``either/`` may run or be dead-lettered (not both, not neither), ``ok/`` must run.

What each family expects, by the intake contract (``celerybridge/_worker/intake/shape.py``: it
runs only well-formed Celery protocol 2 JSON task messages and dead-letters the rest):

- ``refuse``: every malformed message (body shape and types, embeds that are not null or
  well-formed signatures, header types, missing ``task``/``id``, identifiers over 255
  characters, reserved header names, protocol 1, any content type but
  ``application/json``, encodings but utf-8/utf8/binary, compression, bytes that are not
  UTF-8, a BOM, bodies over CELERYBRIDGE_MAX_MESSAGE_BYTES, JSON nested over 32 levels,
  raw Redis entries), unknown tasks, calls that fail the contract, and on a keyed worker
  anything not signed with its key over exactly what arrives (a replay too).
- ``either``, the documented exceptions: optional headers left out, free-form ones
  (``argsrepr``, custom and request-field headers), odd AMQP properties, the ``binary``
  encoding, a signature naming only its task in a callback, tasks every Celery worker has
  (``celery.starmap``, ``celery.backend_cleanup``...: the gate does not restrict names),
  bodies under the size limit (a v3 call padded so is no longer base64), unsigned
  headers added after signing (``origin``, ``traceparent``), a Redis envelope with an
  extra key or another routing key. Of these, each must run or be dead-lettered.
- ``run``: valid calls, mixed in to catch a gate that refuses too much.
- ``once``: a signed message sent twice; the copy is a replay.

Calls that embedded signatures (callbacks, chains) would make write ``.../<marker>-l<i>``:
``either/`` when the worker has no key or the key holder signed the message with them,
``bad/`` when they were added to a message signed before (the signature covers the body).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import replace
from typing import Any

from hypothesis import strategies as st

from celerybridge._signing import Signer
from celerybridge._transports._protocol import Origin, task_message
from celerybridge._transports.base import OutgoingMessage
from pusher.bindings import send_to_s3, send_to_s3_v2, send_to_s3_v3

from . import _body, _headers
from ._model import AMQP as AMQP_ONLY
from ._model import (
    MAX_MESSAGE_BYTES,
    MIB,
    TASK,
    Base,
    Case,
    Ctx,
    Draft,
    Mutation,
    Recipe,
    Sign,
)
from ._raw import RAW_ENTRIES
from ._wire import BrokerName, Expect, Wire, redis_entry

_STRENGTH = {"run": 0, "once": 1, "either": 2, "refuse": 3}
_ORIGIN = Origin()


# -- building -------------------------------------------------------------------------


def _base(ctx: Ctx, base: Base, signer: Signer | None) -> Draft:
    """The valid call as celerybridge writes it (signed if ``signer``)."""
    key, content = ctx.key, ctx.content
    if base == "v3":
        stub: Any = send_to_s3_v3
        call = stub.bind((key, content.encode()), {})
        args, kwargs = call.args, dict(call.kwargs)
    elif base == "v2":
        stub = send_to_s3_v2
        args, kwargs = (key, content, {"owner": "fuzz"}), {}
    elif base == "kw":
        stub = send_to_s3
        args, kwargs = (), {"key": key, "content": content}
    else:
        stub = send_to_s3
        args, kwargs = (key, content), {}
    outgoing = OutgoingMessage(ctx.task_id, stub.wire_name, ctx.queue, tuple(args), kwargs)
    message = task_message(outgoing, _ORIGIN, signer=signer)
    return Draft(
        headers=dict(message.headers),
        document=json.loads(message.body),
        content_type=message.content_type,
        content_encoding=message.content_encoding,
        properties=dict(message.properties),
    )


def _wire(recipe: Recipe, ctx: Ctx) -> tuple[Wire, tuple[str, ...], tuple[Mutation, ...]]:
    signer = ctx.signer
    if recipe.raw is not None:
        draft = _base(ctx, recipe.base, None)
        valid = _redis_envelope(draft, ctx.queue)
        return Wire(raw=recipe.raw.make(ctx, valid)), (), ()
    draft = _base(ctx, recipe.base, signer if recipe.sign == "before" else None)
    applied = []
    for mutation in recipe.mutations:
        before = draft.saved()
        try:
            mutation.apply(draft, ctx)
            changed = not draft.same_as(before)
        except (TypeError, KeyError, IndexError, AttributeError, ValueError):
            # Nothing to change where it looks (a body already bytes, headers not a
            # dict...): the mutation is left out, and what it did so far undone.
            draft, changed = before, False
        if changed:
            applied.append(mutation)
    body = draft.encoded()
    headers = draft.headers
    if recipe.sign == "after" and signer is not None and isinstance(headers, dict):
        content: Any = {
            "content_type": draft.content_type,
            "content_encoding": draft.content_encoding,
        }
        headers = signer.resigned(headers, body, **content) or headers
    wire = Wire(
        body=body,
        headers=headers,
        content_type=draft.content_type,
        content_encoding=draft.content_encoding,
        properties=draft.properties,
        envelope=draft.envelope,
    )
    return wire, tuple(draft.links), tuple(applied)


def _redis_envelope(draft: Draft, queue: str) -> bytes:

    wire = Wire(
        body=draft.encoded(),
        headers=draft.headers,
        content_type=draft.content_type,
        content_encoding=draft.content_encoding,
        properties=draft.properties,
    )
    return redis_entry(wire, queue)


def signature_refusal(signer: Signer, wire: Wire, broker: BrokerName) -> str | None:
    """What the worker's signature check says of ``wire``, as it receives it: py-amqp
    hands the body over decoded when it has a content encoding that decodes it."""
    if wire.raw is not None or not isinstance(wire.headers, dict):
        return "not signable"
    body: bytes | str = wire.body
    if broker == "amqp" and wire.content_encoding:
        with contextlib.suppress(LookupError, ValueError):
            body = wire.body.decode(wire.content_encoding)
    return signer.refusal(
        wire.headers,
        body,
        content_type=wire.content_type,
        content_encoding=wire.content_encoding,
    )


def expectation(recipe: Recipe, applied: tuple[Mutation, ...], wire: Wire, ctx: Ctx) -> Expect:
    if recipe.raw is not None:  # never signed: a keyed worker refuses every one
        return "refuse" if ctx.signer is not None else recipe.raw.expect
    expect: Expect = "run"
    for mutation in applied:
        if _STRENGTH[mutation.expect] > _STRENGTH[expect]:
            expect = mutation.expect
    if ctx.signer is not None and signature_refusal(ctx.signer, wire, ctx.broker) is not None:
        return "refuse"
    if recipe.copies > 1 and expect == "run":
        return "once"
    return expect


def build(recipe: Recipe, ctx: Ctx) -> Case:
    """The case of ``recipe`` numbered ``ctx.n``: built once to learn what it expects,
    again with its key in the matching folder."""
    # A key holder who signs a message with callbacks vouches for them too.
    ctx = replace(ctx, links_signed=recipe.sign == "after")
    wire, _, applied = _wire(recipe, replace(ctx, cls="either"))
    expect = expectation(recipe, applied, wire, ctx)
    ctx = replace(ctx, cls={"refuse": "bad", "either": "either"}.get(expect, "ok"))
    wire, links, applied_again = _wire(recipe, ctx)
    assert applied_again == applied, (recipe, applied, applied_again)
    headers = wire.headers if isinstance(wire.headers, dict) else {}
    task_id = headers.get("id")
    intact = isinstance(task_id, str) and task_id == ctx.task_id
    return Case(
        ctx.n,
        ctx.marker,
        recipe,
        expect,
        wire,
        ctx.key,
        links,
        task_id if intact else None,
        applied,
    )


# -- strategies -----------------------------------------------------------------------

_HUGE_HEADERS = st.sampled_from(["task", "id", "root_id", "parent_id", "group", "argsrepr"])
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=12),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=8,
)


def _fixed(mutations: list[Mutation], broker: BrokerName) -> st.SearchStrategy[Mutation]:
    return st.sampled_from([m for m in mutations if broker in m.brokers])


def header_mutations(broker: BrokerName) -> st.SearchStrategy[Mutation]:
    """Mutations of the headers and properties alone: they compose with body mutations."""
    return st.one_of(
        _fixed(_headers.HEADER_TYPES, broker),
        st.builds(_headers.huge_header, _HUGE_HEADERS, st.integers(10_000, 300_000)),
        st.frozensets(st.sampled_from(_headers.HEADER_NAMES), min_size=1, max_size=4).map(
            _headers.drop_headers
        ),
        _fixed(_headers.TYPED_HEADERS, broker),
        _fixed(_headers.REQUEST_FIELDS, broker),
        _fixed(_headers.PROPERTIES, broker),
        st.builds(
            _headers.custom_header, st.text("abcdefgh-", min_size=1, max_size=12), JSON_VALUES
        ),
        st.integers(20, 400).map(lambda depth: _body.deep("in a header", depth)),
        st.just(_headers.SURROGATE_TASK),
    )


def body_mutations(broker: BrokerName) -> st.SearchStrategy[Mutation]:
    """Mutations of the body, its content type and encoding alone."""
    return st.one_of(
        _fixed(_body.BODY_SHAPES, broker),
        _fixed(_body.BODY_TYPES, broker),
        _body.EMBED_UNKNOWN.map(_body.embed_unknown_key),
        _fixed(_body.EMBED_GARBAGE, broker),
        _fixed([*_body.EMBED_SIGNATURES, _body.errback_on_failure()], broker),
        _fixed(_body.CONTENT_TYPES, broker),
        _fixed(_body.CONTENT_ENCODINGS, broker),
        _fixed(_body.NON_UTF8, broker),
        st.integers(MAX_MESSAGE_BYTES + 64 * 1024, 4 * MIB).map(_body.oversized),
        st.integers(64 * 1024, 700 * 1024).map(_body.oversized),
        st.builds(
            _body.deep,
            st.sampled_from(["open brackets", "balanced brackets", "in args", "in kwargs"]),
            st.sampled_from([1_100, 5_000, 100_000]),
        ),
    )


def solo_mutations(broker: BrokerName) -> st.SearchStrategy[Mutation]:
    """Mutations that rewrite several parts at once (the task and its body, all the
    headers, the compressed body): sent alone, so nothing undoes them."""
    odd: tuple[Any, ...] = ({}, None, "task", [TASK])
    no_headers = [_headers.no_headers(v) for v in odd]
    return st.one_of(
        _fixed(no_headers, broker),
        st.booleans().map(_headers.protocol_v1),
        _fixed(_body.COMPRESSION, broker),
        st.integers(8, 32).map(lambda mb: _body.compression("application/x-gzip", "bomb", mb)),
        _fixed(_headers.UNKNOWN_TASKS, broker),
        _fixed(_headers.BUILTIN_TASKS, broker),
        _fixed(_headers.CONTRACT, broker),
        # Headers py-amqp cannot read at all are dead-lettered without them: only the
        # body names the case then, so no body mutation may go with these.
        st.sampled_from([3_000, 15_000]).map(
            lambda depth: _body.deep("in a header", depth, AMQP_ONLY)
        ),
    )


def recipes(broker: BrokerName, signed: bool) -> st.SearchStrategy[Recipe]:
    """Fuzz recipes for a worker on ``broker``, with a signing key if ``signed``."""
    bases: st.SearchStrategy[Base] = st.sampled_from(["v1", "v1", "v1", "kw", "v2", "v3"])
    signs: st.SearchStrategy[Sign] = (
        st.sampled_from(["before", "after", "after", "none"]) if signed else st.just("none")
    )
    headers, body = header_mutations(broker), body_mutations(broker)
    alone = st.one_of(headers, body, body, solo_mutations(broker)).map(lambda m: (m,))
    # Headers first: no body mutation touches a header, so neither can repair the other.
    pair = st.tuples(headers, body)
    mutated = st.builds(
        Recipe, mutations=st.one_of(alone, alone, alone, pair), sign=signs, base=bases
    )
    valid = st.builds(Recipe, sign=st.just("before") if signed else st.just("none"), base=bases)
    branches = [mutated] * 6 + [valid]
    if broker == "redis":
        branches += [st.builds(Recipe, raw=st.sampled_from(RAW_ENTRIES))] * 2
    if signed:
        signature = st.sampled_from(_headers.SIGNATURES).map(lambda m: Recipe((m,), sign="before"))
        carried = st.sampled_from(_body.EMBED_SIGNATURES[:3]).map(
            lambda m: Recipe((m,), sign="before")
        )
        branches += [signature, signature, st.just(Recipe(sign="before", copies=2)), carried]
    return st.one_of(branches).filter(lambda r: broker in r.brokers)
