"""A caller's trace continues in the worker, whichever path publishes.

Real tools, as a service installs them: ``opentelemetry-sdk`` with
``opentelemetry-instrumentation-celery``, and ``sentry-sdk`` with its Celery
integration, on both sides (the caller in a process of its own, the worker a real
``celery worker`` on the threads pool and on ``celerybridge.AsyncioPool``, laid out
with ``import celerybridge`` before the tool is set up). What they export goes to a
file instead of a collector (``tracing``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from .._brokers import BROKERS, RESULT_BACKEND
from .._workers import ROOT, Worker
from . import bindings

pytestmark = pytest.mark.integration

TASKS = [stub.name for stub in bindings.STUBS]


def _records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module", params=["otel", "sentry"])
def tool(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module", params=["threads", "asyncio"])
def pool(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module", params=sorted(BROKERS))
def traced(
    request: pytest.FixtureRequest, tool: str, pool: str, tmp_path_factory: pytest.TempPathFactory
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """One worker (on ``pool``) and one caller run with ``tool`` on a broker: what the
    caller printed (a line per path and task) and what the worker exported."""
    broker_url = BROKERS[str(request.param)]
    folder = tmp_path_factory.mktemp(f"eco-{tool}-{request.param}")
    exported = folder / "worker.jsonl"
    env = {"CB_ECO_TOOL": tool, "CB_ECO_OUT": str(exported)}
    if pool == "asyncio":  # Celery's -P takes a class only as "custom", named so
        env["CELERY_CUSTOM_WORKER_POOL"] = "celerybridge:AsyncioPool"
    worker = Worker(
        "tests.ecosystem.worker",
        broker_url,
        RESULT_BACKEND,
        "custom" if pool == "asyncio" else pool,
        extra_env=env,
    )
    worker.start(folder)
    try:
        caller = subprocess.run(
            [sys.executable, "-m", "tests.ecosystem.caller", worker.queue],
            cwd=ROOT,
            env={
                **os.environ,
                **env,
                "CB_ECO_OUT": str(folder / "caller.jsonl"),
                "CELERYBRIDGE_BROKER_URL": broker_url,
                "CELERYBRIDGE_RESULT_BACKEND": RESULT_BACKEND,
                "PYTHONPATH": str(ROOT),
            },
            capture_output=True,
            text=True,
            timeout=90,
        )
        assert caller.returncode == 0, caller.stderr + worker.log()
        calls = [json.loads(line) for line in caller.stdout.splitlines()]
    finally:
        worker.stop()
    assert "Traceback" not in worker.log(), worker.log()
    return calls, _records(exported)


@pytest.mark.parametrize("path", ["fast", "kombu"])
@pytest.mark.parametrize("task", TASKS)
def test_the_workers_task_span_continues_the_callers_trace(
    tool: str, traced: tuple[list[dict[str, Any]], list[dict[str, Any]]], path: str, task: str
) -> None:
    calls, exported = traced
    [call] = [c for c in calls if c["path"] == path and c["task"] == task]
    # OpenTelemetry names the worker's span run/<task>; Sentry names the transaction <task>.
    name = f"run/{task}" if tool == "otel" else task
    spans = [r for r in exported if r["name"] == name and r["trace_id"] == call["trace_id"]]
    assert len(spans) == 1, (call, exported)
    [span] = spans
    assert span["parent_id"] is not None  # a child of the caller's side, not a new root
    # The body ran inside that span (an async one on the worker's own event loop): the
    # span current there is the task's, or (Sentry) one of the transaction's own.
    assert call["body"]["trace_id"] == span["trace_id"]
    assert call["body"]["span_id"] in {span["span_id"], *span.get("children", [])}
