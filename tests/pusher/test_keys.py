"""The pusher's key rules: a key no server reads as another path, and prefixes that are
folders, compared segment by segment (``pusher.bindings.key_problem``,
``pusher._s3.check_key``)."""

from __future__ import annotations

import posixpath
import unicodedata
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from celery import Celery
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from celerybridge import ArgumentError, Bridge, RemoteTaskError
from celerybridge._transports.kombu import close_celery_app
from pusher._s3 import check_key
from pusher._settings import PusherSettings
from pusher.bindings import key_problem, send_to_s3
from pusher.errors import PermanentUploadError

from .._brokers import BROKERS
from .._workers import Worker

BUCKET = "backups"


def _settings(**values: Any) -> PusherSettings:
    """Settings with only ``values`` set (PUSHER_* variables around the test do not count)."""
    return PusherSettings(
        **{"bucket": BUCKET, "allowed_prefixes": "", "service_prefixes": {}, **values}
    )


def _refusal(settings: PusherSettings, key: str, service: str | None = None) -> str | None:
    """The worker's refusal of ``key``, or ``None`` if it would upload it."""
    try:
        check_key(settings, key, service)
    except PermanentUploadError as exc:
        return str(exc)
    return None


# Keys rich in what makes a path mean another path: separators, dots, backslashes.
SEGMENTS = st.sampled_from(
    ["a", "b", "ab", "a.b", "x.json", ".", "..", "...", ".a", "a.", "", "\\", "..\\..", " "]
)
KEYS = (
    st.lists(SEGMENTS, min_size=1, max_size=6).map("/".join)
    | st.text(alphabet="/.\\abAB-_ :\x00\n", max_size=24)
    | st.text(max_size=12)
)
PREFIXES = st.sampled_from(["a", "a/", "a/b", "a/b/", "ab/", "..a/", "a.b"])


def _segments(prefix: str) -> list[str]:
    return prefix.removesuffix("/").split("/")


def _lies_under(key: str, prefix: str) -> bool:
    """What "under the prefix" means once paths are normalised: the prefix's segments
    start the key's, and at least one more follows."""
    parts, folder = posixpath.normpath(key).split("/"), _segments(prefix)
    return parts[: len(folder)] == folder and len(parts) > len(folder)


def _clean(key: str) -> bool:
    """A key the rules admit, said another way: its own normal form, that a server
    storing objects as files under a data folder keeps inside that folder, without
    backslashes or control characters."""
    stored = posixpath.normpath(posixpath.join("/data", key))
    return (
        posixpath.normpath(key) == key
        and stored.startswith("/data/")
        and stored == f"/data/{key}"
        and "\\" not in key
        and not any(unicodedata.category(c) == "Cc" for c in key)
        and len(key.encode()) <= 1024
    )


@settings(max_examples=500, deadline=None)
@given(key=KEYS, prefix=PREFIXES)
def test_accepted_keys_are_normal_and_stay_under_the_allowed_prefix(key: str, prefix: str) -> None:
    refusal = _refusal(_settings(allowed_prefixes=prefix), key)
    if refusal is None:
        assert posixpath.normpath(key) == key
        assert posixpath.normpath(posixpath.join("/data", key)) == f"/data/{key}"
        assert _lies_under(key, prefix)
    else:
        assert refusal.startswith(f"s3://{BUCKET}")
    # And nothing is refused that is clean and under the prefix.
    assert (refusal is None) == (_clean(key) and _lies_under(key, prefix))


@settings(max_examples=300, deadline=None)
@given(key=KEYS, prefix=PREFIXES)
def test_a_service_writes_only_under_its_own_prefix_segments(key: str, prefix: str) -> None:
    policy = _settings(service_prefixes={"svc-a": [prefix], "svc-b": ["b/"]})
    refusal = _refusal(policy, key, "svc-a")
    assert (refusal is None) == (_clean(key) and _lies_under(key, prefix))
    if refusal is None:
        assert posixpath.normpath(key) == key


@settings(max_examples=300, deadline=None)
@given(key=KEYS)
def test_the_contract_and_the_worker_apply_the_same_rules(key: str) -> None:
    worker = _refusal(_settings(), key)
    assert (worker is None) == (key_problem(key) is None) == _clean(key)
    if worker is None:
        send_to_s3.bind((key, "{}"), {})
    else:
        with pytest.raises(ArgumentError):
            send_to_s3.bind((key, "{}"), {})


