"""Broker processes of a test's own, to stop and start again: never the machine's servers.

A fault case that restarts a broker cannot touch the shared Redis on 6379 or RabbitMQ
on 5672 (other tests, other people, use them). These are private servers on free
ports, with their data in the test's temporary folder, started again on the same data:

- :class:`PrivateRedis`: ``redis-server`` with ``--appendonly yes --appendfsync always``.
  ``always`` because ``everysec`` does not make an acknowledged write survive even a
  crash of the process alone: while a background fsync is slow, Redis postpones the
  AOF ``write()`` for up to 2 s but still answers clients, so the write sits in the
  process's memory, and a SIGKILL then loses writes their clients saw acknowledged.
  With ``always`` the write and its fsync precede the reply.
- :class:`PrivateRabbit`: a RabbitMQ node of its own (node name, AMQP and Erlang
  distribution ports, mnesia, logs, config, an empty plugins file, its own Erlang
  cookie), run in the foreground under our process, started again on the same mnesia
  folder so durable queues and persistent messages survive.

Each server runs in a process group of its own (``start_new_session``): ``stop``
signals that group, by its id, and waits for it, so nothing is left behind.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import time
from pathlib import Path

from ..pusher._s3server import free_port

HOST = "127.0.0.1"
RABBITMQ_SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"
"""The server script itself: ``/usr/sbin/rabbitmq-server`` would ``su`` to the
``rabbitmq`` user, and its processes would no longer be ours to signal."""


def _answers(port: int, hello: bytes, expect: bytes, timeout: float = 1.0) -> bool:
    """Whether the server on ``port`` answers ``hello`` with something starting ``expect``."""
    try:
        with socket.create_connection((HOST, port), timeout=timeout) as conn:
            conn.sendall(hello)
            return conn.recv(len(expect)) == expect
    except OSError:
        return False


class PrivateServer:
    """A server process of ours: start, kill, start again."""

    name = "server"
    start_timeout = 20.0

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.last_start_s = 0.0
        """Seconds the last ``start`` took, until the server answered."""

    @property
    def url(self) -> str:
        """How clients reach it."""
        raise NotImplementedError

    def command(self) -> list[str]:
        raise NotImplementedError

    def environment(self) -> dict[str, str]:
        return dict(os.environ)

    def ready(self) -> bool:
        raise NotImplementedError

    @property
    def log_path(self) -> Path:
        return self.folder / f"{self.name}.out"

    def start(self) -> None:
        assert not self.running, f"the private {self.name} is already running"
        began = time.monotonic()
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.command(),
                cwd=self.folder,
                env=self.environment(),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.starts += 1
        deadline = began + self.start_timeout
        while not self.ready():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the private {self.name} did not start:\n{self.log()}")
            time.sleep(0.05)
        self.last_start_s = time.monotonic() - began

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 30.0) -> None:
        """SIGKILL the server's whole process group (a crash), and wait until the port
        is free again."""
        process, self.process = self.process, None
        if process is None:
            return
        group = process.pid  # start_new_session: the group's id is the leader's pid
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)
        process.wait()
        deadline = time.monotonic() + timeout
        while _listening(self.port) and time.monotonic() < deadline:
            time.sleep(0.05)

    def restart(self, down: float) -> None:
        """Kill, stay down for ``down`` seconds, start again on the same data."""
        self.stop()
        time.sleep(down)
        self.start()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def _listening(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


class PrivateRedis(PrivateServer):
    """``redis-server`` on a free port, its append-only file in ``folder``."""

    name = "redis"

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def command(self) -> list[str]:
        return [
            "redis-server",
            "--bind", HOST, "--port", str(self.port),
            "--dir", str(self.folder),
            "--appendonly", "yes", "--appendfsync", "always",
            "--save", "",
            "--daemonize", "no",
            "--logfile", "",  # to stdout, that is our log file
        ]  # fmt: skip

    def ready(self) -> bool:
        # PING is refused with -LOADING while the AOF is replayed: wait for +PONG.
        return _answers(self.port, b"PING\r\n", b"+PONG")


class PrivateRabbit(PrivateServer):
    """A RabbitMQ node of our own, in ``folder``, on free ports.

    Starting one takes some 5-10 s on this machine (an Erlang VM and RabbitMQ's boot
    steps), starting it again after a crash about as long: ``last_start_s`` says.
    """

    name = "rabbitmq"
    start_timeout = 120.0

    def __init__(self, folder: Path) -> None:
        super().__init__(folder)
        self.dist_port = free_port()
        self.node = f"cbfaults-{secrets.token_hex(4)}@localhost"
        self.home = folder / "home"
        self.home.mkdir(exist_ok=True)
        cookie = self.home / ".erlang.cookie"
        cookie.write_text(secrets.token_hex(20))
        cookie.chmod(0o400)
        (folder / "rabbitmq.conf").write_text(
            f"listeners.tcp.1 = {HOST}:{self.port}\n"
            "loopback_users.guest = true\n"
            # Our tmp folder may sit on a disk with little room left: never block publishers.
            "disk_free_limit.absolute = 1\n"
        )
        (folder / "rabbitmq-env.conf").write_text("")
        (folder / "enabled_plugins").write_text("[].\n")

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@{HOST}:{self.port}//"

    def command(self) -> list[str]:
        return [RABBITMQ_SERVER]

    def environment(self) -> dict[str, str]:
        base = self.folder
        return {
            **os.environ,
            "HOME": str(self.home),
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": HOST,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(base / "log"),
            "RABBITMQ_CONFIG_FILE": str(base / "rabbitmq.conf"),
            "RABBITMQ_CONF_ENV_FILE": str(base / "rabbitmq-env.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(base / "enabled_plugins"),
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
            "ERL_EPMD_ADDRESS": HOST,
        }

    def ready(self) -> bool:
        # The AMQP listener opens at the end of the boot: a Connection.Start frame
        # (type 1) means the node takes connections.
        return _answers(self.port, b"AMQP\x00\x00\x09\x01", b"\x01")
