"""The real pusher, plus one signal handler that writes each task run to the ledger.

Run as ``celery -A tests.faults.ledger_pusher worker``; ``FAULTS_LEDGER`` names the
SQLite file (see :mod:`tests.faults._ledger`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from celery import signals

from pusher.celery import app
from tests.faults._ledger import record_run

__all__ = ["app"]

LEDGER = Path(os.environ["FAULTS_LEDGER"])

# Celery cannot tell ``--pool=prefork`` from its default, so an app that configures a
# pool (the pusher: celerybridge.AsyncioPool) keeps it. The pool-child case asks for prefork here.
app.conf.worker_pool = os.environ.get("FAULTS_POOL", app.conf.worker_pool)


@signals.task_prerun.connect(weak=False)
def _record(task_id: str, args: tuple[Any, ...] = (), **_: Any) -> None:
    key = args[0] if args else "?"
    record_run(LEDGER, str(key), task_id, os.getpid())
