"""A kombu connection on the reliable Redis transport, and a queue of the test's own."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import kombu
import pytest
import redis

from ..._brokers import BROKERS

TRANSPORT = "celerybridge._worker.redis_transport:Transport"
URL = BROKERS["redis"]


@pytest.fixture
def queue() -> Iterator[str]:
    """A queue name of the test's own; its lists and dead letters are deleted after."""
    name = f"cb-take-{uuid.uuid4().hex[:10]}"
    yield name
    with redis.Redis.from_url(URL) as client:
        keys = client.keys(f"*{name}*")
        if keys:
            client.delete(*keys)


@pytest.fixture
def raw() -> Iterator[redis.Redis]:
    """A plain redis-py client on the test broker."""
    with redis.Redis.from_url(URL) as client:
        yield client


def reliable(url: str = URL, **options: Any) -> kombu.Connection:
    """A connection on the reliable transport (not yet connected)."""
    return kombu.Connection(url, transport=TRANSPORT, transport_options=options)
