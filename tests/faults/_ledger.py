"""The fault suite's ledger: what callers saw, what workers ran, what S3 holds.

Every delegation of a fault run gets a key of its own and a content that names it.
The caller records each call's outcome (``ok``, ``error`` or ``unknown``), the worker
records every run of every task (``tests.faults.ledger_pusher``), and the test records
the faults it injects. All of it goes to one SQLite file in the test's temporary
folder: a side store no fault ever touches. :meth:`Ledger.tally` then reads S3 and
counts what the issue asks for:

- **lost**: the caller saw ``ok`` but the object is absent or holds other bytes;
- **unexpected**: the object is present for a call whose caller saw it fail;
- **duplicated runs**: runs beyond the first, per call (at-least-once allows them);
- **vanished**: the broker accepted the call (its publish returned), yet no worker ever
  ran it and the caller waited in vain: a message lost between broker and worker.
"""

from __future__ import annotations

import itertools
import json
import sqlite3
import statistics
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from botocore.exceptions import ClientError

SCHEMA = """
CREATE TABLE IF NOT EXISTS calls (key TEXT PRIMARY KEY, content TEXT, outcome TEXT, detail TEXT);
CREATE TABLE IF NOT EXISTS runs (key TEXT, task_id TEXT, pid INTEGER, started REAL);
CREATE TABLE IF NOT EXISTS faults (kind TEXT, pid INTEGER, at REAL);
"""
OUTCOMES = ("ok", "error", "unknown")
WAITED = "ResultTimeoutError"
"""How the detail of a call starts when its publish succeeded but no result came."""


@contextmanager
def _connect(path: Path) -> Iterator[sqlite3.Connection]:
    # A short-lived connection per write: worker threads and processes share the file.
    with closing(sqlite3.connect(path, timeout=30, isolation_level=None)) as db:
        db.execute("PRAGMA journal_mode=WAL")
        yield db


def record_run(path: Path, key: str, task_id: str, pid: int) -> None:
    """Called by the worker as a task starts (each delivery, redeliveries included)."""
    with _connect(path) as db:
        db.execute("INSERT INTO runs VALUES (?, ?, ?, ?)", (key, task_id, pid, time.time()))


@dataclass
class Tally:
    """What one fault run came to; ``lost`` and ``unexpected`` must be 0."""

    case: str
    broker: str
    calls: int = 0
    ok: int = 0
    error: int = 0
    unknown: int = 0
    landed: int = 0
    lost: int = 0
    unexpected: int = 0
    duplicated_runs: int = 0
    vanished: int = 0
    faults: dict[str, int] = field(default_factory=dict)
    redelivery_s: list[float] = field(default_factory=list)
    """Seconds from a kill to the next run of each task the killed process held."""
    examples: list[str] = field(default_factory=list)

    def row(self) -> dict[str, Any]:
        data = asdict(self)
        delays = data.pop("redelivery_s")
        data.pop("examples")
        data["redelivered"] = len(delays)
        data["redelivery_median_s"] = round(statistics.median(delays), 2) if delays else None
        data["redelivery_max_s"] = round(max(delays), 2) if delays else None
        return data


class Ledger:
    """The caller's side of the ledger, and the final count."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with _connect(path) as db:
            db.executescript(SCHEMA)

    def call(self, key: str, content: str, outcome: str, detail: str = "") -> None:
        assert outcome in OUTCOMES, outcome
        with _connect(self.path) as db:
            db.execute(
                "INSERT OR REPLACE INTO calls VALUES (?, ?, ?, ?)", (key, content, outcome, detail)
            )

    def calls(self, rows: list[tuple[str, str, str, str]]) -> None:
        """Record many ``(key, content, outcome, detail)`` at once, in one transaction."""
        assert all(row[2] in OUTCOMES for row in rows), rows[:3]
        with _connect(self.path) as db:
            db.execute("BEGIN")
            db.executemany("INSERT OR REPLACE INTO calls VALUES (?, ?, ?, ?)", rows)
            db.execute("COMMIT")

    def fault(self, kind: str, pid: int = 0) -> None:
        with _connect(self.path) as db:
            db.execute("INSERT INTO faults VALUES (?, ?, ?)", (kind, pid, time.time()))

    def _rows(self, query: str) -> list[tuple[Any, ...]]:
        with _connect(self.path) as db:
            return db.execute(query).fetchall()

    def tally(self, case: str, broker: str, s3: Any, bucket: str) -> Tally:
        """Read every call's object from S3 and count lost, unexpected and duplicated."""
        tally = Tally(case, broker)
        runs: dict[str, list[tuple[int, float]]] = {}
        for key, _task_id, pid, started in self._rows("SELECT * FROM runs ORDER BY started"):
            runs.setdefault(key, []).append((pid, started))
        kills = {pid: at for _kind, pid, at in self._rows("SELECT * FROM faults") if pid}
        for kind, _pid, _at in self._rows("SELECT * FROM faults"):
            tally.faults[kind] = tally.faults.get(kind, 0) + 1
        for key, content, outcome, detail in self._rows("SELECT * FROM calls"):
            tally.calls += 1
            setattr(tally, outcome, getattr(tally, outcome) + 1)
            stored = read_object(s3, bucket, key)
            right = stored == content.encode()
            tally.landed += right
            if outcome == "ok" and not right:
                tally.lost += 1
                tally.examples.append(f"lost {key}: stored {stored!r:.80}")
            if outcome == "error" and stored is not None:
                tally.unexpected += 1
                tally.examples.append(f"unexpected {key}: the caller saw {detail}")
            mine = runs.get(key, [])
            if outcome == "unknown" and not mine and not right and detail.startswith(WAITED):
                tally.vanished += 1
            if outcome == "unknown":
                tally.examples.append(f"unknown {key}: {detail}; {len(mine)} runs, landed: {right}")
            tally.duplicated_runs += max(0, len(mine) - 1)
            for (pid, _), (_, again) in itertools.pairwise(mine):
                if pid in kills:
                    tally.redelivery_s.append(again - kills[pid])
        return tally


def read_object(s3: Any, bucket: str, key: str) -> bytes | None:
    """The bytes stored under ``key``, or ``None`` if there is no such object."""
    try:
        body: bytes = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") == "NoSuchKey":
            return None
        raise
    return body


def content_for(key: str, n: int, size: int = 256) -> str:
    """A JSON document naming its call, padded to about ``size`` bytes."""
    head = json.dumps({"key": key, "n": n})
    return head[:-1] + f', "pad": "{"x" * max(0, size - len(head) - 10)}"}}'
