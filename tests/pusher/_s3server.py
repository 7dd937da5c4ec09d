"""moto's standalone S3 server as a process, and proxies to put in front of it."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Literal

import boto3


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class MotoServer:
    """``python -m moto.server`` on a free loopback port."""

    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> MotoServer:
        command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]
        self.process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise RuntimeError("moto server did not start") from None
                time.sleep(0.1)

    def client(self) -> object:
        return boto3.client(
            "s3",
            endpoint_url=self.url,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        )

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)


_REQUEST_LINE = re.compile(rb"^(PUT|POST) (/[^ ?]+)")
Verdict = Literal["forward", "close", "reset"]


def s3_error(status: int, reason: str, code: str, message: str) -> bytes:
    """A whole S3 error answer that closes the connection."""
    body = (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
        f"<Message>{message}</Message></Error>"
    ).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/xml\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    return head + body


_SLOW_DOWN = s3_error(503, "Slow Down", "SlowDown", "Please reduce your request rate.")


class TcpProxy:
    """Plain TCP forwarding to ``127.0.0.1:target_port``, one thread per direction of
    each connection. Each upload request (``PUT`` or ``POST``) from a client goes
    through :meth:`on_request` first, which subclasses override."""

    def __init__(self, target_port: int, backlog: int = 256) -> None:
        self.target_port = target_port
        self.port = free_port()
        self._closed = threading.Event()
        self._server = socket.create_server(("127.0.0.1", self.port), backlog=backlog)
        self._sockets: set[socket.socket] = set()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def on_request(self, path: str, client: socket.socket) -> Verdict:
        """What becomes of an upload to ``path`` (``/bucket/key``): ``forward`` it, or
        ``close`` the connection (after answering on ``client``, or not), or ``reset`` it
        (``client`` set to send RST on close)."""
        return "forward"

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
        except OSError:
            client.close()
            return
        self._sockets |= {client, upstream}
        threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()
        self._pipe(client, upstream, True)

    def _pipe(self, source: socket.socket, sink: socket.socket, requests: bool) -> None:
        reset = False
        try:
            while data := source.recv(65536):
                match = _REQUEST_LINE.match(data) if requests else None
                if match:
                    verdict = self.on_request(match.group(2).decode(), source)
                    if verdict != "forward":
                        reset = verdict == "reset"
                        return
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                if not (reset and sock is source):  # a FIN first would spoil the RST
                    with suppress(OSError):  # wakes the other direction's recv
                        sock.shutdown(socket.SHUT_RDWR)
                sock.close()
                self._sockets.discard(sock)

    def close(self) -> None:
        self._closed.set()
        self._server.close()
        for sock in list(self._sockets):
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


class DelayProxy(TcpProxy):
    """A TCP proxy that can hold requests back or throttle them, and counts uploads by path.

    With ``delay`` set, each request waits that long before it is forwarded, so a test
    can act (kill a worker) while an upload is certainly in progress.
    """

    def __init__(self, target_port: int) -> None:
        super().__init__(target_port)
        self.delay = 0.0
        self.slow_downs = 0
        """How many of the next uploads get S3's ``503 SlowDown`` instead of reaching S3."""
        self.uploads: Counter[str] = Counter()
        self.upload_seen = threading.Event()
        self.held = 0
        """Uploads being held back now (``delay``)."""
        self.peak_held = 0
        """The most uploads held back at once so far."""
        self.on_peak: Callable[[int], None] = lambda held: None
        """Called with ``held`` each time a new peak is reached, while it is held."""
        self._lock = threading.Lock()

    def on_request(self, path: str, client: socket.socket) -> Verdict:
        self.uploads[path] += 1
        self.upload_seen.set()
        if self.slow_downs > 0:
            self.slow_downs -= 1
            client.sendall(_SLOW_DOWN)
            return "close"
        with self._lock:
            self.held += 1
            peak = self.held > self.peak_held
            if peak:
                self.peak_held = self.held
                self.on_peak(self.held)
        try:
            time.sleep(self.delay)
        finally:
            with self._lock:
                self.held -= 1
        return "forward"
