"""``celerybridge call``: hostile input refused with typed messages and exit codes, and
real calls through Redis and RabbitMQ to a real worker.

The command runs in this process (click's runner): a subprocess would cost a second of
imports per call. The bindings are imported here first, so the registry fixture keeps
their contracts.
"""

from __future__ import annotations

import base64
import json
import sys
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from click.testing import CliRunner, Result
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pusher.bindings  # noqa: F401  (registers the pusher's contracts)
from celerybridge._cli import main
from tests.workers import bindings  # noqa: F401  (registers the calc.* contracts)

from ._brokers import BROKERS, RESULT_BACKEND
from ._workers import Worker

CALC = ("-m", "tests.workers.bindings")


def call(*args: str, env: dict[str, str] | None = None) -> Result:
    result = CliRunner().invoke(main, ["call", *args], env=env)
    # Only SystemExit, from the command's own exit codes: never a stray exception.
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


IDS = [
    "unknown-task", "unknown-version", "wrong-type", "missing", "int64", "unknown-kwarg",
    "bad-json", "nan", "huge-float", "huge-int", "deep", "kwargs-not-object",
]  # fmt: skip


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (
            ("calc.ad", "1", "2"),
            3,
            "Error: UnknownTaskError: unknown task 'calc.ad'; did you mean 'calc.add'?",
        ),
        (
            ("calc.add", "1", "2", "--version", "7"),
            3,
            "Error: UnknownVersionError: task 'calc.add' has no version 7; known versions: 1, 2",
        ),
        (
            ("calc.add", '"one"', "2"),
            3,
            "Error: ArgumentError: task 'calc.add' v1, parameter 'x': Input should be a valid "
            "integer, unable to parse string as an integer (got 'one')",
        ),
        (
            ("calc.add", "1"),
            3,
            "Error: ArgumentError: task 'calc.add' v1, parameter 'y': missing a required "
            "argument: 'y'",
        ),
        (
            ("calc.add", str(2**70), "2"),
            3,
            "Error: ArgumentError: task 'calc.add' v1, parameter 'x': integer outside the "
            "signed 64-bit range (-2**63 to 2**63-1); most JSON peers cannot carry it",
        ),
        (
            ("calc.add", "1", "2", "--kwargs", '{"colour": "red"}'),
            3,
            "Error: ArgumentError: task 'calc.add' v1, parameter 'colour': got an unexpected "
            "keyword argument 'colour'",
        ),
        (("calc.add", "1", "{"), 2, "argument 2 is not JSON: Expecting property name"),
        (("calc.add", "NaN", "2"), 2, "argument 1: NaN is not a JSON number celerybridge sends"),
        (("calc.add", "1e999", "2"), 2, "argument 1: 1e999 is too large for a 64-bit float"),
        (
            ("calc.add", "9" * 5000, "2"),
            2,
            f"argument 1: an integer of more than {sys.get_int_max_str_digits()} digits",
        ),
        (("calc.add", "[" * 100_000, "2"), 2, "argument 1: nested deeper than 30 levels"),
        (("calc.add", "1", "2", "--kwargs", "[1]"), 2, "--kwargs must be a JSON object"),
        (
            ("calc.add", "1", "2", "--option", "countdown=-1"),
            8,
            "Error: ConfigurationError: countdown must be a positive, finite duration, got -1",
        ),
        (
            ("calc.add", "1", "2", "--option", "bogus=1"),
            3,
            "Error: CallError: task 'calc.add': unsupported option(s) bogus; supported: "
            "countdown, eta, expires, headers, link, link_error, priority, queue, retry, "
            "retry_policy, soft_time_limit, task_id, time_limit",
        ),
        (
            ("calc.add", "1", "2", "--option", 'eta="2031-01-01T00:00:00"'),
            8,
            "Error: ConfigurationError: eta must be a timezone-aware datetime (e.g. "
            "datetime.now(UTC) + timedelta(seconds=5)), got the naive 2031-01-01T00:00:00",
        ),
        (
            ("calc.add", "1", "2", "--option", 'expires="soon"'),
            8,
            "Error: ConfigurationError: expires must be an ISO 8601 date and time with a "
            "timezone, got 'soon'",
        ),
        (
            ("calc.add", "1", "2", "--option", 'headers={"task": "calc.fail"}'),
            8,
            "Error: ConfigurationError: header 'task' is reserved: Celery's protocol, the "
            "worker's request or celerybridge set it",
        ),
        (("calc.add", "1", "2", "--option", "countdown"), 2, "expected NAME=JSON"),
        (("calc.add", "1", "2", "--option", "priority=NaN"), 2, "--option priority: NaN is"),
        (
            ("calc.add", "1", "2", "--option", "priority=1", "--option", "priority=2"),
            2,
            "--option priority: given more than once",
        ),
        (
            ("calc.add", "1", "2", "--queue", "a b"),
            8,
            "Error: ConfigurationError: queue must be a non-empty string without spaces, got 'a b'",
        ),
    ],
    ids=[
        "unknown-task",
        "unknown-version",
        "wrong-type",
        "missing",
        "int64",
        "unknown-kwarg",
        "bad-json",
        "nan",
        "huge-float",
        "huge-int",
        "deep",
        "kwargs-not-object",
        "option-value",
        "option-unknown",
        "option-naive-eta",
        "option-bad-expires",
        "option-reserved-header",
        "option-no-value",
        "option-nan",
        "option-twice",
        "bad-queue",
    ],
)
def test_bad_calls_are_refused_with_a_typed_message_and_exit_code(
    args: tuple[str, ...], code: int, message: str
) -> None:
    result = call(*CALC, *args, "--dry-run")
    assert result.exit_code == code, result.output
    assert result.stdout == ""
    assert message in result.stderr
    if code == 3:
        assert result.stderr == message + "\n"