@pytest.mark.parametrize(
    ("key", "rule"),
    [
        ("a/../b/x.json", "an S3 key cannot have a '..' segment"),
        ("../../escape.json", "an S3 key cannot have a '..' segment"),
        ("a/./x.json", "an S3 key cannot have a '.' segment"),
        ("..", "an S3 key cannot have a '..' segment"),
        ("a//x.json", "an S3 key cannot have an empty segment ('//', or a '/' at the end)"),
        ("a/", "an S3 key cannot have an empty segment ('//', or a '/' at the end)"),
        ("/a/x.json", "an S3 key cannot start with '/'"),
        (
            "a\\..\\b\\x.json",
            "an S3 key cannot contain a backslash (some S3 servers read it as '/')",
        ),
        ("a/x\x00.json", "an S3 key cannot contain control characters, found '\\x00'"),
        ("a/x.json\nINFO forged", "an S3 key cannot contain control characters, found '\\n'"),
        ("", "an S3 key cannot be empty"),
    ],
)
def test_keys_that_a_server_reads_as_another_path_are_refused(key: str, rule: str) -> None:
    # With no prefix at all, with a prefix the key seems to be under, and per service.
    for policy, service in [
        (_settings(), None),
        (_settings(allowed_prefixes="a/"), None),
        (_settings(service_prefixes={"svc-a": ["a/"]}), "svc-a"),
    ]:
        assert _refusal(policy, key, service) == f"s3://{BUCKET}: key {key!r} refused: {rule}"
    # The caller's contract refuses it before anything is sent.
    with pytest.raises(ArgumentError) as caught:
        send_to_s3.bind((key, "{}"), {})
    assert str(caught.value) == (
        f"task 'pusher.send_to_s3' v1, parameter 'key': Value error, {rule} (got {key!r})"
    )


def test_a_long_refused_key_is_shown_cut() -> None:
    key = "a/../" + "k" * 200
    assert _refusal(_settings(), key) == (
        f"s3://{BUCKET}: key {key[:100]!r}... refused: an S3 key cannot have a '..' segment"
    )


@pytest.mark.parametrize("prefix", ["a", "a/"])
def test_prefixes_are_whole_segments_with_or_without_a_final_slash(prefix: str) -> None:
    allowed = _settings(allowed_prefixes=f"other/, {prefix}")
    assert _refusal(allowed, "a/x.json") is None
    assert _refusal(allowed, "a/b/x.json") is None
    for outside in ("ab/x.json", "a", "a.json", "b/a/x.json"):
        assert _refusal(allowed, outside) == (
            f"s3://{BUCKET}/{outside}: key outside the allowed prefixes other/, {prefix}"
        )
    per_service = _settings(service_prefixes={"svc-a": [prefix]})
    assert _refusal(per_service, "a/x.json", "svc-a") is None
    assert _refusal(per_service, "ab/x.json", "svc-a") == (
        f"s3://{BUCKET}/ab/x.json: service 'svc-a' may write only under {prefix}"
    )


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"allowed_prefixes": "ok/, a/../b/"},
            "prefix 'a/../b/': a prefix cannot have a '..' segment",
        ),
        ({"allowed_prefixes": "/a/"}, "prefix '/a/': a prefix cannot start with '/'"),
        ({"allowed_prefixes": "a//"}, "prefix 'a//': a prefix cannot have an empty segment"),
        ({"service_prefixes": {"svc-a": [""]}}, "prefix '': a prefix cannot be empty"),
        ({"service_prefixes": {"svc-a": ["/"]}}, "prefix '/': a prefix cannot be empty"),
        (
            {"service_prefixes": {"svc-a": ["a\\b/"]}},
            "prefix 'a\\\\b/': a prefix cannot contain a backslash",
        ),
    ],
)
def test_prefixes_follow_the_key_rules(values: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError) as caught:
        _settings(**values)
    assert message in str(caught.value)


@pytest.mark.integration
async def test_the_worker_refuses_what_a_plain_celery_client_sends(
    start_pusher: Callable[..., Worker], broker: str, bridge: Bridge, s3: Any, bucket: str
) -> None:
    """A sender that skips the contract's checks (a plain Celery client, as the seed's)
    is refused by the worker, at once: nothing lands, under any of the folders."""
    queue = f"cb-pusher-keys-{uuid.uuid4().hex[:6]}"
    start_pusher(broker, queue=queue, PUSHER_ALLOWED_PREFIXES="svc-a")
    run = uuid.uuid4().hex
    hostile, neighbour = f"svc-a/../svc-b/{run}.json", f"svc-ab/{run}.json"
    # A fresh app: one whose broker_url is changed after use keeps its first broker.
    plain = Celery("hostile", broker=BROKERS[broker], set_as_current=False)
    try:
        sent = [
            plain.send_task("pusher.send_to_s3", (key, "{}"), queue=queue, serializer="json")
            for key in (hostile, neighbour)
        ]
    finally:
        close_celery_app(plain)
    outcomes = []
    for result in sent:
        with pytest.raises(RemoteTaskError) as caught:
            await bridge.handle(send_to_s3, result.id).result(timeout=30)
        outcomes.append((caught.value.remote_type, caught.value.remote_message))
    assert outcomes == [
        # refused on receipt by the contract, before the body runs
        (
            "ArgumentError",
            "task 'pusher.send_to_s3' v1, parameter 'key': Value error, an S3 key cannot have "
            f"a '..' segment (got {hostile!r})",
        ),
        (
            "PermanentUploadError",
            f"s3://{bucket}/{neighbour}: key outside the allowed prefixes svc-a",
        ),
    ]
    for prefix in ("svc-a/", "svc-b/", "svc-ab/"):
        listed = s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
        assert [o["Key"] for o in listed if run in o["Key"]] == []
