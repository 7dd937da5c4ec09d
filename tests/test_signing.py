"""Signed messages: a worker with a key runs only what a holder of the key sent, lately.

Unit tests of ``celerybridge._signing`` first (scheme v2: the exact body bytes, the
headers that change what runs, key ids for rotation), then real ``celery worker``
processes with ``CELERYBRIDGE_SIGNING_KEY`` on Redis and RabbitMQ, called by keyed and
key-less bridges, plain Celery clients and hand-made (tampered, expired, v1) messages.
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import json
import logging
import math
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import anyio
import kombu
import pytest
import redis
from celery import Celery
from celery import _state as celery_state
from celery.signals import before_task_publish
from hypothesis import given, settings
from hypothesis import strategies as st
from kombu.messaging import Producer
from kombu.utils.json import dumps as kombu_json_dumps

import celerybridge
from celerybridge import (
    Bridge,
    BridgeSettings,
    ConfigurationError,
    DeadLetteredError,
    RemoteTaskError,
)
from celerybridge._constants import (
    KEY_ID_HEADER,
    RESULT_KEY_PREFIX,
    SERVICE_HEADER,
    SIGNATURE_HEADER,
    SIGNED_HEADERS,
    TIMESTAMP_HEADER,
)
from celerybridge._signing import (
    BAD_SIGNATURE,
    MALFORMED,
    OLD_SCHEME,
    UNREADABLE_BODY,
    UNSIGNED,
    Signer,
    SigningAMQP,
    key_id,
    signer_of,
)
from celerybridge._transports._protocol import Origin, task_message
from celerybridge._transports.base import OutgoingMessage
from celerybridge._transports.kombu import client_app

from ._brokers import BROKERS, RESULT_BACKEND, dead_letters, publish_message, queue_length
from ._strategies import ANYTHING
from ._workers import Worker
from .workers import bindings, retry_bindings

KEY = "k3y-" + "0123456789abcdef" * 3  # 52 characters
OTHER_KEY = "other-" + "fedcba9876543210" * 3
NEW_KEY = "new-" + "0a1b2c3d4e5f6789" * 3
NOW = 1_700_000_000.0
ROOT = Path(__file__).resolve().parent.parent
ORIGIN = Origin()
# A task an attacker would add to a captured message's embed: it must never run.
EVIL_ID = "evil-0000-0000-0000-000000000000"


def evil(task_id: str = EVIL_ID, queue: str = "celery") -> dict[str, Any]:
    """A Celery signature (as the embed carries one) of ``calc.add(100, 200)`` on ``queue``."""
    return {
        "task": "calc.add",
        "args": [100, 200],
        "kwargs": {},
        "options": {"task_id": task_id, "queue": queue},
        "subtask_type": None,
        "immutable": True,
    }


def celery_message(
    args: Any = (1, 2), kwargs: Any = None, **options: Any
) -> tuple[dict[str, Any], bytes]:
    """Headers and body of an unsigned call as Celery (and the native publishers) write it."""
    message = OutgoingMessage("id-1", "calc.add", "q", tuple(args), kwargs or {}, options)
    wire = task_message(message, ORIGIN)
    return wire.headers, wire.body


def signed(
    signer: Signer, args: Any = (1, 2), kwargs: Any = None, **options: Any
) -> tuple[dict[str, Any], bytes]:
    """Headers and body of a call signed at ``NOW``."""
    headers, body = celery_message(args, kwargs, **options)
    return {**headers, **signer.headers(headers, body, now=NOW)}, body


def rewritten(body: bytes, change: Callable[[list[Any]], None]) -> bytes:
    """``body`` with ``change`` applied to its decoded ``[args, kwargs, embed]``, written back
    in the same layout (kombu's JSON), so only what ``change`` did differs."""
    document = json.loads(body)
    change(document)
    return kombu_json_dumps(document).encode()


def v1_headers(
    key: str, task: str, task_id: str, args: Any, kwargs: Any, timestamp: int
) -> dict[str, Any]:
    """The signature headers a caller on scheme v1 sent (no key id, body not covered)."""
    canonical = json.dumps(
        ["celerybridge-hmac-sha256-v1", task, task_id, timestamp, None, list(args), kwargs],
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=True,
    )
    signature = hmac.new(key.encode(), canonical.encode(), hashlib.sha256).hexdigest()
    return {TIMESTAMP_HEADER: timestamp, SIGNATURE_HEADER: signature}


# Unit: what is signed, and how -----------------------------------------------------------


def test_the_signed_headers_are_these() -> None:
    # Documented in docs/security.md: changing the list is changing the scheme.
    assert SIGNED_HEADERS == (
        "lang",
        "task",
        "id",
        "shadow",
        "eta",
        "expires",
        "group",
        "group_index",
        "retries",
        "timelimit",
        "root_id",
        "parent_id",
        "ignore_result",
        "replaced_task_nesting",
        "argsrepr",
        "kwargsrepr",
        "callbacks",
        "errbacks",
        "chain",
        "chord",
        "headers",
        "stamped_headers",
        "stamps",
        "x-celerybridge-service",
    )


def test_the_signature_is_an_hmac_of_the_documented_canonical_form() -> None:
    signer = Signer(KEY, 300)
    headers, body = signed(signer, service="unused")
    assert headers[TIMESTAMP_HEADER] == int(NOW)
    assert headers[KEY_ID_HEADER] == key_id(KEY) == signer.key_id
    canonical = json.dumps(
        [
            "celerybridge-hmac-sha256-v2",
            key_id(KEY),
            int(NOW),
            {name: headers.get(name) for name in SIGNED_HEADERS},
            hashlib.sha256(body).hexdigest(),
            "application/json",
            "utf-8",
        ],
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=True,
    )
    assert headers[SIGNATURE_HEADER] == (
        hmac.new(KEY.encode(), canonical.encode(), hashlib.sha256).hexdigest()
    )
    assert signer.refusal(headers, body, now=NOW) is None


def test_a_key_id_names_the_key_without_revealing_it() -> None:
    ids = {key_id(KEY), key_id(OTHER_KEY), key_id(NEW_KEY)}
    assert len(ids) == 3
    for key in (KEY, OTHER_KEY, NEW_KEY):
        kid = key_id(key)
        assert len(kid) == 16
        assert int(kid, 16) >= 0
        assert kid == key_id(key.encode())
        assert kid not in key
        # Domain-separated: not a prefix of the key's plain hash.
        assert not hashlib.sha256(key.encode()).hexdigest().startswith(kid)


def test_a_signed_message_verifies_as_bytes_or_text() -> None:
    signer = Signer(KEY, 300)
    args = ("é🙂", datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC), uuid.UUID(int=7), Decimal("1.5"))
    kwargs = {"b": {"y": [1, None, True], "x": 2.5}, "a": "z"}
    headers, body = signed(signer, args, kwargs, countdown=5, expires=60)
    assert headers["eta"] is not None
    assert headers["expires"] is not None
    assert set(headers) - set(celery_message()[0]) == {
        TIMESTAMP_HEADER,
        KEY_ID_HEADER,
        SIGNATURE_HEADER,
    }
    assert len(headers[SIGNATURE_HEADER]) == 64  # SHA-256, hex
    assert signer.refusal(headers, body, now=NOW) is None
    assert signer.refusal(headers, body.decode(), now=NOW) is None  # a decoded body
    assert signer.refusal(headers, bytearray(body), now=NOW) is None
    assert signer.refusal(headers, memoryview(body), now=NOW) is None


