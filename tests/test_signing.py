"""Signed messages: a worker with a key runs only what a holder of the key sent, lately.

Unit tests of ``celerybridge._signing`` first, then real ``celery worker`` processes
with ``CELERYBRIDGE_SIGNING_KEY`` on Redis and RabbitMQ, called by keyed and key-less
bridges, plain Celery clients and hand-made (tampered, expired) messages.
"""

from __future__ import annotations

import json
import logging
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
from celery import Celery
from celery import _state as celery_state
from kombu.serialization import dumps as kombu_dumps

import celerybridge
from celerybridge import Bridge, BridgeSettings, ConfigurationError, DeadLetteredError
from celerybridge._constants import SERVICE_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER
from celerybridge._signing import (
    BAD_SIGNATURE,
    MALFORMED,
    UNREADABLE_BODY,
    UNSIGNED,
    Signer,
    SigningAMQP,
    signer_of,
)
from celerybridge._transports._protocol import Origin, task_message
from celerybridge._transports.base import OutgoingMessage
from celerybridge._transports.kombu import client_app

from ._brokers import BROKERS, RESULT_BACKEND, dead_letters, publish_message, purge, queue_length
from ._workers import Worker
from .workers import bindings

KEY = "k3y-" + "0123456789abcdef" * 3  # 52 characters
OTHER_KEY = "other-" + "fedcba9876543210" * 3
EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
NOW = 1_700_000_000.0
ROOT = Path(__file__).resolve().parent.parent


def body_of(args: Any, kwargs: Any) -> bytes:
    """The body Celery and the native publishers write for a call."""
    _, _, body = kombu_dumps([args, kwargs, EMBED], "json")
    return body.encode() if isinstance(body, str) else body


def signed(
    signer: Signer, task: str = "calc.add", args: Any = (1, 2), kwargs: Any = None, **more: Any
) -> tuple[dict[str, Any], bytes]:
    """Headers and body of a call signed at ``NOW``."""
    kwargs = kwargs or {}
    headers = {"task": task, "id": "id-1", **signer.headers(task, "id-1", args, kwargs, now=NOW)}
    headers.update(more)
    return headers, body_of(args, kwargs)


# Unit: the signer ------------------------------------------------------------------------


def test_a_signed_message_verifies_whatever_json_layout_carries_it() -> None:
    signer = Signer(KEY, 300)
    args = ("é🙂", datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC), uuid.UUID(int=7), Decimal("1.5"))
    kwargs = {"b": {"y": [1, None, True], "x": 2.5}, "a": "z"}
    headers, body = signed(signer, args=args, kwargs=kwargs)
    assert set(headers) == {"task", "id", TIMESTAMP_HEADER, SIGNATURE_HEADER}
    assert headers[TIMESTAMP_HEADER] == int(NOW)
    assert len(headers[SIGNATURE_HEADER]) == 64  # SHA-256, hex
    assert signer.refusal(headers, body, now=NOW) is None
    # The worker checks the JSON values it received, not the bytes' layout.
    relaid = json.dumps(json.loads(body)[::-1][::-1], indent=2, sort_keys=True).encode("utf-16")
    assert signer.refusal(headers, relaid, now=NOW + 1) is None
    assert signer.refusal(headers, body.decode(), now=NOW) is None  # str bodies too


@pytest.mark.parametrize(
    "tamper",
    [
        pytest.param(lambda h, b: ({**h, "task": "calc.add_v2"}, b), id="task"),
        pytest.param(lambda h, b: ({**h, "id": "id-2"}, b), id="id"),
        pytest.param(lambda h, b: (h, body_of((1, 3), {})), id="args"),
        pytest.param(lambda h, b: (h, body_of((1, 2), {"z": 0})), id="kwargs"),
        pytest.param(lambda h, b: ({**h, TIMESTAMP_HEADER: int(NOW) + 60}, b), id="timestamp"),
        pytest.param(lambda h, b: ({**h, SIGNATURE_HEADER: "0" * 64}, b), id="signature"),
        pytest.param(lambda h, b: ({**h, SIGNATURE_HEADER: "é"}, b), id="non-ascii-signature"),
        pytest.param(lambda h, b: ({**h, SERVICE_HEADER: "svc-z"}, b), id="service"),
    ],
)
def test_any_change_after_signing_is_a_bad_signature(
    tamper: Callable[[dict[str, Any], bytes], tuple[dict[str, Any], bytes]],
) -> None:
    signer = Signer(KEY, 300)
    headers, body = tamper(*signed(signer))
    assert signer.refusal(headers, body, now=NOW + 61) == (
        "bad signature: the message was not signed with this worker's signing key, "
        "or was altered after signing"
    )


