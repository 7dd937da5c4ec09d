"""What became of each fuzz case, and the worker under test."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from celerybridge._constants import DEAD_REASON_HEADER
from celerybridge._signing import Signer

from .._workers import Worker
from ._model import Case
from ._wire import BrokerName, DeadEntry

MARKER = re.compile(r"fz([0-9a-f]{6})n(\d{6})(-l\d+)?")
DEAD_KINDS = frozenset(
    {"malformed", "raw", "signature", "replay", "unknown-task", "contract", "retries"}
)
"""``celerybridge._constants.DEAD_KIND_*``, spelled out: the gate may add constants."""


@dataclass
class Fate:
    """What became of one case so far."""

    case: Case
    sent: int = 0
    unsendable: str | None = None
    dead: list[DeadEntry] = field(default_factory=list)
    misrouted: list[str] = field(default_factory=list)
    landed: bool = False
    """Its main key is in S3."""
    executed: bool = False
    """Its task has a result of its own (not a dead letter's failure): a task that writes
    nothing, such as ``celery.backend_cleanup``, ran."""

    @property
    def ran(self) -> bool:
        return self.landed or self.executed

    def settled(self) -> bool:
        expect, dead, copies = self.case.expect, len(self.dead), self.sent
        if self.unsendable is not None or not self.sent or self.misrouted:
            return True
        if expect == "refuse":
            return dead >= copies
        if expect == "run":
            return self.landed
        if expect == "once":
            return self.landed and dead >= copies - 1
        return self.ran or dead >= 1


@dataclass
class Target:
    """The worker under test and how to start another like it."""

    broker: BrokerName
    broker_url: str
    signing_key: str | None
    """The worker's CELERYBRIDGE_SIGNING_KEY, which good calls are signed with too."""
    start: Callable[[str], Worker]
    """Start a worker on this queue (the suite's ``start_pusher`` with the right env)."""
    queue: str = field(default_factory=lambda: f"cb-fuzz-{uuid.uuid4().hex[:8]}")
    worker: Worker | None = None
    old_queues: list[str] = field(default_factory=list)
    """Queues of workers that crashed or wedged (their leftovers are purged at the end)."""

    def up(self, fresh: bool = False) -> Worker:
        """The worker, started if needed; ``fresh``: a new one on a new, empty queue."""
        if fresh:
            if self.worker is not None and self.worker.running:
                self.worker.kill()
            self.old_queues.append(self.queue)
            self.queue = f"cb-fuzz-{uuid.uuid4().hex[:8]}"
            self.worker = None
        if self.worker is None or not self.worker.running:
            self.worker = self.start(self.queue)
        return self.worker

    @property
    def signer(self) -> Signer | None:
        return None if self.signing_key is None else Signer(self.signing_key, 300)

    @property
    def dead_queue(self) -> str:
        return f"{self.queue}.dead"


def raw_reason(entry: DeadEntry) -> Any:
    """The reason header of a dead letter read as raw bytes (peeked on a shared queue)."""
    try:
        return json.loads(entry.body)["headers"].get(DEAD_REASON_HEADER)
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def is_uuid(value: Any) -> bool:
    try:
        uuid.UUID(str(value))
    except ValueError:
        return False
    return True


def empty_raw(fate: Fate) -> bool:
    return fate.case.wire.raw is not None and not fate.case.wire.raw.strip()


def case_number(key: str, run: str) -> int | None:
    match = MARKER.search(key)
    return int(match[2]) if match and match[1] == run else None
