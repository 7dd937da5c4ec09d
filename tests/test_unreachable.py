"""A broker that refuses connections, or accepts them and never answers: a typed error
within the publish timeout, never a hang."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import anyio
import pytest

from celerybridge import Bridge, DelegationError, PublishTimeoutError

from .pusher._s3server import free_port
from .workers import bindings

URLS = {"redis": "redis://127.0.0.1:{port}/0", "amqp": "amqp://guest:guest@127.0.0.1:{port}//"}


@pytest.fixture
def black_hole() -> Iterator[int]:
    """A port that accepts connections and never sends a byte."""
    server = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                held.append(server.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    yield server.getsockname()[1]
    server.shutdown(socket.SHUT_RDWR)  # wakes accept(); close() alone does not
    server.close()
    for connection in held:
        connection.close()


@pytest.mark.parametrize("scheme", sorted(URLS))
async def test_refused_connection_is_a_delegation_error_in_time(scheme: str) -> None:
    url = URLS[scheme].format(port=free_port())  # nobody listens there
    started = time.monotonic()
    with anyio.fail_after(10):
        async with Bridge(broker_url=url, publish_timeout=2) as bridge:
            with pytest.raises(DelegationError) as caught:
                await bridge.send(bindings.add, (1, 2), {})
    assert time.monotonic() - started < 4
    assert "calc.add" in str(caught.value)


@pytest.mark.parametrize("scheme", sorted(URLS))
async def test_black_holed_broker_is_a_publish_timeout(scheme: str, black_hole: int) -> None:
    url = URLS[scheme].format(port=black_hole)
    started = time.monotonic()
    with anyio.fail_after(10):
        async with Bridge(broker_url=url, publish_timeout=1) as bridge:
            with pytest.raises(PublishTimeoutError) as caught:
                await bridge.send(bindings.add, (1, 2), {})
    assert time.monotonic() - started < 8  # includes closing the bridge
    assert isinstance(caught.value, TimeoutError)
    message = str(caught.value)
    assert message.startswith("the broker did not accept task 'calc.add' v1 (")
    assert message.endswith("within 1 s; it may or may not have been delivered")
