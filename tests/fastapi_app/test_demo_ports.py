"""The demo refuses busy ports before it starts anything, and calls up only its own services.

No broker and no child process: these run with the unit tests.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from examples.fastapi_app.demo import is_service

from .._workers import ROOT
from ..pusher._s3server import free_port


def _handler(body: bytes) -> type[BaseHTTPRequestHandler]:
    class Answer(BaseHTTPRequestHandler):
        """Answers 200 with ``body`` to any GET, like a server that is not ours."""

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    return Answer


@contextmanager
def other_server(port: int, body: bytes = b"{}") -> Iterator[ThreadingHTTPServer | None]:
    """An HTTP server that is not ours on 127.0.0.1:``port``; ``None`` when something else
    holds the port already (the test's condition holds all the same)."""
    try:
        server = ThreadingHTTPServer(("127.0.0.1", port), _handler(body))
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise
        yield None
        return
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def run_demo(
    tmp_path: Path, *args: str, **env: str
) -> tuple[subprocess.CompletedProcess[str], float]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("DEMO_", "CELERYBRIDGE_"))}
    command = [sys.executable, "-m", "examples.fastapi_app", "--data", str(tmp_path / "data")]
    started = time.monotonic()
    done = subprocess.run(
        [*command, *args],
        cwd=ROOT,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    return done, time.monotonic() - started


def assert_nothing_started(done: subprocess.CompletedProcess[str], tmp_path: Path) -> None:
    output = done.stdout + done.stderr
    assert "started (pid" not in output, output  # every child is announced as it starts
    assert "the demo is up" not in output
    assert not (tmp_path / "data").exists()  # not even its folder


def test_port_8001_held_by_another_server_stops_the_demo_at_once(tmp_path: Path) -> None:
    with other_server(8001) as server:
        done, took = run_demo(tmp_path, "--port-b", str(free_port()))
        if server is not None:  # the other server is left alone
            assert server.socket.fileno() != -1
    assert done.returncode == 1
    assert took < 10
    assert done.stderr == (
        "Error: port 8001 (Service A) is in use by another program; stop that program or "
        "move Service A to a free port with --port-a or DEMO_PORT_A, e.g. "
        "DEMO_PORT_A=9001 ./scripts/demo\n"
    )
    assert_nothing_started(done, tmp_path)


def test_the_variable_named_moves_the_port(tmp_path: Path) -> None:
    busy = free_port()
    with other_server(busy):
        done, _ = run_demo(tmp_path, DEMO_PORT_A=str(free_port()), DEMO_PORT_B=str(busy))
    assert done.returncode == 1
    assert f"Error: port {busy} (Service B) is in use by another program" in done.stderr
    assert "--port-b or DEMO_PORT_B" in done.stderr
    assert_nothing_started(done, tmp_path)


def test_both_services_on_one_port_is_refused(tmp_path: Path) -> None:
    port = str(free_port())
    done, _ = run_demo(tmp_path, "--port-a", port, "--port-b", port)
    assert done.returncode == 1
    assert done.stderr == f"Error: Service A and Service B cannot share port {port}\n"
    assert_nothing_started(done, tmp_path)


@pytest.mark.parametrize(
    ("body", "ours"),
    [
        (b'{"service": "service-a"}', True),
        (b'{"service": "service-b"}', False),  # the other service
        (b"{}", False),  # any server that answers 200
        (b"<html>not json</html>", False),
    ],
)
def test_only_our_healthz_counts_as_up(body: bytes, ours: bool) -> None:
    port = free_port()
    with other_server(port, body) as server:
        assert server is not None
        assert is_service(f"http://127.0.0.1:{port}", "service-a") is ours


def test_no_server_is_not_up() -> None:
    assert is_service(f"http://127.0.0.1:{free_port()}", "service-a") is False
