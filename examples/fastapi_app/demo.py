"""The whole demo in one command: S3, the pusher worker and both services.

With nothing configured it needs no server: kombu's filesystem transport is the
broker, Celery's file backend stores results, and moto's S3 server runs on a free
port with the bucket created. ``CELERYBRIDGE_BROKER_URL`` / ``CELERYBRIDGE_RESULT_BACKEND``
and ``AWS_ENDPOINT_URL_S3`` (plus the usual AWS variables and ``PUSHER_BUCKET``) switch
to Redis, RabbitMQ, MinIO or real S3. Children's logs are shown with a name prefix,
as foreman and honcho do; Ctrl-C stops every child.

Before starting anything the demo makes sure the services' ports are free (a busy one
stops it at once, naming the option and variable that move it), and it calls a service
up only once its ``/healthz`` names it: another server on the port cannot pass for it.

Run: ``./scripts/demo`` (in a venv of its own, with the ``demo`` extra only) or
``python -m examples.fastapi_app``.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from contextlib import ExitStack, suppress
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import click

ROOT = Path(__file__).resolve().parents[2]
STOP_GRACE = 10.0
"""Seconds a child may take to stop after SIGTERM before it is killed."""
START_TIMEOUT = 60.0
COLOURS = ("cyan", "magenta", "yellow", "green", "blue")


class DemoError(click.ClickException):
    """The demo cannot start or a part of it died."""


@dataclass
class Child:
    """A child process whose output is shown line by line with its name in front."""

    name: str
    command: list[str]
    env: dict[str, str]
    colour: str
    ready: threading.Event = field(default_factory=threading.Event)
    ready_line: str | None = None
    """A line of output that means the child is up (else: ready when started)."""
    process: subprocess.Popen[str] | None = None

    def start(self) -> None:
        # A session of its own: the terminal's Ctrl-C reaches the demo alone, which then
        # stops the children in order; killpg also reaches anything they started.
        self.process = subprocess.Popen(
            self.command,
            cwd=ROOT,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            start_new_session=True,
        )
        echo(f"{self.name} started (pid {self.process.pid})")
        if self.ready_line is None:
            self.ready.set()
        threading.Thread(target=self._relay, daemon=True).start()

    def _relay(self) -> None:
        assert self.process is not None
        assert self.process.stdout is not None
        prefix = click.style(f"{self.name:>9} | ", fg=self.colour)
        for line in self.process.stdout:
            click.echo(prefix + line.rstrip("\n"))
            if self.ready_line is not None and self.ready_line in line:
                self.ready.set()

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        """SIGTERM (a warm shutdown for Celery, graceful for uvicorn), then SIGKILL."""
        if self.process is None:
            return
        if self.alive:
            with suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(STOP_GRACE)
            except subprocess.TimeoutExpired:
                echo(f"{self.name} did not stop within {STOP_GRACE:g} s: killing it")
        with suppress(ProcessLookupError):  # anything left in its session
            os.killpg(self.process.pid, signal.SIGKILL)
        code = self.process.wait()
        echo(f"{self.name} stopped" + ("" if code in (0, -signal.SIGTERM) else f" ({code})"))


def echo(message: str) -> None:
    click.echo(click.style("     demo | ", fg="white", bold=True) + message)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(what: str, check: Callable[[], bool], children: list[Child]) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while not check():
        dead = [c.name for c in children if c.process is not None and not c.alive]
        if dead:
            raise DemoError(f"{', '.join(dead)} exited while waiting for {what}")
        if time.monotonic() > deadline:
            raise DemoError(f"timed out waiting for {what}")
        time.sleep(0.1)


_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))
"""Straight to loopback, whatever ``http_proxy`` says."""


def get_json(url: str) -> object:
    """The JSON ``url`` answers with a 200, or ``None`` (no answer, an error, not JSON)."""
    try:
        with _DIRECT.open(url, timeout=1) as response:
            return json.load(response) if response.status == 200 else None
    except (OSError, ValueError):  # URLError and HTTPError are OSErrors
        return None


def is_service(url: str, name: str) -> bool:
    """Whether ``url`` is our service ``name``: only it answers ``/healthz`` with its name."""
    return get_json(f"{url}/healthz") == {"service": name}


def is_moto(url: str) -> bool:
    """Whether ``url`` is moto's server (its own API, not S3's, answers there)."""
    return isinstance(get_json(f"{url}/moto-api/data.json"), dict)


@dataclass(frozen=True)
class Port:
    """A port the demo listens on, and how a user moves it."""

    service: str
    number: int
    option: str
    variable: str


def port_problem(port: Port) -> str | None:
    """Why the service cannot listen on ``port`` (as uvicorn will: 127.0.0.1, SO_REUSEADDR)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port.number))
        except OSError as exc:
            in_use = exc.errno == errno.EADDRINUSE
            why = "is in use by another program" if in_use else f"cannot be used: {exc}"
            return (
                f"port {port.number} ({port.service}) {why}; stop that program or move "
                f"{port.service} to a free port with {port.option} or {port.variable}, e.g. "
                f"{port.variable}={port.number + 1000} ./scripts/demo"
            )
    return None


def check_ports(ports: list[Port]) -> None:
    """Refuse to start, before starting anything, when a service could not listen."""
    if ports[0].number == ports[1].number:
        raise DemoError(
            f"{ports[0].service} and {ports[1].service} cannot share port {ports[0].number}"
        )
    problems = [problem for port in ports if (problem := port_problem(port))]
    if problems:
        raise DemoError("\n".join(problems))


