"""Fixtures of the fuzz suite: its scale, a fuzz run per target, the report.

The README's test command runs the short version (a few hundred messages per broker);
``make fuzz`` sets ``CELERYBRIDGE_FUZZ=long`` (over 10,000 messages) and
``CELERYBRIDGE_FUZZ_REPORT`` / ``CELERYBRIDGE_FUZZ_MARKDOWN`` to the files that get the
figures, ``CELERYBRIDGE_FUZZ_REPRO`` to where violating cases are saved for replay.
``CELERYBRIDGE_FUZZ_SEED`` fixes the long run's seed (the short run is derandomized).
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal

from .. import _summary as summary
from .._brokers import BROKERS
from .._workers import Worker
from ._fates import Target
from ._harness import FuzzRun
from ._model import MAX_MESSAGE_BYTES

LONG = os.environ.get("CELERYBRIDGE_FUZZ", "short") == "long"
SIGNING_KEY = "fuzz-" + "0123456789abcdef" * 3


@dataclass(frozen=True)
class Scale:
    batch: int
    """Messages per batch (cases; a replay sends two)."""
    batches: int
    """Batches per target for a worker without a key."""
    keyed_batches: int
    """Batches per target for a worker with a key."""
    settle_seconds: float
    """How long a batch may take to be dead-lettered or run."""
    isolate_seconds: float
    """Time spent per target sending the cases of broken batches one at a time."""
    max_breaks: int
    """Crashes and wedges after which a target's run stops."""
    seed: int | None


SCALE = (
    Scale(
        40,
        160,
        100,
        30.0,
        600.0,
        20,
        int(os.environ.get("CELERYBRIDGE_FUZZ_SEED") or 0) or random.randrange(2**32),
    )
    if LONG
    else Scale(25, 6, 4, 10.0, 20.0, 1, None)
)


@pytest.fixture(scope="module")
def portal() -> Iterator[BlockingPortal]:
    """An event loop in a thread, for the good calls of synchronous hypothesis tests."""
    with start_blocking_portal() as portal:
        yield portal


@pytest.fixture
def fuzz_run(
    start_pusher: Callable[..., Worker],
    s3: Any,
    bucket: str,
    portal: BlockingPortal,
    request: pytest.FixtureRequest,
    tmp_path: Path,
) -> Iterator[Callable[[str, bool], FuzzRun]]:
    """``fuzz_run(broker, keyed)``: a pusher worker and the run that fuzzes it."""
    made: list[FuzzRun] = []
    repro_dir = Path(os.environ.get("CELERYBRIDGE_FUZZ_REPRO") or tmp_path / "repro")

    def make(broker: str, keyed: bool) -> FuzzRun:
        env = {"CELERYBRIDGE_MAX_MESSAGE_BYTES": str(MAX_MESSAGE_BYTES)}
        if keyed:
            env["CELERYBRIDGE_SIGNING_KEY"] = SIGNING_KEY
        target = Target(
            broker,  # type: ignore[arg-type]
            BROKERS[broker],
            SIGNING_KEY if keyed else None,
            lambda queue: start_pusher(broker, queue=queue, **env),
        )
        run = FuzzRun(
            target,
            s3,
            bucket,
            portal,
            settle_seconds=SCALE.settle_seconds,
            isolate_seconds=SCALE.isolate_seconds,
            repro_dir=repro_dir,
            label=f"{broker}, {'keyed' if keyed else 'no key'}",
        )
        made.append(run)
        return run

    yield make
    for run in made:
        run.close()
        _report(run)


def _report(run: FuzzRun) -> None:
    lines = [run.figures.markdown()]
    if run.violations:
        lines.append(f"{len(run.violations)} violations, first ones:")
        lines += [violation.describe()[:1500] for violation in run.violations[:10]]
    summary.add("fuzz suite", "\n".join(lines))
    row = {**run.figures.row(), "seed": SCALE.seed}
    row["violations"] = [v.describe() for v in run.violations[:200]]
    if target := os.environ.get("CELERYBRIDGE_FUZZ_REPORT"):
        with open(target, "a") as out:
            out.write(json.dumps(row) + "\n")
    if target := os.environ.get("CELERYBRIDGE_FUZZ_MARKDOWN"):
        with open(target, "a") as out:
            out.write(run.figures.markdown() + "\n")