def test_the_service_name_is_signed() -> None:
    signer = Signer(KEY, 300)
    args, kwargs = (1, 2), {}
    headers = {"task": "calc.add", "id": "id-1", SERVICE_HEADER: "svc-a"}
    headers |= signer.headers("calc.add", "id-1", args, kwargs, now=NOW, service="svc-a")
    body = body_of(args, kwargs)
    assert signer.refusal(headers, body, now=NOW) is None
    assert signer.refusal({**headers, SERVICE_HEADER: "svc-b"}, body, now=NOW) == BAD_SIGNATURE
    unnamed = {k: v for k, v in headers.items() if k != SERVICE_HEADER}
    assert signer.refusal(unnamed, body, now=NOW) == BAD_SIGNATURE


def test_another_key_is_a_bad_signature() -> None:
    headers, body = signed(Signer(OTHER_KEY, 300))
    assert Signer(KEY, 300).refusal(headers, body, now=NOW) == BAD_SIGNATURE


@pytest.mark.parametrize(
    ("headers", "body", "reason"),
    [
        ({"task": "calc.add", "id": "1"}, body_of((1, 2), {}), UNSIGNED),
        (None, body_of((1, 2), {}), UNSIGNED),
        ({TIMESTAMP_HEADER: int(NOW)}, body_of((1, 2), {}), MALFORMED),
        ({SIGNATURE_HEADER: "ab"}, body_of((1, 2), {}), MALFORMED),
        ({SIGNATURE_HEADER: "ab", TIMESTAMP_HEADER: "1700000000"}, b"[]", MALFORMED),
        ({SIGNATURE_HEADER: "ab", TIMESTAMP_HEADER: True}, b"[]", MALFORMED),
        ({SIGNATURE_HEADER: "ab", TIMESTAMP_HEADER: NOW}, b"[]", MALFORMED),
        ({SIGNATURE_HEADER: "ab", TIMESTAMP_HEADER: int(NOW)}, b"\x80\x04K\x01.", UNREADABLE_BODY),
        ({SIGNATURE_HEADER: "ab", TIMESTAMP_HEADER: int(NOW)}, b'{"args": []}', UNREADABLE_BODY),
        ({SIGNATURE_HEADER: "ab", TIMESTAMP_HEADER: int(NOW)}, b"[[1], [2]]", UNREADABLE_BODY),
    ],
)
def test_unsigned_and_malformed_messages_are_refused(
    headers: dict[str, Any] | None, body: bytes, reason: str
) -> None:
    assert Signer(KEY, 300).refusal(headers, body, now=NOW) == reason
    assert UNSIGNED == (
        "unsigned message: this worker runs only messages signed with its signing key "
        "(CELERYBRIDGE_SIGNING_KEY)"
    )
    assert MALFORMED == (
        "malformed signature headers: x-celerybridge-timestamp must be an integer and "
        "x-celerybridge-signature a hex string"
    )
    assert UNREADABLE_BODY == (
        "cannot check the signature: the body is not a JSON [args, kwargs, ...] list"
    )


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


def test_the_key_is_in_no_repr() -> None:
    signer = Signer(KEY, 300)
    assert repr(signer) == "<Signer max_age=300s>"
    settings = BridgeSettings(signing_key=KEY)
    assert KEY not in repr(settings)
    assert KEY not in str(settings)
    assert KEY not in repr(Bridge(settings))
    assert "signing_key=SecretStr('**********')" in repr(settings)
    assert "signing_max_age=300.0" in repr(settings)


