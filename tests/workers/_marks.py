"""What the pool test workers' tasks leave behind: their task id, and marker files the
tests read (``CB_POOL_MARKERS``, a directory)."""

from __future__ import annotations

import os
from pathlib import Path

from celery import current_task


def task_id() -> str:
    """The id of the task being run, as Celery's ``current_task`` sees it."""
    return str(current_task.request.id)


def mark(name: str, text: str) -> None:
    """Append ``text`` to the marker file ``name``, if the worker was given a directory."""
    markers = os.environ.get("CB_POOL_MARKERS")
    if markers:
        with (Path(markers) / name).open("a") as out:
            out.write(text + "\n")
