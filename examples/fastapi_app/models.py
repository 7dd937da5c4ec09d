"""What the services accept and answer: pydantic models, FastAPI's usual 422 on bad input."""

from __future__ import annotations

import datetime as dt
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from pusher.bindings import Receipt

BackupState = Literal["pending", "done", "failed"]


class ItemIn(BaseModel):
    """A new item."""

    name: str = Field(min_length=1, max_length=100)
    quantity: int = Field(ge=0, le=1_000_000)
    note: str | None = Field(default=None, max_length=500)


class ItemRecord(ItemIn):
    """An item as saved: what is backed up to S3, as JSON."""

    model_config = ConfigDict(from_attributes=True)

    id: int
    service: str
    created_at: dt.datetime


class BackupOut(BaseModel):
    """Where an item's backup stands."""

    state: BackupState
    task_id: str | None
    """The pusher task, once the broker accepted it."""
    receipt: Receipt | None = None
    """What landed in S3, once done."""
    error: str | None = None
    """Why it failed, once failed; why it is not queued yet, while pending."""


class ItemOut(ItemRecord):
    """An item and its backup."""

    backup: BackupOut