def test_the_exact_body_bytes_are_signed_not_their_json_values() -> None:
    # A body written again, to the same JSON values, is not what the signer vouched for.
    signer = Signer(KEY, 300)
    headers, body = signed(signer, ("é",), {"b": 1, "a": 2})
    document = json.loads(body)
    for relaid in (
        json.dumps(document, indent=2).encode(),
        json.dumps(document, separators=(",", ":")).encode(),
        json.dumps(document, ensure_ascii=False).encode(),
        json.dumps(document).encode("utf-16"),
        body + b" ",
    ):
        assert json.loads(relaid) == document
        assert signer.refusal(headers, relaid, now=NOW) == BAD_SIGNATURE
    assert rewritten(body, lambda d: None) == body  # the helper below changes nothing else


def _altered(value: Any) -> Any:
    """Another value of the same kind (``None`` becomes a string)."""
    if value is None:
        return "added"
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, list):
        return [*value, 1]
    assert isinstance(value, dict)
    return {**value, "x": 1}


HEADERS_SENT, _ = celery_message(headers={SERVICE_HEADER: "svc-a"}, countdown=5, expires=60)


@pytest.mark.parametrize(
    "change",
    [
        *[pytest.param((name, "changed"), id=f"{name}-changed") for name in SIGNED_HEADERS],
        *[
            pytest.param((name, "removed"), id=f"{name}-removed")
            for name in SIGNED_HEADERS
            if HEADERS_SENT.get(name) is not None
        ],
        pytest.param(("retries", "float"), id="retries-as-float"),
        pytest.param(("ignore_result", "false"), id="ignore_result-null-to-false"),
        pytest.param((TIMESTAMP_HEADER, "changed"), id="timestamp"),
        pytest.param((SIGNATURE_HEADER, "zeros"), id="signature"),
    ],
)
def test_any_change_to_a_signed_header_is_a_bad_signature(change: tuple[str, str]) -> None:
    signer = Signer(KEY, 300)
    headers, body = signed(signer, headers={SERVICE_HEADER: "svc-a"}, countdown=5, expires=60)
    assert headers[SERVICE_HEADER] == "svc-a"
    assert signer.refusal(headers, body, now=NOW) is None
    name, how = change
    tampered = dict(headers)
    if how == "changed":
        tampered[name] = _altered(headers.get(name))
    elif how == "removed":
        del tampered[name]
    elif how == "float":
        tampered[name] = float(headers[name])
    elif how == "false":
        assert headers[name] is None
        tampered[name] = False
    else:
        tampered[name] = "0" * 64
    assert signer.refusal(tampered, body, now=NOW) == (
        "bad signature: the message was not signed with this worker's signing key, "
        "or was altered after signing"
    )


def test_missing_and_null_signed_headers_are_the_same() -> None:
    signer = Signer(KEY, 300)
    headers, body = signed(signer)
    nulls = [name for name in SIGNED_HEADERS if headers.get(name) is None]
    assert {"shadow", "group", "parent_id", "callbacks", "headers"} <= set(nulls)
    without = {k: v for k, v in headers.items() if k not in nulls}
    assert signer.refusal(without, body, now=NOW) is None
    with_all = {**headers, **dict.fromkeys(nulls)}
    assert signer.refusal(with_all, body, now=NOW) is None


EMBED_CHANGES: dict[str, Callable[[list[Any]], None]] = {
    "callbacks-added": lambda d: d[2].update(callbacks=[evil()]),
    "errbacks-added": lambda d: d[2].update(errbacks=[evil()]),
    "chain-added": lambda d: d[2].update(chain=[evil()]),
    "chord-added": lambda d: d[2].update(chord=evil()),
    "embed-emptied": lambda d: d[2].clear(),
    "embed-dropped": lambda d: d.pop(),
    "args": lambda d: d[0].__setitem__(1, 3),
    "kwargs": lambda d: d[1].update(z=0),
}


@pytest.mark.parametrize("change", EMBED_CHANGES)
def test_any_change_to_the_body_is_a_bad_signature(change: str) -> None:
    signer = Signer(KEY, 300)
    headers, body = signed(signer)
    assert signer.refusal(headers, rewritten(body, lambda d: None), now=NOW) is None
    assert signer.refusal(headers, rewritten(body, EMBED_CHANGES[change]), now=NOW) == (
        BAD_SIGNATURE
    )


def test_a_changed_callback_is_a_bad_signature() -> None:
    signer = Signer(KEY, 300)
    headers, plain = celery_message()
    body = rewritten(plain, lambda d: d[2].update(callbacks=[evil("mine")]))
    headers |= signer.headers(headers, body, now=NOW)
    assert signer.refusal(headers, body, now=NOW) is None
    other = rewritten(body, lambda d: d[2]["callbacks"][0].update(task="calc.add_v2"))
    assert signer.refusal(headers, other, now=NOW) == BAD_SIGNATURE


def test_the_content_type_and_encoding_are_signed() -> None:
    signer = Signer(KEY, 300)
    headers, body = signed(signer)
    assert (
        signer.refusal(
            headers, body, now=NOW, content_type="application/json", content_encoding="utf-8"
        )
        is None
    )
    assert signer.refusal(headers, body, now=NOW, content_type="application/x-yaml") == (
        BAD_SIGNATURE
    )
    assert signer.refusal(headers, body, now=NOW, content_encoding="binary") == BAD_SIGNATURE
    assert signer.refusal(headers, body, now=NOW, content_type=None) == BAD_SIGNATURE


def test_headers_outside_the_list_may_be_added_after_signing() -> None:
    signer = Signer(KEY, 300)
    headers, body = signed(signer)
    instrumented = {
        **headers,
        "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "sentry-trace": "771a43a4192642f0b136d5159a501700-771a43a4192642f0",
        "baggage": "sentry-environment=production",
        "origin": "gen1@elsewhere",
        "x-celerybridge-dead-reason": "anything",
    }
    assert signer.refusal(instrumented, body, now=NOW) is None


def test_another_key_is_refused_by_its_key_id_and_a_forged_key_id_is_a_bad_signature() -> None:
    headers, body = signed(Signer(OTHER_KEY, 300))
    assert Signer(KEY, 300).refusal(headers, body, now=NOW) == (
        f"signed with a key this worker does not know (key id {key_id(OTHER_KEY)})"
    )
    # Claiming the worker's key id does not make another key's signature good.
    forged = {**headers, KEY_ID_HEADER: key_id(KEY)}
    assert Signer(KEY, 300).refusal(forged, body, now=NOW) == BAD_SIGNATURE


def test_verify_keys_accept_the_old_key_while_the_new_one_signs() -> None:
    old, new = Signer(KEY, 300), Signer(NEW_KEY, 300, verify_keys=[KEY])
    from_old, old_body = signed(old)
    from_new, new_body = signed(new)
    assert from_new[KEY_ID_HEADER] == key_id(NEW_KEY)  # the new key signs
    assert new.refusal(from_old, old_body, now=NOW) is None
    assert new.refusal(from_new, new_body, now=NOW) is None
    # A worker still on the old key alone does not know the new one.
    assert old.refusal(from_new, new_body, now=NOW) == (
        f"signed with a key this worker does not know (key id {key_id(NEW_KEY)})"
    )
    # Both ways during the rollout: the old key signs, the new one is accepted.
    both = Signer(KEY, 300, verify_keys=[NEW_KEY, KEY])
    assert both.refusal(from_new, new_body, now=NOW) is None
    assert both.verify_key_ids == (key_id(KEY), key_id(NEW_KEY))


