"""moto's standalone S3 server as a process, and a delay proxy to put in front of it."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from contextlib import suppress
from dataclasses import dataclass, field

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
_SLOW_DOWN_BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)
_SLOW_DOWN = (
    b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\n"
    b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(_SLOW_DOWN_BODY)
) + _SLOW_DOWN_BODY


class DelayProxy:
    """A TCP proxy that can hold requests back or throttle them, and counts uploads by path.

    With ``delay`` set, each request waits that long before it is forwarded, so a test
    can act (kill a worker) while an upload is certainly in progress.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.delay = 0.0
        self.slow_downs = 0
        """How many of the next uploads get S3's ``503 SlowDown`` instead of reaching S3."""
        self.uploads: Counter[str] = Counter()
        self.upload_seen = threading.Event()
        self._server = socket.create_server(("127.0.0.1", self.port))
        self._sockets: set[socket.socket] = set()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        upstream = socket.create_connection(("127.0.0.1", self.target_port))
        self._sockets |= {client, upstream}
        threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()
        self._pipe(client, upstream, True)

    def _pipe(self, source: socket.socket, sink: socket.socket, inspect: bool) -> None:
        try:
            while data := source.recv(65536):
                match = _REQUEST_LINE.match(data) if inspect else None
                if match:
                    self.uploads[match.group(2).decode()] += 1
                    self.upload_seen.set()
                    if self.slow_downs > 0:
                        self.slow_downs -= 1
                        source.sendall(_SLOW_DOWN)
                        return
                    time.sleep(self.delay)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
                self._sockets.discard(sock)

    def close(self) -> None:
        self._server.close()
        for sock in list(self._sockets):
            sock.close()
