"""An in-process TCP proxy in front of a broker on loopback: delay, count, cut.

Runs on the test's own event loop. Each connection copies client to server as it reads,
and server to client through ``replies``: a hook that sees each chunk of the server's
bytes and says how much of it to forward, after how long, and whether to cut the
connection (both ways) after that. The default forwards everything at once.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

Decision = tuple[int, bool]
"""(bytes of the chunk to forward, cut the connection after them)."""


@dataclass
class Proxy:
    """Counts what it saw; ``replies(index, chunk)`` decides for each server chunk of
    the connection ``index`` (0 for the first connection)."""

    target: tuple[str, int]
    delay: float = 0.0
    """Seconds each chunk is held back, each way (a round trip takes twice as long)."""
    replies: Callable[[int, bytes], Decision] | None = None
    connections: int = 0
    cut: int = 0
    """Connections the proxy cut."""
    _writers: list[asyncio.StreamWriter] = field(default_factory=list)
    _handlers: set[asyncio.Task[Any]] = field(default_factory=set)

    async def handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        index = self.connections
        self.connections += 1
        self._handlers.add(asyncio.current_task())  # type: ignore[arg-type]
        server_r, server_w = await asyncio.open_connection(*self.target)
        self._writers += [client_w, server_w]

        def close() -> None:
            for writer in (client_w, server_w):
                writer.close()

        async def up() -> None:
            with contextlib.suppress(OSError):
                while data := await client_r.read(65536):
                    await self._pause()
                    server_w.write(data)
            close()

        async def down() -> None:
            with contextlib.suppress(OSError):
                while data := await server_r.read(65536):
                    size, cut = (
                        (len(data), False) if self.replies is None else self.replies(index, data)
                    )
                    await self._pause()
                    client_w.write(data[:size])
                    if cut:
                        await client_w.drain()
                        self.cut += 1
                        break
            close()

        await asyncio.gather(up(), down())

    async def _pause(self) -> None:
        if self.delay:
            await asyncio.sleep(self.delay)


@contextlib.asynccontextmanager
async def proxy(url: str, **options: object) -> AsyncIterator[tuple[str, Proxy]]:
    """``url`` (a broker on loopback) through a :class:`Proxy` built with ``options``."""
    parts = urlsplit(url)
    default = 6379 if parts.scheme.startswith("redis") else 5672
    state = Proxy((parts.hostname or "127.0.0.1", parts.port or default), **options)  # type: ignore[arg-type]
    server = await asyncio.start_server(state.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    auth = parts.netloc.rpartition("@")[0]
    netloc = f"{auth}@127.0.0.1:{port}" if auth else f"127.0.0.1:{port}"
    try:
        yield urlunsplit(parts._replace(netloc=netloc)), state
    finally:
        server.close()
        for writer in state._writers:
            writer.close()
        if state._handlers:  # their reads end with the connections
            await asyncio.wait(state._handlers, timeout=5)
        await server.wait_closed()


def cut_after_replies(replies: int, *, then: int = 0) -> Callable[[int, bytes], Decision]:
    """A ``replies`` hook for Redis: the first connection forwards ``replies`` integer
    replies (``:1\\r\\n``: an ``SADD`` or ``LPUSH`` answered; the ``+OK`` of the
    client's connection setup is not counted) and is cut; every later one forwards
    ``then``."""
    seen: dict[int, int] = {}

    def decide(index: int, chunk: bytes) -> Decision:
        # The connection's setup (HELLO's map holds integers too) is answered one reply
        # per chunk: counting starts with the first chunk of integer replies.
        if index not in seen and not chunk.startswith(b":"):
            return len(chunk), False
        allowed = replies if index == 0 else then
        done = seen.get(index, 0)
        position = 0
        while True:
            end = chunk.find(b"\r\n", position)
            if end < 0:
                seen[index] = done
                return len(chunk), False
            if chunk.startswith(b":", position):
                if done == allowed:
                    return position, True
                done += 1
            position = end + 2

    return decide