def test_a_v1_signature_is_refused_as_outdated() -> None:
    headers, body = celery_message()
    headers |= v1_headers(KEY, "calc.add", "id-1", (1, 2), {}, int(NOW))
    assert Signer(KEY, 300).refusal(headers, body, now=NOW) == OLD_SCHEME
    assert OLD_SCHEME == (
        "outdated signature (celerybridge-hmac-sha256-v1): it does not cover callbacks, "
        "chains or most headers, and this worker accepts only celerybridge-hmac-sha256-v2; "
        "upgrade the sender"
    )


_GOOD_HEX = "ab" * 32
_ABSENT = object()


def sig(signature: Any = _GOOD_HEX, timestamp: Any = int(NOW), kid: Any = "a" * 16) -> Any:
    """Signature headers of the given shape (``_ABSENT``: left out); no valid signature."""
    parts = {SIGNATURE_HEADER: signature, TIMESTAMP_HEADER: timestamp, KEY_ID_HEADER: kid}
    return {name: value for name, value in parts.items() if value is not _ABSENT}


@pytest.mark.parametrize(
    ("headers", "body", "reason"),
    [
        ({"task": "calc.add", "id": "1"}, b"[]", UNSIGNED),
        (None, b"[]", UNSIGNED),
        ([("task", "calc.add")], b"[]", UNSIGNED),
        (sig(_ABSENT, int(NOW), _ABSENT), b"[]", MALFORMED),
        (sig(_GOOD_HEX, _ABSENT, _ABSENT), b"[]", MALFORMED),
        (sig(_ABSENT, _ABSENT, key_id(KEY)), b"[]", MALFORMED),
        (sig(signature="ab"), b"", MALFORMED),
        (sig(signature="AB" * 32), b"", MALFORMED),
        (sig(signature="é" * 64), b"", MALFORMED),
        (sig(signature="\ud800" * 64), b"", MALFORMED),
        (sig(timestamp="1700000000"), b"", MALFORMED),
        (sig(timestamp=True), b"", MALFORMED),
        (sig(timestamp=NOW), b"", MALFORMED),
        (sig(kid="a" * 15), b"", MALFORMED),
        (sig(kid=7), b"", MALFORMED),
        (sig(kid=_ABSENT), b"", OLD_SCHEME),
        (sig(kid=key_id(KEY)), None, UNREADABLE_BODY),
        (sig(kid=key_id(KEY)), "\ud800", UNREADABLE_BODY),
        (sig(kid=key_id(KEY)), [1, 2], UNREADABLE_BODY),
        (sig(kid=key_id(KEY)), b"\x80\x04K\x01.", BAD_SIGNATURE),
    ],
)
def test_unsigned_and_malformed_messages_are_refused(headers: Any, body: Any, reason: str) -> None:
    assert Signer(KEY, 300).refusal(headers, body, now=NOW) == reason
    assert UNSIGNED == (
        "unsigned message: this worker runs only messages signed with its signing key "
        "(CELERYBRIDGE_SIGNING_KEY)"
    )
    assert MALFORMED == (
        "malformed signature headers: x-celerybridge-timestamp must be an integer, "
        "x-celerybridge-key-id 16 and x-celerybridge-signature 64 lowercase hex digits"
    )
    assert UNREADABLE_BODY == (
        "cannot check the signature: the body is neither bytes nor UTF-8 text"
    )


def _deep(levels: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(levels):
        value = [value]
    return value


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("eta", datetime(2024, 1, 2, tzinfo=UTC)),  # an AMQP timestamp field
        ("group", b"bytes"),  # an AMQP byte array
        ("retries", Decimal("1.5")),  # an AMQP decimal
        ("timelimit", [math.nan, None]),
        ("stamps", {"a": 1, 2: "b"}),  # keys JSON cannot sort
        ("stamps", {1: {1.5, 2}}),
        ("headers", _deep(100_000)),
        ("retries", 10**5000),  # more digits than Python turns into text
    ],
    ids=["datetime", "bytes", "decimal", "nan", "mixed-keys", "set", "deep", "huge-int"],
)
def test_a_signed_header_json_cannot_carry_is_a_refusal(name: str, value: Any) -> None:
    signer = Signer(KEY, 300)
    headers, body = signed(signer)
    assert signer.refusal({**headers, name: value}, body, now=NOW) == (
        f"cannot check the signature: a signed header holds a value JSON cannot carry: {name}"
    )
    circular: list[Any] = []
    circular.append(circular)
    assert signer.refusal({**headers, "chain": circular}, body, now=NOW) == (
        "cannot check the signature: a signed header holds a value JSON cannot carry: chain"
    )
    assert signer.refusal(headers, body, now=NOW, content_type=b"application/json") == (
        "cannot check the signature: a signed header holds a value JSON cannot carry: content type"
    )
    assert signer.resigned({**headers, name: value}, body) is None


def test_the_body_is_never_parsed() -> None:
    # 100,000 levels of nesting made the v1 check raise RecursionError and crash the worker.
    signer = Signer(KEY, 300)
    headers, _ = celery_message()
    deep = b"[" * 100_000 + b"]" * 100_000
    assert signer.refusal(
        {**headers, **signer.headers(headers, b"[]", now=NOW)}, deep, now=NOW
    ) == (BAD_SIGNATURE)
    # Whether such a body may run is for the worker's intake to say, not the signature.
    good = {**headers, **signer.headers(headers, deep, now=NOW)}
    assert signer.refusal(good, deep, now=NOW) is None
    assert signer.refusal(good, b"\xff\xfe not json", now=NOW) == BAD_SIGNATURE


def test_the_window_is_max_age_into_the_past_and_the_clock_skew_into_the_future() -> None:
    signer = Signer(KEY, 300)
    headers, body = signed(signer)
    assert signer.refusal(headers, body, now=NOW + 300) is None
    assert signer.refusal(headers, body, now=NOW + 301) == (
        "expired signature: signed at 2023-11-14T22:13:20+00:00, more than 300 s before "
        "this worker's clock (CELERYBRIDGE_SIGNING_MAX_AGE)"
    )
    assert signer.refusal(headers, body, now=NOW - 30) is None
    assert signer.refusal(headers, body, now=NOW - 31) == (
        "signature from the future: signed at 2023-11-14T22:13:20+00:00, more than 30 s "
        "ahead of this worker's clock"
    )
    assert Signer(KEY, 0.5).refusal(headers, body, now=NOW + 1) == (
        "expired signature: signed at 2023-11-14T22:13:20+00:00, more than 0.5 s before "
        "this worker's clock (CELERYBRIDGE_SIGNING_MAX_AGE)"
    )
    # Timestamps no calendar holds are still a refusal, not an error.
    far, body = celery_message()
    far |= signer.headers(far, body, now=10**20)
    assert signer.refusal(far, body, now=NOW) == (
        "signature from the future: signed at 100000000000000000000 s after the epoch, "
        "more than 30 s ahead of this worker's clock"
    )
    huge = {**far, **signer.headers(far, body, now=10**400)}
    reason = signer.refusal(huge, body, now=NOW)
    assert reason is not None
    assert reason.startswith("signature from the future: signed at 1000")


