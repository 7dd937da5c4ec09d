"""What ``bench.pusher`` runs its measurements on: moto's S3 server, a delay proxy in
front of it, and ``celery worker`` subprocesses."""

from __future__ import annotations

import asyncio
import functools
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass

from ._common import ROOT, delete_queue, free_port, log_dir
from ._proxy import forward


def stop_process(process: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    """SIGTERM, wait, then SIGKILL the process group (prefork children included)."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            with suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    with suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)  # children left behind by a dead parent


@contextmanager
def moto_server() -> Iterator[str]:
    """moto's standalone server on a free port; yields its URL once it answers."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = (log_dir() / "moto.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(url, timeout=1).close()
                break
            except (urllib.error.URLError, OSError):
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto server did not start, see {log.name}") from None
                time.sleep(0.1)
        yield url
    finally:
        stop_process(process)
        log.close()


HTTP_METHODS = (b"GET ", b"PUT ", b"POST ", b"HEAD ", b"DELETE ")


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    """Copy ``reader`` to ``writer``, sleeping ``delay`` s before each chunk that starts
    an HTTP request (per request, so keep-alive connections are delayed every time)."""
    try:
        while data := await reader.read(65536):
            if delay and data.startswith(HTTP_METHODS):
                await asyncio.sleep(delay)
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()


def serve_delay_proxy(listener: socket.socket, target_port: int, delay: float) -> None:
    """Forward connections on ``listener`` to ``127.0.0.1:target_port`` (runs forever),
    each HTTP request ``delay`` s late."""
    forward(
        listener,
        target_port,
        functools.partial(_pipe, delay=delay),
        functools.partial(_pipe, delay=0),
    )


@contextmanager
def delay_proxy(target: str, latency_ms: int) -> Iterator[str]:
    """Yields an endpoint that reaches ``target`` (``http://127.0.0.1:<port>``) with
    ``latency_ms`` added to every HTTP request; ``target`` itself when it is 0.

    The proxy runs in a process of its own, so it competes for the GIL with nothing
    it measures; the listening socket is bound here, so it accepts from the start."""
    if latency_ms <= 0:
        yield target
        return
    listener = socket.create_server(("127.0.0.1", 0), backlog=1024)
    port = listener.getsockname()[1]
    target_port = int(target.rsplit(":", 1)[1])
    process = multiprocessing.get_context("fork").Process(
        target=serve_delay_proxy,
        args=(listener, target_port, latency_ms / 1000),
        name="s3-delay-proxy",
        daemon=True,
    )
    process.start()
    listener.close()  # the proxy process holds its own copy
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.join(5)


@dataclass
class Worker:
    """A ``celery -A <app> worker -Q <queue>`` subprocess and its log file."""

    app: str
    broker_url: str
    env: dict[str, str]
    pool_args: tuple[str, ...] = ()
    """Empty: the app's own pool settings (the pusher's threads, Celery's prefork)."""

    pid: int = 0
    """The worker's process id while it runs."""

    def __post_init__(self) -> None:
        self.queue = f"cb-bench-{self.app.replace('.', '-')}-{uuid.uuid4().hex[:8]}"
        self.log_path = log_dir() / f"{self.queue}.log"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    @contextmanager
    def running(self, timeout: float = 60.0) -> Iterator[Worker]:
        command = [
            sys.executable, "-m", "celery", "-A", self.app, "worker",
            "-Q", self.queue, "-n", f"{self.queue}@%h", "--loglevel=info",
            "--without-gossip", "--without-mingle", "--without-heartbeat",
            *self.pool_args,
        ]  # fmt: skip
        env = {
            **os.environ,
            **self.env,
            "CELERYBRIDGE_BROKER_URL": self.broker_url,
            "PYTHONPATH": str(ROOT),
        }
        with self.log_path.open("wb") as log:
            process = subprocess.Popen(
                command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        try:
            deadline = time.monotonic() + timeout
            while " ready." not in self.log():
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{self.app} worker did not start:\n{self.log()}")
                time.sleep(0.05)
            self.pid = process.pid
            yield self
        finally:
            stop_process(process)
            delete_queue(self.broker_url, self.queue)
