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
import socket
import struct
import threading
import time
from collections import Counter

from ..pusher._s3server import TcpProxy, Verdict, s3_error

FAULTS = ("503", "500", "reset", "slow", "hang")
_INJECTED = "injected by the fault proxy"
_ANSWERS = {
    "503": s3_error(503, "Slow Down", "SlowDown", _INJECTED),
    "500": s3_error(500, "Internal Server Error", "InternalError", _INJECTED),
}


class FaultProxy(TcpProxy):
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
        super().__init__(target_port)
        self.rate, self.latency, self.slow, self.doomed = rate, latency, slow, doomed
        self.seed = seed
        self.rng = random.Random(seed)
        self.injected: Counter[str] = Counter()
        self.uploads = 0
        self._lock = threading.Lock()

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

    def on_request(self, path: str, client: socket.socket) -> Verdict:
        _bucket, _, key = path[1:].partition("/")
        if not key:  # a bucket request, not an upload
            return "forward"
        fault = self._pick(key)
        if self.latency:
            time.sleep(self.latency)
        if fault in _ANSWERS:
            client.sendall(_ANSWERS[fault])
            return "close"
        if fault == "reset":
            # SO_LINGER 0: close sends RST, as a dropped connection does.
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return "reset"
        if fault == "hang":
            self._closed.wait()
            return "close"
        if fault == "slow":
            time.sleep(self.slow)
        return "forward"