def test_resigned_signs_the_headers_it_is_given_and_the_body_bytes() -> None:
    signer = Signer(KEY, 300)
    headers, body = signed(signer, headers={SERVICE_HEADER: "svc-a"})
    received = {**headers, "retries": 7, "x-celerybridge-dead-reason": "failed"}
    assert signer.refusal(received, body, now=NOW) == BAD_SIGNATURE
    before = time.time()
    fresh = signer.resigned({**received, "retries": 0}, body)
    assert fresh is not None
    assert fresh["retries"] == 0
    assert fresh[SERVICE_HEADER] == "svc-a"
    assert fresh["x-celerybridge-dead-reason"] == "failed"
    assert fresh[TIMESTAMP_HEADER] >= int(before)
    assert fresh[KEY_ID_HEADER] == key_id(KEY)
    assert fresh[SIGNATURE_HEADER] != headers[SIGNATURE_HEADER]
    assert signer.refusal(fresh, body) is None
    assert signer.refusal(fresh, body.decode()) is None
    assert signer.refusal({**fresh, "retries": 1}, body) == BAD_SIGNATURE
    # Any body: a letter whose body is not even JSON can be vouched for.
    odd = signer.resigned(
        received, b"\x80\x04K\x01.", content_type="application/x-python-serialize"
    )
    assert odd is not None
    assert (
        signer.refusal(odd, b"\x80\x04K\x01.", content_type="application/x-python-serialize")
        is None
    )
    assert signer.refusal(odd, b"\x80\x04K\x01.") == BAD_SIGNATURE
    # A v1 letter is signed afresh with v2.
    v1 = {**celery_message()[0], **v1_headers(KEY, "calc.add", "id-1", (1, 2), {}, int(NOW))}
    again = signer.resigned(v1, body)
    assert again is not None
    assert signer.refusal(again, body) is None
    assert signer.resigned(headers, None) is None  # type: ignore[arg-type]


# Signature headers that get past the first checks often, so the rest is exercised too.
SIGNATURE_PARTS = st.fixed_dictionaries(
    {
        SIGNATURE_HEADER: st.from_regex(r"\A[0-9a-f]{64}\Z") | ANYTHING,
        TIMESTAMP_HEADER: st.integers() | st.just(int(NOW)) | ANYTHING,
        KEY_ID_HEADER: st.sampled_from([key_id(KEY), key_id(OTHER_KEY)])
        | st.from_regex(r"\A[0-9a-f]{16}\Z")
        | ANYTHING,
    }
)
SIGNATURE_NAMES = [SIGNATURE_HEADER, TIMESTAMP_HEADER, KEY_ID_HEADER]
HEADERS = ANYTHING | st.builds(
    lambda more, parts: {**more, **parts},
    st.dictionaries(st.sampled_from(SIGNED_HEADERS) | st.text(max_size=10), ANYTHING, max_size=8),
    SIGNATURE_PARTS | st.dictionaries(st.sampled_from(SIGNATURE_NAMES), ANYTHING, max_size=3),
)


@settings(max_examples=500, deadline=None)
@given(headers=HEADERS, body=st.binary() | st.text() | ANYTHING, kind=ANYTHING)
def test_refusal_never_raises(headers: Any, body: Any, kind: Any) -> None:
    signer = Signer(KEY, 300, verify_keys=[OTHER_KEY])
    for reason in (
        signer.refusal(headers, body, now=NOW),
        signer.refusal(headers, body, content_type=kind, content_encoding=kind),
    ):
        assert reason is None or isinstance(reason, str)
        if reason is None:  # only a signature made with one of the keys gets through
            raise AssertionError(f"accepted {headers!r}")


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=200, deadline=None)
@given(
    values=st.dictionaries(st.sampled_from(SIGNED_HEADERS), JSON_VALUES),
    extra=st.dictionaries(
        st.text(max_size=12).filter(lambda n: n not in {*SIGNED_HEADERS, *SIGNATURE_NAMES}),
        JSON_VALUES,
    ),
    body=st.binary(),
    name=st.sampled_from(SIGNED_HEADERS),
    replacement=JSON_VALUES,
)
def test_any_json_headers_sign_and_any_change_is_refused(
    values: dict[str, Any],
    extra: dict[str, Any],
    body: bytes,
    name: str,
    replacement: Any,
) -> None:
    signer = Signer(KEY, 300)
    headers = {**values, **signer.headers(values, body, now=NOW)}
    assert signer.refusal({**headers, **extra}, body, now=NOW) is None
    # JSON on the wire (Redis) hands back what it was given.
    assert signer.refusal(json.loads(json.dumps(headers)), body, now=NOW) is None
    changed = {**headers, name: replacement}
    same = json.dumps(replacement, sort_keys=True) == json.dumps(values.get(name), sort_keys=True)
    assert (signer.refusal(changed, body, now=NOW) is None) == same


# Unit: settings --------------------------------------------------------------------------


def test_the_keys_are_in_no_repr() -> None:
    signer = Signer(KEY, 300, verify_keys=[OTHER_KEY])
    assert repr(signer) == (
        f"<Signer key_id={key_id(KEY)} verify_key_ids={key_id(OTHER_KEY)} max_age=300s>"
    )
    assert repr(Signer(KEY, 300)) == f"<Signer key_id={key_id(KEY)} max_age=300s>"
    settings = BridgeSettings(signing_key=KEY, signing_verify_keys=[OTHER_KEY])
    for shown in (repr(settings), str(settings), repr(Bridge(settings)), repr(signer)):
        assert KEY not in shown
        assert OTHER_KEY not in shown
    assert "signing_key=SecretStr('**********')" in repr(settings)
    assert "signing_verify_keys=(SecretStr('**********'),)" in repr(settings)
    assert "signing_max_age=300.0" in repr(settings)


def test_settings_read_the_keys_and_window_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert BridgeSettings().signing_key is None
    assert BridgeSettings().signing_verify_keys == ()
    monkeypatch.setenv("CELERYBRIDGE_SIGNING_KEY", KEY)
    monkeypatch.setenv("CELERYBRIDGE_SIGNING_MAX_AGE", "60")
    monkeypatch.setenv("CELERYBRIDGE_SIGNING_VERIFY_KEYS", json.dumps([OTHER_KEY, NEW_KEY]))
    settings = BridgeSettings()
    assert settings.signing_key is not None
    assert settings.signing_key.get_secret_value() == KEY
    assert [k.get_secret_value() for k in settings.signing_verify_keys] == [OTHER_KEY, NEW_KEY]
    signer = Signer.from_settings(settings)
    assert signer is not None
    assert signer.max_age == 60
    assert signer.key_id == key_id(KEY)
    assert set(signer.verify_key_ids) == {key_id(KEY), key_id(OTHER_KEY), key_id(NEW_KEY)}
    # Settings copied with overrides (load_settings) keep their keys.
    assert Signer.from_settings(celerybridge.BridgeSettings(**settings.model_dump())) is not None
    monkeypatch.setenv("CELERYBRIDGE_SIGNING_VERIFY_KEYS", "")
    assert BridgeSettings().signing_verify_keys == ()
    assert Signer.from_settings(BridgeSettings(signing_key=None)) is None


