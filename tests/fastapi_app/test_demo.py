"""The one-command demo, run as a user runs it: no broker, no S3 configured, then Ctrl-C."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import httpx
import psutil
import pytest

from .._brokers import BROKERS, RESULT_BACKEND
from .._workers import ROOT
from ..pusher._s3server import MotoServer, free_port

pytestmark = pytest.mark.integration


def alive(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@dataclass
class Demo:
    process: subprocess.Popen[bytes]
    log: Path
    url_a: str

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout: float = 90) -> str:
        """The first group of ``pattern`` once it appears in the demo's output."""
        deadline = time.monotonic() + timeout
        while True:
            match = re.search(pattern, self.output())
            if match:
                return match.group(1)
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"no {pattern!r} in the demo's output:\n{self.output()}")
            time.sleep(0.1)

    def save_and_wait(self) -> dict[str, Any]:
        """POST an item to Service A; the item once its backup is no longer pending."""
        item: dict[str, Any] = httpx.post(
            f"{self.url_a}/items", json={"name": "demo", "quantity": 1}
        ).json()
        deadline = time.monotonic() + 30
        while item["backup"]["state"] == "pending" and time.monotonic() < deadline:
            time.sleep(0.2)
            item = httpx.get(f"{self.url_a}/items/{item['id']}").json()
        return item


@contextmanager
def run_demo(tmp_path: Path, **config: str) -> Iterator[Demo]:
    """``python -m examples.fastapi_app`` with only ``config`` set; SIGINT it on exit."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("CELERYBRIDGE_", "AWS_", "PUSHER_", "SERVICE_"))
    }
    env.update(config)
    port_a, port_b = free_port(), free_port()
    command = [sys.executable, "-m", "examples.fastapi_app", "--data", str(tmp_path / "data")]
    log = tmp_path / "demo.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [*command, "--port-a", str(port_a), "--port-b", str(port_b)],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    demo = Demo(process, log, f"http://127.0.0.1:{port_a}")
    try:
        demo.wait_for(r"(Press CTRL\+C to stop)")
        children = psutil.Process(process.pid).children(recursive=True)
        assert len(children) >= 3  # the pusher, two services (and S3 when embedded)
        yield demo
        process.send_signal(signal.SIGINT)
        assert process.wait(30) == 0, demo.output()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert [child.pid for child in children if alive(child)] == []
    for name in ("service-a", "service-b", "pusher"):
        assert f"demo | {name} stopped" in demo.output()


def test_demo_runs_embedded_lands_an_item_in_s3_and_stops_every_child(tmp_path: Path) -> None:
    with run_demo(tmp_path) as demo:
        output = demo.output()
        assert "broker: embedded, kombu's filesystem transport" in output
        assert "results: embedded, Celery's file backend" in output
        endpoint = demo.wait_for(r"embedded moto server at (http://\S+),")
        item = demo.save_and_wait()
        assert item["backup"]["state"] == "done", demo.output()
        s3 = boto3.client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id="demo",
            aws_secret_access_key="demo",
            region_name="us-east-1",
        )
        key = f"service-a/items/{item['id']}.json"
        stored = s3.get_object(Bucket="celerybridge-demo", Key=key)
        assert b'"name":"demo"' in stored["Body"].read()
    assert "demo | s3 stopped" in demo.output()


def test_demo_uses_the_configured_broker_and_s3(
    tmp_path: Path, broker: str, moto_server: MotoServer, bucket: str, s3: Any
) -> None:
    config = {
        "CELERYBRIDGE_BROKER_URL": BROKERS[broker],
        "CELERYBRIDGE_RESULT_BACKEND": RESULT_BACKEND,
        "AWS_ENDPOINT_URL_S3": moto_server.url,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "PUSHER_BUCKET": bucket,
    }
    with run_demo(tmp_path, **config) as demo:
        assert "embedded" not in demo.output()
        assert f"S3: {moto_server.url}, bucket {bucket!r}" in demo.output()
        item = demo.save_and_wait()
        assert item["backup"]["state"] == "done", demo.output()
        key = f"service-a/items/{item['id']}.json"
        assert b'"name":"demo"' in s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    assert "demo | s3" not in demo.output()
