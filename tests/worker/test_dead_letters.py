"""What a celerybridge worker cannot accept goes to ``<queue>.dead``; the caller gets a
typed error instead of waiting for nothing."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import uuid
from pathlib import Path

import anyio
import pytest
from celery import Celery

from celerybridge import Bridge, DeadLetteredError, RemoteTaskError
from celerybridge._worker.dead_letter import move_to_dead_letters

from .._brokers import dead_letters, publish_message, purge, queue_length
from .._workers import Worker
from ..workers import bindings

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
PICKLE = "application/x-python-serialize"
EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


def publish_raw(broker_url: str, queue: str, body: bytes, content_type: str, task: str) -> str:
    """A protocol-v2 task message with any body, as a careless sender would send it."""
    task_id = str(uuid.uuid4())
    headers = {"lang": "py", "task": task, "id": task_id, "root_id": task_id}
    publish_message(broker_url, queue, body, headers, content_type, "binary")
    return task_id


@pytest.mark.parametrize(
    ("content_type", "task", "reason"),
    [
        (
            "application/x-python-serialize",
            "calc.add",
            "content type 'application/x-python-serialize' refused: only application/json "
            "is accepted",
        ),
        ("application/json", "calc.add_v9", "no task 'calc.add_v9' on this worker"),
    ],
    ids=["pickle", "unknown-version"],
)
async def test_refused_message_goes_to_the_dead_letter_queue_and_the_caller_hears(
    bridge: Bridge,
    bridge_worker: Worker,
    broker_url: str,
    content_type: str,
    task: str,
    reason: str,
) -> None:
    queue = bridge_worker.queue
    body = (
        pickle.dumps(((1, 2), {}, {}))
        if content_type == "application/x-python-serialize"
        else b'[[1, 2], {}, {"callbacks": null, "errbacks": null, "chain": null, "chord": null}]'
    )
    task_id = publish_raw(broker_url, queue, body, content_type, task)

    with pytest.raises(DeadLetteredError) as caught:
        await bridge.handle(bindings.add, task_id).result(timeout=20)
    assert caught.value.remote_type == "DeadLettered"
    assert caught.value.remote_message == reason

    [dead] = dead_letters(broker_url, queue)
    assert dead["id"] == task_id
    assert dead["task"] == task
    assert dead["x-celerybridge-dead-reason"] == reason
    assert dead["x-celerybridge-dead-from"] == queue
    assert dead["body"] == body  # untouched: it can be fixed and replayed
    assert queue_length(broker_url, queue) == 0
    purge(broker_url, f"{queue}.dead")


async def test_a_call_failing_the_contract_on_receipt_is_copied_to_the_dead_letters(
    bridge: Bridge, bridge_worker: Worker, broker_url: str
) -> None:
    # A plain Celery client skips the caller-side validation.
    app = Celery("careless", broker=broker_url, set_as_current=False)
    try:
        sent = app.send_task("calc.add", args=("three", 2), queue=bridge_worker.queue)
    finally:
        app.close()
    with pytest.raises(RemoteTaskError) as caught:
        await bridge.handle(bindings.add, sent.id).result(timeout=20)
    assert caught.value.remote_type == "ArgumentError"  # the failure is stored as it is

    [dead] = dead_letters(broker_url, bridge_worker.queue)
    assert (dead["id"], dead["task"]) == (sent.id, "calc.add")
    assert dead["x-celerybridge-dead-reason"] == (
        "ArgumentError: task 'calc.add' v1, parameter 'x': Input should be a valid integer, "
        "unable to parse string as an integer (got 'three')"
    )
    assert json.loads(dead["body"])[:2] == [["three", 2], {}]  # as received, to replay
    purge(broker_url, f"{bridge_worker.queue}.dead")


def dlq(*args: str) -> subprocess.CompletedProcess[str]:
    """``celerybridge dlq ...``, run as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "celerybridge", "dlq", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_dlq_command_lists_shows_replays_and_purges(
    bridge: Bridge, bridge_worker: Worker, broker_url: str
) -> None:
    queue = bridge_worker.queue
    # A refused message, and one whose cause is gone (as after an S3 outage): both dead.
    refused = publish_raw(broker_url, queue, pickle.dumps(((1, 2), {}, {})), PICKLE, "calc.add")
    with pytest.raises(DeadLetteredError):
        await bridge.handle(bindings.add, refused).result(timeout=20)
    fixed = str(uuid.uuid4())
    body = json.dumps([[2, 3], {}, EMBED]).encode()
    app = Celery("dead", broker=broker_url, set_as_current=False)
    try:
        headers = {"lang": "py", "task": "calc.add", "id": fixed, "root_id": fixed}
        await anyio.to_thread.run_sync(
            lambda: move_to_dead_letters(
                app, body, "application/json", "utf-8", headers, queue, "S3 was down", "retries"
            )
        )
    finally:
        app.close()

    listed = dlq("list", queue, "--broker", broker_url)
    assert listed.returncode == 0, listed.stderr
    lines = sorted(listed.stdout.splitlines())
    assert lines == sorted(
        [
            f"{refused}\tcalc.add\tmalformed\tcontent type '{PICKLE}' refused: only "
            "application/json is accepted",
            f"{fixed}\tcalc.add\tretries\tS3 was down",
        ]
    )
    assert dlq("list", queue, "--broker", broker_url).stdout.count("\n") == 2  # left in place

    shown = json.loads(dlq("show", queue, fixed, "--broker", broker_url).stdout)
    assert (shown["reason"], shown["source"], shown["body"]) == (
        "S3 was down",
        queue,
        body.decode(),
    )

    replayed = dlq("replay", queue, fixed, "--broker", broker_url)
    assert replayed.stdout == f"replayed {fixed} (calc.add) to {queue}\n", replayed.stderr
    assert (await bridge.handle(bindings.add, fixed).result(timeout=20)).value == 5  # landed
    assert [line.split("\t")[0] for line in dlq("list", queue, "--broker", broker_url)
            .stdout.splitlines()] == [refused]  # fmt: skip

    purged = dlq("purge", queue, "--yes", "--broker", broker_url)
    assert purged.stdout == f"purged 1 dead letter(s) from {queue}.dead\n"
    assert queue_length(broker_url, f"{queue}.dead") == 0