SHORT = "too-short-a-secret"
NEEDS_32 = (
    "invalid celerybridge settings: CELERYBRIDGE_SIGNING_KEY (signing_key): a signing "
    "key needs at least 32 characters; make one with: "
    'python -c "import secrets; print(secrets.token_urlsafe(32))"'
)
NOT_A_LIST = (
    "invalid celerybridge settings: CELERYBRIDGE_SIGNING_VERIFY_KEYS (signing_verify_keys): "
    """must be a JSON list of keys, e.g. '["first-key...", "second-key..."]' """
    "(the value is not shown)"
)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"signing_key": SHORT}, NEEDS_32),
        ({"signing_key": SHORT, "signing_verify_keys": [KEY]}, NEEDS_32),
        (
            {"signing_key": KEY, "signing_max_age": 0},
            "invalid celerybridge settings: CELERYBRIDGE_SIGNING_MAX_AGE (signing_max_age): "
            "Input should be greater than 0",
        ),
        (
            {"signing_key": KEY, "signing_verify_keys": [OTHER_KEY, SHORT]},
            "invalid celerybridge settings: CELERYBRIDGE_SIGNING_VERIFY_KEYS "
            "(signing_verify_keys): each key needs at least 32 characters; key number 2 of 2 "
            "has fewer",
        ),
        (
            {"signing_verify_keys": [OTHER_KEY]},
            "invalid celerybridge settings: CELERYBRIDGE_SIGNING_VERIFY_KEYS "
            "(signing_verify_keys): keys to verify with need a signing key "
            "(CELERYBRIDGE_SIGNING_KEY): a worker signs its retries, and without one it would "
            "check nothing",
        ),
        ({"signing_key": KEY, "signing_verify_keys": f"{OTHER_KEY},{SHORT}"}, NOT_A_LIST),
        ({"signing_key": KEY, "signing_verify_keys": f'["{OTHER_KEY}", "{SHORT}"'}, NOT_A_LIST),
        ({"signing_key": KEY, "signing_verify_keys": f'{{"{SHORT}": 1}}'}, NOT_A_LIST),
        ({"signing_key": KEY, "signing_verify_keys": f'["{OTHER_KEY}", 7]'}, NOT_A_LIST),
    ],
)
def test_bad_signing_settings_are_a_configuration_error(
    overrides: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigurationError) as caught:
        BridgeSettings(**overrides)
    assert str(caught.value) == message
    # Not even the chained pydantic error shows a rejected or accepted key.
    for secret in (SHORT, OTHER_KEY, KEY):
        assert secret not in str(caught.value)
        assert secret not in str(caught.value.__cause__)


def test_a_verify_key_list_from_the_environment_is_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CELERYBRIDGE_SIGNING_KEY", KEY)
    monkeypatch.setenv("CELERYBRIDGE_SIGNING_VERIFY_KEYS", f"{OTHER_KEY},{NEW_KEY}")
    with pytest.raises(ConfigurationError) as caught:
        BridgeSettings()
    assert str(caught.value) == NOT_A_LIST
    assert OTHER_KEY not in str(caught.value.__cause__)


# Unit: both publishing paths sign the final message -------------------------------------


def test_without_a_key_the_native_message_is_celerys() -> None:
    message = OutgoingMessage(
        "id-1", "calc.add", "q", (1, 2), {}, {"headers": {SERVICE_HEADER: "svc-a", "x-c": 1}}
    )
    plain = task_message(message, Origin())
    assert SIGNATURE_HEADER not in plain.headers
    assert TIMESTAMP_HEADER not in plain.headers
    assert KEY_ID_HEADER not in plain.headers
    signer = Signer(KEY, 300)
    wire = task_message(message, Origin(), signer=signer)
    # Celery's headers and the custom ones first, unchanged, then the signature's.
    assert list(wire.headers) == [*plain.headers, TIMESTAMP_HEADER, KEY_ID_HEADER, SIGNATURE_HEADER]
    assert wire.body == plain.body
    assert signer.refusal(wire.headers, wire.body) is None
    assert signer.refusal({**wire.headers, SERVICE_HEADER: "svc-b"}, wire.body) == BAD_SIGNATURE


def test_the_native_message_signs_custom_headers_that_replace_celerys() -> None:
    # send_task merges custom headers in last: the signature covers the merged value.
    custom = {"retries": 3, TIMESTAMP_HEADER: 1, SIGNATURE_HEADER: "0" * 64}
    message = OutgoingMessage("id-1", "calc.add", "q", (1, 2), {}, {"headers": custom})
    signer = Signer(KEY, 300)
    wire = task_message(message, Origin(), signer=signer)
    assert wire.headers["retries"] == 3
    assert wire.headers[SIGNATURE_HEADER] != "0" * 64
    assert signer.refusal(wire.headers, wire.body) is None
    assert signer.refusal({**wire.headers, "retries": 0}, wire.body) == BAD_SIGNATURE