def test_settings_read_the_key_and_window_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert BridgeSettings().signing_key is None
    monkeypatch.setenv("CELERYBRIDGE_SIGNING_KEY", KEY)
    monkeypatch.setenv("CELERYBRIDGE_SIGNING_MAX_AGE", "60")
    settings = BridgeSettings()
    assert settings.signing_key is not None
    assert settings.signing_key.get_secret_value() == KEY
    signer = Signer.from_settings(settings)
    assert signer is not None
    assert signer.max_age == 60
    assert Signer.from_settings(BridgeSettings(signing_key=None)) is None


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"signing_key": "too-short-a-secret"},
            "invalid celerybridge settings: CELERYBRIDGE_SIGNING_KEY (signing_key): a signing "
            "key needs at least 32 characters; make one with: "
            'python -c "import secrets; print(secrets.token_urlsafe(32))"',
        ),
        (
            {"signing_key": KEY, "signing_max_age": 0},
            "invalid celerybridge settings: CELERYBRIDGE_SIGNING_MAX_AGE (signing_max_age): "
            "Input should be greater than 0",
        ),
    ],
)
def test_bad_signing_settings_are_a_configuration_error(
    overrides: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigurationError) as caught:
        BridgeSettings(**overrides)
    assert str(caught.value) == message
    # Not even the chained pydantic error shows the rejected key.
    assert "too-short-a-secret" not in str(caught.value.__cause__)


def test_without_a_key_the_native_message_is_celerys() -> None:
    message = OutgoingMessage("id-1", "calc.add", "q", (1, 2), {})
    plain = task_message(message, Origin())
    assert SIGNATURE_HEADER not in plain.headers
    assert TIMESTAMP_HEADER not in plain.headers
    signer = Signer(KEY, 300)
    wire = task_message(message, Origin(), signer=signer)
    # Celery's headers first, unchanged, then the two signature headers.
    assert list(wire.headers) == [*plain.headers, TIMESTAMP_HEADER, SIGNATURE_HEADER]
    assert wire.body == plain.body
    assert signer.refusal(wire.headers, wire.body) is None


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
        assert repr(signer_of(app)) == "<Signer max_age=300s>"
        built = app.amqp.as_task_v2("id-1", "calc.add", (1, 2), {"z": 3})
        assert signer.refusal(built.headers, body_of((1, 2), {"z": 3})) is None
        app.close()
    plain_app = client_app(BridgeSettings(broker_url="memory://"), with_backend=False, main="t")
    assert not isinstance(plain_app.amqp, SigningAMQP)
    assert signer_of(plain_app) is None
    plain_app.close()


def test_a_retry_is_signed_afresh_not_with_the_headers_it_carries_over() -> None:
    # Task.retry() passes the request's custom headers (the old signature and timestamp
    # among them) as headers=..., which Celery merges in after building the message.
    app = client_app(
        BridgeSettings(broker_url="memory://", signing_key=KEY), with_backend=False, main="t"
    )
    queue = f"cb-retry-{uuid.uuid4().hex[:8]}"
    stale = {TIMESTAMP_HEADER: 1, SIGNATURE_HEADER: "0" * 64, "x-custom": "kept"}
    try:
        app.send_task("calc.add", (1, 2), queue=queue, headers=stale)
        with app.connection_for_write() as connection:
            message = connection.default_channel.basic_get(queue, no_ack=True)
    finally:
        app.close()
    assert message is not None
    assert message.headers["x-custom"] == "kept"
    assert abs(message.headers[TIMESTAMP_HEADER] - time.time()) < 5
    assert Signer(KEY, 300).refusal(message.headers, message.body) is None


# Integration: real workers with the key, on Redis and on RabbitMQ ------------------------


@pytest.fixture(scope="module")
def keyed_workers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Worker]]:
    started: dict[str, Worker] = {}
    yield started
    for worker in started.values():
        worker.stop()


@pytest.fixture
def keyed_worker(
    keyed_workers: dict[str, Worker], broker: str, tmp_path_factory: pytest.TempPathFactory
) -> Worker:
    """A celerybridge worker (tests.workers.bridge_worker) with CELERYBRIDGE_SIGNING_KEY."""
    if broker not in keyed_workers:
        worker = Worker("tests.workers.bridge_worker", BROKERS[broker], RESULT_BACKEND)
        worker.extra_env["CELERYBRIDGE_SIGNING_KEY"] = KEY
        keyed_workers[broker] = worker.start(tmp_path_factory.mktemp("signing"))
    return keyed_workers[broker]


def with_key(settings: BridgeSettings, key: str | None = KEY, **more: Any) -> BridgeSettings:
    return BridgeSettings(**{**settings.model_dump(), "signing_key": key, **more})


