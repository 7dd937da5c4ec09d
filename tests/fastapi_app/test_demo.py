"""The one-command demo, run as a user runs it: no broker, no S3 configured, then Ctrl-C."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
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


QUICKSTART = ROOT / "docs" / "quickstart.md"
VARYING = frozenset({"task_id", "etag", "checksum_sha256", "created_at"})
"""What differs from run to run in the quickstart's samples."""


def quickstart_json() -> list[Any]:
    """Each line of the quickstart's ```json blocks, parsed."""
    blocks = re.findall(r"^```json\n(.*?)^```", QUICKSTART.read_text(), re.M | re.S)
    return [json.loads(line) for block in blocks for line in block.splitlines()]


def comparable(value: Any) -> Any:
    """``value`` with what varies from run to run blanked out."""
    if isinstance(value, dict):
        return {k: "..." if k in VARYING and v else comparable(v) for k, v in value.items()}
    return value


def check_the_quickstart_samples(demo: Demo) -> None:
    """The quickstart's first item, saved as it says: the samples are what the API answers."""
    samples = quickstart_json()
    answered = httpx.post(f"{demo.url_a}/items", json={"name": "bolts", "quantity": 40}).json()
    assert comparable(answered) == comparable(samples[0])
    url = f"{demo.url_a}/items/{answered['id']}/backup"
    pending, done = samples[1], samples[2]
    assert comparable(pending) == comparable({**answered["backup"], "state": "pending"})
    deadline = time.monotonic() + 30
    while (backup := httpx.get(url).json())["state"] == "pending" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert comparable(backup) == comparable(done), demo.output()
    assert done["receipt"]["written"] is True


def _deafen() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})


def _signal_masks(pid: int) -> str:
    """A process's blocked, ignored and caught signals, as /proc shows them."""
    try:
        status = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return "?"
    return " ".join(line for line in status if line.startswith(("SigBlk", "SigIgn", "SigCgt")))


@contextmanager
def run_demo(
    tmp_path: Path, python: str = sys.executable, *, deaf: bool = False, **config: str
) -> Iterator[Demo]:
    """``python -m examples.fastapi_app`` with only ``config`` set; SIGINT it on exit.
    ``deaf``: started with SIGINT and SIGTERM ignored and blocked, as a shell's background
    job or a careless process manager would start it."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("CELERYBRIDGE_", "AWS_", "PUSHER_", "SERVICE_", "DEMO_"))
    }
    env.update(config)
    port_a, port_b = free_port(), free_port()
    command = [python, "-m", "examples.fastapi_app", "--data", str(tmp_path / "data")]
    log = tmp_path / "demo.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [*command, "--port-a", str(port_a), "--port-b", str(port_b)],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=_deafen if deaf else None,
        )
    demo = Demo(process, log, f"http://127.0.0.1:{port_a}")
    children: list[psutil.Process] = []
    try:
        demo.wait_for(r"(Press CTRL\+C to stop)")
        children = psutil.Process(process.pid).children(recursive=True)
        assert len(children) >= 3  # the pusher, two services (and S3 when embedded)
        for url, name in ((demo.url_a, "service-a"), (f"http://127.0.0.1:{port_b}", "service-b")):
            assert httpx.get(f"{url}/healthz").json() == {"service": name}
        yield demo
        process.send_signal(signal.SIGINT)
        try:
            assert process.wait(30) == 0, demo.output()
        except subprocess.TimeoutExpired:
            masks = _signal_masks(process.pid) + " / this process: " + _signal_masks(os.getpid())
            pytest.fail(f"the demo did not stop within 30 s of SIGINT ({masks}):\n{demo.output()}")
    finally:
        if process.poll() is None:  # a failed test: the demo still stops its children
            children = children or psutil.Process(process.pid).children(recursive=True)
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        left = [child for child in children if alive(child)]
        for child in left:  # never leave a pusher consuming a shared broker's queue
            child.kill()
    assert [child.pid for child in left] == []
    for name in ("service-a", "service-b", "pusher"):
        assert f"demo | {name} stopped" in demo.output()


def test_demo_runs_embedded_lands_an_item_in_s3_and_stops_every_child(tmp_path: Path) -> None:
    # Started deaf to SIGINT: Ctrl-C stops it all the same.
    with run_demo(tmp_path, deaf=True) as demo:
        output = demo.output()
        assert "broker: embedded, kombu's filesystem transport" in output
        assert "results: embedded, Celery's file backend" in output
        endpoint = demo.wait_for(r"embedded moto server at (http://\S+),")
        check_the_quickstart_samples(demo)
        item = demo.save_and_wait()
        assert item["backup"]["state"] == "done", demo.output()
        # What is ours to silence is silent (docs/quickstart.md explains what is left).
        assert "No hostname was supplied" not in demo.output()
        assert "This is a development server" not in demo.output()
        root = os.geteuid() == 0
        assert ("running as root: the pusher's Celery will warn" in demo.output()) is root
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


def requirement_names(extra: str) -> set[str]:
    """The packages ``extra`` names in pyproject.toml (not the extras it includes)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = (
        re.split(r"[\s\[<>=!~;]", r, maxsplit=1)[0] for r in project["optional-dependencies"][extra]
    )
    return {canonical(name) for name in names if name != "celerybridge"}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@pytest.mark.timeout(900)
def test_the_demo_venv_gets_the_demo_extra_only_and_runs_the_demo(tmp_path: Path) -> None:
    # What ./scripts/demo sets up, in a folder of our own: a fresh venv from the index.
    dev_only = requirement_names("dev") - requirement_names("demo")
    assert {"playwright", "mypy", "hypothesis", "matplotlib", "mkdocs-material"} <= dev_only
    venv = tmp_path / "venv"
    try:
        subprocess.run(
            [str(ROOT / "scripts" / "venv"), "--demo"],
            env={**os.environ, "CELERYBRIDGE_VENV": str(venv)},
            check=True,
            capture_output=True,
            timeout=800,
        )
        listed = subprocess.run(
            [str(venv / "bin" / "python"), "-m", "pip", "list", "--format=json"],
            check=True,
            capture_output=True,
            text=True,
        )
        installed = {canonical(package["name"]) for package in json.loads(listed.stdout)}
        assert {"celerybridge", "fastapi", "uvicorn", "moto", "aiobotocore"} <= installed
        assert sorted(installed & dev_only) == []
        with run_demo(tmp_path, python=str(venv / "bin" / "python")) as demo:
            assert demo.save_and_wait()["backup"]["state"] == "done", demo.output()
    finally:
        shutil.rmtree(venv, ignore_errors=True)  # some 400 MB