class Published:
    """The body Celery built (as ``before_task_publish`` sees it), and what kombu sent."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.given: list[Any] = []
        self.sent: list[tuple[bytes, str, str, dict[str, Any]]] = []
        send = Producer._publish

        def spy_before(body: Any, **_: Any) -> None:
            self.given.append(copy.deepcopy(body))

        def spy_send(
            producer: Producer,
            body: Any,
            priority: Any,
            content_type: str,
            content_encoding: str,
            headers: dict[str, Any],
            *args: Any,
            **kwargs: Any,
        ) -> Any:
            raw = body.encode(content_encoding) if isinstance(body, str) else body
            self.sent.append((raw, content_type, content_encoding, dict(headers)))
            return send(
                producer, body, priority, content_type, content_encoding, headers, *args, **kwargs
            )

        self._before = spy_before  # the signal holds its receivers weakly
        before_task_publish.connect(spy_before)
        monkeypatch.setattr(Producer, "_publish", spy_send)

    def close(self) -> None:
        before_task_publish.disconnect(self._before)


def _received(app: Celery, queue: str) -> Any:
    with app.connection_for_write() as connection:
        return connection.default_channel.basic_get(queue, no_ack=True)


def test_the_kombu_path_signs_the_bytes_kombu_publishes(monkeypatch: pytest.MonkeyPatch) -> None:
    published = Published(monkeypatch)
    app = client_app(
        BridgeSettings(broker_url="memory://", signing_key=KEY), with_backend=False, main="t"
    )
    queue = f"cb-kombu-{uuid.uuid4().hex[:8]}"
    args = ("é🙂", datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC), Decimal("1.5"))
    try:
        app.send_task(
            "calc.add",
            args,
            {"z": {"b": 1, "a": [None, 2.5]}},
            queue=queue,
            countdown=5,
            expires=60,
            headers={SERVICE_HEADER: "svc-a", "traceparent": "t"},
            link=app.signature("calc.add", (1, 1), immutable=True),
            link_error=app.signature("calc.fail", ("no",), immutable=True),
        )
        message = _received(app, queue)
    finally:
        app.close()
        published.close()
    [given], [(sent, content_type, content_encoding, headers)] = published.given, published.sent
    # kombu's json serializer: kombu.utils.json.dumps, UTF-8.
    assert sent == kombu_json_dumps(given).encode("utf-8")
    assert (content_type, content_encoding) == ("application/json", "utf-8")
    assert message.body == sent  # what a worker gets
    assert json.loads(sent)[2]["callbacks"][0]["task"] == "calc.add"
    assert headers == message.headers
    assert headers["eta"] is not None
    assert headers[SERVICE_HEADER] == "svc-a"
    signer = Signer(KEY, 300)
    assert (
        signer.refusal(
            message.headers,
            message.body,
            content_type=message.content_type,
            content_encoding=message.content_encoding,
        )
        is None
    )
    assert signer.refusal(
        message.headers, rewritten(sent, lambda d: d[2].update(chain=[evil()]))
    ) == (BAD_SIGNATURE)


def test_celery_apps_with_a_key_sign_what_they_send() -> None:
    # The kombu path's client app, and a worker's own app (its retries).
    keyed = BridgeSettings(broker_url="memory://", signing_key=KEY)
    current = celery_state.get_current_app()
    try:
        apps = [
            client_app(keyed, with_backend=False, main="t"),
            celerybridge.celery_app("w", keyed),
        ]
    finally:
        current.set_current()  # celery_app() made its app the current one
    signer = Signer(KEY, 300)
    for app in apps:
        assert isinstance(app.amqp, SigningAMQP)
        assert repr(signer_of(app)) == f"<Signer key_id={key_id(KEY)} max_age=300s>"
        queue = f"cb-apps-{uuid.uuid4().hex[:8]}"
        app.send_task("calc.add", (1, 2), {"z": 3}, queue=queue)
        message = _received(app, queue)
        assert message.headers[KEY_ID_HEADER] == key_id(KEY)
        assert signer.refusal(message.headers, message.body) is None
        app.close()
    plain_app = client_app(BridgeSettings(broker_url="memory://"), with_backend=False, main="t")
    assert not isinstance(plain_app.amqp, SigningAMQP)
    assert signer_of(plain_app) is None
    plain_app.close()


def test_a_retry_is_signed_afresh_not_with_the_headers_it_carries_over() -> None:
    # Task.retry() passes the request's custom headers (the old signature, timestamp and
    # key id among them) as headers=..., which Celery merges in after building the message,
    # with the retry's own retries and eta.
    app = client_app(
        BridgeSettings(broker_url="memory://", signing_key=NEW_KEY), with_backend=False, main="t"
    )
    queue = f"cb-retry-{uuid.uuid4().hex[:8]}"
    stale = {
        TIMESTAMP_HEADER: 1,
        KEY_ID_HEADER: key_id(KEY),
        SIGNATURE_HEADER: "0" * 64,
        SERVICE_HEADER: "svc-a",
        "x-custom": "kept",
    }
    try:
        app.send_task("calc.add", (1, 2), queue=queue, headers=stale, retries=3, countdown=30)
        message = _received(app, queue)
    finally:
        app.close()
    assert message is not None
    assert message.headers["x-custom"] == "kept"
    assert message.headers["retries"] == 3
    assert message.headers["eta"] is not None
    assert abs(message.headers[TIMESTAMP_HEADER] - time.time()) < 5
    assert message.headers[KEY_ID_HEADER] == key_id(NEW_KEY)
    signer = Signer(NEW_KEY, 300)
    assert signer.refusal(message.headers, message.body) is None
    assert signer.refusal({**message.headers, "retries": 0}, message.body) == BAD_SIGNATURE


# Integration: real workers with the key, on Redis and on RabbitMQ ------------------------


@pytest.fixture(scope="module")
def keyed_workers() -> Iterator[dict[tuple[str, str], Worker]]:
    """Workers started by the fixtures below, by (kind, broker), stopped with the module."""
    started: dict[tuple[str, str], Worker] = {}
    yield started
    for worker in started.values():
        worker.stop()


def _keyed(
    started: dict[tuple[str, str], Worker],
    name: str,
    module: str,
    broker: str,
    env: dict[str, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Worker:
    if (name, broker) not in started:
        worker = Worker(module, BROKERS[broker], RESULT_BACKEND)
        worker.extra_env.update(env)
        started[name, broker] = worker.start(tmp_path_factory.mktemp("signing"))
    return started[name, broker]


@pytest.fixture
def keyed_worker(
    keyed_workers: dict[tuple[str, str], Worker],
    broker: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Worker:
    """A celerybridge worker (tests.workers.bridge_worker) with CELERYBRIDGE_SIGNING_KEY."""
    env = {"CELERYBRIDGE_SIGNING_KEY": KEY}
    module = "tests.workers.bridge_worker"
    return _keyed(keyed_workers, "keyed", module, broker, env, tmp_path_factory)


@pytest.fixture
def rotating_worker(
    keyed_workers: dict[tuple[str, str], Worker],
    broker: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Worker:
    """A worker in the middle of a rotation: signs with NEW_KEY, still accepts KEY."""
    env = {
        "CELERYBRIDGE_SIGNING_KEY": NEW_KEY,
        "CELERYBRIDGE_SIGNING_VERIFY_KEYS": json.dumps([KEY]),
    }
    module = "tests.workers.bridge_worker"
    return _keyed(keyed_workers, "rotating", module, broker, env, tmp_path_factory)


@pytest.fixture
def keyed_retry_worker(
    keyed_workers: dict[tuple[str, str], Worker],
    broker: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Worker:
    """tests.workers.retry_worker (tasks that fail and are retried at once) with the key."""
    env = {"CELERYBRIDGE_SIGNING_KEY": KEY}
    module = "tests.workers.retry_worker"
    return _keyed(keyed_workers, "retry", module, broker, env, tmp_path_factory)


def with_key(settings: BridgeSettings, key: str | None = KEY, **more: Any) -> BridgeSettings:
    return BridgeSettings(**{**settings.model_dump(), "signing_key": key, **more})


def has_result(task_id: str) -> bool:
    """Whether the result backend holds anything for ``task_id``."""
    with redis.Redis.from_url(RESULT_BACKEND) as client:
        return bool(client.exists(f"{RESULT_KEY_PREFIX}{task_id}"))


async def assert_refused(worker: Worker, broker_url: str, task_id: str, reason: str) -> None:
    """The message waits on ``<queue>.dead`` with why; nothing ran. Its task is not marked
    failed either: nothing shows the message came from its caller (the intake gate fails
    a task only for a message whose signature is good), so a forger cannot fail it."""
    dead = await anyio.to_thread.run_sync(dead_letters, broker_url, worker.queue)
    assert [(d["id"], d["x-celerybridge-dead-reason"]) for d in dead] == [(task_id, reason)]
    assert dead[0]["x-celerybridge-dead-from"] == worker.queue
    assert dead[0]["x-celerybridge-dead-kind"] == "signature"
    assert queue_length(broker_url, worker.queue) == 0
    assert f"Task calc.add[{task_id}] succeeded" not in worker.log()
    assert f"Task calc.add[{task_id}] received" not in worker.log()
    assert not await anyio.to_thread.run_sync(has_result, task_id)


def take_one(broker_url: str, queue: str) -> tuple[dict[str, Any], bytes]:
    """Headers and body of the message waiting on ``queue`` (consumed), as a worker gets it."""
    with kombu.Connection(broker_url) as connection:
        message = connection.default_channel.basic_get(queue, no_ack=True)
        assert message is not None
        assert (message.content_type, message.content_encoding) == ("application/json", "utf-8")
        connection.default_channel.queue_delete(queue)
        body = message.body  # py-amqp may hand a text body over decoded
        return dict(message.headers), body.encode() if isinstance(body, str) else body


@pytest.mark.integration
@pytest.mark.parametrize("path", ["native", "kombu", "sync"])
async def test_a_call_signed_with_the_key_runs(
    settings: BridgeSettings, keyed_worker: Worker, path: str
) -> None:
    keyed = with_key(settings, fast_path=path == "native")
    add = bindings.add.with_options(queue=keyed_worker.queue)
    async with Bridge(keyed) as bridge:
        if path == "sync":  # the seed's apply_async, through the default configuration
            celerybridge.configure(keyed)
            sent = await anyio.to_thread.run_sync(lambda: add.apply_async((20, 22)))
            handle = bridge.handle(add, sent.id)
        else:
            handle = await bridge.send(add, (20, 22), {})
        assert (await handle.result(timeout=20)).value == 42


@pytest.mark.integration
@pytest.mark.parametrize("fast_path", [True, False], ids=["native", "kombu"])
async def test_both_paths_sign_what_the_worker_receives(
    settings: BridgeSettings, broker_url: str, fast_path: bool
) -> None:
    # Every signed header in use: eta, expires, the service; read back as a worker reads it.
    queue = f"cb-sign-{uuid.uuid4().hex[:8]}"
    add = bindings.add.with_options(queue=queue, countdown=30, expires=600)
    keyed = with_key(settings, fast_path=fast_path, service="svc-a")
    async with Bridge(keyed) as bridge:
        await bridge.send(add, (1, 2), {})
        headers, body = await anyio.to_thread.run_sync(take_one, broker_url, queue)
    assert headers["eta"] is not None
    assert headers["expires"] is not None
    assert headers[SERVICE_HEADER] == "svc-a"
    assert headers[KEY_ID_HEADER] == key_id(KEY)
    signer = Signer(KEY, 300)
    assert signer.refusal(headers, body) is None
    assert signer.refusal({**headers, "eta": None}, body) == BAD_SIGNATURE


@pytest.mark.integration
async def test_key_less_bridges_and_plain_celery_clients_are_refused(
    bridge: Bridge, keyed_worker: Worker, broker_url: str
) -> None:
    add = bindings.add.with_options(queue=keyed_worker.queue)
    handle = await bridge.send(add, (1, 2), {})  # the fixture's bridge has no key
    await assert_refused(keyed_worker, broker_url, handle.id, UNSIGNED)

    app = Celery("plain", broker=broker_url, set_as_current=False)
    try:
        sent = app.send_task("calc.add", args=(1, 2), queue=keyed_worker.queue)
    finally:
        app.close()
    await assert_refused(keyed_worker, broker_url, sent.id, UNSIGNED)


@pytest.mark.integration
@pytest.mark.parametrize("fast_path", [True, False], ids=["native", "kombu"])
async def test_another_key_is_refused_by_its_key_id(
    settings: BridgeSettings, keyed_worker: Worker, broker_url: str, fast_path: bool
) -> None:
    add = bindings.add.with_options(queue=keyed_worker.queue)
    async with Bridge(with_key(settings, OTHER_KEY, fast_path=fast_path)) as bridge:
        handle = await bridge.send(add, (1, 2), {})
        await assert_refused(
            keyed_worker,
            broker_url,
            handle.id,
            f"signed with a key this worker does not know (key id {key_id(OTHER_KEY)})",
        )


@pytest.mark.integration
@pytest.mark.parametrize("fast_path", [True, False], ids=["native", "kombu"])
async def test_a_worker_rotating_keys_accepts_the_old_and_the_new(
    settings: BridgeSettings,
    rotating_worker: Worker,
    keyed_worker: Worker,
    broker_url: str,
    fast_path: bool,
) -> None:
    for key in (KEY, NEW_KEY):  # callers still on the old key, and those switched
        async with Bridge(with_key(settings, key, fast_path=fast_path)) as bridge:
            add = bindings.add.with_options(queue=rotating_worker.queue)
            assert (await (await bridge.send(add, (1, 1), {})).result(timeout=20)).value == 2
    # A worker not told about the new key yet refuses its callers, naming the key id.
    async with Bridge(with_key(settings, NEW_KEY, fast_path=fast_path)) as bridge:
        handle = await bridge.send(bindings.add.with_options(queue=keyed_worker.queue), (1, 2), {})
        await assert_refused(
            keyed_worker,
            broker_url,
            handle.id,
            f"signed with a key this worker does not know (key id {key_id(NEW_KEY)})",
        )


Change = Callable[[dict[str, Any], bytes, str], tuple[dict[str, Any], bytes]]
"""Headers and body of a captured message, and the worker's queue -> what is sent instead."""


