# mypy: disable-error-code="empty-body"
"""The pusher's bindings: the contracts other services import (``pip install pusher-bindings``).

Nothing here runs a task. Each stub is the signature of a task the pusher implements, as in the
seed's ``bindings.py``, with types, a queue and a version.

Run it (``python docs/examples/bindings.py``) to check what the declarations mean.
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta

from pydantic import BaseModel

from celerybridge import ConfigurationError, RemoteTask, remote_task


# --8<-- [start:contracts]
class Receipt(BaseModel):
    """What the pusher returns once an object is stored."""

    key: str
    size: int


@remote_task(name="pusher.send_to_s3", queue="pusher", deprecated="use version 2")
def send_to_s3(key: str, content: str) -> Receipt:
    """Store ``content`` under ``key``."""
    ...


@remote_task(name="pusher.send_to_s3", queue="pusher", version=2, default=True)
def send_to_s3_v2(key: str, content: str, meta: dict[str, str]) -> Receipt:
    """Store ``content`` under ``key``, with metadata."""
    ...


@remote_task(name="pusher.purge", queue="pusher")
def purge(prefix: str, older_than: datetime, dry_run: bool = False) -> int:
    """Delete objects under ``prefix`` older than ``older_than``; return how many."""
    ...


# --8<-- [end:contracts]


async def main() -> None:
    # --8<-- [start:wire]
    # The seed's wire names: version 1 under the plain name, version n under name_vn.
    assert send_to_s3.wire_name == "pusher.send_to_s3"
    assert send_to_s3_v2.wire_name == "pusher.send_to_s3_v2"
    assert repr(send_to_s3_v2) == (
        "<RemoteTask 'pusher.send_to_s3' v2 wire='pusher.send_to_s3_v2' queue='pusher'>"
    )
    # --8<-- [end:wire]

    # --8<-- [start:options]
    urgent = send_to_s3_v2.with_options(queue="pusher-urgent", priority=9)
    later = purge.with_options(countdown=timedelta(minutes=5), expires=3600)
    assert isinstance(urgent, RemoteTask)
    assert (urgent.queue, send_to_s3_v2.queue) == ("pusher-urgent", "pusher")
    assert (later.options.countdown, later.options.expires) == (300.0, 3600.0)
    try:
        purge.with_options(priority=10)  # checked now, not when a message is sent
    except ConfigurationError as exc:
        assert str(exc) == "priority must be an integer from 0 to 9, got 10"
    # --8<-- [end:options]
    else:
        raise AssertionError("priority=10 was accepted")


if __name__ == "__main__":
    asyncio.run(main())
