# mypy: disable-error-code="empty-body"
"""Contracts of Acme's pusher, for the services that call it.

Each stub is the signature of a task the pusher's worker implements; no body runs here.
Importing this module imports celerybridge and pydantic, nothing of the worker's.
"""

from __future__ import annotations

from typing import Final

from pydantic import BaseModel

from celerybridge import remote_task

QUEUE: Final = "acme-pusher"


class Archived(BaseModel):
    """Where a document landed."""

    key: str
    size: int


@remote_task(name="acme_pusher.archive", queue=QUEUE)
def archive(key: str, document: str) -> Archived:
    """Store ``document`` under ``key`` and say where it landed."""