def _in_body(change: Callable[[list[Any], str], None]) -> Change:
    def changed(headers: dict[str, Any], body: bytes, queue: str) -> tuple[dict[str, Any], bytes]:
        return headers, rewritten(body, lambda document: change(document, queue))

    return changed


TAMPERINGS: dict[str, Change] = {
    "args": lambda h, b, q: (h, b.replace(b"[1, 2]", b"[1, 3]")),
    "kwargs": lambda h, b, q: (h, b.replace(b"[1, 2], {}", b'[1, 2], {"z": 5}')),
    # calc.add_v2 exists on the worker and would run, were the name not signed.
    "task": lambda h, b, q: ({**h, "task": "calc.add_v2"}, b),
    "timestamp": lambda h, b, q: ({**h, TIMESTAMP_HEADER: h[TIMESTAMP_HEADER] + 1}, b),
    "retries": lambda h, b, q: ({**h, "retries": 5}, b),
    "eta": lambda h, b, q: ({**h, "eta": datetime.now(UTC).isoformat()}, b),
    "expires": lambda h, b, q: ({**h, "expires": datetime.now(UTC).isoformat()}, b),
    "timelimit": lambda h, b, q: ({**h, "timelimit": [1, 1]}, b),
    # Both would reach a retry's options, which the worker signs with its own key.
    "stamps": lambda h, b, q: (
        {**h, "stamped_headers": ["link"], "stamps": {"link": evil(queue=q)}},
        b,
    ),
    "custom-headers": lambda h, b, q: ({**h, "headers": {"task": "calc.add_v2"}}, b),
    "callbacks": _in_body(lambda d, q: d[2].update(callbacks=[evil(queue=q)])),
    "errbacks": _in_body(lambda d, q: d[2].update(errbacks=[evil(queue=q)])),
    "chain": _in_body(lambda d, q: d[2].update(chain=[evil(queue=q)])),
    "chord": _in_body(lambda d, q: d[2].update(chord=evil(queue=q))),
    "callbacks-header": lambda h, b, q: ({**h, "callbacks": [evil(queue=q)]}, b),
    # The same JSON values in other bytes: only the signer's bytes are vouched for.
    "whitespace": lambda h, b, q: (h, json.dumps(json.loads(b), indent=1).encode()),
}
HARMLESS: dict[str, Change] = {
    "none": lambda h, b, q: (h, b),
    "tracing": lambda h, b, q: (
        {**h, "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"},
        b,
    ),
    "sentry": lambda h, b, q: ({**h, "sentry-trace": "771a43a4", "baggage": "a=b"}, b),
}


@pytest.mark.integration
@pytest.mark.parametrize("change", [*HARMLESS, *TAMPERINGS])
async def test_a_tampered_copy_of_a_signed_message_is_refused(
    settings: BridgeSettings, keyed_worker: Worker, broker_url: str, change: str
) -> None:
    # A real signed message, captured on a queue no worker reads.
    captured = f"{keyed_worker.queue}-captured"
    async with Bridge(with_key(settings)) as keyed:
        handle = await keyed.send(bindings.add.with_options(queue=captured), (1, 2), {})
        headers, body = await anyio.to_thread.run_sync(take_one, broker_url, captured)
        assert body.startswith(b"[[1, 2], {}, ")
        headers, body = {**HARMLESS, **TAMPERINGS}[change](headers, body, keyed_worker.queue)
        await anyio.to_thread.run_sync(
            publish_message, broker_url, keyed_worker.queue, body, headers
        )
        if change in HARMLESS:  # the copy itself is good: a replay inside the window runs
            assert (await handle.result(timeout=20)).value == 3
        else:
            await assert_refused(keyed_worker, broker_url, handle.id, BAD_SIGNATURE)
    assert EVIL_ID not in keyed_worker.log()  # the added task never ran


@pytest.mark.integration
async def test_a_callback_signed_with_the_message_runs(
    bridge: Bridge, keyed_worker: Worker, broker_url: str
) -> None:
    # The control for the test above: the same embed, signed by a key holder, does run.
    task_id, callback_id = str(uuid.uuid4()), str(uuid.uuid4())
    headers, plain = celery_message()
    headers |= {"id": task_id, "root_id": task_id}
    body = rewritten(
        plain, lambda d: d[2].update(callbacks=[evil(callback_id, keyed_worker.queue)])
    )
    headers |= Signer(KEY, 300).headers(headers, body)
    await anyio.to_thread.run_sync(publish_message, broker_url, keyed_worker.queue, body, headers)
    assert (await bridge.handle(bindings.add, task_id).result(timeout=20)).value == 3
    assert (await bridge.handle(bindings.add, callback_id).result(timeout=20)).value == 300