def create_bucket(endpoint: str, bucket: str, env: dict[str, str]) -> None:
    import boto3  # type: ignore[import-untyped]  # moto[server] brings it

    s3 = boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_DEFAULT_REGION"],
    )
    s3.create_bucket(Bucket=bucket)


@click.command()
@click.option(
    "--port-a", default=8001, show_default=True, envvar="DEMO_PORT_A", help="Service A's port."
)
@click.option(
    "--port-b", default=8002, show_default=True, envvar="DEMO_PORT_B", help="Service B's port."
)
@click.option(
    "--data",
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder for the embedded broker, results and databases (default: a temporary one).",
)
def main(port_a: int, port_b: int, data: Path | None) -> None:
    """Run the pusher and Services A and B; Ctrl-C stops them all."""
    check_ports(
        [
            Port("Service A", port_a, "--port-a", "DEMO_PORT_A"),
            Port("Service B", port_b, "--port-b", "DEMO_PORT_B"),
        ]
    )
    # Ctrl-C and SIGTERM stop the demo however it was started: a process launched with
    # SIGINT ignored (a shell's background job, some process managers) or blocked would
    # otherwise never hear them.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)  # stop on SIGTERM as on Ctrl-C
    children: list[Child] = []
    with ExitStack() as stack:
        if data is None:
            data = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="cb-demo-")))
        data = data.resolve()
        data.mkdir(parents=True, exist_ok=True)
        stack.callback(_stop_all, children)
        try:
            _run(dict(os.environ, PYTHONUNBUFFERED="1"), data, port_a, port_b, children)
        except KeyboardInterrupt:
            echo("stopping: the services first, then the pusher, then S3")
        except DemoError as exc:  # said first, not only after every child's "stopped" line
            echo(click.style(f"error: {exc.message}", fg="red", bold=True))
            raise


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _stop_all(children: list[Child]) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut this short
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    for child in reversed(children):
        child.stop()


def _run(env: dict[str, str], data: Path, port_a: int, port_b: int, children: list[Child]) -> None:
    def spawn(name: str, command: list[str], ready_line: str | None = None) -> Child:
        child = Child(name, command, env, COLOURS[len(children) % len(COLOURS)])
        child.ready_line = ready_line
        children.append(child)
        child.start()
        return child

    if "CELERYBRIDGE_BROKER_URL" not in env:
        env["CELERYBRIDGE_BROKER_URL"] = f"filesystem://{data / 'broker'}"
        echo(f"broker: embedded, kombu's filesystem transport in {data / 'broker'}")
    if "CELERYBRIDGE_RESULT_BACKEND" not in env:
        (data / "results").mkdir(exist_ok=True)
        env["CELERYBRIDGE_RESULT_BACKEND"] = f"file://{data / 'results'}"
        echo(f"results: embedded, Celery's file backend in {data / 'results'}")
    env.setdefault("PUSHER_BUCKET", "celerybridge-demo")
    for service in ("A", "B"):
        database = f"sqlite+aiosqlite:///{data}/service-{service.lower()}.db"
        env.setdefault(f"SERVICE_{service}_DATABASE_URL", database)

    if "AWS_ENDPOINT_URL_S3" not in env:
        port = free_port()
        endpoint = f"http://127.0.0.1:{port}"
        env.update(
            AWS_ENDPOINT_URL_S3=endpoint,
            AWS_ACCESS_KEY_ID="demo",  # moto takes any credentials
            AWS_SECRET_ACCESS_KEY="demo",
            AWS_DEFAULT_REGION="us-east-1",
        )
        s3server = [sys.executable, "-m", "examples.fastapi_app.s3server"]
        spawn("s3", [*s3server, "-H", "127.0.0.1", "-p", str(port)])
        wait_until("the embedded S3 server", lambda: is_moto(endpoint), children)
        create_bucket(endpoint, env["PUSHER_BUCKET"], env)
        echo(f"S3: embedded moto server at {endpoint}, bucket {env['PUSHER_BUCKET']!r} created")
    else:
        echo(f"S3: {env['AWS_ENDPOINT_URL_S3']}, bucket {env['PUSHER_BUCKET']!r}")

    if hasattr(os, "geteuid") and os.geteuid() == 0:
        echo(
            "running as root: the pusher's Celery will warn that this is not recommended; "
            "it is right (run the demo as a user), and the demo works all the same"
        )
    celery = [sys.executable, "-m", "celery", "-A", "pusher", "worker", "-Q", "pusher"]
    pusher = spawn("pusher", [*celery, "--loglevel=info"], ready_line=" ready.")
    urls = {}
    for name, port in (("service-a", port_a), ("service-b", port_b)):
        app = f"examples.fastapi_app.{name.replace('-', '_')}:app"
        spawn(name, [sys.executable, "-m", "uvicorn", app, "--port", str(port)])
        urls[name] = f"http://127.0.0.1:{port}"

    wait_until("the pusher worker", pusher.ready.is_set, children)
    for name, url in urls.items():
        wait_until(name, lambda url=url, name=name: is_service(url, name), children)  # type: ignore[misc]
    echo(click.style("the demo is up:", bold=True))
    echo(f"  Service A (pusher.send_to_s3 v1): {urls['service-a']}")
    echo(f"  Service B (pusher.send_to_s3 v2): {urls['service-b']}")
    echo("Press CTRL+C to stop")
    while True:
        time.sleep(0.2)
        dead = [c.name for c in children if not c.alive]
        if dead:
            raise DemoError(f"{dead[0]} exited unexpectedly; stopping the demo")


if __name__ == "__main__":
    main()
