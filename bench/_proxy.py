"""A loopback TCP delay proxy for a broker: distance to Redis or RabbitMQ, on one machine.

``broker_proxy(url, latency_ms)`` yields the same broker URL with its port pointing at a
proxy that forwards every connection to the real broker and holds each chunk of bytes
back by half of ``latency_ms`` in each direction, so a request and its reply take
``latency_ms`` longer, as a broker that far away would. Unlike the pusher bench's S3
proxy (``bench._s3rig.delay_proxy``, which sleeps before each HTTP request), this one is
a delay line: a chunk's delay runs while later chunks are read, in order, so pipelined
commands and publisher confirms keep flowing; only the wait grows, not the cost.

It runs in a process of its own (``python -m bench._proxy``, handed the listening socket
bound here), so it competes for the GIL with nothing it measures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from urllib.parse import urlsplit, urlunsplit

from ._common import ROOT

CHUNK = 65536


async def delay_line(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float
) -> None:
    """Copy ``reader`` to ``writer``, each chunk ``delay`` s after it was read, in order."""
    loop = asyncio.get_running_loop()
    line: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def take() -> None:
        try:
            while data := await reader.read(CHUNK):
                line.put_nowait((loop.time() + delay, data))
        except OSError:
            pass
        finally:
            line.put_nowait((loop.time() + delay, b""))  # end of stream, also delayed

    taker = asyncio.create_task(take())
    try:
        while True:
            due, data = await line.get()
            if (wait := due - loop.time()) > 0:
                await asyncio.sleep(wait)
            if not data:
                break
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        taker.cancel()
        writer.close()


Pipe = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def forward(listener: socket.socket, target_port: int, upstream: Pipe, downstream: Pipe) -> None:
    """Forward connections on ``listener`` to ``127.0.0.1:target_port``, copying each way
    with its pipe (runs forever). The pusher bench's S3 proxy uses it too."""

    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            upstream_r, upstream_w = await asyncio.open_connection("127.0.0.1", target_port)
        except OSError:
            client_w.close()
            return
        await asyncio.gather(upstream(client_r, upstream_w), downstream(upstream_r, client_w))

    async def main() -> None:
        server = await asyncio.start_server(handle, sock=listener)
        await server.serve_forever()

    asyncio.run(main())


def serve(listener: socket.socket, target_port: int, delay: float) -> None:
    """The broker proxy: a delay line of ``delay`` s each way (runs forever)."""
    line = functools.partial(delay_line, delay=delay)
    forward(listener, target_port, line, line)


def with_port(url: str, port: int) -> str:
    """``url`` with its host:port replaced by ``127.0.0.1:<port>`` (credentials kept)."""
    parts = urlsplit(url)
    auth = parts.netloc.rpartition("@")[0]
    netloc = f"{auth}@127.0.0.1:{port}" if auth else f"127.0.0.1:{port}"
    return urlunsplit(parts._replace(netloc=netloc))


def default_port(url: str) -> int:
    parts = urlsplit(url)
    return parts.port or (6379 if parts.scheme.startswith("redis") else 5672)


@contextlib.contextmanager
def broker_proxy(url: str, latency_ms: float) -> Iterator[str]:
    """Yields ``url`` reached through a delay proxy adding ``latency_ms`` per round trip;
    ``url`` itself when it is 0. The broker must be on loopback."""
    if latency_ms <= 0:
        yield url
        return
    listener = socket.create_server(("127.0.0.1", 0), backlog=1024)
    port = listener.getsockname()[1]
    command = [
        sys.executable, "-m", "bench._proxy", "--fd", str(listener.fileno()),
        "--target-port", str(default_port(url)), "--delay-ms", str(latency_ms / 2),
    ]  # fmt: skip
    process = subprocess.Popen(command, cwd=ROOT, pass_fds=(listener.fileno(),))
    listener.close()  # the proxy process holds its own copy, listening from the start
    try:
        yield with_port(url, port)
    finally:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--fd", type=int, required=True, help="listening socket to serve")
    parser.add_argument("--target-port", type=int, required=True)
    parser.add_argument("--delay-ms", type=float, required=True, help="one way, per chunk")
    args = parser.parse_args()
    listener = socket.socket(fileno=args.fd)
    with contextlib.suppress(KeyboardInterrupt):
        serve(listener, args.target_port, args.delay_ms / 1000)


if __name__ == "__main__":
    main()
