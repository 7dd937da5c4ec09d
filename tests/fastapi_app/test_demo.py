"""The one-command demo, run as a user runs it: no broker, no S3 configured, then Ctrl-C."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import boto3
import httpx
import pytest

from .._workers import ROOT
from ..pusher._s3server import free_port

pytestmark = pytest.mark.integration


def descendants(pid: int) -> set[int]:
    """Every process below ``pid``, read from /proc."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier}
        found |= frontier
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_for_line(log: Path, pattern: str, demo: subprocess.Popen[bytes], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while True:
        match = re.search(pattern, log.read_text(errors="replace"))
        if match:
            return match.group(1)
        if demo.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"no {pattern!r} in the demo's output:\n{log.read_text()}")
        time.sleep(0.1)


def test_demo_runs_embedded_lands_an_item_in_s3_and_stops_every_child(tmp_path: Path) -> None:
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("CELERYBRIDGE_", "AWS_", "PUSHER_", "SERVICE_"))
    }
    port_a, port_b = free_port(), free_port()
    log = tmp_path / "demo.log"
    command = [sys.executable, "-m", "examples.fastapi_app", "--port-a", str(port_a)]
    with log.open("wb") as out:
        demo = subprocess.Popen(
            [*command, "--port-b", str(port_b), "--data", str(tmp_path / "data")],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        endpoint = wait_for_line(log, r"embedded moto server at (http://\S+),", demo, 60)
        wait_for_line(log, r"(Press CTRL\+C to stop)", demo, 90)
        children = descendants(demo.pid)
        assert len(children) >= 4  # S3, the pusher, two services

        item = httpx.post(
            f"http://127.0.0.1:{port_a}/items", json={"name": "demo", "quantity": 1}
        ).json()
        deadline = time.monotonic() + 30
        while (backup := item["backup"])["state"] == "pending" and time.monotonic() < deadline:
            time.sleep(0.2)
            item = httpx.get(f"http://127.0.0.1:{port_a}/items/{item['id']}").json()
        assert backup["state"] == "done", log.read_text()

        s3 = boto3.client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id="demo",
            aws_secret_access_key="demo",
            region_name="us-east-1",
        )
        stored = s3.get_object(Bucket="celerybridge-demo", Key=f"service-a/items/{item['id']}.json")
        assert b'"name":"demo"' in stored["Body"].read()
        assert "broker: embedded, kombu's filesystem transport" in log.read_text()

        demo.send_signal(signal.SIGINT)
        assert demo.wait(30) == 0, log.read_text()
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
    assert [pid for pid in children if alive(pid)] == []
    output = log.read_text()
    for name in ("service-a", "service-b", "pusher", "s3"):
        assert f"demo | {name} stopped" in output