def test_dry_run_prints_the_message_as_it_travels_bytes_as_base64() -> None:
    content = base64.urlsafe_b64encode(b"\x00\xffhi").decode()
    result = call(
        "-m", "pusher.bindings", "pusher.send_to_s3", '"a.bin"', json.dumps(content),
        "--version", "3", "--kwargs", '{"revision": 4}', "--queue", "elsewhere", "--dry-run",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {
        "task": "pusher.send_to_s3",
        "version": 3,
        "wire_name": "pusher.send_to_s3_v3",
        "queue": "elsewhere",
        "args": ["a.bin", content, None, "application/octet-stream", 4],
        "kwargs": {},
    }


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=8,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=st.sampled_from(["calc.add", "calc.sleep", "pusher.send_to_s3", "calc.nope"]),
    args=st.lists(
        st.one_of(JSON.map(lambda v: json.dumps(v, allow_nan=True)), st.text(max_size=30)),
        max_size=4,
    ),
    version=st.sampled_from([[], ["--version", "1"], ["--version", "3"]]),
)
def test_any_input_ends_in_a_documented_exit_code(
    name: str, args: list[str], version: list[str]
) -> None:
    result = call(*CALC, "-m", "pusher.bindings", name, *version, "--dry-run", "--", *args)
    assert result.exit_code in (0, 2, 3), result.output
    if result.exit_code == 0:
        sent = json.loads(result.stdout)
        assert sent["task"] == name
    else:
        assert result.stderr.startswith("Error: ") or "Usage:" in result.stderr
        assert "Traceback" not in result.output


# Real calls: one worker per broker, the session's (tests.workers.bridge_worker).


def _env(broker: str) -> dict[str, str]:
    return {
        "CELERYBRIDGE_BROKER_URL": BROKERS[broker],
        "CELERYBRIDGE_RESULT_BACKEND": RESULT_BACKEND,
    }


@pytest.mark.integration
def test_call_sends_and_waits_for_the_result(bridge_worker: Worker, broker: str) -> None:
    env, queue = _env(broker), ("--queue", bridge_worker.queue)
    done = call(*CALC, "calc.add", "1", "2", "3", "--version", "2", *queue, "--wait", env=env)
    assert done.exit_code == 0, done.output
    out: dict[str, Any] = json.loads(done.stdout)
    assert out["result"]["value"] == 6
    assert {k: out[k] for k in ("task", "version", "wire_name", "queue", "state")} == {
        "task": "calc.add",
        "version": 2,
        "wire_name": "calc.add_v2",
        "queue": bridge_worker.queue,
        "state": "SUCCESS",
    }
    sent = call(*CALC, "calc.add", "1", "2", *queue, env=env)
    assert sent.exit_code == 0, sent.output
    assert set(json.loads(sent.stdout)) == {"task", "version", "wire_name", "queue", "id"}

    task_id = f"cli-{uuid.uuid4()}"  # send options reach the message: its id, its ETA
    eta = (datetime.now(UTC) + timedelta(seconds=1)).isoformat()
    options = ("--option", f'task_id="{task_id}"', "--option", f'eta="{eta}"')
    timed = call(*CALC, "calc.add", "4", "5", *queue, *options, "--wait", env=env)
    assert timed.exit_code == 0, timed.output
    out = json.loads(timed.stdout)
    assert (out["id"], out["result"]["value"]) == (task_id, 9)


@pytest.mark.integration
def test_call_reports_a_remote_failure_and_a_timeout(bridge_worker: Worker, broker: str) -> None:
    env, queue = _env(broker), ("--queue", bridge_worker.queue)
    failed = call(*CALC, "calc.fail", '"boom"', *queue, "--wait", "--timeout", "20", env=env)
    assert failed.exit_code == 5, failed.output
    out = json.loads(failed.stdout)
    assert (out["state"], out["error"]["message"]) == ("FAILURE", "boom")
    assert failed.stderr.startswith(
        f"Error: RemoteTaskError: task 'calc.fail' v1 ({out['id']}) failed: "
    )
    slow = call(*CALC, "calc.sleep", "1.5", *queue, "--wait", "--timeout", "0.2", env=env)
    assert slow.exit_code == 6, slow.output
    out = json.loads(slow.stdout)
    assert out["error"]["type"] == "ResultTimeoutError"
    assert slow.stderr == (
        f"Error: ResultTimeoutError: task 'calc.sleep' v1 ({out['id']}) did not finish "
        "within 0.2 s\n"
    )
