"""Real ``celery worker`` processes for integration tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Worker:
    """A ``celery -A module worker -Q queue`` process and its log."""

    module: str
    broker_url: str
    result_backend: str
    pool: str | None = "threads"
    """``None``: no pool flags, the app's own configuration decides (as the seed runs it)."""
    concurrency: int | None = 4
    """With ``pool``: ``--concurrency``; ``None``: the app's own (the pusher's setting)."""
    queue: str = field(default_factory=lambda: f"cb-test-{uuid.uuid4().hex[:10]}")
    extra_env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    def start(self, log_dir: Path, timeout: float = 60.0, *, wait: bool = True) -> Worker:
        self.log_path = log_dir / f"{self.queue}.log"
        env = {
            **os.environ,
            "CELERYBRIDGE_BROKER_URL": self.broker_url,
            "CELERYBRIDGE_RESULT_BACKEND": self.result_backend,
            "PYTHONPATH": str(ROOT),
            **self.extra_env,
        }
        command = [
            sys.executable, "-m", "celery", "-A", self.module, "worker",
            # A node name of its own: two workers on one queue (or a leftover of an
            # interrupted run) must not clash on RabbitMQ's exclusive pidbox queue.
            "-Q", self.queue, "-n", f"{self.queue}-{uuid.uuid4().hex[:6]}@%h",
            "--without-gossip", "--without-mingle", "--without-heartbeat",
            "--loglevel=info",
        ]  # fmt: skip
        if self.pool is not None:
            command.append(f"--pool={self.pool}")
            if self.concurrency is not None:
                command.append(f"--concurrency={self.concurrency}")
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout
        while wait and " ready." not in self.log():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"worker did not start:\n{self.log()}")
            time.sleep(0.05)
        return self

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def kill(self) -> None:
        """SIGKILL the whole worker: no shutdown, no acknowledgements."""
        assert self.process is not None
        self.process.kill()
        self.process.wait()

    def terminate(self) -> None:
        """Ask the worker to shut down (SIGTERM) without waiting: :meth:`stop` waits."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 15.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def stop_all(workers: Iterable[Worker]) -> None:
    """Stop ``workers`` side by side: each takes up to a dozen seconds to shut down."""
    workers = list(workers)
    for worker in workers:
        worker.terminate()
    for worker in workers:
        worker.stop()