@pytest.mark.integration
async def test_a_v1_signed_message_is_refused_as_outdated(
    bridge: Bridge, keyed_worker: Worker, broker_url: str
) -> None:
    task_id = str(uuid.uuid4())
    headers, body = celery_message()
    headers |= {"id": task_id, "root_id": task_id}
    headers |= v1_headers(KEY, "calc.add", task_id, (1, 2), {}, int(time.time()))
    await anyio.to_thread.run_sync(publish_message, broker_url, keyed_worker.queue, body, headers)
    await assert_refused(keyed_worker, broker_url, task_id, OLD_SCHEME)


@pytest.mark.integration
@pytest.mark.parametrize("offset", [-3600, 3600], ids=["expired", "future"])
async def test_a_signature_outside_the_window_is_refused(
    bridge: Bridge, keyed_worker: Worker, broker_url: str, offset: int
) -> None:
    task_id = str(uuid.uuid4())
    signed_at = time.time() + offset
    headers, body = celery_message()
    headers |= {"id": task_id, "root_id": task_id}
    headers |= Signer(KEY, 300).headers(headers, body, now=signed_at)
    await anyio.to_thread.run_sync(publish_message, broker_url, keyed_worker.queue, body, headers)
    stamp = datetime.fromtimestamp(int(signed_at), UTC).isoformat()
    reason = (
        f"expired signature: signed at {stamp}, more than 300 s before this worker's clock "
        "(CELERYBRIDGE_SIGNING_MAX_AGE)"
        if offset < 0
        else f"signature from the future: signed at {stamp}, more than 30 s ahead of this "
        "worker's clock"
    )
    await assert_refused(keyed_worker, broker_url, task_id, reason)


@pytest.mark.integration
async def test_automatic_retries_are_signed_afresh_by_the_worker(
    settings: BridgeSettings, keyed_retry_worker: Worker
) -> None:
    # retry.flaky fails and is retried once at once (autoretry_for): the worker publishes
    # the retry itself, with retries=1, signed with its key. Were it not signed afresh
    # the retry would be dead-lettered for its signature instead of failing as it does.
    flaky = retry_bindings.flaky.with_options(queue=keyed_retry_worker.queue)
    async with Bridge(with_key(settings)) as bridge:
        handle = await bridge.send(flaky, (7,), {})
        with pytest.raises(RemoteTaskError) as caught:
            await handle.result(timeout=30)
    assert not isinstance(caught.value, DeadLetteredError)
    assert (caught.value.remote_type, caught.value.remote_message) == ("Flaky", "call 7 failed")
    # The retry can fail (and be stored) before the first attempt logs that it retried.
    retried = f"Task retry.flaky[{handle.id}] retry"
    log = await eventually(keyed_retry_worker.log, lambda text: retried in text)
    assert log.count(f"Task retry.flaky[{handle.id}] received") == 2  # the call and its retry
    for refused in ("signature", "unsigned message", "does not know"):
        assert refused not in log


@pytest.mark.integration
async def test_the_keys_are_in_no_log_line(
    settings: BridgeSettings,
    keyed_worker: Worker,
    rotating_worker: Worker,
    broker_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    add = bindings.add.with_options(queue=keyed_worker.queue)
    for fast_path in (True, False):
        async with Bridge(with_key(settings, fast_path=fast_path)) as bridge:
            assert (await (await bridge.send(add, (1, 1), {})).result(timeout=20)).value == 2
        async with Bridge(with_key(settings, OTHER_KEY, fast_path=fast_path)) as bridge:
            refused = await bridge.send(add, (1, 1), {})
            dead = await anyio.to_thread.run_sync(dead_letters, broker_url, keyed_worker.queue)
            assert [d["id"] for d in dead] == [refused.id]
    assert caplog.records  # the caller did log (kombu, aio-pika...)
    for secret in (KEY, OTHER_KEY, NEW_KEY):
        assert secret not in caplog.text
        assert secret not in keyed_worker.log()
        assert secret not in rotating_worker.log()
    assert "moved to" in keyed_worker.log()  # the worker logged its refusals


def dlq(*args: str, key: str | None = None) -> subprocess.CompletedProcess[str]:
    """``celerybridge dlq ...``, run as an operator runs it, with or without the key."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CELERYBRIDGE_")}
    if key is not None:
        env["CELERYBRIDGE_SIGNING_KEY"] = key
    return subprocess.run(
        [sys.executable, "-m", "celerybridge", "dlq", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


async def eventually(read: Callable[[], str], done: Callable[[str], bool]) -> str:
    """What ``read`` returns (in a thread) once ``done`` accepts it, within 20 s."""
    for _ in range(100):
        value = await anyio.to_thread.run_sync(read)
        if done(value):
            return value
        await anyio.sleep(0.2)
    raise AssertionError(f"never happened; last seen: {value!r}")


@pytest.mark.integration
async def test_a_dead_letter_replayed_with_sign_runs_and_without_is_refused_again(
    bridge: Bridge, keyed_worker: Worker, broker_url: str
) -> None:
    queue, task_id = keyed_worker.queue, str(uuid.uuid4())
    headers, body = celery_message((2, 3))
    # Re-signing must cover the service name, as the worker checks it.
    headers |= {"id": task_id, "root_id": task_id, SERVICE_HEADER: "svc-a"}
    headers |= Signer(KEY, 300).headers(headers, body, now=time.time() - 3600)
    await anyio.to_thread.run_sync(publish_message, broker_url, queue, body, headers)
    listed = await eventually(
        lambda: dlq("list", queue, "--broker", broker_url).stdout, lambda out: task_id in out
    )
    expired = listed.removeprefix(f"{task_id}\tcalc.add\tsignature\t").removesuffix("\n")
    assert expired.startswith("expired signature: signed at "), listed

    # As it was: the old signature, refused again for the same reason.
    replayed = await anyio.to_thread.run_sync(dlq, "replay", queue, task_id, "--broker", broker_url)
    assert replayed.stdout == f"replayed {task_id} (calc.add) to {queue}\n", replayed.stderr
    listed = await eventually(
        lambda: dlq("list", queue, "--broker", broker_url).stdout, lambda out: task_id in out
    )
    assert listed == f"{task_id}\tcalc.add\tsignature\t{expired}\n"

    without_key = dlq("replay", queue, task_id, "--sign", "--broker", broker_url)
    assert without_key.returncode == 2
    assert "Error: --sign needs the key in CELERYBRIDGE_SIGNING_KEY" in without_key.stderr

    signed_now = await anyio.to_thread.run_sync(
        lambda: dlq("replay", queue, task_id, "--sign", "--broker", broker_url, key=KEY)
    )
    assert signed_now.stdout == f"replayed {task_id} (calc.add) to {queue}\n", signed_now.stderr
    # Refused for its signature, the task was never marked failed: its first result is this.
    assert (await bridge.handle(bindings.add, task_id).result(timeout=20)).value == 5
    assert queue_length(broker_url, f"{queue}.dead") == 0


@pytest.mark.integration
async def test_workers_without_a_key_run_signed_messages(
    settings: BridgeSettings, bridge_worker: Worker, plain_worker: Worker
) -> None:
    async with Bridge(with_key(settings)) as keyed:
        add = bindings.add.with_options(queue=bridge_worker.queue)
        assert (await (await keyed.send(add, (2, 2), {})).result(timeout=20)).value == 4
        store = bindings.store.with_options(queue=plain_worker.queue)
        stored = await (await keyed.send(store, ("k", "v"), {})).result(timeout=20)
        assert stored == {"key": "k", "content": "v", "bridge_loaded": "False"}
