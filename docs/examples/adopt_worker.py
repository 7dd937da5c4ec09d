"""Acme's pusher worker: implements the contract of ``acme-pusher-bindings``.

Started as any Celery worker, from this directory::

    celery -A adopt_worker worker -Q acme-pusher

Running the file instead runs the task in this process with Celery's ``task.apply()`` and checks
the worker against the bindings with ``celerybridge check``, as CI would; no broker is needed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from celerybridge import celery_app

# Stands in for `pip install acme-pusher-bindings`: the examples run from a checkout.
sys.path.insert(0, str(Path(__file__).parent / "adopt_bindings"))

from acme_pusher_bindings import Archived, archive

HERE = Path(__file__).parent

# --8<-- [start:worker]
app = celery_app("acme_pusher")  # broker and result backend from CELERYBRIDGE_* variables

ARCHIVE: dict[str, str] = {}
"""Stands in for the S3 client the real worker would use (see the pusher)."""


@archive.implement(app)
async def store(key: str, document: str) -> Archived:
    ARCHIVE[key] = document
    return Archived(key=key, size=len(document.encode()))


# --8<-- [end:worker]


def check(*modules: str) -> subprocess.CompletedProcess[str]:
    """``celerybridge check MODULES...`` from this directory, as CI runs it."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE / "adopt_bindings"), str(HERE)])}
    command = [sys.executable, "-m", "celerybridge", "check", *modules]
    return subprocess.run(command, cwd=HERE, env=env, capture_output=True, text=True)


def main() -> None:
    task = app.tasks["acme_pusher.archive"]  # registered under the contract's wire name
    assert task.apply(args=("orders/1.json", '{"total": 12}')).get() == {
        "key": "orders/1.json",
        "size": 13,
    }
    assert ARCHIVE == {"orders/1.json": '{"total": 12}'}

    # --8<-- [start:check]
    checked = check("adopt_worker")
    assert checked.returncode == 0
    assert checked.stdout == (
        "ok        acme_pusher.archive v1 (acme_pusher.archive, queue acme-pusher)\n"
    )
    # --8<-- [end:check]

    # --8<-- [start:drift]
    drifted = check("acme_pusher_bindings", "adopt_plain_worker")
    assert drifted.returncode == 1
    assert drifted.stdout == (
        "MISMATCH  acme_pusher.archive v1 (acme_pusher.archive, queue acme-pusher): "
        "archive(key: str, document: str, retention_days: int) -> dict[str, object] "
        "cannot take the arguments of (key: str, document: str) -> acme_pusher_bindings.Archived "
        "positionally: missing a required argument: 'retention_days'\n"
    )
    # --8<-- [end:drift]


if __name__ == "__main__":
    main()
