"""A small fault proxy in front of moto's S3 server.

Plain TCP forwarding, one thread per connection. Each upload request (``PUT`` or
``POST``) may be held back by ``latency`` seconds and, with probability ``rate``, meet
one of the faults S3 and networks produce instead of reaching S3:

- ``503`` SlowDown and ``500`` InternalError answers (then the connection closes);
- a connection reset (RST) before any answer;
- a slow answer (held ``slow`` seconds, then forwarded);
- a hang: no answer at all until the client gives up.

Keys under a prefix in ``doomed`` always get a 503: retrying cannot help them.
"""

from __future__ import annotations

import random
import re
import socket
import struct
import threading
import time
from collections import Counter
from contextlib import suppress

from ..pusher._s3server import free_port

_REQUEST_LINE = re.compile(rb"^(PUT|POST) /[^/ ]+/([^ ?]+)")
FAULTS = ("503", "500", "reset", "slow", "hang")


def _error(status: int, reason: str, code: str) -> bytes:
    body = (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
        f"<Message>injected by the fault proxy</Message></Error>"
    ).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/xml\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    return head + body


_ANSWERS = {
    "503": _error(503, "Slow Down", "SlowDown"),
    "500": _error(500, "Internal Server Error", "InternalError"),
}


class FaultProxy:
    """Forwards to ``127.0.0.1:target_port``, injecting faults into uploads."""

    def __init__(
        self,
        target_port: int,
        *,
        rate: float = 0.0,
        latency: float = 0.0,
        slow: float = 1.0,
        seed: int = 0,
        doomed: tuple[str, ...] = (),
    ) -> None:
        self.target_port = target_port
        self.rate, self.latency, self.slow, self.doomed = rate, latency, slow, doomed
        self.rng = random.Random(seed)
        self.injected: Counter[str] = Counter()
        self.uploads = 0
        self.port = free_port()
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._server = socket.create_server(("127.0.0.1", self.port), backlog=256)
        self._sockets: set[socket.socket] = set()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _pick(self, key: str) -> str | None:
        with self._lock:
            self.uploads += 1
            if key.startswith(self.doomed) and self.doomed:
                fault: str | None = "503"
            elif self.rng.random() < self.rate:
                fault = self.rng.choice(FAULTS)
            else:
                fault = None
            if fault is not None:
                self.injected[fault] += 1
            return fault

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
                    fault = self._pick(match.group(2).decode())
                    if self.latency:
                        time.sleep(self.latency)
                    if fault in _ANSWERS:
                        source.sendall(_ANSWERS[fault])
                        return
                    if fault == "reset":
                        # SO_LINGER 0: close sends RST, as a dropped connection does.
                        source.setsockopt(
                            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                        )
                        reset = True
                        return
                    if fault == "hang":
                        self._closed.wait()
                        return
                    if fault == "slow":
                        time.sleep(self.slow)
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