def dead_lettered(task_id: str, reason: str, task: str = "calc.add", version: int = 1) -> str:
    return f"task {task!r} v{version} ({task_id}) failed: DeadLettered: {reason}"


async def assert_refused(
    bridge: Bridge, worker: Worker, broker_url: str, task_id: str, reason: str
) -> None:
    """The caller hears why; the message waits on ``<queue>.dead``; nothing ran."""
    with pytest.raises(DeadLetteredError) as caught:
        await bridge.handle(bindings.add, task_id).result(timeout=20)
    assert str(caught.value) == dead_lettered(task_id, reason)
    assert caught.value.remote_message == reason
    dead = await anyio.to_thread.run_sync(dead_letters, broker_url, worker.queue)
    assert [(d["id"], d["x-celerybridge-dead-reason"]) for d in dead] == [(task_id, reason)]
    assert dead[0]["x-celerybridge-dead-from"] == worker.queue
    assert queue_length(broker_url, worker.queue) == 0
    assert f"Task calc.add[{task_id}] succeeded" not in worker.log()
    assert f"Task calc.add[{task_id}] received" not in worker.log()


def take_one(broker_url: str, queue: str) -> tuple[dict[str, Any], bytes]:
    """Headers and body of the message waiting on ``queue`` (consumed), as a worker gets it."""
    with kombu.Connection(broker_url) as connection:
        message = connection.default_channel.basic_get(queue, no_ack=True)
        assert message is not None
        connection.default_channel.queue_delete(queue)
        body = message.body  # py-amqp hands a text body over decoded
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
async def test_key_less_bridges_and_plain_celery_clients_are_refused(
    bridge: Bridge, keyed_worker: Worker, broker_url: str
) -> None:
    add = bindings.add.with_options(queue=keyed_worker.queue)
    handle = await bridge.send(add, (1, 2), {})  # the fixture's bridge has no key
    await assert_refused(bridge, keyed_worker, broker_url, handle.id, UNSIGNED)

    app = Celery("plain", broker=broker_url, set_as_current=False)
    try:
        sent = app.send_task("calc.add", args=(1, 2), queue=keyed_worker.queue)
    finally:
        app.close()
    await assert_refused(bridge, keyed_worker, broker_url, sent.id, UNSIGNED)


@pytest.mark.integration
@pytest.mark.parametrize("fast_path", [True, False], ids=["native", "kombu"])
async def test_another_key_is_refused(
    settings: BridgeSettings, keyed_worker: Worker, broker_url: str, fast_path: bool
) -> None:
    add = bindings.add.with_options(queue=keyed_worker.queue)
    async with Bridge(with_key(settings, OTHER_KEY, fast_path=fast_path)) as bridge:
        handle = await bridge.send(add, (1, 2), {})
        await assert_refused(bridge, keyed_worker, broker_url, handle.id, BAD_SIGNATURE)


TAMPERINGS: dict[str, Callable[[dict[str, Any], bytes], tuple[dict[str, Any], bytes]]] = {
    "args": lambda h, b: (h, b.replace(b"[1, 2]", b"[1, 3]")),
    "kwargs": lambda h, b: (h, b.replace(b"[1, 2], {}", b'[1, 2], {"z": 5}')),
    # calc.add_v2 exists on the worker and would run, were the name not signed.
    "task": lambda h, b: ({**h, "task": "calc.add_v2"}, b),
    "timestamp": lambda h, b: ({**h, TIMESTAMP_HEADER: h[TIMESTAMP_HEADER] + 1}, b),
}


@pytest.mark.integration
@pytest.mark.parametrize("change", ["none", *TAMPERINGS])
async def test_a_tampered_copy_of_a_signed_message_is_refused(
    settings: BridgeSettings, keyed_worker: Worker, broker_url: str, change: str
) -> None:
    # A real signed message, captured on a queue no worker reads.
    captured = f"{keyed_worker.queue}-captured"
    async with Bridge(with_key(settings)) as keyed:
        handle = await keyed.send(bindings.add.with_options(queue=captured), (1, 2), {})
        headers, body = await anyio.to_thread.run_sync(take_one, broker_url, captured)
        assert body.startswith(b"[[1, 2], {}, ")
        if change != "none":
            headers, body = TAMPERINGS[change](headers, body)
        await anyio.to_thread.run_sync(
            publish_message, broker_url, keyed_worker.queue, body, headers
        )
        if change == "none":  # the copy itself is good: a replay inside the window runs
            assert (await handle.result(timeout=20)).value == 3
        else:
            await assert_refused(keyed, keyed_worker, broker_url, handle.id, BAD_SIGNATURE)


@pytest.mark.integration
@pytest.mark.parametrize("offset", [-3600, 3600], ids=["expired", "future"])
async def test_a_signature_outside_the_window_is_refused(
    bridge: Bridge, keyed_worker: Worker, broker_url: str, offset: int
) -> None:
    task_id = str(uuid.uuid4())
    signed_at = time.time() + offset
    headers = {
        "lang": "py",
        "task": "calc.add",
        "id": task_id,
        "root_id": task_id,
        **Signer(KEY, 300).headers("calc.add", task_id, (1, 2), {}, now=signed_at),
    }
    await anyio.to_thread.run_sync(
        publish_message, broker_url, keyed_worker.queue, body_of((1, 2), {}), headers
    )
    stamp = datetime.fromtimestamp(int(signed_at), UTC).isoformat()
    reason = (
        f"expired signature: signed at {stamp}, more than 300 s before this worker's clock "
        "(CELERYBRIDGE_SIGNING_MAX_AGE)"
        if offset < 0
        else f"signature from the future: signed at {stamp}, more than 30 s ahead of this "
        "worker's clock"
    )
    await assert_refused(bridge, keyed_worker, broker_url, task_id, reason)


@pytest.mark.integration
async def test_the_key_is_in_no_log_line(
    settings: BridgeSettings,
    keyed_worker: Worker,
    broker_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    add = bindings.add.with_options(queue=keyed_worker.queue)
    for fast_path in (True, False):
        async with Bridge(with_key(settings, fast_path=fast_path)) as bridge:
            assert (await (await bridge.send(add, (1, 1), {})).result(timeout=20)).value == 2
        async with Bridge(with_key(settings, OTHER_KEY, fast_path=fast_path)) as bridge:
            with pytest.raises(DeadLetteredError):
                await (await bridge.send(add, (1, 1), {})).result(timeout=20)
            purge(broker_url, f"{keyed_worker.queue}.dead")
    assert caplog.records  # the caller did log (kombu, aio-pika...)
    for secret in (KEY, OTHER_KEY):
        assert secret not in caplog.text
        assert secret not in keyed_worker.log()
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
    headers = {
        "lang": "py",
        "task": "calc.add",
        "id": task_id,
        "root_id": task_id,
        SERVICE_HEADER: "svc-a",  # re-signing must cover it, as the worker checks it
        **Signer(KEY, 300).headers(
            "calc.add", task_id, (2, 3), {}, now=time.time() - 3600, service="svc-a"
        ),
    }
    await anyio.to_thread.run_sync(publish_message, broker_url, queue, body_of((2, 3), {}), headers)
    with pytest.raises(DeadLetteredError) as caught:
        await bridge.handle(bindings.add, task_id).result(timeout=20)
    expired = caught.value.remote_message
    assert expired.startswith("expired signature: signed at ")

    # As it was: the old signature, refused again for the same reason.
    replayed = await anyio.to_thread.run_sync(dlq, "replay", queue, task_id, "--broker", broker_url)
    assert replayed.stdout == f"replayed {task_id} (calc.add) to {queue}\n", replayed.stderr
    listed = await eventually(
        lambda: dlq("list", queue, "--broker", broker_url).stdout, lambda out: task_id in out
    )
    assert listed == f"{task_id}\tcalc.add\t{expired}\n"

    without_key = dlq("replay", queue, task_id, "--sign", "--broker", broker_url)
    assert without_key.returncode == 2
    assert "Error: --sign needs the key in CELERYBRIDGE_SIGNING_KEY" in without_key.stderr

    signed_now = await anyio.to_thread.run_sync(
        lambda: dlq("replay", queue, task_id, "--sign", "--broker", broker_url, key=KEY)
    )
    assert signed_now.stdout == f"replayed {task_id} (calc.add) to {queue}\n", signed_now.stderr
    # The result backend still holds the first refusal: wait for the run's success.
    await eventually(keyed_worker.log, lambda log: f"Task calc.add[{task_id}] succeeded" in log)
    assert (await bridge.handle(bindings.add, task_id).result(timeout=5)).value == 5
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
